//! The SimpleTuner backend against its stand-in (`tests/standins/simpletuner`),
//! launched through the accelerate stand-in exactly as rendered, with the
//! webhook events received on loopback.

use crate::session;

use serde_json::Value;
use session::{
    Fixture, Session, first_progress, hf_home, max_progress, restore, sdxl_preset_model, tools,
    webhook_listener,
};
use std::os::unix::process::ExitStatusExt;
use trainyard_backends::simpletuner::SimpleTuner;
use trainyard_backends::{LineEvent, StopRequest, TrainInputs, TrainerBackend};
use trainyard_proto::v1::ErrorKind;

fn backend() -> SimpleTuner {
    SimpleTuner::new(&tools())
}

async fn with_webhook(
    mut inputs: TrainInputs,
) -> (TrainInputs, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (url, bodies) = webhook_listener().await;
    inputs.webhook_url = Some(url);
    (inputs, bodies)
}

#[tokio::test]
async fn a_killed_run_resumes_from_its_last_complete_checkpoint() {
    let b = backend();
    let fx = Fixture::new(3);
    let (first, hooks) = with_webhook(fx.inputs("simpletuner", "first", 60, 10)).await;
    let mut run = Session::start(&b, &first, &[("STANDIN_STEP_SECONDS", "0.05")], Some(hooks));
    let mut found = None;
    run.until(|_| {
        found = b.latest_checkpoint(&first);
        found.is_some()
    })
    .await;
    let found = found.expect("a complete checkpoint");
    let status = run.kill().await;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(found.step >= 10 && found.step % 10 == 0, "{found:?}");
    let names: Vec<_> = found
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap())
        .collect();
    for expected in [
        ".guard",
        "pytorch_lora_weights.safetensors",
        "training_state.json",
        "optimizer.bin",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }

    let (mut second, hooks) = with_webhook(fx.inputs("simpletuner", "second", 60, 10)).await;
    second.resume = Some(restore(&found, &first.output_dir, &second.output_dir));
    let done = Session::start(
        &b,
        &second,
        &[("STANDIN_STEP_SECONDS", "0.01")],
        Some(hooks),
    )
    .finish()
    .await;
    assert!(done.status.success(), "{:?}", done.last_lines());
    assert_eq!(
        first_progress(&done.events),
        Some(found.step),
        "{:?}",
        done.events
    );
    assert_eq!(max_progress(&done.events), Some(60));
    assert!(
        done.events
            .contains(&LineEvent::Resumed { step: found.step })
    );
    assert!(
        done.events.contains(&LineEvent::Done),
        "training_complete from the webhook"
    );
    assert!(done.events.contains(&LineEvent::Saved {
        step: Some(found.step + 10)
    }));
    // Progress came from the bar and from the webhook (which carries the loss average).
    assert!(done.bodies.iter().any(|b| b["type"] == "training.status"));
    let adapter = b.final_adapter(&second).expect("final adapter");
    assert!(std::fs::metadata(adapter).unwrap().len() > 8);
    assert_eq!(b.latest_checkpoint(&second).unwrap().step, 60);
}

#[tokio::test]
async fn a_stop_request_saves_a_new_complete_checkpoint() {
    let b = backend();
    let fx = Fixture::new(3);
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "stop", 400, 0)).await;
    let mut run = Session::start(
        &b,
        &inputs,
        &[("STANDIN_STEP_SECONDS", "0.02")],
        Some(hooks),
    );
    assert!(
        run.until(|s| max_progress(&s.events).is_some_and(|n| n >= 5))
            .await
    );
    assert_eq!(b.latest_checkpoint(&inputs), None, "no scheduled saves");
    let StopRequest::SaveAndContinue { path, body } = b.stop_request(&inputs) else {
        panic!("SimpleTuner saves on request")
    };
    std::fs::write(path, body).unwrap();
    let mut found = None;
    run.until(|_| {
        found = b.latest_checkpoint(&inputs);
        found.is_some()
    })
    .await;
    let found = found.expect("the requested checkpoint");
    // The webhook says so too, once the save is complete.
    let step = found.step;
    assert!(
        run.until(|s| s.events.contains(&LineEvent::Saved { step: Some(step) }))
            .await
    );
    assert!(
        max_progress(&run.events).unwrap() < 400,
        "training went on until stopped"
    );
    run.kill().await;
    assert!(found.step >= 5);
    assert!(found.files.iter().any(|f| f.ends_with(".guard")));
}

async fn failed_run(fx: &Fixture, env: &[(&str, &str)]) -> session::Finished {
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "fault", 20, 0)).await;
    Session::start(&backend(), &inputs, env, Some(hooks))
        .finish()
        .await
}

#[tokio::test]
async fn an_oom_is_classified_as_out_of_memory() {
    let fx = Fixture::new(3);
    let done = failed_run(&fx, &[("STANDIN_FAULT", "oom@3")]).await;
    assert!(!done.status.success());
    assert_eq!(max_progress(&done.events), Some(2));
    let error = backend().classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::Oom, true),
        "{}",
        error.message
    );
    assert!(
        done.bodies.iter().any(|b| b["type"] == "error"),
        "the webhook error event"
    );
}

#[tokio::test]
async fn exit_zero_midway_leaves_no_final_adapter() {
    let fx = Fixture::new(3);
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "exit0", 20, 0)).await;
    let done = Session::start(
        &backend(),
        &inputs,
        &[("STANDIN_FAULT", "exit0@3")],
        Some(hooks),
    )
    .finish()
    .await;
    assert!(done.status.success());
    assert_eq!(backend().final_adapter(&inputs), None);
    assert!(!done.events.contains(&LineEvent::Done));
}

#[tokio::test]
async fn a_nan_loss_stops_the_run_for_good() {
    let fx = Fixture::new(3);
    let done = failed_run(&fx, &[("STANDIN_NAN_FROM", "4")]).await;
    assert!(!done.status.success());
    let nan = done
        .events
        .iter()
        .any(|e| matches!(e, LineEvent::Progress { loss: Some(l), .. } if l.is_nan()));
    assert!(nan, "the bar shows the nan loss");
    let error = backend().classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::Trainer, false),
        "{}",
        error.message
    );
    assert!(error.message.contains("Non-finite training loss detected"));
}

#[tokio::test]
async fn the_data_backends_are_checked_like_simpletuner_does() {
    // Without the text_embeds backend SimpleTuner refuses to start.
    let b = backend();
    let fx = Fixture::new(3);
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "noembeds", 20, 0)).await;
    let mut launch = b.render(&inputs).unwrap();
    for (path, body) in &mut launch.files {
        if path.ends_with("multidatabackend.json") {
            let mut backends: Vec<Value> = serde_json::from_slice(body).unwrap();
            backends.retain(|b| b["dataset_type"] != "text_embeds");
            *body = serde_json::to_vec(&backends).unwrap();
        }
    }
    session::write_files(&launch);
    let done = Session::spawn(launch, b.parser(&inputs), &inputs, &[], Some(hooks))
        .finish()
        .await;
    assert!(!done.status.success());
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(error.kind(), ErrorKind::Internal, "{}", error.message);
    assert!(
        error
            .message
            .contains("Must provide at least one text embed backend")
    );
    assert!(done.bodies.iter().any(|b| {
        b["stage"]["status"] == "failed"
            && b["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Failed to load data backends")
    }));

    // An empty dataset.
    let empty = Fixture::new(0);
    let done = failed_run(&empty, &[]).await;
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::BadDataset, false),
        "{}",
        error.message
    );
}

/// The `sdxl-base-1.0` preset fetches only the fp16 files of its diffusers
/// folder: SimpleTuner loads them with `variant: fp16`, and its VAE from
/// that folder instead of its default Hub id, with nothing in the HF cache.
#[tokio::test]
async fn the_sdxl_preset_loads_with_its_variant_and_its_own_vae() {
    let b = backend();
    let fx = Fixture::new(3);
    let model = sdxl_preset_model(fx.dir.path());
    let folder = model.parts["diffusers"].clone();
    let (inputs, hooks) = with_webhook(TrainInputs {
        model,
        ..fx.inputs("simpletuner", "sdxl", 6, 0)
    })
    .await;
    let home = hf_home(fx.dir.path(), &[]);
    let done = Session::start(
        &b,
        &inputs,
        &[("HF_HOME", home.to_str().unwrap())],
        Some(hooks),
    )
    .finish()
    .await;
    assert!(done.status.success(), "{:?}", done.last_lines());
    assert!(done.events.contains(&LineEvent::Done));
    assert!(b.final_adapter(&inputs).is_some());
    let config: Value =
        serde_json::from_slice(&std::fs::read(inputs.run_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["variant"], "fp16");
    assert_eq!(
        config["pretrained_vae_model_name_or_path"],
        folder.to_str().unwrap()
    );
}

/// Each way SimpleTuner fails to load that folder: without the variant
/// (the plain file names are not there), with a variant the folder lacks,
/// and with the default VAE (a Hub id not in the cache). Each failure is
/// the base model's and final.
#[tokio::test]
async fn the_model_is_loaded_as_strictly_as_simpletuner_loads_it() {
    let b = backend();
    let fx = Fixture::new(3);
    let inputs = TrainInputs {
        model: sdxl_preset_model(fx.dir.path()),
        ..fx.inputs("simpletuner", "strict", 6, 0)
    };
    let home = hf_home(fx.dir.path(), &[]);
    type Edit = fn(&mut serde_json::Map<String, Value>);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "no variant",
            |c| {
                c.remove("variant");
            },
            "text_encoder",
        ),
        (
            "a variant the folder lacks",
            |c| {
                c.insert("variant".into(), "bf16".into());
            },
            "text_encoder",
        ),
        (
            "the default VAE",
            |c| {
                c.remove("pretrained_vae_model_name_or_path");
            },
            "madebyollin/sdxl-vae-fp16-fix",
        ),
    ];
    for (case, edit, named) in cases {
        let mut launch = b.render(&inputs).unwrap();
        for (path, body) in &mut launch.files {
            if path.ends_with("config.json") {
                let mut config: serde_json::Map<String, Value> =
                    serde_json::from_slice(body).unwrap();
                edit(&mut config);
                *body = serde_json::to_vec(&config).unwrap();
            }
        }
        session::write_files(&launch);
        let done = Session::spawn(
            launch,
            b.parser(&inputs),
            &inputs,
            &[("HF_HOME", home.to_str().unwrap())],
            None,
        )
        .finish()
        .await;
        assert!(!done.status.success(), "{case}: {:?}", done.last_lines());
        let error = b.classify(done.status, done.last_lines());
        assert_eq!(
            (error.kind(), error.retryable),
            (ErrorKind::Model, false),
            "{case}: {}",
            error.message
        );
        assert!(error.message.contains(named), "{case}: {}", error.message);
    }
}

/// SimpleTuner saves once per rise of `manual_checkpoint`: a second stop
/// request in the same run must write a higher count than the first.
#[tokio::test]
async fn each_stop_request_in_a_run_saves_a_checkpoint() {
    let b = backend();
    let fx = Fixture::new(3);
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "stops", 400, 0)).await;
    let mut run = Session::start(
        &b,
        &inputs,
        &[("STANDIN_STEP_SECONDS", "0.02")],
        Some(hooks),
    );
    let mut saved: Vec<u32> = Vec::new();
    for request in 1..=2 {
        let StopRequest::SaveAndContinue { path, body } = b.stop_request(&inputs) else {
            panic!("SimpleTuner saves on request")
        };
        std::fs::write(path, body).unwrap();
        let before = saved.last().copied();
        let mut found = None;
        let newer = run
            .until(|_| {
                found = b
                    .latest_checkpoint(&inputs)
                    .filter(|c| before.is_none_or(|b| c.step > b));
                found.is_some()
            })
            .await;
        assert!(newer, "stop request {request} saved nothing");
        saved.push(found.unwrap().step);
    }
    assert!(
        max_progress(&run.events).unwrap() < 400,
        "training went on until stopped"
    );
    run.kill().await;
}

/// SimpleTuner sends `checkpoint_save completed` before it writes the
/// sampler state, the manifest and `.guard`: a saved event (on which the
/// worker looks for the checkpoint to upload) must come only once the
/// folder is complete, so the worker finds that very checkpoint.
#[tokio::test]
async fn a_saved_event_comes_once_its_checkpoint_is_complete() {
    let b = backend();
    let fx = Fixture::new(3);
    let (inputs, hooks) = with_webhook(fx.inputs("simpletuner", "saved", 30, 10)).await;
    let mut run = Session::start(
        &b,
        &inputs,
        &[
            ("STANDIN_STEP_SECONDS", "0.01"),
            ("STANDIN_SAVE_SECONDS", "0.3"),
        ],
        Some(hooks),
    );
    // Each saved event, with the newest complete checkpoint as it arrives.
    let mut seen: Vec<(Option<u32>, Option<u32>)> = Vec::new();
    let mut hints = 0;
    run.until(|s| {
        let count = s
            .events
            .iter()
            .filter(|e| matches!(e, LineEvent::Saved { .. }))
            .count();
        if count > hints {
            hints = count;
            if let Some(LineEvent::Saved { step }) = s.events.last() {
                seen.push((*step, b.latest_checkpoint(&inputs).map(|c| c.step)));
            }
        }
        seen.len() == 3
    })
    .await;
    let done = run.finish().await;
    assert!(done.status.success(), "{:?}", done.last_lines());
    assert_eq!(
        seen,
        [
            (Some(10), Some(10)),
            (Some(20), Some(20)),
            (Some(30), Some(30))
        ]
    );
}

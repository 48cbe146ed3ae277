//! The SimpleTuner backend against its stand-in (`tests/standins/simpletuner`),
//! launched through the accelerate stand-in exactly as rendered, with the
//! webhook events received on loopback.

use crate::session;

use serde_json::Value;
use session::{Fixture, Session, first_progress, max_progress, restore, tools, webhook_listener};
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

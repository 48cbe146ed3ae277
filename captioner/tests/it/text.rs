//! Language-model datasets: `train.jsonl` found in a zip or folder, stored
//! with its sha256, and checked row by row for the job's method.

use crate::common;

use common::{within, write_zip};
use trainyard_captioner::preflight::{self, check};
use trainyard_captioner::text::prepare_text;
use trainyard_captioner::{LocalInput, PrepareError, UnpackLimits};
use trainyard_proto::v1::{ExtraValue, JobSpec, ModelRef, TrainingSettings, extra_value::Kind};

fn spec(method: &str, steps: u32, batch_size: u32) -> JobSpec {
    JobSpec {
        training: Some(TrainingSettings {
            backend: "trl".into(),
            method: method.into(),
            steps,
            batch_size,
            repeats: 1,
            ..Default::default()
        }),
        base_model: Some(ModelRef {
            uri: "qwen2.5-0.5b-instruct".into(),
            family: "llm".into(),
        }),
        ..Default::default()
    }
}

const SFT_ROWS: &str = "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n\
                        {\"prompt\": \"3+3?\", \"completion\": \"6\"}\n\
                        {\"prompt\": \"capital of France?\", \"completion\": \"Paris\"}\n";

#[tokio::test]
async fn a_zipped_train_jsonl_is_prepared_and_estimated() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let zip = tmp.path().join("set.zip");
        write_zip(
            &zip,
            &[
                ("my-set/train.jsonl", SFT_ROWS.as_bytes()),
                ("my-set/README.md", b"notes"),
                ("__MACOSX/my-set/._train.jsonl", b"junk"),
            ],
        );
        let prepared = prepare_text(
            LocalInput::Zip(zip),
            &tmp.path().join("work"),
            UnpackLimits::default(),
        )
        .await
        .unwrap();
        assert_eq!(prepared.manifest.texts.len(), 1);
        let entry = &prepared.manifest.texts[0];
        assert_eq!(entry.file, "train.jsonl");
        assert_eq!(entry.size, SFT_ROWS.len() as u64);
        assert_eq!(
            std::fs::read_to_string(prepared.dir.join("train.jsonl")).unwrap(),
            SFT_ROWS
        );
        let files: Vec<String> = prepared
            .files()
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["train.jsonl", "manifest.json"]);

        let mut s = spec("sft", 10, 2);
        s.training.as_mut().unwrap().extras.insert(
            "gradient_accumulation_steps".into(),
            ExtraValue {
                kind: Some(Kind::Int(2)),
            },
        );
        let report = preflight::check_dataset(&s, &prepared).await;
        assert!(report.passed(), "{report:#?}");
        let e = report.estimate.unwrap();
        assert_eq!(
            (
                e.images,
                e.batch_size,
                e.steps_per_epoch,
                e.total_steps,
                e.unit.as_str()
            ),
            (3, 4, 1, 10, "examples"),
            "3 examples ÷ (batch 2 × 2 accumulation steps)"
        );
        assert_eq!(
            preflight::describe(&e),
            "3 examples ÷ batch 4 = 1 steps per epoch; 10 steps ≈ 10.0 epochs"
        );
    })
    .await
}

#[tokio::test]
async fn rows_that_do_not_fit_the_method_are_each_a_problem() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data.jsonl"), SFT_ROWS).unwrap();
        let prepared = prepare_text(
            LocalInput::Dir(dir),
            &tmp.path().join("work"),
            UnpackLimits::default(),
        )
        .await
        .unwrap();
        // SFT rows for a DPO job: every line lacks chosen/rejected.
        let report = preflight::check_dataset(&spec("dpo", 10, 1), &prepared).await;
        assert_eq!(report.problems.len(), 3, "{report:#?}");
        assert!(report.problems.iter().all(|p| p.check == check::JSONL));
        assert!(
            report.problems[0]
                .message
                .starts_with("train.jsonl for dpo: line 1: "),
            "{:?}",
            report.problems[0]
        );
        assert!(report.estimate.is_none());
    })
    .await
}

#[tokio::test]
async fn a_dataset_without_a_jsonl_file_says_what_it_holds() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.jsonl"), SFT_ROWS).unwrap();
        std::fs::write(dir.join("b.jsonl"), SFT_ROWS).unwrap();
        let error = prepare_text(LocalInput::Dir(dir), &tmp.path().join("work"), UnpackLimits::default())
            .await
            .unwrap_err();
        assert!(matches!(error, PrepareError::NoTextDataset { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            "a language-model dataset is one train.jsonl (or a single .jsonl file); it holds a.jsonl, b.jsonl"
        );
        assert!(!error.is_retryable());
    })
    .await
}

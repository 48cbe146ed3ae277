//! The model card (`README.md`) committed with a job's files to an
//! `hf://` destination: YAML front matter the Hub reads (`base_model`,
//! `license`, `tags`, `instance_prompt`), then the base model, the trigger
//! word, the training settings, sample prompts and how to load the adapter.
//!
//! The front matter is serialised from a struct, never formatted by hand:
//! a trigger word or name holding YAML syntax stays a string. Tenant text
//! in the body is flattened to one line and kept out of code spans' way.
//! `base_model` is written only when it is a Hub repository (a preset's or
//! an `hf://` reference's): the Hub refuses a card whose `base_model` is
//! not one.
//!
//! Sample prompts: the first few distinct captions of the prepared
//! dataset (its `manifest.json`), which show how the trigger word was used
//! in training; none when the dataset has no captions (text datasets).

use serde::Serialize;
use trainyard_models::ModelSource;
use trainyard_proto::v1::{JobSpec, TrainSummary};

/// Sample prompts shown at most.
pub const MAX_SAMPLES: usize = 3;
/// Characters of one sample prompt shown at most.
const MAX_SAMPLE_CHARS: usize = 300;

/// What the card describes.
pub struct CardInput<'a> {
    pub repo: &'a str,
    pub spec: &'a JobSpec,
    pub summary: &'a TrainSummary,
    /// `Destination.license`; empty: `other`.
    pub license: &'a str,
    /// Paths in the repository of the adapter files, with sizes and sha256.
    pub files: &'a [(String, u64, String)],
    pub samples: &'a [String],
}

#[derive(Serialize)]
struct FrontMatter {
    #[serde(skip_serializing_if = "Option::is_none")]
    base_model: Option<String>,
    license: String,
    tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_prompt: Option<String>,
}

/// Tenant text as one line without backticks.
fn flat(text: &str, max: usize) -> String {
    let line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('`', "'");
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// The Hub repository a base model reference names, and its family.
fn base_model(spec: &JobSpec) -> (Option<String>, String) {
    let model = spec.base_model.clone().unwrap_or_default();
    match ModelSource::parse(&model.uri) {
        Ok(ModelSource::Preset(preset)) => (
            preset.parts.first().map(|p| p.repo.to_owned()),
            preset.family.to_string(),
        ),
        Ok(ModelSource::Hub(hub)) => (Some(hub.repo), model.family),
        _ => (None, model.family),
    }
}

/// The `README.md` of a delivery.
pub fn model_card(input: &CardInput<'_>) -> String {
    let spec = input.spec;
    let training = spec.training.clone().unwrap_or_default();
    let trigger = spec
        .caption
        .as_ref()
        .map(|c| flat(&c.trigger_word, 100))
        .filter(|t| !t.is_empty());
    let (hub_base, family) = base_model(spec);
    let base_uri = spec
        .base_model
        .as_ref()
        .map(|m| m.uri.clone())
        .unwrap_or_default();
    let mut tags = vec!["lora".to_owned(), "trainyard".to_owned()];
    for tag in [training.backend.as_str(), family.as_str()] {
        let tag = flat(tag, 50).to_lowercase();
        if !tag.is_empty() && !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    let front = FrontMatter {
        base_model: hub_base.clone(),
        license: if input.license.is_empty() {
            "other".into()
        } else {
            input.license.to_owned()
        },
        tags,
        instance_prompt: trigger.clone(),
    };
    let yaml = serde_yaml::to_string(&front).unwrap_or_default();
    let title = match flat(&spec.name, 100) {
        name if name.is_empty() => input.repo.to_owned(),
        name => name,
    };
    let mut md = format!("---\n{yaml}---\n\n# {title}\n\n");
    md.push_str(&format!(
        "A LoRA adapter trained by [Trainyard](https://example.invalid/trainyard) with the \
         `{}` backend.\n\n",
        flat(&training.backend, 50)
    ));
    md.push_str("## Base model\n\n");
    match &hub_base {
        Some(repo) => md.push_str(&format!("[{repo}](https://huggingface.co/{repo})")),
        None => md.push_str(&format!("`{}`", flat(&base_uri, 200))),
    }
    if !family.is_empty() {
        md.push_str(&format!(" ({})", flat(&family, 50)));
    }
    md.push_str("\n\n## Trigger word\n\n");
    match &trigger {
        Some(word) => md.push_str(&format!("Use `{word}` in the prompt.\n\n")),
        None => md.push_str("None: the adapter was trained without one.\n\n"),
    }
    md.push_str("## Training settings\n\n| setting | value |\n|---|---|\n");
    let alpha = if training.alpha > 0.0 {
        training.alpha
    } else {
        f64::from(training.rank)
    };
    let mut rows = vec![
        ("backend", flat(&training.backend, 50)),
        ("steps", training.steps.to_string()),
        ("learning rate", training.learning_rate.to_string()),
        ("rank", training.rank.to_string()),
        ("alpha", alpha.to_string()),
        ("resolution", training.resolution.to_string()),
        ("batch size", training.batch_size.to_string()),
    ];
    if !training.method.is_empty() {
        rows.push(("method", flat(&training.method, 20)));
    }
    if input.summary.loss_last.is_finite() && input.summary.steps > 0 {
        rows.push(("final loss", format!("{:.4}", input.summary.loss_last)));
    }
    for (name, value) in rows {
        md.push_str(&format!("| {name} | {value} |\n"));
    }
    if !input.samples.is_empty() {
        md.push_str("\n## Sample prompts\n\nCaptions from the training set:\n\n");
        for sample in input.samples.iter().take(MAX_SAMPLES) {
            md.push_str(&format!("- `{}`\n", flat(sample, MAX_SAMPLE_CHARS)));
        }
    }
    md.push_str("\n## Files\n\n");
    for (path, size, sha256) in input.files {
        md.push_str(&format!("- `{path}`: {size} bytes, sha256 `{sha256}`\n"));
    }
    md.push_str("- `manifest.json`: every file's size and sha256, and the settings above\n");
    md.push_str("\n## How to use\n\n");
    let weight = input
        .files
        .iter()
        .map(|(path, _, _)| path.as_str())
        .find(|p| p.ends_with(".safetensors"))
        .unwrap_or("adapter_model.safetensors");
    let (folder, file) = weight.rsplit_once('/').unwrap_or(("", weight));
    let base = hub_base.as_deref().unwrap_or("<base model>");
    let prompt = trigger.as_deref().unwrap_or("a photo");
    if family == "llm" {
        let subfolder = if folder.is_empty() {
            String::new()
        } else {
            format!(", subfolder=\"{folder}\"")
        };
        md.push_str(&format!(
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n\
             base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n\
             model = PeftModel.from_pretrained(base, \"{}\"{subfolder})\n```\n",
            input.repo
        ));
    } else {
        let subfolder = if folder.is_empty() {
            String::new()
        } else {
            format!(", subfolder=\"{folder}\"")
        };
        md.push_str(&format!(
            "```python\nfrom diffusers import DiffusionPipeline\n\n\
             pipe = DiffusionPipeline.from_pretrained(\"{base}\")\n\
             pipe.load_lora_weights(\"{}\", weight_name=\"{file}\"{subfolder})\n\
             image = pipe(\"{}\").images[0]\n```\n",
            input.repo,
            prompt.replace('"', "'")
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{CaptionSettings, ModelRef, TrainingSettings};

    fn spec(base: &str, trigger: &str) -> JobSpec {
        JobSpec {
            name: "my lora".into(),
            base_model: Some(ModelRef {
                uri: base.into(),
                family: String::new(),
            }),
            caption: Some(CaptionSettings {
                trigger_word: trigger.into(),
                ..Default::default()
            }),
            training: Some(TrainingSettings {
                backend: "kohya".into(),
                steps: 1000,
                learning_rate: 1e-4,
                rank: 16,
                alpha: 8.0,
                resolution: 1024,
                batch_size: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn front(card: &str) -> serde_yaml::Value {
        let yaml = card
            .strip_prefix("---\n")
            .and_then(|rest| rest.split_once("---\n"))
            .map(|(yaml, _)| yaml)
            .expect("front matter");
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_card_names_the_base_model_trigger_settings_and_samples() {
        let spec = spec(
            "hf://black-forest-labs/FLUX.1-dev@main/flux1-dev.safetensors",
            "tyzx",
        );
        let files = [("loras/lora.safetensors".to_string(), 1234, "ab".repeat(32))];
        let card = model_card(&CardInput {
            repo: "me/my-lora",
            spec: &spec,
            summary: &TrainSummary {
                steps: 1000,
                loss_last: 0.125,
                ..Default::default()
            },
            license: "",
            files: &files,
            samples: &["tyzx a dog\non a `beach`".into()],
        });
        let yaml = front(&card);
        assert_eq!(yaml["base_model"], "black-forest-labs/FLUX.1-dev");
        assert_eq!(yaml["license"], "other");
        assert_eq!(yaml["instance_prompt"], "tyzx");
        let tags: Vec<&str> = yaml["tags"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tags, ["lora", "trainyard", "kohya"]);
        assert!(card.contains("| steps | 1000 |"), "{card}");
        assert!(card.contains("| rank | 16 |"));
        assert!(card.contains("| alpha | 8 |"));
        assert!(card.contains("| final loss | 0.1250 |"));
        assert!(card.contains("- `tyzx a dog on a 'beach'`"), "{card}");
        assert!(card.contains("weight_name=\"lora.safetensors\", subfolder=\"loras\""));
        assert!(card.contains("Use `tyzx` in the prompt."));
    }

    #[test]
    fn tenant_text_cannot_break_the_front_matter() {
        let spec = spec("file:///store/model.safetensors", "x\n---\nlicense: mit\n");
        let card = model_card(&CardInput {
            repo: "me/r",
            spec: &spec,
            summary: &TrainSummary::default(),
            license: "apache-2.0",
            files: &[],
            samples: &[],
        });
        let yaml = front(&card);
        assert_eq!(yaml["license"], "apache-2.0");
        assert_eq!(yaml["instance_prompt"], "x --- license: mit");
        assert!(yaml.get("base_model").is_none(), "not a hub repository");
        assert!(!card.contains("## Sample prompts"));
    }
}

//! A job's `caption` settings at submission: their shape ([`normalise`]:
//! known backend, fallback and `on_error`, an http(s) endpoint without
//! credentials, bounded prompts and numbers, a secret the job holds) and
//! what the fleet's `[captioner.caption]` section allows ([`CaptionRules`]:
//! a configured command, an OpenAI server to talk to, the fleet's caps).
//! The captioner checks again when it builds the job's backend.

use super::{FieldError, Problems};
use trainyard_core::config::{CAPTION_BACKENDS, CaptionConfig};
use trainyard_proto::v1::{CaptionSettings, JobSpec};

const MAX_PROMPT: usize = 4000;

fn known(backend: &str) -> bool {
    CAPTION_BACKENDS.contains(&backend)
}

fn uses(caption: &CaptionSettings, backend: &str) -> bool {
    caption.backend == backend || caption.fallback == backend
}

/// The shape of `spec.caption` (an empty backend is the fleet's default,
/// resolved by the captioner).
pub(super) fn normalise(spec: &JobSpec, p: &mut Problems) {
    let Some(caption) = &spec.caption else {
        return;
    };
    if !caption.backend.is_empty() && !known(&caption.backend) {
        p.add(
            "caption.backend",
            format!(
                "unknown caption backend {:?}; known: {}",
                caption.backend,
                CAPTION_BACKENDS.join(", ")
            ),
        );
    }
    if !caption.fallback.is_empty() {
        if !known(&caption.fallback) {
            p.add(
                "caption.fallback",
                format!("unknown caption backend {:?}", caption.fallback),
            );
        } else if caption.fallback == caption.backend {
            p.add("caption.fallback", "is the backend itself");
        }
    }
    p.check(
        matches!(caption.on_error.as_str(), "" | "fail" | "template"),
        "caption.on_error",
        "must be \"fail\" or \"template\"",
    );
    if !caption.endpoint.is_empty() {
        check_endpoint(&caption.endpoint, p);
        p.check(
            uses(caption, "openai"),
            "caption.endpoint",
            "is only for the openai backend",
        );
    }
    if uses(caption, "command") {
        p.check(
            !caption.command.is_empty()
                && caption.command.len() <= 64
                && caption
                    .command
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "caption.command",
            "must name one of the fleet's caption commands (letters, digits, '-', '_')",
        );
    }
    p.check(
        caption.model.len() <= 200 && !caption.model.chars().any(char::is_control),
        "caption.model",
        "must be one line of at most 200 characters",
    );
    p.check(
        caption.prompt.chars().count() <= MAX_PROMPT,
        "caption.prompt",
        "is longer than 4000 characters",
    );
    p.check(
        caption.system_prompt.chars().count() <= MAX_PROMPT,
        "caption.system_prompt",
        "is longer than 4000 characters",
    );
    p.check(
        caption.max_tokens <= 8192,
        "caption.max_tokens",
        "must be at most 8192",
    );
    if let Some(t) = caption.temperature {
        p.check(
            (0.0..=2.0).contains(&t),
            "caption.temperature",
            "must be from 0 to 2",
        );
    }
    p.check(
        caption.max_chars <= 10_000,
        "caption.max_chars",
        "must be at most 10000",
    );
    p.check(
        caption.max_chars == 0 || caption.min_chars <= caption.max_chars,
        "caption.min_chars",
        "is above caption.max_chars",
    );
    p.check(
        caption.timeout_secs <= 3600,
        "caption.timeout_secs",
        "must be at most 3600",
    );
    p.check(
        caption.video_frames <= 64,
        "caption.video_frames",
        "must be at most 64",
    );
    if !caption.api_key_secret.is_empty() {
        let held = spec
            .secrets
            .as_ref()
            .is_some_and(|s| s.values.contains_key(&caption.api_key_secret));
        p.check(
            held,
            "caption.api_key_secret",
            "names a secret the job's secrets.values do not hold",
        );
    }
}

fn check_endpoint(endpoint: &str, p: &mut Problems) {
    match reqwest::Url::parse(endpoint) {
        Err(e) => p.add("caption.endpoint", format!("is not a valid url: {e}")),
        Ok(url) => {
            p.check(
                matches!(url.scheme(), "http" | "https"),
                "caption.endpoint",
                "must be an http:// or https:// url",
            );
            p.check(
                url.username().is_empty() && url.password().is_none(),
                "caption.endpoint",
                "must not hold credentials; put the key in secrets.values",
            );
            p.check(url.host_str().is_some(), "caption.endpoint", "has no host");
            p.check(
                url.query().is_none() && url.fragment().is_none(),
                "caption.endpoint",
                "must be a base url (\".../v1\") without query or fragment",
            );
            p.check(
                endpoint.len() <= 2048,
                "caption.endpoint",
                "is longer than 2048 characters",
            );
        }
    }
}

/// What submission checks of captions depend on the fleet's config.
#[derive(Clone, Debug, Default)]
pub struct CaptionRules {
    config: CaptionConfig,
}

impl CaptionRules {
    pub fn from_config(config: &CaptionConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }

    /// Every problem of `spec.caption` under this fleet's section.
    pub fn check(&self, spec: &JobSpec) -> Vec<FieldError> {
        let mut p = Problems::default();
        let Some(caption) = &spec.caption else {
            return p.0;
        };
        let c = &self.config;
        if uses(caption, "command") && !c.commands.contains_key(&caption.command) {
            let known: Vec<&str> = c.commands.keys().map(String::as_str).collect();
            p.add(
                "caption.command",
                format!(
                    "{:?} is not one of this fleet's caption commands ({})",
                    caption.command,
                    if known.is_empty() {
                        "none configured".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let openai = caption.backend == "openai"
            || caption.fallback == "openai"
            || (caption.backend.is_empty() && c.backend == "openai");
        if openai && caption.endpoint.is_empty() && c.openai.endpoint.is_empty() {
            p.add(
                "caption.endpoint",
                "is required: this fleet has no OpenAI-compatible caption server",
            );
        }
        if openai && caption.model.is_empty() && c.openai.model.is_empty() {
            p.add(
                "caption.model",
                "is required: this fleet has no default model",
            );
        }
        p.check(
            caption.timeout_secs <= c.max_timeout_secs,
            "caption.timeout_secs",
            "is above this fleet's max_timeout_secs",
        );
        p.check(
            caption.video_frames <= c.max_video_frames,
            "caption.video_frames",
            "is above this fleet's max_video_frames",
        );
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_core::config::CaptionCommand;
    use trainyard_proto::v1::Secrets;

    fn fields(caption: CaptionSettings) -> Vec<String> {
        let spec = JobSpec {
            caption: Some(caption),
            ..Default::default()
        };
        let mut p = Problems::default();
        normalise(&spec, &mut p);
        p.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn caption_settings_are_checked_field_by_field() {
        assert!(fields(CaptionSettings::default()).is_empty());
        let ok = CaptionSettings {
            backend: "openai".into(),
            endpoint: "https://vllm.example.com/v1".into(),
            fallback: "template".into(),
            on_error: "template".into(),
            temperature: Some(0.6),
            ..Default::default()
        };
        assert!(fields(ok.clone()).is_empty());
        let cases: Vec<(CaptionSettings, &str)> = vec![
            (
                CaptionSettings {
                    backend: "blip".into(),
                    endpoint: String::new(),
                    ..ok.clone()
                },
                "caption.backend",
            ),
            (
                CaptionSettings {
                    fallback: "openai".into(),
                    ..ok.clone()
                },
                "caption.fallback",
            ),
            (
                CaptionSettings {
                    on_error: "skip".into(),
                    ..ok.clone()
                },
                "caption.on_error",
            ),
            (
                CaptionSettings {
                    endpoint: "ftp://x/v1".into(),
                    ..ok.clone()
                },
                "caption.endpoint",
            ),
            (
                CaptionSettings {
                    endpoint: "https://u:p@x/v1".into(),
                    ..ok.clone()
                },
                "caption.endpoint",
            ),
            (
                CaptionSettings {
                    backend: "gemini".into(),
                    fallback: String::new(),
                    ..ok.clone()
                },
                "caption.endpoint",
            ),
            (
                CaptionSettings {
                    backend: "command".into(),
                    command: "/bin/sh".into(),
                    endpoint: String::new(),
                    ..ok.clone()
                },
                "caption.command",
            ),
            (
                CaptionSettings {
                    temperature: Some(3.0),
                    ..ok.clone()
                },
                "caption.temperature",
            ),
            (
                CaptionSettings {
                    min_chars: 50,
                    max_chars: 10,
                    ..ok.clone()
                },
                "caption.min_chars",
            ),
            (
                CaptionSettings {
                    prompt: "x".repeat(5000),
                    ..ok.clone()
                },
                "caption.prompt",
            ),
            (
                CaptionSettings {
                    api_key_secret: "k".into(),
                    ..ok.clone()
                },
                "caption.api_key_secret",
            ),
        ];
        for (caption, field) in cases {
            assert_eq!(fields(caption.clone()), [field], "{caption:?}");
        }
        let spec = JobSpec {
            caption: Some(CaptionSettings {
                api_key_secret: "k".into(),
                ..ok
            }),
            secrets: Some(Secrets {
                values: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut p = Problems::default();
        normalise(&spec, &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
    }

    #[test]
    fn the_fleet_decides_commands_and_whether_openai_has_a_server() {
        let mut config = CaptionConfig::default();
        config.commands.insert(
            "florence2".into(),
            CaptionCommand {
                argv: vec!["/opt/florence2.py".into()],
                ..Default::default()
            },
        );
        let rules = CaptionRules::from_config(&config);
        let check = |caption: CaptionSettings| -> Vec<String> {
            let spec = JobSpec {
                caption: Some(caption),
                ..Default::default()
            };
            rules.check(&spec).into_iter().map(|e| e.field).collect()
        };
        let command = |name: &str| CaptionSettings {
            backend: "command".into(),
            command: name.into(),
            ..Default::default()
        };
        assert!(check(command("florence2")).is_empty());
        assert_eq!(check(command("blip")), ["caption.command"]);
        let openai = CaptionSettings {
            backend: "openai".into(),
            ..Default::default()
        };
        assert_eq!(check(openai.clone()), ["caption.endpoint", "caption.model"]);
        assert!(
            check(CaptionSettings {
                endpoint: "https://x/v1".into(),
                model: "m".into(),
                ..openai
            })
            .is_empty()
        );
    }
}

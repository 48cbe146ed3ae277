//! A job's webhook at submission: the URL and event names
//! ([`normalise`]), and what the fleet's config allows ([`SubmitRules`]).
//! Delivery is [`crate::webhooks`]; the event names are its vocabulary.

use super::{FieldError, Problems};
use crate::webhooks::{COMPLETED, EVENTS, guard};
use reqwest::Url;
use trainyard_core::config::WebhooksConfig;
use trainyard_proto::v1::{JobSpec, Webhook};

/// A job's webhook: an http(s) URL without credentials, and known event
/// names (none means `completed`; the stored spec lists them). Whether the
/// fleet can deliver it (webhooks on, the address) is checked by the API
/// with the fleet's config ([`SubmitRules`]).
pub(super) fn normalise(hook: &mut Webhook, p: &mut Problems) {
    match reqwest::Url::parse(&hook.url) {
        Err(e) => p.add("webhook.url", format!("is not a valid url: {e}")),
        Ok(url) => {
            p.check(
                matches!(url.scheme(), "http" | "https"),
                "webhook.url",
                "must be an http:// or https:// url",
            );
            p.check(
                url.username().is_empty() && url.password().is_none(),
                "webhook.url",
                "must not hold credentials (user:password@); put a token in the path or query",
            );
            p.check(url.host_str().is_some(), "webhook.url", "has no host");
            p.check(
                hook.url.len() <= 2048,
                "webhook.url",
                "is longer than 2048 characters",
            );
        }
    }
    for event in &hook.events {
        if !EVENTS.contains(&event.as_str()) {
            p.add(
                "webhook.events",
                format!("unknown event {event:?}; use \"completed\" or \"state\""),
            );
        }
    }
    if hook.events.is_empty() {
        hook.events.push(COMPLETED.into());
    }
    hook.events.sort();
    hook.events.dedup();
}

/// What submission checks of a webhook depend on the fleet's config.
#[derive(Clone, Debug, Default)]
pub struct SubmitRules {
    /// Webhooks are on (`[webhooks] enabled`).
    pub enabled: bool,
    pub allow_private_addresses: bool,
}

impl SubmitRules {
    pub fn from_config(config: &WebhooksConfig) -> Self {
        Self {
            enabled: config.is_enabled(),
            allow_private_addresses: config.allow_private_addresses,
        }
    }

    /// Refuses a webhook this fleet cannot deliver: none configured, or a
    /// literal non-public address. (A name is resolved at delivery time.)
    pub fn check(&self, spec: &JobSpec) -> Result<(), FieldError> {
        let Some(hook) = &spec.webhook else {
            return Ok(());
        };
        if !self.enabled {
            return Err(FieldError::new(
                "webhook",
                "webhooks are not configured on this fleet",
            ));
        }
        let guard = guard(self.allow_private_addresses);
        let url =
            Url::parse(&hook.url).map_err(|e| FieldError::new("webhook.url", e.to_string()))?;
        guard
            .check_url(&url)
            .map_err(|refusal| FieldError::new("webhook.url", refusal.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_rules_refuse_what_cannot_be_delivered() {
        let spec = JobSpec {
            webhook: Some(Webhook {
                url: "https://hooks.example/x?token=t".into(),
                events: Vec::new(),
            }),
            ..Default::default()
        };
        let off = SubmitRules::default();
        let err = off.check(&spec).unwrap_err();
        assert_eq!(err.field, "webhook");
        assert!(err.problem.contains("not configured"), "{err}");
        let on = SubmitRules {
            enabled: true,
            allow_private_addresses: false,
        };
        on.check(&spec).unwrap();
        let mut private = spec.clone();
        private.webhook.as_mut().unwrap().url = "http://169.254.169.254/latest".into();
        let err = on.check(&private).unwrap_err();
        assert_eq!(err.field, "webhook.url");
        assert!(err.problem.contains("not a public address"), "{err}");
        SubmitRules {
            enabled: true,
            allow_private_addresses: true,
        }
        .check(&private)
        .unwrap();
        assert!(on.check(&JobSpec::default()).is_ok());
    }
}

//! `yard webhooks secret` and `yard webhooks rotate`: the caller's tenant's
//! webhook signing secret. The secret alone goes to stdout (for a script
//! to store in the receiver's settings); notes go to stderr.

use crate::args::{WebhookSecretArgs, WebhooksCommand};
use crate::client::Client;
use std::process::ExitCode;
use trainyard_proto::v1::{
    GetWebhookSecretRequest, RotateWebhookSecretRequest, WebhookSecretResponse,
};

pub async fn run(client: &mut Client, command: WebhooksCommand) -> anyhow::Result<ExitCode> {
    let (reply, args, rotated) = match command {
        WebhooksCommand::Secret(args) => (
            client
                .get_webhook_secret(GetWebhookSecretRequest {})
                .await?
                .into_inner(),
            args,
            false,
        ),
        WebhooksCommand::Rotate(args) => (
            client
                .rotate_webhook_secret(RotateWebhookSecretRequest {})
                .await?
                .into_inner(),
            args,
            true,
        ),
    };
    print(&reply, &args, rotated);
    Ok(ExitCode::SUCCESS)
}

fn print(reply: &WebhookSecretResponse, args: &WebhookSecretArgs, rotated: bool) {
    if args.json {
        println!("{}", json(reply));
        return;
    }
    println!("{}", reply.secret);
    if reply.previous_valid_until_ms > 0 {
        let verb = if rotated { "rotated: " } else { "" };
        eprintln!(
            "{verb}the previous secret also signs until {} (unix ms); switch receivers to this one before then",
            reply.previous_valid_until_ms
        );
    }
}

fn json(reply: &WebhookSecretResponse) -> serde_json::Value {
    serde_json::json!({
        "secret": reply.secret,
        "created_at_ms": reply.created_at_ms,
        "previous_valid_until_ms": reply.previous_valid_until_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_every_field() {
        let value = json(&WebhookSecretResponse {
            secret: "whsec_abc".into(),
            created_at_ms: 5,
            previous_valid_until_ms: 9,
        });
        assert_eq!(value["secret"], "whsec_abc");
        assert_eq!(value["created_at_ms"], 5);
        assert_eq!(value["previous_valid_until_ms"], 9);
    }
}

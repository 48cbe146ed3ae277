//! Who may do what on the bus: one NATS identity per service role, and the
//! publish/subscribe permissions each needs for the topology above and
//! nothing more. `yard fleet init` writes them into the server's
//! `authorization` block; `tests/it/attacks_bus.rs` checks they suffice for
//! a whole job and refuse everything else.
//!
//! | role | may |
//! |---|---|
//! | coordinator | everything under `ty.>`, the JetStream API, every bucket; answer `ty.api.*`; the only one to create streams, buckets and its own consumers, and to read or write `ty_jobs`, `ty_idem`, `ty_webhook_secrets` |
//! | captioner, worker (per pool), uploader | bind to the streams and buckets; create and pull only its own stage's consumer (a worker: `ty-train-<pool>` filtered on `ty.task.train.<pool>`); read a job record by key (a worker also its job's last checkpoint event, by subject); write its own stage's claims, its registry entry, its stage's result, dead letters and waiting retries (`ty.retry.<stage>.>`), and non-state events; hear cancels, and drain requests for its own stage (and pool) only (`ty.control.drain.train.<pool>.*`, `ty.control.drain.<stage>.*`), answering them |
//! | client | send `ty.api.*` requests and read the replies |
//! | autoscaler | read `TY_TASKS`' info, its consumers' info and its messages by sequence (pending train tasks' steps); read the registry `ty_workers`; read and write `ty_autoscaler` (lease, memory) and `ty_fleet` (decisions); ask a stage service to drain (`ty.control.drain.>`) |
//!
//! Every role reads replies only under its own inbox prefix (`_INBOX_<role>`),
//! never `_INBOX.>`. No role but the coordinator publishes tasks, cancels or
//! state events, or subscribes to `ty.api.>` (its requests carry clients'
//! bearer tokens); none but the autoscaler (and the coordinator, under its
//! `ty.>`) sends drain requests — a client cannot stop a worker.

use super::*;

/// A service role on the bus, each with its own NATS identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    /// The prepare stage, and preflight answers.
    Captioner,
    /// The train stage of one pool.
    Worker {
        pool: String,
    },
    /// The deliver stage.
    Uploader,
    /// Another service calling the job API over NATS.
    Client,
    /// `ty-autoscaler`: reads backlogs and the registry, keeps its lease,
    /// memory and decisions in its own buckets.
    Autoscaler,
}

/// One role's permissions, as the server's config spells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May reply to requests it received (without naming the reply subjects).
    pub allow_responses: bool,
}

/// The stage event kinds a stage may publish: all but `state`, which only
/// the coordinator (the record's owner) sends.
const STAGE_EVENT_KINDS: [EventKind; 5] = [
    EventKind::Progress,
    EventKind::Metric,
    EventKind::Log,
    EventKind::Checkpoint,
    EventKind::Stuck,
];

impl Role {
    /// The role's name in file names and user descriptions:
    /// `coordinator`, `worker_<pool>`.
    pub fn name(&self) -> String {
        match self {
            Role::Coordinator => "coordinator".into(),
            Role::Captioner => "captioner".into(),
            Role::Worker { pool } => format!("worker_{pool}"),
            Role::Uploader => "uploader".into(),
            Role::Client => "client".into(),
            Role::Autoscaler => "autoscaler".into(),
        }
    }

    /// The connection name the server lists.
    pub fn connection_name(&self) -> String {
        match self {
            Role::Worker { .. } => "ty-worker".into(),
            other => format!("ty-{}", other.name()),
        }
    }

    /// The default prefix of this role's reply subjects.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.name())
    }

    /// The stage a stage role runs.
    pub fn stage(&self) -> Option<(Stage, &str)> {
        match self {
            Role::Captioner => Some((Stage::Prepare, "")),
            Role::Worker { pool } => Some((Stage::Train, pool)),
            Role::Uploader => Some((Stage::Deliver, "")),
            Role::Coordinator | Role::Client | Role::Autoscaler => None,
        }
    }

    /// Whether the role lays out the topology (streams, buckets); the
    /// others only bind to it.
    pub fn creates_topology(&self) -> bool {
        matches!(self, Role::Coordinator)
    }

    /// What the role may publish and subscribe to.
    pub fn permissions(&self) -> Permissions {
        let inbox = format!("{}.>", self.inbox_prefix());
        match self {
            Role::Coordinator => Permissions {
                publish: vec![
                    "ty.>".into(),
                    "$JS.API.>".into(),
                    "$JS.ACK.>".into(),
                    "$JS.FC.>".into(),
                    "$KV.>".into(),
                ],
                subscribe: vec!["ty.>".into(), inbox],
                // Answers `ty.api.*` requests in the callers' inboxes.
                allow_responses: true,
            },
            Role::Client => Permissions {
                publish: vec!["ty.api.*".into()],
                subscribe: vec![inbox],
                allow_responses: false,
            },
            Role::Autoscaler => {
                let api = "$JS.API";
                let mut publish = vec![
                    // Backlogs: the task stream's info (with its subjects'
                    // counts) and its consumers' info, answered by their
                    // leaders; pending tasks read by sequence (no consumer).
                    format!("{api}.STREAM.INFO.{TASKS_STREAM}"),
                    format!("{api}.CONSUMER.INFO.{TASKS_STREAM}.*"),
                    format!("{api}.STREAM.MSG.GET.{TASKS_STREAM}"),
                    // Binding the topology: bucket info, never contents.
                    format!("{api}.STREAM.INFO.KV_{JOBS_BUCKET}"),
                    format!("{api}.STREAM.INFO.KV_{CLAIMS_BUCKET}"),
                    // The registry, read whole (a listing through an
                    // ordered consumer on its stream).
                    format!("{api}.STREAM.INFO.KV_{WORKERS_BUCKET}"),
                    format!("{api}.DIRECT.GET.KV_{WORKERS_BUCKET}.>"),
                    format!("{api}.CONSUMER.CREATE.KV_{WORKERS_BUCKET}"),
                    format!("{api}.CONSUMER.CREATE.KV_{WORKERS_BUCKET}.>"),
                    format!("{api}.CONSUMER.DELETE.KV_{WORKERS_BUCKET}.>"),
                    format!("$JS.FC.KV_{WORKERS_BUCKET}.>"),
                ];
                for bucket in [AUTOSCALER_BUCKET, FLEET_BUCKET] {
                    publish.push(format!("{api}.STREAM.INFO.KV_{bucket}"));
                    publish.push(format!("{api}.DIRECT.GET.KV_{bucket}.>"));
                    publish.push(format!("$KV.{bucket}.>"));
                }
                // Drain requests to stage services, answered in its inbox.
                publish.push(subject::all_drains().to_string());
                // `yard fleet status` under this identity lists the pools.
                publish.push(format!("{api}.CONSUMER.CREATE.KV_{FLEET_BUCKET}"));
                publish.push(format!("{api}.CONSUMER.CREATE.KV_{FLEET_BUCKET}.>"));
                publish.push(format!("{api}.CONSUMER.DELETE.KV_{FLEET_BUCKET}.>"));
                publish.push(format!("$JS.FC.KV_{FLEET_BUCKET}.>"));
                Permissions {
                    publish,
                    subscribe: vec![inbox],
                    allow_responses: false,
                }
            }
            stage_role => {
                let (stage, pool) = stage_role.stage().expect("a stage role");
                let consumer = consumer_name(stage, pool);
                let filter = subject::task(stage, pool);
                let api = "$JS.API";
                let mut publish = vec![
                    // Binding: stream and bucket info, no listing.
                    format!("{api}.STREAM.INFO.{TASKS_STREAM}"),
                    format!("{api}.STREAM.INFO.KV_{JOBS_BUCKET}"),
                    format!("{api}.STREAM.INFO.KV_{WORKERS_BUCKET}"),
                    format!("{api}.STREAM.INFO.KV_{CLAIMS_BUCKET}"),
                    // Its own consumer, created with its own filter only.
                    format!("{api}.CONSUMER.INFO.{TASKS_STREAM}.{consumer}"),
                    format!("{api}.CONSUMER.CREATE.{TASKS_STREAM}.{consumer}.{filter}"),
                    format!("{api}.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer}"),
                    format!("$JS.ACK.{TASKS_STREAM}.{consumer}.>"),
                    // A job record by key (admission), never a listing.
                    format!("{api}.DIRECT.GET.KV_{JOBS_BUCKET}.$KV.{JOBS_BUCKET}.>"),
                    // Its stage's claims (`<tenant>.<job>.<stage>`).
                    format!(
                        "{api}.DIRECT.GET.KV_{CLAIMS_BUCKET}.$KV.{CLAIMS_BUCKET}.*.*.{}",
                        stage.name()
                    ),
                    format!("$KV.{CLAIMS_BUCKET}.*.*.{}", stage.name()),
                    // Its registry entry.
                    format!("$KV.{WORKERS_BUCKET}.>"),
                    subject::result(stage),
                    subject::dlq(stage),
                    // Its stage's retries, waiting as message schedules.
                    format!("ty.retry.{}.>", stage.name()),
                ];
                publish.extend(
                    STAGE_EVENT_KINDS
                        .iter()
                        .map(|kind| format!("ty.event.*.*.{}", kind.name())),
                );
                if matches!(stage_role, Role::Worker { .. }) {
                    // A restore trusts only the job's last checkpoint event,
                    // read by subject (never by sequence, never other kinds).
                    publish.push(format!(
                        "{api}.DIRECT.GET.{EVENTS_STREAM}.ty.event.*.*.{}",
                        EventKind::Checkpoint.name()
                    ));
                }
                let mut subscribe = vec![
                    subject::all_cancels().to_string(),
                    // The autoscaler's drain requests for this stage (and
                    // pool) only, answered (hence the responses).
                    subject::drains_of(stage, pool),
                    inbox,
                ];
                if matches!(stage_role, Role::Captioner) {
                    subscribe.push(format!("{} {PREFLIGHT_QUEUE}", subject::preflight()));
                }
                Permissions {
                    publish,
                    subscribe,
                    allow_responses: true,
                }
            }
        }
    }
}

/// One user of the server's `authorization { users = [...] }` block: the
/// role's public nkey and its permissions, in NATS config syntax.
pub fn user_entry(role: &Role, public_nkey: &str) -> String {
    let permissions = role.permissions();
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let responses = if permissions.allow_responses {
        ", allow_responses: true"
    } else {
        ""
    };
    format!(
        "    # {}\n    {{ nkey: {public_nkey:?}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{responses} }} }}",
        role.name(),
        list(&permissions.publish),
        list(&permissions.subscribe),
    )
}

/// The server's `authorization` block for these roles and their public nkeys.
pub fn authorization_block(users: &[(Role, String)]) -> String {
    let entries: Vec<String> = users
        .iter()
        .map(|(role, key)| user_entry(role, key))
        .collect();
    format!(
        "authorization {{\n  users = [\n{}\n  ]\n}}\n",
        entries.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reaches_only_its_own_pool_and_no_api() {
        let p = Role::Worker {
            pool: "a100".into(),
        }
        .permissions();
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.TY_TASKS.ty-train-a100".into())
        );
        assert!(
            p.publish.contains(
                &"$JS.API.CONSUMER.CREATE.TY_TASKS.ty-train-a100.ty.task.train.a100".into()
            )
        );
        assert!(!p.publish.iter().any(|s| s.starts_with("ty.task")
            || s.starts_with("ty.control")
            || s.ends_with(".state")
            || s.contains(IDEM_BUCKET)
            || s.starts_with(&format!("$KV.{JOBS_BUCKET}"))));
        assert!(
            !p.subscribe
                .iter()
                .any(|s| s.starts_with("ty.api") || s.starts_with("_INBOX."))
        );
        assert_eq!(
            Role::Worker {
                pool: "a100".into()
            }
            .inbox_prefix(),
            "_INBOX_worker_a100"
        );
    }

    #[test]
    fn the_autoscaler_reads_backlogs_and_writes_only_its_buckets() {
        let p = Role::Autoscaler.permissions();
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.INFO.TY_TASKS.*".to_string())
        );
        assert!(p.publish.contains(&format!("$KV.{AUTOSCALER_BUCKET}.>")));
        assert!(p.publish.contains(&"ty.control.drain.>".to_string()));
        assert!(
            !p.publish
                .iter()
                .any(|s| (s.starts_with("ty.") && s != "ty.control.drain.>")
                    || s.contains("CONSUMER.CREATE.TY_TASKS")
                    || s.contains("MSG.NEXT")
                    || s.starts_with(&format!("$KV.{JOBS_BUCKET}"))
                    || s.starts_with(&format!("$KV.{WORKERS_BUCKET}")))
        );
        assert_eq!(p.subscribe, ["_INBOX_autoscaler.>"]);
    }

    #[test]
    fn only_the_autoscaler_sends_drains_and_each_stage_hears_its_own() {
        let drain = subject::drain(Stage::Train, "a100", "w-1").expect("subject");
        for role in [
            Role::Client,
            Role::Captioner,
            Role::Uploader,
            Role::Worker {
                pool: "a100".into(),
            },
        ] {
            let p = role.permissions();
            assert!(
                !p.publish.iter().any(|s| s.starts_with("ty.control")),
                "{} may send drains",
                role.name()
            );
        }
        let worker = Role::Worker {
            pool: "a100".into(),
        }
        .permissions();
        assert!(
            worker
                .subscribe
                .contains(&"ty.control.drain.train.a100.*".into())
        );
        assert!(worker.allow_responses);
        assert!(
            !worker
                .subscribe
                .iter()
                .any(|s| s.starts_with("ty.control.drain") && s != "ty.control.drain.train.a100.*")
        );
        assert!(drain.starts_with("ty.control.drain.train.a100."));
        let captioner = Role::Captioner.permissions();
        assert!(
            captioner
                .subscribe
                .contains(&"ty.control.drain.prepare.*".into())
        );
        assert!(
            !captioner
                .subscribe
                .iter()
                .any(|s| s.contains("drain.train"))
        );
        assert!(
            Role::Uploader
                .permissions()
                .subscribe
                .contains(&"ty.control.drain.deliver.*".into())
        );
        assert!(!Role::Client.permissions().allow_responses);
    }

    #[test]
    fn the_block_names_every_user() {
        let block = authorization_block(&[
            (Role::Coordinator, "UCOORD".into()),
            (Role::Client, "UCLIENT".into()),
        ]);
        assert!(block.contains("nkey: \"UCOORD\""));
        assert!(block.contains("allow_responses: true"));
        assert!(block.contains("publish: { allow: [\"ty.api.*\"] }"));
    }
}

//! `yard fleet status`: what the autoscaler keeps in `ty_fleet` — each
//! pool's machines (GPUs, price, spot or on demand, host, the jobs they
//! run) and last decisions — read over the bus with an operator's
//! identity, printed as a table or JSON, with the stop flag of
//! `ty_autoscaler` first when scale-up is stopped. `yard fleet resume`
//! clears that flag.

use crate::args::{FleetResumeArgs, FleetStatusArgs};
use crate::client;
use futures::StreamExt;
use std::fmt::Write as _;
use std::process::ExitCode;
use trainyard_autoscaler::lease::{StopFlag, clear_stop, read_stop};
use trainyard_autoscaler::record::{MachineRecord, PoolRecord};
use trainyard_core::topology::permissions::Role;
use trainyard_core::topology::{AUTOSCALER_BUCKET, FLEET_BUCKET};

pub async fn run(args: FleetStatusArgs) -> anyhow::Result<ExitCode> {
    let Some(config) = client::load_config(&args.service, "yard", true)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let role = match args.role.as_str() {
        "autoscaler" => Role::Autoscaler,
        "coordinator" => Role::Coordinator,
        other => anyhow::bail!("--role {other:?}: autoscaler or coordinator"),
    };
    let client = trainyard_core::nats::connect(&config.nats, &role).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value(FLEET_BUCKET).await.map_err(|e| {
        anyhow::anyhow!("no fleet records ({FLEET_BUCKET}): {e}; is the autoscaler running?")
    })?;
    let mut keys: Vec<String> = kv
        .keys()
        .await?
        .filter_map(|k| async { k.ok() })
        .collect()
        .await;
    keys.sort();
    let mut pools = Vec::new();
    for key in keys {
        if let Some(value) = kv.get(&key).await? {
            match serde_json::from_slice::<PoolRecord>(&value) {
                Ok(record) => pools.push(record),
                Err(error) => eprintln!("warning: pool {key}: unreadable record: {error}"),
            }
        }
    }
    // The stop flag, where this identity may read it.
    let stop = match js.get_key_value(AUTOSCALER_BUCKET).await {
        Ok(state) => read_stop(&state).await.unwrap_or_else(|error| {
            eprintln!("warning: cannot read the stop flag: {error}");
            None
        }),
        Err(error) => {
            eprintln!("warning: cannot read the stop flag ({AUTOSCALER_BUCKET}): {error}");
            None
        }
    };
    if args.json {
        let json = serde_json::json!({
            "stop": stop,
            "pools": pools,
            "dollars_per_hour": dollars_per_hour(&pools),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let now = trainyard_core::now_ms();
        if let Some(flag) = &stop {
            print!("{}", stop_line(flag, now));
        }
        print!("{}", text(&pools, now, args.decisions));
    }
    Ok(ExitCode::SUCCESS)
}

/// `yard fleet resume`: clears the stop flag with the autoscaler's identity.
pub async fn resume(args: FleetResumeArgs) -> anyhow::Result<ExitCode> {
    let Some(config) = client::load_config(&args.service, "yard", true)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let client = trainyard_core::nats::connect(&config.nats, &Role::Autoscaler).await?;
    let js = async_nats::jetstream::new(client);
    let state = js.get_key_value(AUTOSCALER_BUCKET).await.map_err(|e| {
        anyhow::anyhow!(
            "no autoscaler state ({AUTOSCALER_BUCKET}): {e}; is the autoscaler running?"
        )
    })?;
    match clear_stop(&state).await? {
        Some(flag) => println!(
            "resumed: scale-up had stopped {} ago ({} in pool {}: {})",
            ago(trainyard_core::now_ms() - flag.at_ms),
            flag.reason,
            flag.pool,
            flag.message
        ),
        None => println!("not stopped: nothing to resume"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The line `yard fleet status` starts with while scale-up is stopped.
pub fn stop_line(flag: &StopFlag, now_ms: i64) -> String {
    format!(
        "SCALE-UP STOPPED {} ago: {} in pool {} ({}); raise the limit, then `yard fleet resume`\n",
        ago(now_ms - flag.at_ms),
        flag.reason,
        flag.pool,
        flag.message
    )
}

/// What the fleet's machines that still live cost, in dollars an hour.
pub fn dollars_per_hour(pools: &[PoolRecord]) -> f64 {
    pools
        .iter()
        .flat_map(|p| &p.machines)
        .filter(|m| m.activity != "exited")
        .map(|m| m.dollars_per_hour)
        .sum()
}

/// A machine's GPUs: `2x NVIDIA A100 80GB PCIe`, its type alone when the
/// count is unknown, `-` for none.
fn gpu(m: &MachineRecord) -> String {
    match (m.gpu_type.as_str(), m.gpu_count) {
        ("", _) => "-".into(),
        (gpu, 0) => gpu.into(),
        (gpu, n) => format!("{n}x {gpu}"),
    }
}

/// A duration in whole units: `42s`, `5m12s`, `3h04m`.
fn ago(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The table `yard fleet status` prints.
pub fn text(pools: &[PoolRecord], now_ms: i64, decisions: usize) -> String {
    let mut out = String::new();
    if pools.is_empty() {
        out.push_str("no pools yet: the autoscaler has not made a decision\n");
        return out;
    }
    for pool in pools {
        let count = |a: &str| pool.machines.iter().filter(|m| m.activity == a).count();
        let dollars = dollars_per_hour(std::slice::from_ref(pool));
        let _ = write!(
            out,
            "pool {}  machines {} (busy {}, idle {}, starting {}, draining {})  ${dollars:.2}/h",
            pool.pool,
            pool.machines
                .iter()
                .filter(|m| m.activity != "exited")
                .count(),
            count("busy"),
            count("idle"),
            count("starting"),
            count("draining"),
        );
        if let Some(last) = pool.decisions.back() {
            let _ = write!(
                out,
                "  backlog {} pending, {} out, {:.0} min of work  wanted {}",
                last.pending,
                last.ack_pending,
                last.work_secs / 60.0,
                last.wanted
            );
        }
        out.push('\n');
        for m in &pool.machines {
            let _ = writeln!(
                out,
                "  {:<40} {:<9} {:>8}  {:<26} ${:.2}/h {:<6} {:<14} {}",
                m.name,
                m.activity,
                ago(now_ms - m.since_ms),
                gpu(m),
                m.dollars_per_hour,
                if m.interruptible { "spot" } else { "demand" },
                if m.host.is_empty() { "-" } else { &m.host },
                if m.jobs.is_empty() {
                    "-".to_string()
                } else {
                    m.jobs.join(",")
                },
            );
        }
        let skip = pool.decisions.len().saturating_sub(decisions);
        for d in pool.decisions.iter().skip(skip) {
            let _ = write!(
                out,
                "  {:>8} ago  {:<15} pending {} out {} live {} → wanted {}",
                ago(now_ms - d.at_ms),
                d.reason,
                d.pending,
                d.ack_pending,
                d.live,
                d.wanted
            );
            for (what, names) in [
                ("start", &d.launch),
                ("release", &d.release),
                ("drain", &d.drain),
            ] {
                if !names.is_empty() {
                    let _ = write!(out, "  {what} {}", names.join(","));
                }
            }
            if !d.error.is_empty() {
                let _ = write!(out, "  error: {}", d.error);
            }
            out.push('\n');
        }
    }
    let _ = writeln!(out, "fleet ${:.2}/h", dollars_per_hour(pools));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_autoscaler::record::DecisionRecord;

    fn machine(name: &str, activity: &str, dollars: f64) -> MachineRecord {
        MachineRecord {
            name: name.into(),
            activity: activity.into(),
            since_ms: 0,
            dollars_per_hour: dollars,
            gpu_type: "NVIDIA L40S".into(),
            gpu_count: 1,
            interruptible: activity == "busy",
            host: "EU-RO-1".into(),
            jobs: if activity == "busy" {
                vec!["0192a7e0-job".into()]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn the_table_shows_machines_backlog_decisions_and_cost() {
        let decision = DecisionRecord {
            at_ms: 60_000,
            pending: 3,
            ack_pending: 1,
            work_secs: 2_520.0,
            live: 2,
            busy: 1,
            wanted: 3,
            launch: vec!["trainyard-train.flux-3".into()],
            release: vec![],
            drain: vec![],
            reason: "scale_up".into(),
            error: String::new(),
        };
        let pool = PoolRecord {
            pool: "train.flux".into(),
            updated_at_ms: 60_000,
            machines: vec![
                machine("trainyard-train.flux-1", "busy", 0.69),
                machine("trainyard-train.flux-2", "idle", 0.69),
                machine("trainyard-train.flux-0", "exited", 0.69),
            ],
            decisions: [decision].into(),
        };
        let text = text(std::slice::from_ref(&pool), 312_000, 5);
        assert!(
            text.contains(
                "pool train.flux  machines 2 (busy 1, idle 1, starting 0, draining 0)  $1.38/h"
            ),
            "{text}"
        );
        assert!(
            text.contains("backlog 3 pending, 1 out, 42 min of work  wanted 3"),
            "{text}"
        );
        assert!(text.contains("5m12s"), "{text}");
        let columns = |name: &str| -> Vec<String> {
            let row = text.lines().find(|l| l.contains(name)).expect("a row");
            row.split_whitespace().skip(3).map(String::from).collect()
        };
        assert_eq!(
            columns("flux-1"),
            [
                "1x",
                "NVIDIA",
                "L40S",
                "$0.69/h",
                "spot",
                "EU-RO-1",
                "0192a7e0-job"
            ]
        );
        assert_eq!(
            columns("flux-2"),
            ["1x", "NVIDIA", "L40S", "$0.69/h", "demand", "EU-RO-1", "-"]
        );
        let cpu = MachineRecord {
            gpu_type: String::new(),
            ..machine("m", "idle", 0.0)
        };
        assert_eq!(gpu(&cpu), "-");
        assert!(
            text.contains(
                "scale_up        pending 3 out 1 live 2 → wanted 3  start trainyard-train.flux-3"
            ),
            "{text}"
        );
        assert!(text.ends_with("fleet $1.38/h\n"), "{text}");
        assert!((dollars_per_hour(&[pool]) - 1.38).abs() < 1e-9);
        assert!(super::text(&[], 0, 5).starts_with("no pools yet"));
    }

    #[test]
    fn a_stop_is_one_line_naming_its_reason_pool_and_the_way_out() {
        let flag = StopFlag {
            reason: "spend_limit".into(),
            message: "You have reached your spend limit".into(),
            pool: "train.flux".into(),
            at_ms: 0,
        };
        let line = stop_line(&flag, 90_000);
        assert!(
            line.starts_with("SCALE-UP STOPPED 1m30s ago: spend_limit in pool train.flux"),
            "{line}"
        );
        assert!(line.contains("yard fleet resume"), "{line}");
    }
}

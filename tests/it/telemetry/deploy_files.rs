//! `deploy/observability` checked against the metric catalog: dashboards
//! and alert rules name only exported series (through a small PromQL
//! tokenizer), and the compose stack mounts files that exist.

use std::path::Path;
use trainyard_core::telemetry::metrics;

fn observability_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

fn read_yaml(path: &Path) -> serde_yaml::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    // Aggregation operators, which may take `by (…)` before their argument.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names, not metrics.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, strings and ranges that are neither functions, keywords nor
/// label lists of `by (…)`/`on (…)`. Grafana variables (`$x`) are skipped.
fn promql_metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_until = |i: &mut usize, close: char| -> Result<(), String> {
        let open = chars[*i];
        let mut depth = 0;
        while *i < chars.len() {
            let c = chars[*i];
            if c == '"' || c == '\'' || c == '`' {
                *i += 1;
                while *i < chars.len() && chars[*i] != c {
                    if chars[*i] == '\\' {
                        *i += 1;
                    }
                    *i += 1;
                }
            } else if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return Ok(());
                }
            }
            *i += 1;
        }
        Err(format!("unbalanced {open:?} in {expr:?}"))
    };
    let mut depth = 0i32;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => skip_until(&mut i, '}')?,
            '[' => skip_until(&mut i, ']')?,
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(format!("unterminated string in {expr:?}"));
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            '(' => {
                depth += 1;
                i += 1;
            }
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced ')' in {expr:?}"));
                }
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1e-4, 0.95).
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || chars[i] == '.'
                        || chars[i] == '-' && chars[i - 1] == 'e')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let next = chars.get(j).copied();
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    if next == Some('(') {
                        i = j;
                        skip_until(&mut i, ')')?;
                    }
                } else if PROMQL_KEYWORDS.contains(&lower.as_str()) || next == Some('(') {
                    // A keyword or a function call.
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {expr:?}"));
    }
    Ok(names)
}

/// Metrics a query may name besides the catalog's: Prometheus' own `up`.
fn check_query(expr: &str, used: &mut std::collections::BTreeSet<String>) -> Result<(), String> {
    let names = promql_metric_names(expr)?;
    if names.is_empty() {
        return Err(format!("{expr:?} selects no metric"));
    }
    for name in names {
        if name != "up" && !metrics::is_exported_series(&name) {
            return Err(format!("{expr:?} names {name}, which no service exports"));
        }
        used.insert(name);
    }
    Ok(())
}

#[test]
fn the_promql_tokenizer_finds_metric_names() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, stage) (rate(trainyard_stage_duration_seconds_bucket{outcome="ok", x=~"a(b"}[15m])))
           / on (stage) group_left (pool) max(trainyard_worker_slots offset 5m) unless up{job="trainyard"} > bool 1e-4
           and deriv(max(trainyard_job_step{job_id="$job_id"})[5m:])"#,
    )
    .unwrap();
    assert_eq!(
        names,
        [
            "trainyard_stage_duration_seconds_bucket",
            "trainyard_worker_slots",
            "up",
            "trainyard_job_step"
        ]
    );
    let mut used = Default::default();
    let err = check_query("sum(rate(trainyard_jobs_lost_total[5m]))", &mut used).unwrap_err();
    assert!(err.contains("trainyard_jobs_lost_total"), "{err}");
    assert!(check_query("sum by (stage) (", &mut used).is_err());
    assert!(check_query("time()", &mut used).is_err());
}

fn datasource_uids() -> std::collections::BTreeMap<String, String> {
    let doc =
        read_yaml(&observability_dir().join("grafana/provisioning/datasources/datasources.yaml"));
    doc["datasources"]
        .as_sequence()
        .expect("datasources list")
        .iter()
        .map(|d| {
            (
                d["uid"]
                    .as_str()
                    .expect("every datasource has a uid")
                    .to_string(),
                d["type"].as_str().expect("and a type").to_string(),
            )
        })
        .collect()
}

fn check_target(
    where_: &str,
    target: &serde_json::Value,
    panel_ds: &serde_json::Value,
    uids: &std::collections::BTreeMap<String, String>,
    used: &mut std::collections::BTreeSet<String>,
) {
    let ds = if target["datasource"].is_object() {
        &target["datasource"]
    } else {
        panel_ds
    };
    let uid = ds["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("{where_}: no datasource uid"));
    let kind = uids
        .get(uid)
        .unwrap_or_else(|| panic!("{where_}: datasource {uid} is not provisioned"));
    assert_eq!(
        ds["type"].as_str(),
        Some(kind.as_str()),
        "{where_}: datasource type"
    );
    assert!(target["refId"].is_string(), "{where_}: refId");
    match kind.as_str() {
        "prometheus" => {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{where_}: expr"));
            check_query(expr, used).unwrap_or_else(|e| panic!("{where_}: {e}"));
        }
        "tempo" => {
            let query = target["query"].as_str().unwrap_or_default();
            assert!(
                query.contains("trainyard.job.id"),
                "{where_}: TraceQL query {query:?}"
            );
        }
        other => panic!("{where_}: unexpected datasource type {other}"),
    }
}

#[test]
fn dashboards_are_grafana_dashboards_over_exported_metrics() {
    let uids = datasource_uids();
    assert!(uids.values().any(|t| t == "prometheus") && uids.values().any(|t| t == "tempo"));
    let provider =
        read_yaml(&observability_dir().join("grafana/provisioning/dashboards/dashboards.yaml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
    let mut used = std::collections::BTreeSet::new();
    let mut dashboard_uids = std::collections::BTreeSet::new();
    let dir = observability_dir().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, ["fleet", "job", "workers"]);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let d: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        assert!(
            dashboard_uids.insert(d["uid"].as_str().expect("uid").to_string()),
            "{name}: uid unique"
        );
        assert!(
            d["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
            "{name}: schemaVersion"
        );
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{name}: panels");
        let mut ids = std::collections::BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().expect("panel title");
            let where_ = format!("{name} / {title}");
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{where_}: id unique"
            );
            assert!(p["type"].is_string(), "{where_}: type");
            for k in ["x", "y", "w", "h"] {
                assert!(p["gridPos"][k].is_u64(), "{where_}: gridPos.{k}");
            }
            assert!(
                p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{where_}: targets");
            for t in targets {
                check_target(&where_, t, &p["datasource"], &uids, &mut used);
            }
        }
        for var in d["templating"]["list"].as_array().expect("templating.list") {
            let where_ = format!("{name} / ${}", var["name"].as_str().unwrap());
            if var["type"] == "query" {
                let query = var["query"]["query"].as_str().expect("variable query");
                let inner = query
                    .strip_prefix("label_values(")
                    .and_then(|q| q.rsplit_once(','))
                    .map(|(metric, _)| metric)
                    .unwrap_or(query);
                check_target(
                    &where_,
                    &serde_json::json!({"refId": "v", "expr": inner, "datasource": var["datasource"]}),
                    &var["datasource"],
                    &uids,
                    &mut used,
                );
            }
        }
    }
    // Every exported metric is on some dashboard.
    let alerts = alert_metric_names();
    for def in metrics::CATALOG {
        let shown = metrics::series_names(def)
            .iter()
            .any(|s| used.contains(s) || alerts.contains(s));
        assert!(shown, "{} is on no dashboard and in no alert", def.name);
    }
}

fn alert_metric_names() -> std::collections::BTreeSet<String> {
    let doc = read_yaml(&observability_dir().join("prometheus/alerts.yml"));
    let mut used = std::collections::BTreeSet::new();
    let mut alerts = std::collections::BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr");
            check_query(expr, &mut used).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(rule["for"].is_string(), "{name}: for");
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(alerts.insert(name.clone()), "{name} is unique");
        }
    }
    assert_eq!(
        alerts,
        [
            "TrainyardBacklogWithoutWorkers",
            "TrainyardDeadLetters",
            "TrainyardGpuIdleWhileHeld",
            "TrainyardJobNoProgress"
        ]
        .map(String::from)
        .into()
    );
    used
}

#[test]
fn alert_rules_name_exported_metrics() {
    let used = alert_metric_names();
    assert!(used.contains("trainyard_dlq_depth"));
    assert!(used.contains("trainyard_job_progress_timestamp_seconds"));
}

/// Every file the compose stack mounts exists, and Prometheus loads the
/// rule file the compose file mounts.
#[test]
fn the_compose_stack_mounts_files_that_exist() {
    let dir = observability_dir();
    let compose = read_yaml(&dir.join("compose.yaml"));
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "nats",
        "coordinator",
        "captioner",
        "worker",
        "uploader",
        "otel-collector",
        "tempo",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose runs {name}");
    }
    // `deploy/fleet` is written by `yard fleet init` (never committed):
    // what the stack mounts from it must be what that command writes.
    let fleet = tempfile::tempdir().unwrap();
    trainyard_core::fleet::init(fleet.path(), &Default::default()).expect("fleet init");
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap();
            if let Some(generated) = source.strip_prefix("../fleet") {
                let file = fleet.path().join(generated.trim_start_matches('/'));
                assert!(
                    file.exists(),
                    "{name:?} mounts {source}, which yard fleet init does not write"
                );
            } else if source.starts_with('.') {
                assert!(
                    dir.join(source).exists(),
                    "{name:?} mounts {source}, which is missing"
                );
            }
        }
    }
    let prometheus = read_yaml(&dir.join("prometheus/prometheus.yml"));
    assert_eq!(
        prometheus["rule_files"][0].as_str(),
        Some("/etc/prometheus/alerts.yml")
    );
    let ports = &prometheus["scrape_configs"][0]["dns_sd_configs"][0]["port"];
    assert_eq!(ports.as_u64(), Some(9464));
    // Set on the service or in the `x-env` block it merges (`<<: *env`).
    let env = &compose["services"]["coordinator"]["environment"];
    let port = env["TY_TELEMETRY__METRICS_PORT"]
        .as_str()
        .or(env["<<"]["TY_TELEMETRY__METRICS_PORT"].as_str());
    assert_eq!(port, Some("9464"));
}

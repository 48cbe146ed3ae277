//! Reading a service's Prometheus endpoint in tests: fetch `/metrics` over
//! HTTP, parse it with a real parser (prometheus-parse), read values.

use prometheus_parse::{Sample, Scrape, Value};

/// Parses Prometheus text exposition format.
pub fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition format")
}

/// `GET http://<addr>/metrics`, parsed (`addr` is `host:port`).
pub async fn scrape(addr: impl std::fmt::Display) -> Scrape {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    parse(&body)
}

fn matching<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> {
    scrape.samples.iter().filter(move |s| {
        s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })
}

/// A sample's number: counters, gauges and untyped values as they are, a
/// histogram's observation count; a summary has none.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(buckets) => Some(buckets.last().map(|b| b.count).unwrap_or(0.0)),
        Value::Summary(_) => None,
    }
}

/// The value of the first sample of `name` whose labels include `labels`.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    matching(scrape, name, labels).find_map(|s| number(&s.value))
}

/// The sum of every sample of `name` whose labels include `labels`; `None`
/// when there is none.
pub fn total(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    matching(scrape, name, labels)
        .filter_map(|s| number(&s.value))
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

//! Span attributes of a destination: its scheme and, for `s3://`, its
//! bucket, read from the URI as [`trainyard_core::redact::display_url`]
//! shows it, so no credentials or query ever reach a span.

use trainyard_core::redact::display_url;

/// The scheme of a destination (`s3`, `file`, `hf`, or the URI's own) and,
/// for `s3://`, its bucket: span attributes, with no credentials.
pub fn scheme_and_bucket(uri: &str) -> (&'static str, Option<String>) {
    let shown = display_url(uri);
    if let Some(rest) = shown.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        return ("s3", Some(bucket.to_owned()).filter(|b| !b.is_empty()));
    }
    if shown.starts_with("hf://") {
        return ("hf", None);
    }
    if shown.starts_with("file://") || shown.starts_with('/') {
        return ("file", None);
    }
    ("other", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_buckets() {
        assert_eq!(
            scheme_and_bucket("s3://k:SECRET@models/out"),
            ("s3", Some("models".to_owned()))
        );
        assert_eq!(scheme_and_bucket("file:///srv/out"), ("file", None));
        assert_eq!(scheme_and_bucket("/srv/out"), ("file", None));
        assert_eq!(scheme_and_bucket("hf://org/repo"), ("hf", None));
        assert_eq!(scheme_and_bucket("ftp://x"), ("other", None));
    }
}

//! Destination URIs as they may appear in logs, span attributes, progress
//! notes and errors: never with credentials (`s3://key:secret@bucket`) or a
//! query string (presigned URLs carry their signature there).

/// `scheme://host/path` without userinfo, query or fragment; text that is
/// not a URL loses the same parts as far as they can be told.
pub fn display_url(raw: &str) -> String {
    let cut = raw.find(['?', '#']).unwrap_or(raw.len());
    let raw = &raw[..cut];
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, raw),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_owned(),
    }
}

/// `message` with every occurrence of `uri` shown by [`display_url`].
pub fn redact_in(message: &str, uri: &str) -> String {
    if uri.is_empty() {
        return message.to_owned();
    }
    message.replace(uri, &display_url(uri))
}

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
    fn credentials_and_queries_are_never_shown() {
        for (raw, shown) in [
            (
                "s3://AKIA:SECRET@bucket/out?X-Amz-Signature=SECRET",
                "s3://bucket/out",
            ),
            (
                "https://u:SECRET@h.example:9/p?token=SECRET#f",
                "https://h.example:9/p",
            ),
            ("file:///srv/out", "file:///srv/out"),
            ("/srv/out", "/srv/out"),
            ("SECRET@host/x", "host/x"),
        ] {
            assert_eq!(display_url(raw), shown, "{raw}");
        }
        assert_eq!(
            redact_in("destination s3://k:SECRET@b/x: denied", "s3://k:SECRET@b/x"),
            "destination s3://b/x: denied"
        );
        assert_eq!(redact_in("as is", ""), "as is");
    }

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

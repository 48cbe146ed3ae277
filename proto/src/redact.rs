//! URLs as they may be shown — in logs, span attributes, error messages,
//! progress notes and API answers — never with a secret in them.
//!
//! User-given URLs carry secrets in many places: credentials in the userinfo
//! (`s3://key:secret@bucket`), signatures in the query (presigned URLs),
//! tokens in a webhook receiver's path. Every place that shows a URL goes
//! through one of the named policies here, so the same URL reads the same
//! in preflight, delivery and the job record:
//!
//! | policy            | shows                          | for                                |
//! |-------------------|--------------------------------|------------------------------------|
//! | [`display_url`]   | `scheme://host[:port]/path`    | datasets, models, destinations     |
//! | [`origin`]        | `scheme://host[:port]`         | webhook receivers in logs          |
//! | [`origin_masked`] | `scheme://host[:port]/[redacted]` | webhook URLs in job records     |
//! | [`host`]          | `host`                         | span attributes                    |
//!
//! None of them ever shows userinfo, a query or a fragment. Text that does
//! not parse as a URL loses the same parts as far as they can be told, and
//! is cut to [`MAX_UNPARSED`] characters.
//!
//! It lives in `trainyard-proto`, the bottom of the crate graph, because the
//! lowest code that shows a URL is here ([`JobSpec::redacted`] masks a
//! spec's webhook URL in every record the API returns) and proto cannot
//! depend on `trainyard-core`; core re-exports it as `trainyard_core::redact`
//! for the services.
//!
//! [`JobSpec::redacted`]: crate::v1::JobSpec::redacted

use url::Url;

/// How much of a text that is not a URL is shown at most.
pub const MAX_UNPARSED: usize = 200;

/// Shown by [`origin`] for a text that is not a URL.
pub const INVALID: &str = "<invalid url>";

/// Shown by [`origin_masked`] for the part after the origin, and for the
/// whole of a text that is not a URL with a host.
pub const MASK: &str = "[redacted]";

/// `scheme://host[:port]/path`: what a dataset, model or destination URL
/// is shown as. No userinfo, query or fragment; `file:///path` and plain
/// paths are shown whole (they carry none of those).
pub fn display_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) if url.has_host() => display(&url),
        Ok(url) if url.scheme() == "file" => format!("file://{}", url.path()),
        _ => unparsed(raw),
    }
}

/// [`display_url`] of a URL already parsed.
pub fn display(url: &Url) -> String {
    let mut shown = origin_of(url);
    shown.push_str(url.path());
    shown
}

/// `scheme://host[:port]`: a receiver's address without the path, where
/// receivers often carry their token. [`INVALID`] for a text that is not a
/// URL.
pub fn origin(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) => origin_of(&url),
        Err(_) => INVALID.into(),
    }
}

/// `scheme://host[:port]/` when the URL has nothing after its host, else
/// `scheme://host[:port]/[redacted]`: the origin, and whether there was
/// more. [`MASK`] alone for a text that is not a URL with a host.
pub fn origin_masked(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) if url.has_host() => {
            let bare =
                matches!(url.path(), "" | "/") && url.query().is_none() && url.fragment().is_none();
            format!("{}/{}", origin_of(&url), if bare { "" } else { MASK })
        }
        _ => MASK.into(),
    }
}

/// The host of a URL (never its credentials), for a span attribute.
pub fn host(raw: &str) -> Option<String> {
    Url::parse(raw).ok()?.host_str().map(str::to_owned)
}

/// `message` with every occurrence of `uri` shown by [`display_url`]: for
/// errors from libraries that quote the URL they were given.
pub fn redact_in(message: &str, uri: &str) -> String {
    if uri.is_empty() {
        return message.to_owned();
    }
    message.replace(uri, &display_url(uri))
}

/// `scheme://host[:port]` (no port when it is the scheme's default).
fn origin_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// A text that is not a URL with a host: query and fragment cut, and
/// everything up to the last `@` (credentials) dropped — except in a plain
/// absolute path, which has no userinfo to hide.
fn unparsed(raw: &str) -> String {
    let cut = raw.find(['?', '#']).unwrap_or(raw.len());
    let raw = &raw[..cut];
    let after_at = |rest: &str| match rest.rfind('@') {
        Some(at) => rest[at + 1..].to_owned(),
        None => rest.to_owned(),
    };
    let shown = match raw.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", after_at(rest)),
        None if raw.starts_with('/') => raw.to_owned(),
        None => after_at(raw),
    };
    shown.chars().take(MAX_UNPARSED).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every policy on inputs that carry a secret: none of them shows it.
    const SECRET_BEARING: &[&str] = &[
        "https://user:SECRET@data.example/a.zip?token=SECRET#SECRET",
        "http://SECRET@127.0.0.1:8080/d?t=SECRET",
        "s3://AKIA:SECRET@bucket/key?X-Amz-Signature=SECRET",
        "hf://org/repo@main/f.safetensors?SECRET",
        "file:///srv/out?SECRET#SECRET",
        "weird://u:SECRET@h@/p?q=SECRET",
        "http://u:SECRET@/x",
        "https://u:SE/CRET@host/",
        "u:SECRET@h",
        "mailto:SECRET@x",
        "no scheme?token=SECRET",
        "SECRET@host/x",
    ];

    #[test]
    fn no_policy_shows_a_secret() {
        for raw in SECRET_BEARING {
            for (policy, shown) in [
                ("display_url", display_url(raw)),
                ("origin", origin(raw)),
                ("origin_masked", origin_masked(raw)),
                ("host", host(raw).unwrap_or_default()),
            ] {
                assert!(!shown.contains("SECRET"), "{policy}({raw}) = {shown}");
                assert!(!shown.contains("CRET"), "{policy}({raw}) = {shown}");
            }
        }
    }

    #[test]
    fn display_url_keeps_scheme_host_port_and_path() {
        for (raw, shown) in [
            (
                "https://user:SECRET@data.example/a.zip?token=SECRET#x",
                "https://data.example/a.zip",
            ),
            (
                "https://u:SECRET@h.example:9/p?token=SECRET#f",
                "https://h.example:9/p",
            ),
            (
                "http://SECRET@127.0.0.1:8080/d?t=SECRET",
                "http://127.0.0.1:8080/d",
            ),
            ("https://h.example:443/x", "https://h.example/x"),
            // s3: bucket and key, never the keys in the userinfo.
            (
                "s3://AKIA:SECRET@bucket/out?X-Amz-Signature=SECRET",
                "s3://bucket/out",
            ),
            ("s3://bucket", "s3://bucket"),
            // hf: the revision after `@` is part of the path, not userinfo.
            ("hf://org/repo", "hf://org/repo"),
            (
                "hf://org/repo@v1/f.safetensors",
                "hf://org/repo@v1/f.safetensors",
            ),
            // file: and plain paths are shown whole.
            ("file:///srv/out", "file:///srv/out"),
            ("file:///srv/a@b/out?x", "file:///srv/a@b/out"),
            ("/srv/out", "/srv/out"),
        ] {
            assert_eq!(display_url(raw), shown, "{raw}");
        }
        let parsed =
            Url::parse("https://user:pw@bucket.example:8443/a/b.zip?X-Amz-Signature=s#f").unwrap();
        assert_eq!(display(&parsed), "https://bucket.example:8443/a/b.zip");
    }

    #[test]
    fn display_url_of_text_that_is_not_a_url() {
        assert_eq!(display_url("not a url?token=1"), "not a url");
        assert_eq!(display_url("no scheme?token=SECRET"), "no scheme");
        assert_eq!(display_url("SECRET@host/x"), "host/x");
        assert_eq!(display_url("weird://u:SECRET@h@/p?q=SECRET"), "weird:///p");
        assert_eq!(display_url("https://u:SE/CRET@host/"), "https://host/");
        assert_eq!(display_url("u:SECRET@h"), "h");
        assert_eq!(display_url(""), "");
        let long = "x".repeat(3 * MAX_UNPARSED);
        assert_eq!(display_url(&long).len(), MAX_UNPARSED);
    }

    #[test]
    fn origin_keeps_scheme_host_and_port() {
        for (raw, shown) in [
            (
                "https://u:SECRET@hooks.example/T0/SECRET?x=1",
                "https://hooks.example",
            ),
            ("http://10.0.0.1:8080/x", "http://10.0.0.1:8080"),
            ("s3://AKIA:SECRET@bucket/key", "s3://bucket"),
            ("hf://org/repo", "hf://org"),
            ("file:///srv/out", "file://"),
            ("not a url", INVALID),
            ("", INVALID),
        ] {
            assert_eq!(origin(raw), shown, "{raw}");
        }
    }

    #[test]
    fn origin_masked_says_whether_there_was_more() {
        for (raw, shown) in [
            (
                "https://hooks.example.com/services/T0/B0/s3cr3t",
                "https://hooks.example.com/[redacted]",
            ),
            (
                "http://10.0.0.1:8080?token=s3cr3t",
                "http://10.0.0.1:8080/[redacted]",
            ),
            ("https://h.example/", "https://h.example/"),
            ("https://h.example", "https://h.example/"),
            ("https://h.example/#f", "https://h.example/[redacted]"),
            ("https://u:p@h.example/x", "https://h.example/[redacted]"),
            ("s3://AKIA:SECRET@bucket/key", "s3://bucket/[redacted]"),
            ("file:///srv/out", MASK),
            ("not a url", MASK),
        ] {
            assert_eq!(origin_masked(raw), shown, "{raw}");
        }
    }

    #[test]
    fn host_only() {
        assert_eq!(
            host("https://u:SECRET@data.example:9/x?q=1").as_deref(),
            Some("data.example")
        );
        assert_eq!(host("s3://k:SECRET@bucket/key").as_deref(), Some("bucket"));
        assert_eq!(host("file:///srv/out"), None);
        assert_eq!(host("not a url"), None);
    }

    #[test]
    fn redact_in_replaces_the_uri_where_quoted() {
        assert_eq!(
            redact_in("destination s3://k:SECRET@b/x: denied", "s3://k:SECRET@b/x"),
            "destination s3://b/x: denied"
        );
        assert_eq!(redact_in("as is", ""), "as is");
    }
}

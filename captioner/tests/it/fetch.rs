//! The guarded client against a real loopback HTTP server.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{Reply, TestServer, png, tree, within, zip_bytes};
use trainyard_captioner::{
    FetchError, FetchPolicy, GuardedClient, LocalInput, PrepareError, PrepareSettings,
    RemoteSource, TemplateCaptioner, UnpackLimits, fetch_source, prepare_local,
};

const BODY: &[u8] = b"dataset bytes";

async fn server() -> TestServer {
    TestServer::start(|path, addr| match path {
        "/ok" => Reply::ok(BODY.to_vec()),
        "/busy" => Reply::status(503).header("Retry-After", "7"),
        "/slow-down" => Reply::status(429),
        "/missing" => Reply::status(404),
        "/big" => Reply::ok(vec![7u8; 300 * 1024]).without_length(),
        "/big-declared" => Reply::ok(vec![7u8; 300 * 1024]),
        "/to-loopback" => {
            Reply::status(302).header("Location", &format!("http://127.0.0.1:{}/ok", addr.port()))
        }
        "/to-ftp" => Reply::status(302).header("Location", "ftp://example.com/x"),
        "/loop" => Reply::status(302).header("Location", "/loop"),
        "/hang" => Reply::hang(),
        _ => Reply::status(404),
    })
    .await
}

fn client(policy: FetchPolicy) -> GuardedClient {
    GuardedClient::new(policy).unwrap()
}

fn dev() -> FetchPolicy {
    FetchPolicy {
        allow_private_addresses: true,
        ..FetchPolicy::default()
    }
}

#[tokio::test]
async fn loopback_is_refused_by_default_and_allowed_in_dev() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out.bin");
        let strict = client(FetchPolicy::default());

        // Literal IP: refused before connecting.
        let err = strict.download_to_file(&srv.url("/ok"), &dest).await.unwrap_err();
        assert!(
            matches!(err, FetchError::ForbiddenAddress { addr: Some(IpAddr::V4(ip)), .. } if ip == Ipv4Addr::LOCALHOST),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        // Host name: refused after DNS resolution.
        let err = strict.download_to_file(&srv.localhost_url("/ok"), &dest).await.unwrap_err();
        assert!(matches!(err, FetchError::ForbiddenAddress { ref host, .. } if host == "localhost"), "{err:?}");
        assert_eq!(srv.hits(), 0, "no request may reach a forbidden address");
        assert!(tree(tmp.path()).is_empty());

        let done = client(dev()).download_to_file(&srv.url("/ok"), &dest).await.unwrap();
        assert_eq!(done.bytes, BODY.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), BODY);
        assert_eq!(tree(tmp.path()), ["out.bin"], "no .part file left behind");
    })
    .await
}

#[tokio::test]
async fn redirect_to_loopback_is_refused_on_the_hop() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        // `localhost` is trusted (an operator's mirror); its redirect to a
        // loopback literal is not.
        let policy = FetchPolicy {
            trusted_hosts: vec!["LOCALHOST".into()],
            ..FetchPolicy::default()
        };
        let guarded = client(policy);
        let dest = tmp.path().join("out.bin");
        guarded
            .download_to_file(&srv.localhost_url("/ok"), &dest)
            .await
            .unwrap();
        assert_eq!(srv.hits(), 1);

        let err = guarded
            .download_to_file(&srv.localhost_url("/to-loopback"), &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::ForbiddenAddress { ref host, .. } if host == "127.0.0.1"),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_eq!(srv.hits(), 2, "the redirect target was never requested");

        let err = guarded
            .download_to_file(&srv.localhost_url("/to-ftp"), &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::UnsupportedScheme { ref scheme, .. } if scheme == "ftp"),
            "{err:?}"
        );
    })
    .await
}

#[tokio::test]
async fn redirects_are_limited() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        let policy = FetchPolicy {
            max_redirects: 3,
            ..dev()
        };
        let err = client(policy)
            .download_to_file(&srv.url("/loop"), &tmp.path().join("x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::TooManyRedirects { max: 3, .. }),
            "{err:?}"
        );
        assert_eq!(srv.hits(), 4);
    })
    .await
}

#[tokio::test]
async fn status_codes_are_classified() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        let dev = client(dev());
        let dest = tmp.path().join("x");

        let busy = dev
            .download_to_file(&srv.url("/busy"), &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(busy, FetchError::Status { status: 503, .. }),
            "{busy:?}"
        );
        assert!(busy.is_retryable());
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(7)));

        let slow = dev
            .download_to_file(&srv.url("/slow-down"), &dest)
            .await
            .unwrap_err();
        assert!(slow.is_retryable());
        assert_eq!(slow.retry_after(), None);

        let missing = dev
            .download_to_file(&srv.url("/missing"), &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(missing, FetchError::Status { status: 404, .. }),
            "{missing:?}"
        );
        assert!(!missing.is_retryable());
        assert!(missing.to_string().contains("/missing"));

        // Through PrepareError the retry intent is kept.
        let wrapped = PrepareError::from(busy);
        assert!(wrapped.is_retryable());
        assert_eq!(wrapped.retry_after(), Some(Duration::from_secs(7)));
        assert!(tree(tmp.path()).is_empty());
    })
    .await
}

#[tokio::test]
async fn bodies_over_the_limit_are_aborted() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        let policy = FetchPolicy {
            max_bytes: 100 * 1024,
            ..dev()
        };
        let small = client(policy);
        for path in ["/big", "/big-declared"] {
            let err = small
                .download_to_file(&srv.url(path), &tmp.path().join("x"))
                .await
                .unwrap_err();
            assert!(
                matches!(err, FetchError::TooLarge { limit: 102400, .. }),
                "{path}: {err:?}"
            );
            assert!(!err.is_retryable());
        }
        assert!(tree(tmp.path()).is_empty(), "partial download removed");
    })
    .await
}

#[tokio::test]
async fn bad_urls_connect_failures_and_timeouts() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("x");
        let dev_client = client(dev());
        for url in ["ftp://example.com/a.zip", "file:///etc/passwd"] {
            let err = dev_client.download_to_file(url, &dest).await.unwrap_err();
            assert!(
                matches!(err, FetchError::UnsupportedScheme { .. }),
                "{url}: {err:?}"
            );
        }
        let err = dev_client
            .download_to_file("not a url", &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::InvalidUrl { .. }), "{err:?}");
        let err = client(FetchPolicy::default())
            .download_to_file("http://[::ffff:169.254.169.254]/latest/meta-data", &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::ForbiddenAddress { .. }),
            "{err:?}"
        );

        // Nothing listens on a port we just released.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = dev_client
            .download_to_file(&format!("http://127.0.0.1:{port}/"), &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
        assert!(err.is_retryable());

        let srv = server().await;
        let policy = FetchPolicy {
            total_timeout: Duration::from_millis(300),
            ..dev()
        };
        let err = client(policy)
            .download_to_file(&srv.url("/hang"), &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err:?}");
        assert!(err.is_retryable());
    })
    .await
}

#[tokio::test]
async fn secrets_in_urls_stay_out_of_errors() {
    within(async {
        let srv = server().await;
        let tmp = tempfile::tempdir().unwrap();
        let url = format!(
            "http://user:hunter2@{}/missing?X-Amz-Signature=s3cr3t",
            srv.addr
        );
        let err = client(dev())
            .download_to_file(&url, &tmp.path().join("x"))
            .await
            .unwrap_err();
        assert_no_secret(&err);

        // Errors that wrap a reqwest error keep it, without its URL.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/x?X-Amz-Signature=s3cr3t");
        let err = client(dev())
            .download_to_file(&url, &tmp.path().join("x"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
        assert_no_secret(&err);
    })
    .await
}

#[tokio::test]
async fn image_urls_and_zip_urls_prepare_end_to_end() {
    within(async {
        let srv = TestServer::start(|path, _| match path {
            "/img/red.png" => Reply::ok(png(16, 16, [255, 0, 0])),
            "/other/red.PNG" => Reply::ok(png(16, 16, [250, 0, 0])),
            "/render?id=3" => {
                Reply::ok(png(16, 16, [0, 0, 255])).header("Content-Type", "image/png")
            }
            "/blob" => Reply::ok(png(16, 16, [0, 255, 0])),
            "/set.zip" => Reply::ok(zip_bytes(&[
                ("set/", b""),
                ("set/a.png", &png(16, 16, [1, 1, 1])),
                ("set/a.txt", b"a cat"),
            ])),
            _ => Reply::status(404),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let guarded = client(dev());
        let limits = UnpackLimits::default();
        let urls = ["/img/red.png", "/other/red.PNG", "/render?id=3", "/blob"]
            .map(|p| srv.url(p))
            .to_vec();
        let input = fetch_source(
            &guarded,
            &RemoteSource::ImageUrls(urls.clone()),
            tmp.path(),
            &limits,
        )
        .await
        .unwrap();
        let LocalInput::Files(files) = &input else {
            panic!("expected files, got {input:?}")
        };
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["red.png", "red_2.png", "render.png", "blob.png"]);

        let settings = PrepareSettings {
            trigger_word: "tyzx".into(),
            ..PrepareSettings::default()
        };
        let p = prepare_local(
            input,
            &tmp.path().join("work"),
            &settings,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(p.manifest.images.len(), 4);
        assert!(
            p.manifest
                .images
                .iter()
                .all(|e| e.caption == "a photo of tyzx")
        );

        let few = UnpackLimits {
            max_files: 2,
            ..limits
        };
        let err = fetch_source(&guarded, &RemoteSource::ImageUrls(urls), tmp.path(), &few)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PrepareError::TooManyFiles { limit: 2 }),
            "{err:?}"
        );

        let input = fetch_source(
            &guarded,
            &RemoteSource::ZipUrl(srv.url("/set.zip")),
            tmp.path(),
            &limits,
        )
        .await
        .unwrap();
        let p = prepare_local(
            input,
            &tmp.path().join("work"),
            &settings,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(p.manifest.images[0].caption, "tyzx, a cat");

        // The default policy refuses the same loopback source outright.
        let strict = client(FetchPolicy::default());
        let err = fetch_source(
            &strict,
            &RemoteSource::ZipUrl(srv.url("/set.zip")),
            tmp.path(),
            &limits,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                PrepareError::Fetch(FetchError::ForbiddenAddress { .. })
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    })
    .await
}

fn assert_no_secret(err: &FetchError) {
    let mut text = format!("{err:?}");
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        text.push_str(&format!(" / {e}"));
        source = e.source();
    }
    assert!(
        !text.contains("s3cr3t") && !text.contains("hunter2"),
        "{text}"
    );
}

#[test]
fn fetch_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let guarded = client(FetchPolicy::default());
    let source = RemoteSource::ImageUrls(vec![]);
    let limits = UnpackLimits::default();
    let fut = fetch_source(&guarded, &source, std::path::Path::new("w"), &limits);
    assert_send(&fut);
}

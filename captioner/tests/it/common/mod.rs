//! Shared test helpers: image and zip builders, a loopback HTTP server, and
//! a deadline for every async test.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Cursor, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use image::{ImageFormat, Rgb, RgbImage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trainyard_captioner::{CaptionSource, DropReason, PrepareSettings, PreparedDataset};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

pub fn settings(trigger: &str) -> PrepareSettings {
    PrepareSettings {
        trigger_word: trigger.to_owned(),
        caption_retry_delay: Duration::from_millis(1),
        ..PrepareSettings::default()
    }
}

pub fn captions(prepared: &PreparedDataset) -> BTreeMap<String, (String, CaptionSource)> {
    prepared
        .manifest
        .images
        .iter()
        .map(|e| {
            (
                e.file.clone(),
                (e.caption.clone(), e.caption_source.clone()),
            )
        })
        .collect()
}

pub fn dropped(prepared: &PreparedDataset) -> Vec<(String, DropReason)> {
    prepared
        .manifest
        .dropped
        .iter()
        .map(|d| (d.name.clone(), d.reason))
        .collect()
}

/// Every async test body runs under this deadline.
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test exceeded its 20 s deadline")
}

pub fn encode(w: u32, h: u32, rgb: [u8; 3], format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            rgb[0].wrapping_add(x as u8),
            rgb[1].wrapping_add(y as u8),
            rgb[2],
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    encode(w, h, rgb, ImageFormat::Png)
}

pub fn jpeg(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    encode(w, h, rgb, ImageFormat::Jpeg)
}

/// A PNG cut in half: right signature, truncated data.
pub fn truncated_png() -> Vec<u8> {
    let mut bytes = png(32, 32, [10, 20, 30]);
    bytes.truncate(bytes.len() / 2);
    bytes
}

/// Builds a zip in memory. Names ending in `/` become directories.
pub fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    zip_bytes_with(entries, CompressionMethod::Deflated)
}

pub fn zip_bytes_with(entries: &[(&str, &[u8])], method: CompressionMethod) -> Vec<u8> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        if name.ends_with('/') {
            zip.add_directory(*name, options).unwrap();
        } else {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
    }
    zip.finish().unwrap().into_inner()
}

pub fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    std::fs::write(path, zip_bytes(entries)).unwrap();
}

/// Every path under `root`, relative, sorted.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            if path.is_dir() && !path.is_symlink() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out.sort();
    out
}

/// One canned HTTP response.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send `Content-Length`; without it the body ends when the connection closes.
    pub content_length: bool,
    /// Accept the request and never answer.
    pub hang: bool,
}

impl Reply {
    pub fn ok(body: Vec<u8>) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
            content_length: true,
            hang: false,
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::ok(Vec::new())
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn without_length(mut self) -> Self {
        self.content_length = false;
        self
    }

    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::ok(Vec::new())
        }
    }
}

type Handler = dyn Fn(&str, SocketAddr) -> Reply + Send + Sync;

/// A minimal HTTP/1.1 server on 127.0.0.1:0, one response per connection.
/// Stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(
        handler: impl Fn(&str, SocketAddr) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Arc<Handler> = Arc::new(handler);
        let hits = Arc::new(AtomicUsize::new(0));
        let hits2 = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let hits = hits2.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    hits.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let reply = handler(&path, addr);
                    if reply.hang {
                        // Hold the connection open until the client gives up.
                        let _ = stream.read(&mut buf).await;
                        return;
                    }
                    let mut out =
                        format!("HTTP/1.1 {} Test\r\nConnection: close\r\n", reply.status);
                    for (name, value) in &reply.headers {
                        out.push_str(&format!("{name}: {value}\r\n"));
                    }
                    if reply.content_length {
                        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
                    }
                    out.push_str("\r\n");
                    let _ = stream.write_all(out.as_bytes()).await;
                    let _ = stream.write_all(&reply.body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, hits, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn localhost_url(&self, path: &str) -> String {
        format!("http://localhost:{}{}", self.addr.port(), path)
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes a test-pattern clip with `ffmpeg` (`scripts/install-ffmpeg`):
/// `size` such as `64x48`, `rate` frames a second, `secs` long; the
/// container follows the extension of `path`.
pub fn clip(path: &Path, size: &str, rate: u32, secs: f64) {
    let source = format!("testsrc=size={size}:rate={rate}:duration={secs}");
    let mut args = vec!["-v", "error", "-y", "-f", "lavfi", "-i", &source];
    if path.extension().is_some_and(|e| e == "mp4" || e == "mov") {
        args.extend(["-pix_fmt", "yuv420p"]);
    }
    let status = std::process::Command::new("ffmpeg")
        .args(&args)
        .arg(path)
        .status()
        .expect("ffmpeg runs (scripts/install-ffmpeg installs it)");
    assert!(
        status.success(),
        "ffmpeg could not write {}",
        path.display()
    );
}

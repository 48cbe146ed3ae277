//! Datasets up and outputs down through the API (`Upload`, `Download`,
//! `DeleteUpload`): the client never opens the artifact store, so it needs
//! no store credentials and no `store.uri`, and the fleet decides where an
//! upload lands (the caller's tenant's uploads).
//!
//! When the fleet's store can sign URLs (S3), the bytes skip the fleet:
//! `CreateUpload`/`CreateDownload` give one presigned URL per file, PUT or
//! GET here with each file's sha256 checked. Otherwise (a local store, or
//! an older fleet) they stream through `Upload`/`Download`.

use crate::client::Client;
use anyhow::{Context, bail};
use futures::StreamExt;
use indicatif::HumanBytes;
use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trainyard_core::store::{get_url, put_url, sha256_file};
use trainyard_proto::v1::{
    CreateUploadRequest, DeleteUploadRequest, DownloadRequest, UploadChunk, UploadFile,
};

/// Whether a `Create*` call says to stream instead: the store cannot sign
/// URLs, or the fleet predates them.
fn stream_instead(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::Unimplemented
    )
}

/// Uploads `files` through presigned PUT URLs; `None` when the fleet says
/// to stream instead.
async fn upload_presigned(
    client: &mut Client,
    root: &Path,
    files: &[(String, String)],
) -> anyhow::Result<Option<(String, u64, u64)>> {
    let mut wanted = Vec::with_capacity(files.len());
    for (rel, name) in files {
        let path = root.join(rel);
        let (size, sha256) = sha256_file(&path).await?;
        wanted.push(UploadFile {
            path: name.clone(),
            size,
            sha256,
        });
    }
    let reply = match client
        .create_upload(CreateUploadRequest {
            files: wanted.clone(),
        })
        .await
    {
        Ok(reply) => reply.into_inner(),
        Err(status) if stream_instead(&status) => return Ok(None),
        Err(status) => return Err(status).context("the fleet refused the upload"),
    };
    let http = reqwest::Client::new();
    let bytes = wanted.iter().map(|f| f.size).sum();
    for ((rel, _), (file, url)) in files.iter().zip(wanted.iter().zip(&reply.urls)) {
        if let Err(e) = put_url(&http, &url.url, &root.join(rel), file.size, &file.sha256).await {
            remove_upload(client, &reply.uri).await;
            return Err(e).context("cannot store a file through its presigned URL");
        }
    }
    Ok(Some((reply.uri, wanted.len() as u64, bytes)))
}

/// Bytes per upload message (well under gRPC's 4 MiB default).
const CHUNK: usize = 1 << 20;

/// The files `files` (relative to `root`, uploaded as named by `names`)
/// as a stream of chunks; a read error ends the stream and is kept in
/// `failed`.
fn chunks(
    root: PathBuf,
    files: Vec<(String, String)>,
    failed: Arc<Mutex<Option<String>>>,
) -> impl futures::Stream<Item = UploadChunk> + Send + 'static {
    struct State {
        root: PathBuf,
        files: VecDeque<(String, String)>,
        current: Option<tokio::fs::File>,
        failed: Arc<Mutex<Option<String>>>,
    }
    let state = State {
        root,
        files: files.into(),
        current: None,
        failed,
    };
    futures::stream::unfold(state, |mut st| async move {
        if let Some(file) = st.current.as_mut() {
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                // This file is done: the next one starts below.
                Ok(0) => st.current = None,
                Ok(n) => {
                    buf.truncate(n);
                    let chunk = UploadChunk {
                        path: String::new(),
                        data: buf,
                    };
                    return Some((chunk, st));
                }
                Err(e) => {
                    *st.failed.lock().expect("lock") = Some(e.to_string());
                    return None;
                }
            }
        }
        let (rel, name) = st.files.pop_front()?;
        let path = st.root.join(&rel);
        match tokio::fs::File::open(&path).await {
            Ok(file) => st.current = Some(file),
            Err(e) => {
                *st.failed.lock().expect("lock") = Some(format!("{}: {e}", path.display()));
                return None;
            }
        }
        let chunk = UploadChunk {
            path: name,
            data: Vec::new(),
        };
        Some((chunk, st))
    })
}

/// Sends `files` and returns the upload's URI, files and bytes.
async fn upload(
    client: &mut Client,
    root: &Path,
    files: Vec<(String, String)>,
) -> anyhow::Result<(String, u64, u64)> {
    if let Some(done) = upload_presigned(client, root, &files).await? {
        return Ok(done);
    }
    let failed = Arc::new(Mutex::new(None));
    let reply = client
        .upload(chunks(root.to_owned(), files, failed.clone()))
        .await
        .context("the fleet refused the upload")?
        .into_inner();
    let failure = failed.lock().expect("lock").take();
    if let Some(e) = failure {
        let _ = client
            .delete_upload(DeleteUploadRequest {
                uri: reply.uri.clone(),
            })
            .await;
        bail!("cannot read {e}");
    }
    Ok((reply.uri, reply.files, reply.bytes))
}

/// Uploads every regular file below `dir`; returns the upload's URI.
pub async fn upload_dir(client: &mut Client, dir: &Path) -> anyhow::Result<String> {
    let root = dir.to_owned();
    let mut files = tokio::task::spawn_blocking(move || trainyard_core::store::walk(&root))
        .await?
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if files.is_empty() {
        bail!("dataset folder {} holds no files", dir.display());
    }
    files.sort();
    let files = files.into_iter().map(|f| (f.clone(), f)).collect();
    let (uri, count, bytes) = upload(client, dir, files)
        .await
        .with_context(|| format!("cannot upload {}", dir.display()))?;
    eprintln!("uploaded {count} files ({}) to {uri}", HumanBytes(bytes));
    Ok(uri)
}

/// Uploads one zip; returns its URI.
pub async fn upload_zip(client: &mut Client, zip: &Path) -> anyhow::Result<String> {
    let name = zip
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".zip") && !n.contains('/'))
        .unwrap_or_else(|| "dataset.zip".into());
    let parent = zip.parent().unwrap_or(Path::new(".")).to_owned();
    let rel = zip
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (uri, _, bytes) = upload(client, &parent, vec![(rel, name.clone())])
        .await
        .with_context(|| format!("cannot upload {}", zip.display()))?;
    let uri = format!("{uri}/{name}");
    eprintln!("uploaded {name} ({}) to {uri}", HumanBytes(bytes));
    Ok(uri)
}

/// Removes an upload made by [`upload_dir`] or [`upload_zip`]; a failure
/// is only reported.
pub async fn remove_upload(client: &mut Client, uri: &str) {
    if let Err(e) = client
        .delete_upload(DeleteUploadRequest {
            uri: uri.to_string(),
        })
        .await
    {
        eprintln!("could not remove the upload {uri}: {}", e.message());
    }
}

/// Downloads a job's outputs into `dir`, each checked against its
/// sha256; returns the files with their size and sha256.
pub async fn download(
    client: &mut Client,
    job_id: &str,
    dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, u64, String)>> {
    let request = DownloadRequest {
        job_id: job_id.to_string(),
        name: String::new(),
    };
    match client.create_download(request).await {
        Ok(reply) => {
            let http = reqwest::Client::new();
            let mut done = Vec::new();
            for url in reply.into_inner().urls {
                let local = dir.join(plain(&url.path)?);
                get_url(&http, &url.url, &local, url.size, &url.sha256)
                    .await
                    .with_context(|| format!("cannot fetch {}", url.path))?;
                done.push((local, url.size, url.sha256));
            }
            return Ok(done);
        }
        Err(status) if stream_instead(&status) => {}
        Err(status) => return Err(status.into()),
    }
    let mut stream = client
        .download(DownloadRequest {
            job_id: job_id.to_string(),
            name: String::new(),
        })
        .await?
        .into_inner();
    let mut done = Vec::new();
    let mut current: Option<(PathBuf, PathBuf, tokio::fs::File, u64, String)> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if !chunk.name.is_empty() {
            if let Some(open) = current.take() {
                done.push(finish(open).await?);
            }
            let local = dir.join(plain(&chunk.name)?);
            if let Some(parent) = local.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let partial = local.with_extension("partial");
            let file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("cannot write {}", partial.display()))?;
            current = Some((local, partial, file, chunk.size, chunk.sha256));
        }
        let Some((_, partial, file, ..)) = current.as_mut() else {
            bail!("the fleet sent data before naming its file");
        };
        file.write_all(&chunk.data)
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
    }
    if let Some(open) = current.take() {
        done.push(finish(open).await?);
    }
    Ok(done)
}

/// An artifact's name as a path below the download folder.
fn plain(name: &str) -> anyhow::Result<&Path> {
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("artifact name {name:?} is not a plain relative path");
    }
    Ok(rel)
}

/// Checks a downloaded file against its size and sha256 and puts it in place.
async fn finish(
    (local, partial, mut file, size, sha256): (PathBuf, PathBuf, tokio::fs::File, u64, String),
) -> anyhow::Result<(PathBuf, u64, String)> {
    file.flush().await?;
    drop(file);
    let (got_size, got_sha) = sha256_file(&partial).await?;
    if got_size != size || (!sha256.is_empty() && got_sha != sha256) {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!(
            "{} arrived damaged: {got_size} bytes with sha256 {got_sha}, expected {size} bytes with sha256 {sha256}",
            local.display()
        );
    }
    tokio::fs::rename(&partial, &local).await?;
    Ok((local, got_size, got_sha))
}

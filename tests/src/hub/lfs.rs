//! The fake Hub's preupload and LFS side: which files go through LFS, the
//! batch API, and the signed storage URLs it hands out (on this same
//! server), which check the bytes' sha256 and note whether a request
//! carried an `Authorization` header (it must not). See [`super::upload`].

use super::upload::{endpoint, json, refusal, writer};
use super::{Inner, error, lock};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;

/// Files over this go through LFS whatever their name.
const LFS_THRESHOLD: u64 = 10 * 1024 * 1024;

fn wants_lfs(path: &str, size: u64, sample: &[u8]) -> bool {
    super::is_lfs(path) || path.ends_with(".pt") || size > LFS_THRESHOLD || sample.contains(&0)
}

pub(super) fn preupload(inner: &Inner, repo: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    if let Err(refused) = writer(inner, repo, headers) {
        return *refused;
    }
    if !lock(&inner.repos).contains_key(repo) {
        return error(StatusCode::NOT_FOUND, "RepoNotFound");
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refusal(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let mut files = Vec::new();
    for file in request["files"].as_array().into_iter().flatten() {
        let path = file["path"].as_str().unwrap_or_default();
        let size = file["size"].as_u64().unwrap_or_default();
        let Some(sample) = file["sample"]
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        else {
            return refusal(StatusCode::BAD_REQUEST, "sample is not base64");
        };
        let mode = if wants_lfs(path, size, &sample) {
            "lfs"
        } else {
            "regular"
        };
        files.push(serde_json::json!({"path": path, "uploadMode": mode, "shouldIgnore": false}));
    }
    json(StatusCode::OK, serde_json::json!({"files": files}))
}

pub(super) fn batch(inner: &Inner, repo: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    if let Err(refused) = writer(inner, repo, headers) {
        return *refused;
    }
    let lfs_json = "application/vnd.git-lfs+json";
    if headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) != Some(lfs_json) {
        return refusal(
            StatusCode::NOT_ACCEPTABLE,
            "Accept must be the LFS media type",
        );
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refusal(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    if request["operation"] != "upload" || request["hash_algo"] != "sha256" {
        return refusal(StatusCode::BAD_REQUEST, "only sha256 uploads here");
    }
    let base = endpoint(inner);
    let chunk = *lock(&inner.writes.multipart_chunk);
    let stored = lock(&inner.writes.lfs);
    let mut objects = Vec::new();
    for object in request["objects"].as_array().into_iter().flatten() {
        let oid = object["oid"].as_str().unwrap_or_default().to_owned();
        let size = object["size"].as_u64().unwrap_or_default();
        if stored.contains_key(&oid) {
            objects.push(serde_json::json!({"oid": oid, "size": size}));
            continue;
        }
        let verify = serde_json::json!({
            "href": format!("{base}/{repo}.git/info/lfs/objects/verify"),
            "header": {"Authorization": "Basic dmVyaWZ5OnRva2Vu"},
        });
        let upload = match chunk.filter(|c| size > *c) {
            Some(chunk) => {
                let mut header = serde_json::json!({"chunk_size": chunk.to_string()});
                for part in 1..=size.div_ceil(chunk) {
                    header[part.to_string()] =
                        format!("{base}/lfs-storage/{oid}/part/{part}?X-Amz-Signature=sig").into();
                }
                serde_json::json!({"href": format!("{base}/lfs-storage/{oid}/complete"), "header": header})
            }
            None => serde_json::json!({
                "href": format!("{base}/lfs-storage/{oid}?X-Amz-Signature=sig"),
                "header": {},
            }),
        };
        objects.push(serde_json::json!({
            "oid": oid,
            "size": size,
            "authenticated": true,
            "actions": {"upload": upload, "verify": verify},
        }));
    }
    let transfer = if chunk.is_some() {
        "multipart"
    } else {
        "basic"
    };
    Response::builder()
        .header(header::CONTENT_TYPE, lfs_json)
        .body(Body::from(
            serde_json::to_vec(&serde_json::json!({
                "transfer": transfer,
                "objects": objects,
                "hash_algo": "sha256",
            }))
            .expect("json"),
        ))
        .expect("response")
}

fn note_storage_request(inner: &Inner, headers: &HeaderMap) {
    inner.writes.lfs_puts.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key(header::AUTHORIZATION) {
        inner
            .writes
            .token_sent_to_storage
            .store(true, Ordering::SeqCst);
    }
}

pub(super) fn store_object(
    inner: &Inner,
    oid: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    note_storage_request(inner, headers);
    if hex::encode(Sha256::digest(body)) != oid {
        return refusal(StatusCode::BAD_REQUEST, "the body does not match the oid");
    }
    lock(&inner.writes.lfs).insert(oid.to_owned(), body.clone());
    Response::new(Body::empty())
}

pub(super) fn store_part(
    inner: &Inner,
    oid: &str,
    number: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    note_storage_request(inner, headers);
    let Ok(number) = number.parse::<u32>() else {
        return refusal(StatusCode::BAD_REQUEST, "bad part number");
    };
    lock(&inner.writes.parts).insert((oid.to_owned(), number), body.clone());
    Response::builder()
        .header(header::ETAG, format!("\"etag-{number}\""))
        .body(Body::empty())
        .expect("response")
}

pub(super) fn complete(inner: &Inner, oid: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        inner
            .writes
            .token_sent_to_storage
            .store(true, Ordering::SeqCst);
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refusal(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let mut parts = lock(&inner.writes.parts);
    let mut data = Vec::new();
    for (i, part) in request["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let number = part["partNumber"].as_u64().unwrap_or_default() as u32;
        let etag = part["etag"].as_str().unwrap_or_default();
        if number != i as u32 + 1 || etag != format!("\"etag-{number}\"") {
            return refusal(StatusCode::BAD_REQUEST, "parts out of order or wrong etag");
        }
        match parts.remove(&(oid.to_owned(), number)) {
            Some(bytes) => data.extend_from_slice(&bytes),
            None => return refusal(StatusCode::BAD_REQUEST, "a part was never uploaded"),
        }
    }
    if request["oid"] != oid || hex::encode(Sha256::digest(&data)) != oid {
        return refusal(StatusCode::BAD_REQUEST, "the parts do not match the oid");
    }
    lock(&inner.writes.lfs).insert(oid.to_owned(), Bytes::from(data));
    json(StatusCode::OK, serde_json::json!({}))
}

pub(super) fn verify(inner: &Inner, body: &Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refusal(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let oid = request["oid"].as_str().unwrap_or_default();
    match lock(&inner.writes.lfs).get(oid) {
        Some(data) if Some(data.len() as u64) == request["size"].as_u64() => {
            json(StatusCode::OK, serde_json::json!({}))
        }
        _ => refusal(StatusCode::NOT_FOUND, "object not stored"),
    }
}

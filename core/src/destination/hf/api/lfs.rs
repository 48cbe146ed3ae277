//! The LFS side of an upload: the batch call, the storage URLs' `PUT`s
//! (one body, or parts and a completion) without the token, and the
//! `verify` action. See the module docs of [`super`].

use super::{HubApi, HubApiError, LFS_JSON};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde::Deserialize;
use std::path::Path;

/// One object of an LFS batch answer.
#[derive(Clone, Debug, Deserialize)]
pub struct LfsObject {
    pub oid: String,
    pub size: u64,
    #[serde(default)]
    pub actions: Option<LfsActions>,
    #[serde(default)]
    pub error: Option<LfsObjectError>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsActions {
    pub upload: Option<LfsAction>,
    pub verify: Option<LfsAction>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsAction {
    pub href: String,
    #[serde(default)]
    pub header: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsObjectError {
    pub code: i64,
    pub message: String,
}

#[derive(Deserialize)]
struct LfsBatchAnswer {
    objects: Vec<LfsObject>,
}

impl HubApi {
    /// The LFS batch call for uploading `objects` (`(sha256, size)`).
    pub async fn lfs_batch(
        &self,
        repo: &str,
        revision: &str,
        objects: &[(String, u64)],
    ) -> Result<Vec<LfsObject>, HubApiError> {
        let what = format!("the LFS batch of {repo}");
        let url = self.url(&[&format!("{repo}.git"), "info", "lfs", "objects", "batch"]);
        let body = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects
                .iter()
                .map(|(oid, size)| serde_json::json!({"oid": oid, "size": size}))
                .collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let request = self
            .request(Method::POST, url)
            .header(header::ACCEPT, LFS_JSON)
            .header(header::CONTENT_TYPE, LFS_JSON)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        let response = self.send(request, &what).await?;
        let answer: LfsBatchAnswer = Self::json(response, &what).await?;
        Ok(answer.objects)
    }

    /// Uploads `local` (`size` bytes, sha256 `oid`) as `object`'s actions
    /// say: nothing when it is already stored, one `PUT`, or parts and a
    /// completion; then the `verify` action when given.
    pub async fn lfs_upload(
        &self,
        object: &LfsObject,
        local: &Path,
        size: u64,
    ) -> Result<(), HubApiError> {
        if let Some(error) = &object.error {
            return Err(lfs_object_error(&object.oid, error));
        }
        let Some(actions) = &object.actions else {
            return Ok(());
        };
        let what = format!("the upload of LFS object {}", object.oid);
        if let Some(upload) = &actions.upload {
            let href = self.action_url(upload, &what)?;
            match upload.header.get("chunk_size") {
                Some(chunk) => {
                    let chunk: u64 = chunk.parse().map_err(|_| HubApiError::Protocol {
                        what: what.clone(),
                        message: format!("chunk_size {chunk:?} is not a number"),
                    })?;
                    self.upload_parts(upload, href, chunk, local, size, &object.oid, &what)
                        .await?;
                }
                None => {
                    let file = tokio::fs::File::open(local)
                        .await
                        .map_err(|e| HubApiError::io(local, e))?;
                    let request = self
                        .storage_request(Method::PUT, href)
                        .headers(action_headers(upload))
                        .header(header::CONTENT_LENGTH, size)
                        .body(reqwest::Body::from(file));
                    self.send(request, &what).await?;
                }
            }
        }
        if let Some(verify) = &actions.verify {
            let href = self.action_url(verify, &what)?;
            let body = serde_json::json!({"oid": object.oid, "size": size});
            let request = self
                .request(Method::POST, href)
                .headers(action_headers(verify))
                .header(header::ACCEPT, LFS_JSON)
                .header(header::CONTENT_TYPE, LFS_JSON)
                .body(serde_json::to_vec(&body).unwrap_or_default());
            self.send(request, &format!("the verification of {}", object.oid))
                .await?;
        }
        Ok(())
    }

    fn action_url(&self, action: &LfsAction, what: &str) -> Result<Url, HubApiError> {
        let url = self
            .endpoint
            .join(&action.href)
            .map_err(|e| HubApiError::Protocol {
                what: what.to_owned(),
                message: format!("bad href: {e}"),
            })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HubApiError::Protocol {
                what: what.to_owned(),
                message: "the href is not http(s)".into(),
            });
        }
        Ok(url)
    }

    /// The multipart transfer: each part's `PUT` to the URL under its
    /// number in the action's header, then the completion with their etags.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        upload: &LfsAction,
        href: Url,
        chunk: u64,
        local: &Path,
        size: u64,
        oid: &str,
        what: &str,
    ) -> Result<(), HubApiError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut parts: Vec<(u32, &String)> = upload
            .header
            .iter()
            .filter_map(|(k, v)| k.parse::<u32>().ok().map(|n| (n, v)))
            .collect();
        parts.sort();
        if chunk == 0 || parts.len() as u64 != size.div_ceil(chunk) {
            return Err(HubApiError::Protocol {
                what: what.to_owned(),
                message: format!(
                    "{} part URLs for {size} bytes in chunks of {chunk}",
                    parts.len()
                ),
            });
        }
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| HubApiError::io(local, e))?;
        let mut done = Vec::with_capacity(parts.len());
        for (index, (number, part_url)) in parts.iter().enumerate() {
            let start = index as u64 * chunk;
            let len = chunk.min(size - start);
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| HubApiError::io(local, e))?;
            let mut buffer = vec![0u8; len as usize];
            file.read_exact(&mut buffer)
                .await
                .map_err(|e| HubApiError::io(local, e))?;
            let url = self.action_url(
                &LfsAction {
                    href: (*part_url).clone(),
                    header: Default::default(),
                },
                what,
            )?;
            let response = self
                .send(self.storage_request(Method::PUT, url).body(buffer), what)
                .await?;
            let etag = response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| HubApiError::Protocol {
                    what: what.to_owned(),
                    message: format!("no etag for part {number}"),
                })?
                .to_owned();
            done.push(serde_json::json!({"partNumber": number, "etag": etag}));
        }
        let body = serde_json::json!({"oid": oid, "parts": done});
        let request = self
            .storage_request(Method::POST, href)
            .header(header::ACCEPT, LFS_JSON)
            .header(header::CONTENT_TYPE, LFS_JSON)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        self.send(request, what).await?;
        Ok(())
    }
}

fn lfs_object_error(oid: &str, error: &LfsObjectError) -> HubApiError {
    let what = format!("LFS object {oid}");
    match error.code {
        401 | 403 => HubApiError::Auth {
            status: error.code as u16,
            code: None,
        },
        500..=599 => HubApiError::Server {
            status: error.code as u16,
            what,
            retry_after: None,
        },
        code => HubApiError::Refused {
            status: u16::try_from(code).unwrap_or(0),
            what,
            message: error.message.chars().take(200).collect(),
        },
    }
}

/// An action's headers, but for the multipart bookkeeping ones.
fn action_headers(action: &LfsAction) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &action.header {
        if name == "chunk_size" || name.parse::<u32>().is_ok() {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_headers_keep_only_real_headers() {
        let action = LfsAction {
            href: "https://s3.example/put".into(),
            header: [
                ("chunk_size".to_string(), "10".to_string()),
                ("1".to_string(), "https://s3.example/1".to_string()),
                ("x-amz-meta".to_string(), "v".to_string()),
            ]
            .into(),
        };
        let headers = action_headers(&action);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-amz-meta"], "v");
    }
}

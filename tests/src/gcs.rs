//! A Google Cloud Storage server on loopback for tests, speaking the XML
//! API that `object_store`'s GCS client uses (no emulator from a package
//! registry answers it: `gcp-storage-emulator` has no XML delete, head,
//! list or multipart, and `fake-gcs-server` takes an XML `PUT` for a JSON
//! upload):
//!
//! - `PUT /{bucket}/{object}`: stores the body, answers `ETag`.
//! - `POST /{bucket}/{object}?uploads`, `PUT …?partNumber=N&uploadId=U`,
//!   `POST …?uploadId=U` (a `CompleteMultipartUpload` body), `DELETE
//!   …?uploadId=U`: XML multipart uploads.
//! - `GET|HEAD /{bucket}/{object}`, `DELETE /{bucket}/{object}`.
//! - `GET /{bucket}?list-type=2&prefix=…`: a `ListBucketResult`.
//!
//! Every request must carry `Authorization: Bearer <JWT>` signed (RS256) by
//! the service account key the server was given — the self-signed JWT the
//! client makes from a service account's key — or be a V4 signed URL
//! (`X-Goog-Algorithm=GOOG4-RSA-SHA256`) whose signature that key made and
//! whose `X-Goog-Date` + `X-Goog-Expires` has not passed. Anything else is
//! `401`/`403` with an XML `<Error>`; an unknown bucket is `404
//! NoSuchBucket`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The test service account's RSA key (PKCS#8 PEM): made for these tests
/// only, it opens nothing anywhere else.
pub const TEST_KEY_PEM: &str = include_str!("../fixtures/gcs-test-key.pem");
/// The test service account.
pub const TEST_CLIENT_EMAIL: &str = "trainyard-test@trainyard-test.iam.gserviceaccount.com";

#[derive(Default)]
struct Objects {
    buckets: BTreeSet<String>,
    objects: BTreeMap<(String, String), Bytes>,
    uploads: HashMap<String, BTreeMap<u32, Bytes>>,
    next_upload: u64,
}

struct Shared {
    public_key: Vec<u8>,
    objects: Mutex<Objects>,
    requests: Mutex<Vec<String>>,
}

/// The running server; stopped when dropped.
pub struct GcsServer {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl GcsServer {
    pub async fn start() -> GcsServer {
        let der = pem_der(TEST_KEY_PEM);
        let pair = RsaKeyPair::from_pkcs8(&der).expect("test key is PKCS#8 RSA");
        let shared = Arc::new(Shared {
            public_key: pair.public_key().as_ref().to_vec(),
            objects: Mutex::default(),
            requests: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind gcs stand-in");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .ok();
        });
        GcsServer {
            base_url: format!("http://{addr}"),
            shared,
            stop,
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .buckets
            .insert(bucket.to_string());
    }

    /// A service account JSON key for this server (`gcs_base_url` set).
    pub fn service_account_key(&self) -> String {
        serde_json::json!({
            "type": "service_account",
            "private_key": TEST_KEY_PEM,
            "private_key_id": "trainyard-test-key",
            "client_email": TEST_CLIENT_EMAIL,
            "gcs_base_url": self.base_url,
        })
        .to_string()
    }

    /// An object's bytes, if stored.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Bytes> {
        let objects = self.shared.objects.lock().expect("objects");
        objects
            .objects
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
    }

    /// Keys stored in `bucket`, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let objects = self.shared.objects.lock().expect("objects");
        objects
            .objects
            .keys()
            .filter(|(b, _)| b == bucket)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().expect("requests").clone()
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("pem base64")
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn etag(data: &[u8]) -> String {
    format!("\"{}\"", hex::encode(&Sha256::digest(data)[..16]))
}

/// `GOOG4-RSA-SHA256` verification of a signed URL, as Google documents it:
/// the canonical request over the path, the query without the signature,
/// and the signed `host`.
/// A refused request: its status, error code and message.
struct Refusal(StatusCode, &'static str, &'static str);

fn signed_url_ok(shared: &Shared, method: &Method, uri: &Uri) -> Result<(), Refusal> {
    let denied = |why: &'static str| Refusal(StatusCode::FORBIDDEN, "AccessDenied", why);
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let (Some(date), Some(expires), Some(signature), Some(credential)) = (
        get("X-Goog-Date"),
        get("X-Goog-Expires"),
        get("X-Goog-Signature"),
        get("X-Goog-Credential"),
    ) else {
        return Err(denied("missing signed url parameters"));
    };
    let expires: i64 = expires.parse().map_err(|_| denied("bad X-Goog-Expires"))?;
    // Expired when issued before (now − expires): compared in the URL's own
    // `YYYYMMDDTHHMMSSZ` form, which sorts as time does.
    let oldest = trainyard_core::rfc3339(trainyard_core::now_ms() - expires * 1000);
    let oldest: String = oldest[..19]
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    if date.len() != 16 || date[..15] < *oldest.as_str() {
        return Err(denied("Request has expired"));
    }
    let encode = |s: &str| {
        url::form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
            .replace('*', "%2A")
            .replace("%7E", "~")
    };
    let mut query: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "X-Goog-Signature")
        .map(|(k, v)| (encode(k), encode(v)))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let canonical = format!(
        "{}\n{}\n{query}\nhost:storage.googleapis.com\n\nhost\nUNSIGNED-PAYLOAD",
        method.as_str(),
        uri.path()
    );
    let scope = credential
        .split_once('/')
        .map(|(_, scope)| scope)
        .unwrap_or_default();
    let to_sign = format!(
        "GOOG4-RSA-SHA256\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let signature = hex::decode(signature).map_err(|_| denied("bad signature"))?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &shared.public_key)
        .verify(to_sign.as_bytes(), &signature)
        .map_err(|_| denied("The request signature we calculated does not match"))
}

/// A bearer JWT signed (RS256) by the test key.
fn bearer_ok(shared: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    let unauthorized =
        |why: &'static str| Refusal(StatusCode::UNAUTHORIZED, "AuthenticationRequired", why);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("no bearer token"))?;
    let (signed, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| unauthorized("not a jwt"))?;
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| unauthorized("not a jwt"))?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &shared.public_key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| unauthorized("the token is not signed by a known key"))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared
        .requests
        .lock()
        .expect("requests")
        .push(format!("{method} {}", uri.path()));
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let signed_url = query.contains_key("X-Goog-Algorithm");
    let authorized = if signed_url {
        signed_url_ok(&shared, &method, &uri)
    } else {
        bearer_ok(&shared, &headers)
    };
    if let Err(Refusal(status, code, message)) = authorized {
        return xml_error(status, code, message);
    }
    let path = uri.path().trim_start_matches('/');
    let (bucket, object) = path.split_once('/').unwrap_or((path, ""));
    let object = percent_decode(object);
    let mut objects = shared.objects.lock().expect("objects");
    if !objects.buckets.contains(bucket) {
        return xml_error(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist.",
        );
    }
    let key = (bucket.to_string(), object.clone());
    match (method.clone(), object.is_empty()) {
        (Method::GET, true) => list(&objects, bucket, &query),
        (Method::POST, false) if query.contains_key("uploads") => {
            objects.next_upload += 1;
            let id = format!("upload-{}", objects.next_upload);
            objects.uploads.insert(id.clone(), BTreeMap::new());
            let body = format!(
                "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{object}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>"
            );
            (StatusCode::OK, body).into_response()
        }
        (Method::PUT, false) if query.contains_key("uploadId") => {
            let part: u32 = query
                .get("partNumber")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let tag = etag(&body);
            match objects.uploads.get_mut(&query["uploadId"]) {
                Some(parts) => {
                    parts.insert(part, body);
                    (StatusCode::OK, [(header::ETAG, tag)]).into_response()
                }
                None => xml_error(StatusCode::NOT_FOUND, "NoSuchUpload", "no such upload"),
            }
        }
        (Method::POST, false) if query.contains_key("uploadId") => {
            let Some(parts) = objects.uploads.remove(&query["uploadId"]) else {
                return xml_error(StatusCode::NOT_FOUND, "NoSuchUpload", "no such upload");
            };
            // The parts the body names, in its order.
            let text = String::from_utf8_lossy(&body);
            let mut data = Vec::new();
            for piece in text.split("<PartNumber>").skip(1) {
                let number: u32 = piece
                    .split('<')
                    .next()
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                match parts.get(&number) {
                    Some(part) => data.extend_from_slice(part),
                    None => {
                        return xml_error(StatusCode::BAD_REQUEST, "InvalidPart", "no such part");
                    }
                }
            }
            let tag = etag(&data);
            objects.objects.insert(key, Bytes::from(data));
            let body = format!(
                "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{object}</Key><ETag>{tag}</ETag></CompleteMultipartUploadResult>"
            );
            (StatusCode::OK, body).into_response()
        }
        (Method::DELETE, false) if query.contains_key("uploadId") => {
            objects.uploads.remove(&query["uploadId"]);
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::PUT, false) => {
            let tag = etag(&body);
            objects.objects.insert(key, body);
            (StatusCode::OK, [(header::ETAG, tag)]).into_response()
        }
        (Method::GET | Method::HEAD, false) => match objects.objects.get(&key) {
            Some(data) => {
                let mut response = Response::builder()
                    .status(StatusCode::OK)
                    .header(header::ETAG, etag(data))
                    .header(header::CONTENT_LENGTH, data.len())
                    .header(header::LAST_MODIFIED, "Mon, 07 Dec 2026 00:00:00 GMT")
                    .header(header::CONTENT_TYPE, "application/octet-stream");
                if signed_url {
                    response = response.header("x-trainyard-signed", "1");
                }
                let body = if method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(data.clone())
                };
                response.body(body).expect("response")
            }
            None => xml_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ),
        },
        (Method::DELETE, false) => match objects.objects.remove(&key) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => xml_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ),
        },
        _ => xml_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the stand-in",
        ),
    }
}

fn list(objects: &Objects, bucket: &str, query: &HashMap<String, String>) -> Response {
    let prefix = query.get("prefix").map(String::as_str).unwrap_or("");
    let mut body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult><Name>{bucket}</Name><Prefix>{prefix}</Prefix><IsTruncated>false</IsTruncated>"
    );
    for ((b, key), data) in &objects.objects {
        if b != bucket || !key.starts_with(prefix) {
            continue;
        }
        body.push_str(&format!(
            "<Contents><Key>{key}</Key><LastModified>2026-12-07T00:00:00.000Z</LastModified><ETag>{}</ETag><Size>{}</Size></Contents>",
            etag(data),
            data.len()
        ));
    }
    body.push_str("</ListBucketResult>");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml")],
        body,
    )
        .into_response()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("k={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

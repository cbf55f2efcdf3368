//! Glance v2 images: `glance://IMAGE_ID`, the endpoint from `OS_IMAGE_URL`
//! or Keystone's catalog (`openstack.rs`; no token for a Glance without
//! authentication).
//!
//! ```text
//! GET /v2/images/ID            status active? size, os_hash_value, disk_format, locations
//! GET /v2/images/ID/file       Range bytes=0-0: 206 -> every block from here (file, cinder stores)
//!                              400 (rbd, swift, s3, http stores: no random reads)
//!                                -> a swift location (direct_url / locations) read directly
//!                                   through the Swift origin, with lazybd's Swift credentials
//! ```
//!
//! The identity is the image's metadata, not a response header: Glance's
//! 206 carries no ETag and ignores `If-Match`, but an active image never
//! changes, and its `os_hash_value` (or `checksum`) names its content. That
//! digest is kept ([`Origin::content_digest`]) so a hydration or a copy that
//! read every byte checks it. Whatever path the bytes take, the size must
//! be the metadata's and every response is checked as any HTTP origin's.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{HeaderMap, RANGE};
use reqwest::{StatusCode, Url};

use super::http::{self, HttpOrigin, Target, TargetAuth};
use super::openstack::{Auth, Tokens, GLANCE};
use super::swift::{SwiftOrigin, SwiftUrl};
use super::{ContentDigest, Origin, OriginIdentity, OriginOptions};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

/// `glance://IMAGE_ID`: the id, checked.
pub fn parse(spec: &str) -> Result<String> {
    let id = spec
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("glance://"))
        .map(|_| spec[9..].trim_end_matches('/'))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("origin {spec:?}: not a glance:// URL (use glance://IMAGE_ID)"),
            )
        })?;
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("origin {spec:?}: {id:?} is not an image id (letters, digits and '-')"),
        ));
    }
    Ok(id.to_string())
}

/// The locator of a `glance://` spec without opening it.
pub fn locator(spec: &str) -> Option<String> {
    parse(spec).ok().map(|id| format!("glance://{id}"))
}

/// What lazybd uses of an image's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) size: u64,
    pub(super) digest: Option<ContentDigest>,
    pub(super) disk_format: Option<String>,
    /// `direct_url` and every `locations[].url`.
    pub(super) locations: Vec<String>,
}

/// Decode and check `GET /v2/images/ID`.
pub(super) fn meta(id: &str, v: &serde_json::Value) -> Result<Meta> {
    let refuse = |kind, why: String| Err(Error::new(kind, format!("glance://{id}: {why}")));
    match v["status"].as_str() {
        Some("active") => {}
        Some(s @ ("queued" | "saving" | "uploading" | "importing")) => {
            return refuse(
                ErrorKind::InvalidInput,
                format!("the image is {s}: its data is not uploaded yet"),
            )
        }
        Some("deactivated") => {
            return refuse(
                ErrorKind::OriginRefused,
                "the image is deactivated (an admin can reactivate it)".into(),
            )
        }
        Some(s) => {
            return refuse(
                ErrorKind::OriginRefused,
                format!("the image is {s}, not active"),
            )
        }
        None => {
            return refuse(
                ErrorKind::Origin,
                "Glance's answer has no image status".into(),
            )
        }
    }
    match v["container_format"].as_str() {
        // ami/aki/ari: Amazon's kernel, ramdisk and machine images, whose
        // data is the bare file.
        None | Some("bare" | "ami" | "aki" | "ari") => {}
        Some(c) => {
            return refuse(
                ErrorKind::Unsupported,
                format!(
                    "container_format {c:?}: the data holds more than a disk (lazybd serves \
                     container_format bare)"
                ),
            )
        }
    }
    let Some(size) = v["size"].as_u64() else {
        return refuse(ErrorKind::Origin, "the image has no size".into());
    };
    let digest = match (v["os_hash_algo"].as_str(), v["os_hash_value"].as_str()) {
        (Some(a), Some(h)) if !h.is_empty() => Some(ContentDigest {
            algo: a.to_ascii_lowercase(),
            hex: h.to_ascii_lowercase(),
        }),
        _ => v["checksum"].as_str().map(|h| ContentDigest {
            algo: "md5".into(),
            hex: h.to_ascii_lowercase(),
        }),
    };
    let mut locations: Vec<String> = v["direct_url"]
        .as_str()
        .map(str::to_owned)
        .into_iter()
        .collect();
    for l in v["locations"].as_array().into_iter().flatten() {
        if let Some(u) = l["url"].as_str() {
            if !locations.iter().any(|x| x == u) {
                locations.push(u.to_string());
            }
        }
    }
    Ok(Meta {
        size,
        digest,
        disk_format: v["disk_format"].as_str().map(str::to_owned),
        locations,
    })
}

/// The container and object of a Glance swift location
/// (`swift+http://…/CONTAINER/OBJECT`, `swift+config://REF/CONTAINER/OBJECT`).
pub(super) fn swift_location(loc: &str) -> Option<(String, String)> {
    let (scheme, _) = loc.split_once("://")?;
    if !(scheme == "swift" || scheme.starts_with("swift+")) {
        return None;
    }
    let u = Url::parse(loc).ok()?;
    let mut segs: Vec<String> = u
        .path_segments()?
        .filter(|s| !s.is_empty())
        .map(|s| crate::util::percent_decode(s).unwrap_or_else(|| s.to_string()))
        .collect();
    let object = segs.pop()?;
    let container = segs.pop()?;
    Some((container, object))
}

/// Requests for `/v2/images/ID/file`.
struct FileTarget {
    id: String,
    tokens: Arc<Tokens>,
    validator: Option<String>,
}

fn image_url(endpoint: &Url, id: &str, file: bool) -> Url {
    let mut u = endpoint.clone();
    if let Ok(mut seg) = u.path_segments_mut() {
        seg.pop_if_empty().extend(["v2", "images", id]);
        if file {
            seg.push("file");
        }
    }
    u
}

impl Target for FileTarget {
    fn url(&self, _suffix: &str) -> Url {
        // Nothing is published beside a Glance image (sidecars are
        // answered by GlanceOrigin itself).
        image_url(&self.tokens.endpoint(), &self.id, true)
    }

    fn locator(&self) -> String {
        format!("glance://{}", self.id)
    }

    fn pinned_validator(&self) -> Option<String> {
        self.validator.clone()
    }

    fn auth(&self) -> Option<TargetAuth> {
        self.tokens.auth()
    }

    fn unauthorized(&self, generation: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.tokens.renew(generation, &self.locator()).await })
    }

    fn explain(&self, status: StatusCode, _headers: &HeaderMap, _body: &str) -> Option<String> {
        match status {
            StatusCode::UNAUTHORIZED => Some(self.tokens.refused("Glance")),
            StatusCode::FORBIDDEN => Some(format!(
                "the image is not visible to this project, or deactivated ({})",
                self.tokens.describe()
            )),
            StatusCode::NOT_FOUND => Some("the image was deleted".into()),
            StatusCode::BAD_REQUEST => {
                Some("Glance's store cannot read at an offset (rbd, swift, s3, http stores)".into())
            }
            _ => None,
        }
    }
}

/// A Glance image as origin.
pub struct GlanceOrigin {
    data: Box<dyn Origin>,
    identity: OriginIdentity,
    digest: Option<ContentDigest>,
    disk_format: Option<String>,
}

/// A GET with the token, once more with a fresh one after a 401.
async fn get(
    tokens: &Tokens,
    client: &reqwest::Client,
    url: Url,
    range: bool,
    who: &str,
) -> Result<reqwest::Response> {
    let send = |auth: Option<TargetAuth>| {
        let mut r = client.get(url.clone());
        if let Some(a) = auth {
            r = r.headers(a.headers);
        }
        if range {
            r = r.header(RANGE, "bytes=0-0");
        }
        r.send()
    };
    let failed = |e: reqwest::Error| {
        Error::with_source(ErrorKind::Origin, format!("GET {url}"), e.without_url())
    };
    let auth = tokens.auth();
    let generation = auth.as_ref().map(|a| a.generation);
    let resp = send(auth).await.map_err(failed)?;
    if let (StatusCode::UNAUTHORIZED, Some(g)) = (resp.status(), generation) {
        if tokens.renew(g, who).await {
            return send(tokens.auth()).await.map_err(failed);
        }
    }
    Ok(resp)
}

impl GlanceOrigin {
    pub async fn open(spec: &str, opts: &OriginOptions, stats: Arc<Stats>) -> Result<Self> {
        let id = parse(spec)?;
        let locator = format!("glance://{id}");
        let auth = Auth::from_env(
            &|n| std::env::var(n).ok().filter(|v| !v.is_empty()),
            &GLANCE,
        )
        .map_err(|e| e.context_prefix(&locator))?;
        // No redirects: a password or token must never follow one elsewhere.
        let client = http::client(opts, auth.scheme(), &locator, false)?;
        let tokens = Arc::new(
            Tokens::start(auth, client.clone(), false)
                .await
                .map_err(|e| e.context_prefix(&locator))?,
        );
        let endpoint = tokens.endpoint();
        let resp = get(
            &tokens,
            &client,
            image_url(&endpoint, &id, false),
            false,
            &locator,
        )
        .await?;
        let status = resp.status();
        if !status.is_success() {
            let kind = if status.is_server_error() {
                ErrorKind::Origin
            } else {
                ErrorKind::OriginRefused
            };
            let why = match status {
                StatusCode::NOT_FOUND => {
                    " (no such image, or not visible to this project)".to_string()
                }
                StatusCode::UNAUTHORIZED => format!(": {}", tokens.refused("Glance")),
                _ => String::new(),
            };
            return Err(Error::new(
                kind,
                format!("{locator}: image metadata at {endpoint}: HTTP {status}{why}"),
            ));
        }
        let body = resp.bytes().await.map_err(|e| {
            Error::with_source(
                ErrorKind::Origin,
                format!("{locator}: image metadata"),
                e.without_url(),
            )
        })?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            Error::with_source(
                ErrorKind::Origin,
                format!("{locator}: image metadata is not JSON"),
                e,
            )
        })?;
        let m = meta(&id, &v)?;
        let validator = m.digest.as_ref().map(|d| format!("{}:{}", d.algo, d.hex));
        tracing::info!(origin = %locator, glance = %endpoint, size = m.size,
            disk_format = m.disk_format.as_deref().unwrap_or("?"),
            digest = validator.as_deref().unwrap_or("none"), auth = %tokens.describe(),
            "Glance image");

        // Ranged reads from Glance itself, where its store allows them.
        let probe = get(
            &tokens,
            &client,
            image_url(&endpoint, &id, true),
            true,
            &locator,
        )
        .await?;
        let ranged = probe.status() == StatusCode::PARTIAL_CONTENT;
        let probe_status = probe.status();
        drop(probe);
        let data: Box<dyn Origin> = if ranged {
            let target = FileTarget {
                id: id.clone(),
                tokens: tokens.clone(),
                validator: validator.clone(),
            };
            Box::new(HttpOrigin::open_target(Arc::new(target), opts, stats).await?)
        } else {
            let swift = m.locations.iter().find_map(|l| swift_location(l));
            match swift {
                Some((container, object)) => {
                    tracing::info!(origin = %locator, status = %probe_status, %container, %object,
                        "Glance cannot serve byte ranges of this image: reading its Swift location directly");
                    let obj = SwiftUrl { container, object };
                    Box::new(
                        SwiftOrigin::open_object(obj, opts, stats)
                            .await
                            .map_err(|e| {
                                e.context_prefix(format!("{locator} (its Swift location)"))
                            })?,
                    )
                }
                None => {
                    let shown: Vec<&str> = m
                        .locations
                        .iter()
                        .map(|l| l.split_once("://").map(|(s, _)| s).unwrap_or("?"))
                        .collect();
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{locator}: Glance answers HTTP {probe_status} to a ranged GET (its store \
                             cannot read at an offset) and exposes no location lazybd can read \
                             ({}); enable show_image_direct_url / show_multiple_locations for a \
                             Swift store, or move the image to a store with random reads \
                             (file, cinder)",
                            if shown.is_empty() {
                                "none shown".to_string()
                            } else {
                                format!("schemes: {}", shown.join(", "))
                            }
                        ),
                    ));
                }
            }
        };
        if data.identity().size != m.size {
            return Err(Error::new(
                ErrorKind::OriginChanged,
                format!(
                    "{locator}: its data has {} bytes, its metadata says {}",
                    data.identity().size,
                    m.size
                ),
            ));
        }
        Ok(GlanceOrigin {
            data,
            identity: OriginIdentity {
                locator,
                size: m.size,
                validator,
            },
            digest: m.digest,
            disk_format: m.disk_format,
        })
    }
}

impl Origin for GlanceOrigin {
    fn identity(&self) -> &OriginIdentity {
        &self.identity
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        self.data.read_range(range)
    }

    fn connections(&self) -> usize {
        self.data.connections()
    }

    fn reload(&self) -> Result<bool> {
        self.data.reload()
    }

    fn content_digest(&self) -> Option<&ContentDigest> {
        self.digest.as_ref()
    }

    fn disk_format(&self) -> Option<&str> {
        self.disk_format.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_locations() {
        assert_eq!(parse("glance://0b1c-9f/").unwrap(), "0b1c-9f");
        for bad in ["glance://", "glance://a/b", "glance://a?b", "http://x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            swift_location(
                "swift+http://test%3Atester:testing@127.0.0.1:8080/auth/v1.0/glance/abc-1"
            ),
            Some(("glance".into(), "abc-1".into()))
        );
        assert_eq!(
            swift_location("swift+config://ref1/images/abc"),
            Some(("images".into(), "abc".into()))
        );
        assert_eq!(swift_location("file:///var/lib/glance/images/abc"), None);
        assert_eq!(swift_location("rbd://fsid/images/abc/snap"), None);
        let e = Url::parse("http://g:9292/image/").unwrap();
        assert_eq!(
            image_url(&e, "x", true).as_str(),
            "http://g:9292/image/v2/images/x/file"
        );
    }

    #[test]
    fn metadata_is_checked() {
        let ok = serde_json::json!({"status": "active", "size": 100, "disk_format": "qcow2",
            "container_format": "bare", "checksum": "AB", "os_hash_algo": "sha512",
            "os_hash_value": "CD", "direct_url": "swift+http://h/a/c/o",
            "locations": [{"url": "swift+http://h/a/c/o"}, {"url": "file:///x"}]});
        let m = meta("i", &ok).unwrap();
        assert_eq!(m.size, 100);
        assert_eq!(
            m.digest,
            Some(ContentDigest {
                algo: "sha512".into(),
                hex: "cd".into()
            })
        );
        assert_eq!(m.locations, ["swift+http://h/a/c/o", "file:///x"]);
        let mut md5 = ok.clone();
        md5["os_hash_value"] = serde_json::Value::Null;
        assert_eq!(meta("i", &md5).unwrap().digest.unwrap().algo, "md5");
        for (field, value, want) in [
            ("status", "queued", "not uploaded yet"),
            ("status", "deactivated", "deactivated"),
            ("status", "killed", "killed, not active"),
            ("container_format", "ova", "container_format \"ova\""),
        ] {
            let mut v = ok.clone();
            v[field] = serde_json::Value::String(value.into());
            let e = meta("i", &v).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("glance://i"), "{e}");
        }
        let mut v = ok;
        v["size"] = serde_json::Value::Null;
        assert!(meta("i", &v).is_err());
    }
}

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
use super::stream::{StartPass, StreamOptions, StreamOrigin};
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

/// Where a Glance swift location points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SwiftLocation {
    /// The account a multi-tenant location names (`…/v1/AUTH_x/C/O`);
    /// `None` for single-tenant ones (`swift+config://REF/C/O`, or an auth
    /// URL with credentials), which are in Glance's own account.
    pub(super) account: Option<String>,
    pub(super) container: String,
    pub(super) object: String,
}

/// The account, container and object of a Glance swift location
/// (`swift+http://…/CONTAINER/OBJECT`, `swift+config://REF/CONTAINER/OBJECT`).
pub(super) fn swift_location(loc: &str) -> Option<SwiftLocation> {
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
    // A storage URL (`/v1/ACCOUNT`) rather than an auth URL: multi-tenant.
    let account = match (segs.len().checked_sub(2).map(|i| &segs[i..]), u.username()) {
        (Some([v, account]), "") if v == "v1" && !scheme.ends_with("config") => {
            Some(account.clone())
        }
        _ => None,
    };
    Some(SwiftLocation {
        account,
        container,
        object,
    })
}

/// Whether lazybd may read image `id`'s Swift location `loc` with its own
/// Swift credentials: Glance's swift store names every object by its
/// image's id, so any other object is another image's (or anybody's) data,
/// reachable only because lazybd's account can read it; a location's
/// account is checked against lazybd's storage URL once that is known.
fn usable_location(id: &str, loc: &SwiftLocation) -> std::result::Result<(), String> {
    if loc.object != id {
        return Err(format!(
            "names object {:?}, not the image's id (Glance's swift store names objects by \
             image id): not read, since lazybd's Swift account may reach objects that are not \
             this image's",
            loc.object
        ));
    }
    Ok(())
}

/// The account at the end of a Swift storage URL (`…/v1/AUTH_x`).
fn storage_account(storage: &Url) -> Option<String> {
    storage
        .path_segments()?
        .rfind(|s| !s.is_empty())
        .map(|s| crate::util::percent_decode(s).unwrap_or_else(|| s.to_string()))
}

/// Requests for `/v2/images/ID/file`.
struct FileTarget {
    id: String,
    tokens: Arc<Tokens>,
    validator: Option<String>,
}

fn image_url(endpoint: &Url, id: &str, file: bool) -> Url {
    let mut u = endpoint.clone();
    // A catalog entry or OS_IMAGE_URL may name the API version already
    // (as glanceclient accepts it).
    let versioned = u
        .path_segments()
        .and_then(|mut s| s.rfind(|p| !p.is_empty()))
        .is_some_and(|last| last == "v2");
    if let Ok(mut seg) = u.path_segments_mut() {
        seg.pop_if_empty();
        if versioned {
            seg.pop();
        }
        seg.extend(["v2", "images", id]);
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
        let mut resp = resp;
        let body =
            http::body_capped(&mut resp, META_MAX, &format!("{locator}: image metadata")).await?;
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
        } else if let StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND =
            probe_status
        {
            // Not a store that cannot seek: the image's data is refused.
            let why = match probe_status {
                StatusCode::UNAUTHORIZED => tokens.refused("Glance"),
                StatusCode::FORBIDDEN => "the image's data is not readable by this project".into(),
                _ => "the image has no data (deleted, or never uploaded)".into(),
            };
            return Err(Error::new(
                ErrorKind::OriginRefused,
                format!("{locator}: GET of its data: HTTP {probe_status}: {why}"),
            ));
        } else if let Some(o) = swift_data(&id, &m, opts, stats.clone(), probe_status).await? {
            o
        } else {
            tracing::warn!(origin = %locator, status = %probe_status,
                locations = %location_schemes(&m.locations),
                "Glance cannot serve byte ranges of this image and exposes no location lazybd \
                 can read: reading it in one sequential pass (reads wait for it to pass them; \
                 the image is hydrated in that order). For random reads enable \
                 show_image_direct_url for a Swift store, or use a store with random reads \
                 (file, cinder)");
            let file_url = image_url(&endpoint, &id, true);
            let (t, c, who) = (tokens.clone(), client.clone(), locator.clone());
            let start: StartPass = Box::new(move || {
                let (t, c, u, who) = (t.clone(), c.clone(), file_url.clone(), who.clone());
                Box::pin(async move { get(&t, &c, u, false, &who).await })
            });
            let identity = OriginIdentity {
                locator: locator.clone(),
                size: m.size,
                validator: validator.clone(),
            };
            let so = StreamOptions {
                spool_dir: opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
                stall: http::STALL.min(opts.request_timeout),
                retries: opts.retries.min(STREAM_RETRIES),
            };
            Box::new(StreamOrigin::start(
                identity,
                m.digest.clone(),
                start,
                so,
                stats,
            )?)
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

/// Largest image metadata document accepted.
const META_MAX: u64 = 1 << 20;
/// Sequential passes started again in a row before reads fail.
const STREAM_RETRIES: u32 = 5;

/// The schemes of `locations`, for messages (never the URLs: they may
/// hold credentials).
fn location_schemes(locations: &[String]) -> String {
    if locations.is_empty() {
        return "none shown".into();
    }
    let schemes: Vec<&str> = locations
        .iter()
        .map(|l| l.split_once("://").map(|(s, _)| s).unwrap_or("?"))
        .collect();
    schemes.join(", ")
}

/// The image's data through its Swift location, if it has one lazybd may
/// read (see [`usable_location`]).
async fn swift_data(
    id: &str,
    m: &Meta,
    opts: &OriginOptions,
    stats: Arc<Stats>,
    probe_status: StatusCode,
) -> Result<Option<Box<dyn Origin>>> {
    let locator = format!("glance://{id}");
    let mut found = None;
    for l in m.locations.iter().filter_map(|l| swift_location(l)) {
        match usable_location(id, &l) {
            Ok(()) => {
                found = Some(l);
                break;
            }
            Err(why) => {
                tracing::warn!(origin = %locator, container = %l.container, "a Swift location {why}")
            }
        }
    }
    let Some(loc) = found else { return Ok(None) };
    tracing::info!(origin = %locator, status = %probe_status, container = %loc.container,
        object = %loc.object,
        "Glance cannot serve byte ranges of this image: reading its Swift location directly");
    let obj = SwiftUrl {
        container: loc.container.clone(),
        object: loc.object.clone(),
    };
    let swift = SwiftOrigin::open_object(obj, opts, stats)
        .await
        .map_err(|e| e.context_prefix(format!("{locator} (its Swift location)")))?;
    if let Some(want) = &loc.account {
        let have = storage_account(swift.storage());
        if have.as_deref() != Some(want.as_str()) {
            return Err(Error::new(
                ErrorKind::OriginRefused,
                format!(
                    "{locator}: its Swift location is in account {want:?}, lazybd's Swift \
                     credentials reach {:?}: not read (another account's object of the same \
                     name is not this image)",
                    have.unwrap_or_default()
                ),
            ));
        }
    }
    Ok(Some(Box::new(swift)))
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

    fn sequential_only(&self) -> bool {
        self.data.sequential_only()
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
        let loc = |a: Option<&str>, c: &str, o: &str| SwiftLocation {
            account: a.map(str::to_owned),
            container: c.into(),
            object: o.into(),
        };
        assert_eq!(
            swift_location(
                "swift+http://test%3Atester:testing@127.0.0.1:8080/auth/v1.0/glance/abc-1"
            ),
            Some(loc(None, "glance", "abc-1"))
        );
        assert_eq!(
            swift_location("swift+config://ref1/images/abc"),
            Some(loc(None, "images", "abc"))
        );
        // Multi-tenant: the location names the owner's account.
        let mt =
            swift_location("swift+https://swift.example:443/v1/AUTH_p1/glance_abc/abc").unwrap();
        assert_eq!(mt, loc(Some("AUTH_p1"), "glance_abc", "abc"));
        assert_eq!(swift_location("file:///var/lib/glance/images/abc"), None);
        assert_eq!(swift_location("rbd://fsid/images/abc/snap"), None);
        // Only the image's own object is read (OSSN-0065: an owner who may
        // set locations could point it at another image's object).
        assert!(usable_location("abc", &mt).is_ok());
        let other = loc(None, "glance", "victim-id");
        let why = usable_location("abc", &other).unwrap_err();
        assert!(
            why.contains("\"victim-id\"") && why.contains("image's id"),
            "{why}"
        );
        assert_eq!(
            storage_account(&Url::parse("http://h:8080/v1/AUTH_p1/").unwrap()).as_deref(),
            Some("AUTH_p1")
        );
        assert_eq!(
            image_url(&Url::parse("http://g:9292/v2/").unwrap(), "x", false).as_str(),
            "http://g:9292/v2/images/x"
        );
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

//! HTTP(S) origin with ranged GETs (reqwest + rustls).
//!
//! Opening sends one `GET` with `Range: bytes=0-0`: the 206 answer gives the
//! size (Content-Range total), the validator (ETag, else Last-Modified) and
//! the final URL after redirects, so redirects are resolved once, not per
//! block. A server that answers 200 does not support ranges and is refused.
//! (HEAD is avoided: presigned S3/Swift URLs are often signed for GET only.)
//!
//! Every block response is checked: status 206, Content-Range equal to what
//! was asked, total equal to the image size, validator unchanged, body length
//! exact. Anything else is an error and its bytes are dropped.
//!
//! Other origins that are HTTP underneath (S3) give a [`Target`] instead of
//! a URL: it makes the URL of each request (signed anew, so a presigned URL
//! never expires under a long-running server), names the image and
//! explains refusals in its own terms; every check here applies unchanged.
//! Such origins also send `If-Match` with the ETag on ranged GETs, so a
//! changed object is refused by the server (412) before any byte is sent.
//!
//! Identity and display of a URL with a query (see [`locator`]):
//!
//! ```text
//! https://h/get?id=7&token=T&X-Amz-Date=D&X-Amz-Signature=S
//!   request:  sent as it is
//!   shown:    https://h/get?id=7&token=…&X-Amz-Date=D&X-Amz-Signature=…
//!   locator:  https://h/get?id=7&token=… [query sha256 <32 hex of "id=7&token=T">]
//!             (signing parameters left out; a hidden value is hashed in)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, CONTENT_RANGE, ETAG, IF_MATCH, LAST_MODIFIED, RANGE};
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;

use super::headers::LiveHeaders;
use super::{Hedge, Origin, OriginIdentity, OriginOptions, ProxySetting};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

/// Which response header the validator came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValidatorSource {
    ETag,
    LastModified,
    None,
}

/// Where the requests of an origin that is not one fixed URL go (S3: a URL
/// presigned per request).
pub(super) trait Target: Send + Sync + 'static {
    /// The URL of one GET: of the image (`suffix` empty) or of a file
    /// published beside it (the image's name + `suffix`). Called for every
    /// request, so what it signs is fresh each time.
    fn url(&self, suffix: &str) -> Url;

    /// Re-read credentials (see [`Origin::reload`]).
    fn reload(&self) -> Result<bool> {
        Ok(false)
    }

    /// The image's identity as known from elsewhere (Glance's
    /// `os_hash_value`, immutable once active), used when responses carry
    /// no validator of their own.
    fn pinned_validator(&self) -> Option<String> {
        None
    }

    /// Credentials to send with a request (a token), and the generation
    /// they belong to; `None` for a target that signs its URLs instead.
    fn auth(&self) -> Option<TargetAuth> {
        None
    }

    /// A request sent with generation `generation`'s credentials got 401:
    /// get fresh ones (once, however many requests got it). True when a
    /// retry may succeed.
    fn unauthorized(&self, _generation: u64) -> BoxFuture<'_, bool> {
        Box::pin(async { false })
    }

    /// The image's locator (its identity, and how errors name it).
    fn locator(&self) -> String;

    /// What a refused request means for this kind of origin, from its
    /// status, headers and (the first bytes of its) body; `None` for the
    /// plain "HTTP 403".
    fn explain(&self, _status: StatusCode, _headers: &HeaderMap, _body: &str) -> Option<String> {
        None
    }
}

/// What [`Target::auth`] adds to a request.
pub(super) struct TargetAuth {
    pub(super) headers: HeaderMap,
    pub(super) generation: u64,
    /// Getting fresh credentials for this generation failed for a reason
    /// that passes (the token service answered 5xx, timed out or was
    /// unreachable: a Keystone restart). A 401 to these credentials is then
    /// retried like a 5xx, not reported as a refusal.
    pub(super) renewal_failing: bool,
}

/// How requests find the image.
enum Address {
    /// A URL, after the redirects of the probe were followed.
    Fixed(Url),
    /// A URL made for each request, redirects not followed (a redirect
    /// from S3 means another region or endpoint, which is explained).
    Target(Arc<dyn Target>),
}

impl Address {
    fn url(&self, suffix: &str) -> Url {
        match self {
            Address::Fixed(u) if suffix.is_empty() => u.clone(),
            Address::Fixed(u) => {
                let mut u = u.clone();
                u.set_path(&format!("{}{suffix}", u.path()));
                u
            }
            Address::Target(t) => t.url(suffix),
        }
    }

    /// How a request's URL is shown: a fixed URL redacted; a target's
    /// locator (with the suffix), which never holds a signature.
    fn shown(&self, suffix: &str) -> String {
        match self {
            Address::Fixed(_) => redact(&self.url(suffix)),
            Address::Target(t) => format!("{}{suffix}", t.locator()),
        }
    }
}

/// A GET of the image (`suffix` empty) or of a file beside it, with the
/// configured headers, the target's credentials and `extra` (Range,
/// If-Match). A 401 to a target that can authenticate again is retried
/// once with its fresh credentials: a token that expired between two reads
/// costs one round trip, not an error.
///
/// Each request is sent by `once` (which bounds it: the stall bound of block
/// reads); getting fresh credentials between the two is not, so a token
/// service slower than a stall is waited for (its own client's timeout
/// bounds it) instead of being cancelled mid-request on every attempt.
async fn send<F, Fut>(
    client: &reqwest::Client,
    address: &Address,
    headers: &LiveHeaders,
    suffix: &str,
    extra: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    once: F,
) -> Result<reqwest::Response>
where
    F: Fn(reqwest::RequestBuilder) -> Fut,
    Fut: std::future::Future<Output = Result<reqwest::Response>>,
{
    let build = || {
        let mut req = client
            .get(address.url(suffix))
            .headers((*headers.current()).clone());
        let mut generation = None;
        if let Address::Target(t) = address {
            if let Some(a) = t.auth() {
                req = req.headers(a.headers);
                generation = Some(a.generation);
            }
        }
        (extra(req), generation)
    };
    let (req, generation) = build();
    let resp = once(req).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        if let (Address::Target(t), Some(g)) = (address, generation) {
            if t.unauthorized(g).await {
                return once(build().0).await;
            }
        }
    }
    Ok(resp)
}

/// One request sent, its failure an [`Error`] of `kind` with context
/// `what` (a refused redirect is always `OriginRefused`).
async fn send_one(
    req: reqwest::RequestBuilder,
    kind: impl Fn(&reqwest::Error) -> ErrorKind,
    what: impl Fn() -> String,
) -> Result<reqwest::Response> {
    req.send().await.map_err(|e| {
        let kind = if redirect_refused(&e) {
            ErrorKind::OriginRefused
        } else {
            kind(&e)
        };
        Error::with_source(kind, what(), no_url(e))
    })
}

/// TimedOut for a timeout (retried), else Origin.
fn timeout_or_origin(e: &reqwest::Error) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::TimedOut
    } else {
        ErrorKind::Origin
    }
}

/// Silence (no byte of headers or body) after which a block request is
/// given up and retried: well under the default read deadline (30 s), so a
/// stall (a dead node, a lost connection nobody reset) costs one retry, not
/// the whole deadline, even with hedging off, however long a healthy
/// transfer of a large range takes on a slow link. Block reads only: the
/// probe at open keeps the whole request timeout (an origin slow to answer
/// its first request is waited for, as before).
pub(super) const STALL: Duration = Duration::from_secs(5);

/// `f`, or a TimedOut error (retryable) if it stays silent for `stall`.
async fn within<T>(
    stall: Duration,
    what: impl FnOnce() -> String,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(stall, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("{}: nothing received for {} s", what(), stall.as_secs_f64()),
        )),
    }
}

/// The first bytes of a refusal's body: S3 explains itself in a small XML
/// document; more is never needed (nor read: it could be an image).
const REFUSAL_BODY_MAX: usize = 16 << 10;

pub(crate) struct HttpOrigin {
    client: reqwest::Client,
    /// Extra headers of every request (reloadable).
    headers: LiveHeaders,
    /// The URL after redirects, or the target that signs one per request.
    address: Address,
    identity: OriginIdentity,
    validator_source: ValidatorSource,
    /// Send `If-Match: ETAG` with every ranged GET (targets that are S3).
    if_match: bool,
    /// Caps parallel requests: origins (and their rate limits) are shared.
    limit: Semaphore,
    connections: usize,
    retries: u32,
    deadline: Duration,
    /// The stall bound of block reads ([`STALL`]), never more than the
    /// bound on one request (body included, which the client enforces).
    stall: Duration,
    hedge: Hedge,
    stats: Arc<Stats>,
}

/// Query parameters that sign a URL rather than name an object: AWS
/// Signature V4 and V2 (S3 presigned URLs), Google Cloud Storage V4
/// signed URLs and OpenStack Swift temporary URLs. They change each time a
/// URL is signed again, so they are not part of the image's identity: a
/// re-signed URL keeps its cache. Every other parameter is identity
/// (`?id=1` and `?id=2` are two images). Names match ignoring ASCII case.
///
/// The list is short on purpose. Leaving out a parameter that does select
/// an object would let two objects share a cache (with no validator to
/// tell them apart, each would serve the other's bytes); keeping a
/// parameter that only signs costs a cold cache after a re-sign. So only
/// names that are unambiguous signing parameters are here: not Azure's
/// `sig`/`se`/`st`, whose short names a plain server could use for
/// anything (a re-signed Azure SAS URL starts a new cache).
/// Rejected: the whole query as identity (every re-sign a cold cache), and
/// no query at all (the bug this replaced: `?id=1` served `?id=2`).
const SIGNING_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "Signature",
    "Expires",
    "AWSAccessKeyId",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "temp_url_sig",
    "temp_url_expires",
];

/// Parameter names whose values are secrets, as parts of the name (ASCII
/// case ignored): `X-Amz-Signature`, `sig`, `token`, `AWSAccessKeyId`,
/// `X-Amz-Credential`, `api_key`, ... Their values are never shown (logs,
/// errors, the cache's `origin` file, directory names). Broad on purpose:
/// hiding a harmless value only makes a log line less telling.
const SECRET_NAME_PARTS: &[&str] = &[
    "sig",
    "token",
    "secret",
    "passw",
    "credential",
    "key",
    "auth",
];

fn is_signing(name: &str) -> bool {
    SIGNING_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// AWS's `X-Amz-*` parameters whose values are safe to show (and explain
/// a 403: an expired URL shows its date). Every other `X-Amz-*` value is
/// hidden whatever its name (`X-Amz-Security-Token`, `X-Amz-Credential`,
/// `X-Amz-Signature`, SSE-C keys, ...): AWS adds parameters, and a new one
/// may carry a secret under a name no part above catches.
const AMZ_SHOWN: &[&str] = &[
    "x-amz-algorithm",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
];

fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name.starts_with("x-amz-") {
        return !AMZ_SHOWN.contains(&name.as_str());
    }
    SECRET_NAME_PARTS.iter().any(|p| name.contains(p))
}

/// The `name=value` pieces of the query, as sent (still %-encoded).
fn query_pieces(url: &Url) -> impl Iterator<Item = &str> {
    url.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
}

fn param_name(piece: &str) -> &str {
    piece.split_once('=').map_or(piece, |(n, _)| n)
}

/// The pieces joined as a query, each secret value replaced by `…`; and
/// whether any was.
fn show_query<'a>(pieces: impl Iterator<Item = &'a str>) -> (String, bool) {
    let mut hidden = false;
    let shown: Vec<String> = pieces
        .map(|p| match p.split_once('=') {
            Some((n, v)) if !v.is_empty() && is_secret(n) => {
                hidden = true;
                format!("{n}=…")
            }
            _ => p.to_owned(),
        })
        .collect();
    (shown.join("&"), hidden)
}

/// `scheme://host[:port]/path`: no `user:pass@`, query or fragment.
fn without_query(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A URL as logs and errors show it: no credentials (`user:pass@`), every
/// query parameter, the values of secret ones (see [`SECRET_NAME_PARTS`])
/// replaced by `…`. (Expiry dates stay visible: they explain a 403.)
pub(super) fn redact(url: &Url) -> String {
    match show_query(query_pieces(url)) {
        (q, _) if q.is_empty() => without_query(url),
        (q, _) => format!("{}?{q}", without_query(url)),
    }
}

/// The locator of the image at `url`: what names it in its identity, the
/// cache's `origin` file and (hashed) its directory name.
///
/// It is the URL without credentials, fragment and signing parameters
/// ([`SIGNING_PARAMS`]); every other query parameter is kept, in order, as
/// sent. Secret values are shown as `…` and then a SHA-256 of the kept
/// query is appended (`[query sha256 HEX]`), so that URLs that differ only
/// in a secret are still two images while the secret cannot be read. A
/// locator with `…` or a space can never be a plain URL's (a URL's query
/// has them %-encoded), so the two forms cannot collide. A URL without a
/// query keeps the locator it always had (its cache stays valid).
pub(crate) fn locator(url: &Url) -> String {
    let kept: Vec<&str> = query_pieces(url)
        .filter(|p| !is_signing(param_name(p)))
        .collect();
    let base = without_query(url);
    if kept.is_empty() {
        return base;
    }
    let (shown, hidden) = show_query(kept.iter().copied());
    if !hidden {
        return format!("{base}?{shown}");
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(kept.join("&").as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{base}?{shown} [query sha256 {hex}]")
}

/// The proxy the environment names for `scheme`, for the log: (variable,
/// value), picked the way reqwest 0.12 (hyper-util's proxy matcher) picks
/// it, so the log names the proxy really used: the UPPER-case name first,
/// then the lower-case one, the first that is *set* counting (even empty);
/// a value it cannot use (empty, an unknown scheme, no host) falls back to
/// `ALL_PROXY` / `all_proxy` the same way; none at all under CGI
/// (`REQUEST_METHOD` set). `var` reads the environment.
fn env_proxy(scheme: &str, var: &dyn Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    if var("REQUEST_METHOD").is_some() {
        return None;
    }
    let first = |names: [&'static str; 2]| {
        names
            .iter()
            .find_map(|n| var(n).map(|v| (*n, v)))
            .filter(|(_, v)| usable_proxy(v))
    };
    let named = if scheme == "https" {
        first(["HTTPS_PROXY", "https_proxy"])
    } else {
        first(["HTTP_PROXY", "http_proxy"])
    };
    named.or_else(|| first(["ALL_PROXY", "all_proxy"]))
}

/// Whether a proxy variable's value is one reqwest takes: an optional
/// http, https or socks scheme and a host (`user:pass@p:3128` is).
fn usable_proxy(v: &str) -> bool {
    let rest = match v.split_once("://") {
        Some((scheme, rest)) => {
            let known = ["http", "https", "socks4", "socks4a", "socks5", "socks5h"];
            if !known.iter().any(|k| k.eq_ignore_ascii_case(scheme)) {
                return false;
            }
            rest
        }
        None => v,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    !host.is_empty() && !host.starts_with(':') && !v.chars().any(char::is_whitespace)
}

/// A proxy URL with its credentials replaced (proxies often carry one).
/// Textual, so a URL without a scheme (`user:pass@proxy:3128`, which curl
/// and reqwest take) is redacted too: whatever lies between an optional
/// `scheme://` and the last `@` goes.
pub(super) fn redact_userinfo(s: &str) -> String {
    let (scheme, rest) = match s.split_once("://") {
        Some((sc, r)) => (format!("{sc}://"), r),
        None => (String::new(), s),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}…@{host}"),
        None => s.to_string(),
    }
}

#[cfg(test)]
#[test]
fn proxy_credentials_never_show() {
    for (given, shown) in [
        ("http://u:secret@p:3128", "http://…@p:3128"),
        ("u:secret@p:3128", "…@p:3128"),
        // A user name alone is often the secret (a token as the user).
        ("http://tok3n@p:3128", "http://…@p:3128"),
        ("tok3n@p:3128", "…@p:3128"),
        ("http://p:3128", "http://p:3128"),
    ] {
        assert_eq!(redact_userinfo(given), shown);
    }
}

/// `bytes START-END/TOTAL` -> (start, end inclusive, total or None for `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (s, e) = span.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let (s, e): (u64, u64) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    (s <= e).then_some((s, e, total))
}

fn header_str(h: &HeaderMap, name: HeaderName) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Status codes worth retrying: the server or a proxy had a bad moment.
pub(super) fn transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// A reqwest error without its URL: reqwest shows the URL of a failed
/// request in its message, query and all, which for a presigned URL is a
/// signature and maybe a session token.
fn no_url(e: reqwest::Error) -> reqwest::Error {
    e.without_url()
}

/// Up to [`REFUSAL_BODY_MAX`] bytes of a response's body, as text.
async fn refusal_body(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = REFUSAL_BODY_MAX - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= REFUSAL_BODY_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// A response's whole body, refused once it passes `max` bytes (a hostile
/// or broken server could otherwise stream until the request times out);
/// `what` names the request in errors.
pub(super) async fn body_capped(
    resp: &mut reqwest::Response,
    max: u64,
    what: &str,
) -> Result<Bytes> {
    let larger = || {
        Error::new(
            ErrorKind::Origin,
            format!("{what}: larger than {max} bytes"),
        )
    };
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(larger());
    }
    match body_within(resp, max).await {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(larger()),
        Err(e) => Err(Error::with_source(
            ErrorKind::Origin,
            what.to_string(),
            no_url(e),
        )),
    }
}

/// The body of `resp`, or `None` as soon as it proves longer than `max`
/// bytes (nothing past that is read: a body can be anything, an image).
pub(super) async fn body_within(
    resp: &mut reqwest::Response,
    max: u64,
) -> reqwest::Result<Option<Bytes>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// Redirects a client of a fixed URL follows (reqwest's default count).
const MAX_REDIRECTS: usize = 10;

/// Which redirects a client that follows them follows. Without secrets of
/// lazybd's, any (a public image behind a CDN's redirect is common). With
/// them (`secrets`: extra headers, which carry bearer tokens and API keys),
/// only hops within the origin: same scheme, host and port.
///
/// reqwest itself drops only `Authorization`, `Cookie` and
/// `Proxy-Authorization`, only on a hop to another host or port, and
/// follows https to http: an `X-Auth-Token` from `--header-file` would go
/// to whatever host a redirect names, in clear text after a downgrade, and
/// then with every block read (the probe's final URL is where all later
/// requests go). The refusal names both URLs (redacted) and what to do.
/// Clients of targets (tokens, signed URLs) follow no redirect at all.
fn redirect_policy(secrets: bool) -> reqwest::redirect::Policy {
    if !secrets {
        return reqwest::redirect::Policy::limited(MAX_REDIRECTS);
    }
    reqwest::redirect::Policy::custom(|attempt| {
        let refused = attempt
            .previous()
            .last()
            .and_then(|from| leaves_origin(from, attempt.url()));
        if let Some(why) = refused {
            attempt.error(RedirectRefused(why))
        } else if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error(format!("too many redirects ({MAX_REDIRECTS})"))
        } else {
            attempt.follow()
        }
    })
}

/// Why a redirect from `from` to `to` may not carry extra headers; `None`
/// within one origin (scheme, host, port).
fn leaves_origin(from: &Url, to: &Url) -> Option<String> {
    if from.scheme() == to.scheme()
        && from.host_str() == to.host_str()
        && from.port_or_known_default() == to.port_or_known_default()
    {
        return None;
    }
    let goes = if from.scheme() == "https" && to.scheme() != "https" {
        "from https to plain http"
    } else {
        "to another origin (scheme, host or port)"
    };
    Some(format!(
        "redirect from {} to {} refused: it goes {goes}, and the requests carry \
         extra headers (--header, --header-file, LAZYBD_HEADERS, [origin] headers) \
         that must not follow it there; if that origin may have them, give its URL \
         as the origin",
        redact(from),
        redact(to)
    ))
}

/// A redirect [`redirect_policy`] refused (the source of reqwest's error).
#[derive(Debug)]
struct RedirectRefused(String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RedirectRefused {}

/// Whether `e` is a redirect [`redirect_policy`] refused: not transient.
fn redirect_refused(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<RedirectRefused>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The HTTP client of an origin whose URLs have scheme `scheme` (and of the
/// requests that authenticate to it): the proxy, extra CAs, timeouts and
/// pool of `opts`, for the origin shown as `shown` in logs.
/// `follow_redirects`: of a fixed URL (see [`redirect_policy`]); clients
/// that send tokens, keys or passwords follow none.
pub(super) fn client(
    opts: &OriginOptions,
    scheme: &str,
    shown: &str,
    follow_redirects: bool,
) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    builder = match &opts.proxy {
        // reqwest reads the variables itself (and NO_PROXY).
        ProxySetting::FromEnv => {
            if let Some((var, p)) = env_proxy(scheme, &|n| std::env::var(n).ok()) {
                tracing::info!(origin = %shown, proxy = %redact_userinfo(&p), from = var,
                    "origin requests go through a proxy (NO_PROXY honoured)");
            }
            builder
        }
        ProxySetting::Off => builder.no_proxy(),
        ProxySetting::Url(p) => {
            let proxy = reqwest::Proxy::all(p.as_str())
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::InvalidInput,
                        format!("origin proxy {}", redact_userinfo(p)),
                        e,
                    )
                })?
                .no_proxy(reqwest::NoProxy::from_env());
            tracing::info!(origin = %shown, proxy = %redact_userinfo(p), from = "--origin-proxy",
                "origin requests go through a proxy (NO_PROXY honoured)");
            builder.proxy(proxy)
        }
    };
    builder = builder.redirect(if follow_redirects {
        redirect_policy(!opts.headers.is_empty())
    } else {
        reqwest::redirect::Policy::none()
    });
    if let Some(ca) = &opts.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::io(format!("reading CA file {}", ca.display()), e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidInput,
                format!("CA file {}", ca.display()),
                e,
            )
        })?;
        if certs.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("CA file {} holds no PEM certificate", ca.display()),
            ));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .timeout(opts.request_timeout)
        .pool_max_idle_per_host(opts.connections)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("lazybd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "building HTTP client", e))
}

impl HttpOrigin {
    pub(crate) async fn open(spec: &str, opts: &OriginOptions, stats: Arc<Stats>) -> Result<Self> {
        let url = Url::parse(spec).map_err(|e| {
            Error::with_source(ErrorKind::InvalidInput, format!("origin URL {spec:?}"), e)
        })?;
        let locator = locator(&url);
        Self::open_at(Address::Fixed(url), locator, opts, stats).await
    }

    /// An origin whose requests go where `target` says (see [`Target`]).
    pub(super) async fn open_target(
        target: Arc<dyn Target>,
        opts: &OriginOptions,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let locator = target.locator();
        Self::open_at(Address::Target(target), locator, opts, stats).await
    }

    async fn open_at(
        address: Address,
        locator: String,
        opts: &OriginOptions,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let url = address.url("");
        let shown = address.shown("");
        let follow = matches!(address, Address::Fixed(_));
        let client = client(opts, url.scheme(), &shown, follow)?;
        let live = LiveHeaders::new(opts.headers.clone())?;
        let resp = send(
            &client,
            &address,
            &live,
            "",
            |r| r.header(RANGE, "bytes=0-0"),
            |req| send_one(req, |_| ErrorKind::Origin, || format!("probing {shown}")),
        )
        .await?;
        Stats::add(&stats.origin_requests, 1);
        let status = resp.status();
        let final_url = resp.url().clone();
        let headers = resp.headers().clone();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            // An empty object cannot satisfy bytes=0-0; servers answer 200.
            StatusCode::OK if resp.content_length() == Some(0) => {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("{shown} is empty (0 bytes): nothing to serve"),
                ))
            }
            StatusCode::OK => {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!(
                        "{shown} does not support byte ranges (answered 200 OK to a ranged GET); \
                         lazybd needs an origin that honours Range requests"
                    ),
                ))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("{shown}: 416 for bytes=0-0, the image is empty"),
                ))
            }
            s => {
                let why = match &address {
                    Address::Target(t) => t.explain(s, &headers, &refusal_body(resp).await),
                    Address::Fixed(_) => None,
                };
                let kind = if s.is_client_error() {
                    ErrorKind::OriginRefused
                } else {
                    ErrorKind::Origin
                };
                return Err(Error::new(
                    kind,
                    why.unwrap_or_else(|| format!("{shown}: HTTP {s} when probing the origin")),
                ));
            }
        }
        let cr = header_str(&headers, CONTENT_RANGE).ok_or_else(|| {
            Error::new(
                ErrorKind::Origin,
                format!("{shown}: 206 without Content-Range"),
            )
        })?;
        let size = match parse_content_range(&cr) {
            Some((0, 0, Some(total))) => total,
            _ => {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("{shown}: unusable Content-Range {cr:?} for bytes=0-0"),
                ))
            }
        };
        // The probe body (one byte) is consumed so the connection is reused.
        let _ = resp.bytes().await;

        let (validator, validator_source) = match (
            header_str(&headers, ETAG),
            header_str(&headers, LAST_MODIFIED),
        ) {
            (Some(e), _) => (Some(e), ValidatorSource::ETag),
            (None, Some(lm)) => (Some(lm), ValidatorSource::LastModified),
            (None, None) => match &address {
                Address::Target(t) if t.pinned_validator().is_some() => {
                    (t.pinned_validator(), ValidatorSource::None)
                }
                _ => {
                    tracing::warn!(origin = %shown, "origin sends neither ETag nor Last-Modified: a changed image cannot be detected");
                    (None, ValidatorSource::None)
                }
            },
        };
        let if_match = matches!(address, Address::Target(_));
        let address = match address {
            Address::Fixed(_) => {
                if final_url != url {
                    tracing::info!(from = %shown, to = %redact(&final_url), "origin redirect resolved");
                }
                Address::Fixed(final_url)
            }
            target => target,
        };
        Ok(HttpOrigin {
            headers: live,
            client,
            identity: OriginIdentity {
                locator,
                size,
                validator,
            },
            address,
            validator_source,
            if_match,
            limit: Semaphore::new(opts.connections.max(1)),
            connections: opts.connections.max(1),
            retries: opts.retries,
            deadline: opts.deadline,
            stall: STALL.min(opts.request_timeout),
            hedge: opts.hedge,
            stats,
        })
    }

    /// The target's credentials were refused and getting new ones fails
    /// for now, for a reason that passes (see [`TargetAuth`]).
    fn renewal_failing(&self) -> bool {
        match &self.address {
            Address::Target(t) => t.auth().is_some_and(|a| a.renewal_failing),
            Address::Fixed(_) => false,
        }
    }

    /// Check the validator of a response against the one we opened with.
    fn check_validator(&self, headers: &HeaderMap) -> Result<()> {
        let name = match self.validator_source {
            ValidatorSource::ETag => ETAG,
            ValidatorSource::LastModified => LAST_MODIFIED,
            ValidatorSource::None => return Ok(()),
        };
        // A missing validator on one response tells nothing; a different one
        // proves the object changed.
        if let Some(got) = header_str(headers, name.clone()) {
            if Some(&got) != self.identity.validator.as_ref() {
                return Err(Error::new(
                    ErrorKind::OriginChanged,
                    format!(
                        "{}: {name} changed from {} to {got}",
                        self.identity.locator,
                        self.identity.validator.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One attempt at one range.
    async fn fetch_once(&self, range: ByteRange) -> Result<Bytes> {
        let ctx = || format!("GET {} {range}", self.identity.locator);
        let started = std::time::Instant::now();
        let last = range.end() - 1;
        Stats::add(&self.stats.origin_requests, 1);
        let if_match = match (
            self.if_match,
            self.validator_source,
            &self.identity.validator,
        ) {
            (true, ValidatorSource::ETag, Some(etag)) => Some(etag.as_str()),
            _ => None,
        };
        let extra = |r: reqwest::RequestBuilder| {
            let r = r.header(RANGE, format!("bytes={}-{last}", range.offset));
            match if_match {
                Some(e) => r.header(IF_MATCH, e),
                None => r,
            }
        };
        let stall = self.stall;
        let mut resp = send(
            &self.client,
            &self.address,
            &self.headers,
            "",
            extra,
            |req| within(stall, ctx, send_one(req, timeout_or_origin, ctx)),
        )
        .await?;
        let status = resp.status();
        if status != StatusCode::PARTIAL_CONTENT {
            // 200 would be the whole object: never read it.
            let kind = match status {
                StatusCode::OK => ErrorKind::OriginChanged,
                StatusCode::RANGE_NOT_SATISFIABLE | StatusCode::NOT_FOUND | StatusCode::GONE => {
                    ErrorKind::OriginChanged
                }
                // Only sent with If-Match: the ETag is no longer the object's.
                StatusCode::PRECONDITION_FAILED => ErrorKind::OriginChanged,
                s if transient(s) => ErrorKind::Origin,
                // The token expired and its service cannot give a new one
                // for now (down, restarting): retried until it can.
                StatusCode::UNAUTHORIZED if self.renewal_failing() => ErrorKind::Origin,
                // 401/403 and friends: retrying will not change the answer.
                _ => ErrorKind::OriginRefused,
            };
            let why = match (status, &self.address) {
                (StatusCode::OK, _) => {
                    " (the whole object: the origin no longer honours Range)".to_string()
                }
                (StatusCode::PRECONDITION_FAILED, _) => {
                    " (If-Match: the object is no longer the one opened)".to_string()
                }
                (s, Address::Target(t)) => {
                    let headers = resp.headers().clone();
                    match t.explain(s, &headers, &refusal_body(resp).await) {
                        Some(w) => format!(": {w}"),
                        None => String::new(),
                    }
                }
                _ => String::new(),
            };
            return Err(Error::new(kind, format!("{}: HTTP {status}{why}", ctx())));
        }
        self.check_validator(resp.headers())?;
        let cr = header_str(resp.headers(), CONTENT_RANGE).unwrap_or_default();
        match parse_content_range(&cr) {
            Some((s, e, total)) if s == range.offset && e == last => {
                if let Some(t) = total {
                    if t != self.identity.size {
                        return Err(Error::new(
                            ErrorKind::OriginChanged,
                            format!("{}: size changed from {} to {t}", ctx(), self.identity.size),
                        ));
                    }
                }
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("{}: Content-Range {cr:?} does not match the request", ctx()),
                ))
            }
        }
        let want = range.len as usize;
        let mut buf = BytesMut::with_capacity(want);
        let body = || format!("{}: reading body", ctx());
        while let Some(chunk) = within(stall, body, async {
            resp.chunk().await.map_err(|e| {
                let kind = if e.is_timeout() {
                    ErrorKind::TimedOut
                } else {
                    ErrorKind::Origin
                };
                Error::with_source(kind, body(), no_url(e))
            })
        })
        .await?
        {
            if buf.len() + chunk.len() > want {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("{}: body longer than the {want} bytes asked", ctx()),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() != want {
            return Err(Error::new(
                ErrorKind::Origin,
                format!("{}: body has {} bytes, expected {want}", ctx(), buf.len()),
            ));
        }
        Stats::add(&self.stats.origin_bytes, want as u64);
        self.stats.origin_latency.record(started.elapsed());
        Ok(buf.freeze())
    }
}

impl Origin for HttpOrigin {
    fn identity(&self) -> &OriginIdentity {
        &self.identity
    }

    fn reload(&self) -> Result<bool> {
        let h = self.headers.reload()?;
        let t = match &self.address {
            Address::Target(t) => t.reload()?,
            Address::Fixed(_) => false,
        };
        Ok(h || t)
    }

    fn connections(&self) -> usize {
        self.connections
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let shown = self.address.shown(suffix);
        let suffix = suffix.to_string();
        Box::pin(async move {
            let what = || format!("GET {shown}");
            let mut resp = send(
                &self.client,
                &self.address,
                &self.headers,
                &suffix,
                |r| r,
                |req| send_one(req, |_| ErrorKind::Origin, what),
            )
            .await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE => {
                    return Ok(None)
                }
                s => {
                    return Err(Error::new(
                        ErrorKind::Origin,
                        format!("GET {shown}: HTTP {s}"),
                    ))
                }
            }
            match body_within(&mut resp, max).await {
                Ok(Some(body)) => Ok(Some(body)),
                Ok(None) => Err(Error::new(
                    ErrorKind::Origin,
                    format!("GET {shown}: larger than {max} bytes"),
                )),
                Err(e) => Err(Error::with_source(ErrorKind::Origin, what(), no_url(e))),
            }
        })
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        debug_assert!(!range.is_empty() && range.within(self.identity.size));
        Box::pin(async move {
            let _permit = self
                .limit
                .acquire()
                .await
                .map_err(|_| Error::new(ErrorKind::Shutdown, "origin closed"))?;
            let started = Instant::now();
            let deadline = started + self.deadline;
            let mut attempt = 0u32;
            loop {
                // The last attempt, right at the deadline, still gets a
                // moment to be answered.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(200));
                let res = match tokio::time::timeout(left, self.fetch_hedged(range)).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "GET {} {range}: no answer within the origin deadline ({} s)",
                            self.identity.locator,
                            self.deadline.as_secs_f64()
                        ),
                    )),
                };
                let e = match res {
                    Ok(b) => return Ok(b),
                    Err(e) => e,
                };
                Stats::add(&self.stats.origin_errors, 1);
                let retryable = matches!(e.kind(), ErrorKind::Origin | ErrorKind::TimedOut);
                // Exponential backoff with jitter: 50 ms, 100 ms, ... 2 s.
                let base = (50u64 << attempt.min(6)).min(2000);
                let wait = Duration::from_millis(base / 2 + crate::util::jitter(base));
                let now = Instant::now();
                if !retryable || attempt >= self.retries || now >= deadline {
                    if attempt == 0 {
                        return Err(e);
                    }
                    return Err(e.context_prefix(format!(
                        "after {} attempts in {:.1} s",
                        attempt + 1,
                        started.elapsed().as_secs_f64()
                    )));
                }
                tracing::warn!(error = %e, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                    "origin request failed, retrying");
                tokio::time::sleep(wait.min(deadline - now)).await;
                attempt += 1;
            }
        })
    }
}

/// The slowest transfer rate (bytes/s) automatic hedging expects of a
/// healthy origin on a busy link: 100 Mbit/s, a tenth of a shared 1 Gbit/s.
const HEDGE_FLOOR_RATE: f64 = 12.5e6;

impl HttpOrigin {
    /// The hedge delay now for a request of `len` bytes, if hedging.
    ///
    /// Automatic hedging waits twice the recent p95 latency plus the time
    /// the body takes at [`HEDGE_FLOOR_RATE`]: the p95 is mostly that of
    /// small requests, and a large one on a busy link is slow because the
    /// link is, where a twin only adds to the load (and fetches its bytes
    /// twice). A stalled large request is still hedged, a little later.
    fn hedge_delay(&self, len: u64) -> Option<Duration> {
        match self.hedge {
            Hedge::Off => None,
            Hedge::After(d) => Some(d),
            Hedge::Auto => {
                let p95 = self.stats.origin_latency.quantile(0.95, 32)?;
                let body = Duration::from_secs_f64(len as f64 / HEDGE_FLOOR_RATE);
                Some((p95 * 2).max(Duration::from_millis(50)) + body)
            }
        }
    }

    /// One attempt, with a twin sent if it is slow and a connection is
    /// free; the first correct answer wins, the other is dropped.
    async fn fetch_hedged(&self, range: ByteRange) -> Result<Bytes> {
        let Some(delay) = self.hedge_delay(range.len) else {
            return self.fetch_once(range).await;
        };
        let first = self.fetch_once(range);
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return r,
            _ = tokio::time::sleep(delay) => {}
        }
        let Ok(_extra) = self.limit.try_acquire() else {
            return first.await; // every connection busy: a twin would queue
        };
        Stats::add(&self.stats.origin_hedges, 1);
        tracing::debug!(%range, delay_ms = delay.as_millis() as u64, "origin request slow: hedging");
        let second = self.fetch_once(range);
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => match r {
                Ok(b) => Ok(b),
                Err(_) => second.await,
            },
            r = &mut second => match r {
                Ok(b) => Ok(b),
                Err(_) => first.await,
            },
        }
    }
}

/// A small HTTP/1.1 server for the tests of origins that are HTTP
/// underneath (fixed URLs, Swift, Keystone): every request is answered by a
/// function of it, on 127.0.0.1, port 0.
#[cfg(test)]
pub(super) mod fake {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    pub(crate) struct Request {
        pub(crate) method: String,
        /// Path and query.
        pub(crate) target: String,
        /// Names in lower case.
        pub(crate) headers: Vec<(String, String)>,
        pub(crate) body: Vec<u8>,
    }

    impl Request {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            let name = name.to_ascii_lowercase();
            self.headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    pub(crate) struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// Send the head, then nothing for this long, then the body.
        stall: Option<Duration>,
    }

    impl Reply {
        pub(crate) fn status(status: u16) -> Reply {
            Reply {
                status,
                headers: Vec::new(),
                body: Vec::new(),
                stall: None,
            }
        }

        pub(crate) fn header(mut self, name: &str, value: &str) -> Reply {
            self.headers.push((name.into(), value.into()));
            self
        }

        pub(crate) fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
            self.body = body.into();
            self
        }

        pub(crate) fn stall_body(mut self, d: Duration) -> Reply {
            self.stall = Some(d);
            self
        }

        /// `data`'s range asked by `req` (206, ETag "e1"), or all of it.
        pub(crate) fn ranged(data: &[u8], req: &Request) -> Reply {
            let range = req.header("range").and_then(|r| {
                let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
                Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
            });
            match range {
                Some((a, b)) if a <= b && b < data.len() => Reply::status(206)
                    .header("content-range", &format!("bytes {a}-{b}/{}", data.len()))
                    .header("etag", "\"e1\"")
                    .body(&data[a..=b]),
                _ => Reply::status(200).body(data),
            }
        }
    }

    /// Serve `answer` until the test ends; returns `http://127.0.0.1:PORT`.
    pub(crate) async fn serve<F, Fut>(answer: F) -> String
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let _ = connection(s, &*answer).await;
                });
            }
        });
        base
    }

    async fn connection<F, Fut>(s: TcpStream, answer: &F) -> std::io::Result<()>
    where
        F: Fn(Request) -> Fut,
        Fut: Future<Output = Reply>,
    {
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let mut words = line.split_whitespace();
            let method = words.next().unwrap_or("").to_string();
            let target = words.next().unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).await?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((n, v)) = h.split_once(':') {
                    headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            r.read_exact(&mut body).await?;
            let reply = answer(Request {
                method,
                target,
                headers,
                body,
            })
            .await;
            let mut head = format!(
                "HTTP/1.1 {} Fake\r\ncontent-length: {}\r\n",
                reply.status,
                reply.body.len()
            );
            for (n, v) in &reply.headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let w = r.get_mut();
            w.write_all(head.as_bytes()).await?;
            if let Some(d) = reply.stall {
                w.flush().await?;
                tokio::time::sleep(d).await;
            }
            w.write_all(&reply.body).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some((0, 0, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        assert_eq!(parse_content_range("bytes 5-4/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }

    fn quick() -> OriginOptions {
        OriginOptions {
            hedge: Hedge::Off,
            deadline: Duration::from_secs(2),
            ..OriginOptions::default()
        }
    }

    /// An extra header (a token) must not go along a redirect to another
    /// origin: the probe's final URL would then get it with every read.
    /// Within the origin, and without extra headers, redirects are
    /// followed (a public image behind a CDN's redirect).
    #[tokio::test]
    async fn extra_headers_never_follow_a_redirect_to_another_origin() {
        use std::sync::Mutex;
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let (d, cdn_seen) = (data.clone(), Arc::new(Mutex::new(Vec::new())));
        let seen = cdn_seen.clone();
        let cdn = fake::serve(move |req| {
            seen.lock()
                .unwrap()
                .push(req.header("x-auth-token").map(str::to_owned));
            let reply = fake::Reply::ranged(&d, &req);
            async move { reply }
        })
        .await;
        let (d, to_cdn) = (data.clone(), format!("{cdn}/image.raw"));
        let origin = fake::serve(move |req| {
            let reply = match req.target.as_str() {
                "/same.img" => fake::Reply::status(302).header("location", "/image.raw"),
                "/image.raw" => fake::Reply::ranged(&d, &req),
                _ => fake::Reply::status(302).header("location", &to_cdn),
            };
            async move { reply }
        })
        .await;
        let stats = Arc::new(Stats::default());
        let mut secret = quick();
        secret.headers.fixed = vec![("X-Auth-Token".into(), "s3cret".into())];

        let e = HttpOrigin::open(
            &format!("{origin}/cdn.img?token=qs3cret"),
            &secret,
            stats.clone(),
        )
        .await
        .err()
        .expect("a redirect to another origin with a token header is refused");
        let shown = e.to_string();
        assert_eq!(e.kind(), ErrorKind::OriginRefused, "{shown}");
        assert!(
            shown.contains(&format!("redirect from {origin}/cdn.img?token=…"))
                && shown.contains(&format!("to {cdn}/image.raw refused"))
                && shown.contains("extra headers"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(cdn_seen.lock().unwrap().is_empty(), "the CDN got a request");

        // Within the origin: followed, header and all.
        let o = HttpOrigin::open(&format!("{origin}/same.img"), &secret, stats.clone())
            .await
            .unwrap();
        assert_eq!(o.identity().size, 4096);
        let r = ByteRange::new(100, 200).unwrap();
        assert_eq!(&o.read_range(r).await.unwrap()[..], &data[100..300]);

        // No extra headers: the CDN's redirect is followed as before.
        let o = HttpOrigin::open(&format!("{origin}/cdn.img"), &quick(), stats)
            .await
            .unwrap();
        assert_eq!(&o.read_range(r).await.unwrap()[..], &data[100..300]);
        assert!(cdn_seen.lock().unwrap().iter().all(Option::is_none));
    }

    #[test]
    fn which_redirects_leave_the_origin() {
        let u = |s: &str| Url::parse(s).unwrap();
        for (from, to) in [
            ("http://h/a", "http://h/b?x=1"),
            ("http://h/a", "http://H:80/b"),
            ("https://h:8443/a", "https://h:8443/b"),
        ] {
            assert_eq!(leaves_origin(&u(from), &u(to)), None, "{from} -> {to}");
        }
        for (from, to, why) in [
            ("https://h/a", "http://h/a", "from https to plain http"),
            (
                "https://h:8443/a",
                "http://h:8443/a",
                "from https to plain http",
            ),
            ("http://h/a", "https://h/a", "another origin"),
            ("https://h/a", "https://h:8443/a", "another origin"),
            ("https://h/a", "https://g/a", "another origin"),
        ] {
            let e = leaves_origin(&u(from), &u(to)).expect("refused");
            assert!(e.contains(why) && e.contains(from) && e.contains(to), "{e}");
        }
        let e = leaves_origin(
            &u("https://user:pw@h/a?sig=SECRET1"),
            &u("https://g/b?X-Amz-Signature=SECRET2"),
        )
        .unwrap();
        assert!(!e.contains("SECRET") && !e.contains("pw"), "{e}");
    }

    /// A target renewing its credentials after a 401, slower than the
    /// stall bound of a block read: the renewal is waited for, not counted
    /// as silence of the data request (which cancelled it on every try).
    #[tokio::test]
    async fn a_slow_renewal_is_not_cut_by_the_stall_bound() {
        use std::sync::atomic::{AtomicU64, Ordering};
        struct Slow {
            base: String,
            generation: AtomicU64,
            renewals: AtomicU64,
        }
        impl Target for Slow {
            fn url(&self, _suffix: &str) -> Url {
                Url::parse(&format!("{}/o", self.base)).unwrap()
            }
            fn locator(&self) -> String {
                "test://o".into()
            }
            fn auth(&self) -> Option<TargetAuth> {
                let g = self.generation.load(Ordering::SeqCst);
                let mut headers = HeaderMap::new();
                headers.insert("x-auth-token", format!("t{g}").parse().unwrap());
                Some(TargetAuth {
                    headers,
                    generation: g,
                    renewal_failing: false,
                })
            }
            fn unauthorized(&self, generation: u64) -> BoxFuture<'_, bool> {
                Box::pin(async move {
                    self.renewals.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    let _ = self.generation.compare_exchange(
                        generation,
                        generation + 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                    true
                })
            }
        }
        let data = vec![5u8; 1000];
        // Token t0 is good for the probe only; t1 and later for reads.
        let base = fake::serve(move |req| {
            let ok = match req.header("x-auth-token") {
                Some("t0") => req.header("range") == Some("bytes=0-0"),
                Some(_) => true,
                None => false,
            };
            let reply = if ok {
                fake::Reply::ranged(&data, &req)
            } else {
                fake::Reply::status(401)
            };
            async move { reply }
        })
        .await;
        let target = Arc::new(Slow {
            base,
            generation: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
        });
        let opts = OriginOptions {
            deadline: Duration::from_secs(3),
            ..quick()
        };
        let mut o = HttpOrigin::open_target(target.clone(), &opts, Arc::new(Stats::default()))
            .await
            .unwrap();
        o.stall = Duration::from_millis(250);
        let got = o.read_range(ByteRange::new(10, 20).unwrap()).await;
        assert_eq!(&got.unwrap()[..], &[5u8; 20][..]);
        assert_eq!(target.renewals.load(Ordering::SeqCst), 1);
    }

    /// The log names the proxy reqwest (hyper-util's matcher) picks: the
    /// UPPER-case variable first, the first one set counting even when
    /// empty, `ALL_PROXY` when that gives none usable, nothing under CGI.
    #[test]
    fn the_proxy_logged_is_the_one_reqwest_uses() {
        fn pick(scheme: &str, vars: &[(&str, &str)]) -> Option<(&'static str, String)> {
            env_proxy(scheme, &|n| {
                vars.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            })
        }
        let both = [
            ("http_proxy", "http://lower:1"),
            ("HTTP_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("HTTPS_PROXY", "http://upper:2"),
        ];
        assert_eq!(
            pick("http", &both),
            Some(("HTTP_PROXY", "http://upper:1".into()))
        );
        assert_eq!(
            pick("https", &both),
            Some(("HTTPS_PROXY", "http://upper:2".into()))
        );
        assert_eq!(
            pick("https", &[("https_proxy", "http://lower:2")]),
            Some(("https_proxy", "http://lower:2".into()))
        );
        // Set but empty hides the lower-case one.
        let vars = [
            ("HTTP_PROXY", ""),
            ("http_proxy", "http://lower:1"),
            ("all_proxy", "http://all:1"),
        ];
        assert_eq!(
            pick("http", &vars),
            Some(("all_proxy", "http://all:1".into()))
        );
        assert_eq!(pick("http", &vars[..2]), None);
        // A value reqwest cannot use falls back to ALL_PROXY.
        let vars = [
            ("HTTPS_PROXY", "ftp://x:1"),
            ("ALL_PROXY", "socks5://s:1080"),
        ];
        assert_eq!(
            pick("https", &vars),
            Some(("ALL_PROXY", "socks5://s:1080".into()))
        );
        assert_eq!(
            pick("https", &[("HTTPS_PROXY", "u:pw@p:3128")]),
            Some(("HTTPS_PROXY", "u:pw@p:3128".into()))
        );
        // CGI: the environment's proxies are not used at all.
        assert_eq!(
            pick(
                "http",
                &[("REQUEST_METHOD", "GET"), ("HTTP_PROXY", "http://p:1")]
            ),
            None
        );
        assert_eq!(pick("http", &[("HTTPS_PROXY", "http://p:1")]), None);
    }

    #[test]
    fn redaction() {
        let u = Url::parse("https://user:secret@h.example/x.img?X-Amz-Signature=abc").unwrap();
        let r = redact(&u);
        assert!(!r.contains("secret") && !r.contains("abc"), "{r}");
        let u = Url::parse(
            "https://h/x.img?id=7&X-Amz-Credential=AKID%2F1&X-Amz-Date=20261124T000000Z\
             &X-Amz-Signature=abc&sig=s1&token=t1&X-Amz-Security-Token=t2",
        )
        .unwrap();
        assert_eq!(
            redact(&u),
            "https://h/x.img?id=7&X-Amz-Credential=…&X-Amz-Date=20261124T000000Z\
             &X-Amz-Signature=…&sig=…&token=…&X-Amz-Security-Token=…"
        );
        // Every X-Amz-* value but the harmless four is hidden, whatever
        // its name says.
        let u = Url::parse(
            "https://h/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-expires=300\
             &X-Amz-SignedHeaders=host&X-Amz-Server-Side-Encryption-Customer-Algorithm=AES256\
             &X-Amz-Whatever=w&x-amz-security-token=t",
        )
        .unwrap();
        assert_eq!(
            redact(&u),
            "https://h/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-expires=300\
             &X-Amz-SignedHeaders=host&X-Amz-Server-Side-Encryption-Customer-Algorithm=…\
             &X-Amz-Whatever=…&x-amz-security-token=…"
        );
    }

    /// reqwest puts the URL, query and all, in its error messages; the
    /// origin strips it before an error can reach a log.
    #[tokio::test]
    async fn request_errors_do_not_show_the_url() {
        let e = reqwest::Client::new()
            .get("http://127.0.0.1:1/k?X-Amz-Signature=SIG&X-Amz-Security-Token=TOKEN")
            .send()
            .await
            .unwrap_err();
        assert!(format!("{e}").contains("TOKEN"), "reqwest changed: {e}");
        let e = Error::with_source(ErrorKind::Origin, "GET s3://b/k", no_url(e));
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("TOKEN") && !shown.contains("SIG"),
            "{shown}"
        );
    }

    fn loc(s: &str) -> String {
        locator(&Url::parse(s).unwrap())
    }

    #[test]
    fn the_query_is_identity_but_signatures_are_not() {
        // Unchanged for URLs without a query (their caches stay valid).
        assert_eq!(loc("http://u:p@h:81/a/x.img"), "http://h:81/a/x.img");
        assert_eq!(loc("http://h/get?id=1"), "http://h/get?id=1");
        assert_ne!(loc("http://h/get?id=1"), loc("http://h/get?id=2"));
        // Signing parameters are not identity: a re-signed URL is the same
        // image, and an S3 presigned URL names the object itself.
        let s3 = |date: &str, sig: &str| {
            loc(&format!(
                "https://b.s3.example/k.img?versionId=3&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKID%2F20261124%2Fus-east-1%2Fs3%2Faws4_request\
                 &X-Amz-Date={date}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host\
                 &X-Amz-Signature={sig}"
            ))
        };
        assert_eq!(s3("20261124T000000Z", "aa"), s3("20261124T010000Z", "bb"));
        assert_eq!(s3("d", "s"), "https://b.s3.example/k.img?versionId=3");
        assert_eq!(
            loc("https://h/v1/AUTH_a/c/o?temp_url_sig=x&temp_url_expires=1"),
            "https://h/v1/AUTH_a/c/o"
        );
        assert_eq!(
            loc("https://h/o?Signature=x&Expires=1&AWSAccessKeyId=AKID"),
            "https://h/o"
        );
        assert_eq!(loc("https://h/o?x-amz-signature=x"), "https://h/o");
        // Other secrets are identity, hidden and hashed in.
        let a = loc("http://h/get?id=1&token=SECRET1");
        let b = loc("http://h/get?id=1&token=SECRET2");
        assert_ne!(a, b);
        for l in [&a, &b] {
            assert!(!l.contains("SECRET"), "{l}");
            assert!(
                l.starts_with("http://h/get?id=1&token=… [query sha256 "),
                "{l}"
            );
        }
        assert_eq!(a, loc("http://h/get?id=1&token=SECRET1&X-Amz-Signature=z"));
        // The order of parameters is kept: reordering may be another
        // object to some server, and costs at worst a second cache.
        assert_ne!(loc("http://h/g?a=1&b=2"), loc("http://h/g?b=2&a=1"));
    }
}

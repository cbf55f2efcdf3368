//! OpenStack Swift origins: `swift://CONTAINER/OBJECT`, authenticated the
//! way python-swiftclient is, from the environment (`openstack.rs`:
//! `OS_STORAGE_URL` + `OS_AUTH_TOKEN`, `ST_AUTH`/`ST_USER`/`ST_KEY`, or
//! Keystone v3 with the storage URL from the catalog).
//!
//! Every GET carries `X-Auth-Token` and goes through `http.rs`'s checks
//! (206, Content-Range, size, ETag with `If-Match`, body length). Tokens
//! expire (Keystone: an hour by default): a 401 makes one request for a new
//! token, shared by every request that got the 401, and the request is
//! sent again. Tokens and keys are never logged or put on a command line.

use std::sync::Arc;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

use super::http::{self, HttpOrigin, Target, TargetAuth};
use super::openstack::{Auth, Tokens, SWIFT};
use super::{Origin, OriginIdentity, OriginOptions};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

/// `swift://CONTAINER/OBJECT`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwiftUrl {
    pub container: String,
    /// May hold `/` (pseudo-directories).
    pub object: String,
}

impl SwiftUrl {
    pub fn parse(spec: &str) -> Result<SwiftUrl> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("origin {spec:?}: {why} (use swift://CONTAINER/OBJECT)"),
            )
        };
        let rest = spec
            .get(..8)
            .filter(|p| p.eq_ignore_ascii_case("swift://"))
            .map(|_| &spec[8..])
            .ok_or_else(|| bad("not a swift:// URL"))?;
        let (container, object) = rest.split_once('/').unwrap_or((rest, ""));
        let container = crate::util::percent_decode(container)
            .ok_or_else(|| bad("bad %-escape in the container"))?;
        let object =
            crate::util::percent_decode(object).ok_or_else(|| bad("bad %-escape in the object"))?;
        if container.is_empty() {
            return Err(bad("no container"));
        }
        // `url` silently drops a "." or ".." segment it is asked to push,
        // so the request would name another path of the account; and a
        // '/' would be sent as %2F in one segment, which Swift's container
        // names cannot hold.
        if container == "." || container == ".." {
            return Err(bad(
                "a container named '.' or '..' cannot be addressed in a URL",
            ));
        }
        if container.contains('/') {
            return Err(bad(
                "a container name cannot hold '/' (the first '/' ends the container)",
            ));
        }
        if object.is_empty() {
            return Err(bad("no object: name the object, not only its container"));
        }
        if object.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("'.' and '..' segments cannot be addressed in a URL"));
        }
        Ok(SwiftUrl { container, object })
    }

    pub fn locator(&self) -> String {
        format!("swift://{}/{}", self.container, self.object)
    }

    /// The object's URL under `storage` (the account URL).
    fn url(&self, storage: &Url, suffix: &str) -> Url {
        let mut u = storage.clone();
        {
            let Ok(mut seg) = u.path_segments_mut() else {
                // Checked when the storage URL was taken (http/https).
                return u;
            };
            seg.pop_if_empty().push(&self.container);
            let object = format!("{}{suffix}", self.object);
            for s in object.split('/') {
                seg.push(s);
            }
        }
        u
    }
}

/// The locator of a `swift://` spec without opening it.
pub fn locator(spec: &str) -> Option<String> {
    SwiftUrl::parse(spec).ok().map(|u| u.locator())
}

struct SwiftTarget {
    obj: SwiftUrl,
    tokens: Tokens,
}

impl Target for SwiftTarget {
    fn url(&self, suffix: &str) -> Url {
        self.obj.url(&self.tokens.endpoint(), suffix)
    }

    fn locator(&self) -> String {
        self.obj.locator()
    }

    fn auth(&self) -> Option<TargetAuth> {
        self.tokens.auth()
    }

    fn unauthorized(&self, generation: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.tokens.renew(generation, &self.obj.locator()).await })
    }

    fn explain(&self, status: StatusCode, _headers: &HeaderMap, _body: &str) -> Option<String> {
        let o = &self.obj;
        match status {
            StatusCode::UNAUTHORIZED => Some(self.tokens.refused("Swift")),
            StatusCode::FORBIDDEN => Some(format!(
                "the account may not read container {:?} (its read ACL), authenticated by {}",
                o.container,
                self.tokens.describe()
            )),
            StatusCode::NOT_FOUND => Some(format!(
                "no object {:?} in container {:?} of account {}",
                o.object,
                o.container,
                self.tokens.endpoint()
            )),
            _ => None,
        }
    }
}

/// A Swift object as origin: an [`HttpOrigin`] whose requests
/// [`SwiftTarget`] addresses and authenticates.
pub struct SwiftOrigin {
    http: HttpOrigin,
    /// The account's storage URL when the origin was opened.
    storage: Url,
}

impl SwiftOrigin {
    pub async fn open(spec: &str, opts: &OriginOptions, stats: Arc<Stats>) -> Result<Self> {
        Self::open_object(SwiftUrl::parse(spec)?, opts, stats).await
    }

    /// The object `obj` (a Glance image's Swift location).
    pub async fn open_object(
        obj: SwiftUrl,
        opts: &OriginOptions,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let auth = Auth::from_env(&|n| std::env::var(n).ok().filter(|v| !v.is_empty()), &SWIFT)
            .map_err(|e| e.context_prefix(obj.locator()))?;
        // No redirects: a password or key must never follow one elsewhere.
        let client = http::client(opts, auth.scheme(), &obj.locator(), false)?;
        let tokens = Tokens::start(auth, client, true)
            .await
            .map_err(|e| e.context_prefix(obj.locator()))?;
        tracing::info!(origin = %obj.locator(), storage = %tokens.endpoint(), auth = %tokens.describe(), "Swift origin");
        let storage = tokens.endpoint();
        let target = SwiftTarget { obj, tokens };
        let http = HttpOrigin::open_target(Arc::new(target), opts, stats).await?;
        Ok(SwiftOrigin { http, storage })
    }

    /// The account's storage URL (`…/v1/AUTH_x`).
    pub fn storage(&self) -> &Url {
        &self.storage
    }
}

impl Origin for SwiftOrigin {
    fn identity(&self) -> &OriginIdentity {
        self.http.identity()
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<bytes::Bytes>> {
        self.http.read_range(range)
    }

    fn connections(&self) -> usize {
        self.http.connections()
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<bytes::Bytes>>> {
        self.http.sidecar(suffix, max)
    }

    fn reload(&self) -> Result<bool> {
        self.http.reload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::aws::Secret;
    use crate::origin::http::fake::{self, Reply};
    use crate::origin::Hedge;
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
    use std::time::Duration;

    /// Swift's token expires while its auth service is down (a Keystone
    /// restart): reads are retried until the deadline, not refused. When the
    /// service refuses the credentials instead, the read fails at once and
    /// says so; once it answers again, reads go on with a new token.
    #[tokio::test]
    async fn an_expired_token_while_auth_is_down_is_retried() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let expired = Arc::new(AtomicBool::new(false));
        let gets = Arc::new(AtomicU64::new(0));
        let (d, ex, g) = (data.clone(), expired.clone(), gets.clone());
        let swift = fake::serve(move |req| {
            g.fetch_add(1, Ordering::SeqCst);
            let ok = match req.header("x-auth-token") {
                Some("t0") => !ex.load(Ordering::SeqCst),
                Some(t) => t.starts_with('t'),
                None => false,
            };
            let reply = if ok && req.target == "/v1/AUTH_t/c/o" {
                Reply::ranged(&d, &req)
            } else {
                Reply::status(401)
            };
            async move { reply }
        })
        .await;
        let asked = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let (a, st, storage) = (asked.clone(), status.clone(), format!("{swift}/v1/AUTH_t"));
        let auth = fake::serve(move |_| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            let s = if n == 0 {
                200
            } else {
                st.load(Ordering::SeqCst)
            };
            let reply = match s {
                200 => Reply::status(200)
                    .header("x-storage-url", &storage)
                    .header("x-auth-token", &format!("t{n}")),
                s => Reply::status(s),
            };
            async move { reply }
        })
        .await;
        let opts = OriginOptions {
            hedge: Hedge::Off,
            deadline: Duration::from_millis(1500),
            ..OriginOptions::default()
        };
        let v1 = Auth::V1 {
            url: Url::parse(&format!("{auth}/auth/v1.0")).unwrap(),
            user: "test:tester".into(),
            key: Secret::new("k"),
        };
        let client = http::client(&opts, "http", "test", false).unwrap();
        let target = Arc::new(SwiftTarget {
            obj: SwiftUrl::parse("swift://c/o").unwrap(),
            tokens: Tokens::start(v1, client, true).await.unwrap(),
        });
        let o = HttpOrigin::open_target(target.clone(), &opts, Arc::new(Stats::default()))
            .await
            .unwrap();
        let r = ByteRange::new(0, 4096).unwrap();

        expired.store(true, Ordering::SeqCst);
        status.store(503, Ordering::SeqCst);
        let before = gets.load(Ordering::SeqCst);
        let e = o.read_range(r).await.unwrap_err();
        let shown = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Origin, "{shown}");
        assert!(
            shown.starts_with("after ") && shown.contains("HTTP 503") && shown.contains("for now"),
            "{shown}"
        );
        assert!(gets.load(Ordering::SeqCst) - before > 2, "retried");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "auth asked once in the backoff"
        );

        status.store(401, Ordering::SeqCst);
        target.tokens.age_failure(Duration::from_secs(60));
        let e = o.read_range(r).await.unwrap_err();
        let shown = e.to_string();
        assert_eq!(e.kind(), ErrorKind::OriginRefused, "{shown}");
        assert!(
            !shown.starts_with("after ") && shown.contains("credentials were refused"),
            "{shown}"
        );

        status.store(200, Ordering::SeqCst);
        target.tokens.age_failure(Duration::from_secs(60));
        assert_eq!(&o.read_range(r).await.unwrap()[..], &data[..4096]);
    }

    #[test]
    fn swift_urls() {
        let u = SwiftUrl::parse("swift://images/debian/12 %2B.raw").unwrap();
        assert_eq!(
            (u.container.as_str(), u.object.as_str()),
            ("images", "debian/12 +.raw")
        );
        let storage = Url::parse("http://127.0.0.1:8080/v1/AUTH_test/").unwrap();
        assert_eq!(
            u.url(&storage, ".lazybd-profile").as_str(),
            "http://127.0.0.1:8080/v1/AUTH_test/images/debian/12%20+.raw.lazybd-profile"
        );
        assert_eq!(u.locator(), "swift://images/debian/12 +.raw");
        for bad in [
            "swift://",
            "swift://c",
            "swift://c/",
            "swift://c/a/../b",
            "swift://c/./o",
            "s3://c/o",
        ] {
            assert!(SwiftUrl::parse(bad).is_err(), "{bad}");
        }
        // The container too: '.', '..' and an escaped '/' would all name
        // another container's (or the account's) object.
        for (bad, why) in [
            ("swift://./o", "'.' or '..'"),
            ("swift://../o", "'.' or '..'"),
            ("swift://%2E%2E/o", "'.' or '..'"),
            ("swift://a%2Fb/o", "cannot hold '/'"),
        ] {
            let e = SwiftUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}

//! S3 origin: `s3://BUCKET/KEY`, read through the HTTP origin with a URL
//! presigned (AWS Signature V4, `rusty-s3`) for every request.
//!
//! ```text
//! s3://images/debian/12.raw    credentials, region, endpoint: aws.rs
//!   |                          (flag > [s3] config > AWS env/files > default)
//!   v
//! S3Target::url("")   GET https://images.s3.eu-west-1.amazonaws.com/debian/12.raw
//!                         ?X-Amz-Algorithm=...&X-Amz-Expires=300&X-Amz-Signature=...
//!                     (custom endpoints path-style: http://127.0.0.1:8333/images/debian/12.raw?...)
//!   |
//!   v
//! HttpOrigin          the probe (bytes=0-0: size, ETag), every ranged GET with
//!                     If-Match: ETAG and all of http.rs's checks, retries, hedging
//! ```
//!
//! Why presigned URLs through the HTTP origin: every byte from S3 then
//! passes the same checks as from any HTTP server (status, Content-Range,
//! size, ETag, body length), with the same retries, deadline and hedging;
//! an S3 client of its own would be a second, less strict read path.
//! Signing per request (a few HMACs, microseconds against a network round
//! trip) rather than caching a URL: no expiry to track, so a server that
//! runs for months never sends an expired URL, and a retried or hedged
//! request is signed fresh. The URLs are valid for [`PRESIGN_FOR`]: long
//! enough for clock skew, short enough that a leaked one is soon worthless.
//!
//! Identity: the locator `s3://BUCKET/KEY`, the size and the ETag. A
//! replaced object has a new ETag: a new image at start (fresh cache), and
//! 412 (If-Match) or a changed ETag while serving, so EIO, never mixed
//! bytes. The endpoint is not part of the locator: one bucket and key is one
//! image wherever it is reached from (a different object there has its own
//! ETag anyway).
//!
//! Refusals at start are explained from S3's error document: a wrong
//! region (301 `PermanentRedirect`, 400 `AuthorizationHeaderMalformed` /
//! `AuthorizationQueryParametersError`, `x-amz-bucket-region`) names the
//! bucket's region; 403 names the credential source (never a secret); 404
//! tells a missing bucket from a missing key.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::aws::{self, Access, CredentialSource, S3Options};
use super::http::{HttpOrigin, Target};
use super::{Origin, OriginIdentity, OriginOptions};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

/// How long a presigned URL is valid. Each is made just before its request
/// is sent, so this only has to cover the request's start and a clock that
/// is somewhat off: S3 checks it when the request arrives, not while the
/// body streams.
pub const PRESIGN_FOR: Duration = Duration::from_secs(300);

/// `s3://BUCKET/KEY`, checked: a bucket, a key, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// As given, not %-decoded (as AWS tools take `s3://` URLs).
    pub key: String,
}

impl S3Url {
    pub fn parse(spec: &str) -> Result<S3Url> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("origin {spec:?}: {why} (use s3://BUCKET/KEY)"),
            )
        };
        let rest = spec
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("s3://"))
            .map(|_| &spec[5..])
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        if key.is_empty() {
            return Err(bad("no key: name the object, not only its bucket"));
        }
        // S3's rules for new buckets are stricter; S3-compatible servers
        // and old buckets allow more, so only what cannot name one in a
        // host or a path is refused.
        if bucket.len() > 255
            || !bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(bad(&format!(
                "bucket {bucket:?}: letters, digits, '-', '.' and '_' only"
            )));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The locator of the image (see the module docs).
    pub fn locator(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// The locator of an `s3://` spec without opening it.
pub fn locator(spec: &str) -> Option<String> {
    S3Url::parse(spec).ok().map(|u| u.locator())
}

/// Virtual-hosted style (`BUCKET.s3.REGION.amazonaws.com`) on AWS, which
/// is deprecating path style there, except for bucket names a host name
/// or its TLS certificate cannot carry (dots, capitals, '_'); path style
/// (`ENDPOINT/BUCKET`) everywhere else, which every S3 server takes.
fn url_style(access: &Access, bucket: &str) -> UrlStyle {
    let dns_safe = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if access.endpoint.is_aws() && dns_safe {
        UrlStyle::VirtualHost
    } else {
        UrlStyle::Path
    }
}

/// Signs one GET per request.
struct S3Target {
    url: S3Url,
    bucket: Bucket,
    /// What the credentials were resolved from, to resolve them again on
    /// reload (a rotated `~/.aws/credentials`).
    opts: S3Options,
    signing: RwLock<Arc<Signing>>,
}

/// The keys requests are signed with, and where they came from.
struct Signing {
    credentials: Option<Credentials>,
    access: Access,
}

fn credentials(access: &Access) -> Option<Credentials> {
    access.keys.as_ref().map(|k| match &k.session_token {
        Some(t) => {
            Credentials::new_with_token(&k.access_key_id, k.secret_access_key.expose(), t.expose())
        }
        None => Credentials::new(&k.access_key_id, k.secret_access_key.expose()),
    })
}

impl S3Target {
    fn new(url: S3Url, access: Access, opts: S3Options) -> Result<Self> {
        let style = url_style(&access, &url.bucket);
        let bucket = Bucket::new(
            access.endpoint.url().clone(),
            style,
            url.bucket.clone(),
            access.region.as_str().to_string(),
        )
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: endpoint {} ({}): {e:?}",
                    url.locator(),
                    access.endpoint.url(),
                    access.endpoint_from
                ),
            )
        })?;
        let signing = RwLock::new(Arc::new(Signing {
            credentials: credentials(&access),
            access,
        }));
        let target = S3Target {
            url,
            bucket,
            opts,
            signing,
        };
        target.check_key()?;
        Ok(target)
    }

    /// The key must come out of the URL as it went in. A URL joins
    /// `.`/`..` segments away and takes a leading `/` for a host, so such
    /// keys would name another object: refused, once, here.
    fn check_key(&self) -> Result<()> {
        let url = self.bucket.object_url(&self.url.key).ok();
        let base = self.bucket.base_url().path();
        let got = url.as_ref().and_then(|u| {
            let path = u.path().strip_prefix(base)?;
            crate::util::percent_decode(path)
        });
        if url.as_ref().map(Url::host_str) != Some(self.bucket.base_url().host_str())
            || got.as_deref() != Some(self.url.key.as_str())
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: this key cannot be addressed in a URL as it is \
                     ('.' or '..' segments, or a leading '/')",
                    self.url.locator()
                ),
            ));
        }
        Ok(())
    }

    fn signing(&self) -> Arc<Signing> {
        self.signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A GET of `key`, signed now (anonymous: not signed, no `?`).
    fn sign(&self, key: &str) -> Url {
        let mut url = self
            .bucket
            .get_object(self.signing().credentials.as_ref(), key)
            .sign(PRESIGN_FOR);
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// "set AWS_REGION=..., or ..." for the region setting in use.
    fn region_hint(&self, right: &str) -> String {
        format!(
            "the bucket {:?} is in region {right}, not {} (from {}): set AWS_REGION={right}, \
             `region = \"{right}\"` in the config's [s3] section or --s3-region {right}",
            self.url.bucket,
            self.signing().access.region.as_str(),
            self.signing().access.region_from
        )
    }
}

/// The text of the first `<tag>...</tag>` in S3's (flat) error document.
fn xml_field<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..start + len].trim()).filter(|s| !s.is_empty())
}

/// `... expecting 'eu-west-1'` in an AuthorizationHeaderMalformed message.
fn expected_region(message: &str) -> Option<&str> {
    let rest = &message[message.find("expecting '")? + "expecting '".len()..];
    Some(&rest[..rest.find('\'')?])
}

/// At most `max` characters of a server's text, on one line.
fn clip(s: &str, max: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > max {
        format!("{}…", one.chars().take(max).collect::<String>())
    } else {
        one
    }
}

impl Target for S3Target {
    fn url(&self, suffix: &str) -> Url {
        if suffix.is_empty() {
            self.sign(&self.url.key)
        } else {
            self.sign(&format!("{}{suffix}", self.url.key))
        }
    }

    fn locator(&self) -> String {
        self.url.locator()
    }

    /// Resolve the keys again, as at open: a profile's file may hold new
    /// ones. The endpoint and region stay (they address the object).
    fn reload(&self) -> Result<bool> {
        let access = aws::resolve(&self.opts, &aws::process_env)
            .map_err(|e| e.context_prefix(self.url.locator()))?;
        let old = self.signing();
        let fresh = Access {
            endpoint: old.access.endpoint.clone(),
            endpoint_from: old.access.endpoint_from.clone(),
            region: old.access.region.clone(),
            region_from: old.access.region_from.clone(),
            ..access
        };
        tracing::info!(origin = %self.url.locator(), credentials = %fresh.describe_keys(),
            "S3 credentials reloaded");
        *self.signing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Signing {
            credentials: credentials(&fresh),
            access: fresh,
        });
        Ok(true)
    }

    fn explain(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> Option<String> {
        let code = xml_field(body, "Code").unwrap_or("");
        let message = xml_field(body, "Message").unwrap_or("");
        let said = if code.is_empty() {
            format!("HTTP {status}")
        } else if message.is_empty() {
            format!("HTTP {status} {code}")
        } else {
            format!("HTTP {status} {code}: {}", clip(message, 200))
        };
        let loc = self.url.locator();
        let endpoint = format!(
            "{} ({})",
            self.signing().access.endpoint.url(),
            self.signing().access.endpoint_from
        );
        let region = headers
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .or_else(|| xml_field(body, "Region"))
            .or_else(|| expected_region(message))
            .filter(|r| *r != self.signing().access.region.as_str());
        let wrong_region = matches!(
            code,
            "PermanentRedirect"
                | "TemporaryRedirect"
                | "AuthorizationHeaderMalformed"
                | "AuthorizationQueryParametersError"
                | "IllegalLocationConstraintException"
        ) || status.is_redirection();
        if wrong_region {
            return Some(match region {
                Some(r) => format!("{loc}: {} ({said})", self.region_hint(r)),
                None => match xml_field(body, "Endpoint") {
                    Some(e) => format!(
                        "{loc}: the bucket must be reached through {e}, not {endpoint}: \
                         it is in another region than {} ({said})",
                        self.signing().access.region.as_str()
                    ),
                    None => format!("{loc}: {said} from {endpoint}"),
                },
            });
        }
        Some(match (status, code) {
            (StatusCode::NOT_FOUND, "NoSuchBucket") => {
                format!(
                    "{loc}: there is no bucket {:?} at {endpoint} ({said})",
                    self.url.bucket
                )
            }
            (StatusCode::NOT_FOUND, "NoSuchKey") => format!(
                "{loc}: there is no object {:?} in bucket {:?} ({said})",
                self.url.key, self.url.bucket
            ),
            (StatusCode::NOT_FOUND, _) => format!("{loc}: not found at {endpoint} ({said})"),
            (StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED, _) => {
                let hint = match (code, &self.signing().access.source) {
                    (_, CredentialSource::Anonymous) => {
                        "; no credentials were found, so the request was anonymous and the \
                         object is not public: give keys (AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the config's [s3] section)"
                    }
                    ("SignatureDoesNotMatch", _) => "; check the secret access key",
                    ("InvalidAccessKeyId", _) => {
                        "; the endpoint does not know this access key id (another account \
                         or endpoint?)"
                    }
                    ("ExpiredToken" | "TokenRefreshRequired", _) => {
                        "; the session token has expired: get new temporary credentials and \
                         restart"
                    }
                    ("InvalidToken", _) => "; the session token is not valid here",
                    ("RequestTimeTooSkewed", _) => "; this machine's clock is off",
                    _ => "",
                };
                format!(
                    "{loc}: access denied by {endpoint} ({said}) with {}{hint}",
                    self.signing().access.describe_keys()
                )
            }
            _ => format!("{loc}: {said} from {endpoint}"),
        })
    }
}

/// An S3 object as origin: an [`HttpOrigin`] whose requests [`S3Target`]
/// signs. (Its own type, so the HTTP origin's constructor for targets
/// stays private to `origin/`.)
pub struct S3Origin {
    http: HttpOrigin,
}

impl S3Origin {
    pub async fn open(spec: &str, opts: &OriginOptions, stats: Arc<Stats>) -> Result<Self> {
        let url = S3Url::parse(spec)?;
        let access = aws::resolve(&opts.s3, &aws::process_env)
            .map_err(|e| e.context_prefix(url.locator()))?;
        let target = S3Target::new(url, access, opts.s3.clone())?;
        let signing = target.signing();
        let a = &signing.access;
        if a.keys.is_none() {
            tracing::info!(origin = %target.url.locator(),
                "no S3 credentials found (lazybd's [s3] keys or --s3-profile, AWS_ACCESS_KEY_ID, \
                 AWS_PROFILE, ~/.aws/credentials): sending anonymous requests, as for a public bucket");
        }
        tracing::info!(
            origin = %target.url.locator(),
            endpoint = %a.endpoint.url(), endpoint_from = %a.endpoint_from,
            region = a.region.as_str(), region_from = %a.region_from,
            style = if matches!(url_style(a, &target.url.bucket), UrlStyle::Path) { "path" } else { "virtual-hosted" },
            credentials = %a.describe_keys(),
            "S3 origin"
        );
        let http = HttpOrigin::open_target(Arc::new(target), opts, stats).await?;
        Ok(S3Origin { http })
    }
}

impl Origin for S3Origin {
    fn identity(&self) -> &OriginIdentity {
        self.http.identity()
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        self.http.read_range(range)
    }

    fn connections(&self) -> usize {
        self.http.connections()
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        self.http.sidecar(suffix, max)
    }

    fn reload(&self) -> Result<bool> {
        self.http.reload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::aws::{Given, S3Options, Secret, StaticKeys};

    fn access(endpoint: &str, region: &str, keys: Option<(&str, &str, Option<&str>)>) -> Access {
        let opts = S3Options {
            endpoint: (!endpoint.is_empty())
                .then(|| Given::new(endpoint.parse().unwrap(), "--s3-endpoint")),
            region: Some(Given::new(region.parse().unwrap(), "--s3-region")),
            profile: None,
            keys: keys.map(|(id, secret, token)| {
                Given::new(
                    StaticKeys {
                        access_key_id: id.into(),
                        secret_access_key: Secret::new(secret),
                        session_token: token.map(Secret::new),
                    },
                    "config t.toml: s3.access_key_id",
                )
            }),
        };
        aws::resolve(&opts, &|_| None).unwrap()
    }

    fn target(spec: &str, a: Access) -> S3Target {
        S3Target::new(S3Url::parse(spec).unwrap(), a, S3Options::default()).unwrap()
    }

    #[test]
    fn s3_urls() {
        let u = S3Url::parse("s3://bkt/dir/disk image.raw").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("bkt", "dir/disk image.raw")
        );
        assert_eq!(u.locator(), "s3://bkt/dir/disk image.raw");
        assert_eq!(S3Url::parse("S3://b/k").unwrap().locator(), "s3://b/k");
        for (spec, why) in [
            ("s3://", "no bucket"),
            ("s3:///k", "no bucket"),
            ("s3://bkt", "no key"),
            ("s3://bkt/", "no key"),
            ("s3://b:1/k", "bucket \"b:1\""),
            ("s3://u@b/k", "bucket \"u@b\""),
            ("http://b/k", "not an s3:// URL"),
        ] {
            let e = S3Url::parse(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
        assert_eq!(locator("s3://b/k?x").as_deref(), Some("s3://b/k?x"));
        assert_eq!(locator("s3://b"), None);
    }

    /// AWS's documented presigned GET (S3 API reference, "Authenticating
    /// Requests: Using Query Parameters"): our wiring of endpoint, region,
    /// style and key gives exactly its URL. The signing is rusty-s3's.
    #[test]
    fn the_aws_example_presigned_url() {
        let a = access(
            "https://s3.amazonaws.com",
            "us-east-1",
            Some((
                "AKIAIOSFODNN7EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                None,
            )),
        );
        let t = target("s3://examplebucket/test.txt", a);
        let date = time::OffsetDateTime::from_unix_timestamp(1369353600).unwrap();
        let url = t
            .bucket
            .get_object(t.signing().credentials.as_ref(), &t.url.key)
            .sign_with_time(Duration::from_secs(86400), &date);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn addressing_style_and_keys_in_urls() {
        let keys = Some(("AK", "SK", None));
        // A custom endpoint: path style, the key %-encoded below the bucket.
        let t = target(
            "s3://bkt/dir/a b+c%.raw",
            access("http://127.0.0.1:8333", "us-east-1", keys),
        );
        let u = t.url("");
        assert_eq!(u.host_str(), Some("127.0.0.1"));
        assert_eq!(u.path(), "/bkt/dir/a%20b%2Bc%25.raw");
        // A sidecar is the key plus the suffix, signed too.
        let s = t.url(".lazybd-profile");
        assert_eq!(s.path(), "/bkt/dir/a%20b%2Bc%25.raw.lazybd-profile");
        assert!(s.query().unwrap().contains("X-Amz-Signature="));
        // AWS: virtual-hosted, but path style for names a host cannot carry.
        let aws = || access("", "eu-west-1", keys);
        let u = target("s3://bkt/k", aws()).url("");
        assert_eq!(u.host_str(), Some("bkt.s3.eu-west-1.amazonaws.com"));
        assert_eq!(u.path(), "/k");
        let u = target("s3://my.bkt/k", aws()).url("");
        assert_eq!(
            (u.host_str(), u.path()),
            (Some("s3.eu-west-1.amazonaws.com"), "/my.bkt/k")
        );
        // An endpoint with a path: buckets below it.
        let u = target("s3://bkt/k", access("http://h:1/s3", "us-east-1", keys)).url("");
        assert_eq!(u.path(), "/s3/bkt/k");
        // Keys a URL would rewrite are refused.
        for key in ["a/../b", "./k", "/abs", "a/./b"] {
            let r = S3Target::new(
                S3Url::parse(&format!("s3://bkt/{key}")).unwrap(),
                access("http://h:1", "us-east-1", keys),
                S3Options::default(),
            );
            let e = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("cannot be addressed"), "{key}: {e}");
        }
    }

    #[test]
    fn each_request_is_signed_with_the_credentials_and_token() {
        let t = target(
            "s3://bkt/k",
            access(
                "http://h:1",
                "eu-west-3",
                Some(("AKID", "SECRET", Some("TOKEN"))),
            ),
        );
        let u = t.url("");
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        assert_eq!(q["X-Amz-Expires"], PRESIGN_FOR.as_secs().to_string());
        assert!(
            q["X-Amz-Credential"].starts_with("AKID/")
                && q["X-Amz-Credential"].contains("/eu-west-3/s3/")
        );
        assert_eq!(q["X-Amz-Security-Token"], "TOKEN");
        assert!(!u.as_str().contains("SECRET"));
        // Signed at the time given (each request's): a later one has a later date.
        let at = |secs| {
            let d = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let u = t
                .bucket
                .get_object(t.signing().credentials.as_ref(), "k")
                .sign_with_time(PRESIGN_FOR, &d);
            let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
            q["X-Amz-Date"].clone()
        };
        assert_eq!(at(1_700_000_000), "20231114T221320Z");
        assert_eq!(at(1_700_003_600), "20231114T231320Z");
        // Anonymous: no signing parameters at all.
        let t = target("s3://bkt/k", access("http://h:1", "us-east-1", None));
        assert_eq!(t.url("").query(), None);
    }

    #[test]
    fn refusals_are_explained() {
        let t = target(
            "s3://bkt/dir/k",
            access(
                "",
                "us-east-1",
                Some(("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG", None)),
            ),
        );
        let none = HeaderMap::new();
        let ex = |status: u16, headers: &HeaderMap, body: &str| {
            t.explain(StatusCode::from_u16(status).unwrap(), headers, body)
                .unwrap()
        };
        // Wrong region: 400 AuthorizationHeaderMalformed/QueryParameters...
        let e = ex(400, &none, "<Error><Code>AuthorizationQueryParametersError</Code><Message>Error parsing the \
            X-Amz-Credential parameter; the region 'us-east-1' is wrong; expecting 'eu-west-1'</Message>\
            <Region>eu-west-1</Region></Error>");
        assert!(
            e.starts_with(
                "s3://bkt/dir/k: the bucket \"bkt\" is in region eu-west-1, not us-east-1 \
            (from --s3-region): set AWS_REGION=eu-west-1"
            ),
            "{e}"
        );
        let e = ex(
            400,
            &none,
            "<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region \
            'us-east-1' is wrong; expecting 'ap-south-1'</Message></Error>",
        );
        assert!(e.contains("is in region ap-south-1"), "{e}");
        // ... or 301 with the region in a header.
        let mut h = HeaderMap::new();
        h.insert("x-amz-bucket-region", "eu-central-1".parse().unwrap());
        let e = ex(
            301,
            &h,
            "<Error><Code>PermanentRedirect</Code><Message>The bucket you are \
            attempting to access must be addressed using the specified endpoint.</Message>\
            <Endpoint>bkt.s3.eu-central-1.amazonaws.com</Endpoint></Error>",
        );
        assert!(e.contains("is in region eu-central-1"), "{e}");
        let e = ex(
            301,
            &none,
            "<Error><Code>PermanentRedirect</Code>\
            <Endpoint>bkt.s3.eu-central-1.amazonaws.com</Endpoint></Error>",
        );
        assert!(
            e.contains("must be reached through bkt.s3.eu-central-1.amazonaws.com"),
            "{e}"
        );
        // 403: which credentials, never the secret.
        let e = ex(
            403,
            &none,
            "<Error><Code>SignatureDoesNotMatch</Code><Message>The request \
            signature we calculated does not match the signature you provided.</Message>\
            <StringToSign>AWS4-HMAC-SHA256 x</StringToSign></Error>",
        );
        assert!(
            e.contains("access denied by https://s3.us-east-1.amazonaws.com/ (default)"),
            "{e}"
        );
        assert!(
            e.contains("with config t.toml: s3.access_key_id, access key …MPLE"),
            "{e}"
        );
        assert!(e.ends_with("check the secret access key"), "{e}");
        assert!(!e.contains("wJalr") && !e.contains("StringToSign"), "{e}");
        // 404: bucket or key.
        let e = ex(404, &none, "<Error><Code>NoSuchBucket</Code></Error>");
        assert!(
            e.starts_with("s3://bkt/dir/k: there is no bucket \"bkt\""),
            "{e}"
        );
        let e = ex(404, &none, "<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>");
        assert!(
            e.starts_with("s3://bkt/dir/k: there is no object \"dir/k\" in bucket \"bkt\""),
            "{e}"
        );
        // Anonymous and refused: say that no credentials were found.
        let t = target("s3://bkt/k", access("http://h:1", "us-east-1", None));
        let e = t
            .explain(
                StatusCode::FORBIDDEN,
                &none,
                "<Error><Code>AccessDenied</Code></Error>",
            )
            .unwrap();
        assert!(e.contains("no credentials were found"), "{e}");
        // A body that is no S3 error: the status.
        let e = t.explain(StatusCode::BAD_GATEWAY, &none, "<html>").unwrap();
        assert_eq!(
            e,
            "s3://bkt/k: HTTP 502 Bad Gateway from http://h:1/ (--s3-endpoint)"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            crate::util::percent_decode("a%20b%2F").as_deref(),
            Some("a b/")
        );
        assert_eq!(
            crate::util::percent_decode("%e2%80%a6").as_deref(),
            Some("…")
        );
        assert_eq!(crate::util::percent_decode("%2"), None);
        assert_eq!(crate::util::percent_decode("%zz"), None);
    }
}

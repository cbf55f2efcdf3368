//! OpenStack authentication, shared by the Swift and Glance origins, from
//! the environment as python-swiftclient and the OpenStack clients read it:
//!
//! ```text
//! ENDPOINT + OS_AUTH_TOKEN     a token given (cannot be renewed); ENDPOINT is
//!                              OS_STORAGE_URL (Swift) or OS_IMAGE_URL (Glance)
//! ST_AUTH + ST_USER + ST_KEY   Swift's v1 auth (tempauth, swauth)
//! OS_AUTH_URL + OS_USERNAME/OS_PASSWORD + OS_PROJECT_NAME (+ domains), or
//!   OS_APPLICATION_CREDENTIAL_ID/_SECRET: Keystone v3; the endpoint from the
//!   catalog (the service's type, OS_INTERFACE, OS_REGION_NAME) unless
//!   ENDPOINT is set
//! ENDPOINT alone               no authentication (Glance only)
//! ```
//!
//! Passwords, keys and tokens are `Secret`s: never logged, never shown.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, LOCATION};
use reqwest::{StatusCode, Url};
use tokio::sync::watch;

use super::aws::Secret;
use super::http::{self, TargetAuth};
use crate::error::{Error, ErrorKind, Result};

/// The most of Keystone's answer read: a token's catalog is a few KiB to a
/// few hundred (one endpoint per service, region and interface).
const CATALOG_MAX: u64 = 16 << 20;

/// How long a failed renewal stands: a 401 meanwhile is answered with its
/// error, and the token service is not asked again before it has passed
/// (Keystone locks a user out after `lockout_failure_attempts` failures,
/// and a service restarting is not helped by every read asking it).
const RENEWAL_BACKOFF: Duration = Duration::from_secs(15);

/// An OpenStack service lazybd reads from.
pub(super) struct Service {
    /// Its type in Keystone's catalog.
    pub(super) kind: &'static str,
    /// The variable naming its endpoint instead of the catalog
    /// (`OS_STORAGE_URL`, `OS_IMAGE_URL`).
    pub(super) endpoint_var: &'static str,
    /// Swift's own v1 auth (`ST_AUTH`) applies.
    pub(super) v1: bool,
    /// It may run without authentication (a Glance with no auth
    /// pipeline), given its endpoint.
    pub(super) anonymous: bool,
}

pub(super) const SWIFT: Service = Service {
    kind: "object-store",
    endpoint_var: "OS_STORAGE_URL",
    v1: true,
    anonymous: false,
};

pub(super) const GLANCE: Service = Service {
    kind: "image",
    endpoint_var: "OS_IMAGE_URL",
    v1: false,
    anonymous: true,
};

/// How lazybd gets tokens for a service.
pub(super) enum Auth {
    /// No authentication: the endpoint given (`OS_IMAGE_URL` alone).
    None { endpoint: Url },
    /// The endpoint and a token given (`OS_STORAGE_URL` + `OS_AUTH_TOKEN`).
    Given { endpoint: Url, token: Secret },
    /// `ST_AUTH` + `ST_USER` + `ST_KEY`.
    V1 { url: Url, user: String, key: Secret },
    /// Keystone v3 `POST …/v3/auth/tokens`.
    V3 {
        url: Url,
        /// The request body: holds the password or secret.
        body: Secret,
        /// For logs and errors: who, never the secret.
        who: String,
        interface: String,
        region: Option<String>,
        kind: &'static str,
        endpoint: Option<Url>,
    },
}

pub(super) fn endpoint_url(s: &str, from: &str) -> Result<Url> {
    match Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base() => Ok(u),
        _ => {
            // Shown without credentials or query, textually (it is no URL
            // of ours: `user:pw@host` parses as a path of scheme `user`).
            let shown = http::redact_userinfo(s.split(['?', '#']).next().unwrap_or(s));
            Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{from} {shown:?} is not an http:// or https:// URL"),
            ))
        }
    }
}

impl Auth {
    /// From the environment (`var`) for `svc`, in python-swiftclient's
    /// order: a given token, Swift v1, Keystone v3, none.
    pub(super) fn from_env(var: &dyn Fn(&str) -> Option<String>, svc: &Service) -> Result<Auth> {
        let need = |name: &str, why: &str| {
            var(name).ok_or_else(|| {
                Error::new(ErrorKind::InvalidInput, format!("{why}: {name} is not set"))
            })
        };
        let endpoint = var(svc.endpoint_var);
        if let (Some(s), Some(t)) = (&endpoint, var("OS_AUTH_TOKEN")) {
            return Ok(Auth::Given {
                endpoint: endpoint_url(s, svc.endpoint_var)?,
                token: Secret::new(t),
            });
        }
        if let (true, Some(a)) = (svc.v1, var("ST_AUTH")) {
            return Ok(Auth::V1 {
                url: endpoint_url(&a, "ST_AUTH")?,
                user: need("ST_USER", "Swift v1 auth (ST_AUTH)")?,
                key: Secret::new(need("ST_KEY", "Swift v1 auth (ST_AUTH)")?),
            });
        }
        let Some(a) = var("OS_AUTH_URL") else {
            if let (true, Some(e)) = (svc.anonymous, &endpoint) {
                return Ok(Auth::None {
                    endpoint: endpoint_url(e, svc.endpoint_var)?,
                });
            }
            let v1 = if svc.v1 {
                "ST_AUTH, ST_USER and ST_KEY (v1 auth), "
            } else {
                ""
            };
            let none = if svc.anonymous {
                format!(", or {} alone (no authentication)", svc.endpoint_var)
            } else {
                String::new()
            };
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "no {} credentials: set {v1}OS_AUTH_URL with \
                     OS_USERNAME/OS_PASSWORD/OS_PROJECT_NAME or \
                     OS_APPLICATION_CREDENTIAL_ID/_SECRET (Keystone v3), or {} and \
                     OS_AUTH_TOKEN{none}",
                    svc.kind, svc.endpoint_var
                ),
            ));
        };
        let mut url = endpoint_url(&a, "OS_AUTH_URL")?;
        let path = url.path().trim_end_matches('/').to_string();
        if path.ends_with("/v2.0") || path.ends_with("/v2") {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "OS_AUTH_URL {:?} is Keystone v2, which lazybd does not speak: use the v3 URL",
                    http::redact(&url)
                ),
            ));
        }
        let base = if path.ends_with("/v3") {
            path
        } else {
            format!("{path}/v3")
        };
        url.set_path(&format!("{base}/auth/tokens"));
        let domain = |name: &str, id: &str| -> serde_json::Value {
            match (var(name), var(id)) {
                (Some(n), _) => serde_json::json!({ "name": n }),
                (None, Some(i)) => serde_json::json!({ "id": i }),
                // Keystone's own default domain.
                (None, None) => serde_json::json!({ "id": "default" }),
            }
        };
        let (body, who) = if let (Some(id), Some(secret)) = (
            var("OS_APPLICATION_CREDENTIAL_ID"),
            var("OS_APPLICATION_CREDENTIAL_SECRET"),
        ) {
            let body = serde_json::json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": { "id": id, "secret": secret },
            }}});
            (body, format!("application credential {id}"))
        } else {
            let user = match (var("OS_USERNAME"), var("OS_USER_ID")) {
                (Some(n), _) => {
                    serde_json::json!({ "name": n, "domain": domain("OS_USER_DOMAIN_NAME", "OS_USER_DOMAIN_ID") })
                }
                (None, Some(i)) => serde_json::json!({ "id": i }),
                (None, None) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "Keystone v3 (OS_AUTH_URL): set OS_USERNAME (or OS_USER_ID) and \
                         OS_PASSWORD, or OS_APPLICATION_CREDENTIAL_ID and _SECRET",
                    ))
                }
            };
            let password = need("OS_PASSWORD", "Keystone v3 (OS_AUTH_URL)")?;
            let mut user = user;
            user["password"] = serde_json::Value::String(password);
            let project = match (
                var("OS_PROJECT_NAME").or_else(|| var("OS_TENANT_NAME")),
                var("OS_PROJECT_ID").or_else(|| var("OS_TENANT_ID")),
            ) {
                (Some(n), _) => serde_json::json!({ "name": n,
                    "domain": domain("OS_PROJECT_DOMAIN_NAME", "OS_PROJECT_DOMAIN_ID") }),
                (None, Some(i)) => serde_json::json!({ "id": i }),
                (None, None) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "Keystone v3 (OS_AUTH_URL): set OS_PROJECT_NAME or OS_PROJECT_ID \
                         (a token for a service is scoped to a project)",
                    ))
                }
            };
            let who = format!(
                "user {} in project {}",
                var("OS_USERNAME")
                    .or_else(|| var("OS_USER_ID"))
                    .unwrap_or_default(),
                var("OS_PROJECT_NAME")
                    .or_else(|| var("OS_PROJECT_ID"))
                    .unwrap_or_default()
            );
            let body = serde_json::json!({"auth": {
                "identity": { "methods": ["password"], "password": { "user": user } },
                "scope": { "project": project },
            }});
            (body, who)
        };
        Ok(Auth::V3 {
            url,
            body: Secret::new(body.to_string()),
            who,
            interface: var("OS_INTERFACE")
                .unwrap_or_else(|| "public".into())
                .trim_end_matches("URL")
                .to_string(),
            region: var("OS_REGION_NAME"),
            kind: svc.kind,
            endpoint: endpoint
                .map(|s| endpoint_url(&s, svc.endpoint_var))
                .transpose()?,
        })
    }

    /// For logs and errors: how tokens are got, never a secret (the URL
    /// without `user:pass@`, secret query values hidden).
    pub(super) fn describe(&self) -> String {
        match self {
            Auth::None { .. } => "no authentication".into(),
            Auth::Given { .. } => "OS_AUTH_TOKEN (not renewable)".into(),
            Auth::V1 { url, user, .. } => {
                format!("v1 auth at {} as {user} (ST_AUTH)", http::redact(url))
            }
            Auth::V3 { url, who, .. } => {
                format!(
                    "Keystone v3 at {} as {who} (OS_AUTH_URL)",
                    http::redact(url)
                )
            }
        }
    }

    /// The variable naming where tokens come from.
    fn var(&self) -> &'static str {
        match self {
            Auth::V1 { .. } => "ST_AUTH",
            _ => "OS_AUTH_URL",
        }
    }

    /// Whether a refused token can be replaced by asking again.
    pub(super) fn renewable(&self) -> bool {
        matches!(self, Auth::V1 { .. } | Auth::V3 { .. })
    }

    /// The scheme of the first request (to build its client).
    pub(super) fn scheme(&self) -> &str {
        match self {
            Auth::None { endpoint } | Auth::Given { endpoint, .. } => endpoint.scheme(),
            Auth::V1 { url, .. } | Auth::V3 { url, .. } => url.scheme(),
        }
    }

    /// A token (none without authentication) and the endpoint to use it on.
    ///
    /// `client` MUST follow no redirects (`http::client(.., false)`): a
    /// redirect would take the password or key along. One is refused,
    /// saying where it pointed. The error's kind tells a failure that
    /// passes (`Origin`: 5xx, 408, 429, timeouts, no connection) from a
    /// refusal (`OriginRefused`: 401, 403, ...) and a bad setting
    /// (`InvalidInput`).
    pub(super) async fn token(&self, client: &reqwest::Client) -> Result<(Url, Option<Secret>)> {
        let refused = |resp: &reqwest::Response| {
            let status = resp.status();
            let why = match status {
                s if http::transient(s) => String::new(),
                StatusCode::UNAUTHORIZED => {
                    ": the credentials were refused (wrong, expired, or the user locked out)".into()
                }
                StatusCode::FORBIDDEN => {
                    ": the credentials may not have a token (for this project or scope)".into()
                }
                s if s.is_redirection() => {
                    let to = resp
                        .headers()
                        .get(LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|l| resp.url().join(l).ok())
                        .map(|u| format!(" to {}", http::redact(&u)))
                        .unwrap_or_default();
                    format!(
                        ": a redirect{to}, which lazybd does not follow with credentials \
                         (set {} to the URL it names)",
                        self.var()
                    )
                }
                _ => String::new(),
            };
            let kind = if http::transient(status) {
                ErrorKind::Origin
            } else {
                ErrorKind::OriginRefused
            };
            Error::new(
                kind,
                format!("authentication ({}): HTTP {status}{why}", self.describe()),
            )
        };
        let failed = |e: reqwest::Error| {
            Error::with_source(
                ErrorKind::Origin,
                format!("authentication ({})", self.describe()),
                e.without_url(),
            )
        };
        match self {
            Auth::None { endpoint } => Ok((endpoint.clone(), None)),
            Auth::Given { endpoint, token } => Ok((endpoint.clone(), Some(token.clone()))),
            Auth::V1 { url, user, key } => {
                let resp = client
                    .get(url.clone())
                    .header("X-Auth-User", user)
                    .header("X-Auth-Key", key.expose())
                    .send()
                    .await
                    .map_err(failed)?;
                if !resp.status().is_success() {
                    return Err(refused(&resp));
                }
                let h = resp.headers();
                let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                match (get("x-storage-url"), get("x-auth-token")) {
                    (Some(s), Some(t)) => Ok((
                        endpoint_url(&s, "X-Storage-Url")?,
                        Some(Secret::new(t)),
                    )),
                    _ => Err(Error::new(
                        ErrorKind::Origin,
                        format!(
                            "Swift v1 authentication ({}): no X-Storage-Url or X-Auth-Token in the answer",
                            self.describe()
                        ),
                    )),
                }
            }
            Auth::V3 {
                url,
                body,
                interface,
                region,
                kind,
                endpoint,
                ..
            } => {
                let mut resp = client
                    .post(url.clone())
                    .header("Content-Type", "application/json")
                    .body(body.expose().to_string())
                    .send()
                    .await
                    .map_err(failed)?;
                if !resp.status().is_success() {
                    return Err(refused(&resp));
                }
                let token = resp
                    .headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .map(|t| Secret::new(t.to_string()))
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Origin,
                            format!("Keystone ({}) sent no X-Subject-Token", self.describe()),
                        )
                    })?;
                if let Some(e) = endpoint {
                    return Ok((e.clone(), Some(token)));
                }
                let body = http::body_within(&mut resp, CATALOG_MAX)
                    .await
                    .map_err(failed)?
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Origin,
                            format!(
                                "Keystone's answer ({}) is larger than {} MiB: not a token \
                                 and its catalog",
                                self.describe(),
                                CATALOG_MAX >> 20
                            ),
                        )
                    })?;
                let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Origin,
                        format!("Keystone's answer ({}) is not JSON", self.describe()),
                        e,
                    )
                })?;
                let found =
                    catalog_endpoint(&v, kind, interface, region.as_deref()).ok_or_else(|| {
                        let region = region
                            .as_deref()
                            .map(|r| format!(" in region {r}"))
                            .unwrap_or_default();
                        let var = if *kind == "image" {
                            "OS_IMAGE_URL"
                        } else {
                            "OS_STORAGE_URL"
                        };
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "Keystone's catalog for {} has no {kind} endpoint with \
                                 interface {interface}{region}: set {var}, OS_INTERFACE or \
                                 OS_REGION_NAME",
                                self.describe()
                            ),
                        )
                    })?;
                Ok((endpoint_url(&found, "the catalog's endpoint")?, Some(token)))
            }
        }
    }
}

/// The endpoint of service type `kind` in a v3 token's catalog.
fn catalog_endpoint(
    v: &serde_json::Value,
    kind: &str,
    interface: &str,
    region: Option<&str>,
) -> Option<String> {
    v["token"]["catalog"]
        .as_array()?
        .iter()
        .filter(|s| s["type"] == kind)
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| {
            e["interface"] == interface
                && region.map_or(true, |r| e["region"] == r || e["region_id"] == r)
        })
        .and_then(|e| e["url"].as_str().map(str::to_owned))
}

/// The token in use and where it is good.
struct Session {
    endpoint: Url,
    /// `None` without authentication.
    token: Option<HeaderValue>,
    generation: u64,
}

fn session(endpoint: Url, token: Option<Secret>, generation: u64) -> Result<Session> {
    let token = match token {
        None => None,
        Some(t) => {
            let mut v = HeaderValue::from_str(t.expose()).map_err(|_| {
                Error::new(ErrorKind::Origin, "the token is not a valid header value")
            })?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    Ok(Session {
        endpoint,
        token,
        generation,
    })
}

/// Tokens for one origin: the current one for every request, and a new
/// one after a 401, asked once however many requests got the 401.
///
/// A renewal runs as a task of its own, which every request that got the
/// 401 awaits: a request given up meanwhile (its stall bound, its read's
/// deadline, a hedge that lost) never cancels it mid-request, and the next
/// one joins it instead of asking again. Its failure is remembered for
/// [`RENEWAL_BACKOFF`]:
///
/// ```text
///   Idle --401--> Running{g} --token--> Idle (generation g+1)
///                     |
///                     +--error--> Failed{g, at, why} --401 within backoff--> false, why
///                                        |
///                                        +--401 after the backoff--> Running{g}
/// ```
pub(super) struct Tokens {
    shared: Arc<Shared>,
}

/// What the renewal task shares with the requests.
struct Shared {
    auth: Auth,
    /// Follows no redirects (see [`Auth::token`]).
    client: reqwest::Client,
    session: RwLock<Arc<Session>>,
    /// Never held across an await; taken before `session` (reading it),
    /// never while `session` is written.
    renewal: Mutex<Renewal>,
}

/// Where getting a new token stands.
enum Renewal {
    Idle,
    /// A task is getting the successor of `generation`'s token; `done`
    /// turns true when it has finished (and updated this).
    Running {
        generation: u64,
        done: watch::Receiver<bool>,
    },
    /// Getting the successor of `generation`'s token failed at `at`.
    Failed {
        generation: u64,
        at: Instant,
        failure: Failure,
    },
}

#[derive(Clone)]
struct Failure {
    /// It may pass by itself (5xx, timeout, no connection), as opposed to
    /// a refusal of the credentials or a bad setting.
    transient: bool,
    why: String,
}

impl Shared {
    fn now(&self) -> Arc<Session> {
        self.session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn renewal(&self) -> std::sync::MutexGuard<'_, Renewal> {
        self.renewal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The renewal task: a successor of `generation`'s token, or the
    /// failure remembered; then `done` is told.
    async fn renew(self: Arc<Self>, generation: u64, origin: String, done: watch::Sender<bool>) {
        // Bounded by the client's timeout (the origin's request timeout),
        // body included: not by any request's stall bound.
        let got = self
            .auth
            .token(&self.client)
            .await
            .and_then(|(e, t)| session(e, t, generation + 1));
        let next = match got {
            Ok(s) => {
                *self.session.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                tracing::info!(%origin, "token renewed after a 401");
                Renewal::Idle
            }
            Err(e) => {
                let transient = matches!(e.kind(), ErrorKind::Origin | ErrorKind::TimedOut);
                tracing::warn!(%origin, error = %e, transient,
                    retry_after_s = RENEWAL_BACKOFF.as_secs(), "token renewal failed");
                Renewal::Failed {
                    generation,
                    at: Instant::now(),
                    failure: Failure {
                        transient,
                        why: e.to_string(),
                    },
                }
            }
        };
        *self.renewal() = next;
        let _ = done.send(true);
    }
}

impl Tokens {
    /// The first token (the open fails without one). `need_token`: the
    /// service refuses anonymous requests (Swift). `client` MUST follow no
    /// redirects (`http::client(.., false)`), and its timeout bounds each
    /// request for a token.
    pub(super) async fn start(
        auth: Auth,
        client: reqwest::Client,
        need_token: bool,
    ) -> Result<Tokens> {
        let (endpoint, token) = auth.token(&client).await?;
        if need_token && token.is_none() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "no credentials to get a token with",
            ));
        }
        Ok(Tokens {
            shared: Arc::new(Shared {
                session: RwLock::new(Arc::new(session(endpoint, token, 0)?)),
                auth,
                client,
                renewal: Mutex::new(Renewal::Idle),
            }),
        })
    }

    /// The service's endpoint (Swift: the account's storage URL).
    pub(super) fn endpoint(&self) -> Url {
        self.shared.now().endpoint.clone()
    }

    pub(super) fn describe(&self) -> String {
        self.shared.auth.describe()
    }

    /// The `X-Auth-Token` of a request made now.
    pub(super) fn auth(&self) -> Option<TargetAuth> {
        let s = self.shared.now();
        let token = s.token.clone()?;
        let mut headers = HeaderMap::new();
        headers.insert("x-auth-token", token);
        let renewal_failing = matches!(
            &*self.shared.renewal(),
            Renewal::Failed { generation, failure, .. }
                if *generation == s.generation && failure.transient
        );
        Some(TargetAuth {
            headers,
            generation: s.generation,
            renewal_failing,
        })
    }

    /// A request with generation `generation`'s token got 401: a new token,
    /// unless another request got one meanwhile, one is being got (then
    /// this waits for it), or getting one failed less than
    /// [`RENEWAL_BACKOFF`] ago. True when a retry may succeed.
    pub(super) async fn renew(&self, generation: u64, origin: &str) -> bool {
        let mut done = {
            let mut r = self.shared.renewal();
            if self.shared.now().generation != generation {
                return true;
            }
            match &*r {
                Renewal::Running {
                    generation: g,
                    done,
                } if *g == generation => done.clone(),
                Renewal::Failed {
                    generation: g, at, ..
                } if *g == generation && at.elapsed() < RENEWAL_BACKOFF => return false,
                _ if !self.shared.auth.renewable() => {
                    *r = Renewal::Failed {
                        generation,
                        at: Instant::now(),
                        failure: Failure {
                            transient: false,
                            why: "the token given in OS_AUTH_TOKEN was refused (expired?), and \
                                  without credentials (ST_* or OS_*) lazybd cannot get another"
                                .into(),
                        },
                    };
                    return false;
                }
                _ => {
                    let (tx, rx) = watch::channel(false);
                    *r = Renewal::Running {
                        generation,
                        done: rx.clone(),
                    };
                    tokio::spawn(
                        self.shared
                            .clone()
                            .renew(generation, origin.to_string(), tx),
                    );
                    rx
                }
            }
        };
        // Err: the task is gone without a word (the runtime shutting down).
        let _ = done.wait_for(|d| *d).await;
        self.shared.now().generation != generation
    }

    /// Why a 401 stands: the token refused, and why no new one came.
    pub(super) fn refused(&self, service: &str) -> String {
        let failure = match &*self.shared.renewal() {
            Renewal::Failed { failure, .. } => Some(failure.clone()),
            _ => None,
        };
        let why = match failure {
            Some(f) if f.transient => format!(
                "; getting a new one failed, for now (asked again every {} s): {}",
                RENEWAL_BACKOFF.as_secs(),
                f.why
            ),
            Some(f) => format!("; getting a new one failed: {}", f.why),
            None => String::new(),
        };
        format!("{service} refused the token ({}){why}", self.describe())
    }

    /// Make a remembered failure `by` older (tests of the backoff).
    #[cfg(test)]
    pub(super) fn age_failure(&self, by: Duration) {
        if let Renewal::Failed { at, .. } = &mut *self.shared.renewal() {
            *at -= by;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn credentials_from_the_environment_in_swiftclients_order() {
        let a = Auth::from_env(
            &env(&[
                ("ST_AUTH", "http://127.0.0.1:1/auth/v1.0"),
                ("ST_USER", "test:tester"),
                ("ST_KEY", "testing"),
                ("OS_AUTH_URL", "http://k/v3"),
            ]),
            &SWIFT,
        )
        .unwrap();
        assert!(matches!(a, Auth::V1 { .. }));
        assert!(!a.describe().contains("testing"));
        // A given token wins over everything.
        let a = Auth::from_env(
            &env(&[
                ("OS_STORAGE_URL", "http://s/v1/AUTH_a"),
                ("OS_AUTH_TOKEN", "tok"),
                ("ST_AUTH", "http://x/auth/v1.0"),
            ]),
            &SWIFT,
        )
        .unwrap();
        assert!(matches!(a, Auth::Given { .. }));
        let a = Auth::from_env(
            &env(&[
                ("OS_AUTH_URL", "http://k:5000"),
                ("OS_USERNAME", "demo"),
                ("OS_PASSWORD", "pw-secret"),
                ("OS_PROJECT_NAME", "p1"),
                ("OS_USER_DOMAIN_NAME", "Default"),
                ("OS_INTERFACE", "internalURL"),
            ]),
            &SWIFT,
        )
        .unwrap();
        let Auth::V3 {
            url,
            body,
            who,
            interface,
            ..
        } = &a
        else {
            panic!("not v3")
        };
        assert_eq!(url.as_str(), "http://k:5000/v3/auth/tokens");
        assert_eq!(interface, "internal");
        assert_eq!(who, "user demo in project p1");
        let v: serde_json::Value = serde_json::from_str(body.expose()).unwrap();
        assert_eq!(
            v["auth"]["identity"]["password"]["user"]["domain"]["name"],
            "Default"
        );
        assert_eq!(v["auth"]["scope"]["project"]["domain"]["id"], "default");
        assert!(!a.describe().contains("pw-secret"));
        let a = Auth::from_env(
            &env(&[
                ("OS_AUTH_URL", "http://k/identity/v3/"),
                ("OS_APPLICATION_CREDENTIAL_ID", "ac1"),
                ("OS_APPLICATION_CREDENTIAL_SECRET", "s"),
            ]),
            &SWIFT,
        )
        .unwrap();
        assert!(a.describe().contains("application credential ac1"));
        for (vars, want) in [
            (vec![], "no object-store credentials"),
            (
                vec![("ST_AUTH", "http://x/auth/v1.0")],
                "ST_USER is not set",
            ),
            (vec![("OS_AUTH_URL", "http://k/v2.0")], "Keystone v2"),
            (
                vec![
                    ("OS_AUTH_URL", "http://k/v3"),
                    ("OS_USERNAME", "u"),
                    ("OS_PASSWORD", "p"),
                ],
                "OS_PROJECT_NAME or OS_PROJECT_ID",
            ),
            (vec![("ST_AUTH", "ftp://x")], "not an http"),
        ] {
            let e = Auth::from_env(&env(&vars), &SWIFT)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
    }

    use crate::origin::http::fake::{self, Reply};
    use crate::origin::OriginOptions;
    use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
    use std::time::Duration;

    /// A Swift v1 auth endpoint: the first request gets token `t0`; later
    /// ones wait `delay` ms, then answer `status` (a token `tN` if 200).
    struct V1Auth {
        url: String,
        asked: Arc<AtomicU64>,
        status: Arc<AtomicU16>,
        delay: Arc<AtomicU64>,
    }

    async fn v1_auth() -> V1Auth {
        let asked = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let delay = Arc::new(AtomicU64::new(0));
        let (a, st, d) = (asked.clone(), status.clone(), delay.clone());
        let base = fake::serve(move |req| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            let ok = req.header("x-auth-key") == Some("k3y");
            let status = if n == 0 {
                200
            } else {
                st.load(Ordering::SeqCst)
            };
            let delay = if n == 0 { 0 } else { d.load(Ordering::SeqCst) };
            async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                match (ok, status) {
                    (true, 200) => Reply::status(200)
                        .header("x-storage-url", "http://127.0.0.1:1/v1/AUTH_t")
                        .header("x-auth-token", &format!("t{n}")),
                    (false, _) => Reply::status(401),
                    (true, s) => Reply::status(s),
                }
            }
        })
        .await;
        V1Auth {
            url: format!("{base}/auth/v1.0"),
            asked,
            status,
            delay,
        }
    }

    async fn v1_tokens(a: &V1Auth, opts: &OriginOptions) -> Tokens {
        let auth = Auth::V1 {
            url: Url::parse(&a.url).unwrap(),
            user: "test:tester".into(),
            key: Secret::new("k3y"),
        };
        let client = http::client(opts, "http", "test", false).unwrap();
        Tokens::start(auth, client, true).await.unwrap()
    }

    /// Every request that got a 401 waits for one renewal; when it fails,
    /// the failure stands for the backoff (nobody asks again), is told to
    /// the waiters, and is marked as passing (a 503) or not (a 401).
    #[tokio::test]
    async fn one_renewal_for_all_and_its_failure_remembered() {
        let a = v1_auth().await;
        let tokens = Arc::new(v1_tokens(&a, &OriginOptions::default()).await);
        assert_eq!(a.asked.load(Ordering::SeqCst), 1);
        a.status.store(503, Ordering::SeqCst);
        a.delay.store(100, Ordering::SeqCst);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let t = tokens.clone();
                tokio::spawn(async move { t.renew(0, "swift://c/o").await })
            })
            .collect();
        for w in waiters {
            assert!(!w.await.unwrap());
        }
        assert_eq!(a.asked.load(Ordering::SeqCst), 2, "one renewal for all");
        // Remembered: later 401s are answered without asking.
        for _ in 0..5 {
            assert!(!tokens.renew(0, "swift://c/o").await);
        }
        assert_eq!(
            a.asked.load(Ordering::SeqCst),
            2,
            "asked again within the backoff"
        );
        let auth = tokens.auth().unwrap();
        assert!(auth.renewal_failing && auth.generation == 0);
        let why = tokens.refused("Swift");
        assert!(why.contains("HTTP 503") && why.contains("for now"), "{why}");
        // After the backoff: asked again; a refusal is no passing failure.
        a.status.store(401, Ordering::SeqCst);
        tokens.age_failure(RENEWAL_BACKOFF);
        assert!(!tokens.renew(0, "swift://c/o").await);
        assert_eq!(a.asked.load(Ordering::SeqCst), 3);
        assert!(!tokens.auth().unwrap().renewal_failing);
        let why = tokens.refused("Swift");
        assert!(
            why.contains("HTTP 401") && why.contains("credentials were refused"),
            "{why}"
        );
        // And once it answers again: a new token.
        a.status.store(200, Ordering::SeqCst);
        tokens.age_failure(RENEWAL_BACKOFF);
        assert!(tokens.renew(0, "swift://c/o").await);
        let auth = tokens.auth().unwrap();
        assert_eq!(
            (
                auth.generation,
                auth.headers["x-auth-token"].to_str().unwrap()
            ),
            (1, "t3")
        );
        assert!(!auth.renewal_failing);
        // A 401 to the old token now just means: retry with the new one.
        assert!(tokens.renew(0, "swift://c/o").await);
        assert_eq!(a.asked.load(Ordering::SeqCst), 4);
    }

    /// A request given up while the renewal runs (its read's deadline, a
    /// hedge that lost) does not cancel it: the next 401 finds its result.
    #[tokio::test]
    async fn a_renewal_outlives_the_request_that_started_it() {
        let a = v1_auth().await;
        let tokens = v1_tokens(&a, &OriginOptions::default()).await;
        a.delay.store(400, Ordering::SeqCst);
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), tokens.renew(0, "swift://c/o")).await;
        assert!(gave_up.is_err());
        assert!(tokens.renew(0, "swift://c/o").await);
        assert_eq!(tokens.auth().unwrap().generation, 1);
        assert_eq!(
            a.asked.load(Ordering::SeqCst),
            2,
            "the renewal was asked twice"
        );
    }

    /// The renewal is bounded by the client's own timeout (the origin's
    /// request timeout), and its timing out is a failure that passes.
    #[tokio::test]
    async fn a_renewal_that_gets_no_answer_times_out() {
        let a = v1_auth().await;
        let opts = OriginOptions {
            request_timeout: Duration::from_millis(300),
            ..OriginOptions::default()
        };
        let tokens = v1_tokens(&a, &opts).await;
        a.delay.store(60_000, Ordering::SeqCst);
        let started = Instant::now();
        assert!(!tokens.renew(0, "swift://c/o").await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(tokens.auth().unwrap().renewal_failing);
    }

    /// Keystone's answer is read up to 16 MiB, then refused.
    #[tokio::test]
    async fn keystones_answer_is_capped() {
        let catalog = r#"{"token":{"catalog":[{"type":"object-store","endpoints":[
            {"interface":"public","url":"http://127.0.0.1:1/v1/AUTH_p"}]}]}}"#;
        let huge = Arc::new(AtomicU64::new(0));
        let h = huge.clone();
        let base = fake::serve(move |req| {
            assert_eq!(req.method, "POST");
            let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
            assert_eq!(v["auth"]["identity"]["methods"][0], "password");
            let mode = h.load(Ordering::SeqCst);
            let body = if mode == 1 {
                vec![b' '; CATALOG_MAX as usize + 1]
            } else {
                catalog.as_bytes().to_vec()
            };
            let reply = Reply::status(201)
                .header("x-subject-token", "ks1")
                .body(body);
            let reply = if mode == 2 {
                reply.stall_body(Duration::from_secs(60))
            } else {
                reply
            };
            async move { reply }
        })
        .await;
        let env = env(&[
            ("OS_AUTH_URL", &format!("{base}/v3")),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_PROJECT_NAME", "p1"),
        ]);
        let client = http::client(&OriginOptions::default(), "http", "test", false).unwrap();
        let auth = Auth::from_env(&env, &SWIFT).unwrap();
        let (endpoint, token) = auth.token(&client).await.unwrap();
        assert_eq!(endpoint.as_str(), "http://127.0.0.1:1/v1/AUTH_p");
        assert_eq!(token.unwrap().expose(), "ks1");
        huge.store(1, Ordering::SeqCst);
        let e = auth.token(&client).await.unwrap_err().to_string();
        assert!(e.contains("larger than 16 MiB"), "{e}");
        // A body that stops coming is bounded by the client's timeout.
        huge.store(2, Ordering::SeqCst);
        let opts = OriginOptions {
            request_timeout: Duration::from_millis(300),
            ..OriginOptions::default()
        };
        let client = http::client(&opts, "http", "test", false).unwrap();
        let started = Instant::now();
        let e = auth.token(&client).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{e}");
        assert_eq!(e.kind(), ErrorKind::Origin, "{e}");
    }

    /// A redirect from the auth service is not followed (the key would go
    /// along): refused, saying where it pointed.
    #[tokio::test]
    async fn auth_redirects_are_not_followed() {
        let elsewhere_asked = Arc::new(AtomicU64::new(0));
        let n = elsewhere_asked.clone();
        let elsewhere = fake::serve(move |_| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Reply::status(200) }
        })
        .await;
        let to = format!("{elsewhere}/auth/v1.0?temp=1");
        let base = fake::serve(move |_| {
            let r = Reply::status(307).header("location", &to);
            async move { r }
        })
        .await;
        let auth = Auth::V1 {
            url: Url::parse(&format!("{base}/auth/v1.0")).unwrap(),
            user: "u".into(),
            key: Secret::new("k3y"),
        };
        let client = http::client(&OriginOptions::default(), "http", "test", false).unwrap();
        let e = auth.token(&client).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OriginRefused);
        let e = e.to_string();
        assert!(
            e.contains(&format!("a redirect to {elsewhere}/auth/v1.0?temp=1"))
                && e.contains("set ST_AUTH"),
            "{e}"
        );
        assert_eq!(elsewhere_asked.load(Ordering::SeqCst), 0);
    }

    /// How tokens are got is shown in logs and errors: never with the
    /// credentials or secret query values of the URLs given.
    #[test]
    fn describe_hides_credentials_in_urls() {
        let a = Auth::from_env(
            &env(&[
                ("ST_AUTH", "https://op:pw1@k:8080/auth/v1.0?key=K3Y&x=1"),
                ("ST_USER", "u"),
                ("ST_KEY", "k"),
            ]),
            &SWIFT,
        )
        .unwrap();
        assert_eq!(
            a.describe(),
            "v1 auth at https://k:8080/auth/v1.0?key=…&x=1 as u (ST_AUTH)"
        );
        let a = Auth::from_env(
            &env(&[
                ("OS_AUTH_URL", "https://op:pw2@k/identity?token=T0K"),
                ("OS_USERNAME", "u"),
                ("OS_PASSWORD", "p"),
                ("OS_PROJECT_NAME", "p1"),
            ]),
            &SWIFT,
        )
        .unwrap();
        let d = a.describe();
        assert!(
            !d.contains("pw2") && !d.contains("T0K") && !d.contains("op:"),
            "{d}"
        );
        assert!(
            d.starts_with("Keystone v3 at https://k/identity/v3/auth/tokens"),
            "{d}"
        );
        for (var, url) in [
            ("OS_AUTH_URL", "https://op:pw3@k/v2.0?token=T0K"),
            ("OS_AUTH_URL", "ftp://op:pw3@k/?token=T0K"),
            ("ST_AUTH", "op:pw3@k?token=T0K"),
        ] {
            let e = Auth::from_env(
                &env(&[(var, url), ("ST_USER", "u"), ("ST_KEY", "k")]),
                &SWIFT,
            )
            .err()
            .expect("refused")
            .to_string();
            assert!(!e.contains("pw3") && !e.contains("T0K"), "{e}");
        }
    }

    #[test]
    fn the_catalog_gives_the_object_store_endpoint() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"token":{"catalog":[
                {"type":"image","endpoints":[{"interface":"public","region":"R1","url":"http://g"}]},
                {"type":"object-store","endpoints":[
                    {"interface":"internal","region":"R1","url":"http://int/v1/AUTH_p"},
                    {"interface":"public","region":"R2","url":"http://pub2/v1/AUTH_p"},
                    {"interface":"public","region":"R1","url":"http://pub1/v1/AUTH_p"}]}]}}"#,
        )
        .unwrap();
        assert_eq!(
            catalog_endpoint(&v, "object-store", "public", Some("R1")).as_deref(),
            Some("http://pub1/v1/AUTH_p")
        );
        assert_eq!(
            catalog_endpoint(&v, "object-store", "internal", None).as_deref(),
            Some("http://int/v1/AUTH_p")
        );
        assert_eq!(catalog_endpoint(&v, "object-store", "admin", None), None);
    }

    #[test]
    fn glance_may_run_without_authentication() {
        let a =
            Auth::from_env(&env(&[("OS_IMAGE_URL", "http://127.0.0.1:9292")]), &GLANCE).unwrap();
        assert!(matches!(a, Auth::None { .. }) && !a.renewable());
        let e = Auth::from_env(&env(&[("ST_AUTH", "http://x/auth/v1.0")]), &GLANCE)
            .err()
            .expect("no v1 for Glance")
            .to_string();
        assert!(
            e.contains("no image credentials") && e.contains("OS_IMAGE_URL alone"),
            "{e}"
        );
        let a = Auth::from_env(
            &env(&[("OS_IMAGE_URL", "http://g:9292"), ("OS_AUTH_TOKEN", "t")]),
            &GLANCE,
        )
        .unwrap();
        assert!(matches!(a, Auth::Given { .. }));
    }
}

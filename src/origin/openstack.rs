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

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

use super::aws::Secret;
use super::http::TargetAuth;
use crate::error::{Error, ErrorKind, Result};

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
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{from} {s:?} is not an http:// or https:// URL"),
        )),
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
                    "OS_AUTH_URL {a:?} is Keystone v2, which lazybd does not speak: use the v3 URL"
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

    /// For logs: how tokens are got, never a secret.
    pub(super) fn describe(&self) -> String {
        match self {
            Auth::None { .. } => "no authentication".into(),
            Auth::Given { .. } => "OS_AUTH_TOKEN (not renewable)".into(),
            Auth::V1 { url, user, .. } => format!("v1 auth at {url} as {user} (ST_AUTH)"),
            Auth::V3 { url, who, .. } => format!("Keystone v3 at {url} as {who} (OS_AUTH_URL)"),
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
    pub(super) async fn token(&self, client: &reqwest::Client) -> Result<(Url, Option<Secret>)> {
        let refused = |status: StatusCode| {
            let kind = if status.is_server_error() {
                ErrorKind::Origin
            } else {
                ErrorKind::OriginRefused
            };
            Error::new(
                kind,
                format!("authentication ({}): HTTP {status}", self.describe()),
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
                    return Err(refused(resp.status()));
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
                let resp = client
                    .post(url.clone())
                    .header("Content-Type", "application/json")
                    .body(body.expose().to_string())
                    .send()
                    .await
                    .map_err(failed)?;
                if !resp.status().is_success() {
                    return Err(refused(resp.status()));
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
                let body = resp.bytes().await.map_err(failed)?;
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
pub(super) struct Tokens {
    auth: Auth,
    client: reqwest::Client,
    session: RwLock<Arc<Session>>,
    renewing: tokio::sync::Mutex<()>,
    /// Why the last renewal failed, for the refusal's explanation.
    last_error: Mutex<Option<String>>,
}

impl Tokens {
    /// The first token (the open fails without one). `need_token`: the
    /// service refuses anonymous requests (Swift).
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
            session: RwLock::new(Arc::new(session(endpoint, token, 0)?)),
            auth,
            client,
            renewing: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
        })
    }

    fn now(&self) -> Arc<Session> {
        self.session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The service's endpoint (Swift: the account's storage URL).
    pub(super) fn endpoint(&self) -> Url {
        self.now().endpoint.clone()
    }

    pub(super) fn describe(&self) -> String {
        self.auth.describe()
    }

    /// The `X-Auth-Token` of a request made now.
    pub(super) fn auth(&self) -> Option<TargetAuth> {
        let s = self.now();
        let token = s.token.clone()?;
        let mut headers = HeaderMap::new();
        headers.insert("x-auth-token", token);
        Some(TargetAuth {
            headers,
            generation: s.generation,
        })
    }

    /// A request with generation `generation`'s token got 401: a new token,
    /// unless another request got one meanwhile. True when a retry may
    /// succeed.
    pub(super) async fn renew(&self, generation: u64, origin: &str) -> bool {
        let _one = self.renewing.lock().await;
        if self.now().generation != generation {
            return true;
        }
        let fail = |why: String| {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            false
        };
        if !self.auth.renewable() {
            return fail(
                "the token given in OS_AUTH_TOKEN was refused (expired?), and without \
                 credentials (ST_* or OS_*) lazybd cannot get another"
                    .into(),
            );
        }
        match self
            .auth
            .token(&self.client)
            .await
            .and_then(|(e, t)| session(e, t, generation + 1))
        {
            Ok(s) => {
                *self.session.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                tracing::info!(%origin, "token renewed after a 401");
                true
            }
            Err(e) => {
                tracing::warn!(%origin, error = %e, "token renewal failed");
                fail(e.to_string())
            }
        }
    }

    /// Why a 401 stands: the token refused, and why no new one came.
    pub(super) fn refused(&self, service: &str) -> String {
        format!(
            "{service} refused the token ({}){}",
            self.auth.describe(),
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .map(|e| format!("; getting a new one failed: {e}"))
                .unwrap_or_default()
        )
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

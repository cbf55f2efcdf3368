//! Where an S3 origin's credentials, region and endpoint come from: the way
//! AWS tools take them, after what lazybd itself was told.
//!
//! ```text
//!             lazybd (flag > config file)        AWS environment            default
//! keys        [s3] access_key_id +               AWS_ACCESS_KEY_ID +        anonymous
//!             secret_access_key (+session_token) AWS_SECRET_ACCESS_KEY      (said in a
//!             or --s3-profile / [s3] profile     (+AWS_SESSION_TOKEN),      log line)
//!                                                else AWS_PROFILE, else
//!                                                profile "default"
//! region      --s3-region / [s3] region          AWS_REGION,                us-east-1
//!                                                AWS_DEFAULT_REGION, the
//!                                                profile's region
//! endpoint    --s3-endpoint / [s3] endpoint      AWS_ENDPOINT_URL_S3,       https://s3.REGION
//!                                                AWS_ENDPOINT_URL, the      .amazonaws.com
//!                                                profile's endpoint_url
//! ```
//!
//! A profile is read from the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`: `[NAME]`) and
//! the config file (`AWS_CONFIG_FILE`, else `~/.aws/config`: `[profile
//! NAME]`, `[default]`); the credentials file wins for keys. A profile named
//! explicitly (flag, `[s3] profile`, `AWS_PROFILE`) must exist and hold
//! static keys: a typo is an error, never a silent anonymous request. Keys
//! a lazybd option names win over the environment's, as an AWS tool's
//! `--profile` does; `AWS_PROFILE` does not beat `AWS_ACCESS_KEY_ID`,
//! as for AWS tools. Empty variables count as unset.
//!
//! Profiles that get their keys elsewhere (`role_arn`, `sso_*`,
//! `credential_process`, `web_identity_token_file`) are refused with a
//! hint: lazybd signs with static or temporary keys it is given, it does
//! not call STS. Rejected: the AWS SDK's whole provider chain (instance
//! metadata, SSO, processes): a large dependency and network calls at start
//! for what an image server needs, keys handed to it.
//!
//! Nothing here logs or shows a secret: [`Secret`] prints as `…`, and a
//! credential source names where keys came from and the last characters
//! of the access key id at most.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use reqwest::Url;

use crate::error::{Error, ErrorKind, Result};

/// A secret value (a secret access key, a session token): never shown,
/// also not by `Debug`, so a config or options struct can be logged whole.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// An S3 endpoint: an `http://` or `https://` URL with a host, its path
/// ending in `/` (buckets and keys are joined below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Endpoint(Url);

impl S3Endpoint {
    pub fn url(&self) -> &Url {
        &self.0
    }

    /// An AWS endpoint (`*.amazonaws.com`, `*.amazonaws.com.cn`): buckets
    /// are addressed as `BUCKET.HOST` there; elsewhere (SeaweedFS, MinIO,
    /// Ceph, ...) as `HOST/BUCKET`, which every S3 server understands.
    pub fn is_aws(&self) -> bool {
        let host = self.0.host_str().unwrap_or("").to_ascii_lowercase();
        host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn")
    }

    /// AWS's own endpoint for `region`.
    fn aws(region: &Region) -> Self {
        let suffix = if region.0.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        // A region is checked to be [a-z0-9-]: this always parses.
        S3Endpoint(
            Url::parse(&format!("https://s3.{}.{suffix}/", region.0))
                .unwrap_or_else(|_| unreachable!("a checked region makes a URL")),
        )
    }
}

impl std::str::FromStr for S3Endpoint {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut url = Url::parse(s.trim()).map_err(|e| format!("endpoint {s:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "endpoint {s:?}: use http://HOST[:PORT] or https://HOST[:PORT]"
            ));
        }
        if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "endpoint {s:?}: no user, password or query (keys go in access_key_id, \
                 secret_access_key or the AWS variables)"
            ));
        }
        if !url.path().ends_with('/') {
            let p = format!("{}/", url.path());
            url.set_path(&p);
        }
        Ok(S3Endpoint(url))
    }
}

/// An AWS region name (`eu-west-1`; S3-compatible servers take any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region(String);

impl Region {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Region {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Region(s.to_string()))
        } else {
            Err(format!(
                "region {s:?}: expected a region name such as eu-west-1 (lowercase letters, digits, '-')"
            ))
        }
    }
}

/// A value and where it was given (`--s3-region`, `config FILE: s3.region`):
/// errors say which setting to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given<T> {
    pub value: T,
    pub from: String,
}

impl<T> Given<T> {
    pub fn new(value: T, from: impl Into<String>) -> Self {
        Given {
            value,
            from: from.into(),
        }
    }
}

/// An access key pair, with the session token of temporary credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKeys {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

impl StaticKeys {
    /// `access key …MPLE`: the last four characters of the id, for telling
    /// keys apart in errors; nothing for a short id (a test's `AK`), where
    /// four would be most of it.
    fn shown_id(&self) -> Option<String> {
        let n = self.access_key_id.chars().count();
        (n >= 12).then(|| {
            let tail: String = self.access_key_id.chars().skip(n - 4).collect();
            format!("access key …{tail}")
        })
    }
}

impl fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeys")
            .field("access_key_id", &self.shown_id().unwrap_or_default())
            .field("session_token", &self.session_token.is_some())
            .finish_non_exhaustive()
    }
}

/// What lazybd itself was told about S3 (flags and the config file's
/// `[s3]` section, resolved flag > file by the binary); the environment
/// and the AWS files fill in the rest at open ([`resolve`]).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<Given<S3Endpoint>>,
    pub region: Option<Given<Region>>,
    pub profile: Option<Given<String>>,
    pub keys: Option<Given<StaticKeys>>,
}

/// Where the keys of a request came from, as errors and the log name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `[s3]` keys of the lazybd config file (`from` names it).
    Config { from: String },
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    Environment,
    /// A profile, found in `file`; `chosen_by` says how it was named.
    Profile {
        name: String,
        file: PathBuf,
        chosen_by: String,
    },
    /// None found: unsigned requests (a public bucket).
    Anonymous,
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Config { from } => write!(f, "{from}"),
            CredentialSource::Environment => {
                f.write_str("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment")
            }
            CredentialSource::Profile {
                name,
                file,
                chosen_by,
            } => write!(f, "profile {name:?} in {} ({chosen_by})", file.display()),
            CredentialSource::Anonymous => f.write_str("no credentials (anonymous requests)"),
        }
    }
}

/// Everything an S3 origin needs to sign and send its requests.
#[derive(Debug, Clone)]
pub struct Access {
    pub endpoint: S3Endpoint,
    /// Where the endpoint came from ("default" for AWS's own).
    pub endpoint_from: String,
    pub region: Region,
    pub region_from: String,
    /// `None`: anonymous.
    pub keys: Option<StaticKeys>,
    pub source: CredentialSource,
}

impl Access {
    /// The source of the keys and which key it was, for errors: `profile
    /// "ci" in /root/.aws/credentials (AWS_PROFILE), access key …MPLE,
    /// with a session token`. Never the secret; of the access key id (not
    /// a secret, but half of one) only the last four characters.
    pub fn describe_keys(&self) -> String {
        let Some(k) = &self.keys else {
            return self.source.to_string();
        };
        let tail = k.shown_id().map(|s| format!(", {s}")).unwrap_or_default();
        let token = if k.session_token.is_some() {
            ", with a session token"
        } else {
            ""
        };
        format!("{}{tail}{token}", self.source)
    }
}

/// The environment to resolve in: a variable's value (tests pass their own).
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, empty values as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Resolve credentials, region and endpoint for an S3 origin (see the
/// module docs for the order).
pub fn resolve(opts: &S3Options, vars: Vars<'_>) -> Result<Access> {
    let var = |n: &str| vars(n).filter(|v| !v.is_empty());
    let home = var("HOME").map(PathBuf::from);
    let in_home = |rel: &str| home.as_ref().map(|h| h.join(rel));
    let cred_file = var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| in_home(".aws/credentials"));
    let conf_file = var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| in_home(".aws/config"));
    let files = Files {
        credentials: read_ini(cred_file.as_deref(), Kind::Credentials)?,
        config: read_ini(conf_file.as_deref(), Kind::Config)?,
    };

    // The profile config lookups use, and whether it was named (then it
    // must exist).
    let (profile, profile_by, named) = match (&opts.profile, var("AWS_PROFILE")) {
        (Some(p), _) => (p.value.clone(), p.from.clone(), true),
        (None, Some(p)) => (p, "AWS_PROFILE".to_string(), true),
        (None, None) => (
            "default".to_string(),
            "the default profile".to_string(),
            false,
        ),
    };
    let prof = files.profile(&profile);
    if named && prof.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "S3 profile {profile:?} ({profile_by}) is in neither {} nor {}",
                files.credentials.shown(),
                files.config.shown()
            ),
        ));
    }

    let env_keys = || -> Result<Option<StaticKeys>> {
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Ok(Some(StaticKeys {
                access_key_id: id,
                secret_access_key: Secret(secret),
                session_token: var("AWS_SESSION_TOKEN").map(Secret),
            })),
            (None, None) => Ok(None),
            (id, _) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is set but {} is not: S3 needs both",
                    if id.is_some() {
                        "AWS_ACCESS_KEY_ID"
                    } else {
                        "AWS_SECRET_ACCESS_KEY"
                    },
                    if id.is_some() {
                        "AWS_SECRET_ACCESS_KEY"
                    } else {
                        "AWS_ACCESS_KEY_ID"
                    }
                ),
            )),
        }
    };
    let from_profile = |by: &str| -> Result<Option<(StaticKeys, CredentialSource)>> {
        let Some(p) = &prof else { return Ok(None) };
        let keys = p.keys(&profile)?;
        Ok(keys.map(|(k, file)| {
            let source = CredentialSource::Profile {
                name: profile.clone(),
                file,
                chosen_by: by.to_string(),
            };
            (k, source)
        }))
    };
    let (keys, source) = if let Some(k) = &opts.keys {
        (
            Some(k.value.clone()),
            CredentialSource::Config {
                from: k.from.clone(),
            },
        )
    } else if opts.profile.is_some() {
        match from_profile(&profile_by)? {
            Some((k, s)) => (Some(k), s),
            None => return Err(no_keys_in(&profile, &profile_by, &files)),
        }
    } else if let Some(k) = env_keys()? {
        (Some(k), CredentialSource::Environment)
    } else {
        match from_profile(&profile_by)? {
            Some((k, s)) => (Some(k), s),
            None if named => return Err(no_keys_in(&profile, &profile_by, &files)),
            None => (None, CredentialSource::Anonymous),
        }
    };

    let prof_value = |key: &str| prof.as_ref().and_then(|p| p.config_value(key));
    let region_text = match &opts.region {
        Some(r) => Some((r.value.0.clone(), r.from.clone())),
        None => var("AWS_REGION")
            .map(|r| (r, "AWS_REGION".to_string()))
            .or_else(|| var("AWS_DEFAULT_REGION").map(|r| (r, "AWS_DEFAULT_REGION".into())))
            .or_else(|| {
                prof_value("region")
                    .map(|(r, file)| (r, format!("profile {profile:?} in {}", file.display())))
            }),
    };
    let (region, region_from) = match region_text {
        Some((r, from)) => (
            r.parse::<Region>()
                .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("{from}: {e}")))?,
            from,
        ),
        None => (Region("us-east-1".into()), "default".to_string()),
    };

    let endpoint_text = match &opts.endpoint {
        Some(e) => Some((Ok(e.value.clone()), e.from.clone())),
        None => var("AWS_ENDPOINT_URL_S3")
            .map(|e| (e, "AWS_ENDPOINT_URL_S3".to_string()))
            .or_else(|| var("AWS_ENDPOINT_URL").map(|e| (e, "AWS_ENDPOINT_URL".into())))
            .or_else(|| {
                prof_value("endpoint_url")
                    .map(|(e, file)| (e, format!("profile {profile:?} in {}", file.display())))
            })
            .map(|(e, from)| (e.parse::<S3Endpoint>(), from)),
    };
    let (endpoint, endpoint_from) = match endpoint_text {
        Some((Ok(e), from)) => (e, from),
        Some((Err(e), from)) => {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{from}: {e}")))
        }
        None => (S3Endpoint::aws(&region), "default".to_string()),
    };

    Ok(Access {
        endpoint,
        endpoint_from,
        region,
        region_from,
        keys,
        source,
    })
}

fn no_keys_in(profile: &str, by: &str, files: &Files) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "S3 profile {profile:?} ({by}) has no aws_access_key_id/aws_secret_access_key \
             in {} or {}",
            files.credentials.shown(),
            files.config.shown()
        ),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `[NAME]` sections.
    Credentials,
    /// `[profile NAME]` and `[default]` sections.
    Config,
}

/// One AWS INI file: profile name -> key -> value.
struct Ini {
    path: Option<PathBuf>,
    profiles: HashMap<String, HashMap<String, String>>,
}

impl Ini {
    fn shown(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "(no file: HOME is not set)".to_string(),
        }
    }
}

struct Files {
    credentials: Ini,
    config: Ini,
}

/// One profile as both files have it.
struct Profile<'a> {
    credentials: Option<(&'a HashMap<String, String>, &'a Path)>,
    config: Option<(&'a HashMap<String, String>, &'a Path)>,
}

impl Files {
    fn profile(&self, name: &str) -> Option<Profile<'_>> {
        fn get<'a>(ini: &'a Ini, name: &str) -> Option<(&'a HashMap<String, String>, &'a Path)> {
            let path = ini.path.as_deref()?;
            ini.profiles.get(name).map(|m| (m, path))
        }
        let p = Profile {
            credentials: get(&self.credentials, name),
            config: get(&self.config, name),
        };
        (p.credentials.is_some() || p.config.is_some()).then_some(p)
    }
}

impl Profile<'_> {
    /// The profile's keys (the credentials file's first) and the file they
    /// are in; an error for a profile whose keys come from elsewhere.
    fn keys(&self, name: &str) -> Result<Option<(StaticKeys, PathBuf)>> {
        for (map, path) in [self.credentials, self.config].into_iter().flatten() {
            let id = map.get("aws_access_key_id").filter(|v| !v.is_empty());
            let secret = map.get("aws_secret_access_key").filter(|v| !v.is_empty());
            match (id, secret) {
                (Some(id), Some(secret)) => {
                    return Ok(Some((
                        StaticKeys {
                            access_key_id: id.clone(),
                            secret_access_key: Secret(secret.clone()),
                            session_token: map
                                .get("aws_session_token")
                                .filter(|v| !v.is_empty())
                                .map(|t| Secret(t.clone())),
                        },
                        path.to_path_buf(),
                    )))
                }
                (None, None) => {}
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "S3 profile {name:?} in {}: aws_access_key_id and \
                             aws_secret_access_key go together",
                            path.display()
                        ),
                    ))
                }
            }
            const ELSEWHERE: &[&str] = &[
                "role_arn",
                "credential_process",
                "sso_session",
                "sso_start_url",
                "web_identity_token_file",
            ];
            if let Some(k) = ELSEWHERE.iter().find(|k| map.contains_key(**k)) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "S3 profile {name:?} in {} gets its keys through {k}, which lazybd \
                         does not do: give it keys (e.g. `aws configure export-credentials \
                         --profile {name} --format env` into its environment)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(None)
    }

    /// A setting of the config file's profile (`region`, `endpoint_url`).
    fn config_value(&self, key: &str) -> Option<(String, PathBuf)> {
        let (map, path) = self.config?;
        map.get(key)
            .filter(|v| !v.is_empty())
            .map(|v| (v.clone(), path.to_path_buf()))
    }
}

/// Read an AWS INI file; a missing one is empty (as for AWS tools), an
/// unreadable one an error naming it.
fn read_ini(path: Option<&Path>, kind: Kind) -> Result<Ini> {
    let text = match path {
        None => String::new(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(format!("reading {}", p.display()), e)),
        },
    };
    Ok(Ini {
        path: path.map(Path::to_path_buf),
        profiles: parse_ini(&text, kind),
    })
}

/// The AWS shared-file dialect: `[section]`, `key = value`, `#`/`;`
/// comments on their own lines; an indented line belongs to the key above
/// it (nested `s3 =` settings), which lazybd does not use, so it is
/// skipped. In a config file a section is `[profile NAME]` or `[default]`
/// (`[sso-session ...]`, `[services ...]` are not profiles).
fn parse_ini(text: &str, kind: Kind) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(section) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let section = section.trim();
            current = match kind {
                Kind::Credentials => Some(section.to_string()),
                Kind::Config if section == "default" => Some("default".into()),
                Kind::Config => section
                    .strip_prefix("profile")
                    .filter(|r| r.starts_with(char::is_whitespace))
                    .map(|r| r.trim().to_string()),
            };
            if let Some(c) = &current {
                out.entry(c.clone()).or_default();
            }
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let (Some(section), Some((k, v))) = (&current, t.split_once('=')) else {
            continue;
        };
        out.entry(section.clone())
            .or_default()
            .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A HOME with `.aws/credentials` and `.aws/config` holding the texts
    /// given, and the variables given (HOME set to it).
    struct World {
        home: tempfile::TempDir,
        vars: HashMap<String, String>,
    }

    impl World {
        fn new(credentials: &str, config: &str) -> World {
            let home = tempfile::tempdir().unwrap();
            std::fs::create_dir(home.path().join(".aws")).unwrap();
            for (name, text) in [("credentials", credentials), ("config", config)] {
                let mut f = std::fs::File::create(home.path().join(".aws").join(name)).unwrap();
                f.write_all(text.as_bytes()).unwrap();
            }
            let mut vars = HashMap::new();
            vars.insert("HOME".into(), home.path().display().to_string());
            World { home, vars }
        }

        fn set(mut self, k: &str, v: &str) -> World {
            self.vars.insert(k.into(), v.into());
            self
        }

        fn resolve(&self, opts: &S3Options) -> Result<Access> {
            resolve(opts, &|n: &str| self.vars.get(n).cloned())
        }

        fn ok(&self, opts: &S3Options) -> Access {
            self.resolve(opts).unwrap()
        }

        fn err(&self, opts: &S3Options) -> String {
            self.resolve(opts).unwrap_err().to_string()
        }

        fn file(&self, name: &str) -> PathBuf {
            self.home.path().join(".aws").join(name)
        }
    }

    const CREDS: &str = "\
# comment
[default]
aws_access_key_id = DEFAULTKEYID0001
aws_secret_access_key = default-secret

[ci]
aws_access_key_id=CIKEYID000000002
aws_secret_access_key=ci-secret
aws_session_token = ci-token
";
    const CONFIG: &str = "\
[default]
region = eu-west-1
[profile ci]
region = eu-central-1
endpoint_url = http://127.0.0.1:9000
s3 =
  addressing_style = path
[profile roles]
role_arn = arn:aws:iam::1:role/x
source_profile = default
[sso-session corp]
region = us-west-2
";

    fn key_id(a: &Access) -> Option<&str> {
        a.keys.as_ref().map(|k| k.access_key_id.as_str())
    }

    fn opts_keys(id: &str) -> S3Options {
        S3Options {
            keys: Some(Given::new(
                StaticKeys {
                    access_key_id: id.into(),
                    secret_access_key: Secret::new("config-secret"),
                    session_token: None,
                },
                "config lazybd.toml: s3.access_key_id",
            )),
            ..S3Options::default()
        }
    }

    fn opts_profile(p: &str) -> S3Options {
        S3Options {
            profile: Some(Given::new(p.to_string(), "--s3-profile")),
            ..S3Options::default()
        }
    }

    #[test]
    fn keys_lazybd_then_environment_then_profiles_then_anonymous() {
        let w = World::new(CREDS, CONFIG)
            .set("AWS_ACCESS_KEY_ID", "ENVKEYID00000003")
            .set("AWS_SECRET_ACCESS_KEY", "env-secret")
            .set("AWS_PROFILE", "ci");
        // lazybd's own keys win over everything.
        let a = w.ok(&opts_keys("CFGKEY"));
        assert_eq!(key_id(&a), Some("CFGKEY"));
        assert!(matches!(a.source, CredentialSource::Config { .. }));
        // A profile lazybd was told wins over the environment's keys...
        let a = w.ok(&opts_profile("default"));
        assert_eq!(key_id(&a), Some("DEFAULTKEYID0001"));
        assert_eq!(
            a.source,
            CredentialSource::Profile {
                name: "default".into(),
                file: w.file("credentials"),
                chosen_by: "--s3-profile".into()
            }
        );
        // ...but AWS_PROFILE does not (as for AWS tools).
        let a = w.ok(&S3Options::default());
        assert_eq!(key_id(&a), Some("ENVKEYID00000003"));
        assert_eq!(a.source, CredentialSource::Environment);
        // Without keys in the environment: AWS_PROFILE, with its token.
        let w = World::new(CREDS, CONFIG).set("AWS_PROFILE", "ci");
        let a = w.ok(&S3Options::default());
        assert_eq!(key_id(&a), Some("CIKEYID000000002"));
        let k = a.keys.as_ref().unwrap();
        assert_eq!(
            k.session_token.as_ref().map(Secret::expose),
            Some("ci-token")
        );
        assert_eq!(k.secret_access_key.expose(), "ci-secret");
        // Else "default"; else anonymous.
        let w = World::new(CREDS, CONFIG);
        assert_eq!(
            key_id(&w.ok(&S3Options::default())),
            Some("DEFAULTKEYID0001")
        );
        let w = World::new("", "");
        let a = w.ok(&S3Options::default());
        assert_eq!(
            (a.keys.is_none(), a.source),
            (true, CredentialSource::Anonymous)
        );
        // No HOME at all: still anonymous, no error.
        let a = resolve(&S3Options::default(), &|_| None).unwrap();
        assert_eq!(a.source, CredentialSource::Anonymous);
    }

    #[test]
    fn environment_keys_with_a_token_and_empty_values_unset() {
        let w = World::new("", "")
            .set("AWS_ACCESS_KEY_ID", "ENV")
            .set("AWS_SECRET_ACCESS_KEY", "s")
            .set("AWS_SESSION_TOKEN", "t");
        let k = w.ok(&S3Options::default()).keys.unwrap();
        assert_eq!(k.session_token, Some(Secret::new("t")));
        let w = World::new(CREDS, "")
            .set("AWS_ACCESS_KEY_ID", "")
            .set("AWS_SECRET_ACCESS_KEY", "")
            .set("AWS_PROFILE", "");
        assert_eq!(
            key_id(&w.ok(&S3Options::default())),
            Some("DEFAULTKEYID0001")
        );
        let e = World::new("", "")
            .set("AWS_ACCESS_KEY_ID", "ENV")
            .err(&S3Options::default());
        assert_eq!(
            e,
            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: S3 needs both"
        );
    }

    #[test]
    fn shared_files_from_their_variables() {
        let w = World::new("", "");
        let dir = tempfile::tempdir().unwrap();
        let (c, f) = (dir.path().join("c"), dir.path().join("f"));
        std::fs::write(
            &c,
            "[x]\naws_access_key_id = XKEY\naws_secret_access_key = xs\n",
        )
        .unwrap();
        std::fs::write(&f, "[profile x]\nregion = ap-south-1\n").unwrap();
        let w = w
            .set("AWS_SHARED_CREDENTIALS_FILE", &c.display().to_string())
            .set("AWS_CONFIG_FILE", &f.display().to_string())
            .set("AWS_PROFILE", "x");
        let a = w.ok(&S3Options::default());
        assert_eq!(key_id(&a), Some("XKEY"));
        assert_eq!(a.region.as_str(), "ap-south-1");
        assert!(
            a.region_from.contains(&f.display().to_string()),
            "{}",
            a.region_from
        );
    }

    #[test]
    fn a_named_profile_must_exist_and_hold_keys() {
        let w = World::new(CREDS, CONFIG).set("AWS_PROFILE", "nope");
        let e = w.err(&S3Options::default());
        assert!(
            e.starts_with("S3 profile \"nope\" (AWS_PROFILE) is in neither "),
            "{e}"
        );
        let e = w.err(&opts_profile("typo"));
        assert!(e.starts_with("S3 profile \"typo\" (--s3-profile)"), "{e}");
        let e = World::new(CREDS, CONFIG).err(&opts_profile("roles"));
        assert!(
            e.contains("role_arn") && e.contains("export-credentials"),
            "{e}"
        );
        let e = World::new("[half]\naws_access_key_id = A\n", "").err(&opts_profile("half"));
        assert!(e.contains("go together"), "{e}");
        // A profile with only a region (no keys), named: an error, not anonymous.
        let e = World::new("", "[profile r]\nregion = eu-west-3\n").err(&opts_profile("r"));
        assert!(e.contains("has no aws_access_key_id"), "{e}");
        // [sso-session x] and [services x] are no profiles.
        let e = World::new("", CONFIG).err(&opts_profile("corp"));
        assert!(e.contains("is in neither"), "{e}");
    }

    #[test]
    fn region_lazybd_then_environment_then_profile_then_default() {
        let w = World::new(CREDS, CONFIG)
            .set("AWS_REGION", "us-west-1")
            .set("AWS_DEFAULT_REGION", "us-west-2");
        let given = S3Options {
            region: Some(Given::new("sa-east-1".parse().unwrap(), "--s3-region")),
            ..S3Options::default()
        };
        let a = w.ok(&given);
        assert_eq!(
            (a.region.as_str(), a.region_from.as_str()),
            ("sa-east-1", "--s3-region")
        );
        let a = w.ok(&S3Options::default());
        assert_eq!(
            (a.region.as_str(), a.region_from.as_str()),
            ("us-west-1", "AWS_REGION")
        );
        let w = World::new(CREDS, CONFIG).set("AWS_DEFAULT_REGION", "us-west-2");
        assert_eq!(w.ok(&S3Options::default()).region.as_str(), "us-west-2");
        // The profile's region: the default profile's, or the one chosen.
        let w = World::new(CREDS, CONFIG);
        assert_eq!(w.ok(&S3Options::default()).region.as_str(), "eu-west-1");
        assert_eq!(w.ok(&opts_profile("ci")).region.as_str(), "eu-central-1");
        // Even with the keys from the environment, AWS_PROFILE's region.
        let w = World::new(CREDS, CONFIG)
            .set("AWS_PROFILE", "ci")
            .set("AWS_ACCESS_KEY_ID", "E")
            .set("AWS_SECRET_ACCESS_KEY", "e");
        assert_eq!(w.ok(&S3Options::default()).region.as_str(), "eu-central-1");
        let a = World::new("", "").ok(&S3Options::default());
        assert_eq!(
            (a.region.as_str(), a.region_from.as_str()),
            ("us-east-1", "default")
        );
        let e = World::new("", "")
            .set("AWS_REGION", "EU West")
            .err(&S3Options::default());
        assert!(e.starts_with("AWS_REGION: region \"EU West\""), "{e}");
    }

    #[test]
    fn endpoint_lazybd_then_environment_then_profile_then_aws() {
        let w = World::new(CREDS, CONFIG)
            .set("AWS_ENDPOINT_URL_S3", "http://s3only:1")
            .set("AWS_ENDPOINT_URL", "http://all:2");
        let given = S3Options {
            endpoint: Some(Given::new(
                "http://127.0.0.1:8333".parse().unwrap(),
                "config c.toml: s3.endpoint",
            )),
            ..S3Options::default()
        };
        let a = w.ok(&given);
        assert_eq!(a.endpoint.url().as_str(), "http://127.0.0.1:8333/");
        assert!(!a.endpoint.is_aws());
        assert_eq!(
            w.ok(&S3Options::default()).endpoint.url().as_str(),
            "http://s3only:1/"
        );
        let w = World::new(CREDS, CONFIG).set("AWS_ENDPOINT_URL", "http://all:2");
        assert_eq!(
            w.ok(&S3Options::default()).endpoint_from,
            "AWS_ENDPOINT_URL"
        );
        let w = World::new(CREDS, CONFIG);
        let a = w.ok(&opts_profile("ci"));
        assert_eq!(a.endpoint.url().as_str(), "http://127.0.0.1:9000/");
        // AWS's own, in the region resolved.
        let a = w.ok(&S3Options::default());
        assert_eq!(
            a.endpoint.url().as_str(),
            "https://s3.eu-west-1.amazonaws.com/"
        );
        assert!(a.endpoint.is_aws());
        let a = World::new("", "")
            .set("AWS_REGION", "cn-north-1")
            .ok(&S3Options::default());
        assert_eq!(
            a.endpoint.url().as_str(),
            "https://s3.cn-north-1.amazonaws.com.cn/"
        );
        let e = World::new("", "")
            .set("AWS_ENDPOINT_URL", "ftp://x")
            .err(&S3Options::default());
        assert!(
            e.starts_with("AWS_ENDPOINT_URL: endpoint \"ftp://x\""),
            "{e}"
        );
    }

    #[test]
    fn endpoints_and_regions_are_checked() {
        assert!(
            "http://h:1/base"
                .parse::<S3Endpoint>()
                .unwrap()
                .url()
                .path()
                == "/base/"
        );
        for bad in ["h:1", "ftp://h", "http://u:p@h", "http://h/?x=1", ""] {
            assert!(bad.parse::<S3Endpoint>().is_err(), "{bad}");
        }
        for bad in ["", "EU", "eu_west", "a b"] {
            assert!(bad.parse::<Region>().is_err(), "{bad:?}");
        }
        assert!("eu-west-1".parse::<Region>().is_ok());
    }

    #[test]
    fn secrets_are_never_shown() {
        let w = World::new(CREDS, CONFIG).set("AWS_PROFILE", "ci");
        let a = w.ok(&S3Options::default());
        let all = format!("{a:?} {} {}", a.describe_keys(), a.source);
        for secret in ["ci-secret", "ci-token", "CIKEYID000000002"] {
            assert!(!all.contains(secret), "{secret} in {all}");
        }
        assert!(a
            .describe_keys()
            .ends_with("access key …0002, with a session token"));
        let s = format!("{:?}", opts_keys("K"));
        assert!(!s.contains("config-secret"), "{s}");
        // Short key ids are not shown at all.
        let a = World::new("", "")
            .set("AWS_ACCESS_KEY_ID", "AK")
            .set("AWS_SECRET_ACCESS_KEY", "SK")
            .ok(&S3Options::default());
        assert_eq!(
            a.describe_keys(),
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"
        );
    }

    #[test]
    fn ini_dialect() {
        let m = parse_ini(CONFIG, Kind::Config);
        let mut names: Vec<_> = m.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["ci", "default", "roles"]);
        assert_eq!(
            m["ci"].get("endpoint_url").unwrap(),
            "http://127.0.0.1:9000"
        );
        assert!(
            !m["ci"].contains_key("addressing_style"),
            "nested keys are skipped"
        );
        let m = parse_ini("[a]\n; c\nKEY = v = w\n[ b ]\nx=1\n", Kind::Credentials);
        assert_eq!(m["a"]["key"], "v = w");
        assert_eq!(m["b"]["x"], "1");
    }
}

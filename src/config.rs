//! The configuration file (`lazybd serve --config lazybd.toml`): listeners,
//! cache, origin settings and any number of exports.
//!
//! ```toml
//! [server]
//! listen = ["127.0.0.1:10809", "unix:/run/lazybd/nbd.sock"]
//! cache_dir = "/var/cache/lazybd"
//! control = "/run/lazybd/control.sock"   # `lazybd export add/remove/list`; "none": off
//! metrics = "127.0.0.1:9109"              # Prometheus, GET /metrics
//! block_size = "4k"
//! cache_size = "50G"                      # LRU eviction of clean blocks
//! tls = "require"                         # or "on" (optional), "off"
//! tls_certificates = "/etc/pki/lazybd"    # ca-cert.pem, server-cert.pem, server-key.pem
//! tls_verify_peer = true                  # client certificates from ca-cert.pem
//! max_connections = 1024
//! max_buffered = "1G"                     # read replies held for all clients
//! send_timeout_secs = 120                 # drop a client that stops reading
//!
//! [origin]
//! connections = 16
//! timeout_secs = 30
//! retries = 4                           # default: as many as the deadline allows
//! deadline_secs = 30                      # a read fails with EIO after this
//! hedge = "auto"                          # or "off", or milliseconds
//! headers = ["X-Auth-Token: secret"]
//!
//! [s3]                                    # s3://BUCKET/KEY origins (else the AWS
//!                                         # variables and ~/.aws files; src/origin/aws.rs)
//! endpoint = "http://127.0.0.1:8333"      # an S3-compatible server (path-style); default AWS
//! region = "eu-west-1"
//! # profile = "images"                    # a profile of ~/.aws/credentials, or:
//! access_key_id = "AKIAIOSFODNN7EXAMPLE"
//! secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
//! # session_token = "..."                 # with temporary credentials
//!
//! [boot]
//! readahead = true                        # sequential readahead per export
//! profile = true                          # replay boot profiles at open
//! record_profile = 60                     # record one (seconds; 0: until stopped)
//! hydrate = false                         # fetch whole images in the background
//! hydrate_rate = "200M"                   # bytes per second
//!
//! [[export]]
//! name = "base"
//! image = "https://images.example/debian-12.raw"
//! hydrate = true                          # this image only
//!
//! [[export]]
//! name = "vm1"
//! image = "https://images.example/debian-12.raw"
//! writable = true
//! overlay_dir = "/var/lib/lazybd/vm1"
//! ```
//!
//! Unknown keys are errors (a typo must not silently change behaviour);
//! messages name the key and line. A flag of `lazybd serve` wins over its
//! key, a key over the default (resolved in the binary, `src/cli/settings.rs`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::origin::{Secret, StaticKeys};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub origin: OriginSection,
    #[serde(default)]
    pub boot: BootSection,
    #[serde(default)]
    pub s3: S3Section,
    #[serde(default)]
    pub peers: PeersSection,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    pub readahead: Option<bool>,
    /// Replay boot profiles.
    pub profile: Option<bool>,
    /// Seconds to record a boot profile for (0: until stopped).
    pub record_profile: Option<u64>,
    pub hydrate: Option<bool>,
    /// Bytes per second, e.g. "200M".
    pub hydrate_rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default)]
    pub listen: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub block_size: Option<String>,
    pub max_connections: Option<usize>,
    /// Read-reply bytes all clients may hold in memory, e.g. "1G".
    pub max_buffered: Option<String>,
    /// Drop a client that takes no reply bytes for this long.
    pub send_timeout_secs: Option<u64>,
    /// Prometheus endpoint, HOST:PORT.
    pub metrics: Option<String>,
    /// Limit on cached data across images, e.g. "50G".
    pub cache_size: Option<String>,
    /// TLS for NBD clients: "off", "on" or "require".
    pub tls: Option<crate::tls::TlsMode>,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem.
    pub tls_certificates: Option<PathBuf>,
    /// Require client certificates issued by ca-cert.pem.
    pub tls_verify_peer: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSection {
    pub connections: Option<usize>,
    pub timeout_secs: Option<u64>,
    pub retries: Option<u32>,
    /// Seconds a read may keep trying the origin before EIO.
    pub deadline_secs: Option<u64>,
    /// "auto", "off" or milliseconds.
    pub hedge: Option<String>,
    #[serde(default)]
    pub headers: Vec<String>,
    /// A file of `Name: value` lines, re-read on reload (SIGHUP).
    pub header_file: Option<PathBuf>,
    /// HTTP proxy URL, or "none" (default: the *_PROXY environment).
    pub proxy: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// "auto" (one published beside the image), "none", or a manifest file.
    pub manifest: Option<String>,
}

/// Sharing cached blocks with other hosts (`peer/`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersSection {
    /// Serve this host's cached images to peers at this address.
    pub listen: Option<String>,
    /// This host's URL as the peers list names it.
    pub advertise: Option<String>,
    /// Peer base URLs.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A file of peer URLs, one per line, re-read on reload.
    pub peers_file: Option<PathBuf>,
    /// A file holding the shared peer token.
    pub token_file: Option<PathBuf>,
    /// Use peers for images without a manifest.
    pub trust_unverified: Option<bool>,
    pub timeout_ms: Option<u64>,
}

/// `s3://` origins. Keys here win over the AWS environment (see
/// `origin/aws.rs`); `Secret` values never show in `Debug`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A profile of the AWS shared files.
    pub profile: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

impl S3Section {
    /// The keys, if given (checked at parse: both halves, or neither).
    pub fn keys(&self) -> Option<StaticKeys> {
        Some(StaticKeys {
            access_key_id: self.access_key_id.clone()?,
            secret_access_key: self.secret_access_key.clone()?,
            session_token: self.session_token.clone(),
        })
    }

    fn check(&self) -> std::result::Result<(), String> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => return Err("s3.access_key_id: needs secret_access_key".into()),
            (None, Some(_)) => return Err("s3.secret_access_key: needs access_key_id".into()),
            (None, None) if self.session_token.is_some() => {
                return Err("s3.session_token: needs access_key_id and secret_access_key".into())
            }
            _ => {}
        }
        if self.profile.is_some() && self.access_key_id.is_some() {
            return Err(
                "s3.profile: a profile or access_key_id/secret_access_key, not both".into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub writable: bool,
    pub overlay_dir: Option<PathBuf>,
    pub description: Option<String>,
    #[serde(default)]
    pub hydrate: bool,
    /// raw, qcow2 or auto (see `lazybd::format`).
    pub format: Option<crate::format::Format>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| e.context_prefix(format!("config {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<FileConfig> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                e.to_string().trim_end().to_string(),
            )
        })?;
        cfg.s3
            .check()
            .map_err(|m| Error::new(ErrorKind::InvalidInput, m))?;
        let mut seen = HashSet::new();
        for (i, e) in cfg.exports.iter().enumerate() {
            if !seen.insert(e.name.as_str()) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("export[{i}].name: duplicate export name {:?}", e.name),
                ));
            }
            validate_name(&e.name).map_err(|m| {
                Error::new(ErrorKind::InvalidInput, format!("export[{i}].name: {m}"))
            })?;
            if e.image.trim().is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("export[{i}].image: must name an image (URL or path)"),
                ));
            }
            if e.overlay_dir.is_some() && !e.writable {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("export[{i}].overlay_dir: only a writable export has an overlay (set writable = true)"),
                ));
            }
        }
        Ok(cfg)
    }
}

/// Export names become directory names and NBD strings: keep them plain.
pub(crate) fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        || name.starts_with('.')
    {
        return Err(format!(
            "{name:?}: use letters, digits, '.', '_' and '-' (not starting with '.')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c = FileConfig::parse(
            r#"
            [server]
            listen = ["127.0.0.1:10809", "unix:/tmp/x.sock"]
            cache_dir = "/tmp/c"
            [origin]
            headers = ["A: b"]
            [[export]]
            name = "base"
            image = "http://h/x.raw"
            [[export]]
            name = "vm1"
            image = "http://h/x.raw"
            writable = true
            "#,
        )
        .unwrap();
        assert_eq!(c.exports.len(), 2);
        assert!(c.exports[1].writable);
        assert_eq!(c.server.listen.len(), 2);
    }

    /// The example in this module's documentation is a valid config.
    #[test]
    fn the_documented_example_parses() {
        let text: String = include_str!("config.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .skip_while(|l| l.trim() != "```toml")
            .skip(1)
            .take_while(|l| l.trim() != "```")
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect();
        let c = FileConfig::parse(&text).unwrap();
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.server.max_buffered.as_deref(), Some("1G"));
        assert_eq!(c.server.send_timeout_secs, Some(120));
        assert_eq!(c.boot.hydrate_rate.as_deref(), Some("200M"));
        assert_eq!(c.s3.region.as_deref(), Some("eu-west-1"));
        assert!(c.s3.keys().is_some());
    }

    #[test]
    fn s3_keys_go_together_and_stay_hidden() {
        let c = FileConfig::parse(
            "[s3]\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\nsession_token = \"TK\"\n",
        )
        .unwrap();
        let k = c.s3.keys().unwrap();
        assert_eq!(
            (
                k.secret_access_key.expose(),
                k.session_token.unwrap().expose()
            ),
            ("SK", "TK")
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("SK") && !shown.contains("TK"), "{shown}");
        for (toml, want) in [
            (
                "access_key_id = \"A\"",
                "s3.access_key_id: needs secret_access_key",
            ),
            (
                "secret_access_key = \"S\"",
                "s3.secret_access_key: needs access_key_id",
            ),
            ("session_token = \"T\"", "s3.session_token: needs"),
            (
                "profile = \"p\"\naccess_key_id = \"A\"\nsecret_access_key = \"S\"",
                "s3.profile: a profile or",
            ),
        ] {
            let e = FileConfig::parse(&format!("[s3]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{toml}: {e}");
        }
        let e = FileConfig::parse("[s3]\nsecret = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret"), "{e}");
    }

    #[test]
    fn tls_keys() {
        let c = FileConfig::parse(
            "[server]\ntls = \"require\"\ntls_certificates = \"/p\"\ntls_verify_peer = true\n",
        )
        .unwrap();
        assert_eq!(c.server.tls, Some(crate::tls::TlsMode::Require));
        assert_eq!(c.server.tls_verify_peer, Some(true));
        let e = FileConfig::parse("[server]\ntls = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls") && e.contains("require"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = FileConfig::parse("[server]\nlisten = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = FileConfig::parse("[server]\nlisen = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = FileConfig::parse(
            "[[export]]\nname = \"a\"\nimage = \"x\"\n[[export]]\nname = \"a\"\nimage = \"y\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("export[1].name"), "{e}");
        let e = FileConfig::parse("[[export]]\nname = \"../x\"\nimage = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("export[0].name"), "{e}");
        let e =
            FileConfig::parse("[[export]]\nname = \"a\"\nimage = \"x\"\noverlay_dir = \"/o\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("overlay_dir"), "{e}");
    }
}

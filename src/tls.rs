//! NBD over TLS (`NBD_OPT_STARTTLS`): the server's mode, its certificates
//! and the acceptor the connection code upgrades a socket with.
//!
//! Modes, in the terms of the NBD specification's TLS section:
//! - `off` (NOTLS): STARTTLS is refused with `NBD_REP_ERR_POLICY`.
//! - `on` (SELECTIVETLS without TLS-only exports): a client may upgrade
//!   with STARTTLS or stay in plaintext.
//! - `require` (FORCEDTLS): before TLS every option but STARTTLS and ABORT
//!   is refused with `NBD_REP_ERR_TLS_REQD`, and EXPORT_NAME (which cannot
//!   carry an error) ends the session.
//!
//! The handshake logic lives in `nbd::handshake`; this module only holds
//! configuration. Certificates come from one directory laid out as for
//! qemu's `tls-creds-x509` and `nbdkit --tls-certificates`: `ca-cert.pem`,
//! `server-cert.pem` (the chain, leaf first) and `server-key.pem`. The CA
//! is read only to verify clients (`verify_peer`). Crypto is rustls with the
//! ring provider, the one the HTTPS origin already uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, ErrorKind, Result};

/// CA certificate(s) that client certificates must chain to.
const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain, leaf first.
const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1).
const SERVER_KEY: &str = "server-key.pem";

/// Whether NBD clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("TLS mode {s:?}: use off, on or require"),
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// TLS settings as configured (`--tls`, `--tls-certificates`,
/// `--tls-verify-peer`, or the config file's `[server]` keys).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub mode: TlsMode,
    /// Directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub certificates: Option<PathBuf>,
    /// Require a client certificate issued by `ca-cert.pem`.
    pub verify_peer: bool,
}

/// TLS ready to serve: the mode (never `Off`) and the acceptor.
pub(crate) struct Tls {
    mode: TlsMode,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

/// The bytes of `dir/name`; errors name the file.
fn read(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path)
        .map_err(|e| Error::io(format!("TLS: reading {}", path.display()), e))?;
    Ok((path, bytes))
}

/// Every certificate of a PEM file (at least one).
fn certificates(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let (path, pem) = read(dir, name)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("TLS: {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "TLS: {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl Tls {
    /// Load the certificates for `opts`; `None` when TLS is off. Every
    /// problem is a start-up error naming the file.
    pub(crate) fn load(opts: &TlsOptions) -> Result<Option<Arc<Tls>>> {
        if opts.mode == TlsMode::Off {
            if opts.certificates.is_some() || opts.verify_peer {
                tracing::warn!("TLS is off: TLS certificates and peer verification are ignored");
            }
            return Ok(None);
        }
        let dir = opts.certificates.as_deref().ok_or_else(|| {
            invalid(format!(
                "TLS {}: give the certificates directory (--tls-certificates DIR, with {SERVER_CERT} and {SERVER_KEY})",
                opts.mode
            ))
        })?;
        let chain = certificates(dir, SERVER_CERT)?;
        let (key_path, pem) = read(dir, SERVER_KEY)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            invalid(format!(
                "TLS: {} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                key_path.display()
            ))
        })?;
        // Explicit provider: the process-wide default may be unset, and
        // ring is what the HTTPS origin (reqwest) already links.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        let builder = if opts.verify_peer {
            let ca = dir.join(CA_CERT);
            let mut roots = RootCertStore::empty();
            for c in certificates(dir, CA_CERT)? {
                roots
                    .add(c)
                    .map_err(|e| invalid(format!("TLS: {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(format!("TLS: {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            invalid(format!(
                "TLS: {} and {} do not make a usable certificate and key: {e}",
                dir.join(SERVER_CERT).display(),
                key_path.display()
            ))
        })?;
        tracing::info!(mode = %opts.mode, certificates = %dir.display(),
            verify_peer = opts.verify_peer, "TLS enabled for NBD clients");
        Ok(Some(Arc::new(Tls {
            mode: opts.mode,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })))
    }

    /// `On` or `Require`.
    pub(crate) fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The server side of a TLS handshake on `s` (after STARTTLS's ACK).
    pub(crate) fn accept<S>(&self, s: S) -> tokio_rustls::Accept<S>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.acceptor.accept(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        for m in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            assert_eq!(m.to_string().parse::<TlsMode>().unwrap(), m);
        }
        assert!("yes".parse::<TlsMode>().is_err());
    }

    #[test]
    fn off_needs_nothing_and_on_needs_a_directory() {
        assert!(Tls::load(&TlsOptions::default()).unwrap().is_none());
        let e = Tls::load(&TlsOptions {
            mode: TlsMode::On,
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--tls-certificates"), "{e}");
    }
}

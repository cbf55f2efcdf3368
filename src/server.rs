//! Listeners and connections: TCP and Unix sockets, a connection limit, a
//! handshake deadline, TLS after STARTTLS, and graceful shutdown (stop
//! accepting, answer what is in flight, then return).
//!
//! A connection is generic over its stream: plaintext TCP and Unix
//! connections run the handshake and transmission code on the socket
//! itself; one that sends STARTTLS continues on a TLS stream wrapping it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::export::Exports;
use crate::nbd::handshake::{self, Negotiated, Outcome};
use crate::nbd::transmission;
use crate::tls::{Tls, TlsMode};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "unix: needs a socket path",
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        if !s.contains(':') {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("listen address {s:?}: use HOST:PORT or unix:PATH"),
            ));
        }
        Ok(ListenAddr::Tcp(s.to_owned()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Server-wide limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// A client that has not finished the handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Read-reply bytes all connections together may hold in memory (each
    /// connection is also held to 64 MiB of payload).
    pub max_buffered: u64,
    /// A client that takes no reply bytes for this long while replies wait
    /// is dropped.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(30),
            max_buffered: 1 << 30,
            send_timeout: Duration::from_secs(120),
        }
    }
}

/// A bound listener.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub(crate) async fn bind(addr: &ListenAddr) -> Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|e| Error::io(format!("listening on {a}"), e))?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Unix(p) => {
                let l = crate::util::bind_unix(p, "NBD socket")?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The bound address (TCP port resolved when 0 was asked).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Everything a connection needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) exports: Arc<Exports>,
    pub(crate) limits: Limits,
    /// TLS for clients that send STARTTLS; None: TLS off.
    pub(crate) tls: Option<Arc<Tls>>,
    /// Memory and send-time bounds shared by all connections.
    pub(crate) budget: transmission::Budget,
}

/// A handshake step's result, logged; `None` when the connection is done.
fn handshake_step(
    r: std::result::Result<Result<Outcome>, tokio::time::error::Elapsed>,
    peer: &str,
) -> Option<Outcome> {
    match r {
        Err(_) => tracing::warn!(%peer, "handshake timed out; dropping client"),
        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "handshake failed"),
        Ok(Ok(Outcome::Closed)) => tracing::debug!(%peer, "client ended the handshake"),
        Ok(Ok(o)) => return Some(o),
    }
    None
}

async fn connection<S>(mut s: S, peer: String, shared: Shared, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One deadline for the whole handshake, TLS included.
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let mode = shared.tls.as_ref().map_or(TlsMode::Off, |t| t.mode());
    let first = tokio::time::timeout_at(
        deadline,
        handshake::negotiate(&mut s, &shared.exports, mode),
    )
    .await;
    let session = match handshake_step(first, &peer) {
        Some(Outcome::Transmission(n)) => {
            return transmit(s, n, &peer, shutdown, false, shared.budget.clone()).await
        }
        Some(Outcome::StartTls(session)) => session,
        _ => return,
    };
    // The handshake answers STARTTLS with ACK only when TLS is configured.
    let Some(tls) = shared.tls.as_ref() else {
        return;
    };
    let mut t = match tokio::time::timeout_at(deadline, tls.accept(s)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "TLS handshake timed out; dropping client");
            return;
        }
    };
    let next = tokio::time::timeout_at(
        deadline,
        handshake::after_starttls(&mut t, &shared.exports, session),
    )
    .await;
    match handshake_step(next, &peer) {
        Some(Outcome::Transmission(n)) => {
            transmit(t, n, &peer, shutdown, true, shared.budget.clone()).await
        }
        // ABORT or a failure: close TLS properly when the peer is still there.
        _ => {
            let _ = tokio::time::timeout(Duration::from_secs(1), t.shutdown()).await;
        }
    }
}

/// The transmission phase of one client, counted on its export.
async fn transmit<S>(
    s: S,
    neg: Negotiated,
    peer: &str,
    shutdown: watch::Receiver<bool>,
    tls: bool,
    budget: transmission::Budget,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ex = neg.export.clone();
    let export = ex.name.clone();
    ex.clients
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%peer, %export, structured = neg.structured, base_allocation = neg.base_allocation, tls, "client connected");
    match transmission::serve(s, neg, shutdown, budget).await {
        Ok(()) => tracing::info!(%peer, %export, "client disconnected"),
        Err(e) => tracing::warn!(%peer, %export, error = %e, "connection closed"),
    }
    ex.clients
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Accept on every listener until `shutdown` turns true, then wait for the
/// connections to finish their in-flight requests.
///
/// Each connection holds one permit of `slots`; taking all permits back is
/// how shutdown knows every connection has finished.
pub(crate) async fn run(
    listeners: Vec<Listener>,
    shared: Shared,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let max = shared.limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let mut accepts = JoinSet::new();
    let mut sockets = Vec::new();
    for l in listeners {
        tracing::info!(listen = %l.describe(), "listening");
        if let Listener::Unix(_, p) = &l {
            sockets.push(p.clone());
        }
        accepts.spawn(accept_loop(
            l,
            shared.clone(),
            slots.clone(),
            shutdown.clone(),
        ));
    }
    while accepts.join_next().await.is_some() {}
    if slots.available_permits() < max {
        tracing::info!(
            connections = max - slots.available_permits(),
            "shutting down: finishing in-flight requests"
        );
    }
    let _all = slots.acquire_many(max as u32).await;
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

async fn accept_loop(
    l: Listener,
    shared: Shared,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (shared, stop2) = (shared.clone(), stop.clone());
        let accepted = match &l {
            Listener::Tcp(t) => tokio::select! {
                r = t.accept() => r.map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        connection(s, peer.to_string(), shared, stop2).await;
                        drop(permit);
                    });
                }),
                _ = stop.wait_for(|s| *s) => return,
            },
            Listener::Unix(u, _) => tokio::select! {
                r = u.accept() => r.map(|(s, _)| {
                    tokio::spawn(async move {
                        connection(s, "unix".into(), shared, stop2).await;
                        drop(permit);
                    });
                }),
                _ = stop.wait_for(|s| *s) => return,
            },
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

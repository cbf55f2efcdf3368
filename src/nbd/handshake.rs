//! Fixed-newstyle handshake and option haggling.
//!
//! Supported: EXPORT_NAME, ABORT, LIST, INFO, GO (NBD_INFO_EXPORT, NAME,
//! DESCRIPTION, BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and
//! SET_META_CONTEXT with `base:allocation`, STARTTLS when TLS is configured
//! (refused by policy otherwise). EXTENDED_HEADERS and unknown options get
//! ERR_UNSUP and negotiation goes on, as the spec requires.
//!
//! STARTTLS changes the stream under the handshake, so it ends [`negotiate`]
//! with [`Outcome::StartTls`]; the caller runs the TLS handshake and
//! continues with `after_starttls` on the TLS stream. What was negotiated
//! in plaintext does not carry over (spec), only the greeting's flags.
//!
//! [`negotiate`] and what it returns are public for the fuzz target
//! `handshake`, which drives it with arbitrary client bytes.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{
    self, cflag, hflag, info, opt, rep, tflag, InfoRequest, MetaContextRequest, OptionHeader,
};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{Export, Exports};
use crate::tls::TlsMode;

/// What the client and server agreed on.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// TLS as one connection sees it. Decided at the greeting and kept for the
/// connection's lifetime, as the spec requires of a server's TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// No TLS (NOTLS): STARTTLS is refused by policy.
    Off,
    /// The client may upgrade or stay in plaintext.
    Offered,
    /// Nothing but STARTTLS and ABORT until the client upgrades (FORCEDTLS).
    Required,
    /// The session runs over TLS.
    Active,
}

/// What survives STARTTLS: the greeting's outcome, not negotiated options.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    no_zeroes: bool,
    tls: TlsState,
}

/// How the handshake ended.
pub enum Outcome {
    /// Enter transmission with these settings.
    Transmission(Negotiated),
    /// STARTTLS was acknowledged: run the TLS handshake on the stream, then
    /// `after_starttls`.
    StartTls(Session),
    /// The client aborted or asked only for information.
    Closed,
}

/// Transmission flags advertised for `e` given the negotiated options.
fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
    if e.read_only() {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    if e.multi_conn {
        f |= tflag::CAN_MULTI_CONN;
    }
    f
}

fn proto(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, msg)
}

fn io_err(e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Protocol, "handshake I/O", e)
}

struct Haggle<'a, S> {
    s: &'a mut S,
    exports: &'a Exports,
    tls: TlsState,
    structured: bool,
    /// Export name and whether base:allocation was selected by SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Haggle<'_, S> {
    async fn reply(&mut self, option: u32, typ: u32, data: &[u8]) -> Result<()> {
        self.s
            .write_all(&wire::option_reply(option, typ, data))
            .await
            .map_err(io_err)
    }

    async fn error(&mut self, option: u32, typ: u32, msg: &str) -> Result<()> {
        tracing::debug!(option, typ, msg, "option refused");
        // Messages may quote what the client sent; they must stay strings.
        let msg = wire::truncate_str(msg, wire::MAX_STRING);
        self.reply(option, typ, msg.as_bytes()).await
    }

    async fn flush(&mut self) -> Result<()> {
        self.s.flush().await.map_err(io_err)
    }

    /// NBD_OPT_INFO / NBD_OPT_GO. Returns the export on GO success.
    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Arc<Export>>> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, rep::ERR_INVALID, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let Some(export) = self.exports.get(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            self.error(option, rep::ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        let flags = transmission_flags(&export, self.structured);
        self.reply(
            option,
            rep::INFO,
            &wire::info_export(export.device.size(), flags),
        )
        .await?;
        for &r in &req.requests {
            match r {
                info::NAME => {
                    let d = wire::info_string(info::NAME, &export.name);
                    self.reply(option, rep::INFO, &d).await?;
                }
                info::DESCRIPTION if !export.description.is_empty() => {
                    let d = wire::info_string(info::DESCRIPTION, &export.description);
                    self.reply(option, rep::INFO, &d).await?;
                }
                _ => {}
            }
        }
        // Any alignment works (min 1); the cache block is the efficient unit;
        // the maximum is the payload we serve (spec: the maximum payload is
        // "the maximum payload length that the server is willing to handle
        // in one request"): 64 MiB, above the spec's default of 32 MiB.
        let bs = wire::info_block_size(1, export.preferred_block, wire::MAX_PAYLOAD);
        self.reply(option, rep::INFO, &bs).await?;
        self.reply(option, rep::ACK, &[]).await?;
        Ok((option == opt::GO).then_some(export))
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<()> {
        if option == opt::SET_META_CONTEXT {
            // SET replaces the selection, also when it fails (spec).
            self.meta = None;
        }
        if !self.structured {
            return self
                .error(
                    option,
                    rep::ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.error(option, rep::ERR_INVALID, &e.to_string()).await,
        };
        if self.exports.get(&req.name).is_none() {
            let msg = format!("no export named {:?}", req.name);
            return self.error(option, rep::ERR_UNKNOWN, &msg).await;
        }
        let list = option == opt::LIST_META_CONTEXT;
        let matches = |q: &str| q == wire::BASE_ALLOCATION || (list && q == "base:");
        let selected = if list && req.queries.is_empty() {
            true
        } else {
            req.queries.iter().any(|q| matches(q))
        };
        if selected {
            // LIST replies use id 0 (reserved), SET the real id.
            let id = if list { 0 } else { wire::BASE_ALLOCATION_ID };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(wire::BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &d).await?;
        }
        if !list {
            self.meta = Some((req.name, selected));
        }
        self.reply(option, rep::ACK, &[]).await
    }
}

/// Run the handshake on `s`, for a server in TLS mode `tls`. Errors mean
/// the connection must be dropped.
pub async fn negotiate<S>(s: &mut S, exports: &Exports, tls: TlsMode) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&wire::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await.map_err(io_err)?;
    s.flush().await.map_err(io_err)?;

    let client_flags = s.read_u32().await.map_err(io_err)?;
    if client_flags & !cflag::KNOWN != 0 {
        return Err(proto(format!("unknown client flags {client_flags:#x}")));
    }
    // TLS needs fixed newstyle (spec); without it the session is NOTLS,
    // which a server that requires TLS cannot offer.
    let fixed = client_flags & cflag::FIXED_NEWSTYLE != 0;
    let tls = match (tls, fixed) {
        (TlsMode::Off, _) | (TlsMode::On, false) => TlsState::Off,
        (TlsMode::On, true) => TlsState::Offered,
        (TlsMode::Require, true) => TlsState::Required,
        (TlsMode::Require, false) => {
            return Err(proto(
                "TLS is required and the client did not negotiate fixed newstyle",
            ))
        }
    };
    let session = Session {
        no_zeroes: client_flags & cflag::NO_ZEROES != 0,
        tls,
    };
    haggle(s, exports, session).await
}

/// Option haggling over TLS after [`Outcome::StartTls`], on the TLS stream.
pub(crate) async fn after_starttls<S>(
    s: &mut S,
    exports: &Exports,
    session: Session,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session = Session {
        tls: TlsState::Active,
        ..session
    };
    haggle(s, exports, session).await
}

async fn haggle<S>(s: &mut S, exports: &Exports, session: Session) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = session.no_zeroes;
    let mut h = Haggle {
        s,
        exports,
        tls: session.tls,
        structured: false,
        meta: None,
    };
    loop {
        let mut hb = [0u8; OptionHeader::SIZE];
        h.s.read_exact(&mut hb).await.map_err(io_err)?;
        let hdr = OptionHeader::decode(&hb).map_err(|e| proto(format!("option: {e}")))?;
        if hdr.len > wire::MAX_OPTION_LEN {
            // Nothing legitimate is this long; reading it would let a client
            // make us buffer arbitrary amounts.
            return Err(proto(format!(
                "option {} with {} bytes of data exceeds the {} byte limit",
                hdr.option,
                hdr.len,
                wire::MAX_OPTION_LEN
            )));
        }
        let mut data = vec![0u8; hdr.len as usize];
        h.s.read_exact(&mut data).await.map_err(io_err)?;

        if h.tls == TlsState::Required
            && !matches!(hdr.option, opt::STARTTLS | opt::ABORT | opt::EXPORT_NAME)
        {
            // FORCEDTLS: every other option, INFO, GO and unknown ones
            // included, gets ERR_TLS_REQD until TLS is up (spec).
            h.error(
                hdr.option,
                rep::ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            )
            .await?;
            h.flush().await?;
            continue;
        }
        match hdr.option {
            opt::EXPORT_NAME if h.tls == TlsState::Required => {
                // It cannot carry an error: the spec says end the session.
                return Err(proto(
                    "NBD_OPT_EXPORT_NAME before STARTTLS; TLS is required",
                ));
            }
            opt::EXPORT_NAME => {
                let name =
                    wire::to_string(&data, "export name").map_err(|e| proto(e.to_string()))?;
                let Some(export) = exports.get(&name) else {
                    // EXPORT_NAME cannot carry an error: the spec says close.
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("client asked for unknown export {name:?}"),
                    ));
                };
                let mut d = Vec::with_capacity(10 + 124);
                d.extend_from_slice(&export.device.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&export, h.structured).to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                h.s.write_all(&d).await.map_err(io_err)?;
                h.flush().await?;
                let base_allocation = matches!(&h.meta, Some((n, true)) if *n == name);
                return Ok(Outcome::Transmission(Negotiated {
                    export,
                    structured: h.structured,
                    base_allocation,
                }));
            }
            opt::ABORT => {
                // The client may already be gone; that is fine.
                let _ = h.reply(hdr.option, rep::ACK, &[]).await;
                let _ = h.flush().await;
                return Ok(Outcome::Closed);
            }
            opt::LIST => {
                if !data.is_empty() {
                    h.error(hdr.option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                } else {
                    for (name, desc) in exports.list() {
                        let d = wire::rep_server(&name, &desc);
                        h.reply(hdr.option, rep::SERVER, &d).await?;
                    }
                    h.reply(hdr.option, rep::ACK, &[]).await?;
                }
            }
            opt::STARTTLS => {
                let refusal = match h.tls {
                    TlsState::Off => Some((rep::ERR_POLICY, "TLS is not enabled on this server")),
                    TlsState::Active => Some((rep::ERR_INVALID, "TLS is already active")),
                    _ if !data.is_empty() => {
                        Some((rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data"))
                    }
                    TlsState::Offered | TlsState::Required => None,
                };
                if let Some((typ, msg)) = refusal {
                    h.error(hdr.option, typ, msg).await?;
                } else {
                    h.reply(hdr.option, rep::ACK, &[]).await?;
                    h.flush().await?;
                    return Ok(Outcome::StartTls(Session {
                        no_zeroes,
                        tls: h.tls,
                    }));
                }
            }
            opt::INFO | opt::GO => {
                if let Some(export) = h.info_or_go(hdr.option, &data).await? {
                    h.flush().await?;
                    let base_allocation = matches!(&h.meta, Some((n, true)) if exports.get(n).is_some_and(|e| Arc::ptr_eq(&e, &export)));
                    return Ok(Outcome::Transmission(Negotiated {
                        export,
                        structured: h.structured,
                        base_allocation,
                    }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    h.error(
                        hdr.option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    h.structured = true;
                    h.reply(hdr.option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                h.meta_context(hdr.option, &data).await?;
            }
            other => {
                let msg = if other == opt::EXTENDED_HEADERS {
                    "extended headers are not supported".to_string()
                } else {
                    format!("option {other} is not supported")
                };
                h.error(other, rep::ERR_UNSUP, &msg).await?;
            }
        }
        h.flush().await?;
    }
}

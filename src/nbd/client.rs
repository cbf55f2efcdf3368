//! A small NBD client for `lazybd copy`: one request at a time per
//! connection (the copier opens one connection per job), fixed newstyle
//! handshake with OPT_GO, structured replies and `base:allocation` when
//! the server offers them (to skip holes), simple replies otherwise.
//!
//! URIs as qemu and libnbd spell them: `nbd://HOST[:PORT][/EXPORT]` and
//! `nbd+unix:///EXPORT?socket=PATH`. Everything the server sends is
//! checked: magic numbers, cookies, chunk offsets within the request and
//! lengths; a server that breaks the protocol is an error, never data.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, chunk, cmd, opt, rep, tflag, ChunkHeader, OptionHeader, Request};
use crate::block::ByteRange;
use crate::device::Extent;
use crate::error::{Error, ErrorKind, Result};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NbdUri {
    pub(crate) addr: NbdAddr,
    pub(crate) export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NbdAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl NbdUri {
    /// Whether `s` is an NBD URI (as opposed to a file or HTTP URL).
    pub(crate) fn is_nbd(s: &str) -> bool {
        let l = s.to_ascii_lowercase();
        l.starts_with("nbd://") || l.starts_with("nbd+unix://")
    }

    pub(crate) fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::new(ErrorKind::InvalidInput, format!("NBD URI {s:?}: {why}"));
        let (rest, unix) = if let Some(r) = s.strip_prefix("nbd+unix://") {
            (r, true)
        } else if let Some(r) = s.strip_prefix("nbd://") {
            (r, false)
        } else {
            return Err(bad(
                "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = crate::util::percent_decode(path)
            .ok_or_else(|| bad("bad %-escape in the export name"))?;
        if unix {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host"));
            }
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            let socket =
                crate::util::percent_decode(socket).ok_or_else(|| bad("bad %-escape in socket"))?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(socket.into()),
                export,
            });
        }
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        let has_port = if authority.starts_with('[') {
            authority.contains("]:")
        } else {
            authority.contains(':')
        };
        let hostport = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:10809")
        };
        Ok(NbdUri {
            addr: NbdAddr::Tcp(hostport),
            export,
        })
    }
}

/// Which bytes of a READ the chunks of its structured reply have answered.
/// Chunks may come in any order, but each must lie within the request,
/// hold at least one byte and overlap no other; by the DONE chunk they must
/// cover the request exactly once. A hostile server could otherwise pass a
/// byte count check with one part sent twice and another never (which
/// would then read as zeros), or wrap `offset + length` around u64.
///
/// Chunks in order (what servers send) need no memory: everything before
/// `next` is answered, nothing after it. The first chunk out of order
/// switches to a bitmap of one bit per byte of the request (4 MiB for the
/// 32 MiB maximum), so any reply costs memory and time linear in the
/// request. Rejected: a list of intervals, which a reply of scattered
/// one-byte chunks can grow to tens of millions of entries.
struct Coverage {
    request: ByteRange,
    /// Bytes answered so far.
    covered: u64,
    /// While `bits` is None: `[0, next)` of the request is answered.
    next: u64,
    /// Bit i: byte i of the request is answered.
    bits: Option<Vec<u64>>,
}

impl Coverage {
    fn new(request: ByteRange) -> Coverage {
        Coverage {
            request,
            covered: 0,
            next: 0,
            bits: None,
        }
    }

    /// Record a chunk of `n` bytes at image offset `offset`; returns where
    /// it goes in the request's buffer, or why it is not acceptable.
    fn claim(&mut self, offset: u64, n: u64) -> std::result::Result<usize, &'static str> {
        if n == 0 {
            return Err("is empty");
        }
        let at = offset
            .checked_sub(self.request.offset)
            .filter(|at| at.checked_add(n).is_some_and(|end| end <= self.request.len))
            .ok_or("is outside the request")?;
        let end = at + n;
        let bits = match &mut self.bits {
            None if at == self.next => {
                self.next = end;
                self.covered += n;
                return Ok(at as usize);
            }
            None => {
                let mut bits = vec![0u64; self.request.len.div_ceil(64) as usize];
                for_words(0, self.next, |w, m| bits[w] |= m);
                self.bits.insert(bits)
            }
            Some(bits) => bits,
        };
        let mut overlap = false;
        for_words(at, end, |w, m| overlap |= bits[w] & m != 0);
        if overlap {
            return Err("overlaps another chunk");
        }
        for_words(at, end, |w, m| bits[w] |= m);
        self.covered += n;
        Ok(at as usize)
    }
}

/// Call `f(word, mask)` for each 64-bit word of a bitmap that bits
/// `[start, end)` touch, `mask` selecting those bits.
fn for_words(start: u64, end: u64, mut f: impl FnMut(usize, u64)) {
    let mut i = start;
    while i < end {
        let word = i / 64;
        let lo = i % 64;
        let hi = (end - word * 64).min(64);
        let ones = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        f(word as usize, ones);
        i = word * 64 + hi;
    }
}

/// One connection to an export, in the transmission phase.
pub(crate) struct NbdClient {
    s: Box<dyn Stream>,
    size: u64,
    flags: u16,
    structured: bool,
    base_allocation: bool,
    cookie: u64,
    what: String,
}

fn proto(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Protocol, format!("NBD server {what}: {msg}"))
}

impl NbdClient {
    pub(crate) async fn connect(uri: &NbdUri) -> Result<NbdClient> {
        let what = match &uri.addr {
            NbdAddr::Tcp(a) => format!("{a} export {:?}", uri.export),
            NbdAddr::Unix(p) => format!("{} export {:?}", p.display(), uri.export),
        };
        let s: Box<dyn Stream> = match &uri.addr {
            NbdAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(|e| Error::io(format!("connecting to {a}"), e))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            NbdAddr::Unix(p) => Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| Error::io(format!("connecting to {}", p.display()), e))?,
            ),
        };
        let mut c = NbdClient {
            s,
            size: 0,
            flags: 0,
            structured: false,
            base_allocation: false,
            cookie: 0,
            what,
        };
        c.handshake(&uri.export).await?;
        Ok(c)
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server allows several connections to act as one
    /// (a FLUSH on one covers writes on all).
    pub(crate) fn can_multi_conn(&self) -> bool {
        self.flags & tflag::CAN_MULTI_CONN != 0
    }

    pub(crate) fn read_only(&self) -> bool {
        self.flags & tflag::READ_ONLY != 0
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(format!("NBD server {}", self.what), e)
    }

    async fn handshake(&mut self, export: &str) -> Result<()> {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).await.map_err(|e| self.io(e))?;
        let magic = u64::from_be_bytes(g[..8].try_into().expect("8"));
        let ihave = u64::from_be_bytes(g[8..16].try_into().expect("8"));
        if magic != wire::NBDMAGIC || ihave != wire::IHAVEOPT {
            return Err(proto(
                &self.what,
                "not a newstyle NBD server (bad greeting)",
            ));
        }
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        if hflags & wire::hflag::FIXED_NEWSTYLE == 0 {
            return Err(proto(&self.what, "does not speak fixed newstyle"));
        }
        let mut cflags = wire::cflag::FIXED_NEWSTYLE;
        if hflags & wire::hflag::NO_ZEROES != 0 {
            cflags |= wire::cflag::NO_ZEROES;
        }
        self.s
            .write_all(&cflags.to_be_bytes())
            .await
            .map_err(|e| self.io(e))?;
        // Structured replies and base:allocation: both optional.
        self.send_option(opt::STRUCTURED_REPLY, &[]).await?;
        let (r, _) = self.option_reply(opt::STRUCTURED_REPLY).await?;
        self.structured = r == rep::ACK;
        if self.structured {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(wire::BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(wire::BASE_ALLOCATION.as_bytes());
            self.send_option(opt::SET_META_CONTEXT, &d).await?;
            loop {
                let (r, data) = self.option_reply(opt::SET_META_CONTEXT).await?;
                match r {
                    rep::META_CONTEXT if data.len() >= 4 => {
                        self.base_allocation = &data[4..] == wire::BASE_ALLOCATION.as_bytes()
                    }
                    rep::ACK => break,
                    r if r & 0x8000_0000 != 0 => break,
                    _ => {}
                }
            }
        }
        // GO: no info requests, the server sends NBD_INFO_EXPORT anyway.
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(opt::GO, &d).await?;
        let mut have_info = false;
        loop {
            let (r, data) = self.option_reply(opt::GO).await?;
            match r {
                rep::INFO
                    if data.len() >= 2
                        && u16::from_be_bytes([data[0], data[1]]) == wire::info::EXPORT =>
                {
                    if data.len() != 12 {
                        return Err(proto(&self.what, "bad NBD_INFO_EXPORT length"));
                    }
                    self.size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    self.flags = u16::from_be_bytes([data[10], data[11]]);
                    have_info = true;
                }
                rep::ACK if have_info => return Ok(()),
                rep::ACK => return Err(proto(&self.what, "GO acknowledged without export info")),
                rep::ERR_UNKNOWN => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("NBD server {}: no such export", self.what),
                    ))
                }
                r if r & 0x8000_0000 != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(proto(
                        &self.what,
                        format!("refused the export ({r:#x}) {msg}"),
                    ));
                }
                _ => {}
            }
        }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let b = OptionHeader::message(option, data);
        self.s.write_all(&b).await.map_err(|e| self.io(e))
    }

    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.map_err(|e| self.io(e))?;
        let magic = u64::from_be_bytes(h[..8].try_into().expect("8"));
        let got = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let r = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if magic != wire::OPT_REPLY_MAGIC || got != option {
            return Err(proto(&self.what, "bad option reply"));
        }
        if len > wire::MAX_OPTION_LEN {
            return Err(proto(&self.what, "option reply too long"));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.map_err(|e| self.io(e))?;
        Ok((r, data))
    }

    async fn request(&mut self, typ: u16, flags: u16, r: ByteRange, payload: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let req = Request {
            flags,
            typ,
            cookie: self.cookie,
            offset: r.offset,
            len: r.len as u32,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.map_err(|e| self.io(e))?;
        Ok(self.cookie)
    }

    fn errno(&self, what: &str, r: ByteRange, errno: u32) -> Error {
        let kind = if errno == wire::errno::ENOSPC {
            ErrorKind::NoSpace
        } else {
            ErrorKind::Io
        };
        Error::new(
            kind,
            format!("NBD server {}: {what} {r} failed: errno {errno}", self.what),
        )
    }

    /// Read a reply that carries no data (simple, or a single structured
    /// NONE / ERROR chunk).
    async fn ack(&mut self, cookie: u64, what: &str, r: ByteRange) -> Result<()> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.map_err(|e| self.io(e))?;
        match u32::from_be_bytes(m) {
            wire::SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.s.read_exact(&mut rest).await.map_err(|e| self.io(e))?;
                let err = u32::from_be_bytes(rest[..4].try_into().expect("4"));
                if u64::from_be_bytes(rest[4..].try_into().expect("8")) != cookie {
                    return Err(proto(&self.what, "reply to a request never sent"));
                }
                if err != 0 {
                    return Err(self.errno(what, r, err));
                }
                Ok(())
            }
            wire::STRUCTURED_REPLY_MAGIC => {
                let h = self.chunk_rest(m).await?;
                if h.cookie != cookie {
                    return Err(proto(&self.what, "reply to a request never sent"));
                }
                let mut body = vec![0u8; h.len as usize];
                self.s.read_exact(&mut body).await.map_err(|e| self.io(e))?;
                if h.typ & 0x8000 != 0 {
                    let e = body
                        .get(..4)
                        .map(|b| u32::from_be_bytes(b.try_into().expect("4")));
                    return Err(self.errno(what, r, e.unwrap_or(wire::errno::EIO)));
                }
                if h.flags & chunk::FLAG_DONE == 0 {
                    return Err(proto(&self.what, "unexpected data chunk"));
                }
                Ok(())
            }
            _ => Err(proto(&self.what, "bad reply magic")),
        }
    }

    async fn chunk_rest(&mut self, magic: [u8; 4]) -> Result<ChunkHeader> {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&magic);
        self.s
            .read_exact(&mut h[4..])
            .await
            .map_err(|e| self.io(e))?;
        let h = ChunkHeader::decode(&h).map_err(|e| proto(&self.what, e))?;
        // We never ask for more than the spec's default maximum.
        if h.len > wire::DEFAULT_MAX_PAYLOAD + 64 {
            return Err(proto(&self.what, "chunk too long"));
        }
        Ok(h)
    }

    /// Read `r` (at most 32 MiB).
    pub(crate) async fn read(&mut self, r: ByteRange) -> Result<Bytes> {
        let cookie = self.request(cmd::READ, 0, r, &[]).await?;
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.map_err(|e| self.io(e))?;
        if u32::from_be_bytes(m) == wire::SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.s.read_exact(&mut rest).await.map_err(|e| self.io(e))?;
            let err = u32::from_be_bytes(rest[..4].try_into().expect("4"));
            if u64::from_be_bytes(rest[4..].try_into().expect("8")) != cookie {
                return Err(proto(&self.what, "reply to a request never sent"));
            }
            if err != 0 {
                return Err(self.errno("read", r, err));
            }
            self.s.read_exact(&mut out).await.map_err(|e| self.io(e))?;
            return Ok(out.freeze());
        }
        // Structured: data and hole chunks must tile the request exactly.
        let mut coverage = Coverage::new(r);
        let bad = |peer: &str, kind: &str, off: u64, n: u64, why: &str| {
            proto(
                peer,
                format!("read {r}: {kind} chunk of {n} bytes at {off} {why}"),
            )
        };
        loop {
            if u32::from_be_bytes(m) != wire::STRUCTURED_REPLY_MAGIC {
                return Err(proto(&self.what, "bad reply magic"));
            }
            let h = self.chunk_rest(m).await?;
            if h.cookie != cookie {
                return Err(proto(&self.what, "reply to a request never sent"));
            }
            match h.typ {
                chunk::OFFSET_DATA => {
                    if h.len < 8 {
                        return Err(proto(&self.what, "short data chunk"));
                    }
                    let off = self.s.read_u64().await.map_err(|e| self.io(e))?;
                    let n = (h.len - 8) as u64;
                    let at = coverage
                        .claim(off, n)
                        .map_err(|why| bad(&self.what, "data", off, n, why))?;
                    self.s
                        .read_exact(&mut out[at..at + n as usize])
                        .await
                        .map_err(|e| self.io(e))?;
                }
                chunk::OFFSET_HOLE => {
                    if h.len != 12 {
                        return Err(proto(&self.what, "bad hole chunk"));
                    }
                    let off = self.s.read_u64().await.map_err(|e| self.io(e))?;
                    let n = self.s.read_u32().await.map_err(|e| self.io(e))? as u64;
                    let at = coverage
                        .claim(off, n)
                        .map_err(|why| bad(&self.what, "hole", off, n, why))?;
                    out[at..at + n as usize].fill(0);
                }
                chunk::NONE if h.len == 0 => {}
                t if t & 0x8000 != 0 => {
                    let mut body = vec![0u8; h.len as usize];
                    self.s.read_exact(&mut body).await.map_err(|e| self.io(e))?;
                    let e = body
                        .get(..4)
                        .map(|b| u32::from_be_bytes(b.try_into().expect("4")));
                    // Drain to DONE so the connection stays usable.
                    let mut done = h.flags & chunk::FLAG_DONE != 0;
                    while !done {
                        self.s.read_exact(&mut m).await.map_err(|e| self.io(e))?;
                        let h = self.chunk_rest(m).await?;
                        let mut skip = vec![0u8; h.len as usize];
                        self.s.read_exact(&mut skip).await.map_err(|e| self.io(e))?;
                        done = h.flags & chunk::FLAG_DONE != 0;
                    }
                    return Err(self.errno("read", r, e.unwrap_or(wire::errno::EIO)));
                }
                _ => {
                    return Err(proto(
                        &self.what,
                        format!("unexpected chunk type {}", h.typ),
                    ))
                }
            }
            if h.flags & chunk::FLAG_DONE != 0 {
                break;
            }
            self.s.read_exact(&mut m).await.map_err(|e| self.io(e))?;
        }
        // No chunk overlapped another, so as many bytes as asked means
        // every byte came exactly once.
        if coverage.covered != r.len {
            return Err(proto(
                &self.what,
                format!("read {r} answered {} of its bytes", coverage.covered),
            ));
        }
        Ok(out.freeze())
    }

    /// Allocation of `r` (all data when the server has no base:allocation).
    pub(crate) async fn extents(&mut self, r: ByteRange) -> Result<Vec<Extent>> {
        if !self.base_allocation {
            return Ok(vec![Extent {
                len: r.len,
                zero: false,
            }]);
        }
        let cookie = self.request(cmd::BLOCK_STATUS, 0, r, &[]).await?;
        let mut out = Vec::new();
        let mut m = [0u8; 4];
        loop {
            self.s.read_exact(&mut m).await.map_err(|e| self.io(e))?;
            if u32::from_be_bytes(m) != wire::STRUCTURED_REPLY_MAGIC {
                return Err(proto(&self.what, "bad block status reply"));
            }
            let h = self.chunk_rest(m).await?;
            if h.cookie != cookie {
                return Err(proto(&self.what, "reply to a request never sent"));
            }
            let mut body = vec![0u8; h.len as usize];
            self.s.read_exact(&mut body).await.map_err(|e| self.io(e))?;
            if h.typ & 0x8000 != 0 {
                let e = body
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4")));
                return Err(self.errno("block status", r, e.unwrap_or(wire::errno::EIO)));
            }
            if h.typ == chunk::BLOCK_STATUS && body.len() >= 4 && (body.len() - 4) % 8 == 0 {
                for d in body[4..].chunks(8) {
                    let len = u32::from_be_bytes(d[..4].try_into().expect("4")) as u64;
                    let st = u32::from_be_bytes(d[4..].try_into().expect("4"));
                    out.push(Extent {
                        len,
                        zero: st & wire::state::ZERO != 0,
                    });
                }
            }
            if h.flags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        // Clip to the request; an empty answer means "unknown": data.
        let mut left = r.len;
        let mut clipped = Vec::new();
        for e in out {
            if left == 0 || e.len == 0 {
                break;
            }
            let len = e.len.min(left);
            left -= len;
            clipped.push(Extent { len, zero: e.zero });
        }
        if clipped.is_empty() {
            clipped.push(Extent {
                len: r.len,
                zero: false,
            });
        }
        Ok(clipped)
    }

    pub(crate) async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        let c = self.request(cmd::WRITE, 0, r, data).await?;
        self.ack(c, "write", r).await
    }

    /// Zero `r`: WRITE_ZEROES when the server has it, else written zeroes.
    pub(crate) async fn write_zeroes(&mut self, r: ByteRange) -> Result<()> {
        if self.flags & tflag::SEND_WRITE_ZEROES != 0 {
            let c = self.request(cmd::WRITE_ZEROES, 0, r, &[]).await?;
            return self.ack(c, "write zeroes", r).await;
        }
        let zeros = vec![0u8; r.len as usize];
        self.write(r.offset, &zeros).await
    }

    pub(crate) async fn flush(&mut self) -> Result<()> {
        if self.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        let r = ByteRange { offset: 0, len: 0 };
        let c = self.request(cmd::FLUSH, 0, r, &[]).await?;
        self.ack(c, "flush", r).await
    }

    /// Say goodbye (NBD_CMD_DISC); the server closes.
    pub(crate) async fn disconnect(mut self) {
        let r = ByteRange { offset: 0, len: 0 };
        let _ = self.request(cmd::DISC, 0, r, &[]).await;
        let _ = self.s.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    const COOKIE: u64 = 1; // the first request's

    /// A client in the transmission phase (structured replies) whose
    /// server has already sent `reply`. The other end is returned so the
    /// stream stays open; the request the client sends lands in it unread.
    async fn client_with(reply: &[u8]) -> (NbdClient, DuplexStream) {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        b.write_all(reply).await.unwrap();
        let c = NbdClient {
            s: Box::new(a),
            size: 1 << 40,
            flags: 0,
            structured: true,
            base_allocation: false,
            cookie: 0,
            what: "test".into(),
        };
        (c, b)
    }

    fn header(flags: u16, typ: u16, len: u32) -> Vec<u8> {
        let mut v = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&COOKIE.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn data(done: bool, offset: u64, payload: &[u8]) -> Vec<u8> {
        let flags = if done { chunk::FLAG_DONE } else { 0 };
        let mut v = header(flags, chunk::OFFSET_DATA, 8 + payload.len() as u32);
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn hole(done: bool, offset: u64, len: u32) -> Vec<u8> {
        let flags = if done { chunk::FLAG_DONE } else { 0 };
        let mut v = header(flags, chunk::OFFSET_HOLE, 12);
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    async fn read(reply: Vec<Vec<u8>>, offset: u64, len: u64) -> Result<Bytes> {
        let (mut c, _server) = client_with(&reply.concat()).await;
        c.read(ByteRange { offset, len }).await
    }

    /// The reply must be refused as a protocol error, saying `why`.
    async fn refused(reply: Vec<Vec<u8>>, offset: u64, len: u64, why: &str) {
        match read(reply, offset, len).await {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
                assert!(e.to_string().contains(why), "{e}: expected {why:?}");
            }
            Ok(b) => panic!("accepted a hostile reply ({} bytes)", b.len()),
        }
    }

    proptest::proptest! {
        /// `Coverage` against a model that counts the chunks of each byte.
        #[test]
        fn coverage_matches_a_byte_model(
            base in 0u64..3,
            len in 1u64..300,
            chunks in proptest::collection::vec((0u64..320, 0u64..120), 0..24),
        ) {
            let r = ByteRange { offset: base * 1000, len };
            let mut c = Coverage::new(r);
            let mut model = vec![0u32; len as usize];
            for (at, n) in chunks {
                let fits = n > 0 && at + n <= len;
                let free = fits && model[at as usize..(at + n) as usize].iter().all(|&k| k == 0);
                let got = c.claim(r.offset + at, n);
                proptest::prop_assert_eq!(got.is_ok(), free, "chunk {}+{}", at, n);
                if !free {
                    break; // a refused chunk ends the read
                }
                proptest::prop_assert_eq!(got.ok(), Some(at as usize));
                model[at as usize..(at + n) as usize].iter_mut().for_each(|k| *k += 1);
                proptest::prop_assert_eq!(c.covered, model.iter().filter(|&&k| k > 0).count() as u64);
            }
        }
    }

    #[test]
    fn coverage_bitmap_edges() {
        // Words touched by a range, at word boundaries and inside one word.
        let mut seen = Vec::new();
        for_words(60, 130, |w, m| seen.push((w, m)));
        assert_eq!(seen, vec![(0, 0xf << 60), (1, u64::MAX), (2, 0b11)],);
        seen.clear();
        for_words(3, 5, |w, m| seen.push((w, m)));
        assert_eq!(seen, vec![(0, 0b11000)]);
        // A request at the very end of the u64 range.
        let r = ByteRange {
            offset: u64::MAX - 10,
            len: 10,
        };
        let mut c = Coverage::new(r);
        assert!(c.claim(u64::MAX - 5, 6).is_err());
        assert!(c.claim(u64::MAX - 5, u64::MAX).is_err());
        assert_eq!(c.claim(u64::MAX - 5, 5), Ok(5));
        assert_eq!(c.claim(u64::MAX - 10, 5), Ok(0));
        assert_eq!(c.covered, 10);
    }

    #[tokio::test]
    async fn chunk_offsets_that_overflow_are_protocol_errors() {
        let k = 4096u64;
        // offset + length wraps around u64 to a small number: must not
        // pass the range check (nor panic slicing the buffer).
        refused(vec![data(true, u64::MAX - 3, &[7; 8])], 0, 2 * k, "outside").await;
        refused(vec![hole(true, u64::MAX - 9, 20)], 0, 2 * k, "outside").await;
        refused(
            vec![data(false, 0, &[1; 4096]), hole(true, u64::MAX, 4096)],
            0,
            2 * k,
            "outside",
        )
        .await;
        refused(
            vec![hole(true, u64::MAX - 100, u32::MAX)],
            k,
            2 * k,
            "outside",
        )
        .await;
        // Before the request, past its end, and ending just past it.
        refused(vec![data(true, 0, &[1; 8192])], k, 2 * k, "outside").await;
        refused(vec![hole(true, 3 * k, 1)], k, 2 * k, "outside").await;
        refused(vec![data(true, k + 1, &[1; 8192])], k, 2 * k, "outside").await;
    }

    #[tokio::test]
    async fn overlapping_chunks_are_protocol_errors() {
        let k = 4096u64;
        // The same 4 KiB twice and the second 4 KiB never: the byte count
        // matches the request, the bytes do not.
        let twice = vec![data(false, 0, &[1; 4096]), data(true, 0, &[2; 4096])];
        refused(twice, 0, 2 * k, "overlap").await;
        let twice = vec![hole(false, 0, 4096), data(true, 0, &[2; 4096])];
        refused(twice, 0, 2 * k, "overlap").await;
        // Out of order, overlapping by one byte, same total.
        let v = vec![
            data(false, 4096, &[1; 4096]),
            data(false, 0, &[2; 4097]),
            hole(true, 8192, 4095),
        ];
        refused(v, 0, 3 * k, "overlap").await;
        // A chunk inside an earlier one.
        let v = vec![data(false, 0, &[1; 8192]), hole(true, 100, 10)];
        refused(v, 0, 3 * k, "overlap").await;
    }

    #[tokio::test]
    async fn gaps_and_empty_chunks_are_protocol_errors() {
        refused(vec![data(true, 0, &[1; 4096])], 0, 8192, "answered 4096").await;
        refused(
            vec![data(false, 0, &[1; 4096]), hole(true, 8000, 192)],
            0,
            8192,
            "answered",
        )
        .await;
        refused(
            vec![data(false, 0, &[]), data(true, 0, &[1; 10])],
            0,
            10,
            "empty",
        )
        .await;
        refused(
            vec![hole(false, 0, 0), data(true, 0, &[1; 10])],
            0,
            10,
            "empty",
        )
        .await;
    }

    #[tokio::test]
    async fn chunks_in_any_order_that_tile_the_request_are_read() {
        let v = vec![
            data(false, 8192 + 4096, &[3; 4096]),
            hole(false, 8192, 4096),
            data(true, 4096, &[1; 4096]),
        ];
        let b = read(v, 4096, 12288).await.unwrap();
        let mut want = vec![1u8; 4096];
        want.extend_from_slice(&[0; 4096]);
        want.extend_from_slice(&[3; 4096]);
        assert!(b[..] == want[..]);
        // One chunk, the common case.
        let b = read(vec![data(true, 10, &[9; 5])], 10, 5).await.unwrap();
        assert_eq!(&b[..], &[9; 5]);
    }

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://127.0.0.1:10810/vm%201").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("127.0.0.1:10810".into()));
        assert_eq!(u.export, "vm 1");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(
            (u.addr, u.export),
            (NbdAddr::Tcp("host:10809".into()), String::new())
        );
        let u = NbdUri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:10809".into()));
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/l.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/l.sock".into()));
        assert_eq!(u.export, "disk");
        assert!(NbdUri::parse("nbd+unix:///disk").is_err());
        assert!(NbdUri::parse("http://x/y").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
    }
}

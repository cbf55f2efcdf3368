//! NBD wire format: constants and pure encode/decode functions, no I/O.
//!
//! Everything here works on byte slices so it can be fuzzed and property
//! tested in isolation (see `fuzz/` and the tests below). Values follow the
//! NBD protocol specification (`doc/proto.md` of the NBD project).
//!
//! Public for the integration tests (which speak raw NBD) and the fuzz
//! targets `wire_decode` and `handshake`; the reply builders only the
//! server uses are crate-private.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The largest READ/WRITE payload lazybd serves, and the maximum payload it
/// advertises in `NBD_INFO_BLOCK_SIZE`: 64 MiB, what nbdkit serves (and
/// libnbd sends at most), so a client that ignores the spec's default of
/// 32 MiB is served as it is there. Larger requests are answered with an
/// error, never buffered. Each connection's payload budget holds one such
/// request (`transmission::MAX_IN_FLIGHT_BYTES`).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The spec's default maximum payload (32 MiB): what every server serves
/// without advertising anything, so the most lazybd's own client asks for.
pub(crate) const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, context query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Longest option payload we read during the handshake; longer options are
/// a denial-of-service attempt and end the connection.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Handshake flags (server -> client).
pub mod hflag {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client -> server).
pub mod cflag {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    pub const ERR_POLICY: u32 = 0x8000_0002;
    pub const ERR_INVALID: u32 = 0x8000_0003;
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
}

/// `NBD_INFO_*` items of `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmdflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = 0x8001;
    pub const ERROR_OFFSET: u16 = 0x8002;
}

/// `base:allocation` status flags.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// NBD error values (fixed by the spec, not the host's errno).
pub use crate::error::errno;

/// The one metadata context lazybd offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in `NBD_REP_META_CONTEXT` and `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Decoding failure of a wire message: always the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic(u64),
    Truncated { what: &'static str },
    TooLong { what: &'static str, len: usize },
    NotUtf8 { what: &'static str },
    TrailingBytes { what: &'static str },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            DecodeError::Truncated { what } => write!(f, "{what}: truncated"),
            DecodeError::TooLong { what, len } => write!(f, "{what}: {len} bytes is too long"),
            DecodeError::NotUtf8 { what } => write!(f, "{what}: not UTF-8 or contains NUL"),
            DecodeError::TrailingBytes { what } => write!(f, "{what}: unexpected trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A big-endian cursor over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    /// A length-prefixed (u32) string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(DecodeError::TooLong {
                what: self.what,
                len,
            });
        }
        let bytes = self.take(len)?;
        to_string(bytes, self.what)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { what: self.what })
        }
    }
}

/// Validate a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn to_string(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING {
        return Err(DecodeError::TooLong {
            what,
            len: bytes.len(),
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(DecodeError::NotUtf8 { what }),
    }
}

/// `s` cut to at most `max` bytes, at a character boundary: a message that
/// quotes a client's 4096-byte name must still be a protocol string (valid
/// UTF-8, at most [`MAX_STRING`] bytes).
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The fixed 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(b, "option header");
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: c.u32()?,
            len: c.u32()?,
        })
    }

    /// A whole option message: the header for `data`, then `data`.
    pub fn message(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        b
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(data, "NBD_OPT_INFO/GO");
        let name = c.string()?;
        let n = c.u16()? as usize;
        let mut requests = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(data, "NBD_OPT_*_META_CONTEXT");
        let name = c.string()?;
        let n = c.u32()? as usize;
        let mut queries = Vec::new();
        for _ in 0..n {
            // Each query costs at least 4 bytes, so a lying count cannot
            // make this loop allocate more than the option's own size.
            queries.push(c.string()?);
        }
        c.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// One option reply: magic, option, type, length, data.
pub(crate) fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_REP_SERVER` payload: the name, then the description as the
/// human-readable string (cut to the string limit).
pub(crate) fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let description = truncate_str(description, MAX_STRING);
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub(crate) fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub(crate) fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_INFO` payload for `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`
/// (cut to the string limit: a description comes from configuration).
pub(crate) fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let s = truncate_str(s, MAX_STRING);
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// A transmission-phase request header (28 bytes, compact headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(b, "request");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic(magic as u64));
        }
        Ok(Request {
            flags: c.u16()?,
            typ: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Simple reply header (16 bytes); READ data follows on success.
pub(crate) fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Structured reply chunk header (20 bytes); `len` bytes of payload follow.
pub fn chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A decoded structured reply chunk header, for clients and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn decode(b: &[u8; 20]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(b, "structured reply");
        let magic = c.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(DecodeError::BadMagic(magic as u64));
        }
        Ok(ChunkHeader {
            flags: c.u16()?,
            typ: c.u16()?,
            cookie: c.u64()?,
            len: c.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trip(flags in any::<u16>(), typ in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
            let r = Request { flags, typ, cookie, offset, len };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_header_round_trip(option in any::<u32>(), len in any::<u32>()) {
            let h = OptionHeader { option, len };
            prop_assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn info_round_trip(name in "[a-z0-9/._-]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn meta_round_trip(name in "[a-z]{0,10}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..5)) {
            let r = MetaContextRequest { name, queries };
            prop_assert_eq!(MetaContextRequest::decode(&r.encode()).unwrap(), r);
        }

        /// Decoders never panic on arbitrary input.
        #[test]
        fn decoders_total(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = InfoRequest::decode(&data);
            let _ = MetaContextRequest::decode(&data);
        }
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut b = Request {
            flags: 0,
            typ: 0,
            cookie: 1,
            offset: 0,
            len: 1,
        }
        .encode();
        b[0] ^= 1;
        assert!(matches!(Request::decode(&b), Err(DecodeError::BadMagic(_))));
    }

    #[test]
    fn strings_are_checked() {
        assert!(to_string(b"ok", "x").is_ok());
        assert!(to_string(b"a\0b", "x").is_err());
        assert!(to_string(&[0xff, 0xfe], "x").is_err());
        let mut huge = InfoRequest {
            name: "a".repeat(5000),
            requests: vec![],
        }
        .encode();
        assert!(InfoRequest::decode(&huge).is_err());
        huge.truncate(10);
        assert!(InfoRequest::decode(&huge).is_err());
    }

    #[test]
    fn truncated_strings_stay_utf8() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        // 'é' is 2 bytes: never cut in half.
        assert_eq!(truncate_str("éé", 3), "é");
        assert_eq!(truncate_str(&"€".repeat(2000), MAX_STRING).len(), 4095);
    }

    #[test]
    fn reply_layouts() {
        let r = option_reply(opt::GO, rep::ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let h = chunk_header(chunk::FLAG_DONE, chunk::NONE, 7, 0);
        let d = ChunkHeader::decode(&h).unwrap();
        assert_eq!((d.flags, d.typ, d.cookie, d.len), (1, 0, 7, 0));
        assert_eq!(&simple_reply(9, 22)[4..8], &22u32.to_be_bytes());
    }
}

//! Every decoder of `lazybd::nbd::wire` on arbitrary bytes: no panic, and
//! whatever decodes re-encodes to exactly the bytes it came from (the wire
//! format has one encoding per value) and decodes again to the same value.

#![no_main]

use lazybd::nbd::wire::{
    self, ChunkHeader, DecodeError, InfoRequest, MetaContextRequest, OptionHeader, Request,
    MAX_STRING,
};
use libfuzzer_sys::fuzz_target;

/// The first `N` bytes of `data`, if there are that many.
fn prefix<const N: usize>(data: &[u8]) -> Option<&[u8; N]> {
    data.get(..N).and_then(|p| p.try_into().ok())
}

/// Errors must format (they end up in option replies and logs).
fn show(e: &DecodeError) {
    let s = e.to_string();
    assert!(!s.is_empty());
}

fuzz_target!(|data: &[u8]| {
    // Fixed-size headers, from the start of the input.
    if let Some(b) = prefix::<{ Request::SIZE }>(data) {
        match Request::decode(b) {
            Ok(r) => {
                assert_eq!(&r.encode(), b, "Request re-encodes differently");
                assert_eq!(Request::decode(&r.encode()), Ok(r));
            }
            Err(e) => {
                assert!(matches!(e, DecodeError::BadMagic(_)), "{e:?}");
                assert_ne!(b[..4], wire::REQUEST_MAGIC.to_be_bytes());
                show(&e);
            }
        }
    }
    if let Some(b) = prefix::<{ OptionHeader::SIZE }>(data) {
        match OptionHeader::decode(b) {
            Ok(h) => {
                assert_eq!(&h.encode(), b, "OptionHeader re-encodes differently");
                assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
            }
            Err(e) => {
                assert!(matches!(e, DecodeError::BadMagic(_)), "{e:?}");
                assert_ne!(b[..8], wire::IHAVEOPT.to_be_bytes());
                show(&e);
            }
        }
    }
    if let Some(b) = prefix::<20>(data) {
        match ChunkHeader::decode(b) {
            Ok(c) => {
                let again = wire::chunk_header(c.flags, c.typ, c.cookie, c.len);
                assert_eq!(&again, b, "ChunkHeader re-encodes differently");
                assert_eq!(ChunkHeader::decode(&again), Ok(c));
            }
            Err(e) => {
                assert!(matches!(e, DecodeError::BadMagic(_)), "{e:?}");
                show(&e);
            }
        }
    }

    // Variable-length option payloads: the whole input.
    match InfoRequest::decode(data) {
        Ok(r) => {
            assert!(r.name.len() <= MAX_STRING);
            let enc = r.encode();
            assert_eq!(enc, data, "InfoRequest re-encodes differently");
            assert_eq!(InfoRequest::decode(&enc).as_ref(), Ok(&r));
        }
        Err(e) => show(&e),
    }
    match MetaContextRequest::decode(data) {
        Ok(r) => {
            assert!(r.name.len() <= MAX_STRING);
            assert!(r.queries.iter().all(|q| q.len() <= MAX_STRING));
            let enc = r.encode();
            assert_eq!(enc, data, "MetaContextRequest re-encodes differently");
            assert_eq!(MetaContextRequest::decode(&enc).as_ref(), Ok(&r));
        }
        Err(e) => show(&e),
    }

    // Protocol strings: accepted exactly when short, UTF-8 and NUL-free.
    let valid =
        data.len() <= MAX_STRING && std::str::from_utf8(data).is_ok_and(|s| !s.contains('\0'));
    match wire::to_string(data, "fuzz string") {
        Ok(s) => {
            assert!(valid, "to_string accepted an invalid string");
            assert_eq!(s.as_bytes(), data);
        }
        Err(e) => {
            assert!(!valid, "to_string refused a valid string: {e}");
            show(&e);
        }
    }
});

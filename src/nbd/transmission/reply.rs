//! Reply encoding: the bytes sent back for every request, as a [`Reply`]
//! of buffers the outbox writes back to back. Simple replies, structured
//! READ chunks (data and holes), BLOCK_STATUS and error chunks; and the
//! reply to a device's answer or failure, counted and logged here so that
//! inline and task-run requests account alike.

use bytes::{BufMut, Bytes, BytesMut};

use super::validate::{refuse, Ctx, Refusal};
use crate::block::ByteRange;
use crate::device::{Extent, ReadData};
use crate::error::{Error, Result};
use crate::nbd::wire::{self, chunk, state, Request};
use crate::stats::Stats;

/// Most extents returned by one BLOCK_STATUS (the spec allows fewer than
/// asked; this bounds reply size for huge requests).
const MAX_EXTENTS: usize = 1 << 14;

/// One reply: buffers written back to back, in order.
pub(super) type Reply = Vec<Bytes>;

fn simple(cookie: u64, err: u32) -> Reply {
    vec![Bytes::copy_from_slice(&wire::simple_reply(cookie, err))]
}

pub(super) fn error_reply(structured: bool, cookie: u64, r: &Refusal) -> Reply {
    if !structured {
        return simple(cookie, r.errno);
    }
    // A human-readable string: short, and never a character cut in half.
    let msg = wire::truncate_str(&r.msg, 1024).as_bytes();
    let mut b = BytesMut::with_capacity(20 + 6 + msg.len());
    b.put_slice(&wire::chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.put_u32(r.errno);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    vec![b.freeze()]
}

/// Success without a payload. A simple reply even when structured replies
/// were negotiated: the spec allows it for every command but READ, and
/// clients read it in one go (16 bytes, no chunk header to parse), as
/// nbdkit and qemu-nbd answer too.
pub(super) fn ok_reply(cookie: u64) -> Reply {
    simple(cookie, 0)
}

/// Structured read reply: data chunks, holes where known zero (unless DF).
fn read_reply(structured: bool, cookie: u64, range: ByteRange, rd: ReadData, df: bool) -> Reply {
    if !structured {
        return vec![
            Bytes::copy_from_slice(&wire::simple_reply(cookie, 0)),
            rd.data,
        ];
    }
    if range.is_empty() {
        // READ must be answered with chunks once they are negotiated.
        return vec![Bytes::copy_from_slice(&wire::chunk_header(
            chunk::FLAG_DONE,
            chunk::NONE,
            cookie,
            0,
        ))];
    }
    let data_chunk = |flags: u16, off: u64, data: Bytes| -> [Bytes; 2] {
        let mut h = BytesMut::with_capacity(28);
        h.put_slice(&wire::chunk_header(
            flags,
            chunk::OFFSET_DATA,
            cookie,
            8 + data.len() as u32,
        ));
        h.put_u64(off);
        [h.freeze(), data]
    };
    if df || rd.zero.is_empty() {
        return data_chunk(chunk::FLAG_DONE, range.offset, rd.data).to_vec();
    }
    // Segments alternate data / hole; the last one carries DONE.
    let mut segs: Vec<(bool, ByteRange)> = Vec::new();
    let mut pos = range.offset;
    for z in &rd.zero {
        if z.offset > pos {
            segs.push((
                false,
                ByteRange {
                    offset: pos,
                    len: z.offset - pos,
                },
            ));
        }
        segs.push((true, *z));
        pos = z.end();
    }
    if pos < range.end() {
        segs.push((
            false,
            ByteRange {
                offset: pos,
                len: range.end() - pos,
            },
        ));
    }
    let mut out = Vec::with_capacity(segs.len() * 2);
    let n = segs.len();
    for (i, (hole, s)) in segs.into_iter().enumerate() {
        let flags = if i + 1 == n { chunk::FLAG_DONE } else { 0 };
        if hole {
            let mut h = BytesMut::with_capacity(32);
            h.put_slice(&wire::chunk_header(flags, chunk::OFFSET_HOLE, cookie, 12));
            h.put_u64(s.offset);
            h.put_u32(s.len as u32);
            out.push(h.freeze());
        } else {
            let a = (s.offset - range.offset) as usize;
            out.extend(data_chunk(
                flags,
                s.offset,
                rd.data.slice(a..a + s.len as usize),
            ));
        }
    }
    out
}

/// BLOCK_STATUS reply of `base:allocation`: the extents of the range, at
/// most one with REQ_ONE, and never more than `MAX_EXTENTS`.
pub(super) fn block_status_reply(cookie: u64, ext: Vec<Extent>, req_one: bool) -> Reply {
    let take = if req_one { 1 } else { MAX_EXTENTS };
    let ext: Vec<_> = ext.into_iter().filter(|e| e.len > 0).take(take).collect();
    let mut b = BytesMut::with_capacity(24 + ext.len() * 8);
    b.put_slice(&wire::chunk_header(
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        cookie,
        4 + 8 * ext.len() as u32,
    ));
    b.put_u32(wire::BASE_ALLOCATION_ID);
    for e in ext {
        b.put_u32(e.len as u32);
        b.put_u32(if e.zero { state::HOLE | state::ZERO } else { 0 });
    }
    vec![b.freeze()]
}

/// The reply to a READ, from the device's answer.
pub(super) fn read_result(
    ctx: &Ctx,
    req: Request,
    range: ByteRange,
    df: bool,
    res: Result<ReadData>,
) -> Reply {
    match res {
        Ok(rd) => {
            Stats::add(&ctx.export.stats.reads, 1);
            Stats::add(&ctx.export.stats.bytes_served, range.len);
            read_reply(ctx.structured, req.cookie, range, rd, df)
        }
        Err(e) => failed(ctx, &req, e),
    }
}

pub(super) fn failed(ctx: &Ctx, req: &Request, e: Error) -> Reply {
    tracing::warn!(export = %ctx.export.name, cookie = req.cookie, typ = req.typ,
        offset = req.offset, len = req.len, error = %e, "request failed");
    error_reply(
        ctx.structured,
        req.cookie,
        &refuse(e.nbd_errno(), e.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::errno;

    fn rd(data: &[u8], zero: Vec<ByteRange>) -> ReadData {
        ReadData {
            data: Bytes::copy_from_slice(data),
            zero,
        }
    }

    /// Parse structured chunks back and check they tile the request.
    fn tiles(reply: &Reply, range: ByteRange) -> Vec<u8> {
        let all: Vec<u8> = reply.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out = vec![0xAAu8; range.len as usize];
        let mut p = 0;
        let mut done = false;
        while p < all.len() {
            assert!(!done, "chunk after DONE");
            let h = wire::ChunkHeader::decode(all[p..p + 20].try_into().unwrap()).unwrap();
            let payload = &all[p + 20..p + 20 + h.len as usize];
            done = h.flags & chunk::FLAG_DONE != 0;
            let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
            let s = (off - range.offset) as usize;
            match h.typ {
                chunk::OFFSET_DATA => out[s..s + payload.len() - 8].copy_from_slice(&payload[8..]),
                chunk::OFFSET_HOLE => {
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    out[s..s + n].fill(0);
                }
                t => panic!("unexpected chunk {t}"),
            }
            p += 20 + h.len as usize;
        }
        assert!(done);
        out
    }

    #[test]
    fn error_chunk_messages_are_strings() {
        let r = refuse(errno::EIO, "€".repeat(1000)); // 3 bytes each
        let b = &error_reply(true, 1, &r)[0];
        let h = wire::ChunkHeader::decode(b[..20].try_into().unwrap()).unwrap();
        let n = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert_eq!(h.len as usize, 6 + n);
        assert!(n <= 1024);
        assert!(std::str::from_utf8(&b[26..26 + n]).is_ok());
    }

    #[test]
    fn holes_and_data_tile_the_read() {
        let range = ByteRange {
            offset: 100,
            len: 40,
        };
        let mut data = vec![7u8; 40];
        data[10..20].fill(0);
        data[30..40].fill(0);
        let z = vec![
            ByteRange {
                offset: 110,
                len: 10,
            },
            ByteRange {
                offset: 130,
                len: 10,
            },
        ];
        let r = read_reply(true, 5, range, rd(&data, z.clone()), false);
        assert_eq!(tiles(&r, range), data);
        // DF: exactly one data chunk.
        let r = read_reply(true, 5, range, rd(&data, z), true);
        assert_eq!(r.len(), 2);
        assert_eq!(tiles(&r, range), data);
    }
}

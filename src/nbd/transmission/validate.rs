//! Request validation: a decoded header becomes a [`Command`] the layers
//! below can run as it is, or a [`Refusal`] to answer with. This is the one
//! place a request is checked (command and flags, range against the export
//! size, read-only, payload size); nothing below checks again.

use std::sync::Arc;

use crate::block::ByteRange;
use crate::device::ZeroFlags;
use crate::export::Export;
use crate::nbd::wire::{self, cmd, cmdflag, errno, Request};

/// A request that passed validation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Command {
    Read {
        range: ByteRange,
        df: bool,
    },
    /// The payload travels beside the command (it is read after validation).
    Write {
        range: ByteRange,
        fua: bool,
    },
    Trim {
        range: ByteRange,
        fua: bool,
    },
    Zero {
        range: ByteRange,
        flags: ZeroFlags,
    },
    Flush,
    Cache {
        range: ByteRange,
    },
    BlockStatus {
        range: ByteRange,
        req_one: bool,
    },
}

/// Why a request is refused: NBD errno + message for structured errors.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) errno: u32,
    pub(super) msg: String,
    /// The connection cannot go on after this request: answer, then close.
    pub(super) fatal: bool,
}

pub(super) fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
        fatal: false,
    }
}

/// Per-connection facts validation depends on.
pub(super) struct Ctx {
    pub(super) export: Arc<Export>,
    pub(super) structured: bool,
    pub(super) base_allocation: bool,
}

/// Validate a request header. This is the only place requests are checked;
/// the layers below rely on it (see `BlockDevice`).
pub(super) fn validate(req: &Request, ctx: &Ctx) -> std::result::Result<Command, Refusal> {
    let size = ctx.export.device.size();
    if req.typ == cmd::WRITE && req.len > wire::MAX_PAYLOAD {
        // Checked first: any other refusal would have to skip the payload,
        // and staying in step would mean reading up to 4 GiB. The spec lets
        // a server hard-disconnect on a payload over its advertised maximum.
        return Err(Refusal {
            fatal: true,
            ..refuse(
                errno::EINVAL,
                format!(
                    "write of {} bytes exceeds the {} byte maximum payload",
                    req.len,
                    wire::MAX_PAYLOAD
                ),
            )
        });
    }
    let allowed = match req.typ {
        cmd::READ => cmdflag::FUA | cmdflag::DF,
        cmd::WRITE | cmd::TRIM => cmdflag::FUA,
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmdflag::FUA | cmdflag::REQ_ONE,
        cmd::FLUSH | cmd::CACHE | cmd::DISC => cmdflag::FUA,
        t => return Err(refuse(errno::EINVAL, format!("unknown command {t}"))),
    };
    if req.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.typ),
        ));
    }
    if req.flags & cmdflag::DF != 0 && !ctx.structured {
        return Err(refuse(errno::EINVAL, "DF needs structured replies"));
    }
    let range = ByteRange::new(req.offset, req.len as u64)
        .map_err(|_| refuse(errno::EINVAL, "offset + length overflows"))?;
    let in_range = || {
        if range.within(size) {
            Ok(range)
        } else {
            Err(refuse(
                errno::EINVAL,
                format!("request {range} beyond the export size {size}"),
            ))
        }
    };
    match req.typ {
        cmd::READ => {
            if req.len > wire::MAX_PAYLOAD {
                return Err(refuse(
                    errno::EINVAL,
                    format!(
                        "read of {} bytes exceeds the {} byte maximum",
                        req.len,
                        wire::MAX_PAYLOAD
                    ),
                ));
            }
            Ok(Command::Read {
                range: in_range()?,
                df: req.flags & cmdflag::DF != 0,
            })
        }
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => {
            if ctx.export.read_only() {
                return Err(refuse(errno::EPERM, "export is read-only"));
            }
            if !range.within(size) {
                // The spec asks for ENOSPC when a write runs past the end.
                let e = if req.typ == cmd::TRIM {
                    errno::EINVAL
                } else {
                    errno::ENOSPC
                };
                return Err(refuse(
                    e,
                    format!("request {range} beyond the export size {size}"),
                ));
            }
            let fua = req.flags & cmdflag::FUA != 0;
            Ok(match req.typ {
                cmd::WRITE => Command::Write { range, fua },
                cmd::TRIM => Command::Trim { range, fua },
                _ => Command::Zero {
                    range,
                    flags: ZeroFlags {
                        fua,
                        no_hole: req.flags & cmdflag::NO_HOLE != 0,
                        fast: req.flags & cmdflag::FAST_ZERO != 0,
                    },
                },
            })
        }
        cmd::FLUSH => {
            if req.offset != 0 || req.len != 0 {
                return Err(refuse(
                    errno::EINVAL,
                    "FLUSH offset and length must be zero",
                ));
            }
            Ok(Command::Flush)
        }
        cmd::CACHE => Ok(Command::Cache { range: in_range()? }),
        cmd::BLOCK_STATUS => {
            if !ctx.base_allocation {
                return Err(refuse(errno::EINVAL, "no metadata context was negotiated"));
            }
            if req.len == 0 {
                return Err(refuse(errno::EINVAL, "BLOCK_STATUS of zero length"));
            }
            Ok(Command::BlockStatus {
                range: in_range()?,
                req_one: req.flags & cmdflag::REQ_ONE != 0,
            })
        }
        // DISC is handled by the reader loop before validation.
        _ => Err(refuse(errno::EINVAL, "unexpected command")),
    }
}

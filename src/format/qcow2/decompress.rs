//! Compressed qcow2 clusters back to their bytes, accepting exactly what
//! qemu accepts: the stream must fill the whole cluster; bytes after the
//! stream are the padding of its last sector and are ignored.

use std::io::Read;

use flate2::{Decompress, FlushDecompress};

use super::layout::Compression;
use crate::error::{Error, ErrorKind, Result};

/// Decompress `input` (a compressed cluster's bytes) into all of `out`
/// (one cluster).
pub(super) fn decompress(c: Compression, input: &[u8], out: &mut [u8]) -> Result<()> {
    match c {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn damaged(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("qcow2 compressed cluster does not decompress ({what}: {detail})"),
    )
}

/// qemu writes raw deflate (no zlib header or checksum), window bits 12; a
/// raw inflater with the full window reads any window size.
fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut z = Decompress::new(false);
    match z.decompress(input, out, FlushDecompress::Finish) {
        // Done, or out of output space (the rest is padding): either way
        // only a full cluster is a cluster.
        Ok(_) if z.total_out() == out.len() as u64 => Ok(()),
        Ok(_) => Err(damaged(
            "deflate",
            format!("{} of {} bytes", z.total_out(), out.len()),
        )),
        Err(e) => Err(damaged("deflate", e)),
    }
}

/// The largest zstd window a cluster's frame may declare. A frame holding
/// one cluster needs at most the cluster as its window; a hostile frame
/// declaring a huge one would make the decoder buffer that much (4 bytes of
/// RLE input decode to 128 KiB), so anything larger is refused.
fn max_window(cluster: usize) -> u64 {
    (cluster as u64).max(8 << 20)
}

/// The window a zstd frame at the start of `input` declares (RFC 8878
/// 3.1.1.1): `None` for input that is not a standard frame (ruzstd then
/// refuses it or skips a skippable frame).
fn zstd_window(input: &[u8]) -> Option<u64> {
    if input.len() < 5 || input[..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = input[4];
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = *input.get(5)?;
        let base = 1u64 << (10 + (wd >> 3));
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the content size.
    let dict_len = [0usize, 1, 2, 4][(fhd & 3) as usize];
    let fcs_len = [1usize, 2, 4, 8][(fhd >> 6) as usize];
    let at = 5 + dict_len;
    let b = input.get(at..at + fcs_len)?;
    let mut v = 0u64;
    for (i, x) in b.iter().enumerate() {
        v |= u64::from(*x) << (8 * i);
    }
    Some(if fcs_len == 2 { v + 256 } else { v })
}

/// One or more zstd frames filling `out`.
fn unzstd(mut input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < out.len() {
        if let Some(w) = zstd_window(input) {
            if w > max_window(out.len()) {
                return Err(damaged(
                    "zstd",
                    format!(
                        "a frame declaring a {w} B window for a {} B cluster",
                        out.len()
                    ),
                ));
            }
        }
        let mut frame =
            ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|e| damaged("zstd", e))?;
        let before = done;
        while done < out.len() {
            match frame.read(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return Err(damaged("zstd", e)),
            }
        }
        if done == before {
            return Err(damaged(
                "zstd",
                format!("{done} of {} bytes, then an empty frame", out.len()),
            ));
        }
        if done == out.len() {
            // As qemu: the frame that fills the cluster must end there.
            match frame.read(&mut [0u8; 1]) {
                Ok(0) => {}
                Ok(_) => return Err(damaged("zstd", "a frame longer than the cluster")),
                Err(e) => return Err(damaged("zstd", e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression as Level, FlushCompress};

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Level::default(), false);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i * 7 / 13) as u8).collect()
    }

    #[test]
    fn deflate_round_trips_with_sector_padding() {
        let data = cluster();
        let mut z = deflate(&data);
        z.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zlib, &z, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn a_short_or_damaged_stream_is_refused() {
        let data = cluster();
        let z = deflate(&data);
        let mut out = vec![0u8; data.len()];
        let e = decompress(Compression::Zlib, &z[..z.len() / 2], &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // A stream of fewer bytes than a cluster.
        let small = deflate(&data[..1000]);
        let e = decompress(Compression::Zlib, &small, &mut out).unwrap_err();
        assert!(e.to_string().contains("1000 of 65536"), "{e}");
        let e = decompress(Compression::Zstd, &z, &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }

    #[test]
    fn a_zstd_frame_declaring_a_huge_window_is_refused_before_decoding() {
        // Magic, descriptor (no single segment), window descriptor 0xF8:
        // 2^41 bytes, then RLE blocks that would expand without end.
        let mut z = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8];
        for _ in 0..64 {
            // RLE block, not last, 128 KiB of 0x41: header (3 bytes LE), byte.
            let h: u32 = (128 << 10) << 3 | 0b010;
            z.extend_from_slice(&h.to_le_bytes()[..3]);
            z.push(0x41);
        }
        let mut out = vec![0u8; 65536];
        let e = decompress(Compression::Zstd, &z, &mut out).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        assert_eq!(
            zstd_window(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00]),
            Some(1024)
        );
    }

    #[test]
    fn zstd_frames_fill_the_cluster() {
        let data = cluster();
        // Two frames (two halves), then padding.
        let mut z = Vec::new();
        for half in data.chunks(data.len() / 2) {
            z.extend(ruzstd::encoding::compress_to_vec(
                half,
                ruzstd::encoding::CompressionLevel::Fastest,
            ));
        }
        z.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zstd, &z, &mut out).unwrap();
        assert_eq!(out, data);
    }
}

//! The overlay's format-2 decoders (`overlay::format`) and journal replay
//! (`PageStore::open`) on arbitrary files.
//!
//! The input is split into a journal and a pages file (the first two bytes
//! say where), written into a simulated directory, and the store opened
//! over a small image. Mode bits make the header of either file valid, so
//! the fuzzer reaches the records and the slots they name.
//!
//! Properties: no panic; a store that opens serves every page it maps
//! (lookup covers the image exactly, data pages read or report a CRC
//! failure, never an error); what it opened reopens to the same map.

#![no_main]

use std::sync::Arc;

use lazybd::overlay::disk::sim::SimDir;
use lazybd::overlay::disk::Dir;
use lazybd::overlay::format::{Header, Record, JOURNAL_MAGIC, PAGES_MAGIC, RECORD};
use lazybd::overlay::store::{PageStore, Piece, JOURNAL, PAGES};
use libfuzzer_sys::fuzz_target;

const IMAGE: u64 = 64 * 4096 - 100;
const IDENTITY: u64 = 7;

fn header(magic: &[u8; 8]) -> Vec<u8> {
    Header {
        magic: *magic,
        generation: 1,
        image_size: IMAGE,
        identity: IDENTITY,
    }
    .encode()
}

fuzz_target!(|data: &[u8]| {
    // The record decoder on its own.
    for c in data.chunks(RECORD) {
        let _ = Record::decode(c, 1, 64);
    }
    let _ = Header::decode(data, JOURNAL_MAGIC);

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut, rest)) = rest.split_first() else {
        return;
    };
    let cut = (cut as usize * rest.len() / 255).min(rest.len());
    let (j, p) = rest.split_at(cut);
    let mut journal = if mode & 1 != 0 { header(JOURNAL_MAGIC) } else { Vec::new() };
    journal.extend_from_slice(j);
    if mode & 4 != 0 {
        // Records of generation 1 built from the input, so replay gets
        // valid records, not only noise.
        for w in j.chunks(17) {
            if w.len() < 17 {
                break;
            }
            let page = w[1] as u64 % 70;
            let arg = u64::from_le_bytes(w[2..10].try_into().unwrap()) % 80;
            let crc = u32::from_le_bytes(w[10..14].try_into().unwrap());
            let r = match w[0] % 3 {
                0 => Record::Data { page, slot: arg.max(1), crc },
                1 => Record::Zero { page, count: arg.max(1) },
                _ => Record::Flush { covered: 4096 + arg * 32 },
            };
            journal.extend_from_slice(&r.encode(1));
        }
    }
    let mut pages = if mode & 2 != 0 { header(PAGES_MAGIC) } else { Vec::new() };
    pages.extend_from_slice(p);
    let d = SimDir::new();
    for (name, bytes) in [(JOURNAL, &journal), (PAGES, &pages)] {
        if mode & 8 != 0 && bytes.is_empty() {
            continue;
        }
        let f = d.open(name, true).unwrap().unwrap();
        f.write_at(bytes, 0).unwrap();
    }
    let Ok((s, _)) = PageStore::open(Arc::new(d.clone()), IMAGE, IDENTITY) else {
        return;
    };
    let npages = IMAGE.div_ceil(4096);
    let runs = s.lookup(0, npages);
    let mut at = 0;
    for (first, count, piece) in &runs {
        assert_eq!(*first, at, "lookup runs are contiguous");
        at += count;
        if let Piece::Data(slots) = piece {
            assert_eq!(slots.len() as u64, *count);
            let bytes = (first * 4096..(first + count) * 4096).count().min((IMAGE - first * 4096) as usize);
            let mut buf = vec![0u8; bytes];
            s.read_slots(*first, slots, &mut buf).expect("reading a mapped page");
        }
    }
    assert_eq!(at, npages, "lookup covers the image");
    drop(s);
    let (s, _) = PageStore::open(Arc::new(d), IMAGE, IDENTITY).expect("what opened reopens");
    assert_eq!(s.lookup(0, npages), runs, "reopening keeps the map");
});

//! Manifests (`manifest::Manifest::decode`): the trust root of an image's
//! blocks, published beside it on an origin someone else runs.
//!
//! Properties: no panic, no huge allocation from a lying count; a decoded
//! manifest has one digest per block of its image at a valid block size,
//! and encodes back to the very bytes it came from (one form only).

#![no_main]

use lazybd::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data, "fuzz") else {
        return;
    };
    assert!(Manifest::valid_block_size(m.block_size));
    assert_eq!(
        m.digests.len() as u64,
        Manifest::blocks_of(m.image_size, m.block_size)
    );
    assert_eq!(m.encode(), data, "a manifest has one encoding");
});

//! Boot profiles (`profile::Profile::decode`): files from the cache and,
//! above all, published beside an image on an origin someone else runs.
//!
//! Properties: no panic, no huge allocation from a lying count; a decoded
//! profile has non-empty ranges inside its image, and encodes back to
//! bytes that decode to the same profile (canonical form).

#![no_main]

use lazybd::prefetch::profile::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Profile::decode(data) else {
        return;
    };
    for r in &p.ranges {
        assert!(r.len > 0, "empty range");
        assert!(r.end() <= p.image_size, "range {r} beyond {}", p.image_size);
        assert_eq!(r.offset % 4096, 0, "unaligned range {r}");
    }
    let again = Profile::decode(&p.encode()).expect("re-encoded profile decodes");
    assert_eq!(again, p);
});

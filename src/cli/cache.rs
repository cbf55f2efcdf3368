//! `lazybd cache info|verify`: what a cache directory holds, and a check of
//! every cached block's CRCs (exit status 1 if any is damaged).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lazybd::cache::verify;
use lazybd::util::human_bytes;

use super::CacheCmd;

pub fn run(c: CacheCmd) -> anyhow::Result<ExitCode> {
    match c {
        CacheCmd::Info { dir } => info(&dir),
        CacheCmd::Verify { dir, repair } => check(&dir, repair),
    }
}

fn info(dir: &Path) -> anyhow::Result<ExitCode> {
    let images = verify::info(dir)?;
    if images.is_empty() {
        println!("{}: no cached images", dir.display());
    }
    for i in images {
        let id = &i.recorded.identity;
        let pct = if i.blocks > 0 {
            100.0 * (i.present + i.zero) as f64 / i.blocks as f64
        } else {
            100.0
        };
        println!("image:       {}", id.locator);
        println!("  directory: {}", i.dir.display());
        println!("  size:      {} ({} bytes)", human_bytes(id.size), id.size);
        println!("  validator: {}", id.validator.as_deref().unwrap_or("none"));
        println!("  block:     {}", i.recorded.block_size);
        println!(
            "  blocks:    {} present, {} zero, {} total ({pct:.1}% known)",
            i.present, i.zero, i.blocks
        );
        println!(
            "  cached:    {} ({} on disk)",
            human_bytes(i.cached_bytes),
            human_bytes(i.disk_bytes)
        );
        if let Ok(Some(p)) = lazybd::prefetch::profile::Profile::load(&i.dir) {
            println!(
                "  profile:   {} ranges, {}",
                p.ranges.len(),
                human_bytes(p.bytes())
            );
        }
        if let Some(h) = lazybd::prefetch::hydrate::Progress::load(&i.dir) {
            let bs = i.recorded.block_size.bytes();
            let pct = 100.0 * h.done_blocks as f64 / h.total_blocks.max(1) as f64;
            let age = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(h.updated))
                .unwrap_or(0);
            if h.complete {
                println!("  hydration: complete");
            } else {
                println!(
                    "  hydration: {pct:.1}% ({} of {} blocks, {} of {}), {}/s, ETA {} (as of {age} s ago)",
                    h.done_blocks,
                    h.total_blocks,
                    human_bytes(h.done_blocks * bs),
                    human_bytes(h.total_blocks * bs),
                    human_bytes(h.rate),
                    h.eta_secs
                        .map(|s| format!("{s} s"))
                        .unwrap_or_else(|| "unknown".into())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(dir: &Path, repair: bool) -> anyhow::Result<ExitCode> {
    let cd = lazybd::cache::CacheDir::new(dir)?;
    let images = cd.images()?;
    if images.is_empty() {
        println!("{}: no cached images", dir.display());
    } else if !repair {
        eprintln!(
            "note: {} is read without its lock: if a server is using it, this is a snapshot \
             (blocks fetched or evicted meanwhile may go unchecked or show as damaged); \
             --repair takes the lock",
            dir.display()
        );
    }
    let mut damaged = 0;
    for d in images {
        let start = std::time::Instant::now();
        let mut last = std::time::Instant::now();
        let rep = verify::verify_image(&d, repair, |done, total| {
            if last.elapsed() > Duration::from_secs(2) {
                eprintln!("  {}: {done}/{total} blocks", d.display());
                last = std::time::Instant::now();
            }
        })?;
        let state = if rep.damaged_blocks.is_empty() {
            "ok"
        } else if rep.repaired {
            "REPAIRED"
        } else {
            "DAMAGED"
        };
        println!(
            "{state}: {} — {} blocks checked, {} damaged ({:.1}s)",
            d.display(),
            rep.checked_blocks,
            rep.damaged_blocks.len(),
            start.elapsed().as_secs_f64()
        );
        if !rep.damaged_blocks.is_empty() {
            let shown: Vec<String> = rep
                .damaged_blocks
                .iter()
                .take(20)
                .map(|b| b.to_string())
                .collect();
            println!(
                "  damaged blocks: {}{}",
                shown.join(", "),
                if rep.damaged_blocks.len() > 20 {
                    ", ..."
                } else {
                    ""
                }
            );
            if !rep.repaired {
                damaged += rep.damaged_blocks.len();
            }
        }
    }
    Ok(if damaged > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

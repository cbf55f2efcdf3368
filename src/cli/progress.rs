//! Progress of long work (`copy`, `manifest build`): a bar on a terminal,
//! a log line every 5 s otherwise.

use std::time::{Duration, Instant};

use lazybd::util::human_bytes;

/// Report `sample()` = (bytes done, bytes in all) every 100 ms until
/// aborted (or done, with a bar); `verb` says what is done ("copied").
pub fn spawn(
    bar: bool,
    verb: &'static str,
    sample: impl Fn() -> (u64, u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pb = bar.then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template"),
            );
            pb
        });
        let mut last_log = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (done, total) = sample();
            if let Some(pb) = &pb {
                pb.set_length(total);
                pb.set_position(done);
                if total > 0 && done == total {
                    pb.finish();
                    return;
                }
            } else if last_log.elapsed() >= Duration::from_secs(5) && total > 0 {
                tracing::info!(
                    "{verb} {} of {} ({:.1}%)",
                    human_bytes(done),
                    human_bytes(total),
                    100.0 * done as f64 / total as f64
                );
                last_log = Instant::now();
            }
        }
    })
}

//! delay-proxy — a loopback TCP proxy that makes a local HTTP origin look
//! remote: a fixed one-way delay per direction and an optional bandwidth cap.
//!
//! This kernel has no `sch_netem`, so the delay is added in user space. Each
//! proxied connection has, per direction, a reader thread and a writer thread:
//!
//! * the reader takes whatever bytes are available (at most one chunk), books
//!   them on the direction's *shared* link (all connections of one direction
//!   share one bottleneck, like a real 1 Gbit/s link: N parallel origin
//!   connections do not get N times the bandwidth), and stamps the chunk with
//!   its delivery time `max(now, link_free) + serialisation + delay`;
//! * the writer sends each chunk at its delivery time. Chunks are pipelined,
//!   so throughput is limited by the cap, not by the delay (a long fat pipe).
//!
//! If the link is booked more than `--queue-ms` ahead, the reader stops
//! reading, so TCP backpressure reaches the sender (a bounded router queue).
//! Sleeps are nanosleep with a 1 ns timer slack (accurate to the wakeup
//! latency, tens of microseconds); `--spin-us N` finishes each sleep with a
//! yield-spin of up to N µs for more accuracy, at a CPU cost that competes
//! with the servers under test at high request rates on a small machine, so
//! it is off by default. Benchmarks measure the RTT they get and use that.
//!
//! std only. Build: `rustc -O -o delay-proxy bench/delay-proxy.rs`
//! Usage:
//!   delay-proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
//!               [--delay-ms 0.5] [--rate-mbit 0 (no cap)] [--queue-ms 10]
//!               [--duration-s 3600 (then it exits)] [--spin-us 0]
//! Use it on loopback only.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Largest chunk one read takes: 64 KiB is 0.5 ms on a 1 Gbit/s link, so the
/// store-and-forward granularity stays at the scale of the delay.
const CHUNK: usize = 64 * 1024;
/// Chunks a direction may hold between its reader and writer.
const QUEUE_CHUNKS: usize = 4096;

extern "C" {
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
}
const PR_SET_TIMERSLACK: i32 = 29;

#[derive(Clone, Copy)]
struct Conf {
    delay: Duration,
    /// bytes per second; 0 = unlimited
    rate: f64,
    queue: Duration,
    /// The last stretch before a deadline is spun (with yields), not slept.
    spin: Duration,
}

/// One direction of the emulated link, shared by every connection.
struct Link {
    free_at: Mutex<Instant>,
    bytes: AtomicU64,
}

impl Link {
    fn new() -> Self {
        Link { free_at: Mutex::new(Instant::now()), bytes: AtomicU64::new(0) }
    }

    /// Books `len` bytes arriving now; returns when their last byte leaves
    /// the bottleneck.
    fn book(&self, len: usize, conf: &Conf) -> Instant {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let now = Instant::now();
        if conf.rate <= 0.0 {
            return now;
        }
        let mut free = self.free_at.lock().unwrap();
        let start = if *free > now { *free } else { now };
        let done = start + Duration::from_secs_f64(len as f64 / conf.rate);
        *free = done;
        done
    }
}

fn sleep_until(t: Instant, spin: Duration) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > spin {
            thread::sleep(left - spin);
        } else {
            thread::yield_now();
        }
    }
}

/// Reads from `from`, books each chunk on `link`, queues it for the writer.
fn reader(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, link: Arc<Link>, conf: Conf) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let left_bottleneck = link.book(n, &conf);
        if tx.send((left_bottleneck + conf.delay, buf[..n].to_vec())).is_err() {
            return;
        }
        // bounded router queue: stop reading while the link is booked far ahead
        if conf.rate > 0.0 {
            let now = Instant::now();
            if left_bottleneck > now + conf.queue {
                sleep_until(left_bottleneck - conf.queue, conf.spin);
            }
        }
    }
    // EOF (or error) travels with the same delay as data
    let _ = tx.send((Instant::now() + conf.delay, Vec::new()));
}

/// Sends each queued chunk to `to` at its delivery time.
fn writer(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>, spin: Duration) {
    while let Ok((due, data)) = rx.recv() {
        sleep_until(due, spin);
        if data.is_empty() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if to.write_all(&data).is_err() {
            // the receiver is gone: tear the whole connection down
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn pump(from: TcpStream, to: TcpStream, link: Arc<Link>, conf: Conf) -> thread::JoinHandle<()> {
    let (tx, rx) = sync_channel(QUEUE_CHUNKS);
    let r = thread::spawn(move || reader(from, tx, link, conf));
    thread::spawn(move || {
        writer(to, rx, conf.spin);
        let _ = r.join();
    })
}

fn usage() -> ! {
    eprintln!(
        "usage: delay-proxy --listen HOST:PORT --upstream HOST:PORT [--delay-ms F] \
         [--rate-mbit F] [--queue-ms F] [--duration-s N] [--spin-us N]"
    );
    std::process::exit(2)
}

fn main() {
    let mut listen = None;
    let mut upstream = None;
    let (mut delay_ms, mut rate_mbit, mut queue_ms, mut duration_s) = (0.5f64, 0.0f64, 10.0f64, 3600u64);
    let mut spin_us = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--listen" => listen = Some(val()),
            "--upstream" => upstream = Some(val()),
            "--delay-ms" => delay_ms = val().parse().unwrap_or_else(|_| usage()),
            "--rate-mbit" => rate_mbit = val().parse().unwrap_or_else(|_| usage()),
            "--queue-ms" => queue_ms = val().parse().unwrap_or_else(|_| usage()),
            "--duration-s" => duration_s = val().parse().unwrap_or_else(|_| usage()),
            "--spin-us" => spin_us = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else { usage() };
    let conf = Conf {
        delay: Duration::from_secs_f64(delay_ms / 1e3),
        rate: rate_mbit * 1e6 / 8.0,
        queue: Duration::from_secs_f64(queue_ms / 1e3),
        spin: Duration::from_micros(spin_us),
    };
    // SAFETY: prctl(PR_SET_TIMERSLACK, 1) only changes this thread's timer
    // slack (inherited by threads spawned later); no memory is passed.
    unsafe {
        prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("delay-proxy: bind {listen}: {e}");
        std::process::exit(1)
    });
    let (up_link, down_link) = (Arc::new(Link::new()), Arc::new(Link::new()));
    let conns = Arc::new(AtomicU64::new(0));
    {
        let (u, d, c) = (up_link.clone(), down_link.clone(), conns.clone());
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(duration_s));
            eprintln!(
                "delay-proxy: duration over: connections={} bytes_up={} bytes_down={}",
                c.load(Ordering::Relaxed),
                u.bytes.load(Ordering::Relaxed),
                d.bytes.load(Ordering::Relaxed)
            );
            std::process::exit(0)
        });
    }
    eprintln!("delay-proxy: {listen} -> {upstream} delay={delay_ms}ms each way rate={rate_mbit}Mbit/s (0 = no cap)");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        conns.fetch_add(1, Ordering::Relaxed);
        let (up, ul, dl) = (upstream.clone(), up_link.clone(), down_link.clone());
        thread::spawn(move || {
            let Ok(server) = TcpStream::connect(&up) else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
            let a = pump(client, s2, ul, conf);
            let b = pump(server, c2, dl, conf);
            let _ = a.join();
            let _ = b.join();
        });
    }
}

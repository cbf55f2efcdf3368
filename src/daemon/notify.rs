//! Readiness for the service manager (systemd's `Type=notify`): a datagram
//! `READY=1` to `$NOTIFY_SOCKET` once every listener is bound and the
//! exports given at start are served, `RELOADING=1` / `READY=1` around a
//! reload and `STOPPING=1` at shutdown, so units of libvirt, nova-compute
//! or guests can be ordered after lazybd and never start against a
//! socket that does not answer yet.
//!
//! The protocol is one `sendto` on a Unix datagram socket (a path, or `@`
//! for the abstract namespace); written here rather than taken from a crate
//! because it is those few lines and needs nothing else. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Send `state` (newline-separated `KEY=value` lines) to the service
/// manager, if there is one. Failures are logged, never fatal: serving
/// matters more than telling systemd about it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(socket = ?path, error = %e, "cannot notify the service manager");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(path))?;
    }
    Ok(())
}

/// Serving: listeners bound, start-up exports added.
pub fn ready(detail: &str) {
    notify(&format!("READY=1\nSTATUS={detail}"));
}

/// Reloading header and credentials files (`READY=1` again after it).
pub fn reloading() {
    let now = monotonic_usec();
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
}

/// Stopping: answering in-flight requests, persisting.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: answering in-flight requests");
}

/// CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        send(p.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
        use std::os::linux::net::SocketAddrExt;
        let name = format!("lazybd-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(monotonic_usec() > 0);
    }
}

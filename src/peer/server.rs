//! Serving peers (`--peer-listen`): `GET /v1/images/KEY` with one byte
//! range, for images this host has open, read through its cache, so the
//! unit's owner fetches from the origin once whoever asks. Every request
//! carries the shared bearer token; answers are 206 with an exact
//! Content-Range, or an error status (the asker then reads its origin).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{watch, Semaphore};

use crate::block::ByteRange;
use crate::cache::ImageCache;
use crate::stats::Stats;

/// Peer requests served at once; more wait (up to [`QUEUE_WAIT`]) so one
/// busy owner slows its askers instead of sending them all to the origin.
const PARALLEL: usize = 32;
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Largest range one request may ask for.
const MAX_RANGE: u64 = 16 << 20;

/// Finds an open image's cache by its peer key.
pub type Lookup = Arc<dyn Fn(&str) -> Option<ImageCache> + Send + Sync>;

struct State {
    token: String,
    lookup: Lookup,
    slots: Semaphore,
}

/// Serve peers on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    token: String,
    lookup: Lookup,
    mut stop: watch::Receiver<bool>,
) {
    let st = Arc::new(State {
        token,
        lookup,
        slots: Semaphore::new(PARALLEL),
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "peer listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let st = st.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(&st, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "peer connection ended");
                },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

fn answer(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
    *r.status_mut() = status;
    r
}

/// Constant-time comparison: a token is not guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `bytes=A-B` (one closed range) within `size`.
fn parse_range(v: &str, size: u64) -> Option<ByteRange> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b && b < size && b - a < MAX_RANGE).then(|| ByteRange {
        offset: a,
        len: b - a + 1,
    })
}

async fn handle(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return answer(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let auth = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(auth.as_bytes(), st.token.as_bytes()) {
        return answer(StatusCode::UNAUTHORIZED, "a valid peer token is required");
    }
    let Some(key) = req.uri().path().strip_prefix("/v1/images/") else {
        return answer(StatusCode::NOT_FOUND, "no such path");
    };
    let Some(cache) = (st.lookup)(key) else {
        return answer(StatusCode::NOT_FOUND, "this host does not cache that image");
    };
    let size = cache.image_size();
    let Some(range) = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, size))
    else {
        return answer(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "one byte range inside the image, at most 16 MiB",
        );
    };
    let _slot = match tokio::time::timeout(QUEUE_WAIT, st.slots.acquire()).await {
        Ok(Ok(s)) => s,
        _ => return answer(StatusCode::SERVICE_UNAVAILABLE, "busy"),
    };
    // Through the cache: verified pages, and a miss fetched once (this
    // host may be the range's owner).
    match cache.read_unobserved(range).await {
        Ok(d) => {
            Stats::add(&cache.stats().peer_served_bytes, d.data.len() as u64);
            let len = d.data.len();
            let mut r = Response::new(Full::new(d.data));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            h.insert(
                CONTENT_RANGE,
                format!("bytes {}-{}/{size}", range.offset, range.end() - 1)
                    .parse()
                    .expect("ASCII"),
            );
            h.insert(CONTENT_LENGTH, len.into());
            r
        }
        Err(e) => {
            tracing::debug!(error = %e, %range, "peer request: read failed");
            answer(
                StatusCode::BAD_GATEWAY,
                "this host could not read the range",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_tokens() {
        assert_eq!(
            parse_range("bytes=0-4095", 4096),
            Some(ByteRange {
                offset: 0,
                len: 4096
            })
        );
        for bad in [
            "bytes=0-4096",
            "bytes=5-4",
            "bytes=-5",
            "bytes=0-",
            "0-5",
            "bytes=0-1,3-4",
        ] {
            assert_eq!(parse_range(bad, 4096), None, "{bad}");
        }
        assert_eq!(parse_range("bytes=0-16777216", 1 << 30), None);
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}

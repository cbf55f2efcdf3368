//! What a client may make the server hold: the per-connection caps on
//! requests and payload bytes in flight, the server-wide [`Budget`] of read
//! replies, and [`Held`], what one request holds of them until its reply
//! is sent. The connection loop checks the caps (`Conn::room`); the outbox
//! gives back what a reply held once its last byte is out.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::nbd::wire;

/// Requests one connection may have in flight.
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Read payload bytes one connection may have in flight (buffers pinned
/// until the client takes the reply). Without it, 128 reads of 64 MiB from
/// a client that never reads its socket would pin 8 GiB.
pub(crate) const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
// A request is taken only when its payload fits what its connection holds
// (`Conn::room`) and, for a READ, the server-wide budget (never below this
// cap, see `Budget::new`). So that the largest request is taken at all,
// once everything before it is answered, both must hold it alone; a request
// larger than them would wait for ever, and its connection with it.
const _: () = assert!(wire::MAX_PAYLOAD as usize <= MAX_IN_FLIGHT_BYTES);
/// Granularity of the byte budget.
pub(super) const BUDGET_UNIT: u32 = 4096;

/// Bounds shared by every connection of a server (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    /// Read-reply payload all connections together may hold, in
    /// `BUDGET_UNIT`s.
    pub(super) replies: Arc<Semaphore>,
    /// A client that takes no reply bytes for this long while replies wait
    /// is dropped (its buffers freed).
    pub(super) send_timeout: Duration,
}

impl Budget {
    /// `max_bytes` of read replies in memory across connections (at least
    /// one connection's worth, so any single request can proceed).
    pub(crate) fn new(max_bytes: u64, send_timeout: Duration) -> Budget {
        let units = max_bytes.max(MAX_IN_FLIGHT_BYTES as u64) / BUDGET_UNIT as u64;
        Budget {
            replies: Arc::new(Semaphore::new(
                units.min(Semaphore::MAX_PERMITS as u64) as usize
            )),
            send_timeout,
        }
    }

    /// Bytes of read replies not currently held by any connection.
    pub(crate) fn available(&self) -> u64 {
        self.replies.available_permits() as u64 * BUDGET_UNIT as u64
    }
}

/// What a request holds until its reply has been handed to the socket:
/// its bytes of the connection's budget (counted by the connection loop)
/// and, for reads, its permit of the server-wide one.
pub(super) struct Held {
    pub(super) units: u32,
    pub(super) shared: Option<OwnedSemaphorePermit>,
}

impl Held {
    pub(super) fn none() -> Held {
        Held {
            units: 0,
            shared: None,
        }
    }
}

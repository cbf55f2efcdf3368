//! The transmission phase: requests in, replies out, concurrently.
//!
//! ```text
//!             +------------- connection loop (one task) --------------+
//!   socket -->| decode + validate -> local? answer now -> outbox      |--> socket
//!             |                   \-> may wait? spawn handler task    |
//!             |   outbox <- replies of finished handlers (channel)    |
//!             +-------------------------------------------------------+
//! ```
//!
//! Requests are validated once, in `validate`, before any layer sees them
//! (flags, ranges, read-only, payload size). A request that needs only
//! local I/O (a cached read, an overlay write) is answered inside the loop,
//! with no task or wake-up; one that may wait (an origin fetch, a flush)
//! runs in its own task, so a cache hit is never queued behind a miss.
//! Replies go out in completion order, every ready one in one write. A
//! per-connection cap on requests in flight bounds what a client can pin;
//! at the cap the loop stops reading the socket and TCP pushes back.
//!
//! Memory is bounded at two levels. Each connection may hold at most
//! [`MAX_IN_FLIGHT_BYTES`](budget::MAX_IN_FLIGHT_BYTES) of payload (write
//! data read in, read data not yet sent). Read replies are what a client can
//! make the server produce without sending anything, so they also draw on
//! one server-wide [`Budget`]; a client that stops taking its replies is
//! dropped after the budget's send timeout, which returns what it held.
//!
//! Files, one role each:
//! - `validate`: a request header to a `Command` or a `Refusal`;
//!   the one place requests are checked
//! - `reply`: the bytes of every reply (simple, structured chunks, errors)
//! - `outbox`: replies queued for the socket, coalesced and written in
//!   vectored batches; releases what each reply holds once it is sent
//! - `budget`: the per-connection caps and the server-wide [`Budget`], and
//!   what a request holds of them
//! - `conn`: the connection loop ([`serve`]): reads, validates, answers
//!   inline or in a handler task, and sends
//!
//! Only `serve` and the budget are used outside; everything else is private
//! to this module, so the other files see one another through `pub(super)`.

mod budget;
mod conn;
mod outbox;
mod reply;
mod validate;

pub(crate) use budget::Budget;
pub(crate) use conn::serve;

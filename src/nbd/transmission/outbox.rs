//! The outbox: replies on their way to the socket, in the order they were
//! queued. Short buffers are coalesced and the rest written in vectored
//! batches, so that a wake-up's replies leave in as few system calls as
//! possible; what a reply holds of the budgets is released only once its
//! last byte is written.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;

use super::budget::Held;
use super::reply::Reply;

/// Replies on their way to the socket, in order, with what each holds.
///
/// Small buffers (headers, short replies) are copied into one coalescing
/// buffer so that a batch of replies leaves in one system call; payloads
/// stay as they are and go out through vectored writes.
#[derive(Default)]
pub(super) struct Outbox {
    /// Segments in send order; `head_sent` bytes of the first are sent.
    segs: VecDeque<Bytes>,
    head_sent: usize,
    /// Small buffers not yet moved to `segs`.
    small: BytesMut,
    /// Stream positions: bytes ever queued, bytes ever sent.
    queued: u64,
    pub(super) sent: u64,
    /// Bytes were written and the stream not flushed since (TLS keeps
    /// records in its own buffer until flushed).
    unflushed: bool,
    /// Per reply, the position of its last byte and what it holds.
    held: VecDeque<(u64, Held)>,
    /// Totals over `held`, so the budgets are checked without a walk.
    pub(super) replies: usize,
    pub(super) units: u32,
}

/// Buffers up to this size are copied into the coalescing buffer.
const SMALL: usize = 512;
/// Most buffers one vectored write takes.
const MAX_IOV: usize = 64;

impl Outbox {
    pub(super) fn push(&mut self, reply: Reply, held: Held) {
        for b in reply {
            self.queued += b.len() as u64;
            if b.len() <= SMALL {
                self.small.extend_from_slice(&b);
            } else {
                self.seal();
                self.segs.push_back(b);
            }
        }
        self.replies += 1;
        self.units += held.units;
        self.held.push_back((self.queued, held));
    }

    /// Move the coalesced small buffers into the send queue.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(self.small.split().freeze());
        }
    }

    /// Nothing left to send or flush.
    pub(super) fn is_empty(&self) -> bool {
        self.queued == self.sent && !self.unflushed
    }

    /// Account `n` more bytes as sent; release what fully sent replies held.
    fn advance(&mut self, mut n: usize) {
        self.sent += n as u64;
        self.unflushed = true;
        while n > 0 {
            let head = self.segs[0].len() - self.head_sent;
            if n < head {
                self.head_sent += n;
                break;
            }
            n -= head;
            self.segs.pop_front();
            self.head_sent = 0;
        }
        while let Some((end, _)) = self.held.front() {
            if *end > self.sent {
                break;
            }
            let (_, h) = self.held.pop_front().expect("front exists");
            self.replies -= 1;
            self.units -= h.units;
        }
    }

    /// Write as much as the socket takes. `Ready(Ok)` once everything queued
    /// is sent and flushed; `Pending` when the socket is full. Progress made
    /// before `Pending` is kept (see `sent`).
    pub(super) fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.seal();
        while !self.segs.is_empty() {
            let n = if w.is_write_vectored() && self.segs.len() > 1 {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut k = 0;
                for (i, s) in self.segs.iter().take(MAX_IOV).enumerate() {
                    let from = if i == 0 { self.head_sent } else { 0 };
                    iov[i] = IoSlice::new(&s[from..]);
                    k = i + 1;
                }
                ready!(Pin::new(&mut *w).poll_write_vectored(cx, &iov[..k]))?
            } else {
                ready!(Pin::new(&mut *w).poll_write(cx, &self.segs[0][self.head_sent..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        if self.unflushed {
            ready!(Pin::new(w).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

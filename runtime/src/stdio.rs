//! Standard streams of a guest process: captured output buffers that can be read
//! incrementally and followed live, and a stdin pipe the host writes while the guest runs.
//!
//! Both implement wasmtime-wasi's stream traits directly (rather than going through
//! `AsyncWriteStream`, which spawns a task per stream) so that a short-lived guest pays
//! no task spawns for its stdio.

use crate::pause::{ProcessPhase, RunPhase};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use wasmtime_wasi::cli::{IsTerminal, StdinStream, StdoutStream};
use wasmtime_wasi::p2::{InputStream, OutputStream, Pollable, StreamError};

/// Default number of bytes an output buffer retains.
pub const DEFAULT_OUTPUT_CAPACITY: usize = 1 << 20;

/// Largest amount of written-but-unread stdin a pipe holds before writes are refused.
pub const STDIN_PIPE_CAPACITY: usize = 16 << 20;

/// A bounded, append-only byte log of one output stream.
///
/// Bytes are addressed by their absolute offset since the stream started, so a reader
/// can resume where it stopped. When more than `capacity` bytes are retained the oldest
/// are discarded; a reader that asks for discarded bytes learns how many it missed.
#[derive(Clone)]
pub struct OutputBuffer {
    inner: Arc<OutputInner>,
}

struct OutputInner {
    capacity: usize,
    state: Mutex<OutputState>,
    /// End offset and closed flag, for live followers.
    progress: watch::Sender<(u64, bool)>,
}

struct OutputState {
    data: VecDeque<u8>,
    /// Absolute offset of `data[0]`.
    start: u64,
    closed: bool,
}

/// A chunk read from an [`OutputBuffer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub data: Vec<u8>,
    /// Offset to pass to the next read.
    pub next_offset: u64,
    /// Bytes between the requested offset and the first retained byte that were
    /// discarded because the buffer was full.
    pub missed: u64,
    /// True when the stream is closed and `next_offset` is its end.
    pub eof: bool,
}

impl OutputBuffer {
    pub fn new(capacity: usize) -> Self {
        let (progress, _) = watch::channel((0, false));
        OutputBuffer {
            inner: Arc::new(OutputInner {
                capacity,
                state: Mutex::new(OutputState { data: VecDeque::new(), start: 0, closed: false }),
                progress,
            }),
        }
    }

    /// Appends bytes; always succeeds, dropping the oldest bytes past capacity.
    pub fn append(&self, bytes: &[u8]) {
        let end = {
            let mut state = self.inner.state.lock().unwrap();
            if state.closed {
                return;
            }
            let keep = bytes.len().min(self.inner.capacity);
            let bytes_skipped = bytes.len() - keep;
            state.data.extend(&bytes[bytes_skipped..]);
            let overflow = state.data.len().saturating_sub(self.inner.capacity);
            state.data.drain(..overflow);
            state.start += (bytes_skipped + overflow) as u64;
            state.start + state.data.len() as u64
        };
        self.inner.progress.send_replace((end, false));
    }

    /// Marks the stream finished: followers see end of file after the last byte.
    pub fn close(&self) {
        let end = {
            let mut state = self.inner.state.lock().unwrap();
            state.closed = true;
            state.start + state.data.len() as u64
        };
        self.inner.progress.send_replace((end, true));
    }

    /// Everything still retained.
    pub fn contents(&self) -> Vec<u8> {
        self.read_from(0).data
    }

    /// Total bytes ever written.
    pub fn len(&self) -> u64 {
        self.inner.progress.borrow().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads whatever is retained from `offset` on, without waiting.
    pub fn read_from(&self, offset: u64) -> OutputChunk {
        let state = self.inner.state.lock().unwrap();
        let end = state.start + state.data.len() as u64;
        let from = offset.clamp(state.start, end);
        let skip = (from - state.start) as usize;
        let data: Vec<u8> = state.data.iter().skip(skip).copied().collect();
        OutputChunk { data, next_offset: end, missed: from.saturating_sub(offset), eof: state.closed }
    }

    /// Waits until bytes past `offset` exist or the stream is closed, then reads them.
    pub async fn read_next(&self, offset: u64) -> OutputChunk {
        let mut rx = self.inner.progress.subscribe();
        // Errors only when the sender is gone, and `self` holds it.
        let _ = rx.wait_for(|(end, closed)| *end > offset || *closed).await;
        self.read_from(offset)
    }
}

impl IsTerminal for OutputBuffer {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputBuffer {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for OutputBuffer {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // The buffer never blocks the writer: old bytes are dropped instead.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for OutputBuffer {
    async fn ready(&mut self) {}
}

impl AsyncWrite for OutputBuffer {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The host's end of a guest's stdin: bytes written here are read by the guest in order;
/// after [`StdinPipe::close`] the guest reads end of file once the pending bytes are consumed.
#[derive(Clone, Default)]
pub struct StdinPipe {
    inner: Arc<Mutex<StdinState>>,
    /// The reading process's phase, marked while it waits for input (see `pause`).
    reader: Option<Arc<ProcessPhase>>,
}

#[derive(Default)]
struct StdinState {
    pending: VecDeque<u8>,
    closed: bool,
    wakers: Vec<Waker>,
}

/// Why a write to a [`StdinPipe`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StdinError {
    #[error("stdin is closed")]
    Closed,
    #[error("stdin buffer is full: {pending} bytes are waiting to be read (limit {limit})")]
    Full { pending: usize, limit: usize },
}

impl StdinPipe {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(&self, bytes: &[u8]) -> Result<(), StdinError> {
        let mut state = self.inner.lock().unwrap();
        if state.closed {
            return Err(StdinError::Closed);
        }
        if state.pending.len() + bytes.len() > STDIN_PIPE_CAPACITY {
            return Err(StdinError::Full { pending: state.pending.len(), limit: STDIN_PIPE_CAPACITY });
        }
        state.pending.extend(bytes);
        wake_all(&mut state);
        Ok(())
    }

    /// The same pipe, with waits reported to the reading process's phase.
    pub(crate) fn read_by(&self, reader: Arc<ProcessPhase>) -> StdinPipe {
        StdinPipe { inner: self.inner.clone(), reader: Some(reader) }
    }

    pub fn close(&self) {
        let mut state = self.inner.lock().unwrap();
        state.closed = true;
        wake_all(&mut state);
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().unwrap().closed
    }

    /// Bytes written but not yet read by the guest.
    pub fn pending(&self) -> Vec<u8> {
        self.inner.lock().unwrap().pending.iter().copied().collect()
    }

    /// Puts `bytes` before whatever is pending (a resumed process's unread input).
    pub(crate) fn prepend(&self, bytes: &[u8]) {
        let mut state = self.inner.lock().unwrap();
        for &b in bytes.iter().rev() {
            state.pending.push_front(b);
        }
        wake_all(&mut state);
    }

    /// Resolves when a read would not block: bytes are pending, or the pipe is closed.
    pub(crate) async fn readable(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Takes up to `max` pending bytes; `None` means end of file, `Some(empty)` means
    /// nothing yet (registering `cx`'s waker when given).
    fn take(&self, max: usize, cx: Option<&mut Context<'_>>) -> Option<Vec<u8>> {
        let mut state = self.inner.lock().unwrap();
        if state.pending.is_empty() {
            if state.closed {
                return None;
            }
            if let Some(cx) = cx {
                state.wakers.push(cx.waker().clone());
            }
            return Some(Vec::new());
        }
        let n = max.min(state.pending.len());
        Some(state.pending.drain(..n).collect())
    }

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.inner.lock().unwrap();
        if !state.pending.is_empty() || state.closed {
            Poll::Ready(())
        } else {
            state.wakers.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A pipe fed from this host process's own stdin by a reader thread: a guest reading it
/// can be interrupted (by a checkpoint), which a read of the real stdin cannot.
pub(crate) fn host_stdin_pipe() -> StdinPipe {
    let pipe = StdinPipe::new();
    let feed = pipe.clone();
    let spawned = std::thread::Builder::new().name("stasis-stdin".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    while let Err(StdinError::Full { .. }) = feed.write(&buf[..n]) {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
        feed.close();
    });
    if spawned.is_err() {
        pipe.close();
    }
    pipe
}

fn wake_all(state: &mut StdinState) {
    for waker in state.wakers.drain(..) {
        waker.wake();
    }
}

impl IsTerminal for StdinPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for StdinPipe {
    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl InputStream for StdinPipe {
    fn read(&mut self, size: usize) -> Result<Bytes, StreamError> {
        match self.take(size, None) {
            Some(bytes) => Ok(Bytes::from(bytes)),
            None => Err(StreamError::Closed),
        }
    }
}

#[async_trait::async_trait]
impl Pollable for StdinPipe {
    async fn ready(&mut self) {
        let mut waiting = false;
        std::future::poll_fn(|cx| {
            let poll = self.poll_ready(cx);
            if poll.is_pending() != waiting {
                waiting = poll.is_pending();
                if let Some(reader) = &self.reader {
                    reader.set(if waiting { RunPhase::WaitingForInput } else { RunPhase::InHost });
                }
            }
            poll
        })
        .await
    }
}

impl AsyncRead for StdinPipe {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.take(buf.remaining(), Some(cx)) {
            None => Poll::Ready(Ok(())),
            Some(bytes) if bytes.is_empty() => Poll::Pending,
            Some(bytes) => {
                buf.put_slice(&bytes);
                Poll::Ready(Ok(()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_buffer_drops_oldest_and_reports_missed_bytes() {
        let out = OutputBuffer::new(4);
        out.append(b"abc");
        out.append(b"def");
        let chunk = out.read_from(0);
        assert_eq!(chunk.data, b"cdef");
        assert_eq!(chunk.missed, 2);
        assert_eq!(chunk.next_offset, 6);
        assert_eq!(out.read_from(5).data, b"f");
        out.append(b"0123456789");
        assert_eq!(out.contents(), b"6789");
        assert_eq!(out.len(), 16);
    }

    #[tokio::test]
    async fn follower_wakes_on_write_and_sees_eof() {
        let out = OutputBuffer::new(1024);
        let follower = {
            let out = out.clone();
            tokio::spawn(async move {
                let mut offset = 0;
                let mut seen = Vec::new();
                loop {
                    let chunk = out.read_next(offset).await;
                    seen.extend(chunk.data);
                    offset = chunk.next_offset;
                    if chunk.eof {
                        return seen;
                    }
                }
            })
        };
        out.append(b"hello ");
        tokio::task::yield_now().await;
        out.append(b"world");
        out.close();
        assert_eq!(follower.await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn stdin_pipe_blocks_until_written_then_reports_eof() {
        use tokio::io::AsyncReadExt;
        let pipe = StdinPipe::new();
        let mut reader = pipe.clone();
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).await.unwrap();
            all
        });
        pipe.write(b"1\n").unwrap();
        tokio::task::yield_now().await;
        pipe.write(b"2\n").unwrap();
        pipe.close();
        assert_eq!(read.await.unwrap(), b"1\n2\n");
        assert_eq!(pipe.write(b"x"), Err(StdinError::Closed));
    }
}

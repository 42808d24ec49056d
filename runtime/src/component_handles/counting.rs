//! File streams that count what passes through them.
//!
//! A WASIp2 file stream reads or writes at its own position, which wasmtime-wasi keeps
//! private; a restore must reopen the stream where the original stood. Every file stream
//! a component gets is wrapped in one of these, which forwards everything and adds up the
//! bytes moved.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, InputStream, OutputStream, Pollable, StreamResult};

/// The position of a stream, shared between the stream and the handle tracker.
pub(crate) type Position = Arc<AtomicU64>;

fn advance(position: &Position, by: usize) {
    position.fetch_add(by as u64, Ordering::Relaxed);
}

/// `stream` (starting at `start`) wrapped, and its position.
pub(crate) fn input(stream: DynInputStream, start: u64) -> (DynInputStream, Position) {
    let position = Arc::new(AtomicU64::new(start));
    (Box::new(CountingInput { inner: stream, position: position.clone() }), position)
}

/// `stream` (starting at `start`) wrapped, and its position.
pub(crate) fn output(stream: DynOutputStream, start: u64) -> (DynOutputStream, Position) {
    let position = Arc::new(AtomicU64::new(start));
    (Box::new(CountingOutput { inner: stream, position: position.clone() }), position)
}

struct CountingInput {
    inner: DynInputStream,
    position: Position,
}

#[async_trait::async_trait]
impl Pollable for CountingInput {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[async_trait::async_trait]
impl InputStream for CountingInput {
    fn read(&mut self, size: usize) -> StreamResult<bytes::Bytes> {
        let read = self.inner.read(size)?;
        advance(&self.position, read.len());
        Ok(read)
    }

    async fn blocking_read(&mut self, size: usize) -> StreamResult<bytes::Bytes> {
        let read = self.inner.blocking_read(size).await?;
        advance(&self.position, read.len());
        Ok(read)
    }

    fn skip(&mut self, nelem: usize) -> StreamResult<usize> {
        let skipped = self.inner.skip(nelem)?;
        advance(&self.position, skipped);
        Ok(skipped)
    }

    async fn blocking_skip(&mut self, nelem: usize) -> StreamResult<usize> {
        let skipped = self.inner.blocking_skip(nelem).await?;
        advance(&self.position, skipped);
        Ok(skipped)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

struct CountingOutput {
    inner: DynOutputStream,
    position: Position,
}

#[async_trait::async_trait]
impl Pollable for CountingOutput {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[async_trait::async_trait]
impl OutputStream for CountingOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let len = bytes.len();
        self.inner.write(bytes)?;
        advance(&self.position, len);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn blocking_write_and_flush(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let len = bytes.len();
        self.inner.blocking_write_and_flush(bytes).await?;
        advance(&self.position, len);
        Ok(())
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.inner.write_zeroes(nelem)?;
        advance(&self.position, nelem);
        Ok(())
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.inner.write_ready().await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

//! One write for the frames a call produces together.
//!
//! hyper's HTTP/2 client writes a new call's HEADERS frame before the task that sends its body has
//! run (h2 queues the stream as "pending open" until the connection task has written its headers),
//! so every unary call to a co-located service cost two writes and woke the callee twice. On a
//! small machine a wake-up of an idle process is the largest cost of an internal hop
//! (docs/BENCHMARKS.md, ADR 008). [`Corked`] buffers what the connection writes and, on flush,
//! first lets the other ready tasks of the runtime run once (`yield_now`, whose wake-up tokio
//! defers until its run queue is empty): the body's DATA frame joins the headers, and both leave
//! in one write. No timer is involved, so nothing waits for more than one scheduler pass.
//! Servers cork their connections too: a response's DATA and its trailers leave together.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Beyond this many buffered bytes, writes go through without waiting for a flush.
const MAX_BUFFERED: usize = 64 * 1024;

type Yield = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A transport whose writes are gathered until a flush, which yields once before writing.
pub struct Corked<T> {
    inner: T,
    buffer: Vec<u8>,
    pending_yield: Option<Yield>,
}

impl<T> Corked<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buffer: Vec::new(),
            pending_yield: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes the whole buffer to the transport.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buffer.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buffer.drain(..written);
        }
        Poll::Ready(Ok(()))
    }

    /// Room for `len` more bytes: drains the buffer first when they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buffer.len() + len > MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Corked<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_room(cx, data.len()))?;
        if data.len() >= MAX_BUFFERED {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if len >= MAX_BUFFERED {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.buffer.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buffer.is_empty() {
            // Once per flush, let the other ready tasks queue their frames into this write.
            let pending = this
                .pending_yield
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            ready!(pending.as_mut().poll(cx));
            this.pending_yield = None;
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_reach_the_peer_only_at_a_flush_and_in_order() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client);
        corked.write_all(b"headers|").await.expect("write");
        corked.write_all(b"data").await.expect("write");
        let mut probe = [0u8; 1];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            server.read(&mut probe),
        )
        .await;
        assert!(early.is_err(), "nothing is written before the flush");
        corked.flush().await.expect("flush");
        let mut got = vec![0u8; 12];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"headers|data");
    }

    #[tokio::test]
    async fn large_writes_go_through_and_nothing_is_lost() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client);
        let big: Vec<u8> = (0..(3 * MAX_BUFFERED)).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read");
            got
        });
        corked.write_all(b"start").await.expect("write");
        corked.write_all(&big).await.expect("write");
        corked.write_all(b"end").await.expect("write");
        corked.shutdown().await.expect("shutdown");
        drop(corked);
        let got = reader.await.expect("join");
        let mut expected = b"start".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"end");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
    }
}

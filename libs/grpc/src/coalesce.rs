//! Fewer HTTP/2 writes per call: a request body that says it has ended as soon as it has.
//!
//! tonic's request body learns that a unary call's single message was the last one only when it
//! is polled again, so hyper sends the message as a DATA frame and then, separately, an empty DATA
//! frame carrying END_STREAM. On loopback every write wakes the peer, and that second write and
//! wake-up showed as a measurable share of each internal hop (docs/BENCHMARKS.md, ADR 008).
//! [`CoalescedBody`] wraps the body so that, after each data frame, the next frame is polled at once:
//! when the body turns out to be finished, the data frame goes out with END_STREAM. Streaming
//! bodies are unchanged: a frame that is not ready yet is simply polled later.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;

/// A body that looks one frame ahead after each data frame (see the module docs).
pub struct CoalescedBody {
    inner: Body,
    /// A frame polled ahead, returned by the next poll.
    ahead: Option<Result<Frame<Bytes>, tonic::Status>>,
    /// The inner body returned its end while looking ahead.
    ended: bool,
}

impl CoalescedBody {
    /// Wraps `inner`.
    pub fn new(inner: Body) -> Self {
        Self {
            inner,
            ahead: None,
            ended: false,
        }
    }
}

impl HttpBody for CoalescedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.ahead.take() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => frame,
            Poll::Ready(None) => {
                this.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => return Poll::Pending,
        };
        if frame.as_ref().is_ok_and(Frame::is_data) {
            // Look ahead: a body that has nothing more lets the data carry END_STREAM.
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(next)) => this.ahead = Some(next),
                Poll::Ready(None) => this.ended = true,
                // The inner body registered the waker; it is polled again when it has more.
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ahead.is_some() {
            // What is left of the inner body plus the frame held: not known exactly.
            SizeHint::default()
        } else if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn stream_body(chunks: Vec<&'static str>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(c.as_bytes()))));
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_single_message_body_ends_with_its_data_frame() {
        let mut body = CoalescedBody::new(stream_body(vec!["only"]));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(
            frame.into_data().expect("data"),
            Bytes::from_static(b"only")
        );
        // The end is known without another poll, so the frame can carry END_STREAM.
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn several_frames_keep_their_order_and_content() {
        let mut body = CoalescedBody::new(stream_body(vec!["a", "b", "c"]));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            assert!(!body.is_end_stream() || seen.len() == 2);
            seen.push(frame.expect("ok").into_data().expect("data"));
        }
        assert_eq!(
            seen,
            ["a", "b", "c"].map(|s| Bytes::from_static(s.as_bytes()))
        );
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_pending_body_is_passed_through_as_a_stream() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        let mut body = CoalescedBody::new(Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("send");
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"first")
        );
        assert!(!body.is_end_stream(), "the sender is still open");
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .expect("send");
        drop(tx);
        let second = body.frame().await.expect("frame").expect("ok");
        assert_eq!(
            second.into_data().expect("data"),
            Bytes::from_static(b"second")
        );
        assert!(body.is_end_stream());
    }
}

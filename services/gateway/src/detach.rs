//! The rest of a request that reached a provider, polled in its caller's task and finished in a
//! task of its own if the caller goes away.
//!
//! A provider's unary answer is paid for whether or not anyone reads it, so a request whose caller
//! leaves (an HTTP client that disconnects, a gRPC reset: the handler's future is dropped) must
//! still end with its own row, with the provider's usage and the target that served. Spawning
//! every request's tail would cost each one a task hop (ADR 010 keeps calls in the connection's
//! task); [`Detachable`] costs one allocation: it is polled where it is awaited, and only when it
//! is dropped unfinished does it move, as it stands, into a task of the pipeline's tracker, which
//! the gateway's shutdown waits for.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Whether the caller of a [`Detachable`] went away (it was dropped before it finished).
#[derive(Debug, Clone, Default)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    /// True once the caller stopped waiting: what the request produces is never delivered.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A future that finishes even if it is dropped first (see the module docs).
pub struct Detachable<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    tasks: TaskTracker,
    abandoned: Abandoned,
    /// The span it was made in: it is polled inside it where it is awaited, and it finishes
    /// inside it once detached (instrumented only then, so the request path pays nothing).
    span: tracing::Span,
}

impl<T: Send + 'static> Detachable<T> {
    /// `make` builds the future from the flag it can read to learn that its caller went away.
    pub fn new<F>(tasks: &TaskTracker, make: impl FnOnce(Abandoned) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let abandoned = Abandoned::default();
        Detachable {
            future: Some(Box::pin(make(abandoned.clone()))),
            tasks: tasks.clone(),
            abandoned,
            span: tracing::Span::current(),
        }
    }
}

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(future) = self.future.as_mut() else {
            // Polled after it finished: a bug of the caller's, never reached by `.await`.
            return Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            self.abandoned.0.store(true, Ordering::Release);
            // Dropped outside a runtime (only while a runtime itself is torn down) there is
            // nowhere to finish it: it is dropped, as a request cut by a crash would be.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let span = std::mem::replace(&mut self.span, tracing::Span::none());
                self.tasks.spawn_on(
                    async move {
                        let _ = future.await;
                    }
                    .instrument(span),
                    &runtime,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn awaited_it_is_its_futures_output_and_never_abandoned() {
        let tasks = TaskTracker::new();
        let seen = Arc::new(std::sync::Mutex::new(None));
        let record = seen.clone();
        let output = Detachable::new(&tasks, |abandoned| async move {
            *record.lock().unwrap() = Some(abandoned.is_set());
            7
        })
        .await;
        assert_eq!(output, 7);
        assert_eq!(*seen.lock().unwrap(), Some(false));
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn dropped_unfinished_it_finishes_in_a_task_knowing_its_caller_left() {
        let tasks = TaskTracker::new();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<bool>();
        let detachable = Detachable::new(&tasks, |abandoned| async move {
            let _ = released.await;
            let _ = done.send(abandoned.is_set());
        });
        // Polled once (it waits for `release`), then dropped: its caller went away.
        let caller = tokio::spawn(detachable);
        tokio::task::yield_now().await;
        caller.abort();
        let _ = caller.await;
        release.send(()).unwrap();
        assert_eq!(
            finished.await,
            Ok(true),
            "it finished, told its caller left"
        );
        tasks.close();
        tasks.wait().await;
    }
}

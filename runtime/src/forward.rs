//! Feeding an actor from outside its mailbox: a task that casts a message to the actor
//! for every item of a stream (grant events) or every change of a watched value (the
//! registry's status, its restarts), until the stream ends or the actor is gone.
//!
//! Owns: that task only; the caller keeps its handle and aborts it as the actor stops.
//! Must not touch: what the messages mean.

use futures::{Stream, StreamExt};
use ractor::{ActorRef, Message};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Casts `wrap(item)` to `actor` for every item of `stream`.
pub fn each_item<S, M>(
    mut stream: S,
    actor: ActorRef<M>,
    wrap: impl Fn(S::Item) -> M + Send + 'static,
) -> JoinHandle<()>
where
    S: Stream + Unpin + Send + 'static,
    S::Item: Send,
    M: Message,
{
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if actor.cast(wrap(item)).is_err() {
                break;
            }
        }
    })
}

/// Casts `message()` to `actor` every time the value behind `changes` changes (the value
/// it holds now counts as seen).
pub fn each_change<T, M>(
    changes: watch::Receiver<T>,
    actor: ActorRef<M>,
    message: impl Fn() -> M + Send + 'static,
) -> JoinHandle<()>
where
    T: Send + Sync + 'static,
    M: Message,
{
    let changes = futures::stream::unfold(changes, |mut changes| async move {
        changes.changed().await.ok().map(|()| ((), changes))
    });
    each_item(Box::pin(changes), actor, move |()| message())
}

//! Replies: the node's one reply address and the calls waiting on it.
//!
//! RabbitMQ 3.x has no dynamic link sources, so the reply address is a named one (the
//! spec's workaround): `[rpc.amqp10] reply` applied to `reply/<node>`. One pre-settled
//! receiver link takes every reply of the node; a reply's correlation-id names its call.
//! A call waits with the generation of the connection it was sent on: when that
//! connection goes, its request (pre-settled, at most once) may be lost with it, so the
//! call fails at once with `Lost` instead of waiting out its timeout. A reply nobody
//! waits for (its call timed out or failed) is dropped and counted.
//!
//! Owns: the pending calls and the late-reply count. Must not touch: the link itself
//! (a [`Receiving`](super::Receiving) like any other).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use super::Amqp10Error;
use super::message::Incoming;

/// What a waiting call gets: its reply, or why there will be none.
pub(crate) type Answer = Result<Incoming, Amqp10Error>;

/// The calls waiting for a reply, by request id.
#[derive(Default)]
pub(crate) struct Pending {
    waiting: parking_lot::Mutex<HashMap<String, (u64, oneshot::Sender<Answer>)>>,
    late: AtomicU64,
}

impl Pending {
    /// Registers call `id`, sent on connection `generation`.
    pub fn wait(&self, id: &str, generation: u64) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id.to_string(), (generation, tx));
        rx
    }

    /// Forgets call `id` (it timed out or failed before it was sent).
    pub fn forget(&self, id: &str) {
        self.waiting.lock().remove(id);
    }

    /// Hands `reply` to its call; counts it as late when no call waits.
    pub fn answer(&self, reply: Incoming) {
        let waiting = reply
            .correlation_id
            .as_deref()
            .and_then(|id| self.waiting.lock().remove(id));
        match waiting {
            Some((_, tx)) => {
                if tx.send(Ok(reply)).is_err() {
                    self.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.late.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Fails every call sent on a connection older than `generation` (`None`: every
    /// call): their connection is gone.
    pub fn lost_before(&self, generation: Option<u64>) {
        let mut waiting = self.waiting.lock();
        let gone: Vec<String> = waiting
            .iter()
            .filter(|(_, (sent_on, _))| generation.is_none_or(|current| *sent_on < current))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((_, tx)) = waiting.remove(&id) {
                let _ = tx.send(Err(Amqp10Error::Lost));
            }
        }
    }

    /// Replies that came with no call waiting for them.
    pub fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: &str) -> Incoming {
        Incoming {
            correlation_id: Some(id.to_string()),
            ..Incoming::default()
        }
    }

    #[tokio::test]
    async fn a_reply_reaches_its_call_and_a_stray_one_is_counted() {
        let pending = Pending::default();
        let call = pending.wait("a", 1);
        pending.answer(reply("a"));
        assert!(call.await.unwrap().is_ok());
        pending.answer(reply("a"));
        pending.answer(Incoming::default());
        assert_eq!(pending.late(), 2);
    }

    #[tokio::test]
    async fn calls_of_a_lost_connection_fail_at_once() {
        let pending = Pending::default();
        let old = pending.wait("old", 1);
        let new = pending.wait("new", 2);
        pending.lost_before(Some(2));
        assert_eq!(old.await.unwrap().unwrap_err(), Amqp10Error::Lost);
        pending.answer(reply("new"));
        assert!(new.await.unwrap().is_ok());
        let last = pending.wait("last", 2);
        pending.lost_before(None);
        assert_eq!(last.await.unwrap().unwrap_err(), Amqp10Error::Lost);
    }
}

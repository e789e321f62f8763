//! The de-duplication window of a listener (opt-in, [`Dedup`]): the Msg-IDs of messages
//! handled successfully, so that a redelivery (an ack lost with its channel, a failover)
//! or a re-sent copy is acked without running the handlers again — "effectively once",
//! as MassTransit's inbox or an idempotent consumer gives it.
//!
//! A message counts as handled once its verdict is an ack: its handlers succeeded and
//! every publish they made was confirmed. A failed one is forgotten, so its redelivery
//! runs again (nothing is lost). A copy that arrives while the first is still being
//! handled (a channel was lost under it and the broker redelivered at once) waits for the
//! first to end, at most `hold`; then it is acked if the first succeeded, else handled.
//!
//! Memory is bounded: at most `size` handled ids, none older than `age`; ids being
//! handled are bounded by the prefetch of the listener's channels.
//!
//! Owns: the window and its rules. Must not touch: channels or acks (the consumer loop
//! settles what this decides).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The de-duplication window a listener opts into with [`ListenerSpec::dedup`]
/// (crate::listener::ListenerSpec::dedup): how many handled Msg-IDs it keeps, and for
/// how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dedup {
    /// Most Msg-IDs kept; the oldest goes first.
    pub size: usize,
    /// A Msg-ID older than this is forgotten.
    pub age: Duration,
}

impl Dedup {
    pub fn new(size: usize, age: Duration) -> Self {
        Dedup { size, age }
    }
}

impl Default for Dedup {
    /// 100,000 ids for 10 minutes: a failover's redeliveries come within seconds.
    fn default() -> Self {
        Dedup::new(100_000, Duration::from_secs(600))
    }
}

/// Where a Msg-ID stands.
enum Entry<V> {
    /// Being handled; waiters are woken when it ends.
    Running(Arc<Notify>),
    /// Handled successfully at this instant, with what a copy gets (an RPC server's
    /// reply; nothing for a listener).
    Done(Instant, V),
}

struct Inner<V> {
    entries: HashMap<Arc<str>, Entry<V>>,
    /// Handled ids, oldest first (an id may appear twice if handled again after it
    /// expired; only the entry's own instant removes it).
    order: VecDeque<(Instant, Arc<str>)>,
}

/// A listener's window, shared by all its consumer loops (a redelivery after a failover
/// comes on another channel); an RPC server keeps one with its replies.
pub(crate) struct Window<V = ()> {
    limits: Dedup,
    inner: Mutex<Inner<V>>,
}

/// What the window says about a message.
pub(crate) enum Seen<V: Clone = ()> {
    /// Not seen: handle it, and tell the claim how it ended.
    New(Claim<V>),
    /// Handled successfully already: ack it without running the handlers (`V`: what the
    /// first copy left, e.g. its reply).
    Handled(V),
    /// Being handled right now: wait for that to end (see [`Window::wait`]).
    Running(Arc<Notify>),
}

impl<V: Clone> Window<V> {
    pub fn new(limits: Dedup) -> Arc<Window<V>> {
        Arc::new(Window {
            limits,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
            }),
        })
    }

    /// Looks `msg_id` up, claiming it when it is new.
    pub fn claim(self: &Arc<Self>, msg_id: &str) -> Seen<V> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        self.expire(&mut inner, now);
        match inner.entries.get(msg_id) {
            Some(Entry::Done(_, value)) => Seen::Handled(value.clone()),
            Some(Entry::Running(notify)) => Seen::Running(notify.clone()),
            None => {
                let id: Arc<str> = Arc::from(msg_id);
                inner
                    .entries
                    .insert(id.clone(), Entry::Running(Arc::new(Notify::new())));
                Seen::New(Claim {
                    window: self.clone(),
                    msg_id: id,
                    ended: false,
                })
            }
        }
    }

    /// A copy of a message being handled: waits (at most `hold`) for the first to end, then
    /// looks again. `Running` after `hold` means the first still runs: handle the copy
    /// without a claim.
    pub async fn wait(
        self: &Arc<Self>,
        msg_id: &str,
        notify: Arc<Notify>,
        hold: Duration,
    ) -> Seen<V> {
        let deadline = tokio::time::Instant::now() + hold;
        let mut notify = notify;
        loop {
            let waiting = notify.clone();
            let notified = waiting.notified();
            tokio::pin!(notified);
            // Registered before looking, so an end between the look and the wait is seen.
            notified.as_mut().enable();
            match self.claim(msg_id) {
                Seen::Running(current) if Arc::ptr_eq(&current, &notify) => {}
                // A new claim started meanwhile: wait for that one.
                Seen::Running(current) => {
                    notify = current;
                    continue;
                }
                seen => return seen,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Seen::Running(notify);
            }
        }
    }

    /// Ends a claim: remembered with `handled` when there is one, else forgotten.
    fn end(&self, msg_id: &Arc<str>, handled: Option<V>) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let Some(Entry::Running(notify)) = inner.entries.remove(msg_id) else {
            return;
        };
        if let Some(value) = handled
            && self.limits.size > 0
        {
            inner
                .entries
                .insert(msg_id.clone(), Entry::Done(now, value));
            inner.order.push_back((now, msg_id.clone()));
            self.expire(&mut inner, now);
        }
        drop(inner);
        notify.notify_waiters();
    }

    /// Drops handled ids past the size or the age.
    fn expire(&self, inner: &mut Inner<V>, now: Instant) {
        while let Some((at, id)) = inner.order.front() {
            let over = inner.order.len() > self.limits.size;
            let old = now.saturating_duration_since(*at) > self.limits.age;
            if !over && !old {
                break;
            }
            if matches!(inner.entries.get(id), Some(Entry::Done(done, _)) if done == at) {
                inner.entries.remove(id);
            }
            inner.order.pop_front();
        }
    }

    #[cfg(test)]
    fn handled_len(&self) -> usize {
        let inner = self.inner.lock();
        inner
            .entries
            .values()
            .filter(|entry| matches!(entry, Entry::Done(..)))
            .count()
    }
}

/// A message being handled under its Msg-ID. Dropped without [`Claim::end`] (its work was
/// abandoned at a stop deadline), it is forgotten, so a redelivery runs again.
pub(crate) struct Claim<V: Clone = ()> {
    window: Arc<Window<V>>,
    msg_id: Arc<str>,
    ended: bool,
}

impl<V: Clone> Claim<V> {
    /// The message is done: `Some` (with what a copy gets) when it succeeded, `None` to
    /// forget it, so that a copy runs again.
    pub fn end(mut self, handled: Option<V>) {
        self.ended = true;
        self.window.end(&self.msg_id, handled);
    }
}

impl<V: Clone> Drop for Claim<V> {
    fn drop(&mut self) {
        if !self.ended {
            self.window.end(&self.msg_id, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(size: usize, age: Duration) -> Arc<Window> {
        Window::new(Dedup::new(size, age))
    }

    fn claim(window: &Arc<Window>, id: &str) -> Claim {
        match window.claim(id) {
            Seen::New(claim) => claim,
            _ => panic!("{id} should be new"),
        }
    }

    #[test]
    fn a_handled_id_is_seen_as_handled_and_a_failed_one_runs_again() {
        let window = window(10, Duration::from_secs(60));
        claim(&window, "a").end(Some(()));
        assert!(matches!(window.claim("a"), Seen::Handled(())));
        claim(&window, "b").end(None);
        assert!(matches!(window.claim("b"), Seen::New(_)));
    }

    #[test]
    fn an_abandoned_claim_is_forgotten() {
        let window = window(10, Duration::from_secs(60));
        drop(claim(&window, "a"));
        assert!(matches!(window.claim("a"), Seen::New(_)));
    }

    #[test]
    fn the_window_keeps_at_most_size_ids_oldest_out_first() {
        let window = window(3, Duration::from_secs(60));
        for id in ["a", "b", "c", "d"] {
            claim(&window, id).end(Some(()));
        }
        assert_eq!(window.handled_len(), 3);
        assert!(matches!(window.claim("a"), Seen::New(_)));
        assert!(matches!(window.claim("d"), Seen::Handled(())));
    }

    #[test]
    fn ids_older_than_the_age_are_forgotten() {
        let window = window(10, Duration::from_millis(20));
        claim(&window, "a").end(Some(()));
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(window.claim("a"), Seen::New(_)));
    }

    #[tokio::test]
    async fn a_copy_waits_for_the_first_and_is_handled_if_it_succeeded() {
        let window = window(10, Duration::from_secs(60));
        let first = claim(&window, "a");
        let Seen::Running(notify) = window.claim("a") else {
            panic!("a is running");
        };
        let waiter = {
            let window = window.clone();
            tokio::spawn(async move { window.wait("a", notify, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        first.end(Some(()));
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the copy is released")
            .expect("no panic");
        assert!(matches!(seen, Seen::Handled(())));
    }

    #[tokio::test]
    async fn a_copy_gets_its_own_claim_when_the_first_failed_and_runs_on_past_the_hold() {
        let window = window(10, Duration::from_secs(60));
        let first = claim(&window, "a");
        let Seen::Running(notify) = window.claim("a") else {
            panic!("a is running");
        };
        let seen = window
            .wait("a", notify.clone(), Duration::from_millis(20))
            .await;
        assert!(
            matches!(seen, Seen::Running(_)),
            "still running after the hold"
        );
        first.end(None);
        assert!(matches!(
            window.wait("a", notify, Duration::from_secs(1)).await,
            Seen::New(_)
        ));
    }
}

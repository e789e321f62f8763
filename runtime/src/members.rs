//! Which member of a clustered broker a connection uses, and where it goes next.
//!
//! A broker entry may be a RabbitMQ cluster given as several member URIs. Every node of a
//! cluster serves the same queues, so losing the member a connection is on is a reconnect
//! to the same broker, not a failover to another one: the connection moves to the next
//! member at once, and only when every member failed in a row does it back off like a
//! single broker. The order is shuffled once per connection actor, so that the warren
//! nodes of a service spread over the cluster instead of all crowding its first member.
//!
//! Owns: the order and the position in it. Must not touch: connections, backoff timers or
//! the registry (the connection actor decides what to do with the answers).

use rand::seq::SliceRandom;

/// A position in a shuffled order of a broker's members.
#[derive(Clone, Debug)]
pub(crate) struct MemberCursor {
    /// Indices into `Broker::members`, shuffled.
    order: Vec<usize>,
    /// Position in `order` of the member in use (or to try next).
    at: usize,
    /// Members that failed in a row since the last connection or the last full sweep.
    failed_in_row: usize,
}

impl MemberCursor {
    /// A cursor over `members` members (at least one) in a random order.
    pub fn shuffled(members: usize) -> Self {
        let mut order: Vec<usize> = (0..members.max(1)).collect();
        order.shuffle(&mut rand::rng());
        MemberCursor {
            order,
            at: 0,
            failed_in_row: 0,
        }
    }

    /// The member in use: an index into `Broker::members`.
    pub fn current(&self) -> usize {
        self.order[self.at]
    }

    /// Whether there is more than one member to move between.
    pub fn is_cluster(&self) -> bool {
        self.order.len() > 1
    }

    /// A connect attempt on the current member failed: move to the next one. True when a
    /// member not tried since the last success remains (try it at once); false when every
    /// member failed in a row (back off, then start a new sweep).
    pub fn failed(&mut self) -> bool {
        self.advance();
        self.failed_in_row += 1;
        if self.failed_in_row < self.order.len() {
            true
        } else {
            self.failed_in_row = 0;
            false
        }
    }

    /// The connection on the current member was lost: move to the next one. True when
    /// there is another member to try at once.
    pub fn lost(&mut self) -> bool {
        self.failed_in_row = 0;
        self.advance();
        self.is_cluster()
    }

    /// A connection on the current member is up: it stays there.
    pub fn connected(&mut self) {
        self.failed_in_row = 0;
    }

    fn advance(&mut self) {
        self.at = (self.at + 1) % self.order.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_broker_never_moves_and_always_backs_off() {
        let mut cursor = MemberCursor::shuffled(1);
        assert!(!cursor.is_cluster());
        assert!(!cursor.failed());
        assert!(!cursor.lost());
        assert_eq!(cursor.current(), 0);
    }

    #[test]
    fn the_order_covers_every_member_once() {
        let mut cursor = MemberCursor::shuffled(3);
        let mut seen = vec![cursor.current()];
        cursor.failed();
        seen.push(cursor.current());
        cursor.failed();
        seen.push(cursor.current());
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn a_full_sweep_of_failures_backs_off_then_starts_again() {
        let mut cursor = MemberCursor::shuffled(3);
        let first = cursor.current();
        assert!(cursor.failed(), "second member next");
        assert!(cursor.failed(), "third member next");
        assert!(!cursor.failed(), "every member failed: back off");
        assert_eq!(
            cursor.current(),
            first,
            "the new sweep starts where the last did"
        );
        assert!(
            cursor.failed(),
            "a new sweep tries the others at once again"
        );
    }

    #[test]
    fn a_lost_member_is_left_for_the_next_and_a_success_resets_the_sweep() {
        let mut cursor = MemberCursor::shuffled(3);
        let first = cursor.current();
        assert!(cursor.lost());
        assert_ne!(cursor.current(), first);
        // The next member fails, the one after it connects.
        assert!(cursor.failed());
        cursor.connected();
        // A later loss gives every member a try again before backing off.
        assert!(cursor.lost());
        assert!(cursor.failed());
        assert!(cursor.failed());
        assert!(!cursor.failed());
    }

    #[test]
    fn shuffling_spreads_nodes_over_the_members() {
        let firsts: std::collections::HashSet<usize> = (0..200)
            .map(|_| MemberCursor::shuffled(3).current())
            .collect();
        assert_eq!(firsts.len(), 3, "every member is somebody's first");
    }
}

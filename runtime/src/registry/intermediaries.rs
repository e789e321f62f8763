//! The AMQP 1.0 intermediaries of the local zone (`amqp10_brokers`) and what the node
//! knows of each: the registry's second table, kept apart from the AMQP 0-9-1 brokers.
//!
//! The AMQP 1.0 keeper takes its list from here and reports every attempt, connection
//! and loss, as connection actors report to the broker table; the status document reads
//! it. It never decides anything for AMQP 0-9-1 (the primary, grants, bootstrap), and
//! AMQP 0-9-1 availability never decides anything here: the two protocols may well be
//! served by different nodes.
//!
//! Owns: the table and its updates. Must not touch: connections (the keeper's).

use parking_lot::RwLock;

use crate::uri::BrokerUri;

/// What the registry knows about one AMQP 1.0 intermediary right now.
///
/// It exists so that an operator (`/status`) and the keeper read one table: which
/// intermediary the node is on, and why the others are not used.
#[derive(Clone, Debug)]
pub struct Intermediary {
    /// Its place in `amqp10_brokers` (0: the primary).
    pub index: usize,
    pub uri: BrokerUri,
    /// The node's AMQP 1.0 connection is on it now.
    pub up: bool,
    /// The keeper's generation of the connection last opened to it (0: never).
    pub generation: u64,
    /// Attempts that failed since it was last up.
    pub failed_attempts: u32,
    /// Why the last attempt failed or the connection ended (password hidden).
    pub last_error: Option<String>,
}

/// The table, in `amqp10_brokers` order.
pub(super) struct Intermediaries {
    table: RwLock<Vec<Intermediary>>,
}

impl Intermediaries {
    pub fn new(uris: &[BrokerUri]) -> Self {
        let table = uris
            .iter()
            .enumerate()
            .map(|(index, uri)| Intermediary {
                index,
                uri: uri.clone(),
                up: false,
                generation: 0,
                failed_attempts: 0,
                last_error: None,
            })
            .collect();
        Intermediaries {
            table: RwLock::new(table),
        }
    }

    pub fn snapshot(&self) -> Vec<Intermediary> {
        self.table.read().clone()
    }

    /// The connection to `index` is up as `generation`; no other one is.
    pub fn up(&self, index: usize, generation: u64) {
        for entry in self.table.write().iter_mut() {
            entry.up = entry.index == index;
            if entry.index == index {
                entry.generation = generation;
                entry.failed_attempts = 0;
                entry.last_error = None;
            }
        }
    }

    /// An attempt to `index` failed (`failed`), or its connection ended.
    pub fn down(&self, index: usize, error: &str, failed: bool) {
        if let Some(entry) = self.table.write().get_mut(index) {
            entry.up = false;
            if failed {
                entry.failed_attempts = entry.failed_attempts.saturating_add(1);
            }
            entry.last_error = Some(crate::uri::redact_uri(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_intermediary_is_up_at_a_time_and_failures_are_counted_until_it_is() {
        let uris = ["amqp10://u:s3cr3t@a", "amqp10://u:s3cr3t@b"]
            .map(|uri| BrokerUri::parse_amqp10(uri).unwrap());
        let table = Intermediaries::new(&uris);
        table.down(0, "refused by amqp://u:s3cr3t@a", true);
        table.down(0, "refused", true);
        table.up(1, 3);
        let now = table.snapshot();
        assert_eq!((now[0].up, now[0].failed_attempts), (false, 2));
        assert!(!now[0].last_error.as_deref().unwrap().contains("s3cr3t"));
        assert_eq!((now[1].up, now[1].generation), (true, 3));
        table.up(0, 4);
        let now = table.snapshot();
        assert!(now[0].up && !now[1].up);
        assert_eq!(
            (now[0].failed_attempts, now[0].last_error.clone()),
            (0, None)
        );
        table.down(0, "connection reset", false);
        assert_eq!(table.snapshot()[0].failed_attempts, 0);
    }
}

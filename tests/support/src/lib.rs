//! Test support for warren's integration tests.
//!
//! Integration tests run against real RabbitMQ (see DESIGN.md, "Testing"): most of them use
//! the shared node at 127.0.0.1:5672 ([`local_uri`], [`local_ctl`]); failover tests start
//! private nodes ([`BrokerNode`]) on free ports that they can SIGKILL and restart without
//! disturbing anybody else, and quorum-queue failover tests a [`BrokerCluster`] of them
//! (SIGKILL a queue's leader, watch the queue move). [`list_connections`] and friends let
//! tests assert what the broker sees, and [`eventually`] / [`eventually_blocking`] replace
//! fixed sleeps with deadlines.
//!
//! Everything here is Linux-only and expects RabbitMQ's scripts under
//! `/usr/lib/rabbitmq/bin` (override with `WARREN_TEST_RABBITMQ_BIN_DIR`).

mod certs;
mod cluster;
mod ctl;
mod error;
mod node;
mod ports;
mod process;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use certs::{TEST_SERVER_NAME, TestCerts};
pub use cluster::BrokerCluster;
pub use ctl::{
    ConnectionRow, channel_count, close_connections, list_connections, local_ctl, local_uri,
};
pub use error::SupportError;
pub use node::BrokerNode;
pub use ports::{free_port, try_free_port};

/// How often [`eventually`] and [`eventually_blocking`] re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits until `f` returns true or `timeout` passes, polling every ~20 ms without blocking
/// the async runtime. Returns whether the condition became true. Exists so tests wait on
/// conditions with a deadline instead of sleeping for a fixed time.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// Blocking flavour of [`eventually`] for synchronous tests (sleeps the calling thread).
pub fn eventually_blocking<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

//! warren-runtime: everything a warren node needs that no app knows about.
//!
//! - configuration: `config`, `uri`;
//! - OTP-style supervision: `supervisor`, `backoff`;
//! - brokers: `broker` (identity), `registry` (who is up, who is primary),
//!   `connection_actor` (one broker's two connections), `connections` (their supervisor
//!   and the directory of connection actors), `bootstrap` (start-up);
//! - channels: `assignments` (float and sticky grants, failover, fail-back);
//! - the wire: `envelope` (kapi format), `kapi_conf` (Kazoo's configuration events),
//!   `exchanges`, `confirm` (one publish in confirm mode and its outcome), `publisher`
//!   (the node's publisher that follows the primary);
//! - `trace`: W3C trace context (`traceparent`) read from deliveries, written on publishes;
//! - `forward`: a task that feeds an actor from a stream or a watched value;
//! - `log_limit`: one log line per key and interval, for anything that can flood;
//! - `metrics`: every part's figures for a Prometheus scrape; `http`: the operator endpoint;
//! - `readiness`: which parts of the node do their work, and why the others do not;
//! - `node`: the root supervision tree and the handles apps are built with.
//!
//! Dependencies point one way: apps → listeners → runtime.

pub mod actor_slot;
pub mod amqp10;
pub mod assignments;
pub mod backoff;
pub mod bootstrap;
pub mod broker;
pub mod config;
pub mod confirm;
pub mod connection_actor;
pub mod connections;
pub mod envelope;
pub mod exchanges;
pub mod forward;
pub mod http;
pub mod kapi_conf;
pub mod log_limit;
mod members;
pub mod metrics;
pub mod node;
pub mod publish_figures;
pub mod publisher;
pub mod readiness;
pub mod registry;
pub mod status;
pub mod supervisor;
pub mod tls;
pub mod trace;
pub mod uri;

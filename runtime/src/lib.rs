//! warren-runtime: everything a warren node needs that no app knows about.
//!
//! Configuration (`config`, `uri`), OTP-style supervision (`supervisor`, `backoff`), broker
//! connections (`registry`, `connection`, `connections`), start-up (`bootstrap`) and the
//! root supervision tree (`node`). Dependencies point one way: apps → listeners → runtime.

pub mod backoff;
pub mod bootstrap;
pub mod config;
pub mod connection;
pub mod connections;
pub mod node;
pub mod registry;
pub mod supervisor;
pub mod uri;

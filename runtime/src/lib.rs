//! warren-runtime: everything a warren node needs that no app knows about.
//!
//! Configuration (`config`, `uri`), OTP-style supervision (`supervisor`, `backoff`), broker
//! connections (`registry`, `connection`, `connections`), channel leases (`assignments`),
//! start-up (`bootstrap`) and the
//! root supervision tree (`node`); the kapi wire format (`envelope`, `exchanges`) and
//! confirmed publishing (`publish`). Dependencies point one way: apps → listeners → runtime.

pub mod assignments;
pub mod backoff;
pub mod bootstrap;
pub mod config;
pub mod connection;
pub mod connections;
pub mod envelope;
pub mod exchanges;
pub mod node;
pub mod publish;
pub mod registry;
pub mod supervisor;
pub mod uri;

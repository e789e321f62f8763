//! warren-listeners: what application developers build on.
//!
//! An [`App`] names itself and lists the children warren runs for it under its own
//! supervisor (`app:<name>`). The listener behaviour and per-app pools build on this.
//! This crate knows the runtime (connections, supervision); it knows no particular app.

pub mod app;

pub use app::{App, AppContext, app_child};

//! Exchanges warren itself relies on, declared the way Kazoo declares them (transient, not
//! auto-deleted) so that warren and Kazoo nodes can share a broker without a declare
//! mismatch (`406 PRECONDITION_FAILED`) closing anyone's channel.

/// Direct exchange for replies and direct messages: routing key = the receiver's queue.
pub const TARGETED: &str = "targeted";

/// Topic exchange of configuration (document and database change) events.
pub const CONFIGURATION: &str = "configuration";

/// Topic exchange where nodes announce themselves (`announce`) and are asked to
/// (`query`): every node keeps the list of live nodes from it.
pub const NODES: &str = "nodes";

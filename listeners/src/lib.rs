//! warren-listeners: what application developers build on.
//!
//! An [`App`] names itself and lists the children warren runs for it under its own
//! supervisor (`app:<name>`). Its consumers are [`Listener`]s (Kazoo's gen_listener): a
//! declarative topology and responders, with acks, recovery and graceful stop handled by
//! warren. Short-lived work borrows a worker from the app's [`ListenerPool`] (publish,
//! temporary bindings, call / call_collect / cast) instead of opening channels; the node's
//! [`ConfigRouter`] fans configuration events out to local subscribers. An app imports
//! [`prelude`] only; [`testkit`] runs events through a listener without a broker. This
//! crate knows the runtime (connections, assignments, supervision); it knows no
//! particular app.

pub mod app;
pub mod listener;
pub mod nodes;
pub mod pool;
pub mod prelude;
pub mod router;
pub mod target;
pub mod testkit;

pub use app::{App, AppContext, AppError, app_child};
pub use listener::{
    AckMode, Binding, Dedup, DeliveryInfo, Dispatch, Event, Exchange, HandlerError, HandlerFn,
    HandlerResult, Listener, ListenerError, ListenerHandle, ListenerSpec, Notice, Outcome,
    Published, QUORUM_DELIVERY_LIMIT, QueueName, QueueSpec, Recorded, ResponderId, Responders,
    Returned, SpecError, StatsSnapshot, listener_child, spawn_listener,
};
pub use nodes::{NodeInfo, NodesService};
pub use pool::{
    Checkout, CollectEnd, Collected, ListenerPool, PoolError, PoolStats, RpcError, Until,
};
pub use router::{ConfigEvent, ConfigRouter, RouterError, RouterEvent, RouterStats, Subscription};
pub use target::{
    Amqp10Notifications, Amqp10Server, Notification, NotificationListener, RemoteError, Route,
    RpcServer, Target, TargetError, notify, spawn_rpc_server,
};
pub use warren_runtime::assignments::ChannelKind;
pub use warren_runtime::envelope::Envelope;

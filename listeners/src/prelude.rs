//! Everything an app needs, in one import: `use warren_listeners::prelude::*;`.
//!
//! Owns: the app-facing names and nothing else. An app crate depends on warren-listeners
//! alone and imports only this; anything an app needs and cannot reach from here is a gap
//! to fill here, not a reason to import warren-runtime.

pub use crate::app::{App, AppContext};
/// A listener started at run time, outside the app's children (apps/gateway: one per
/// connected client, on that client's own queue).
pub use crate::listener::spawn_listener;
pub use crate::listener::{
    AckMode, Binding, Dedup, DeliveryInfo, Dispatch, Event, Exchange, HandlerError, HandlerFn,
    HandlerResult, Listener, ListenerHandle, ListenerSpec, Notice, Outcome, Published, QueueSpec,
    Returned,
};
pub use crate::pool::{Checkout, ListenerPool, PoolError, RpcError};
pub use crate::router::{ConfigEvent, ConfigRouter, Subscription};
pub use crate::target::{
    MethodResult, Notification, NotificationListener, RemoteError, RpcServer, Target, TargetError,
};
pub use lapin::types::AMQPValue;
pub use lapin::{BasicProperties, ExchangeKind};
pub use warren_runtime::assignments::ChannelKind;
pub use warren_runtime::broker::{BrokerId, Role};
pub use warren_runtime::config::{
    EventPusherConfig, GatewayConfig, PusherExchange, PusherExchangeKind,
};
pub use warren_runtime::confirm::{PublishError, PublishOptions};
pub use warren_runtime::envelope::Envelope;
/// Routes an app serves on the node's HTTP endpoint (`AppContext::node.http`).
pub use warren_runtime::http::{HttpRoutes, RouteTaken};
/// One line per key and interval for warnings that can repeat (one per client, per frame).
pub use warren_runtime::log_limit::LogLimit;
/// An app's own figures at each scrape of `/metrics` (`AppContext::node.metrics`).
pub use warren_runtime::metrics::{
    Histogram, Metrics, MetricsEntry, Report, Source as MetricsSource,
};
/// Publishing in order with many messages in flight, and what it needs (apps/event_pusher).
pub use warren_runtime::publisher::{Declare, Publisher, Sent, Sequence};
pub use warren_runtime::registry::ConnectionRegistry;
pub use warren_runtime::supervisor::ChildSpec;
pub use warren_runtime::trace::{SpanId, TraceContext, TraceId};

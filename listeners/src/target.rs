//! RPC targets and notifications (oslo.messaging's model on warren's machinery).
//!
//! A [`Target`] names who should get a request: one named server of a topic, one server
//! of the topic's group, or every server of it (fanout), optionally under an exchange of
//! its own. An [`RpcServer`] is an app's table of named methods, served by three listeners
//! (one per address) under one supervised child; the client side is a few methods on a
//! [`ListenerPool`](crate::ListenerPool) and a [`Checkout`](crate::Checkout)
//! (`call_target`, `cast_target`, `fanout_cast`; a call's reply comes to the pool's reply
//! queue); notifications are `notify` (confirmed, persistent) and a
//! [`NotificationListener`].
//!
//! Files: `address` (targets and their AMQP names), `wire` (the bodies on the wire),
//! `server` (the method table and its listeners), `client` (calls and casts), `notify`
//! (notifications, both ends), `amqp10` (all of it over AMQP 1.0 links when
//! `[rpc] transport = "amqp10"`). The README's "RPC targets and
//! notifications" is the peer-facing description of all of it.
//!
//! Owns: the address scheme and the RPC/notification wire format. Must not touch: the
//! listener and pool machinery it runs on (it uses them as any app does).

mod address;
mod amqp10;
mod client;
mod notify;
mod server;
mod wire;

pub use address::{Route, Target, TargetError};
pub use amqp10::{Amqp10Notifications, Amqp10Server};
pub use notify::{Notification, NotificationListener, notify};
pub use server::{MethodResult, RpcServer, spawn_rpc_server};
pub use wire::RemoteError;

//! The RPC server the target tests serve, over either transport: what its methods saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use warren_listeners::{RemoteError, RpcServer};

/// What a test server's methods saw.
#[derive(Clone, Default)]
pub struct Calls {
    /// `whoami` calls answered, over all servers.
    pub answered: Arc<AtomicUsize>,
    /// `note` casts: (server, n).
    pub notes: Arc<Mutex<Vec<(String, i64)>>>,
    /// `slow` calls begun (counted before their sleep), over all servers.
    pub slow_started: Arc<AtomicUsize>,
}

/// The test server of `topic`, answering as `me`.
pub fn server(topic: &str, me: &str, calls: &Calls) -> RpcServer {
    let (whoami, answered) = (me.to_string(), calls.answered.clone());
    let (noter, notes) = (me.to_string(), calls.notes.clone());
    let slow_started = calls.slow_started.clone();
    RpcServer::new(topic)
        .method("whoami", move |_args: Value| {
            let me = whoami.clone();
            answered.fetch_add(1, Ordering::SeqCst);
            async move { Ok(json!(me)) }
        })
        .method("echo", |args: Value| async move { Ok(args) })
        .method("fail", |_args: Value| async {
            Err(RemoteError::new("NotFound", "no such thing"))
        })
        .method("boom", |_args: Value| async { panic!("kaboom") })
        .method("slow", move |args: Value| {
            slow_started.fetch_add(1, Ordering::SeqCst);
            async move {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!("slow"))
            }
        })
        .method("note", move |args: Value| {
            let n = args.get("n").and_then(Value::as_i64).unwrap_or(-1);
            notes.lock().push((noter.clone(), n));
            async { Ok(Value::Null) }
        })
}

//! The bodies of RPC requests, replies and notifications: kapi envelopes (a JSON object
//! with `Event-Category` and `Event-Name`, as every warren listener decodes), so that
//! they travel through warren's own listeners and pool workers unchanged.
//!
//! Owns: the field names and shapes below, and [`RemoteError`]. Must not touch: AMQP
//! properties and routing (the server, client and notify files set those).
//!
//! - request: `{"Event-Category":"rpc","Event-Name":<method>,"Msg-ID":<id>,"Args":{..}}`
//! - reply: `{"Event-Category":"rpc","Event-Name":"reply","Msg-ID":<request id>,
//!   "Result":<value>}` or `… "Failure":{"type":<kind>,"message":<text>}}`
//! - notification: `{"Event-Category":"notification","Event-Name":<event type>,
//!   "Msg-ID":<id>,"Priority":<priority>,"Payload":{..},"Timestamp":<RFC 3339>,
//!   "Publisher-ID":<node>}`

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use warren_runtime::envelope::{Envelope, keys};

/// `Event-Category` of requests and replies.
pub(crate) const RPC: &str = "rpc";
/// `Event-Name` of replies.
pub(crate) const REPLY: &str = "reply";
/// `Event-Category` of notifications.
pub(crate) const NOTIFICATION: &str = "notification";
pub(crate) const ARGS: &str = "Args";
pub(crate) const RESULT: &str = "Result";
pub(crate) const FAILURE: &str = "Failure";
pub(crate) const PRIORITY: &str = "Priority";
pub(crate) const PAYLOAD: &str = "Payload";
pub(crate) const TIMESTAMP: &str = "Timestamp";
pub(crate) const PUBLISHER_ID: &str = "Publisher-ID";

/// An error a server's method (or the server itself) sent back instead of a result: its
/// kind and message, like oslo.messaging's remote exceptions.
///
/// It exists so that a caller gets why a call failed on the other side, typed, in the
/// same shape a handler returns it: a method returns `Err(RemoteError)`, the caller gets
/// `RpcError::Remote(RemoteError)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    /// What went wrong, as a short name (`UnknownMethod`, `BadRequest`, `Panic`, or the
    /// method's own, e.g. `NotFound`).
    pub kind: String,
    pub message: String,
}

impl RemoteError {
    /// Kind of the reply to a method the server does not have.
    pub const UNKNOWN_METHOD: &'static str = "UnknownMethod";
    /// Kind of the reply to a request the server cannot read (arguments not an object, a
    /// category other than `rpc`).
    pub const BAD_REQUEST: &'static str = "BadRequest";
    /// Kind of the reply when the method panicked.
    pub const PANIC: &'static str = "Panic";
    /// Kind a caller sees when a reply has neither `Result` nor a readable `Failure`.
    pub const BAD_REPLY: &'static str = "BadReply";

    /// An error of the method's own kind.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            kind: kind.into(),
            message: message.into(),
        }
    }

    pub fn unknown_method(method: &str) -> Self {
        RemoteError::new(
            Self::UNKNOWN_METHOD,
            format!("the server has no method `{method}`"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        RemoteError::new(Self::BAD_REQUEST, message)
    }

    pub fn panic(message: impl Into<String>) -> Self {
        RemoteError::new(Self::PANIC, message)
    }

    fn to_json(&self) -> Value {
        json!({"type": self.kind, "message": self.message})
    }
}

/// A request for `method` with `args` (an object; null counts as `{}`).
pub(crate) fn request(method: &str, args: Value) -> Result<Envelope, Value> {
    let args = match args {
        Value::Null => Value::Object(Map::new()),
        Value::Object(map) => Value::Object(map),
        other => return Err(other),
    };
    Ok(Envelope::new(RPC, method).with(ARGS, args))
}

/// The arguments of a request: its `Args` object (`{}` when absent).
pub(crate) fn args(request: &Envelope) -> Result<Value, RemoteError> {
    // Read from the received text: the rest of the request is not parsed.
    let [args] = request.extract([ARGS]);
    match args {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(args @ Value::Object(_)) => Ok(args),
        Some(_) => Err(RemoteError::bad_request("`Args` must be a JSON object")),
    }
}

/// The reply to request `msg_id`: its result or its failure.
pub(crate) fn reply(msg_id: &str, outcome: &Result<Value, RemoteError>) -> Envelope {
    let reply = Envelope::new(RPC, REPLY).with(keys::MSG_ID, msg_id);
    match outcome {
        Ok(value) => reply.with(RESULT, value.clone()),
        Err(error) => reply.with(FAILURE, error.to_json()),
    }
}

/// What a reply says: the result, or the failure it carries.
pub(crate) fn outcome(reply: &Envelope) -> Result<Value, RemoteError> {
    // Read from the received text: the rest of the reply is not parsed.
    let [failure, result] = reply.extract([FAILURE, RESULT]);
    if let Some(failure) = failure {
        let field = |name: &str| failure.get(name).and_then(Value::as_str);
        return Err(match (field("type"), field("message")) {
            (Some(kind), message) => RemoteError::new(kind, message.unwrap_or_default()),
            _ => RemoteError::new(RemoteError::BAD_REPLY, "a `Failure` without a `type`"),
        });
    }
    result.ok_or_else(|| {
        RemoteError::new(
            RemoteError::BAD_REPLY,
            "a reply with neither `Result` nor `Failure`",
        )
    })
}

/// A notification body (see the module docs).
pub(crate) fn notification(
    event_type: &str,
    priority: &str,
    payload: Value,
    publisher_id: &str,
) -> Envelope {
    Envelope::new(NOTIFICATION, event_type)
        .with(PRIORITY, priority)
        .with(PAYLOAD, payload)
        .with(TIMESTAMP, rfc3339(SystemTime::now()))
        .with(PUBLISHER_ID, publisher_id)
}

/// `at` in UTC as RFC 3339 with milliseconds, e.g. `2024-05-01T12:00:00.250Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = UNIX_EPOCH + Duration::from_millis(1_714_564_800_250);
        assert_eq!(rfc3339(at), "2024-05-01T12:00:00.250Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_request_carries_its_args_as_an_object() {
        let request = request("get_status", json!({"id": 1})).unwrap();
        assert_eq!(request.category(), "rpc");
        assert_eq!(request.name(), "get_status");
        assert_eq!(args(&request).unwrap(), json!({"id": 1}));
        assert_eq!(
            args(&super::request("m", Value::Null).unwrap()).unwrap(),
            json!({})
        );
        assert!(super::request("m", json!([1])).is_err());
        let bad = Envelope::new("rpc", "m").with(ARGS, 3);
        assert_eq!(args(&bad).unwrap_err().kind, RemoteError::BAD_REQUEST);
    }

    #[test]
    fn replies_round_trip_results_and_failures() {
        let ok = reply("m-1", &Ok(json!({"up": true})));
        assert_eq!(ok.msg_id(), Some("m-1"));
        assert_eq!((ok.category(), ok.name()), ("rpc", "reply"));
        assert_eq!(outcome(&ok).unwrap(), json!({"up": true}));
        let failed = reply("m-2", &Err(RemoteError::new("NotFound", "no such id")));
        assert_eq!(
            failed.get(FAILURE),
            Some(&json!({"type": "NotFound", "message": "no such id"}))
        );
        assert_eq!(
            outcome(&failed).unwrap_err(),
            RemoteError::new("NotFound", "no such id")
        );
        let empty = Envelope::new("rpc", "reply");
        assert_eq!(outcome(&empty).unwrap_err().kind, RemoteError::BAD_REPLY);
    }
}

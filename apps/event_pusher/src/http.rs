//! `POST /events` on the node's HTTP endpoint: one event (a JSON object) or a batch (a
//! JSON array), answered only once the broker confirmed every event of the request.
//!
//! - 200 `{"events": n, "confirmed": n}`: every event is on the broker.
//! - 400 `{"error": …, "index": i, "field": …}`: the body is too large, not JSON, or an
//!   event is invalid; nothing of the request was published.
//! - 503 `{"error": …, "events": n, "confirmed": k}` with `Retry-After`: no broker, or
//!   the broker did not confirm within the publish bound; `confirmed` of them did get
//!   there, so sending the request again gives those twice (at least once), never loses one.
//!
//! Owns the HTTP form of the pusher. Must not touch publishing (`pusher`, `lanes`).

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::event::PushEvent;
use crate::pusher::{EventPusher, PushError};

/// The path of the route.
pub const PATH: &str = "/events";

/// Seconds a client should wait before sending a refused request again.
const RETRY_AFTER_SECS: &str = "1";

/// The route, serving `pusher`.
pub fn router(pusher: EventPusher) -> Router {
    Router::new().route(PATH, post(events)).with_state(pusher)
}

async fn events(State(pusher): State<EventPusher>, body: Body) -> Response {
    let limit = pusher.config().max_request_bytes;
    let Ok(bytes) = to_bytes(body, limit).await else {
        return bad(
            format!("the body is larger than {limit} bytes (max_request_bytes) or unreadable"),
            None,
            None,
        );
    };
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(error) => return bad(format!("not JSON: {error}"), None, None),
    };
    let items = match value {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        _ => {
            return bad(
                "expected an event object or an array of them".into(),
                None,
                None,
            );
        }
    };
    let max = pusher.config().max_batch;
    if items.is_empty() || items.len() > max {
        return bad(
            format!(
                "a batch holds 1 to {max} events (max_batch), this one {}",
                items.len()
            ),
            None,
            None,
        );
    }
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        match PushEvent::from_json(item) {
            Ok(event) => events.push(event),
            Err(error) => {
                return bad(
                    format!("event {index}: {error}"),
                    Some(index),
                    Some(error.field),
                );
            }
        }
    }
    let outcome = pusher.push_all(events).await;
    match outcome.failure {
        None => (
            StatusCode::OK,
            axum::Json(json!({"events": outcome.events, "confirmed": outcome.confirmed})),
        )
            .into_response(),
        Some(PushError::Invalid { index, error }) => bad(
            format!("event {index}: {error}"),
            Some(index),
            Some(error.field),
        ),
        Some(error) => {
            tracing::warn!(%error, events = outcome.events, confirmed = outcome.confirmed, "POST /events refused: not every event was confirmed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
                axum::Json(json!({
                    "error": error.to_string(),
                    "events": outcome.events,
                    "confirmed": outcome.confirmed,
                })),
            )
                .into_response()
        }
    }
}

fn bad(error: String, index: Option<usize>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": error });
    if let Some(index) = index {
        body["index"] = json!(index);
    }
    if let Some(field) = field {
        body["field"] = json!(field);
    }
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

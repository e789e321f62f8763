//! The kapi message envelope: Kazoo's wire format, so warren apps can talk to Kazoo nodes.
//!
//! Owns the envelope format only: which headers a message body carries (they live in
//! the JSON body, not in AMQP headers), how a body is decoded from a delivery (content
//! type, gzip, size cap, validation) and encoded for publishing, how Msg-IDs are made,
//! how a reply is correlated with its request, and which AMQP properties go with a
//! published envelope. It must not touch channels or connections: publishing and
//! consuming belong to the publisher and the listeners.
//!
//! Decoding runs once per delivery, on the hot path: one pass checks the body and records
//! the headers warren reads itself, allocating only the copy of the text (and a Msg-ID
//! when one must be generated, or the gunzipped body); the map of fields is built when a
//! caller first asks for a field (`envelope/wire.rs`).
//!
//! Bodies come from anyone who can publish, so decoding is bounded everywhere
//! ([`DecodeLimits`]): a body above the limit is refused before it is read, gzip output
//! stops at the limit, the parsed JSON is bounded in values and in nesting depth, and a
//! field that warren would turn into an AMQP short string (Server-ID) is checked against
//! AMQP's 255 bytes. Large work runs off the async worker threads ([`decode_owned`]).

use std::io::Read;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use lapin::BasicProperties;
use lapin::types::{MAX_SHORT_STRING_LENGTH, ShortString};
use rand::Rng;
use serde_json::{Map, Value};

mod wire;

use wire::{Scalar, Slot, Wire};

/// Header names of Kazoo's kapi envelope (all live in the JSON body, not AMQP headers).
///
/// They exist so that every part of warren, and every app, spells Kazoo's headers the
/// same way; a typo in a header name would silently break interoperability.
pub mod keys {
    /// Required. The API family of a message (`call_event`, `configuration`, …); responders match on it.
    pub const EVENT_CATEGORY: &str = "Event-Category";
    /// Required. The message kind within its category; responders match on it.
    pub const EVENT_NAME: &str = "Event-Name";
    /// Required on every API message: the sending application, for tracing and `call_collect` counts.
    pub const APP_NAME: &str = "App-Name";
    /// Required on every API message: the sending application's version, for tracing.
    pub const APP_VERSION: &str = "App-Version";
    /// Required on every API message: the message's id; a reply carries its request's id here.
    pub const MSG_ID: &str = "Msg-ID";
    /// The sending node's name, filled in automatically when missing.
    pub const NODE: &str = "Node";
    /// On a request: the requester's queue name, the routing key its reply goes to on `targeted`.
    pub const SERVER_ID: &str = "Server-ID";
    /// Where a worker moves a request's original Server-ID when it puts its own queue there.
    pub const SERVER_QUEUE_ID: &str = "Server-Queue-ID";
    /// When present on a request, the id its replies are matched on instead of Msg-ID.
    pub const MSG_REPLY_ID: &str = "Msg-Reply-ID";
    /// On a reply: "keep waiting for a better answer, use me only if none comes".
    pub const DEFER_RESPONSE: &str = "Defer-Response";
    /// Optional: the access group a message belongs to.
    pub const ACCESS_GROUP: &str = "Access-Group";
    /// Optional: the node a message is meant for.
    pub const DESTINATION_SERVER: &str = "Destination-Server";
    /// Optional: the sender's zone or location.
    pub const GEO_LOCATION: &str = "Geo-Location";
    /// Optional: the id used to correlate log lines across nodes (often the call-id).
    pub const LOG_ID: &str = "Log-ID";
    /// Optional: the account a message concerns.
    pub const ACCOUNT_ID: &str = "Account-ID";
    /// Optional: the call a message concerns.
    pub const CALL_ID: &str = "Call-ID";
    /// Optional: raw SIP/switch headers carried along with a message.
    pub const RAW_HEADERS: &str = "Raw-Headers";
    /// Optional: Kazoo's Erlang pid of the requester (opaque to warren, carried through).
    pub const REQUEST_FROM_PID: &str = "Request-From-PID";
    /// Optional: Kazoo's Erlang pid replies should be handed to (opaque to warren, carried through).
    pub const REPLY_TO_PID: &str = "Reply-To-PID";
    /// Set on receipt: the broker a message arrived from (federation).
    pub const AMQP_BROKER: &str = "AMQP-Broker";
    /// Set on receipt: the zone of the broker a message arrived from (federation).
    pub const AMQP_BROKER_ZONE: &str = "AMQP-Broker-Zone";
    /// Optional: the local process a message should go straight to, bypassing responders.
    pub const DELIVER_TO_PID: &str = "Deliver-To-PID";
    /// On an error response (`Event-Category: error`): what went wrong.
    pub const ERROR_MESSAGE: &str = "Error-Message";
    /// On an error response: the request that failed, when the responder includes it.
    pub const REQUEST: &str = "Request";
}

/// The content type warren publishes and expects.
///
/// Kazoo publishes JSON bodies with this type; warren rejects any other type rather
/// than guessing how to read it.
pub const CONTENT_TYPE: &str = "application/json";

/// The content encoding of a compressed envelope; the only compression Kazoo uses.
pub const GZIP_ENCODING: &str = "gzip";

/// The default largest body, in bytes, before and after gzip decoding (16 MiB, the
/// default of `[listener] max_message_bytes`).
///
/// It exists so that [`Envelope::decode`] is bounded even for callers that have no
/// configuration at hand: a huge body or a small compressed one (a "zip bomb") is a
/// decode error rather than an out-of-memory crash of the whole service.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The most bytes an envelope field may hold when warren turns it into an AMQP short
/// string (a routing key): 255, AMQP 0-9-1's limit.
///
/// It exists because lapin panics on a longer short string: a Server-ID above it must be
/// refused when the request is decoded, not when its reply is published.
pub const MAX_SHORT_STRING_BYTES: usize = MAX_SHORT_STRING_LENGTH;

/// Plain (identity) bodies up to this many bytes are decoded on the calling thread by
/// [`decode_owned`]; larger ones on tokio's blocking pool.
///
/// 64 KiB: serde_json parses a few hundred MB/s into a map, so the largest inline body
/// costs a worker about 0.1–0.3 ms, the order of a task's fair share between two awaits;
/// below it, the hand-off to the blocking pool (tens of µs) would be a large part of the
/// work. Typical kapi messages are well under 4 KiB and never leave the fast path.
pub const INLINE_PLAIN_MAX: usize = 64 * 1024;

/// Gzip bodies up to this many bytes are decoded on the calling thread by
/// [`decode_owned`]; larger ones on tokio's blocking pool.
///
/// 256 bytes, because what gzip costs is its output, and deflate inflates up to about
/// 1032:1: a 256-byte body yields at most ~260 KiB, which keeps the worst inline case
/// (inflate, then parse) near the cost of the largest inline plain body. Any gzip body big
/// enough to be worth compressing decodes off the async workers.
pub const INLINE_GZIP_MAX: usize = 256;

/// How many bytes of the limit each JSON value of a decoded body may take, at least:
/// [`DecodeLimits::max_json_values`] is `max_bytes / 16`.
///
/// A parsed JSON value takes 32 bytes or more in memory (plus its map node or vector
/// slot), so a body of nothing but tiny values (`[0,0,0,…]`) would grow 16 to 30 times
/// in parsing. One value per 16 bytes of the limit keeps the parsed form within a small
/// multiple of the limit, and no valid body under an eighth of the limit can reach it
/// (valid JSON takes at least two bytes of text per value).
pub const BYTES_PER_JSON_VALUE: usize = 16;

/// The fewest JSON values [`DecodeLimits::max_json_values`] allows, whatever the limit.
///
/// It exists so that a small `max_message_bytes` does not refuse ordinary messages for
/// their shape: 4096 values take well under a MiB once parsed.
pub const MIN_JSON_VALUES: usize = 4096;

/// How much a decode may read, inflate and parse.
///
/// It exists so that every decoder of deliveries applies the operator's
/// `[listener] max_message_bytes` to the raw body, to the gzip output and (through
/// [`DecodeLimits::max_json_values`]) to the parsed JSON, in one value that is cheap to
/// pass around. [`Default`] is [`DEFAULT_MAX_MESSAGE_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest body, in bytes, before and after gzip decoding.
    pub max_bytes: usize,
}

impl DecodeLimits {
    /// Limits with `max_bytes` for the body before and after gzip decoding.
    pub fn new(max_bytes: usize) -> DecodeLimits {
        DecodeLimits { max_bytes }
    }

    /// The most JSON values (objects, arrays, keys and scalars) a body may hold:
    /// `max_bytes / BYTES_PER_JSON_VALUE`, at least [`MIN_JSON_VALUES`].
    pub fn max_json_values(&self) -> usize {
        (self.max_bytes / BYTES_PER_JSON_VALUE).max(MIN_JSON_VALUES)
    }
}

impl Default for DecodeLimits {
    fn default() -> DecodeLimits {
        DecodeLimits::new(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

/// A kapi message: a JSON object body with Kazoo's default headers (Event-Category, Event-Name, App-Name, App-Version, Msg-ID, Node, Server-ID on requests).
///
/// It exists so that handlers work with one validated type: an envelope made by
/// [`Envelope::new`], [`Envelope::from_map`] or [`Envelope::decode`] always has a
/// string Event-Category and Event-Name, and a decoded one always has a Msg-ID.
/// Every other field is free-form JSON and is carried through untouched.
///
/// A decoded envelope keeps its validated JSON text and parses it into a map only when a
/// field outside the headers warren reads itself is first asked for (see `wire.rs`);
/// building or changing an envelope works on the map.
#[derive(Clone)]
pub struct Envelope {
    repr: Repr,
}

/// An envelope's two forms.
#[derive(Clone)]
enum Repr {
    /// Built or changed in memory.
    Fields(Map<String, Value>),
    /// Received and not changed since: the text, its headers, the map once asked for
    /// (boxed, so that an envelope stays as small as a map wherever it is moved).
    Wire(Box<Wire>),
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Envelope) -> bool {
        self.fields() == other.fields()
    }
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Envelope")
            .field("fields", self.fields())
            .finish()
    }
}

/// Who is sending: filled into outgoing envelopes where missing.
///
/// It exists so that an app states its identity once (at start) and the publisher
/// stamps every message with it, as Kazoo's default headers do.
#[derive(Clone, Debug)]
pub struct Stamp {
    /// Goes into App-Name.
    pub app_name: String,
    /// Goes into App-Version.
    pub app_version: String,
    /// Goes into Node.
    pub node: String,
}

impl Envelope {
    /// A new envelope with only Event-Category and Event-Name; the usual start of an outgoing message.
    pub fn new(category: impl Into<String>, name: impl Into<String>) -> Envelope {
        let mut fields = Map::new();
        fields.insert(
            keys::EVENT_CATEGORY.to_owned(),
            Value::String(category.into()),
        );
        fields.insert(keys::EVENT_NAME.to_owned(), Value::String(name.into()));
        Envelope {
            repr: Repr::Fields(fields),
        }
    }

    /// Wraps a JSON object built elsewhere, validating it exactly as [`Envelope::decode`] does.
    ///
    /// Event-Category and Event-Name must be non-empty strings; Msg-ID and Server-ID must
    /// be strings (or null) when present, and a Server-ID (the routing key of the reply)
    /// at most [`MAX_SHORT_STRING_BYTES`] long. A missing, null or empty Msg-ID is generated.
    pub fn from_map(mut fields: Map<String, Value>) -> Result<Envelope, DecodeError> {
        if check_headers(|key| Found::in_map(&fields, key))? {
            fields.insert(keys::MSG_ID.to_owned(), Value::String(new_msg_id()));
        }
        Ok(Envelope {
            repr: Repr::Fields(fields),
        })
    }

    /// The Event-Category responders match on.
    ///
    /// Always a string on a validated envelope; empty only if the caller has since
    /// removed it or overwritten it with a non-string through [`Envelope::set`].
    pub fn category(&self) -> &str {
        self.get_str(keys::EVENT_CATEGORY).unwrap_or("")
    }

    /// The Event-Name responders match on (same caveat as [`Envelope::category`]).
    pub fn name(&self) -> &str {
        self.get_str(keys::EVENT_NAME).unwrap_or("")
    }

    /// The Msg-ID that correlates a request with its replies; `None` when missing or empty.
    pub fn msg_id(&self) -> Option<&str> {
        self.non_empty_str(keys::MSG_ID)
    }

    /// The Server-ID a reply is routed to on `targeted`; `None` when missing or empty (no reply wanted).
    pub fn server_id(&self) -> Option<&str> {
        self.non_empty_str(keys::SERVER_ID)
    }

    /// The sending node, for tracing; `None` when missing or empty.
    pub fn node(&self) -> Option<&str> {
        self.non_empty_str(keys::NODE)
    }

    /// The sending app, for tracing and per-app reply counting; `None` when missing or empty.
    pub fn app_name(&self) -> Option<&str> {
        self.non_empty_str(keys::APP_NAME)
    }

    /// The sending app's version, for tracing; `None` when missing or empty.
    pub fn app_version(&self) -> Option<&str> {
        self.non_empty_str(keys::APP_VERSION)
    }

    /// Whether this reply asks the requester to keep waiting for a better one.
    ///
    /// True for Defer-Response `true` or `"true"`, as Kazoo's `kz_term:is_true` reads it.
    pub fn defer_response(&self) -> bool {
        if let Repr::Wire(wire) = &self.repr {
            return match wire.scalar(Slot::DeferResponse) {
                Scalar::Bool(flag) => *flag,
                _ => wire.text(Slot::DeferResponse) == Some("true"),
            };
        }
        match self.fields().get(keys::DEFER_RESPONSE) {
            Some(Value::Bool(flag)) => *flag,
            Some(Value::String(text)) => text == "true",
            _ => false,
        }
    }

    /// Any field, as JSON; for app-specific headers.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields().get(key)
    }

    /// Any field, when it is a string (empty strings included).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        if let Repr::Wire(wire) = &self.repr
            && let Some(slot) = Slot::of(key)
        {
            return wire.text(slot);
        }
        self.fields().get(key).and_then(Value::as_str)
    }

    /// Sets a field, replacing any previous value; returns `self` for chaining.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.fields_mut().insert(key.into(), value.into());
        self
    }

    /// Sets a field on an owned envelope; for building a message in one expression.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// Removes a field and returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.fields_mut().remove(key)
    }

    /// Copies of the fields `keys` (each `None` when absent), for code that needs a few
    /// fields outside the headers: on a received envelope whose map was not built, they
    /// are read straight from its text (other fields skipped, nothing else allocated), and
    /// the map is not built.
    pub fn extract<const N: usize>(&self, keys: [&str; N]) -> [Option<Value>; N] {
        if let Repr::Wire(wire) = &self.repr
            && let Some(values) = wire.extract(keys)
        {
            return values;
        }
        let fields = self.fields();
        keys.map(|key| fields.get(key).cloned())
    }

    /// All fields, for code that needs the whole body (logging, forwarding, app decoding).
    ///
    /// On a received envelope, the first call parses the body into the map.
    pub fn fields(&self) -> &Map<String, Value> {
        match &self.repr {
            Repr::Fields(fields) => fields,
            Repr::Wire(wire) => wire.fields(),
        }
    }

    /// All fields, by value; for apps that deserialize the body into their own types.
    pub fn into_fields(mut self) -> Map<String, Value> {
        std::mem::take(self.fields_mut())
    }

    /// The map, to change: a received envelope becomes a built one (its text is dropped).
    fn fields_mut(&mut self) -> &mut Map<String, Value> {
        if let Repr::Wire(wire) = &mut self.repr {
            self.repr = Repr::Fields(wire.take_fields());
        }
        match &mut self.repr {
            Repr::Fields(fields) => fields,
            Repr::Wire(_) => unreachable!("a received envelope became a built one just above"),
        }
    }

    /// The Msg-ID, generated first (32 random hex chars) when missing, empty or not a string.
    ///
    /// Exists because a request must carry an id before it is published, or its replies
    /// cannot be matched.
    pub fn ensure_msg_id(&mut self) -> &str {
        if self.msg_id().is_none() {
            self.fields_mut()
                .insert(keys::MSG_ID.to_owned(), Value::String(new_msg_id()));
        }
        self.get_str(keys::MSG_ID).unwrap_or("")
    }

    /// Fills App-Name, App-Version, Node and Msg-ID where missing or empty; never overwrites a value.
    ///
    /// Exists so that the publisher can complete Kazoo's required headers on every
    /// outgoing message while an app stays free to set them itself (a relay that keeps
    /// the original sender, for instance). A Msg-ID that is not a string is the one
    /// exception: it is replaced, since every receiver would reject it.
    pub fn stamp(&mut self, stamp: &Stamp) {
        self.fill(keys::APP_NAME, &stamp.app_name);
        self.fill(keys::APP_VERSION, &stamp.app_version);
        self.fill(keys::NODE, &stamp.node);
        self.ensure_msg_id();
    }

    /// A new envelope that answers this one: it carries this one's Msg-Reply-ID if it
    /// has one, else its Msg-ID, in Msg-ID, which is how Kazoo correlates replies.
    ///
    /// Nothing else is copied; the caller routes the reply to [`Envelope::server_id`].
    pub fn reply(&self, category: impl Into<String>, name: impl Into<String>) -> Envelope {
        let mut reply = Envelope::new(category, name);
        let correlation = self
            .non_empty_str(keys::MSG_REPLY_ID)
            .or_else(|| self.msg_id());
        if let Some(id) = correlation {
            reply
                .fields_mut()
                .insert(keys::MSG_ID.to_owned(), Value::String(id.to_owned()));
        }
        reply
    }

    /// [`Envelope::decode_with`] with the default limits ([`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub fn decode(
        body: &[u8],
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> Result<Envelope, DecodeError> {
        Envelope::decode_with(
            body,
            content_type,
            content_encoding,
            &DecodeLimits::default(),
        )
    }

    /// Decodes a delivery's body, given its AMQP `content_type` and `content_encoding`,
    /// within `limits`.
    ///
    /// In this order: a body above `limits.max_bytes` is [`DecodeError::TooLarge`] before
    /// anything else is looked at (rejected unread); the content type must be absent,
    /// empty or `application/json` (case-insensitive, parameters such as `; charset=utf-8`
    /// ignored) and the content encoding absent, empty, `identity` or `gzip`; a gzip body
    /// is inflated (all members) and is [`DecodeError::TooLarge`] as soon as its output
    /// passes `limits.max_bytes`; the JSON may hold at most
    /// [`DecodeLimits::max_json_values`] values ([`DecodeError::TooManyValues`]) nested
    /// at most 128 deep (serde_json's recursion limit, [`DecodeError::InvalidJson`]);
    /// then it must pass [`Envelope::from_map`]. Every decoded envelope has a Msg-ID.
    ///
    /// Runs on the calling thread: from async code, use [`decode_owned`] unless
    /// [`decode_is_small`] says the body is small.
    pub fn decode_with(
        body: &[u8],
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        limits: &DecodeLimits,
    ) -> Result<Envelope, DecodeError> {
        let gzip = precheck(body.len(), content_type, content_encoding, limits)?;
        if gzip {
            let plain = gunzip(body, limits.max_bytes)?;
            parse(&plain, limits)
        } else {
            parse(body, limits)
        }
    }

    /// The body to publish: compact JSON, to go with `publish_properties(false)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        // Serializing a map with string keys into a Vec has no failure path.
        serde_json::to_writer(&mut body, self.fields()).expect("a JSON object always serializes");
        body
    }

    /// The body to publish gzip-compressed, to go with `publish_properties(true)`; for large messages.
    pub fn encode_gzip(&self) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::with_capacity(128), Compression::default());
        // Writing into a Vec has no failure path, so neither step can fail.
        serde_json::to_writer(&mut encoder, self.fields())
            .expect("a JSON object always serializes");
        encoder.finish().expect("gzip into memory cannot fail")
    }

    /// A field's string value, treating an empty string as absent (Kazoo's "undefined").
    fn non_empty_str(&self, key: &str) -> Option<&str> {
        self.get_str(key).filter(|text| !text.is_empty())
    }

    /// Sets `key` to `value` unless it already holds something other than null or "".
    fn fill(&mut self, key: &str, value: &str) {
        let missing = match self.get(key) {
            None | Some(Value::Null) => true,
            Some(Value::String(text)) => text.is_empty(),
            Some(_) => false,
        };
        if missing && !value.is_empty() {
            self.fields_mut()
                .insert(key.to_owned(), Value::String(value.to_owned()));
        }
    }
}

/// A fresh Msg-ID: 32 random lowercase hex chars, as Kazoo generates.
///
/// Exists for callers that need an id before they have an envelope (a call that
/// registers its expected reply id first, for instance).
pub fn new_msg_id() -> String {
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

/// Whether decoding a body of `body_len` bytes with this content encoding is cheap enough
/// to run on an async worker thread: plain bodies up to [`INLINE_PLAIN_MAX`], gzip bodies
/// up to [`INLINE_GZIP_MAX`] (an unknown encoding counts as plain: it fails at once).
///
/// It exists so that a consumer loop can keep its inline fast path
/// ([`Envelope::decode_with`] on the borrowed body) and build [`decode_owned`]'s future
/// only for the rare large body.
pub fn decode_is_small(body_len: usize, content_encoding: Option<&str>) -> bool {
    let gzip = content_encoding.is_some_and(|encoding| is_gzip(Some(encoding)).unwrap_or(false));
    if gzip {
        body_len <= INLINE_GZIP_MAX
    } else {
        body_len <= INLINE_PLAIN_MAX
    }
}

/// [`Envelope::decode_with`] for async callers, keeping the async worker threads free:
/// a small body (see [`decode_is_small`]) and any body refused on its size or headers
/// alone are decoded on the calling thread; any other on tokio's blocking pool.
///
/// The body is given back with the result, whatever the result (the caller may need it
/// to park the message). Should the blocking task not finish (a panic, or the runtime
/// shutting down), the result is [`DecodeError::Aborted`]. Needs a tokio runtime.
pub async fn decode_owned(
    body: Vec<u8>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    limits: DecodeLimits,
) -> (Vec<u8>, Result<Envelope, DecodeError>) {
    let content_type_ref = content_type.as_deref();
    let content_encoding_ref = content_encoding.as_deref();
    if let Err(error) = precheck(body.len(), content_type_ref, content_encoding_ref, &limits) {
        return (body, Err(error));
    }
    if decode_is_small(body.len(), content_encoding_ref) {
        let result = Envelope::decode_with(&body, content_type_ref, content_encoding_ref, &limits);
        return (body, result);
    }
    // Shared, so that the body survives whatever happens to the blocking task.
    let shared = Arc::new(body);
    let worker = Arc::clone(&shared);
    let joined = tokio::task::spawn_blocking(move || {
        Envelope::decode_with(
            &worker,
            content_type.as_deref(),
            content_encoding.as_deref(),
            &limits,
        )
    })
    .await;
    let body = Arc::try_unwrap(shared).unwrap_or_else(|still_shared| still_shared.to_vec());
    let result = joined.unwrap_or_else(|error| {
        Err(DecodeError::Aborted {
            reason: if error.is_panic() {
                "the decoding task panicked"
            } else {
                "the decoding task was cancelled"
            },
        })
    });
    (body, result)
}

/// AMQP properties for publishing an envelope: content_type application/json, timestamp (seconds since the epoch), content_encoding "gzip" when `gzip`.
///
/// Exists so that every publisher labels envelopes the way [`Envelope::decode`] (and
/// Kazoo) expects to read them. The timestamp is in seconds, as AMQP defines it (Kazoo
/// writes microseconds there; nothing reads the field for correlation).
pub fn publish_properties(gzip: bool) -> BasicProperties {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0);
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_timestamp(now);
    if gzip {
        properties.with_content_encoding(ShortString::from(GZIP_ENCODING))
    } else {
        properties
    }
}

/// Why a delivery's body is not a kapi envelope.
///
/// It exists so that a listener can reject (dead-letter) an undecodable message with a
/// reason in the log instead of retrying it forever.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The AMQP content type is neither absent nor `application/json`.
    #[error("unsupported content type {0:?} (warren accepts only {CONTENT_TYPE})")]
    UnsupportedContentType(String),
    /// The AMQP content encoding is not absent, empty, `identity` or `gzip`.
    #[error("unsupported content encoding {0:?} (warren accepts identity and gzip)")]
    UnsupportedContentEncoding(String),
    /// The body claims gzip but does not decompress.
    #[error("gzip body does not decompress: {0}")]
    Gzip(#[source] std::io::Error),
    /// The body, or its gzip output (probably a zip bomb), is larger than the limit.
    #[error("body larger than {limit} bytes (max_message_bytes), before or after gzip decoding")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The JSON holds more values than [`DecodeLimits::max_json_values`] allows.
    #[error("body holds more than {limit} JSON values")]
    TooManyValues {
        /// The limit that was exceeded, in values.
        limit: usize,
    },
    /// The body is not valid JSON.
    #[error("invalid JSON: {source}")]
    InvalidJson {
        /// Line of the error, 1-based.
        line: usize,
        /// Column of the error, 1-based.
        column: usize,
        /// serde_json's description.
        #[source]
        source: serde_json::Error,
    },
    /// The body is valid JSON but not an object.
    #[error("body is a JSON {found}, not an object")]
    NotAnObject {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// A required field (Event-Category, Event-Name) is missing, null or empty.
    #[error("required field {0} is missing or empty")]
    MissingField(&'static str),
    /// A field that must be a string holds something else.
    #[error("field {field} must be a string, found a JSON {found}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// The JSON type found instead.
        found: &'static str,
    },
    /// A field holds a value warren cannot use, e.g. a Server-ID longer than a routing
    /// key may be. The reason never quotes the value (it is outside data).
    #[error("field {field} is invalid: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong, e.g. its length and the limit.
        reason: String,
    },
    /// Decoding on the blocking pool did not finish ([`decode_owned`] only).
    #[error("decoding did not finish: {reason}")]
    Aborted {
        /// Why: the task panicked or was cancelled.
        reason: &'static str,
    },
}

impl DecodeError {
    /// Keeps serde_json's line and column next to its error, for log lines.
    fn json(source: serde_json::Error) -> DecodeError {
        DecodeError::InvalidJson {
            line: source.line(),
            column: source.column(),
            source,
        }
    }
}

/// The checks that need no look at the body: its size, then its content type and
/// encoding. Whether it must be gunzipped.
fn precheck(
    body_len: usize,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    limits: &DecodeLimits,
) -> Result<bool, DecodeError> {
    if body_len > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    check_content_type(content_type)?;
    is_gzip(content_encoding)
}

/// Accepts an absent or empty content type, or `application/json` with any parameters.
fn check_content_type(content_type: Option<&str>) -> Result<(), DecodeError> {
    let Some(full) = content_type else {
        return Ok(());
    };
    let essence = full.split(';').next().unwrap_or("").trim();
    if full.trim().is_empty() || essence.eq_ignore_ascii_case(CONTENT_TYPE) {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedContentType(full.to_owned()))
    }
}

/// Whether the body must be gunzipped; an unknown encoding is an error.
fn is_gzip(content_encoding: Option<&str>) -> Result<bool, DecodeError> {
    let Some(encoding) = content_encoding else {
        return Ok(false);
    };
    let token = encoding.trim();
    if token.is_empty() || token.eq_ignore_ascii_case("identity") {
        Ok(false)
    } else if token.eq_ignore_ascii_case(GZIP_ENCODING) {
        Ok(true)
    } else {
        Err(DecodeError::UnsupportedContentEncoding(encoding.to_owned()))
    }
}

/// Decompresses a gzip body (all members), failing as soon as its output passes `limit`
/// bytes. The buffer never grows beyond `limit + 1` bytes.
fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    // Room for one byte past the limit tells "exactly at the limit" from "beyond it".
    let room = limit.saturating_add(1);
    let mut decoder = MultiGzDecoder::new(body);
    let mut plain = vec![0u8; body.len().saturating_mul(4).max(1024).min(room)];
    let mut filled = 0;
    loop {
        if filled == plain.len() {
            if filled >= room {
                return Err(DecodeError::TooLarge { limit });
            }
            let grown = filled.saturating_mul(2).min(room);
            plain.reserve_exact(grown - filled);
            plain.resize(grown, 0);
        }
        match decoder.read(&mut plain[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(DecodeError::Gzip(error)),
        }
    }
    if filled > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    plain.truncate(filled);
    Ok(plain)
}

/// An upper bound of the JSON values (keys included) in `json`, counted up to `stop`:
/// one, plus one per `[`, `{`, `:` and `,` outside strings.
///
/// Only called when the body is long enough to hold `stop` values at all, so the hot path
/// (small bodies) never pays for it.
fn json_values_over(json: &[u8], stop: usize) -> bool {
    let mut values = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' | b':' | b',' => {
                    values += 1;
                    if values > stop {
                        return true;
                    }
                }
                _ => {}
            }
        }
    }
    false
}

/// Scans the JSON once (checked as a full parse would check it, headers recorded, no
/// map built), then validates the headers.
fn parse(json: &[u8], limits: &DecodeLimits) -> Result<Envelope, DecodeError> {
    // A body of n bytes holds at most n + 1 values: count only when it could be too many.
    let max_values = limits.max_json_values();
    if json.len() >= max_values && json_values_over(json, max_values) {
        return Err(DecodeError::TooManyValues { limit: max_values });
    }
    let first = json.iter().find(|byte| !byte.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Cold path: tell "valid JSON of the wrong shape" from "not JSON at all".
        return Err(match serde_json::from_slice::<Value>(json) {
            Ok(value) => DecodeError::NotAnObject {
                found: json_type(&value),
            },
            Err(error) => DecodeError::json(error),
        });
    }
    let Ok(text) = std::str::from_utf8(json) else {
        return Err(not_utf8(json));
    };
    let mut wire = Wire::scan(Arc::from(text)).map_err(DecodeError::json)?;
    if check_headers(|key| Found::in_wire(&wire, key))? {
        wire.generate_msg_id(new_msg_id());
    }
    Ok(Envelope {
        repr: Repr::Wire(Box::new(wire)),
    })
}

/// The error for a body that is not UTF-8: serde_json's, with the line and column of
/// the bad byte (cold path: the parse into values is only for the error).
fn not_utf8(json: &[u8]) -> DecodeError {
    match serde_json::from_slice::<Value>(json) {
        Err(error) => DecodeError::json(error),
        // A JSON text that is not UTF-8 does not parse; kept total all the same.
        Ok(_) => DecodeError::json(<serde_json::Error as serde::de::Error>::custom(
            "the body is not UTF-8",
        )),
    }
}

/// A header's value, as the checks of an envelope see it: in a map, or recorded by the
/// scan of a received body.
enum Found<'a> {
    /// Absent or null.
    Nothing,
    /// A string.
    Text(&'a str),
    /// Any other JSON type, by name.
    Other(&'static str),
}

impl<'a> Found<'a> {
    fn in_map(fields: &'a Map<String, Value>, key: &str) -> Found<'a> {
        match fields.get(key) {
            None | Some(Value::Null) => Found::Nothing,
            Some(Value::String(text)) => Found::Text(text),
            Some(other) => Found::Other(json_type(other)),
        }
    }

    fn in_wire(wire: &'a Wire, key: &str) -> Found<'a> {
        let Some(slot) = Slot::of(key) else {
            return Found::Nothing;
        };
        match wire.scalar(slot) {
            Scalar::Absent | Scalar::Null => Found::Nothing,
            Scalar::Text(_) => wire.text(slot).map_or(Found::Nothing, Found::Text),
            Scalar::Bool(_) => Found::Other("boolean"),
            Scalar::Other(found) => Found::Other(found),
        }
    }
}

/// The checks every envelope passes, in this order: Event-Category and Event-Name are
/// non-empty strings; Server-ID, when present, a string that fits a routing key; Msg-ID,
/// when present, a string. Says whether a Msg-ID must be generated (missing or empty).
fn check_headers<'a>(found: impl Fn(&'static str) -> Found<'a>) -> Result<bool, DecodeError> {
    required_str(keys::EVENT_CATEGORY, found(keys::EVENT_CATEGORY))?;
    required_str(keys::EVENT_NAME, found(keys::EVENT_NAME))?;
    if let Some(text) = optional_str(keys::SERVER_ID, found(keys::SERVER_ID))?
        && text.len() > MAX_SHORT_STRING_BYTES
    {
        return Err(DecodeError::InvalidField {
            field: keys::SERVER_ID,
            reason: format!(
                "{} bytes long; a routing key holds at most {MAX_SHORT_STRING_BYTES}",
                text.len()
            ),
        });
    }
    Ok(optional_str(keys::MSG_ID, found(keys::MSG_ID))?.is_none_or(str::is_empty))
}

/// Checks that `key` holds a non-empty string.
fn required_str(key: &'static str, found: Found<'_>) -> Result<(), DecodeError> {
    match optional_str(key, found)? {
        Some(text) if !text.is_empty() => Ok(()),
        _ => Err(DecodeError::MissingField(key)),
    }
}

/// `key`'s string value; absent and null are `None`, any other type is an error.
fn optional_str<'a>(key: &'static str, found: Found<'a>) -> Result<Option<&'a str>, DecodeError> {
    match found {
        Found::Nothing => Ok(None),
        Found::Text(text) => Ok(Some(text)),
        Found::Other(found) => Err(DecodeError::WrongType { field: key, found }),
    }
}

/// The JSON type of a value, for error messages.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests;

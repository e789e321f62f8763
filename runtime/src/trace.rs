//! W3C Trace Context (`traceparent`) for messages: parsed from a delivery's AMQP headers,
//! written into the headers of every publish, and carried through a handler's work in a
//! tokio task-local, so that a request keeps one trace id across services.
//!
//! Owns: the `traceparent` value (parse, format, new ids), the task-local "trace of the
//! work in progress", and putting the header into AMQP properties. Must not touch:
//! channels, brokers, logging setup (the listener makes the handler's span; the binary
//! chooses the log format).
//!
//! Parsing follows the W3C Trace Context spec (level 1, section 3.2 and 4.3): version
//! `00` is exactly 55 characters; a higher version (not `ff`) is read by its first 55
//! characters when the next one, if any, is `-`; hex is lowercase; an all-zero trace id or
//! parent id is invalid. Anything invalid is treated as absent: a new trace starts, the
//! message is never failed over it. Outgoing headers are always version `00`.
//!
//! A context remembers whether this node started it ([`TraceContext::started_here`]): the
//! publisher writes such a trace only when `[publisher] new_traces` is on (the default),
//! so a node can continue its callers' traces without starting any of its own.

use std::fmt;
use std::future::Future;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rand::Rng;
use tokio::task::futures::TaskLocalFuture;

/// The AMQP header (and W3C field) name.
pub const HEADER: &str = "traceparent";

/// The `sampled` trace flag: set on traces warren starts (it logs every message).
pub const SAMPLED: u8 = 0x01;

/// The length of a version-00 `traceparent` value.
const LEN: usize = 55;

/// Where a message belongs in a distributed trace: its trace id, the id of the span that
/// sent it (the parent of whatever handles it) and the trace flags.
///
/// It exists so that logs of every service a request passes through can be joined by one
/// trace id. It is `Copy` and holds the ids as bytes: reading it from a delivery
/// allocates nothing, and the hex is formatted only where it is written or logged.
/// Two contexts are equal when their `traceparent` values are: where one came from is
/// not part of it.
#[derive(Clone, Copy)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    /// This node started the trace (no message brought it); its children keep this.
    started_here: bool,
}

impl PartialEq for TraceContext {
    fn eq(&self, other: &Self) -> bool {
        (self.trace_id, self.span_id, self.flags) == (other.trace_id, other.span_id, other.flags)
    }
}

impl Eq for TraceContext {}

impl std::hash::Hash for TraceContext {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.trace_id, self.span_id, self.flags).hash(state);
    }
}

/// A trace id, displayed as 32 lowercase hex digits.
///
/// It exists so that a log field can carry the id without a `String` per message: it is
/// formatted only when a subscriber records it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span (parent) id, displayed as 16 lowercase hex digits; see [`TraceId`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceContext {
    /// A new trace started by this node: random trace and span ids (never all zero),
    /// sampled. The publisher writes it, and its children, only while `[publisher]
    /// new_traces` is on; see [`TraceContext::started_here`].
    pub fn new_root() -> TraceContext {
        let mut rng = rand::rng();
        TraceContext {
            trace_id: nonzero(|| rng.random::<u128>()).to_be_bytes(),
            span_id: nonzero(|| rng.random::<u64>()).to_be_bytes(),
            flags: SAMPLED,
            started_here: true,
        }
    }

    /// A new span of the same trace: same trace id and flags, a new random span id.
    pub fn child(&self) -> TraceContext {
        let mut rng = rand::rng();
        TraceContext {
            span_id: nonzero(|| rng.random::<u64>()).to_be_bytes(),
            ..*self
        }
    }

    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }

    /// The span that sent the message (W3C `parent-id`).
    pub fn span_id(&self) -> SpanId {
        SpanId(self.span_id)
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// This node started the trace ([`TraceContext::new_root`], or a child of one), rather
    /// than reading it from a message.
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// Parses a `traceparent` value; `None` when it is not valid (see the module docs).
    /// Flags other than `sampled` are dropped: version 00 defines no others, and warren
    /// writes version 00.
    pub fn parse(value: &[u8]) -> Option<TraceContext> {
        if value.len() < LEN {
            return None;
        }
        let version = hex_byte(value[0], value[1])?;
        match version {
            0xff => return None,
            0x00 if value.len() != LEN => return None,
            // A later version may append fields, after a dash.
            _ if value.len() > LEN && value[LEN] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex_into(&value[3..35], &mut trace_id)?;
        let mut span_id = [0u8; 8];
        hex_into(&value[36..52], &mut span_id)?;
        let flags = hex_byte(value[53], value[54])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags: flags & SAMPLED,
            started_here: false,
        })
    }

    /// The context a message's headers carry (`traceparent` as a long or short string),
    /// if valid.
    pub fn from_headers(headers: Option<&FieldTable>) -> Option<TraceContext> {
        match headers?.inner().get(HEADER)? {
            AMQPValue::LongString(value) => TraceContext::parse(value.as_bytes()),
            AMQPValue::ShortString(value) => TraceContext::parse(value.as_str().as_bytes()),
            _ => None,
        }
    }

    /// The context of a delivery with these properties, if it carries a valid one.
    pub fn from_properties(properties: &BasicProperties) -> Option<TraceContext> {
        TraceContext::from_headers(properties.headers().as_ref())
    }

    /// The context of a delivery with these properties, or a new trace.
    pub fn of_delivery(properties: &BasicProperties) -> TraceContext {
        TraceContext::from_properties(properties).unwrap_or_else(TraceContext::new_root)
    }

    /// Runs `future` as work of this trace (see [`scope`]): e.g. work a handler spawns as
    /// a task of its own, `tokio::spawn(event.trace().scope(work))`.
    pub fn scope<F: Future>(self, future: F) -> TaskLocalFuture<TraceContext, F> {
        scope(self, future)
    }

    /// `properties` with `traceparent` set to this context; other headers are kept.
    pub fn inject(&self, properties: BasicProperties) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(HEADER),
            AMQPValue::LongString(LongString::from(self.to_string())),
        );
        properties.with_headers(headers)
    }

    /// `properties` with `traceparent` set to this context unless they carry one already
    /// (e.g. a message moved as it is keeps its own).
    pub fn inject_if_absent(&self, properties: BasicProperties) -> BasicProperties {
        let present = properties
            .headers()
            .as_ref()
            .is_some_and(|headers| headers.contains_key(HEADER));
        if present {
            properties
        } else {
            self.inject(properties)
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

tokio::task_local! {
    /// The trace of the handler whose work is running in this task.
    static CURRENT: TraceContext;
}

/// The trace of the work in progress in this task (a handler's event), if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|trace| *trace).ok()
}

/// Runs `future` as work of `trace`: publishes made inside it, with no context of their
/// own, belong to that trace. Work spawned as another task does not inherit it.
pub fn scope<F: Future>(trace: TraceContext, future: F) -> TaskLocalFuture<TraceContext, F> {
    CURRENT.scope(trace, future)
}

/// The context an outgoing message carries: a child of `parent` if given, else of the
/// work in progress ([`current`]); `None` for a message that belongs to no trace (a
/// publish outside any handler: RabbitMQ decodes every message's headers table when it
/// has one, which cost a quarter of the publish throughput in `cargo bench --bench
/// publish`, so such a message carries none). Calls start a trace of their own (see
/// [`for_call`]).
pub fn outgoing(parent: Option<TraceContext>) -> Option<TraceContext> {
    parent.or_else(current).map(|parent| parent.child())
}

/// The trace a call or cast belongs to: the work in progress, else a new trace, so that
/// a request and its replies can always be followed (written while `[publisher]
/// new_traces` is on, like every trace this node starts).
pub fn for_call() -> TraceContext {
    current().unwrap_or_else(TraceContext::new_root)
}

/// A random value that is not zero (all-zero ids are invalid).
fn nonzero<T: Default + PartialEq>(mut random: impl FnMut() -> T) -> T {
    loop {
        let value = random();
        if value != T::default() {
            return value;
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = [0u8; 32];
    for (i, byte) in bytes.iter().take(16).enumerate() {
        buffer[2 * i] = DIGITS[usize::from(byte >> 4)];
        buffer[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    let hex = &buffer[..2 * bytes.len().min(16)];
    // Only ASCII digits were written.
    f.write_str(std::str::from_utf8(hex).map_err(|_| fmt::Error)?)
}

/// One lowercase hex digit's value.
fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(high: u8, low: u8) -> Option<u8> {
    Some((hex_digit(high)? << 4) | hex_digit(low)?)
}

/// Fills `out` from lowercase hex (`hex` is twice as long as `out`).
fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = hex_byte(pair[0], pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parse(value: &str) -> Option<TraceContext> {
        TraceContext::parse(value.as_bytes())
    }

    #[test]
    fn a_valid_value_round_trips() {
        let trace = parse(VALID).expect("valid");
        assert_eq!(
            trace.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(trace.span_id().to_string(), "00f067aa0ba902b7");
        assert!(trace.sampled());
        assert_eq!(trace.to_string(), VALID);
        let unsampled = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("valid, not sampled");
        assert!(!unsampled.sampled());
    }

    #[test]
    fn malformed_values_are_absent() {
        for bad in [
            "",
            "00",
            // Too short / too long for version 00.
            &VALID[..54],
            &format!("{VALID}-extra"),
            &format!("{VALID} "),
            // Separators.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            // Not hex.
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Uppercase hex anywhere.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn all_zero_ids_are_invalid() {
        assert_eq!(
            parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
    }

    #[test]
    fn future_versions_are_read_by_their_first_fields() {
        // Version ff is forbidden.
        assert_eq!(
            parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
        let exact = parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("a later version of 55 characters");
        let longer = parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever")
            .expect("a later version may add fields after a dash");
        assert_eq!(exact, longer);
        assert_eq!(exact.to_string(), VALID, "written back as version 00");
        assert_eq!(
            parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what"),
            None,
            "more fields must follow a dash"
        );
        // Unknown flags are dropped when written as version 00.
        let flags = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").expect("ok");
        assert_eq!(flags.flags(), SAMPLED);
    }

    #[test]
    fn new_traces_and_children_are_valid_and_distinct() {
        let root = TraceContext::new_root();
        assert_eq!(parse(&root.to_string()), Some(root));
        assert!(root.sampled());
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_eq!(child.flags(), root.flags());
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
    }

    #[test]
    fn a_trace_knows_whether_this_node_started_it() {
        let root = TraceContext::new_root();
        assert!(root.started_here());
        assert!(
            root.child().started_here(),
            "a child keeps where its trace began"
        );
        let received = parse(&root.to_string()).expect("valid");
        assert!(
            !received.started_here(),
            "a trace read from a message is the caller's"
        );
        assert!(!received.child().started_here());
        assert_eq!(received, root, "equal as traceparent values");
    }

    #[test]
    fn headers_are_read_as_long_or_short_strings_and_written_keeping_the_others() {
        let trace = parse(VALID).expect("valid");
        let mut table = FieldTable::default();
        table.insert("x-other".into(), AMQPValue::LongInt(7));
        let properties = trace.inject(BasicProperties::default().with_headers(table));
        let headers = properties.headers().as_ref().expect("headers");
        assert_eq!(headers.inner().get("x-other"), Some(&AMQPValue::LongInt(7)));
        assert_eq!(TraceContext::from_properties(&properties), Some(trace));

        let mut short = FieldTable::default();
        short.insert(HEADER.into(), AMQPValue::ShortString(VALID.into()));
        assert_eq!(TraceContext::from_headers(Some(&short)), Some(trace));

        let mut wrong = FieldTable::default();
        wrong.insert(HEADER.into(), AMQPValue::LongInt(1));
        assert_eq!(TraceContext::from_headers(Some(&wrong)), None);
        assert_eq!(TraceContext::from_headers(None), None);

        let other = TraceContext::new_root();
        let kept = other.inject_if_absent(properties.clone());
        assert_eq!(TraceContext::from_properties(&kept), Some(trace));
        let added = other.inject_if_absent(BasicProperties::default());
        assert_eq!(TraceContext::from_properties(&added), Some(other));
    }

    #[tokio::test]
    async fn outgoing_messages_follow_the_work_in_progress() {
        let trace = parse(VALID).expect("valid");
        assert_eq!(current(), None);
        assert_eq!(outgoing(None), None, "outside any trace: no header");
        assert_ne!(
            for_call().trace_id(),
            trace.trace_id(),
            "a call starts a new trace"
        );
        let inside = scope(trace, async { (current(), outgoing(None), for_call()) }).await;
        assert_eq!(inside.0, Some(trace));
        let child = inside.1.expect("a child of the work in progress");
        assert_eq!(child.trace_id(), trace.trace_id());
        assert_ne!(child.span_id(), trace.span_id());
        assert_eq!(
            inside.2, trace,
            "a call inside a handler belongs to its trace"
        );
        let explicit = TraceContext::new_root();
        let chosen = scope(trace, async { outgoing(Some(explicit)) }).await;
        assert_eq!(chosen.map(|c| c.trace_id()), Some(explicit.trace_id()));
    }
}

//! Unit tests of the kapi envelope.

use std::collections::HashSet;
use std::io::Write;
use std::time::Instant;

use serde_json::json;

use super::*;

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("test fixture is not an object: {other}"),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip in memory");
    encoder.finish().expect("gzip in memory")
}

fn stamp() -> Stamp {
    Stamp {
        app_name: "skel".into(),
        app_version: "1.2.3".into(),
        node: "warren@host".into(),
    }
}

fn is_msg_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[test]
fn encode_decode_round_trip() {
    let mut sent = Envelope::new("directory", "authn_req")
        .with(keys::SERVER_ID, "targeted_queue")
        .with("Nested", json!({"a": [1, 2.5, null, true], "b": "ü"}));
    sent.stamp(&stamp());
    let body = sent.encode();
    assert!(!body.contains(&b'\n'), "compact JSON");
    let received = Envelope::decode(&body, Some(CONTENT_TYPE), None).expect("decodes");
    assert_eq!(received, sent);
    assert_eq!(received.category(), "directory");
    assert_eq!(received.name(), "authn_req");
    assert_eq!(received.server_id(), Some("targeted_queue"));
    assert_eq!(received.app_name(), Some("skel"));
    assert_eq!(received.app_version(), Some("1.2.3"));
    assert_eq!(received.node(), Some("warren@host"));
    assert_eq!(received.msg_id(), sent.msg_id());
}

#[test]
fn gzip_round_trip() {
    let sent = Envelope::new("c", "n")
        .with(keys::MSG_ID, "abc")
        .with("Big", "x".repeat(10_000));
    let body = sent.encode_gzip();
    assert!(body.len() < 1_000, "compressed: {} bytes", body.len());
    for encoding in ["gzip", "GZIP", " gzip "] {
        let received = Envelope::decode(&body, None, Some(encoding)).expect("gunzips");
        assert_eq!(received, sent);
    }
}

#[test]
fn gzip_concatenated_members_are_read_whole() {
    let json = br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":"m"}"#;
    let (head, tail) = json.split_at(20);
    let mut body = gzip(head);
    body.extend(gzip(tail));
    let received = Envelope::decode(&body, None, Some("gzip")).expect("gunzips");
    assert_eq!(received.msg_id(), Some("m"));
}

#[test]
fn decompression_is_capped() {
    let mut json = br#"{"Event-Category":"c","Event-Name":"n","Pad":""#.to_vec();
    json.extend(std::iter::repeat_n(b' ', 4096));
    json.extend(br#""}"#);
    let body = gzip(&json);
    assert!(body.len() < 200);

    let at_limit = decode_limited(&body, None, Some("gzip"), json.len());
    assert!(at_limit.is_ok(), "{at_limit:?}");
    let over = decode_limited(&body, None, Some("gzip"), json.len() - 1);
    assert!(
        matches!(over, Err(DecodeError::TooLarge { limit }) if limit == json.len() - 1),
        "{over:?}"
    );
}

#[test]
fn zip_bomb_over_the_real_limit_is_an_error() {
    // A body a few hundred KiB that would inflate past 64 MiB.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder
        .write_all(br#"{"Event-Category":"c","Event-Name":"n","Pad":""#)
        .expect("gzip in memory");
    let zeros = vec![b'0'; 1024 * 1024];
    for _ in 0..=MAX_DECOMPRESSED_SIZE / zeros.len() {
        encoder.write_all(&zeros).expect("gzip in memory");
    }
    let body = encoder.finish().expect("gzip in memory");
    assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
    let result = Envelope::decode(&body, Some(CONTENT_TYPE), Some("gzip"));
    assert!(
        matches!(
            result,
            Err(DecodeError::TooLarge {
                limit: MAX_DECOMPRESSED_SIZE
            })
        ),
        "{result:?}"
    );
}

#[test]
fn content_type_variants() {
    let body = br#"{"Event-Category":"c","Event-Name":"n"}"#;
    for accepted in [
        None,
        Some(""),
        Some("application/json"),
        Some("Application/JSON"),
        Some("application/json; charset=utf-8"),
        Some(" application/json ;charset=UTF-8"),
    ] {
        let result = Envelope::decode(body, accepted, None);
        assert!(result.is_ok(), "{accepted:?}: {result:?}");
    }
    for rejected in [
        "application/erlang",
        "text/plain",
        "application/jsonx",
        "application/octet-stream",
    ] {
        let result = Envelope::decode(body, Some(rejected), None);
        assert!(
            matches!(&result, Err(DecodeError::UnsupportedContentType(t)) if t == rejected),
            "{rejected}: {result:?}"
        );
    }
}

#[test]
fn content_encoding_variants() {
    let body = br#"{"Event-Category":"c","Event-Name":"n"}"#;
    for accepted in [None, Some(""), Some("identity"), Some("IDENTITY")] {
        let result = Envelope::decode(body, None, accepted);
        assert!(result.is_ok(), "{accepted:?}: {result:?}");
    }
    for rejected in ["deflate", "br", "gzip, deflate"] {
        let result = Envelope::decode(body, None, Some(rejected));
        assert!(
            matches!(&result, Err(DecodeError::UnsupportedContentEncoding(e)) if e == rejected),
            "{rejected}: {result:?}"
        );
    }
}

#[test]
fn gzip_error() {
    let result = Envelope::decode(b"{\"not\":\"gzip\"}", None, Some("gzip"));
    assert!(matches!(result, Err(DecodeError::Gzip(_))), "{result:?}");
    let mut truncated = Envelope::new("c", "n").encode_gzip();
    truncated.truncate(truncated.len() - 6);
    let result = Envelope::decode(&truncated, None, Some("gzip"));
    assert!(matches!(result, Err(DecodeError::Gzip(_))), "{result:?}");
}

#[test]
fn invalid_json_reports_line_and_column() {
    let result = Envelope::decode(b"{\n  \"Event-Category\": \"c\",\n  oops\n}", None, None);
    match result {
        Err(error @ DecodeError::InvalidJson { line, column, .. }) => {
            assert_eq!((line, column), (3, 3));
            assert!(error.to_string().contains("line 3 column 3"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    for garbage in [&b""[..], b"   ", b"nope", b"{", b"{}x", b"\xff"] {
        let result = Envelope::decode(garbage, None, None);
        assert!(
            matches!(result, Err(DecodeError::InvalidJson { .. })),
            "{garbage:?}: {result:?}"
        );
    }
}

#[test]
fn not_an_object() {
    for (body, found) in [
        (&b"[1,2]"[..], "array"),
        (b" \"text\"", "string"),
        (b"42", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
    ] {
        let result = Envelope::decode(body, None, None);
        assert!(
            matches!(result, Err(DecodeError::NotAnObject { found: f }) if f == found),
            "{body:?}: {result:?}"
        );
    }
}

#[test]
fn missing_required_fields() {
    for (body, field) in [
        (&br#"{"Event-Name":"n"}"#[..], keys::EVENT_CATEGORY),
        (br#"{"Event-Category":"c"}"#, keys::EVENT_NAME),
        (
            br#"{"Event-Category":"","Event-Name":"n"}"#,
            keys::EVENT_CATEGORY,
        ),
        (
            br#"{"Event-Category":"c","Event-Name":null}"#,
            keys::EVENT_NAME,
        ),
        (b"{}", keys::EVENT_CATEGORY),
    ] {
        let result = Envelope::decode(body, None, None);
        assert!(
            matches!(result, Err(DecodeError::MissingField(f)) if f == field),
            "{result:?}"
        );
    }
}

#[test]
fn fields_of_the_wrong_type() {
    for (body, field, found) in [
        (
            &br#"{"Event-Category":1,"Event-Name":"n"}"#[..],
            keys::EVENT_CATEGORY,
            "number",
        ),
        (
            br#"{"Event-Category":"c","Event-Name":["n"]}"#,
            keys::EVENT_NAME,
            "array",
        ),
        (
            br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":7}"#,
            keys::MSG_ID,
            "number",
        ),
        (
            br#"{"Event-Category":"c","Event-Name":"n","Server-ID":{}}"#,
            keys::SERVER_ID,
            "object",
        ),
    ] {
        let result = Envelope::decode(body, None, None);
        assert!(
            matches!(result, Err(DecodeError::WrongType { field: f, found: t }) if f == field && t == found),
            "{result:?}"
        );
    }
}

#[test]
fn from_map_validates_like_decode() {
    let ok = Envelope::from_map(object(json!({"Event-Category": "c", "Event-Name": "n"})))
        .expect("valid");
    assert!(ok.msg_id().is_some_and(is_msg_id));
    let missing = Envelope::from_map(object(json!({"Event-Category": "c"})));
    assert!(matches!(
        missing,
        Err(DecodeError::MissingField(keys::EVENT_NAME))
    ));
    let wrong = Envelope::from_map(object(
        json!({"Event-Category": "c", "Event-Name": "n", "Server-ID": 1}),
    ));
    assert!(matches!(
        wrong,
        Err(DecodeError::WrongType {
            field: keys::SERVER_ID,
            ..
        })
    ));
}

#[test]
fn decode_keeps_given_msg_id_and_generates_missing_ones() {
    let kept = Envelope::decode(
        br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":"given"}"#,
        None,
        None,
    )
    .expect("valid");
    assert_eq!(kept.msg_id(), Some("given"));
    for body in [
        &br#"{"Event-Category":"c","Event-Name":"n"}"#[..],
        br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":""}"#,
        br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":null}"#,
    ] {
        let envelope = Envelope::decode(body, None, None).expect("valid");
        assert!(envelope.msg_id().is_some_and(is_msg_id), "{envelope:?}");
    }
}

#[test]
fn optional_inputs_may_be_absent_or_null() {
    let envelope = Envelope::decode(
        br#"{"Event-Category":"c","Event-Name":"n","Server-ID":null,"Node":""}"#,
        None,
        None,
    )
    .expect("valid");
    assert_eq!(envelope.server_id(), None);
    assert_eq!(envelope.node(), None);
    assert_eq!(envelope.app_name(), None);
    assert_eq!(envelope.app_version(), None);
}

#[test]
fn msg_ids_are_32_lowercase_hex_and_unique() {
    let ids: HashSet<String> = (0..10_000).map(|_| new_msg_id()).collect();
    assert_eq!(ids.len(), 10_000);
    assert!(ids.iter().all(|id| is_msg_id(id)));

    let mut envelope = Envelope::new("c", "n");
    assert_eq!(envelope.msg_id(), None);
    let generated = envelope.ensure_msg_id().to_owned();
    assert!(is_msg_id(&generated));
    assert_eq!(envelope.ensure_msg_id(), generated, "stable once set");
    envelope.set(keys::MSG_ID, "");
    assert!(is_msg_id(envelope.ensure_msg_id()));
    envelope.set(keys::MSG_ID, 5);
    assert!(is_msg_id(envelope.ensure_msg_id()));
    envelope.set(keys::MSG_ID, "mine");
    assert_eq!(envelope.ensure_msg_id(), "mine");
}

#[test]
fn stamp_fills_missing_and_empty_but_never_overwrites() {
    let mut fresh = Envelope::new("c", "n");
    fresh.stamp(&stamp());
    assert_eq!(fresh.app_name(), Some("skel"));
    assert_eq!(fresh.app_version(), Some("1.2.3"));
    assert_eq!(fresh.node(), Some("warren@host"));
    assert!(fresh.msg_id().is_some_and(is_msg_id));

    let mut relayed = Envelope::new("c", "n")
        .with(keys::APP_NAME, "callflow")
        .with(keys::APP_VERSION, "")
        .with(keys::NODE, Value::Null)
        .with(keys::MSG_ID, "original");
    let before = relayed.clone();
    relayed.stamp(&stamp());
    assert_eq!(relayed.app_name(), Some("callflow"));
    assert_eq!(relayed.app_version(), Some("1.2.3"));
    assert_eq!(relayed.node(), Some("warren@host"));
    assert_eq!(relayed.msg_id(), Some("original"));

    let mut again = relayed.clone();
    again.stamp(&Stamp {
        app_name: "other".into(),
        app_version: "9".into(),
        node: "other@host".into(),
    });
    assert_eq!(again, relayed, "a second stamp changes nothing");
    assert_ne!(before, relayed);
}

#[test]
fn reply_carries_the_request_msg_id() {
    let request = Envelope::new("directory", "authn_req")
        .with(keys::MSG_ID, "req-1")
        .with(keys::SERVER_ID, "q")
        .with("Other", "not copied");
    let reply = request.reply("directory", "authn_resp");
    assert_eq!(reply.category(), "directory");
    assert_eq!(reply.name(), "authn_resp");
    assert_eq!(reply.msg_id(), Some("req-1"));
    assert_eq!(reply.server_id(), None);
    assert_eq!(reply.get("Other"), None);
}

#[test]
fn reply_prefers_msg_reply_id() {
    let request = Envelope::new("c", "req")
        .with(keys::MSG_ID, "req-1")
        .with(keys::MSG_REPLY_ID, "corr-9");
    assert_eq!(request.reply("c", "resp").msg_id(), Some("corr-9"));
    let empty = request.clone().with(keys::MSG_REPLY_ID, "");
    assert_eq!(empty.reply("c", "resp").msg_id(), Some("req-1"));
    let bare = Envelope::new("c", "req");
    assert_eq!(bare.reply("c", "resp").msg_id(), None);
}

#[test]
fn defer_response_forms() {
    let base = Envelope::new("c", "n");
    assert!(!base.defer_response());
    for (value, expected) in [
        (json!(true), true),
        (json!("true"), true),
        (json!(false), false),
        (json!("false"), false),
        (json!("yes"), false),
        (json!(1), false),
        (Value::Null, false),
    ] {
        let envelope = base.clone().with(keys::DEFER_RESPONSE, value.clone());
        assert_eq!(envelope.defer_response(), expected, "{value}");
    }
}

#[test]
fn field_access() {
    let mut envelope = Envelope::new("c", "n");
    envelope.set("A", 1).set("B", "two");
    assert_eq!(envelope.get("A"), Some(&json!(1)));
    assert_eq!(envelope.get_str("A"), None);
    assert_eq!(envelope.get_str("B"), Some("two"));
    assert_eq!(envelope.remove("A"), Some(json!(1)));
    assert_eq!(envelope.get("A"), None);
    assert_eq!(envelope.fields().len(), 3);
    let fields = envelope.into_fields();
    assert_eq!(fields.get(keys::EVENT_CATEGORY), Some(&json!("c")));
}

#[test]
fn publish_properties_fields() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let plain = publish_properties(false);
    assert_eq!(
        plain.content_type().as_ref().map(ShortString::as_str),
        Some(CONTENT_TYPE)
    );
    assert_eq!(plain.content_encoding(), &None);
    let stamped = plain.timestamp().expect("timestamp set");
    assert!(
        stamped.abs_diff(now) <= 5,
        "seconds, not micro/milliseconds: {stamped}"
    );

    let gzipped = publish_properties(true);
    assert_eq!(
        gzipped.content_encoding().as_ref().map(ShortString::as_str),
        Some(GZIP_ENCODING)
    );
    assert_eq!(
        gzipped.content_type().as_ref().map(ShortString::as_str),
        Some(CONTENT_TYPE)
    );
}

#[test]
fn publish_properties_match_what_decode_accepts() {
    let envelope = Envelope::new("c", "n").with(keys::MSG_ID, "m");
    for gzip in [false, true] {
        let properties = publish_properties(gzip);
        let body = if gzip {
            envelope.encode_gzip()
        } else {
            envelope.encode()
        };
        let decoded = Envelope::decode(
            &body,
            properties.content_type().as_ref().map(ShortString::as_str),
            properties
                .content_encoding()
                .as_ref()
                .map(ShortString::as_str),
        );
        assert_eq!(decoded.ok(), Some(envelope.clone()));
    }
}

/// Not an assertion: prints ns per decode (run with --release for a real figure).
#[test]
fn decode_timing_sanity() {
    let mut envelope = Envelope::new("call_event", "CHANNEL_ANSWER")
        .with(keys::SERVER_ID, "targeted.skel-worker-0001")
        .with(keys::CALL_ID, "3f1c2a9e-5b7d");
    envelope.stamp(&stamp());
    let mut body = envelope.encode();
    // Pad to 256 bytes with one more header.
    let pad = 256usize.saturating_sub(body.len() + r#","X-Pad":"""#.len());
    envelope.set("X-Pad", "p".repeat(pad));
    body = envelope.encode();
    assert_eq!(body.len(), 256);
    let without_id = {
        let mut copy = envelope.clone();
        copy.remove(keys::MSG_ID);
        copy.encode()
    };

    let rounds: u32 = if cfg!(debug_assertions) {
        2_000
    } else {
        100_000
    };
    let build = if cfg!(debug_assertions) {
        " [debug build]"
    } else {
        ""
    };
    let time = |label: &str, bytes: &[u8], decode: &dyn Fn(&[u8]) -> usize| {
        let started = Instant::now();
        let mut fields = 0;
        for _ in 0..rounds {
            fields += decode(std::hint::black_box(bytes));
        }
        let nanos = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        println!(
            "{label}, {} bytes: {nanos:.0} ns/decode over {rounds} rounds ({fields} fields){build}",
            bytes.len()
        );
    };
    let envelope_decode = |bytes: &[u8]| {
        Envelope::decode(bytes, Some("application/json"), None).map_or(0, |e| e.fields().len())
    };
    time("Envelope::decode, Msg-ID present", &body, &envelope_decode);
    time(
        "Envelope::decode, Msg-ID generated",
        &without_id,
        &envelope_decode,
    );
    time("baseline serde_json::from_slice::<Map>", &body, &|bytes| {
        serde_json::from_slice::<Map<String, Value>>(bytes).map_or(0, |m| m.len())
    });
}

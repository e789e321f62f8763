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

    let at_limit = Envelope::decode_with(&body, None, Some("gzip"), &DecodeLimits::new(json.len()));
    assert!(at_limit.is_ok(), "{at_limit:?}");
    let over = Envelope::decode_with(
        &body,
        None,
        Some("gzip"),
        &DecodeLimits::new(json.len() - 1),
    );
    assert!(
        matches!(over, Err(DecodeError::TooLarge { limit }) if limit == json.len() - 1),
        "{over:?}"
    );
}

#[test]
fn zip_bomb_over_the_real_limit_is_an_error() {
    // A body a few hundred KiB that would inflate past 16 MiB.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder
        .write_all(br#"{"Event-Category":"c","Event-Name":"n","Pad":""#)
        .expect("gzip in memory");
    let zeros = vec![b'0'; 1024 * 1024];
    for _ in 0..=DEFAULT_MAX_MESSAGE_BYTES / zeros.len() {
        encoder.write_all(&zeros).expect("gzip in memory");
    }
    let body = encoder.finish().expect("gzip in memory");
    assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
    let result = Envelope::decode(&body, Some(CONTENT_TYPE), Some("gzip"));
    assert!(
        matches!(
            result,
            Err(DecodeError::TooLarge {
                limit: DEFAULT_MAX_MESSAGE_BYTES
            })
        ),
        "{result:?}"
    );
}

/// A valid envelope whose body is exactly `len` bytes (a padding field fills it up).
fn body_of_len(len: usize) -> Vec<u8> {
    let head = br#"{"Event-Category":"c","Event-Name":"n","Pad":""#;
    let tail = br#""}"#;
    let pad = len
        .checked_sub(head.len() + tail.len())
        .expect("long enough for the fields");
    let mut body = head.to_vec();
    body.resize(head.len() + pad, b'p');
    body.extend_from_slice(tail);
    assert_eq!(body.len(), len);
    body
}

/// A gzip body of `members` concatenated members, each 1 MiB of zero bytes: about a KiB
/// per member on the wire, `members` MiB once inflated.
fn gzip_bomb(members: usize) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder
        .write_all(&vec![0u8; 1024 * 1024])
        .expect("gzip in memory");
    let member = encoder.finish().expect("gzip in memory");
    let mut bomb = Vec::with_capacity(member.len() * members);
    for _ in 0..members {
        bomb.extend_from_slice(&member);
    }
    bomb
}

#[test]
fn a_body_above_the_limit_is_rejected_unread() {
    let limits = DecodeLimits::new(4096);
    let at_limit = Envelope::decode_with(&body_of_len(4096), None, None, &limits);
    assert!(at_limit.is_ok(), "{at_limit:?}");
    // One byte over: refused before the content type, the encoding or the JSON is looked
    // at (each of them would be an error too, a different one).
    let over = vec![0xff; 4097];
    for (content_type, encoding) in [
        (None, None),
        (Some("text/plain"), None),
        (None, Some("br")),
        (None, Some("gzip")),
    ] {
        let result = Envelope::decode_with(&over, content_type, encoding, &limits);
        assert!(
            matches!(result, Err(DecodeError::TooLarge { limit: 4096 })),
            "{content_type:?} {encoding:?}: {result:?}"
        );
    }
    let message = DecodeError::TooLarge { limit: 4096 }.to_string();
    assert!(message.contains("4096"), "{message}");
}

#[test]
fn decode_uses_the_default_limit_of_16_mib() {
    assert_eq!(DecodeLimits::default().max_bytes, 16 * 1024 * 1024);
    assert_eq!(DEFAULT_MAX_MESSAGE_BYTES, 16 * 1024 * 1024);
    let at_limit = body_of_len(DEFAULT_MAX_MESSAGE_BYTES);
    let result = Envelope::decode(&at_limit, None, None);
    assert!(result.is_ok(), "{:?}", result.map(|_| ()));
    let mut over = at_limit;
    over.push(b' ');
    let result = Envelope::decode(&over, None, None);
    assert!(
        matches!(
            result,
            Err(DecodeError::TooLarge {
                limit: DEFAULT_MAX_MESSAGE_BYTES
            })
        ),
        "{:?}",
        result.map(|_| ())
    );
}

#[test]
fn a_multi_member_gzip_bomb_stops_at_the_limit() {
    // 2048 members of 1 MiB: 2 GiB once inflated, a couple of MiB on the wire.
    let bomb = gzip_bomb(2048);
    assert!(bomb.len() < 4 * 1024 * 1024, "{} bytes", bomb.len());
    for limits in [DecodeLimits::default(), DecodeLimits::new(3 * 1024 * 1024)] {
        let result = Envelope::decode_with(&bomb, Some(CONTENT_TYPE), Some("gzip"), &limits);
        assert!(
            matches!(result, Err(DecodeError::TooLarge { limit }) if limit == limits.max_bytes),
            "{result:?}"
        );
    }
    // Below the limit the same members inflate whole (and then are not JSON).
    let small = gzip_bomb(2);
    let result = Envelope::decode_with(&small, None, Some("gzip"), &DecodeLimits::default());
    assert!(
        matches!(result, Err(DecodeError::InvalidJson { .. })),
        "{result:?}"
    );
}

#[test]
fn gunzip_never_holds_more_than_the_limit() {
    let limit = 3 * 1024 * 1024 + 17;
    let plain = gunzip(&gzip_bomb(3), limit).expect("3 MiB is under the limit");
    assert_eq!(plain.len(), 3 * 1024 * 1024);
    assert!(plain.capacity() <= limit + 1, "{}", plain.capacity());
    let exact = gunzip(&gzip_bomb(3), 3 * 1024 * 1024).expect("exactly at the limit");
    assert_eq!(exact.len(), 3 * 1024 * 1024);
    assert!(exact.capacity() <= 3 * 1024 * 1024 + 1);
    let over = gunzip(&gzip_bomb(3), 3 * 1024 * 1024 - 1);
    assert!(
        matches!(over, Err(DecodeError::TooLarge { .. })),
        "{over:?}"
    );
}

#[test]
fn deep_nesting_is_a_clean_error_not_a_stack_overflow() {
    // serde_json stops at 128 levels; 200 000 would overflow any stack if it recursed.
    let depth = 200_000;
    let mut inside = br#"{"Event-Category":"c","Event-Name":"n","Deep":"#.to_vec();
    inside.extend(std::iter::repeat_n(b'[', depth));
    inside.extend(std::iter::repeat_n(b']', depth));
    inside.push(b'}');
    let mut bare = vec![b'['; depth];
    bare.extend(std::iter::repeat_n(b']', depth));
    for body in [&inside, &bare] {
        match Envelope::decode(body, None, None) {
            Err(error @ DecodeError::InvalidJson { .. }) => {
                assert!(error.to_string().contains("recursion limit"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Ordinary nesting is fine.
    let mut nested = br#"{"Event-Category":"c","Event-Name":"n","Deep":"#.to_vec();
    nested.extend(std::iter::repeat_n(b'[', 100));
    nested.extend(std::iter::repeat_n(b']', 100));
    nested.push(b'}');
    assert!(Envelope::decode(&nested, None, None).is_ok());
}

#[test]
fn the_number_of_json_values_is_bounded() {
    let limits = DecodeLimits::new(64 * 1024);
    assert_eq!(limits.max_json_values(), MIN_JSON_VALUES);
    assert_eq!(DecodeLimits::default().max_json_values(), 1024 * 1024);
    let with_zeros = |zeros: usize| {
        let mut body = br#"{"Event-Category":"c","Event-Name":"n","A":[0"#.to_vec();
        for _ in 1..zeros {
            body.extend_from_slice(b",0");
        }
        body.extend_from_slice(b"]}");
        body
    };
    // 1 object + 3 keys + 2 strings + 1 array + the zeros.
    let fits = with_zeros(MIN_JSON_VALUES - 7);
    assert!(Envelope::decode_with(&fits, None, None, &limits).is_ok());
    let over = with_zeros(MIN_JSON_VALUES - 6);
    assert!(over.len() < limits.max_bytes / 4, "small in bytes");
    let result = Envelope::decode_with(&over, None, None, &limits);
    assert!(
        matches!(
            result,
            Err(DecodeError::TooManyValues {
                limit: MIN_JSON_VALUES
            })
        ),
        "{result:?}"
    );
    // Commas, colons and brackets inside strings (escaped quotes included) are text.
    let mut text = br#"{"Event-Category":"c","Event-Name":"n","T":"\"\\"#.to_vec();
    for _ in 0..MIN_JSON_VALUES {
        text.extend_from_slice(b",:[{");
    }
    text.extend_from_slice(br#"\""}"#);
    let envelope = Envelope::decode_with(&text, None, None, &limits).expect("one string");
    assert!(
        envelope
            .get_str("T")
            .is_some_and(|t| t.len() > 4 * MIN_JSON_VALUES)
    );
}

#[test]
fn a_dense_body_under_an_eighth_of_the_limit_fits() {
    // Two bytes per value, the densest valid JSON: 2 MiB is an eighth of 16 MiB.
    let limits = DecodeLimits::default();
    let mut body = br#"{"Event-Category":"c","Event-Name":"n","A":[0"#.to_vec();
    while body.len() + 4 <= limits.max_bytes / 8 {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(b"]}");
    assert!(body.len() <= limits.max_bytes / 8);
    let result = Envelope::decode_with(&body, None, None, &limits);
    assert!(result.is_ok(), "{:?}", result.map(|_| ()));
}

#[test]
fn a_server_id_longer_than_a_routing_key_is_refused() {
    let with_server_id = |id: &str| Envelope::new("c", "n").with(keys::SERVER_ID, id).encode();
    let longest = "q".repeat(MAX_SHORT_STRING_BYTES);
    let envelope = Envelope::decode(&with_server_id(&longest), None, None).expect("255 is fine");
    assert_eq!(envelope.server_id(), Some(longest.as_str()));
    // 256 bytes: as ASCII, and as 128 two-byte characters (the limit is in bytes).
    for id in ["q".repeat(256), "é".repeat(128), "s".repeat(300)] {
        let result = Envelope::decode(&with_server_id(&id), None, None);
        match result {
            Err(ref error @ DecodeError::InvalidField { field, ref reason }) => {
                assert_eq!(field, keys::SERVER_ID);
                let length = id.len().to_string();
                assert!(
                    reason.contains(&length) && reason.contains("255"),
                    "{reason}"
                );
                let message = error.to_string();
                assert!(message.contains("Server-ID"), "{message}");
                assert!(
                    !message.contains(&id[..16]),
                    "the value is not quoted: {message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let mut fields = Envelope::new("c", "n").into_fields();
    fields.insert(keys::SERVER_ID.into(), Value::String("x".repeat(256)));
    assert!(matches!(
        Envelope::from_map(fields),
        Err(DecodeError::InvalidField {
            field: keys::SERVER_ID,
            ..
        })
    ));
}

#[test]
fn small_bodies_decode_inline() {
    assert!(decode_is_small(0, None));
    assert!(decode_is_small(INLINE_PLAIN_MAX, None));
    assert!(decode_is_small(INLINE_PLAIN_MAX, Some("identity")));
    assert!(!decode_is_small(INLINE_PLAIN_MAX + 1, None));
    assert!(!decode_is_small(INLINE_PLAIN_MAX + 1, Some("")));
    for gzip in ["gzip", " GZIP "] {
        assert!(decode_is_small(INLINE_GZIP_MAX, Some(gzip)));
        assert!(!decode_is_small(INLINE_GZIP_MAX + 1, Some(gzip)));
    }
    // An unknown encoding is refused without reading the body.
    assert!(decode_is_small(INLINE_PLAIN_MAX, Some("br")));
}

#[tokio::test]
async fn decode_owned_gives_the_body_back_with_every_result() {
    let limits = DecodeLimits::new(1024 * 1024);
    let small = Envelope::new("c", "n").encode();
    let large = body_of_len(INLINE_PLAIN_MAX * 2);
    let bomb = gzip_bomb(4);
    let too_large = vec![b' '; limits.max_bytes + 1];
    // What each result is, in a word, to compare with what each case expects.
    let kind = |result: &Result<Envelope, DecodeError>| match result {
        Ok(_) => "ok",
        Err(DecodeError::TooLarge { limit: 1_048_576 }) => "too large",
        Err(DecodeError::UnsupportedContentEncoding(_)) => "encoding",
        Err(_) => "other error",
    };
    let cases = [
        (&small, None, "ok"),
        (&large, None, "ok"),
        (&bomb, Some("gzip"), "too large"),
        (&too_large, None, "too large"),
        (&large, Some("deflate"), "encoding"),
    ];
    for (body, encoding, expected) in cases {
        let (back, result) = decode_owned(
            body.clone(),
            Some(CONTENT_TYPE.to_string()),
            encoding.map(str::to_string),
            limits,
        )
        .await;
        assert_eq!(kind(&result), expected, "{} bytes: {result:?}", body.len());
        assert!(&back == body, "the body comes back unchanged");
    }
}

/// On a single-threaded runtime, a decode that ran inline would stop every other task
/// until it finished; off the async thread, a ticker keeps ticking meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn large_decodes_leave_the_async_thread_free() {
    let bomb = gzip_bomb(2048);
    let ticks = std::sync::atomic::AtomicUsize::new(0);
    let ticker = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let decode = decode_owned(
        bomb,
        None,
        Some("gzip".to_string()),
        DecodeLimits::default(),
    );
    let started = Instant::now();
    let (_, result) = tokio::select! {
        decoded = decode => decoded,
        () = ticker => unreachable!("the ticker never ends"),
    };
    let took = started.elapsed();
    assert!(
        matches!(result, Err(DecodeError::TooLarge { .. })),
        "{result:?}"
    );
    let ticked = ticks.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        ticked >= 2,
        "the async thread was blocked: {ticked} ticks in {took:?}"
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

/// What a full parse of `body` into a map gives, for comparing the received form with it.
fn parsed(body: &[u8]) -> Map<String, Value> {
    serde_json::from_slice(body).expect("the fixture is a JSON object")
}

#[test]
fn a_received_envelope_reads_as_a_full_parse_of_its_body() {
    // Escapes in keys and values, a repeated header (the last one counts, as in a map),
    // nested values and numbers: the headers read from the scan and every field read
    // from the map built later agree with a plain parse.
    let body = br#"{"Event-Category":"first","Event-Category":"call_\"event\"",
        "Event-Name":"CHANNEL_\u0041NSWER","Msg-\u0049D":"m-1","Server-ID":"q\\1",
        "Msg-Reply-ID":"r-1","Defer-Response":true,"Nested":{"a":[1,2.5,-3,null,{"b":"c"}]},
        "Unicode":"h\u00e9 \ud83d\ude00","Big":18446744073709551615}"#;
    let envelope = Envelope::decode(body, None, None).expect("decodes");
    let map = parsed(body);
    assert_eq!(envelope.category(), "call_\"event\"");
    assert_eq!(envelope.name(), "CHANNEL_ANSWER");
    assert_eq!(envelope.msg_id(), Some("m-1"));
    assert_eq!(envelope.server_id(), Some("q\\1"));
    assert_eq!(envelope.get_str(keys::MSG_REPLY_ID), Some("r-1"));
    assert!(envelope.defer_response());
    for key in map.keys() {
        assert_eq!(envelope.get(key), map.get(key), "{key}");
    }
    assert_eq!(envelope.fields(), &map);
    assert_eq!(envelope.clone().into_fields(), map);
    assert_eq!(parsed(&envelope.encode()), map);
    let reply = envelope.reply("c", "n");
    assert_eq!(reply.msg_id(), Some("r-1"));
}

#[test]
fn the_headers_of_a_received_envelope_are_read_without_building_its_map() {
    let body = br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":"m","Server-ID":"s",
        "Defer-Response":"true","Other":{"x":[1,2,3]}}"#;
    let envelope = Envelope::decode(body, None, None).expect("decodes");
    let Repr::Wire(wire) = &envelope.repr else {
        panic!("a decoded envelope keeps its text");
    };
    assert_eq!(
        (envelope.category(), envelope.name()),
        ("c", "n"),
        "routing reads the scan"
    );
    assert_eq!(
        (envelope.msg_id(), envelope.server_id()),
        (Some("m"), Some("s"))
    );
    assert!(envelope.defer_response());
    assert!(!wire.has_fields(), "no header read built the map");
    assert_eq!(envelope.get_str("Other"), None);
    assert!(wire.has_fields(), "any other field builds it");
}

#[test]
fn extract_reads_a_received_envelopes_fields_without_building_its_map() {
    let body = br#"{"Event-Category":"c","Event-Name":"n","Args":{"i":1,"s":"\u00e9"},
        "Skipped":[{"deep":[1,2,{"x":null}]},"text"],"Result":7,"Result":8}"#;
    let envelope = Envelope::decode(body, None, None).expect("decodes");
    let Repr::Wire(wire) = &envelope.repr else {
        panic!("a decoded envelope keeps its text");
    };
    let [args, result, absent, msg_id] =
        envelope.extract(["Args", "Result", "Absent", keys::MSG_ID]);
    assert!(!wire.has_fields(), "extract did not build the map");
    assert_eq!(args, Some(json!({"i": 1, "s": "é"})));
    assert_eq!(
        result,
        Some(json!(8)),
        "a repeated key keeps its last value, as the map"
    );
    assert_eq!(absent, None);
    let generated = envelope.msg_id().expect("generated").to_owned();
    assert_eq!(
        msg_id,
        Some(Value::String(generated)),
        "the generated Msg-ID"
    );
    // The same answers from the map once it is built, and from a built envelope.
    let parsed = parsed(body);
    assert_eq!(envelope.get("Args"), parsed.get("Args"));
    assert_eq!(envelope.extract(["Args", "Result"]), [args.clone(), result]);
    let built = Envelope::new("c", "n").with("Args", json!({"k": true}));
    assert_eq!(
        built.extract(["Args", "Nope"]),
        [Some(json!({"k": true})), None]
    );
}

#[test]
fn what_a_full_parse_refuses_the_scan_of_a_received_body_refuses() {
    let refused: [&[u8]; 6] = [
        // A number out of range, in a field warren never reads.
        br#"{"Event-Category":"c","Event-Name":"n","X":1e400}"#,
        // Not UTF-8 inside a string warren never reads.
        b"{\"Event-Category\":\"c\",\"Event-Name\":\"n\",\"X\":\"\xff\xfe\"}",
        // A bad escape, a lone surrogate, text after the object, an unclosed object.
        br#"{"Event-Category":"c","Event-Name":"n","X":"\q"}"#,
        br#"{"Event-Category":"c","Event-Name":"n","X":"\ud800"}"#,
        br#"{"Event-Category":"c","Event-Name":"n"} trailing"#,
        br#"{"Event-Category":"c","Event-Name":"n","X":[1,2}"#,
    ];
    for body in refused {
        assert!(
            serde_json::from_slice::<Map<String, Value>>(body).is_err(),
            "the fixture is invalid"
        );
        match Envelope::decode(body, None, None) {
            Err(DecodeError::InvalidJson { line, column, .. }) => {
                assert!(line >= 1 && column >= 1, "located")
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
        }
    }
    // Deep nesting inside a header warren reads is refused like anywhere else.
    let mut deep = br#"{"Event-Category":"c","Event-Name":"n","Server-ID":"#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 200));
    deep.extend(std::iter::repeat_n(b']', 200));
    deep.push(b'}');
    assert!(matches!(
        Envelope::decode(&deep, None, None),
        Err(DecodeError::InvalidJson { .. })
    ));
}

#[test]
fn a_received_envelope_without_a_msg_id_gets_one_that_it_keeps() {
    for body in [
        &br#"{"Event-Category":"c","Event-Name":"n"}"#[..],
        br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":""}"#,
        br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":null}"#,
    ] {
        let envelope = Envelope::decode(body, None, None).expect("decodes");
        let id = envelope.msg_id().expect("generated").to_owned();
        assert!(is_msg_id(&id), "{id}");
        assert_eq!(envelope.get_str(keys::MSG_ID), Some(id.as_str()));
        assert_eq!(
            envelope.fields().get(keys::MSG_ID),
            Some(&Value::String(id.clone()))
        );
        let again = Envelope::decode(&envelope.encode(), None, None).expect("decodes");
        assert_eq!(again.msg_id(), Some(id.as_str()), "the encoding carries it");
    }
}

#[test]
fn changing_a_received_envelope_keeps_every_other_field() {
    let body = br#"{"Event-Category":"c","Event-Name":"n","Msg-ID":"m","Keep":[1,{"a":"b"}]}"#;
    let mut envelope = Envelope::decode(body, None, None).expect("decodes");
    envelope.set(keys::EVENT_NAME, "renamed").set("Added", 1);
    assert_eq!(envelope.name(), "renamed");
    assert_eq!(envelope.msg_id(), Some("m"));
    assert_eq!(envelope.get("Keep"), Some(&json!([1, {"a": "b"}])));
    assert_eq!(envelope.remove("Added"), Some(json!(1)));
    let mut expected = parsed(body);
    expected.insert(keys::EVENT_NAME.into(), json!("renamed"));
    assert_eq!(envelope.fields(), &expected);
    assert_eq!(
        envelope,
        Envelope::from_map(expected).expect("valid"),
        "equal as fields"
    );
}

//! Hostile input against the real `warren` binary with the echo app, on a private broker
//! node: gzip bombs and an oversized body leave it up, answering, within a memory bound
//! and with an empty queue; a Server-ID too long for a routing key is one rejection and
//! one log line, not a panic and a requeue loop. Also: the test publisher fails on a nack.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::client::Client;
use common::{Broker, config_text, unique_node};
use lapin::types::{AMQPValue, FieldTable};
use warren_runtime::envelope::{Envelope, keys, publish_properties};
use warren_test_support::local_uri;

use common::service::Running;

/// How much the service's peak RSS may exceed its RSS before the flood.
const RSS_GROWTH_LIMIT: u64 = 256 * 1024 * 1024;

/// A private broker node, `warren run` with the echo app against it, and a client.
async fn echo_service(label: &str) -> (Broker, tempfile::TempDir, Running, Client) {
    let broker = Broker::start_many(1).await.remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node(label);
    let text = format!(
        "{}\n[apps.echo]\nenabled = true\n",
        config_text(&name, &[broker.uri()], "")
    );
    let path: PathBuf = dir.path().join("config.ini");
    std::fs::write(&path, text).expect("write config");
    let run = Running::start(&path);
    run.wait_echo_ready().await;
    let client = Client::connect(&broker.uri(), &name).await;
    (broker, dir, run, client)
}

/// A gzip body that inflates to about `mib` MiB: the same small member (an envelope whose
/// padding is 1 MiB of one character, ~1 KiB compressed) repeated; a gzip reader reads
/// every member.
fn gzip_bomb(mib: usize) -> Vec<u8> {
    let member = Envelope::new("echo", "req")
        .with("Pad", "0".repeat(1024 * 1024))
        .encode_gzip();
    let mut bomb = Vec::with_capacity(member.len() * mib);
    for _ in 0..mib {
        bomb.extend_from_slice(&member);
    }
    bomb
}

/// The reply to `request` if it comes within `timeout`, and the Msg-IDs of any other
/// replies that came first.
async fn reply_to(
    client: &mut Client,
    request: &Envelope,
    timeout: Duration,
) -> (Option<Envelope>, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut others = Vec::new();
    // Bounded: a reply per message published at most.
    for _ in 0..10 {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.reply(left).await {
            Some(reply) if reply.msg_id() == request.msg_id() => return (Some(reply), others),
            Some(other) => others.push(other.msg_id().unwrap_or("").to_string()),
            None => break,
        }
    }
    (None, others)
}

/// Ready and unacknowledged messages of queue `echo` on the broker, if listed.
async fn echo_queue_counts(broker: &Broker) -> Option<(u64, u64)> {
    let listing = broker
        .ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .await;
    listing.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["echo", ready, unacked] => Some((ready.parse().ok()?, unacked.parse().ok()?)),
            _ => None,
        }
    })
}

/// Ready messages of a queue on the broker (0 if it is not listed).
async fn ready_in(broker: &Broker, queue: &str) -> u64 {
    let listing = broker.ctl(&["list_queues", "name", "messages_ready"]).await;
    listing
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [name, ready] if name == queue => ready.parse().ok(),
                _ => None,
            }
        })
        .unwrap_or(0)
}

/// Waits until `queue` holds `n` ready messages; the last count seen.
async fn wait_ready_in(broker: &Broker, queue: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = ready_in(broker, queue).await;
        if ready == n || Instant::now() >= deadline {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until queue `echo` holds nothing, ready or unacknowledged; the last counts seen.
async fn wait_echo_queue_empty(broker: &Broker) -> Option<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = echo_queue_counts(broker).await;
        if counts == Some((0, 0)) || Instant::now() >= deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Five 2 GiB gzip bombs and a 100 MB body in a row: warren stays up, answers the next
/// request, its peak RSS grows by at most 256 MiB, and the queue ends empty, each bad
/// message rejected once (never requeued).
#[tokio::test(flavor = "multi_thread")]
async fn gzip_bombs_and_a_huge_body_leave_the_service_up_and_bounded() {
    let (broker, _dir, mut run, mut client) = echo_service("hostile-bombs").await;
    let bomb = gzip_bomb(2048);
    assert!(bomb.len() < 8 * 1024 * 1024, "{} bytes", bomb.len());
    // A valid request but for its size: were it decoded, echo would answer it.
    let mut huge = client
        .request("echo", "req")
        .with(keys::MSG_ID, "huge")
        .encode();
    huge.pop(); // the closing brace
    huge.extend_from_slice(br#","Pad":""#);
    huge.resize(100_000_000 - 2, b'x');
    huge.extend_from_slice(br#""}"#);
    assert!(serde_json::from_slice::<serde_json::Value>(&huge).is_ok());

    let rss_before = run.status_bytes("VmRSS");
    for _ in 0..5 {
        client
            .publish_raw("echo", "echo.req", &bomb, publish_properties(true))
            .await;
    }
    client
        .publish_raw("echo", "echo.req", &huge, publish_properties(false))
        .await;
    drop(huge);
    let request = client
        .request("echo", "req")
        .with("Payload", "after the flood");
    client.publish("echo", "echo.req", &request).await;

    let (reply, others) = reply_to(&mut client, &request, Duration::from_secs(120)).await;
    let alive = run.alive();
    let peak = run.status_bytes("VmHWM");
    let counts = wait_echo_queue_empty(&broker).await;
    let output = run.output();
    let reply = reply.unwrap_or_else(|| panic!("no reply after the flood: {output}"));
    assert!(others.is_empty(), "bad messages were answered: {others:?}");
    assert_eq!(reply.get_str("Payload"), Some("after the flood"));
    assert!(alive, "warren died: {output}");
    let growth = peak.saturating_sub(rss_before);
    println!(
        "RSS before the flood {} MiB, peak {} MiB",
        rss_before / (1024 * 1024),
        peak / (1024 * 1024)
    );
    assert!(
        growth <= RSS_GROWTH_LIMIT,
        "peak RSS grew by {} MiB (before {} MiB, peak {} MiB)",
        growth / (1024 * 1024),
        rss_before / (1024 * 1024),
        peak / (1024 * 1024)
    );
    assert_eq!(
        counts,
        Some((0, 0)),
        "queue echo (ready, unacked): {output}"
    );
    assert!(
        !output.contains("requeued"),
        "a bad message went back to the queue: {output}"
    );
    assert_eq!(
        wait_ready_in(&broker, "echo.parked", 6).await,
        6,
        "the five bombs and the huge body are parked, not dropped"
    );
    let status = run.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {output}");
}

/// A flood of bad messages is a few log lines, not one per message, and every one of them
/// is parked.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_messages_is_a_few_log_lines_and_all_are_parked() {
    let (broker, _dir, mut run, mut client) = echo_service("hostile-flood").await;
    let flood = Instant::now();
    for i in 0..300 {
        client
            .publish_raw(
                "echo",
                "echo.req",
                format!("{{not json {i}").as_bytes(),
                publish_properties(false),
            )
            .await;
    }
    let request = client.request("echo", "req").with("Payload", "after");
    client.publish("echo", "echo.req", &request).await;
    let (reply, _) = reply_to(&mut client, &request, Duration::from_secs(30)).await;
    let parked = wait_ready_in(&broker, "echo.parked", 300).await;
    let output = run.output();
    assert!(reply.is_some(), "no reply after the flood: {output}");
    assert_eq!(parked, 300, "{output}");
    let lines = run
        .lines()
        .into_iter()
        .filter(|l| l.contains("not a valid envelope"))
        .count();
    // One line, then at most one per 10 s while the flood lasts.
    let allowed = 1 + (flood.elapsed().as_secs() / 10) as usize;
    assert!(
        (1..=allowed).contains(&lines),
        "{lines} log lines for 300 bad messages: {output}"
    );
    let status = run.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {output}");
}

/// A Server-ID of 300 bytes cannot be a routing key (AMQP allows 255): the request is
/// rejected with one log line, not a panic in the reply and a requeue loop, and the next
/// valid request is answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_id_too_long_for_a_routing_key_is_one_rejection() {
    let (broker, _dir, mut run, mut client) = echo_service("hostile-server-id").await;
    let bad_id = format!(
        "long-server-id-{}",
        &warren_runtime::envelope::new_msg_id()[..8]
    );
    let bad = Envelope::new("echo", "req")
        .with(keys::MSG_ID, bad_id.as_str())
        .with(keys::SERVER_ID, "s".repeat(300))
        .with("Payload", "never answered");
    client.publish("echo", "echo.req", &bad).await;
    let request = client.request("echo", "req").with("Payload", "next");
    client.publish("echo", "echo.req", &request).await;

    let (reply, others) = reply_to(&mut client, &request, Duration::from_secs(30)).await;
    let alive = run.alive();
    let counts = wait_echo_queue_empty(&broker).await;
    let output = run.output();
    assert!(
        reply.is_some(),
        "the next request was not answered: {output}"
    );
    assert!(others.is_empty(), "other replies: {others:?}");
    assert!(alive, "warren died: {output}");
    assert_eq!(
        counts,
        Some((0, 0)),
        "queue echo (ready, unacked): {output}"
    );
    // Every line about the bad message: its Msg-ID, its field, or a panic.
    let about: Vec<String> = run
        .lines()
        .into_iter()
        .filter(|l| l.contains(&bad_id) || l.contains("Server-ID") || l.contains("panicked"))
        .collect();
    println!("lines about the bad request: {about:#?}");
    assert_eq!(
        about.len(),
        1,
        "one line about the bad request, not {}: {about:#?}",
        about.len()
    );
    assert!(
        !output.contains("requeued"),
        "the bad request went back to the queue: {output}"
    );
    assert_eq!(
        wait_ready_in(&broker, "echo.parked", 1).await,
        1,
        "the bad request is parked"
    );
    let status = run.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {output}");
}

/// The test publisher treats a nack as a failure: a queue that refuses every publish
/// (x-max-length 0, reject-publish) makes `publish_raw` fail instead of returning.
#[tokio::test(flavor = "multi_thread")]
async fn a_nacked_publish_fails_the_test_publisher() {
    let name = unique_node("hostile-nack");
    let client = Client::connect(&local_uri(), &name).await;
    let queue = format!("{name}-full");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    client.queue(&queue, arguments).await;
    // In a task of its own, so that its failure is observed rather than failing this test.
    let publisher = {
        let publisher_name = format!("{name}-publisher");
        let queue = queue.clone();
        tokio::spawn(async move {
            let publisher = Client::connect(&local_uri(), &publisher_name).await;
            publisher
                .publish_raw("", &queue, b"refused", publish_properties(false))
                .await;
        })
    };
    let outcome = tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publish settles in time");
    client.delete_queue(&queue).await;
    let error = outcome.expect_err("a nacked publish must fail the publisher");
    assert!(error.is_panic(), "{error}");
}

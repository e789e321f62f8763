//! One client connection: its WebSocket, its mailbox listener, its limits and the frames
//! it sends, from the upgrade to the close.
//!
//! The socket has one writer task; everything the client gets (deliveries, replies,
//! errors, the close frame) goes through it, in the order handed over. A frame that breaks
//! the protocol is answered with an error frame and the connection stays open; a limit
//! broken closes it with its code (`limits::CloseCode`).
//!
//! Owns the connection's lifetime. Must not touch the broker itself (`inbound`,
//! `mailbox`) nor other connections (`gateway`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use warren_listeners::prelude::*;

use crate::feed::Feed;
use crate::frame::{ClientFrame, FrameError, error_frame, subscribed_frame};
use crate::gateway::Gateway;
use crate::inbound;
use crate::limits::{CloseCode, FrameRate};
use crate::mailbox::{Mailbox, Outgoing, Targets};

/// Frames queued for the writer; a full queue slows the mailbox, never drops.
const WRITER_QUEUE: usize = 256;
/// How long a new connection waits for its mailbox to consume.
const MAILBOX_START: Duration = Duration::from_secs(10);

/// Runs the connection of client `id` until it closes.
pub async fn run(gateway: Gateway, socket: WebSocket, id: String) {
    let (mut sink, mut stream) = socket.split();
    let (writer, mut outgoing) = mpsc::channel::<Outgoing>(WRITER_QUEUE);
    let (closer, mut close) = mpsc::channel::<(u16, &'static str)>(1);
    let writing = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                Some((code, reason)) = close.recv() => {
                    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
                next = outgoing.recv() => {
                    let Some(Outgoing { text, written }) = next else { break };
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                    if let Some(written) = written {
                        let _ = written.send(());
                    }
                }
            }
        }
    });
    let (number, mut replaced) = gateway.register(&id);
    let targets: Targets = Arc::default();
    let mailbox = Mailbox {
        name: format!("gateway.client#{number}"),
        id: id.clone(),
        config: gateway.config().clone(),
        writer: writer.clone(),
        targets: targets.clone(),
    };
    let handle = match spawn_listener(mailbox, gateway.ctx()).await {
        Ok(handle) if handle.wait_consuming(true, MAILBOX_START).await => Some(handle),
        Ok(handle) => {
            gateway.warn_limited(
                "a client's queue was not consumed in time; the connection is closed",
                &format!("not consuming within {MAILBOX_START:?}"),
            );
            let _ = handle.stop().await;
            None
        }
        Err(error) => {
            gateway.warn_limited("a client's queue could not be set up", &error);
            None
        }
    };
    if let Some(handle) = &handle {
        let mut connection = Connection {
            gateway: &gateway,
            id: &id,
            handle,
            writer: &writer,
            targets: &targets,
            subscriptions: HashSet::new(),
            rate: FrameRate::new(gateway.config().max_frames_per_sec),
            publishing: None,
        };
        let stopping = gateway.ctx().node.http.stopping();
        tokio::pin!(stopping);
        let ending = loop {
            let message = tokio::select! {
                _ = &mut stopping => break Some((CloseCode::GOING_AWAY, "the node stops")),
                _ = &mut replaced => break Some((CloseCode::REPLACED, "replaced by a newer connection")),
                message = stream.next() => message,
            };
            let text = match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(_))) => {
                    break Some((CloseCode::UNSUPPORTED, "binary frames are not supported"));
                }
                Some(Ok(_)) => continue,
            };
            if let Some(close) = connection.frame(text.as_str()).await {
                break Some(close);
            }
        };
        if let Some(ending) = ending {
            let _ = closer.send(ending).await;
        }
    } else {
        let _ = closer
            .send((
                CloseCode::UNAVAILABLE,
                "the client's queue could not be set up",
            ))
            .await;
    }
    gateway.unregister(&id, number);
    if let Some(handle) = handle {
        let _ = handle.stop().await;
    }
    drop(writer);
    drop(closer);
    let _ = tokio::time::timeout(Duration::from_secs(5), writing).await;
}

/// The state of one open connection.
struct Connection<'a> {
    gateway: &'a Gateway,
    id: &'a str,
    handle: &'a ListenerHandle,
    writer: &'a mpsc::Sender<Outgoing>,
    targets: &'a Targets,
    /// (feed, subject or "" for all) pairs this connection subscribed to.
    subscriptions: HashSet<(Feed, String)>,
    rate: FrameRate,
    /// The connection's publisher, started by its first `publish` frame (an idle
    /// connection holds no task for it).
    publishing: Option<mpsc::Sender<Publish>>,
}

/// A checked `publish` frame without a request id, waiting for the connection's publisher.
struct Publish {
    feeds: Vec<Feed>,
    message: serde_json::Value,
    distribution: Option<crate::frame::Distribution>,
}

/// Publishes a connection's messages one after the other, each answered with its frame.
fn publisher(
    gateway: Gateway,
    id: String,
    writer: mpsc::Sender<Outgoing>,
) -> mpsc::Sender<Publish> {
    let (publishing, mut queue) = mpsc::channel::<Publish>(WRITER_QUEUE);
    tokio::spawn(async move {
        while let Some(publish) = queue.recv().await {
            for feed in publish.feeds {
                let frame = inbound::publish(
                    &gateway,
                    &id,
                    feed,
                    &publish.message,
                    publish.distribution.as_ref(),
                )
                .await;
                let _ = writer
                    .send(Outgoing {
                        text: frame,
                        written: None,
                    })
                    .await;
            }
        }
    });
    publishing
}

impl Connection<'_> {
    /// Handles one text frame; `Some` when the connection must close.
    async fn frame(&mut self, text: &str) -> Option<(u16, &'static str)> {
        let config = self.gateway.config();
        if text.len() > config.max_frame_bytes {
            return Some((CloseCode::TOO_BIG, "frame larger than max_frame_bytes"));
        }
        if !self.rate.allow(Instant::now()) {
            return Some((CloseCode::TOO_MANY_FRAMES, "more than max_frames_per_sec"));
        }
        let frame = match ClientFrame::parse(text, &config.in_exchange) {
            Ok(frame) => frame,
            Err(error) => {
                self.send(error_frame(&error, None)).await;
                return None;
            }
        };
        match frame {
            ClientFrame::Consume { feeds, targets } => self.consume(feeds, targets).await,
            ClientFrame::Publish {
                feeds,
                message,
                distribution: _,
                request_id: Some(request_id),
            } => {
                let gateway = self.gateway.clone();
                let writer = self.writer.clone();
                let id = self.id.to_string();
                // A request waits for its reply: the next frames are read meanwhile.
                tokio::spawn(async move {
                    let frame =
                        inbound::request(&gateway, &id, feeds[0], &request_id, &message).await;
                    let _ = writer
                        .send(Outgoing {
                            text: frame,
                            written: None,
                        })
                        .await;
                });
                None
            }
            ClientFrame::Publish {
                feeds,
                message,
                distribution,
                request_id: None,
            } => {
                // One publisher task per connection: the client's messages reach the
                // broker in the order it sent them.
                let publish = Publish {
                    feeds,
                    message,
                    distribution,
                };
                let publishing = self.publishing.get_or_insert_with(|| {
                    publisher(
                        self.gateway.clone(),
                        self.id.to_string(),
                        self.writer.clone(),
                    )
                });
                if publishing.send(publish).await.is_err() {
                    return Some((CloseCode::UNAVAILABLE, "the publisher stopped"));
                }
                None
            }
        }
    }

    /// Subscribes to `feeds` (narrowed to `targets`); closes past `max_subscriptions`.
    async fn consume(
        &mut self,
        feeds: Vec<Feed>,
        targets: Vec<String>,
    ) -> Option<(u16, &'static str)> {
        let config = self.gateway.config();
        let wanted: Vec<(Feed, String)> = feeds
            .iter()
            .flat_map(|feed| {
                if targets.is_empty() {
                    vec![(*feed, String::new())]
                } else {
                    targets.iter().map(|t| (*feed, t.clone())).collect()
                }
            })
            .collect();
        let mut after = self.subscriptions.clone();
        after.extend(wanted.iter().cloned());
        if after.len() > config.max_subscriptions {
            return Some((
                CloseCode::TOO_MANY_SUBSCRIPTIONS,
                "more than max_subscriptions",
            ));
        }
        for feed in &feeds {
            let binding = Binding::new(&config.client_exchange, feed.broadcast_key());
            if let Err(error) = self.handle.add_binding(binding).await {
                let error =
                    FrameError::new("channel", &format!("not subscribed to {feed}: {error}"));
                self.send(error_frame(&error, None)).await;
                return None;
            }
        }
        {
            let mut narrowed = self.targets.lock();
            for feed in &feeds {
                if targets.is_empty() {
                    narrowed.remove(feed);
                } else {
                    narrowed
                        .entry(*feed)
                        .or_default()
                        .extend(targets.iter().cloned());
                }
            }
        }
        self.subscriptions = after;
        self.send(subscribed_frame(&feeds, &targets)).await;
        None
    }

    async fn send(&self, text: String) {
        let _ = self
            .writer
            .send(Outgoing {
                text,
                written: None,
            })
            .await;
    }
}

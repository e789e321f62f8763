//! Feeds: the business streams a client subscribes to and publishes on (`voice`, `chat`,
//! `tickets`). The POC calls them "channels"; here they are feeds, so that they are never
//! confused with AMQP channels.
//!
//! Owns the list of feeds and the names each one has on the broker (`IN_<FEED>`,
//! `OUT_<FEED>`, routing keys). Must not touch frames (`frame`) nor sockets (`socket`).

use std::fmt;

/// One business stream of the gateway.
///
/// It exists so that the three streams of the POC are one closed set with one spelling:
/// the frame's `channel` object names them, the broker's queues are built from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feed {
    Voice,
    Chat,
    Tickets,
}

impl Feed {
    /// Every feed, in the order frames and the README list them.
    pub const ALL: [Feed; 3] = [Feed::Voice, Feed::Chat, Feed::Tickets];

    /// The name in frames and routing keys (`voice`, `chat`, `tickets`).
    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Voice => "voice",
            Feed::Chat => "chat",
            Feed::Tickets => "tickets",
        }
    }

    /// The feed called `name` in a frame, if any.
    pub fn parse(name: &str) -> Option<Feed> {
        Feed::ALL.into_iter().find(|feed| feed.as_str() == name)
    }

    /// `IN_<FEED>`: the queue back-ends consume client messages from (and the RPC topic
    /// of write-and-wait requests), after the configured `queue_prefix`.
    pub fn in_queue(self, prefix: &str) -> String {
        format!("{prefix}IN_{}", self.upper())
    }

    /// The RPC topic of this feed's write-and-wait requests (`IN_<FEED>`; a topic holds no
    /// `.`, so the prefix goes into the target's exchange instead).
    pub fn rpc_topic(self) -> String {
        format!("IN_{}", self.upper())
    }

    /// `OUT_<FEED>`: the queue the gateway nodes take back-end messages from.
    pub fn out_queue(self, prefix: &str) -> String {
        format!("{prefix}OUT_{}", self.upper())
    }

    /// The routing key of this feed's broadcasts on the client exchange.
    pub fn broadcast_key(self) -> String {
        format!("feed.{}", self.as_str())
    }

    fn upper(self) -> String {
        self.as_str().to_ascii_uppercase()
    }
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The routing key (on the client exchange) of messages for client `id` alone.
pub fn client_key(id: &str) -> String {
    format!("client.{id}")
}

/// The name of client `id`'s own queue, after the configured `queue_prefix`.
pub fn client_queue(prefix: &str, id: &str) -> String {
    format!("{prefix}gateway.client.{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_mapping_table() {
        assert_eq!(Feed::Tickets.in_queue(""), "IN_TICKETS");
        assert_eq!(Feed::Voice.out_queue("t."), "t.OUT_VOICE");
        assert_eq!(Feed::Chat.broadcast_key(), "feed.chat");
        assert_eq!(Feed::parse("tickets"), Some(Feed::Tickets));
        assert_eq!(Feed::parse("Tickets"), None);
        assert_eq!(client_key("alice"), "client.alice");
        assert_eq!(client_queue("", "alice"), "gateway.client.alice");
    }
}

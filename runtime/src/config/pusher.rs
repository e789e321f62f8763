//! `[apps.event_pusher]`: MongooseIM's `mod_event_pusher_rabbit` keys (exchange names,
//! types and topics) and the event pusher's lanes, checked like every other section.
//!
//! Owns the meaning of those keys and their defaults (in `raw`); must not touch the other
//! keys of `[apps.<name>]` (`validate::apps`) nor what the app does with them.

use toml::Spanned;

use super::error::{ConfigError, Problem};
use super::locate::Source;
use super::raw::{RawApp, RawPusherExchange};
use super::rules::{OwnKey, only_under, positive};
use super::{EventPusherConfig, PusherExchange, PusherExchangeKind};

/// The app these keys belong to.
pub(super) const APP: &str = "event_pusher";

/// The event pusher's settings from `app` (`key` = `apps.<name>`), or the defaults. Any of
/// its keys under another app is an error naming the key.
pub(super) fn event_pusher(
    name: &str,
    app: &RawApp,
    key: &str,
    source: &Source<'_>,
) -> Result<EventPusherConfig, ConfigError> {
    let defaults = EventPusherConfig::default();
    if name != APP {
        let stray: [OwnKey<'_>; _] = [
            (
                "presence_exchange",
                app.presence_exchange.as_ref().map(Spanned::span),
            ),
            (
                "chat_msg_exchange",
                app.chat_msg_exchange.as_ref().map(Spanned::span),
            ),
            (
                "groupchat_msg_exchange",
                app.groupchat_msg_exchange.as_ref().map(Spanned::span),
            ),
            ("lanes", app.lanes.as_ref().map(Spanned::span)),
            ("lane_window", app.lane_window.as_ref().map(Spanned::span)),
            (
                "max_request_bytes",
                app.max_request_bytes.as_ref().map(Spanned::span),
            ),
            ("max_batch", app.max_batch.as_ref().map(Spanned::span)),
            ("persistent", app.persistent.as_ref().map(Spanned::span)),
            (
                "durable_exchanges",
                app.durable_exchanges.as_ref().map(Spanned::span),
            ),
        ];
        only_under(APP, &stray, key, source)?;
        return Ok(defaults);
    }
    let exchange = |raw: Option<&Spanned<RawPusherExchange>>,
                    field: &str,
                    default: PusherExchange|
     -> Result<PusherExchange, ConfigError> {
        let Some(raw) = raw else {
            return Ok(default);
        };
        let raw = raw.get_ref();
        let at = |sub: &str| format!("{key}.{field}.{sub}");
        let name = match &raw.name {
            None => default.name,
            Some(name) if name.get_ref().trim().is_empty() => {
                return Err(source.error(name.span().start, &at("name"), Problem::EmptyExchange));
            }
            Some(name) if name.get_ref().len() > 255 || name.get_ref().starts_with("amq.") => {
                return Err(source.error(
                    name.span().start,
                    &at("name"),
                    Problem::BadExchange(name.get_ref().clone()),
                ));
            }
            Some(name) => name.get_ref().clone(),
        };
        let kind = match &raw.kind {
            None => default.kind,
            Some(kind) => match kind.get_ref().as_str() {
                "topic" => PusherExchangeKind::Topic,
                "direct" => PusherExchangeKind::Direct,
                other => {
                    return Err(source.error(
                        kind.span().start,
                        &at("type"),
                        Problem::InvalidValue {
                            expected: "\"topic\" or \"direct\"".to_string(),
                            found: format!("{other:?}"),
                        },
                    ));
                }
            },
        };
        let topic = |value: &Option<Spanned<String>>, sub: &str, default: String| match value {
            None => Ok(default),
            Some(_) if field == "presence_exchange" => Err(source.error(
                value.as_ref().map_or(0, |v| v.span().start),
                &at(sub),
                Problem::InvalidValue {
                    expected: "no topic: presence events are routed by the bare JID alone"
                        .to_string(),
                    found: "a topic".to_string(),
                },
            )),
            // The routing key is `<bare jid>.<topic>`: a JID takes at most 3071 bytes
            // (RFC 7622), but the key at most 255, so topics stay short.
            Some(topic)
                if topic.get_ref().is_empty()
                    || topic.get_ref().len() > 64
                    || topic.get_ref().contains(['#', '*']) =>
            {
                Err(source.error(
                    topic.span().start,
                    &at(sub),
                    Problem::InvalidValue {
                        expected: "a non-empty topic of at most 64 bytes without `#` or `*`"
                            .to_string(),
                        found: format!("{:?}", topic.get_ref()),
                    },
                ))
            }
            Some(topic) => Ok(topic.get_ref().clone()),
        };
        Ok(PusherExchange {
            name,
            kind,
            sent_topic: topic(&raw.sent_topic, "sent_topic", default.sent_topic)?,
            recv_topic: topic(&raw.recv_topic, "recv_topic", default.recv_topic)?,
        })
    };
    Ok(EventPusherConfig {
        presence_exchange: exchange(
            app.presence_exchange.as_ref(),
            "presence_exchange",
            defaults.presence_exchange,
        )?,
        chat_msg_exchange: exchange(
            app.chat_msg_exchange.as_ref(),
            "chat_msg_exchange",
            defaults.chat_msg_exchange,
        )?,
        groupchat_msg_exchange: exchange(
            app.groupchat_msg_exchange.as_ref(),
            "groupchat_msg_exchange",
            defaults.groupchat_msg_exchange,
        )?,
        lanes: positive(
            app.lanes.as_ref(),
            defaults.lanes,
            &format!("{key}.lanes"),
            source,
        )?,
        lane_window: positive(
            app.lane_window.as_ref(),
            defaults.lane_window,
            &format!("{key}.lane_window"),
            source,
        )?,
        max_request_bytes: positive(
            app.max_request_bytes.as_ref(),
            defaults.max_request_bytes,
            &format!("{key}.max_request_bytes"),
            source,
        )?,
        max_batch: positive(
            app.max_batch.as_ref(),
            defaults.max_batch,
            &format!("{key}.max_batch"),
            source,
        )?,
        persistent: app
            .persistent
            .as_ref()
            .map_or(defaults.persistent, |v| *v.get_ref()),
        durable_exchanges: app
            .durable_exchanges
            .as_ref()
            .map_or(defaults.durable_exchanges, |v| *v.get_ref()),
    })
}

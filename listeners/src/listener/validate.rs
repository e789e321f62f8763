//! Checks a [`ListenerSpec`] before anything of it reaches a broker.
//!
//! Owns: the rules a spec must follow and [`SpecError`], which names the listener and the
//! field. A bad spec fails the app's start (`warren run` exits 2) instead of being clamped
//! silently or refused by the broker over and over. Must not touch: brokers, actors,
//! config files (it gets the config's defaults as plain values).

use super::responders::Responders;
use super::spec::{AckMode, ListenerSpec, QueueName};
use warren_runtime::exchanges::TARGETED;

/// The longest AMQP short string: queue, exchange and routing key names.
const SHORT_STRING_MAX: usize = 255;

/// Exchanges every RabbitMQ broker has, which a listener binds to without declaring them.
const BROKER_EXCHANGES: &[&str] = &[
    "amq.direct",
    "amq.fanout",
    "amq.topic",
    "amq.headers",
    "amq.match",
    "amq.rabbitmq.trace",
];

/// A listener's spec broke a rule: which listener, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("listener `{listener}`: `{field}`: {problem}")]
pub struct SpecError {
    /// The listener's name as the spec gives it.
    pub listener: String,
    /// The builder method (or field) at fault, e.g. `concurrency` or `bind`.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// The config values a spec falls back on where it sets nothing itself.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpecDefaults {
    /// `[amqp] prefetch`.
    pub prefetch: u16,
}

impl ListenerSpec {
    /// Checks the spec against the rules of AMQP and of warren. `defaults` supplies what
    /// the spec leaves to config.ini.
    pub(crate) fn validate(&self, defaults: SpecDefaults) -> Result<(), SpecError> {
        let fail = |field: &'static str, problem: String| SpecError {
            listener: self.name.clone(),
            field,
            problem,
        };
        if self.name.trim().is_empty() {
            return Err(fail(
                "name",
                "a listener needs a name (used in logs, queue names and consumer tags)".into(),
            ));
        }
        if let QueueName::Named(queue) = &self.queue.name {
            if queue.is_empty() {
                return Err(fail("queue", "a named queue needs a name; use QueueSpec::anonymous() for a queue of this listener alone".into()));
            }
            short_name("queue", queue).map_err(|problem| fail("queue", problem))?;
            if queue.starts_with("amq.") {
                return Err(fail(
                    "queue",
                    format!("`{queue}`: names starting with `amq.` are reserved by the broker"),
                ));
            }
        }
        for exchange in &self.exchanges {
            if exchange.name.is_empty() {
                return Err(fail(
                    "exchange",
                    "the default exchange (\"\") cannot be declared".into(),
                ));
            }
            short_name("exchange", &exchange.name).map_err(|problem| fail("exchange", problem))?;
            if exchange.name.starts_with("amq.") && !exchange.passive {
                return Err(fail(
                    "exchange",
                    format!(
                        "`{}`: names starting with `amq.` are reserved by the broker; bind to it without declaring it",
                        exchange.name
                    ),
                ));
            }
        }
        let known = |name: &str| {
            name == TARGETED
                || BROKER_EXCHANGES.contains(&name)
                || self.exchanges.iter().any(|e| e.name == name)
        };
        for binding in &self.bindings {
            if binding.exchange.is_empty() {
                return Err(fail("bind", "the default exchange (\"\") cannot be bound to; it routes by queue name already".into()));
            }
            if !known(&binding.exchange) {
                return Err(fail(
                    "bind",
                    format!(
                        "`{}` is neither declared by this listener (`.exchange(..)`) nor a broker exchange; declare it, or use Exchange::existing(\"{}\") for one declared elsewhere",
                        binding.exchange, binding.exchange
                    ),
                ));
            }
            short_name("bind", &binding.routing_key).map_err(|problem| fail("bind", problem))?;
        }
        for exchange in &self.own_queue_bindings {
            if exchange.is_empty() || !known(exchange) {
                return Err(fail(
                    "bind_own_queue",
                    format!(
                        "`{exchange}` is neither declared by this listener nor a broker exchange"
                    ),
                ));
            }
        }
        if self.concurrency == 0 {
            return Err(fail(
                "concurrency",
                "must be at least 1 (1 keeps the queue's order)".into(),
            ));
        }
        if self.prefetch == Some(0) {
            return Err(fail("prefetch", "0 would mean no limit in AMQP; give the number of unacknowledged messages the listener may hold".into()));
        }
        let prefetch = self.prefetch.unwrap_or(defaults.prefetch);
        if self.ack != AckMode::Broker && self.concurrency > usize::from(prefetch) {
            let source = if self.prefetch.is_some() {
                "its prefetch"
            } else {
                "[amqp] prefetch"
            };
            return Err(fail(
                "concurrency",
                format!(
                    "{} is above {source} ({prefetch}): at most {prefetch} messages can be handled at once; raise the prefetch or lower the concurrency",
                    self.concurrency
                ),
            ));
        }
        duplicate_responder(&self.responders).map_or(Ok(()), |(category, name)| {
            Err(fail("responder", format!("(`{category}`, `{name}`) is registered twice; every matching responder runs, so the second would handle each event again")))
        })
    }
}

/// Why `value` is not a valid AMQP short string, if it is not.
fn short_name(what: &str, value: &str) -> Result<(), String> {
    if value.len() > SHORT_STRING_MAX {
        Err(format!(
            "a {what} name of {} bytes is longer than AMQP's {SHORT_STRING_MAX}",
            value.len()
        ))
    } else {
        Ok(())
    }
}

/// The first (category, name) that appears twice.
fn duplicate_responder(responders: &Responders) -> Option<(String, String)> {
    let keys = responders.keys();
    keys.iter()
        .enumerate()
        .find(|(i, key)| keys[..*i].contains(key))
        .map(|(_, key)| key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::spec::{Exchange, QueueSpec};
    use crate::listener::{Event, HandlerResult};

    const DEFAULTS: SpecDefaults = SpecDefaults { prefetch: 10 };

    async fn ok(_event: Event) -> HandlerResult {
        Ok(())
    }

    fn field_of(spec: ListenerSpec) -> &'static str {
        spec.validate(DEFAULTS).expect_err("refused").field
    }

    #[test]
    fn a_good_spec_passes() {
        let spec = ListenerSpec::new("good")
            .queue(QueueSpec::named("good").durable())
            .exchange(Exchange::topic("good").durable())
            .bind("good", "good.#")
            .bind("amq.topic", "x.#")
            .bind_own_queue(TARGETED)
            .concurrency(10)
            .responder("a", "b", ok)
            .responder("a", "*", ok);
        assert_eq!(spec.validate(DEFAULTS), Ok(()));
    }

    #[test]
    fn concurrency_above_prefetch_names_the_listener_and_field() {
        let error = ListenerSpec::new("busy")
            .concurrency(32)
            .validate(DEFAULTS)
            .expect_err("refused");
        assert_eq!(error.listener, "busy");
        assert_eq!(error.field, "concurrency");
        assert!(error.problem.contains("[amqp] prefetch (10)"), "{error}");
        assert_eq!(
            ListenerSpec::new("busy")
                .concurrency(32)
                .prefetch(32)
                .validate(DEFAULTS),
            Ok(())
        );
        // No prefetch applies without acknowledgements.
        assert_eq!(
            ListenerSpec::new("busy")
                .concurrency(32)
                .ack(AckMode::Broker)
                .validate(DEFAULTS),
            Ok(())
        );
    }

    #[test]
    fn zero_is_refused_not_clamped() {
        assert_eq!(
            field_of(ListenerSpec::new("z").concurrency(0)),
            "concurrency"
        );
        assert_eq!(field_of(ListenerSpec::new("z").prefetch(0)), "prefetch");
    }

    #[test]
    fn a_named_queue_needs_a_valid_name() {
        assert_eq!(
            field_of(ListenerSpec::new("q").queue(QueueSpec::named(""))),
            "queue"
        );
        assert_eq!(
            field_of(ListenerSpec::new("q").queue(QueueSpec::named("amq.mine"))),
            "queue"
        );
        assert_eq!(
            field_of(ListenerSpec::new("q").queue(QueueSpec::named("q".repeat(256)))),
            "queue"
        );
        assert_eq!(field_of(ListenerSpec::new(" ")), "name");
    }

    #[test]
    fn bindings_need_a_known_exchange() {
        let error = ListenerSpec::new("b")
            .bind("nowhere", "#")
            .validate(DEFAULTS)
            .expect_err("refused");
        assert_eq!(error.field, "bind");
        assert!(error.problem.contains("`nowhere`"), "{error}");
        assert_eq!(
            ListenerSpec::new("b")
                .exchange(Exchange::existing("elsewhere"))
                .bind("elsewhere", "#")
                .validate(DEFAULTS),
            Ok(())
        );
        assert_eq!(field_of(ListenerSpec::new("b").bind("", "q")), "bind");
        assert_eq!(
            field_of(ListenerSpec::new("b").bind_own_queue("nowhere")),
            "bind_own_queue"
        );
        assert_eq!(
            field_of(ListenerSpec::new("b").bind("amq.topic", "k".repeat(256))),
            "bind"
        );
        assert_eq!(
            field_of(ListenerSpec::new("b").exchange(Exchange::topic("amq.mine"))),
            "exchange"
        );
    }

    #[test]
    fn a_duplicate_responder_is_refused() {
        let error = ListenerSpec::new("twice")
            .responder("a", "b", ok)
            .responder("a", "*", ok)
            .responder("a", "b", ok)
            .validate(DEFAULTS)
            .expect_err("refused");
        assert_eq!(error.field, "responder");
        assert!(error.problem.contains("(`a`, `b`)"), "{error}");
    }
}

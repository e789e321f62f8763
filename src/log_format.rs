//! How log lines are written: text for people (the default), or one JSON object per line
//! for log collectors (`WARREN_LOG_FORMAT=json`), with the fields of the span the line was
//! logged in (a handler's `handle` span: `trace_id`, `queue`, `event_category`,
//! `event_name`).
//!
//! Owns: reading `WARREN_LOG_FORMAT` and building the formatting layer. Must not touch:
//! filters and caps (`run::init_logging` puts them on the layer), the subscriber's
//! installation.

use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::registry::LookupSpan;

/// The environment variable that chooses the format.
pub const VARIABLE: &str = "WARREN_LOG_FORMAT";

/// The format of log lines.
///
/// It exists so that an operator who ships logs to a collector gets lines it can parse
/// (and join by trace id) without a parser for the human format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing-subscriber's human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields at the top
    /// level, `span` (the current span's fields) and `spans` (every enclosing span).
    Json,
}

impl LogFormat {
    /// The format `WARREN_LOG_FORMAT` asks for: unset, empty or `text` is text, `json` is
    /// JSON (either in any case); anything else is an error naming the variable.
    pub fn from_env() -> Result<LogFormat, String> {
        match std::env::var(VARIABLE) {
            Ok(value) => LogFormat::parse(&value),
            Err(std::env::VarError::NotPresent) => Ok(LogFormat::Text),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{VARIABLE} is not valid UTF-8; use text or json"))
            }
        }
    }

    fn parse(value: &str) -> Result<LogFormat, String> {
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("text") {
            Ok(LogFormat::Text)
        } else if value.eq_ignore_ascii_case("json") {
            Ok(LogFormat::Json)
        } else {
            Err(format!(
                "{VARIABLE}={value:?} is not a log format; use text or json"
            ))
        }
    }
}

/// The layer that writes log lines in `format` to `writer` (`ansi`: colors, text only).
pub fn layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;
    use warren_runtime::trace::TraceContext;

    use super::*;

    #[test]
    fn the_variable_chooses_text_or_json_and_refuses_anything_else() {
        for text in ["", "text", " TEXT "] {
            assert_eq!(LogFormat::parse(text), Ok(LogFormat::Text), "{text:?}");
        }
        for json in ["json", "JSON", "Json\n"] {
            assert_eq!(LogFormat::parse(json), Ok(LogFormat::Json), "{json:?}");
        }
        let error = LogFormat::parse("yaml").expect_err("not a format");
        assert!(
            error.contains(VARIABLE) && error.contains("yaml"),
            "{error}"
        );
    }

    /// Everything written, shared with the test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_are_one_object_each_with_the_handler_span() {
        let buffer = Buffer::default();
        let writer = {
            let buffer = buffer.clone();
            move || buffer.clone()
        };
        let subscriber = tracing_subscriber::registry().with(layer(LogFormat::Json, writer, false));
        let trace = TraceContext::new_root();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 1, "outside");
            let span = tracing::info_span!(
                "handle",
                trace_id = %trace.trace_id(),
                queue = "q",
                event_category = "c",
                event_name = "n"
            );
            span.in_scope(|| tracing::warn!(reason = "r", "inside"));
        });
        let written = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = written
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        let [outside, inside] = lines.as_slice() else {
            panic!("two lines: {written}");
        };
        assert_eq!(outside["message"], "outside");
        assert_eq!(outside["n"], 1);
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["level"], "WARN");
        assert_eq!(inside["reason"], "r");
        let span = &inside["span"];
        assert_eq!(span["name"], "handle");
        assert_eq!(span["trace_id"], trace.trace_id().to_string());
        assert_eq!(
            (&span["queue"], &span["event_category"], &span["event_name"]),
            (&"q".into(), &"c".into(), &"n".into())
        );
        assert_eq!(inside["spans"][0]["trace_id"], span["trace_id"]);
    }
}

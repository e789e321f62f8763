//! Turning the TOML reader's errors (syntax, unknown keys, wrong types) into located
//! [`ConfigError`]s with a [`Problem`] of their own.
//!
//! The toml crate reports a byte span and serde's standard message; this module finds
//! the key path for the span (see `locate`) and rewrites the message into a sentence.
//! Every text taken from the reader goes through `redact_uri` first.

use super::error::{ConfigError, Problem};
use super::locate::{Source, key_at, key_near};
use crate::uri::redact_uri;

/// How close (Jaro-Winkler, 0..1) a name must be to a valid one to be suggested.
const SUGGESTION_THRESHOLD: f64 = 0.8;

/// A TOML syntax error, located at its span and attributed to the nearest key.
pub(super) fn syntax_error(source: &Source<'_>, error: &toml::de::Error) -> ConfigError {
    let offset = syntax_offset(source.text, error.span().map_or(0, |span| span.start));
    let key = key_near(source.text, offset);
    let message = redact_uri(error.message());
    source.error(offset, &key, Problem::Syntax { message })
}

/// A refusal while reading the parsed document into the typed structs.
pub(super) fn deserialize_error(source: &Source<'_>, error: &toml::de::Error) -> ConfigError {
    let offset = error.span().map_or(0, |span| span.start);
    let key = key_at(source.text, offset).unwrap_or_else(|| key_near(source.text, offset));
    source.error(offset, &key, problem_from_message(error.message()))
}

/// The name in `candidates` closest to `name`, when it is close enough to be a likely typo.
pub(super) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(name, candidate), candidate))
        .filter(|(score, _)| *score >= SUGGESTION_THRESHOLD)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate.to_string())
}

/// An error reported at the very end of the file (an unclosed array or string) is moved
/// back to just after the last non-blank character, so it points at a real line.
fn syntax_offset(text: &str, offset: usize) -> usize {
    let content_end = text.trim_end().len();
    if offset > content_end && content_end > 0 {
        content_end
    } else {
        offset
    }
}

/// Rewrites serde's standard messages ("unknown field", "missing field", "invalid type",
/// "invalid value").
fn problem_from_message(message: &str) -> Problem {
    let message = redact_uri(message);
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (name, expected) = rest.split_once(", ").unwrap_or((rest, ""));
        let name = name.trim_matches('`');
        let valid = ticked_names(expected);
        let suggestion = closest(name, valid.iter().map(String::as_str));
        return Problem::UnknownKey { suggestion, valid };
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        let name = rest.trim_matches('`').to_string();
        return Problem::MissingKey { name };
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.rsplit_once(", expected ")
    {
        return Problem::WrongType {
            expected: in_words(expected),
            found: found_in_words(found),
        };
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.rsplit_once(", expected ")
    {
        return Problem::InvalidValue {
            expected: in_words(expected),
            found: found.to_string(),
        };
    }
    Problem::Unreadable { message }
}

/// The names between backticks in serde's "expected one of `a`, `b`" (empty for
/// "there are no fields").
fn ticked_names(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Serde's name of an expected type, in an operator's words.
fn in_words(expected: &str) -> String {
    match expected {
        "u16" => "an integer from 0 to 65535".to_string(),
        "u64" | "usize" | "u32" => "a non-negative integer".to_string(),
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        other if other.starts_with("struct ") => "a table".to_string(),
        other => other.to_string(),
    }
}

/// Serde's name of a found value, in an operator's words.
fn found_in_words(found: &str) -> String {
    match found {
        "sequence" => "an array".to_string(),
        "map" => "a table".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_suggests_the_closest_key() {
        let problem =
            problem_from_message("unknown field `prefech`, expected one of `zone`, `prefetch`");
        assert_eq!(
            problem,
            Problem::UnknownKey {
                suggestion: Some("prefetch".to_string()),
                valid: vec!["zone".to_string(), "prefetch".to_string()],
            }
        );
    }

    #[test]
    fn unknown_field_far_from_everything_lists_the_keys() {
        let problem = problem_from_message("unknown field `xyz`, expected `brokers`");
        assert_eq!(
            problem.to_string(),
            "unknown key (expected one of `brokers`)"
        );
        let problem = problem_from_message("unknown field `xyz`, there are no fields");
        assert_eq!(
            problem.to_string(),
            "unknown key (nothing is expected here)"
        );
    }

    #[test]
    fn invalid_type_is_rewritten_and_redacted() {
        let problem = problem_from_message("invalid type: string \"amqp://u:pw@h\", expected u16");
        assert_eq!(
            problem.to_string(),
            "wrong type: expected an integer from 0 to 65535, found string \"amqp://u:***@h\""
        );
    }

    #[test]
    fn missing_field_names_the_key() {
        let problem = problem_from_message("missing field `uri`");
        assert_eq!(
            problem,
            Problem::MissingKey {
                name: "uri".to_string()
            }
        );
        assert_eq!(problem.to_string(), "missing key `uri`");
    }

    #[test]
    fn other_messages_pass_through() {
        let problem = problem_from_message("something odd");
        assert_eq!(problem.to_string(), "something odd");
    }

    #[test]
    fn eof_errors_move_back_to_the_last_line() {
        assert_eq!(syntax_offset("a = [1\n\n", 8), 6);
        assert_eq!(syntax_offset("a = [1\n", 3), 3);
        assert_eq!(syntax_offset("", 0), 0);
    }
}

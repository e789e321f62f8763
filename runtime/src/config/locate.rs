//! Positions in config.ini: byte offsets to 1-based line and column, and byte offsets to
//! the dotted key path an operator recognises (`zones.local.brokers[1]`).
//!
//! Owns [`Source`], the text being loaded and its path, which turns a position, a key
//! and a [`Problem`] into a [`ConfigError`]. Knows nothing about what the keys mean.

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Problem};
use crate::uri::redact_uri;

/// The text of config.ini and where it came from.
pub(super) struct Source<'a> {
    pub text: &'a str,
    pub path: &'a Path,
}

impl Source<'_> {
    /// A located error at byte `offset`.
    pub fn error(&self, offset: usize, key: &str, problem: Problem) -> ConfigError {
        let (line, column) = line_column(self.text, offset);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            // A key could only hold a URI by mistake, but it is printed: redact it too.
            key: redact_uri(key),
            problem,
        }
    }

    /// The 1-based line of byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        line_column(self.text, offset).0
    }
}

/// The 1-based line and column (counted in characters) of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// One dotted key segment: bare when TOML allows it, quoted otherwise (`zones.""`).
pub(super) fn segment(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.to_string()
    } else {
        toml::Value::String(name.to_string()).to_string()
    }
}

/// Joins a parent key path and one more name.
pub(super) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        segment(name)
    } else {
        format!("{parent}.{}", segment(name))
    }
}

/// The dotted key path of the smallest key or value of the document that covers byte
/// `offset`, if the document parses.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let root = DeTable::parse(text).ok()?;
    let mut places = Vec::new();
    collect_table(root.get_ref(), "", &mut places);
    places
        .into_iter()
        .filter(|(span, _)| covers(span, offset))
        .min_by_key(|(span, _)| span.len())
        .map(|(_, key)| key)
}

/// Whether `span` covers `offset` (an empty span covers its own start).
fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

/// Records the span of every key and value under `table`, with its dotted path.
fn collect_table(table: &DeTable<'_>, path: &str, out: &mut Vec<(Range<usize>, String)>) {
    for (key, value) in table.iter() {
        let key_path = join(path, key.get_ref());
        out.push((key.span(), key_path.clone()));
        collect_value(value, &key_path, out);
    }
}

/// Records the span of `value` and of everything inside it.
fn collect_value(value: &Spanned<DeValue<'_>>, path: &str, out: &mut Vec<(Range<usize>, String)>) {
    out.push((value.span(), path.to_string()));
    match value.get_ref() {
        DeValue::Table(table) => collect_table(table, path, out),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                collect_value(item, &format!("{path}[{index}]"), out);
            }
        }
        _ => {}
    }
}

/// The key a syntax error at `offset` most likely belongs to, found by reading back from
/// its line: the nearest `key =` line (within the same section) and the enclosing
/// `[section]` header. Used when the document does not parse, so no tree is available.
pub(super) fn key_near(text: &str, offset: usize) -> String {
    let (line, _) = line_column(text, offset);
    let mut key: Option<&str> = None;
    let mut section: Option<&str> = None;
    for raw_line in text
        .lines()
        .take(line)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        let trimmed = raw_line.trim();
        if trimmed.starts_with('[') {
            section = Some(
                trimmed
                    .trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or(""),
            );
            break;
        }
        if key.is_none()
            && !trimmed.starts_with('#')
            && let Some((name, _)) = trimmed.split_once('=')
        {
            let name = name.trim();
            if !name.is_empty() {
                key = Some(name);
            }
        }
    }
    let section = section.map(str::trim).filter(|s| !s.is_empty());
    match (section, key) {
        (Some(section), Some(key)) => format!("{section}.{key}"),
        (Some(section), None) => section.to_string(),
        (None, Some(key)) => key.to_string(),
        (None, None) => "(top level)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_are_one_based() {
        let text = "[amqp]\nprefetch = 3\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 7), (2, 1));
        assert_eq!(line_column(text, 18), (2, 12));
        assert_eq!(line_column(text, 100), (3, 1));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "node = \"é\" x";
        assert_eq!(line_column(text, 11), (1, 11));
    }

    #[test]
    fn finds_keys_values_and_array_items() {
        let text = "[amqp]\nprefetch = 3\n[zones.local]\nbrokers = [\"a\", \"b\"]\n";
        assert_eq!(key_at(text, 7).as_deref(), Some("amqp.prefetch"));
        assert_eq!(key_at(text, 18).as_deref(), Some("amqp.prefetch"));
        let b = text.find("\"b\"").unwrap();
        assert_eq!(key_at(text, b).as_deref(), Some("zones.local.brokers[1]"));
    }

    #[test]
    fn quotes_keys_that_are_not_bare() {
        assert_eq!(join("zones", ""), "zones.\"\"");
        assert_eq!(join("zones", "a b"), "zones.\"a b\"");
        assert_eq!(join("", "amqp"), "amqp");
    }

    #[test]
    fn reads_back_to_the_key_and_section() {
        let text = "[amqp]\n# note = x\nprefetch = [3,\n  4\n";
        assert_eq!(key_near(text, text.len() - 2), "amqp.prefetch");
        assert_eq!(key_near("x = = 1", 4), "x");
        assert_eq!(key_near("[pool]\n!!", 8), "pool");
        assert_eq!(key_near("!!", 0), "(top level)");
    }
}

//! Rules on values that several sections share (a count or a duration that must not be
//! zero, an app's keys written under another app), so that each section's validator
//! states its keys and not the rule again.
//!
//! Owns those rules. Must not touch which keys exist (`validate`, `pusher`) nor how a
//! position becomes a line (`locate`).

use toml::Spanned;

use super::error::{ConfigError, Problem};
use super::locate::Source;

/// The value of a key that must not be zero, or its default when absent.
pub(super) fn positive<T>(
    value: Option<&Spanned<T>>,
    default: T,
    key: &str,
    source: &Source<'_>,
) -> Result<T, ConfigError>
where
    T: Copy + Default + PartialEq,
{
    match value {
        None => Ok(default),
        Some(value) if *value.get_ref() == T::default() => {
            Err(source.error(value.span().start, key, Problem::Zero))
        }
        Some(value) => Ok(*value.get_ref()),
    }
}

/// A key of one app's own settings, and where it was written under `[apps.<name>]` if it
/// was.
pub(super) type OwnKey<'a> = (&'a str, Option<std::ops::Range<usize>>);

/// `keys` belong to `[apps.<owner>]`: the first one written under another app's section
/// (`key` = `apps.<name>`) is an error naming it.
pub(super) fn only_under(
    owner: &str,
    keys: &[OwnKey<'_>],
    key: &str,
    source: &Source<'_>,
) -> Result<(), ConfigError> {
    let Some((field, Some(span))) = keys.iter().find(|(_, span)| span.is_some()) else {
        return Ok(());
    };
    Err(source.error(
        span.start,
        &format!("{key}.{field}"),
        Problem::InvalidValue {
            expected: format!("no such key: `{field}` belongs to [apps.{owner}]"),
            found: "a value".to_string(),
        },
    ))
}

//! Rules on values that several sections share (a count or a duration that must not be
//! zero), so that each section's validator states its keys and not the rule again.
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

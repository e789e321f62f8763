//! Kazoo's configuration events (kapi_conf): document and database changes published on
//! the `configuration` topic exchange, so that caches on every node can forget what
//! changed.
//!
//! Routing key of a document change: `doc_<action>.<db>.<type>.<id>`, the id escaped the
//! way Kazoo does (every character outside `[A-Za-z0-9-~_]` as `%XX`, `.` as `%2E`, a
//! space as `+`); the database name goes in as it is (Kazoo's are already URL-encoded).
//! A database change: `db_<action>.<db>.database.<db>`. This module owns those shapes and a
//! publish helper; it does not subscribe (see the router in warren-listeners).

use std::fmt::Write;

use crate::confirm::{PublishError, Published};
use crate::envelope::Envelope;
use crate::publisher::Publisher;

/// Event-Category of every configuration event.
pub const CATEGORY: &str = "configuration";

/// What happened to a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DocAction {
    Created,
    Edited,
    Deleted,
}

impl DocAction {
    /// The Event-Name and first routing key segment.
    pub fn event_name(self) -> &'static str {
        match self {
            DocAction::Created => "doc_created",
            DocAction::Edited => "doc_edited",
            DocAction::Deleted => "doc_deleted",
        }
    }
}

/// What happened to a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbAction {
    Created,
    Edited,
    Deleted,
    ViewsUpdated,
}

impl DbAction {
    /// The Event-Name and first routing key segment.
    pub fn event_name(self) -> &'static str {
        match self {
            DbAction::Created => "db_created",
            DbAction::Edited => "db_edited",
            DbAction::Deleted => "db_deleted",
            DbAction::ViewsUpdated => "db_views_updated",
        }
    }
}

/// The change an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    Doc(DocAction),
    Db(DbAction),
}

impl Change {
    pub fn event_name(self) -> &'static str {
        match self {
            Change::Doc(action) => action.event_name(),
            Change::Db(action) => action.event_name(),
        }
    }
}

/// A doc_update event (Kazoo's kapi_conf `doc_update`): a document or database change.
#[derive(Clone, Debug, PartialEq)]
pub struct DocUpdate {
    pub change: Change,
    /// The database, as Kazoo names it (already URL-encoded, e.g. `account%2Fab%2Fcd%2F…`).
    pub database: String,
    /// The document's `pvt_type` (`database` for database changes).
    pub doc_type: String,
    /// The document id (the database name for database changes).
    pub id: String,
    pub account_id: Option<String>,
    pub rev: Option<String>,
    /// The cache that made the change, so that the same cache on the same node does not
    /// flush itself for it.
    pub origin_cache: Option<String>,
}

impl DocUpdate {
    /// A document change.
    pub fn doc(
        action: DocAction,
        database: impl Into<String>,
        doc_type: impl Into<String>,
        id: impl Into<String>,
    ) -> Self {
        DocUpdate {
            change: Change::Doc(action),
            database: database.into(),
            doc_type: doc_type.into(),
            id: id.into(),
            account_id: None,
            rev: None,
            origin_cache: None,
        }
    }

    /// A database change.
    pub fn db(action: DbAction, database: impl Into<String>) -> Self {
        let database = database.into();
        DocUpdate {
            change: Change::Db(action),
            id: database.clone(),
            database,
            doc_type: "database".to_string(),
            account_id: None,
            rev: None,
            origin_cache: None,
        }
    }

    pub fn origin_cache(mut self, cache: impl Into<String>) -> Self {
        self.origin_cache = Some(cache.into());
        self
    }

    /// The routing key Kazoo publishes it with.
    pub fn routing_key(&self) -> String {
        match self.change {
            Change::Doc(action) => format!(
                "{}.{}.{}.{}",
                action.event_name(),
                self.database,
                self.doc_type,
                escape_id(&self.id)
            ),
            Change::Db(action) => format!(
                "{}.{}.database.{}",
                action.event_name(),
                self.database,
                self.database
            ),
        }
    }

    /// The event body.
    pub fn envelope(&self) -> Envelope {
        let mut envelope = Envelope::new(CATEGORY, self.change.event_name())
            .with("Database", self.database.as_str())
            .with("Type", self.doc_type.as_str())
            .with("ID", self.id.as_str());
        for (key, value) in [
            ("Account-ID", &self.account_id),
            ("Rev", &self.rev),
            ("Origin-Cache", &self.origin_cache),
        ] {
            if let Some(value) = value {
                envelope.set(key, value.as_str());
            }
        }
        envelope
    }

    /// Publishes the event (confirmed) on the `exchange` (normally `configuration`).
    pub async fn publish(
        &self,
        publisher: &Publisher,
        exchange: &str,
    ) -> Result<Published, PublishError> {
        publisher
            .publish(
                exchange,
                &self.routing_key(),
                self.envelope(),
                publisher.options(),
            )
            .await
    }
}

/// Kazoo's escaping of a document id in a routing key.
pub fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'~' | b'_' => out.push(byte as char),
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// A binding key for configuration events: each part `None` = any (`*`); a key of only
/// wildcards is `#`.
pub fn binding_key(
    change: Option<&str>,
    database: Option<&str>,
    doc_type: Option<&str>,
    id: Option<&str>,
) -> String {
    if change.is_none() && database.is_none() && doc_type.is_none() && id.is_none() {
        return "#".to_string();
    }
    let id = id.map(escape_id);
    [change, database, doc_type, id.as_deref()]
        .iter()
        .map(|part| part.unwrap_or("*"))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_the_kazoo_way() {
        assert_eq!(escape_id("abc-DEF_09~"), "abc-DEF_09~");
        assert_eq!(escape_id("a.b"), "a%2Eb");
        assert_eq!(escape_id("a b"), "a+b");
        assert_eq!(escape_id("a/b#c*"), "a%2Fb%23c%2A");
        assert_eq!(escape_id("é"), "%C3%A9");
    }

    #[test]
    fn routing_keys() {
        let doc = DocUpdate::doc(DocAction::Edited, "account%2Fab%2Fcd%2Fef", "user", "u.1");
        assert_eq!(
            doc.routing_key(),
            "doc_edited.account%2Fab%2Fcd%2Fef.user.u%2E1"
        );
        let db = DocUpdate::db(DbAction::Created, "account%2Fab");
        assert_eq!(
            db.routing_key(),
            "db_created.account%2Fab.database.account%2Fab"
        );
    }

    #[test]
    fn envelopes_carry_the_doc_update_fields() {
        let update =
            DocUpdate::doc(DocAction::Deleted, "db", "device", "d1").origin_cache("devices");
        let envelope = update.envelope();
        assert_eq!(envelope.category(), "configuration");
        assert_eq!(envelope.name(), "doc_deleted");
        assert_eq!(envelope.get_str("Database"), Some("db"));
        assert_eq!(envelope.get_str("Type"), Some("device"));
        assert_eq!(envelope.get_str("ID"), Some("d1"));
        assert_eq!(envelope.get_str("Origin-Cache"), Some("devices"));
        assert_eq!(envelope.get("Rev"), None);
    }

    #[test]
    fn binding_keys_default_to_wildcards_and_collapse_to_hash() {
        assert_eq!(binding_key(None, None, None, None), "#");
        assert_eq!(binding_key(None, Some("db"), None, None), "*.db.*.*");
        assert_eq!(
            binding_key(None, None, Some("user"), Some("a.b")),
            "*.*.user.a%2Eb"
        );
        assert_eq!(
            binding_key(Some("doc_edited"), Some("db"), Some("user"), Some("x")),
            "doc_edited.db.user.x"
        );
    }
}

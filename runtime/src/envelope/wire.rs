//! A received envelope before anyone asked for its fields: the validated JSON text, the
//! header values warren reads on every delivery, and the map, built on first use.
//!
//! Owns the received form only: one pass over the body that checks everything a full
//! parse would check (syntax, UTF-8, numbers in range, nesting depth) and records where
//! the headers warren needs (Event-Category, Event-Name, Msg-ID, Server-ID,
//! Msg-Reply-ID, Defer-Response) sit in the text, without allocating; and the full
//! parse into a `serde_json` map when a caller first asks for a field outside those
//! headers. It must not decide what is valid for an envelope (that is
//! `Envelope`'s validation, in `envelope.rs`) nor know about AMQP.
//!
//! Why: a delivery that a listener only routes, counts or forwards never needs its
//! fields as a map, and building one costs a dozen allocations per message, most of a
//! delivery's cost in the runtime. A handler that reads its fields pays the parse then,
//! once; the text is valid by construction, so that parse cannot fail.

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::keys;

/// The headers recorded by the scan, in slot order.
const HEADERS: [&str; 6] = [
    keys::EVENT_CATEGORY,
    keys::EVENT_NAME,
    keys::MSG_ID,
    keys::SERVER_ID,
    keys::MSG_REPLY_ID,
    keys::DEFER_RESPONSE,
];

/// A header the scan records: its index in [`HEADERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Category = 0,
    Name = 1,
    MsgId = 2,
    ServerId = 3,
    MsgReplyId = 4,
    DeferResponse = 5,
}

impl Slot {
    /// The slot of a header name, if the scan records it.
    pub fn of(key: &str) -> Option<Slot> {
        Some(match key {
            keys::EVENT_CATEGORY => Slot::Category,
            keys::EVENT_NAME => Slot::Name,
            keys::MSG_ID => Slot::MsgId,
            keys::SERVER_ID => Slot::ServerId,
            keys::MSG_REPLY_ID => Slot::MsgReplyId,
            keys::DEFER_RESPONSE => Slot::DeferResponse,
            _ => return None,
        })
    }
}

/// A string value: where it sits in the text, or its unescaped copy when it held
/// escapes (rare in headers).
#[derive(Clone, Debug)]
pub(super) enum Text {
    Span { start: usize, len: usize },
    Owned(Box<str>),
}

/// What a recorded header holds, as much as warren needs of it.
#[derive(Clone, Debug, Default)]
pub(super) enum Scalar {
    /// Not in the body.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// A string.
    Text(Text),
    /// `true` or `false`.
    Bool(bool),
    /// A number, array or object: only its JSON type is kept.
    Other(&'static str),
}

/// A received, validated envelope body.
#[derive(Clone, Debug)]
pub(super) struct Wire {
    json: Arc<str>,
    slots: [Scalar; HEADERS.len()],
    /// A Msg-ID made on receipt because the body had none (or an empty one).
    generated_msg_id: Option<Box<str>>,
    fields: OnceLock<Map<String, Value>>,
}

impl Wire {
    /// Scans `json` (a JSON object's text) once: the whole text is checked as a full parse
    /// would check it, and the recorded headers are kept. An error is serde_json's, with
    /// its line and column.
    pub fn scan(json: Arc<str>) -> Result<Wire, serde_json::Error> {
        let base = json.as_ptr() as usize;
        let mut deserializer = serde_json::Deserializer::from_str(&json);
        let slots = deserializer.deserialize_map(HeadVisitor { base })?;
        deserializer.end()?;
        Ok(Wire {
            json,
            slots,
            generated_msg_id: None,
            fields: OnceLock::new(),
        })
    }

    /// What a recorded header holds.
    pub fn scalar(&self, slot: Slot) -> &Scalar {
        &self.slots[slot as usize]
    }

    /// A recorded header's string value (`None` when absent or not a string); Msg-ID is
    /// the generated one when the body had none.
    pub fn text(&self, slot: Slot) -> Option<&str> {
        if slot == Slot::MsgId
            && let Some(generated) = &self.generated_msg_id
        {
            return Some(generated);
        }
        match self.scalar(slot) {
            // A span outside the text (never, with serde_json's borrowed strings) is none.
            Scalar::Text(Text::Span { start, len }) => {
                self.json.get(*start..start.checked_add(*len)?)
            }
            Scalar::Text(Text::Owned(text)) => Some(text),
            _ => None,
        }
    }

    /// Sets the Msg-ID made on receipt; it is part of the fields from then on.
    pub fn generate_msg_id(&mut self, msg_id: String) {
        self.generated_msg_id = Some(msg_id.into_boxed_str());
        self.fields = OnceLock::new();
    }

    /// The fields as a map, parsed on the first call.
    pub fn fields(&self) -> &Map<String, Value> {
        self.fields.get_or_init(|| self.parse())
    }

    /// Copies of the fields `keys`, from the map if it was built, else read from the text
    /// with every other value skipped; a generated Msg-ID counts as the body's. `None`:
    /// the text could not be read that way (never, as the scan checked it).
    pub fn extract<const N: usize>(&self, keys: [&str; N]) -> Option<[Option<Value>; N]> {
        if let Some(fields) = self.fields.get() {
            return Some(keys.map(|key| fields.get(key).cloned()));
        }
        let mut deserializer = serde_json::Deserializer::from_str(&self.json);
        let mut values = deserializer.deserialize_map(Extract { keys: &keys }).ok()?;
        if let Some(generated) = &self.generated_msg_id
            && let Some(at) = keys.iter().position(|key| *key == keys::MSG_ID)
        {
            values[at] = Some(Value::String(generated.to_string()));
        }
        Some(values)
    }

    /// Whether the map was built (tests: header reads must not build it).
    #[cfg(test)]
    pub fn has_fields(&self) -> bool {
        self.fields.get().is_some()
    }

    /// The fields as a map, taken out (the map is built first if it was not yet).
    pub fn take_fields(&mut self) -> Map<String, Value> {
        self.fields.take().unwrap_or_else(|| self.parse())
    }

    /// The full parse. The scan checked everything serde_json checks, so it succeeds; if
    /// it ever did not, the map holds the recorded string headers rather than nothing.
    fn parse(&self) -> Map<String, Value> {
        let mut fields = serde_json::from_str::<Map<String, Value>>(&self.json)
            .unwrap_or_else(|_| self.recorded());
        if let Some(generated) = &self.generated_msg_id {
            fields.insert(
                keys::MSG_ID.to_owned(),
                Value::String(generated.to_string()),
            );
        }
        fields
    }

    fn recorded(&self) -> Map<String, Value> {
        HEADERS
            .iter()
            .filter_map(|key| {
                let slot = Slot::of(key)?;
                let text = self.text(slot)?;
                Some(((*key).to_owned(), Value::String(text.to_owned())))
            })
            .collect()
    }
}

/// The top-level object: records the headers, checks every other value.
struct HeadVisitor {
    base: usize,
}

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = [Scalar; HEADERS.len()];

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots: [Scalar; HEADERS.len()] = Default::default();
        // A repeated key keeps its last value, as the map does.
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Some(slot) => {
                    slots[slot as usize] = map.next_value_seed(ScalarSeed { base: self.base })?
                }
                None => map.next_value_seed(Check)?,
            }
        }
        Ok(slots)
    }
}

/// The top-level object: copies the values of `keys`, skips every other value.
struct Extract<'k, const N: usize> {
    keys: &'k [&'k str; N],
}

impl<'de, const N: usize> Visitor<'de> for Extract<'_, N> {
    type Value = [Option<Value>; N];

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = [const { None }; N];
        // A repeated key keeps its last value, as the map does.
        while let Some(at) = map.next_key_seed(WantedKey { keys: self.keys })? {
            match at {
                Some(at) => values[at] = Some(map.next_value::<Value>()?),
                None => map.next_value::<de::IgnoredAny>().map(|_| ())?,
            }
        }
        Ok(values)
    }
}

/// A top-level key: its index in the wanted keys, or `None`.
struct WantedKey<'k, const N: usize> {
    keys: &'k [&'k str; N],
}

impl<'de, const N: usize> DeserializeSeed<'de> for WantedKey<'_, N> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for WantedKey<'_, N> {
    type Value = Option<usize>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.keys.iter().position(|wanted| *wanted == key))
    }
}

/// A top-level key: the slot of a recorded header, or `None`.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<Slot>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<Slot>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Slot::of(key))
    }
}

/// A recorded header's value.
struct ScalarSeed {
    base: usize,
}

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Scalar;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Scalar, E> {
        let start = (text.as_ptr() as usize).wrapping_sub(self.base);
        Ok(Scalar::Text(Text::Span {
            start,
            len: text.len(),
        }))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(Text::Owned(text.into())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }

    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(flag))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar, E> {
        Ok(Scalar::Other("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Scalar, E> {
        Ok(Scalar::Other("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other("number"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
        Check.visit_seq(seq)?;
        Ok(Scalar::Other("array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
        Check.visit_map(map)?;
        Ok(Scalar::Other("object"))
    }
}

/// Any other value: read through `deserialize_any`, as a parse into `Value` reads it
/// (so numbers out of range and nesting past serde_json's limit fail here too), and
/// dropped. Strings are borrowed, so nothing is allocated.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, _: &'de str) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Check)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

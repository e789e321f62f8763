//! AMQP topic patterns, matched locally the way RabbitMQ matches them: words separated by
//! `.`, `*` matching exactly one word (possibly empty), `#` matching zero or more words.

use std::fmt;

/// One word of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    Literal(String),
    /// `*`
    One,
    /// `#`
    Any,
}

/// A parsed routing-key pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    words: Vec<Word>,
}

/// AMQP keys are short strings: at most 255 bytes.
pub const MAX_PATTERN_LEN: usize = 255;

impl Pattern {
    /// Parses a pattern; `None` if it is longer than an AMQP key may be.
    pub fn parse(text: &str) -> Option<Pattern> {
        if text.len() > MAX_PATTERN_LEN {
            return None;
        }
        let words = text
            .split('.')
            .map(|word| match word {
                "*" => Word::One,
                "#" => Word::Any,
                literal => Word::Literal(literal.to_string()),
            })
            .collect();
        Some(Pattern {
            text: text.to_string(),
            words,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a routing key matches (walking its words once, nothing allocated).
    pub fn matches(&self, routing_key: &str) -> bool {
        let words = &self.words;
        // Greedy matching with backtracking to the last `#`, as for glob stars. The key is
        // read word by word; `rest` is what follows the current word, and the last `#`
        // remembers where it was met so that it can swallow one more word.
        let mut rest = routing_key.split('.');
        let mut key = rest.next();
        let mut w = 0;
        let mut last_any: Option<(usize, std::str::Split<'_, char>)> = None;
        while let Some(word) = key {
            match words.get(w) {
                Some(Word::Any) => {
                    last_any = Some((w, rest.clone()));
                    w += 1;
                    continue;
                }
                Some(Word::One) => {
                    w += 1;
                    key = rest.next();
                    continue;
                }
                Some(Word::Literal(literal)) if literal == word => {
                    w += 1;
                    key = rest.next();
                    continue;
                }
                _ => {}
            }
            match &mut last_any {
                Some((any_w, any_rest)) => {
                    // Let the last `#` swallow one more word and try again.
                    w = *any_w + 1;
                    key = any_rest.next();
                    rest = any_rest.clone();
                }
                None => return false,
            }
        }
        words[w..].iter().all(|word| *word == Word::Any)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        Pattern::parse(pattern).is_some_and(|p| p.matches(key))
    }

    #[test]
    fn the_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            // literals
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.x.c", false),
            // `*`: exactly one word
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.*.c", "a.b.b.c", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.*.*.*", "doc_edited.db.user.1", true),
            ("*.db.*.*", "doc_edited.db.user.1", true),
            ("*.db.*.*", "doc_edited.other.user.1", false),
            // `#`: zero or more words
            ("#", "a.b.c", true),
            ("#", "a", true),
            ("#", "", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b.a", false),
            ("#.c", "a.b.c", true),
            ("#.c", "c", true),
            ("#.c", "a.b", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.b.b.c", true),
            ("a.#.c", "a.b.b.d", false),
            ("#.b.#", "a.b.c", true),
            ("#.b.#", "b", true),
            ("#.#", "a.b", true),
            ("a.#.b.#.c", "a.x.b.y.z.c", true),
            ("a.#.b.#.c", "a.x.y.c", false),
            ("*.#", "a", true),
            ("*.#", "", true),
            ("#.*", "a.b", true),
            // empty words are words
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("a.#.b", "a..b", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            // `*` and `#` only as whole words
            ("a*", "ab", false),
            ("a*", "a*", true),
            ("a#", "a.b", false),
        ];
        for (pattern, key, expected) in table {
            assert_eq!(
                matches(pattern, key),
                *expected,
                "pattern `{pattern}` with key `{key}`"
            );
        }
    }

    #[test]
    fn overlong_patterns_are_refused() {
        assert!(Pattern::parse(&"a".repeat(255)).is_some());
        assert!(Pattern::parse(&"a".repeat(256)).is_none());
    }
}

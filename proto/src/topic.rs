//! Topic names and filters.
//!
//! A topic name is `/`-separated levels (`sensors/room1/temp`). A filter is a topic name whose
//! levels may also be `+` (exactly one level) or, as the last level only, `#` (zero or more
//! remaining levels), as in MQTT. Names are checked once, at the edge, and carried as the
//! validated [`Topic`] and [`TopicFilter`] types from then on.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest topic name or filter accepted, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;
/// The most levels a topic name or filter may have.
pub const MAX_TOPIC_LEVELS: usize = 32;

/// Why a topic name or filter was refused. Each message names the problem and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name was the empty string.
    #[error(
        "topic is empty: a topic is one or more `/`-separated levels, such as `sensors/room1/temp`"
    )]
    Empty,
    /// The name is longer than [`MAX_TOPIC_BYTES`].
    #[error("topic is {len} bytes long: at most {max} bytes are allowed")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name has more than [`MAX_TOPIC_LEVELS`] levels.
    #[error("topic has {levels} levels: at most {max} are allowed")]
    TooManyLevels {
        /// How many levels the name has.
        levels: usize,
        /// The limit.
        max: usize,
    },
    /// A level is empty (a leading, trailing or doubled `/`).
    #[error(
        "topic {topic:?} has an empty level at position {position}: levels are separated by single `/` and may not be empty"
    )]
    EmptyLevel {
        /// The name as given.
        topic: String,
        /// The 1-based position of the empty level.
        position: usize,
    },
    /// A control character (U+0000 to U+001F, U+007F to U+009F) appears in the name.
    #[error(
        "topic {topic:?} contains the control character U+{code:04X}: control characters are not allowed"
    )]
    ControlCharacter {
        /// The name as given.
        topic: String,
        /// The offending character's code point.
        code: u32,
    },
    /// `+` or `#` in a topic one publishes to.
    #[error(
        "topic {topic:?} contains the wildcard `{wildcard}`: wildcards are allowed only in subscription filters, not in a topic you publish to"
    )]
    WildcardInTopic {
        /// The name as given.
        topic: String,
        /// The wildcard found.
        wildcard: char,
    },
    /// A wildcard shares a level with other characters (`a+/b`, `x#`).
    #[error(
        "filter {filter:?} has the level {level:?}: `+` and `#` must stand alone in their level"
    )]
    WildcardNotAlone {
        /// The filter as given.
        filter: String,
        /// The offending level.
        level: String,
    },
    /// `#` somewhere other than the last level.
    #[error("filter {filter:?} has `#` before its last level: `#` may only be the last level")]
    HashNotLast {
        /// The filter as given.
        filter: String,
    },
}

/// Checks what topic names and filters have in common: length, level count, empty levels,
/// control characters.
fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: MAX_TOPIC_BYTES,
        });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(TopicError::ControlCharacter {
            topic: s.to_string(),
            code: c as u32,
        });
    }
    let levels = s.split('/').count();
    if levels > MAX_TOPIC_LEVELS {
        return Err(TopicError::TooManyLevels {
            levels,
            max: MAX_TOPIC_LEVELS,
        });
    }
    if let Some(i) = s.split('/').position(str::is_empty) {
        return Err(TopicError::EmptyLevel {
            topic: s.to_string(),
            position: i + 1,
        });
    }
    Ok(())
}

/// A validated topic name, as published to: no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Topic(String);

impl Topic {
    /// Validates `s` as a topic to publish to.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        if let Some(w) = s.chars().find(|c| *c == '+' || *c == '#') {
            return Err(TopicError::WildcardInTopic {
                topic: s.to_string(),
                wildcard: w,
            });
        }
        Ok(Topic(s.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name's levels, in order.
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl TryFrom<String> for Topic {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, TopicError> {
        Topic::new(&s)
    }
}

impl From<Topic> for String {
    fn from(t: Topic) -> String {
        t.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        Topic::new(s)
    }
}

/// A validated subscription filter: a topic name whose levels may be `+`, and whose last level
/// may be `#`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates `s` as a subscription filter.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let has_wild = level.contains('+') || level.contains('#');
            if has_wild && level.len() > 1 {
                return Err(TopicError::WildcardNotAlone {
                    filter: s.to_string(),
                    level: level.to_string(),
                });
            }
            if *level == "#" && i + 1 != levels.len() {
                return Err(TopicError::HashNotLast {
                    filter: s.to_string(),
                });
            }
        }
        Ok(TopicFilter(s.to_string()))
    }

    /// The filter as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the filter has no wildcard, so it matches exactly one topic.
    pub fn is_exact(&self) -> bool {
        !self.0.split('/').any(|l| l == "+" || l == "#")
    }

    /// Whether `topic` matches this filter: `+` matches exactly one level, a trailing `#`
    /// matches the parent level and any number of levels below it (`a/#` matches `a`).
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut f = self.0.split('/');
        let mut t = topic.levels();
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl TryFrom<String> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, TopicError> {
        TopicFilter::new(&s)
    }
}

impl From<TopicFilter> for String {
    fn from(t: TopicFilter) -> String {
        t.0
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TopicFilter {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        TopicFilter::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap_or_else(|e| panic!("{s:?} should be a valid topic: {e}"))
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap_or_else(|e| panic!("{s:?} should be a valid filter: {e}"))
    }

    #[test]
    fn valid_topics() {
        for s in [
            "a",
            "sensors/room1/temp",
            "a/b/c/d",
            "$sys/x",
            "ünï/cödé",
            "a b/c",
        ] {
            assert_eq!(t(s).as_str(), s);
        }
    }

    #[test]
    fn invalid_topics_say_why() {
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert!(matches!(
            Topic::new("a//b"),
            Err(TopicError::EmptyLevel { position: 2, .. })
        ));
        assert!(matches!(
            Topic::new("/a"),
            Err(TopicError::EmptyLevel { position: 1, .. })
        ));
        assert!(matches!(
            Topic::new("a/"),
            Err(TopicError::EmptyLevel { position: 2, .. })
        ));
        assert!(matches!(
            Topic::new("a/+/b"),
            Err(TopicError::WildcardInTopic { wildcard: '+', .. })
        ));
        assert!(matches!(
            Topic::new("a/#"),
            Err(TopicError::WildcardInTopic { wildcard: '#', .. })
        ));
        assert!(matches!(
            Topic::new("a/\u{7}"),
            Err(TopicError::ControlCharacter { code: 7, .. })
        ));
        assert!(matches!(
            Topic::new(&"x".repeat(MAX_TOPIC_BYTES + 1)),
            Err(TopicError::TooLong { .. })
        ));
        assert!(matches!(
            Topic::new(&vec!["a"; MAX_TOPIC_LEVELS + 1].join("/")),
            Err(TopicError::TooManyLevels { .. })
        ));
        let msg = Topic::new("a/+/b").map_err(|e| e.to_string()).err();
        assert!(msg.is_some_and(|m| m.contains("only in subscription filters")));
    }

    #[test]
    fn invalid_filters_say_why() {
        assert!(matches!(
            TopicFilter::new("a/#/b"),
            Err(TopicError::HashNotLast { .. })
        ));
        assert!(matches!(
            TopicFilter::new("a+/b"),
            Err(TopicError::WildcardNotAlone { .. })
        ));
        assert!(matches!(
            TopicFilter::new("a/b#"),
            Err(TopicError::WildcardNotAlone { .. })
        ));
        assert!(matches!(
            TopicFilter::new("a//+"),
            Err(TopicError::EmptyLevel { .. })
        ));
    }

    #[test]
    fn matching_examples() {
        let cases = [
            ("sensors/+/temp", "sensors/room1/temp", true),
            ("sensors/+/temp", "sensors/room1/humidity", false),
            ("sensors/+/temp", "sensors/a/b/temp", false),
            ("sensors/#", "sensors/room1/temp", true),
            ("sensors/#", "sensors", true),
            ("sensors/#", "actuators/x", false),
            ("#", "anything/at/all", true),
            ("+", "one", true),
            ("+", "one/two", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("+/+", "a/b", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(f(filter).matches(&t(topic)), want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn serde_validates() {
        let ok: Result<Topic, _> = serde_json::from_str("\"a/b\"");
        assert!(ok.is_ok());
        let bad: Result<Topic, _> = serde_json::from_str("\"a/+\"");
        assert!(bad.is_err());
    }

    fn level() -> impl Strategy<Value = String> {
        "[a-c]{1,2}"
    }

    fn topic_strategy() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(level(), 1..6)
    }

    proptest! {
        #[test]
        fn exact_filter_matches_only_itself(a in topic_strategy(), b in topic_strategy()) {
            let ta = t(&a.join("/"));
            let tb = t(&b.join("/"));
            let fa = f(&a.join("/"));
            prop_assert!(fa.matches(&ta));
            prop_assert_eq!(fa.matches(&tb), a == b);
        }

        #[test]
        fn plus_matches_any_single_level(a in topic_strategy(), i in 0usize..6) {
            let i = i % a.len();
            let mut filter = a.clone();
            filter[i] = "+".to_string();
            prop_assert!(f(&filter.join("/")).matches(&t(&a.join("/"))));
        }

        #[test]
        fn hash_matches_exactly_the_subtree(a in topic_strategy(), b in topic_strategy(), cut in 0usize..6) {
            let cut = cut % (a.len() + 1);
            let mut prefix: Vec<String> = a[..cut].to_vec();
            prefix.push("#".to_string());
            let filter = f(&prefix.join("/"));
            prop_assert!(filter.matches(&t(&a.join("/"))));
            let b_in_subtree = b.len() >= cut && b[..cut] == a[..cut];
            prop_assert_eq!(filter.matches(&t(&b.join("/"))), b_in_subtree);
        }

        #[test]
        fn validation_never_panics(s in ".{0,300}") {
            let _ = Topic::new(&s);
            let _ = TopicFilter::new(&s);
        }

        #[test]
        fn a_valid_topic_is_a_valid_exact_filter(a in topic_strategy()) {
            let s = a.join("/");
            prop_assert!(Topic::new(&s).is_ok());
            let filter = f(&s);
            prop_assert!(filter.is_exact());
        }
    }
}

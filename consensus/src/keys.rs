//! Every key of every group's state machine: the one place they are built and parsed.
//!
//! A group's state is one sorted key-value map. Client keys (the replicated KV of `/v1/kv`)
//! are [`UserKey`]s; every other record lives under an internal key, which starts with the
//! control character U+0001 that client keys may not start with and topic names and internal
//! names may not contain. Each kind of internal record is a [`Table`]: it knows its prefix,
//! builds a key from typed parts, parses a key back into those parts (and refuses a key that
//! is not its own), and encodes and decodes the value it holds.
//!
//! ```text
//!   table                 key                              value              group
//!   TOPIC_META            \x01t/{topic}                    TopicMeta          data
//!   EVENTS                \x01e/{topic}\x00{offset:020}    StoredEvent        data
//!   SUBSCRIPTION_CURSORS  \x01c/{name}\x00{topic}          next offset (u64)  data
//!   SUBSCRIPTION_STARTS   \x01s/{name}                     start (text)       data
//!   DEDUP                 \x01w/{expiry:020}\x00{id}       (empty)            data
//!   TRIGGER_CURSORS       \x01x/{trigger uid}\x00{topic}   next offset (u64)  data
//!   RETAINED              \x01r/{topic}                    retained message   data
//!   MQTT_SESSIONS         \x01m/{client id}                MQTT session       data
//!   STATE                 \x01f/{function}\x00{key}        state value        data
//!   STATE_VERSIONS        \x01v/{function}                 version (u64)      data
//!   OUTBOX                \x01o/{producer}\x00{seq:020}     OutboxEntry        data (source)
//!   OUTBOX_META           \x01q/{producer}                 OutboxMeta         data (source)
//!   PRODUCER_SEQS         \x01p/{producer}                 last seq (u64)     data (target)
//!   SETTINGS              \x01S/{filter}                   TopicSettings      metadata
//!   FUNCTIONS             \x01F/{function}                 FunctionSpec       metadata
//!   MODULES               \x01B/{hash}                     module bytes       metadata
//!   TRIGGERS              \x01T/{trigger}                  TriggerSpec        metadata
//!   placements()          \x01P/{function}                 placement (node's) metadata
//!   measurements()        \x01M/{function}\x00{peer}       measurement        metadata
//!   REMOVED               \x01R/{peer}                     (marker)           metadata
//!   ADMITTED              \x01A/{peer}                     (marker)           metadata
//!   TRIGGER_OWNERS        \x01O/{trigger uid}              TriggerOwner       metadata
//!   TOKEN_KEY             \x01K/{algorithm}                public token key   metadata
//!   TOKENS                \x01I/{token id}                 issued token       metadata
//!   REVOKED_TOKENS        \x01X/{token id}                 expiry (u64)       metadata
//!   SHARD_MAP             \x01D/map, \x01D/previous        ShardMap (wire)    metadata
//! ```
//!
//! The byte layout is the on-disk format (`canal-raft/5`): changing a prefix or a separator
//! here changes what existing databases mean, so it needs a new format marker.
//!
//! Offsets and expiries are written as 20 decimal digits, so keys sort by them. The parts
//! before a `\x00` separator never contain one (topic names and internal names have no
//! control characters; [`crate::InternalKey::check`] and the apply enforce it), so a key
//! parses back into exactly the parts it was built from, and a prefix scan of one topic
//! (`\x01e/a\x00`) never reaches a topic whose name extends it (`a/b`, `ab`).

use canal_proto::function::{FunctionSpec, TriggerSpec};
use canal_proto::settings::TopicSettings;
use canal_proto::wire::{self, WireError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::marker::PhantomData;

use crate::topics::{StoredEvent, TopicMeta};

/// The first character of every internal key. Client keys may not start with it, and topic
/// names and internal names may not contain control characters, so client keys cannot
/// collide with internal keys.
pub const INTERNAL_PREFIX: char = '\u{1}';

/// Whether `key` is in the internal keyspace, which only typed operations write.
pub fn is_internal(key: &str) -> bool {
    key.starts_with(INTERNAL_PREFIX)
}

/// The separator between the parts of a two-part key.
const SEP: char = '\u{0}';

/// The digits an offset or an expiry is written with, so keys sort by it.
const DIGITS: usize = 20;

/// How a table's keys are shaped: the typed parts a key is built from and parsed into.
pub trait Shape {
    /// The parts, owned (what [`Table::parse`] returns).
    type Key: fmt::Debug + Clone + PartialEq;
    /// The parts, borrowed (what [`Table::key`] takes).
    type Ref<'a>: Copy;
    /// The key text after the table's prefix.
    fn build(parts: Self::Ref<'_>, out: &mut String);
    /// The parts of `rest` (the key without the prefix), if it has this shape.
    fn parse(rest: &str) -> Option<Self::Key>;
}

/// A shape whose keys start with a name and a `\x00`: all keys of one name (one topic's
/// events, one function's state) are one prefix range.
pub trait Grouped: Shape {}

/// One name: `{prefix}{name}`.
#[derive(Debug)]
pub struct Name;

impl Shape for Name {
    type Key = String;
    type Ref<'a> = &'a str;
    fn build(name: &str, out: &mut String) {
        out.push_str(name);
    }
    fn parse(rest: &str) -> Option<String> {
        (!rest.contains(SEP)).then(|| rest.to_string())
    }
}

/// Two names: `{prefix}{first}\x00{second}`; the second may hold anything.
#[derive(Debug)]
pub struct Pair;

impl Shape for Pair {
    type Key = (String, String);
    type Ref<'a> = (&'a str, &'a str);
    fn build((first, second): (&str, &str), out: &mut String) {
        out.push_str(first);
        out.push(SEP);
        out.push_str(second);
    }
    fn parse(rest: &str) -> Option<(String, String)> {
        let (first, second) = rest.split_once(SEP)?;
        Some((first.to_string(), second.to_string()))
    }
}

impl Grouped for Pair {}

/// A name and an offset: `{prefix}{name}\x00{offset:020}`, sorted by offset within a name.
#[derive(Debug)]
pub struct Offset;

impl Shape for Offset {
    type Key = (String, u64);
    type Ref<'a> = (&'a str, u64);
    fn build((name, offset): (&str, u64), out: &mut String) {
        out.push_str(name);
        out.push(SEP);
        out.push_str(&format!("{offset:0DIGITS$}"));
    }
    fn parse(rest: &str) -> Option<(String, u64)> {
        let (name, digits) = rest.split_once(SEP)?;
        Some((name.to_string(), parse_digits(digits)?))
    }
}

impl Grouped for Offset {}

/// A time and an id: `{prefix}{expiry:020}\x00{id}`, sorted by time, so the records due by a
/// time are one prefix range; the id may hold anything.
#[derive(Debug)]
pub struct Expiry;

impl Shape for Expiry {
    type Key = (u64, String);
    type Ref<'a> = (u64, &'a str);
    fn build((expiry, id): (u64, &str), out: &mut String) {
        out.push_str(&format!("{expiry:0DIGITS$}"));
        out.push(SEP);
        out.push_str(id);
    }
    fn parse(rest: &str) -> Option<(u64, String)> {
        let digits = rest.get(..DIGITS)?;
        let id = rest.get(DIGITS..)?.strip_prefix(SEP)?;
        Some((parse_digits(digits)?, id.to_string()))
    }
}

/// Exactly [`DIGITS`] decimal digits as a number.
fn parse_digits(digits: &str) -> Option<u64> {
    if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How a table's values are stored.
pub trait Codec {
    /// The value as callers see it.
    type Value;
    /// The stored bytes of `value`.
    fn encode(value: &Self::Value) -> Result<Vec<u8>, WireError>;
    /// The value stored as `bytes`.
    fn decode(bytes: &[u8]) -> Result<Self::Value, WireError>;
}

/// Values stored as they are (module bytes, function state, markers).
#[derive(Debug)]
pub struct Raw;

impl Codec for Raw {
    type Value = Vec<u8>;
    fn encode(value: &Vec<u8>) -> Result<Vec<u8>, WireError> {
        Ok(value.clone())
    }
    fn decode(bytes: &[u8]) -> Result<Vec<u8>, WireError> {
        Ok(bytes.to_vec())
    }
}

/// Values stored with [`canal_proto::wire`] (a version byte and bincode).
pub struct Wire<T>(PhantomData<fn() -> T>);

impl<T: Serialize + DeserializeOwned> Codec for Wire<T> {
    type Value = T;
    fn encode(value: &T) -> Result<Vec<u8>, WireError> {
        wire::encode(value)
    }
    /// No length cap beyond the bytes there are: a record was bounded by the entry that wrote
    /// it, and a damaged one is an error, never a huge allocation.
    fn decode(bytes: &[u8]) -> Result<T, WireError> {
        wire::decode_with_limit(bytes, usize::MAX)
    }
}

/// The records of a table as a scan returns them: the parts of each key, and its value.
pub type Records<S, C> = Vec<(<S as Shape>::Key, <C as Codec>::Value)>;

/// One kind of internal record: its prefix, the shape of its keys and how its values are
/// stored.
pub struct Table<S, C> {
    prefix: &'static str,
    what: &'static str,
    _shape: PhantomData<fn() -> (S, C)>,
}

impl<S, C> Table<S, C> {
    const fn new(prefix: &'static str, what: &'static str) -> Self {
        Table {
            prefix,
            what,
            _shape: PhantomData,
        }
    }

    /// The prefix every key of the table starts with.
    pub const fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// What the table holds, for errors and logs ("function specs").
    pub const fn what(&self) -> &'static str {
        self.what
    }
}

impl<S: Shape, C: Codec> Table<S, C> {
    /// The key of the record named by `parts`.
    pub fn key(&self, parts: S::Ref<'_>) -> String {
        let mut out = String::from(self.prefix);
        S::build(parts, &mut out);
        out
    }

    /// The parts `raw` was built from, if it is a key of this table (`None` for any other
    /// key, internal or not).
    pub fn parse(&self, raw: &str) -> Option<S::Key> {
        S::parse(raw.strip_prefix(self.prefix)?)
    }

    /// The stored bytes of `value`.
    pub fn encode(&self, value: &C::Value) -> Result<Vec<u8>, WireError> {
        C::encode(value)
    }

    /// The value stored as `bytes`.
    pub fn decode(&self, bytes: &[u8]) -> Result<C::Value, WireError> {
        C::decode(bytes)
    }
}

impl<S: Grouped, C> Table<S, C> {
    /// The prefix of every key whose first part is `first` (one topic's events, one
    /// function's state), and of no other.
    pub fn prefix_of(&self, first: &str) -> String {
        let mut out = String::from(self.prefix);
        out.push_str(first);
        out.push(SEP);
        out
    }
}

impl<S, C> fmt::Debug for Table<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.what, self.prefix)
    }
}

/// Where a topic's log starts and ends (data group).
pub const TOPIC_META: Table<Name, Wire<TopicMeta>> = Table::new("\u{1}t/", "topic metadata");
/// One event of a topic's log, by topic and offset (data group).
pub const EVENTS: Table<Offset, Wire<StoredEvent>> = Table::new("\u{1}e/", "topic events");
/// The next offset of a durable subscription on a topic, by subscription and topic (data
/// group).
pub const SUBSCRIPTION_CURSORS: Table<Pair, Wire<u64>> =
    Table::new("\u{1}c/", "durable subscription cursors");
/// Where a durable subscription started (`earliest`, `offset:N` or `time:MS`, data group).
pub const SUBSCRIPTION_STARTS: Table<Name, Raw> =
    Table::new("\u{1}s/", "durable subscription starts");
/// A publish id to forget once the state machine's clock passes the expiry, by expiry and
/// request id (data group).
pub const DEDUP: Table<Expiry, Raw> = Table::new("\u{1}w/", "publish dedup ids");
/// The next offset of a trigger on a topic, by trigger uid and topic (data group).
pub const TRIGGER_CURSORS: Table<Pair, Wire<u64>> = Table::new("\u{1}x/", "trigger cursors");
/// A topic's MQTT retained message, by topic (data group; the value is the MQTT layer's
/// own versioned encoding).
pub const RETAINED: Table<Name, Raw> = Table::new("\u{1}r/", "retained messages");
/// A persistent MQTT session, by client id (data group; the value is the MQTT layer's own
/// versioned encoding).
pub const MQTT_SESSIONS: Table<Name, Raw> = Table::new("\u{1}m/", "MQTT sessions");
/// One entry of a function's state, by function and key (data group).
pub const STATE: Table<Pair, Raw> = Table::new("\u{1}f/", "function state");
/// The version of a function's state, raised by every change (data group).
pub const STATE_VERSIONS: Table<Name, Wire<u64>> = Table::new("\u{1}v/", "function state versions");
/// An output waiting in its function's group for delivery to another group, by producer
/// and sequence number (data group, the source).
pub const OUTBOX: Table<Offset, Wire<crate::functions::OutboxEntry>> =
    Table::new("\u{1}o/", "outbox entries");
/// Where each producer's outbox stands (data group, the source).
pub const OUTBOX_META: Table<Name, Wire<crate::functions::OutboxMeta>> =
    Table::new("\u{1}q/", "outbox positions");
/// The last sequence number of each producer applied here by a delivery (data group, the
/// target).
pub const PRODUCER_SEQS: Table<Name, Wire<u64>> = Table::new("\u{1}p/", "producer sequences");
/// The settings of a topic or filter (metadata group).
pub const SETTINGS: Table<Name, Wire<TopicSettings>> = Table::new("\u{1}S/", "topic settings");
/// A function's spec (metadata group).
pub const FUNCTIONS: Table<Name, Wire<FunctionSpec>> = Table::new("\u{1}F/", "function specs");
/// A module's bytes, by content hash (metadata group).
pub const MODULES: Table<Name, Raw> = Table::new("\u{1}B/", "modules");
/// A trigger's spec (metadata group).
pub const TRIGGERS: Table<Name, Wire<TriggerSpec>> = Table::new("\u{1}T/", "trigger specs");
/// The tombstone of a peer removed from the cluster for good (metadata group).
pub const REMOVED: Table<Name, Raw> = Table::new("\u{1}R/", "removed peers");
/// A peer admitted by hand (metadata group).
pub const ADMITTED: Table<Name, Raw> = Table::new("\u{1}A/", "admitted peers");
/// Whose publish rights a trigger's function has, by trigger uid (metadata group).
pub const TRIGGER_OWNERS: Table<Name, Wire<canal_proto::function::TriggerOwner>> =
    Table::new("\u{1}O/", "trigger owners");
/// The public half of the cluster's token signing key, by algorithm (metadata group); set
/// once, by the node that founds the cluster (the apply refuses to change it).
pub const TOKEN_KEY: Table<Name, Raw> = Table::new("\u{1}K/", "token keys");
/// What an issued token says (its claims, never the token itself), by token id (metadata
/// group); the auth layer owns the value's format.
pub const TOKENS: Table<Name, Raw> = Table::new("\u{1}I/", "issued tokens");
/// A revoked token id, with the token's expiry (ms), after which the record may go
/// (metadata group).
pub const REVOKED_TOKENS: Table<Name, Wire<u64>> = Table::new("\u{1}X/", "revoked tokens");

/// The cluster's shard map (metadata group): [`SHARD_MAP_CURRENT`] holds the committed
/// [`canal_proto::shards::ShardMap`] (its bounded [`canal_proto::shards::ShardMap::decode`]
/// reads it), [`SHARD_MAP_PREVIOUS`] the one it replaced, so every replica can tell the moves
/// between them. Only [`crate::InternalKey::ShardMap`] writes it, and the apply moves the old
/// map to `previous` itself.
pub const SHARD_MAP: Table<Name, Raw> = Table::new("\u{1}D/", "shard maps");
/// The name of the committed shard map in [`SHARD_MAP`].
pub const SHARD_MAP_CURRENT: &str = "map";
/// The name of the shard map the committed one replaced, in [`SHARD_MAP`].
pub const SHARD_MAP_PREVIOUS: &str = "previous";

/// A function's committed placement (metadata group); the placer owns the value's type.
pub const fn placements<V>() -> Table<Name, Wire<V>> {
    Table::new("\u{1}P/", "placements")
}

/// One peer's execution-time measurement of a function, by function and peer (metadata
/// group); the placer owns the value's type.
pub const fn measurements<V>() -> Table<Pair, Wire<V>> {
    Table::new("\u{1}M/", "measurements")
}

/// Why a key is refused as a [`UserKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {key:?} is in the internal keyspace (it starts with U+0001): client keys may be any text that does not start with it"
)]
pub struct InternalKeyRefused {
    /// The key refused.
    pub key: String,
}

/// A key of the replicated KV (`/v1/kv`): any text that does not start with U+0001, so it can
/// never name an internal record. Reading and writing client keys goes through this type
/// ([`crate::StateMachine::get`], [`crate::Consensus::read`], [`UserKey::put`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(String);

impl UserKey {
    /// `key` as a client key, refused if it is in the internal keyspace.
    pub fn new(key: impl Into<String>) -> Result<UserKey, InternalKeyRefused> {
        let key = key.into();
        if is_internal(&key) {
            return Err(InternalKeyRefused { key });
        }
        Ok(UserKey(key))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The operation that sets the key to `value`.
    pub fn put(&self, value: Vec<u8>) -> crate::Op {
        crate::Op::Put {
            key: self.0.clone(),
            value,
        }
    }

    /// The operation that removes the key.
    pub fn delete(&self) -> crate::Op {
        crate::Op::Delete {
            key: self.0.clone(),
        }
    }

    /// The operation that adds `delta` to the number the key holds.
    pub fn add(&self, delta: i64) -> crate::Op {
        crate::Op::Add {
            key: self.0.clone(),
            delta,
        }
    }
}

impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for UserKey {
    type Error = InternalKeyRefused;
    fn try_from(key: &str) -> Result<UserKey, InternalKeyRefused> {
        UserKey::new(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    /// A table's prefix, and whether a raw key parses as one of its keys.
    type Parser = (&'static str, Box<dyn Fn(&str) -> bool>);

    /// Every table's parser.
    fn parsers() -> Vec<Parser> {
        fn p<S: Shape + 'static, C: Codec + 'static>(t: Table<S, C>) -> Parser {
            (t.prefix(), Box::new(move |k| t.parse(k).is_some()))
        }
        vec![
            p(TOPIC_META),
            p(EVENTS),
            p(SUBSCRIPTION_CURSORS),
            p(SUBSCRIPTION_STARTS),
            p(DEDUP),
            p(TRIGGER_CURSORS),
            p(RETAINED),
            p(MQTT_SESSIONS),
            p(STATE),
            p(STATE_VERSIONS),
            p(OUTBOX),
            p(OUTBOX_META),
            p(PRODUCER_SEQS),
            p(SETTINGS),
            p(FUNCTIONS),
            p(MODULES),
            p(TRIGGERS),
            p(REMOVED),
            p(ADMITTED),
            p(TRIGGER_OWNERS),
            p(TOKEN_KEY),
            p(TOKENS),
            p(REVOKED_TOKENS),
            p(SHARD_MAP),
            p(placements::<u64>()),
            p(measurements::<u64>()),
        ]
    }

    /// Names as they may appear in keys: `\0`-free unicode, `/` included, empty allowed.
    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}|[a/b]{0,6}"
    }

    /// Free text (a function state key, a request id): anything, `\0` included.
    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,8}|[\\x00a/]{0,6}"
    }

    fn runner(cases: u32) -> TestRunner {
        TestRunner::new_with_rng(
            Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &[12; 32]),
        )
    }

    /// Checks that `key` parses back as `back` in its own table and in no other.
    fn owned_by_one(key: &str, prefix: &str) -> Result<(), TestCaseError> {
        prop_assert!(is_internal(key), "{key:?} is not internal");
        let owners: Vec<&str> = parsers()
            .into_iter()
            .filter(|(_, parse)| parse(key))
            .map(|(p, _)| p)
            .collect();
        prop_assert_eq!(owners, vec![prefix], "owners of {:?}", key);
        Ok(())
    }

    #[test]
    fn every_prefix_is_distinct_internal_and_slash_terminated() {
        let prefixes: Vec<&str> = parsers().into_iter().map(|(p, _)| p).collect();
        let mut unique = prefixes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), prefixes.len(), "{prefixes:?}");
        for p in prefixes {
            assert!(
                is_internal(p) && p.ends_with('/') && p.chars().count() == 3,
                "{p:?}"
            );
        }
    }

    #[test]
    fn the_byte_layout_is_the_disk_format_of_canal_raft_3() {
        let n = 7;
        let layout = [
            (TOPIC_META.key("a/b"), "\u{1}t/a/b"),
            (EVENTS.key(("t", n)), "\u{1}e/t\u{0}00000000000000000007"),
            (SUBSCRIPTION_CURSORS.key(("s", "t")), "\u{1}c/s\u{0}t"),
            (SUBSCRIPTION_STARTS.key("s"), "\u{1}s/s"),
            (
                DEDUP.key((n, "pub/t/i")),
                "\u{1}w/00000000000000000007\u{0}pub/t/i",
            ),
            (TRIGGER_CURSORS.key(("u", "t")), "\u{1}x/u\u{0}t"),
            (STATE.key(("f", "k")), "\u{1}f/f\u{0}k"),
            (STATE_VERSIONS.key("f"), "\u{1}v/f"),
            (
                OUTBOX.key(("1:f:2", n)),
                "\u{1}o/1:f:2\u{0}00000000000000000007",
            ),
            (OUTBOX_META.key("1:f:2"), "\u{1}q/1:f:2"),
            (PRODUCER_SEQS.key("1:f:2"), "\u{1}p/1:f:2"),
            (SETTINGS.key("a/#"), "\u{1}S/a/#"),
            (FUNCTIONS.key("f"), "\u{1}F/f"),
            (MODULES.key("h"), "\u{1}B/h"),
            (TRIGGERS.key("g"), "\u{1}T/g"),
            (placements::<u64>().key("f"), "\u{1}P/f"),
            (measurements::<u64>().key(("f", "p")), "\u{1}M/f\u{0}p"),
            (REMOVED.key("p"), "\u{1}R/p"),
            (ADMITTED.key("p"), "\u{1}A/p"),
            (SHARD_MAP.key(SHARD_MAP_CURRENT), "\u{1}D/map"),
            (SHARD_MAP.key(SHARD_MAP_PREVIOUS), "\u{1}D/previous"),
        ];
        for (built, disk) in layout {
            assert_eq!(built, disk);
        }
    }

    #[test]
    fn keys_round_trip_through_their_own_table_only() {
        let mut r = runner(4096);
        r.run(
            &(name(), name(), text(), any::<u64>()),
            |(a, b, free, n)| {
                macro_rules! one {
                    ($t:expr, $parts:expr, $back:expr) => {{
                        let t = $t;
                        let k = t.key($parts);
                        prop_assert_eq!(t.parse(&k), Some($back));
                        owned_by_one(&k, t.prefix())?;
                    }};
                }
                one!(TOPIC_META, &a, a.clone());
                one!(SUBSCRIPTION_STARTS, &a, a.clone());
                one!(STATE_VERSIONS, &a, a.clone());
                one!(OUTBOX_META, &a, a.clone());
                one!(PRODUCER_SEQS, &a, a.clone());
                one!(OUTBOX, (&a, n), (a.clone(), n));
                one!(SETTINGS, &a, a.clone());
                one!(FUNCTIONS, &a, a.clone());
                one!(MODULES, &a, a.clone());
                one!(TRIGGERS, &a, a.clone());
                one!(REMOVED, &a, a.clone());
                one!(ADMITTED, &a, a.clone());
                one!(RETAINED, &a, a.clone());
                one!(MQTT_SESSIONS, &a, a.clone());
                one!(SHARD_MAP, &a, a.clone());
                one!(placements::<u64>(), &a, a.clone());
                one!(EVENTS, (&a, n), (a.clone(), n));
                one!(SUBSCRIPTION_CURSORS, (&a, &b), (a.clone(), b.clone()));
                one!(TRIGGER_CURSORS, (&a, &b), (a.clone(), b.clone()));
                one!(measurements::<u64>(), (&a, &b), (a.clone(), b.clone()));
                one!(STATE, (&a, &free), (a.clone(), free.clone()));
                one!(DEDUP, (n, &free), (n, free.clone()));
                Ok(())
            },
        )
        .unwrap();
    }

    #[test]
    fn user_keys_are_never_internal_and_parse_in_no_table() {
        runner(4096)
            .run(&text(), |k| {
                match UserKey::new(k.clone()) {
                    Ok(u) => {
                        prop_assert!(!is_internal(u.as_str()));
                        prop_assert!(parsers().iter().all(|(_, parse)| !parse(u.as_str())));
                    }
                    Err(e) => prop_assert!(is_internal(&e.key)),
                }
                Ok(())
            })
            .unwrap();
        let e = UserKey::new(FUNCTIONS.key("f")).unwrap_err();
        assert!(e.to_string().contains("U+0001"), "{e}");
        assert_eq!(
            UserKey::new("a").unwrap().put(b"1".to_vec()),
            crate::Op::Put {
                key: "a".into(),
                value: b"1".to_vec()
            }
        );
    }

    #[test]
    fn event_keys_sort_by_offset() {
        runner(2048)
            .run(&(name(), any::<u64>(), any::<u64>()), |(t, x, y)| {
                let (kx, ky) = (EVENTS.key((&t, x)), EVENTS.key((&t, y)));
                prop_assert_eq!(kx.cmp(&ky), x.cmp(&y));
                let (dx, dy) = (DEDUP.key((x, "b")), DEDUP.key((y, "a")));
                prop_assert_eq!(dx.cmp(&dy), x.cmp(&y).then(std::cmp::Ordering::Greater));
                Ok(())
            })
            .unwrap();
        assert!(EVENTS.key(("t", 9)) < EVENTS.key(("t", 10)));
        assert!(
            EVENTS
                .key(("t", u64::MAX))
                .starts_with(&EVENTS.prefix_of("t"))
        );
    }

    #[test]
    fn one_topics_prefix_never_reaches_a_topic_that_extends_its_name() {
        for (a, b) in [("a", "a/b"), ("a", "ab"), ("a/b", "a/bc"), ("", "a")] {
            for (mine, other) in [(a, b), (b, a)] {
                let prefix = EVENTS.prefix_of(mine);
                assert!(
                    !EVENTS.key((other, 0)).starts_with(&prefix),
                    "{mine} {other}"
                );
                assert!(EVENTS.key((mine, 0)).starts_with(&prefix));
                let prefix = STATE.prefix_of(mine);
                assert!(!STATE.key((other, "")).starts_with(&prefix));
            }
        }
        runner(2048)
            .run(&(name(), name(), any::<u64>()), |(a, b, n)| {
                prop_assert_eq!(
                    EVENTS.key((&b, n)).starts_with(&EVENTS.prefix_of(&a)),
                    a == b
                );
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn foreign_and_malformed_keys_parse_in_no_table() {
        for raw in [
            "",
            "t/x",
            "\u{1}",
            "\u{1}e/t",
            "\u{1}e/t\u{0}12",
            "\u{1}e/t\u{0}0000000000000000000x",
            "\u{1}e/t\u{0}99999999999999999999",
            "\u{1}w/123\u{0}id",
            "\u{1}w/00000000000000000001id",
            "\u{1}c/name-without-separator",
            "\u{1}t/a\u{0}b",
            "\u{1}Z/unknown",
        ] {
            let owners: Vec<&str> = parsers()
                .into_iter()
                .filter(|(_, parse)| parse(raw))
                .map(|(p, _)| p)
                .collect();
            assert!(owners.is_empty(), "{raw:?} parsed in {owners:?}");
        }
    }

    #[test]
    fn values_round_trip_and_damage_is_an_error() {
        let meta = TopicMeta {
            first: 1,
            next: 5,
            bytes: 9,
        };
        let bytes = TOPIC_META.encode(&meta).unwrap();
        assert_eq!(TOPIC_META.decode(&bytes).unwrap(), meta);
        assert!(TOPIC_META.decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(TRIGGER_CURSORS.decode(&[]).is_err());
        assert_eq!(MODULES.decode(b"\0raw").unwrap(), b"\0raw".to_vec());
    }
}

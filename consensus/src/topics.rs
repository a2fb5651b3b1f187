//! Durable topic logs inside a data group's state machine.
//!
//! A topic's events live under internal keys that client keys cannot collide with (they
//! start with the control character U+0001, which client keys and topic names may not
//! contain), so they are snapshotted, digested and replicated with the rest of the state:
//!
//! ```text
//!   \x01t/{topic}                 TopicMeta { first, next }
//!   \x01e/{topic}\x00{offset:020} StoredEvent
//!   \x01c/{name}\x00{topic}        next offset of durable subscription {name}
//!   \x01s/{name}                  where durable subscription {name} started
//!   \x01S/{filter}                TopicSettings (metadata group)
//!   \x01w/{expiry:020}\x00{id}     a publish id to forget once the clock passes {expiry}
//! ```
//!
//! Times are the state machine's clock (the leader's stamp on the entry, never going
//! backwards; see [`crate::store`]), so every replica stores the same times, forgets the
//! same ids and trims the same events.
//!
//! Offsets start at 0 and grow by one per event; retention drops the oldest events.

use serde::{Deserialize, Serialize};

/// A publish as replicated: everything an event is, decided by the node that accepted it,
/// except its time, which is the entry's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOp {
    /// The topic (validated by the node before proposing).
    pub topic: String,
    /// The publisher's message id, if it gave one.
    pub id: Option<String>,
    /// Custom headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    #[serde(with = "canal_proto::wire::bytes")]
    pub payload: Vec<u8>,
    /// What the topic's log keeps, and how long the publish's id is remembered, as its
    /// settings said when the publish was accepted.
    pub retention: canal_proto::settings::Retention,
}

/// Where a topic's log starts and ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// The oldest offset still stored.
    pub first: u64,
    /// The offset the next event gets.
    pub next: u64,
    /// The payload bytes of the events stored.
    pub bytes: u64,
}

/// One event of a topic's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Its offset in the topic.
    pub offset: u64,
    /// When it was applied: the state machine's clock (the leader's stamp), ms since the
    /// Unix epoch.
    pub time_ms: u64,
    /// The publisher's message id.
    pub id: Option<String>,
    /// Custom headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    #[serde(with = "canal_proto::wire::bytes")]
    pub payload: Vec<u8>,
}

/// The key of a topic's metadata.
pub fn meta_key(topic: &str) -> String {
    format!("\u{1}t/{topic}")
}

/// The prefix of every topic's metadata key.
pub const META_PREFIX: &str = "\u{1}t/";

/// The key of one event.
pub fn event_key(topic: &str, offset: u64) -> String {
    format!("\u{1}e/{topic}\u{0}{offset:020}")
}

/// The prefix of a topic's event keys.
pub fn event_prefix(topic: &str) -> String {
    format!("\u{1}e/{topic}\u{0}")
}

/// The key of a durable subscription's cursor on a topic.
pub fn cursor_key(name: &str, topic: &str) -> String {
    format!("\u{1}c/{name}\u{0}{topic}")
}

/// The key of the settings of a topic or filter (metadata group).
pub fn settings_key(filter: &str) -> String {
    crate::types::InternalKey::Settings(filter.to_string()).key()
}

/// The prefix of every settings key.
pub const SETTINGS_PREFIX: &str = crate::types::SETTINGS_PREFIX;

/// The key where durable subscription `name` notes where it started (data group).
pub fn subscription_key(name: &str) -> String {
    crate::types::InternalKey::Subscription(name.to_string()).key()
}

/// How long a publisher's message id is remembered by default: a publish retried within
/// this window with the same id is stored once. A topic setting may shorten it.
pub const DEDUP_WINDOW_MS: u64 = canal_proto::settings::DEFAULT_DEDUP_WINDOW_MS;

/// The prefix of the keys that note until when publish ids are remembered.
pub const DEDUP_PREFIX: &str = "\u{1}w/";

/// The key noting that request `id`, a publish, is remembered until the state machine's
/// clock passes `expiry_ms`. Ordered by expiry, so the expired ones are a prefix.
pub fn dedup_key(expiry_ms: u64, id: &str) -> String {
    format!("{DEDUP_PREFIX}{expiry_ms:020}\u{0}{id}")
}

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
//!   \x01S/{filter}                TopicSettings (metadata group)
//!   \x01w/{time:020}\x00{id}       a publish id to forget after the dedup window
//! ```
//!
//! Offsets start at 0 and grow by one per event; retention drops the oldest events.

use serde::{Deserialize, Serialize};

/// A publish as replicated: everything an event is, decided by the node that accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOp {
    /// The topic (validated by the node before proposing).
    pub topic: String,
    /// The publisher's message id, if it gave one.
    pub id: Option<String>,
    /// Custom headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    #[serde(with = "crate::bytes")]
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch when the node accepted the publish.
    pub time_ms: u64,
    /// What the topic's log keeps, as its settings said when the publish was accepted.
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
    /// When it was accepted, ms since the Unix epoch.
    pub time_ms: u64,
    /// The publisher's message id.
    pub id: Option<String>,
    /// Custom headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    #[serde(with = "crate::bytes")]
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
    format!("\u{1}S/{filter}")
}

/// The prefix of every settings key.
pub const SETTINGS_PREFIX: &str = "\u{1}S/";

/// How long a publisher's message id is remembered: a publish retried within this window
/// with the same id is stored once.
pub const DEDUP_WINDOW_MS: u64 = 2 * 60 * 1000;

/// The prefix of the keys that note when publish ids were applied.
pub const DEDUP_PREFIX: &str = "\u{1}w/";

/// The key noting that request `id`, a publish accepted at `time_ms`, was applied.
pub fn dedup_key(time_ms: u64, id: &str) -> String {
    format!("{DEDUP_PREFIX}{time_ms:020}\u{0}{id}")
}

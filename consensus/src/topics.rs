//! Durable topic logs inside a data group's state machine.
//!
//! A topic's events live under internal keys that client keys cannot collide with, so they
//! are snapshotted, digested and replicated with the rest of the state. The keys are the
//! [`crate::keys`] tables [`TOPIC_META`](crate::keys::TOPIC_META),
//! [`EVENTS`](crate::keys::EVENTS), [`SUBSCRIPTION_CURSORS`](crate::keys::SUBSCRIPTION_CURSORS),
//! [`SUBSCRIPTION_STARTS`](crate::keys::SUBSCRIPTION_STARTS), [`DEDUP`](crate::keys::DEDUP)
//! and, in the metadata group, [`SETTINGS`](crate::keys::SETTINGS); which data group holds a
//! topic is [`crate::routing::group_of`].
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

/// How long a publisher's message id is remembered by default: a publish retried within
/// this window with the same id is stored once. A topic setting may shorten it.
pub const DEDUP_WINDOW_MS: u64 = canal_proto::settings::DEFAULT_DEDUP_WINDOW_MS;

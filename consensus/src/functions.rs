//! Functions, triggers and their effects inside the groups' state machines.
//!
//! The metadata group holds what users declare (written with [`crate::Op::Internal`] and
//! the [`crate::InternalKey`] that names each record); a data group
//! ([`crate::routing::group_of_function`]) holds what executions do, next to the topic logs
//! the triggers read. The keys are [`crate::keys`] tables: in the metadata group
//! [`FUNCTIONS`](crate::keys::FUNCTIONS), [`MODULES`](crate::keys::MODULES),
//! [`TRIGGERS`](crate::keys::TRIGGERS), [`placements`](crate::keys::placements) and
//! [`measurements`](crate::keys::measurements); in the data group
//! [`TRIGGER_CURSORS`](crate::keys::TRIGGER_CURSORS), [`STATE`](crate::keys::STATE) and
//! [`STATE_VERSIONS`](crate::keys::STATE_VERSIONS).
//!
//! An [`Effects`] entry is how an execution lands: the function's outputs, its state changes
//! and the trigger's cursor moves (one per input topic of the step), applied together or not at
//! all. It is refused unless every cursor stands where the executor started and the function's state version is the one it
//! read, so a re-run after a crash, or a second executor racing the first, cannot apply an
//! event's effects twice, and concurrent read-modify-writes of one function's state cannot
//! lose an update.
//!
//! Outputs for topics of other groups cannot land in the same entry. They go to the
//! function's group's outbox instead ([`Effects::outbox`]), keyed by producer and a
//! sequence number the apply assigns, atomically with the cursor and state; a relay on the
//! group's leader delivers them in sequence order with [`crate::Op::Deliver`], which the
//! target group applies once per sequence number (a repeat is a duplicate, a gap is
//! refused: Kafka's idempotent producer, without a time window), and then trims the
//! outbox with [`crate::Op::OutboxTrim`].

use crate::topics::PublishOp;
use serde::{Deserialize, Serialize};

/// Moves a trigger's cursor on one topic from `expected` to `next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorMove {
    /// The trigger's uid.
    pub trigger_uid: String,
    /// The input topic.
    pub topic: String,
    /// Where the cursor must stand (`None`: the trigger has no cursor on the topic yet).
    pub expected: Option<u64>,
    /// Where it moves.
    pub next: u64,
}

/// What one or more executions did, applied atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effects {
    /// The function whose state changes.
    pub function: String,
    /// The cursor moves this commits (a QoS 1 trigger's step: one per input topic it ran,
    /// each topic at most once); empty for effects with no cursor (QoS 0).
    pub cursors: Vec<CursorMove>,
    /// The state version the executor read; `None` applies without the check (QoS 0).
    pub state_version: Option<u64>,
    /// State changes (`None`: delete).
    pub state: Vec<(String, Option<Vec<u8>>)>,
    /// Events to append to their topics' logs, which live in this group.
    pub outputs: Vec<PublishOp>,
    /// Events for topics in other groups: kept in this group's outbox, in the same entry
    /// as the cursor and state changes, for the relay to deliver.
    pub outbox: Vec<Outbound>,
}

/// An output bound for a topic that lives in another group than the function's: the
/// [`Effects`] entry keeps it in the function's group's outbox, under `producer` and a
/// sequence number the apply assigns (the producer's next one), and a relay later delivers
/// it to `target` with [`crate::Op::Deliver`], which applies each sequence number once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    /// The outbox it is kept in, and the producer whose sequence the target deduplicates by
    /// ([`producer_id`]: one per source group, function and target group, so each target
    /// sees one gap-free sequence per producer).
    pub producer: String,
    /// The group that holds the event's topic.
    pub target: crate::GroupId,
    /// The event.
    pub event: PublishOp,
}

/// One outbox entry as stored in the source group, until [`crate::Op::OutboxTrim`] removes
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The group that holds the event's topic.
    pub target: crate::GroupId,
    /// The event to deliver there.
    pub event: PublishOp,
}

/// Where one producer's outbox stands (source group): it holds sequence numbers
/// `first..next`; the next output gets `next`. Never removed, so a sequence number is never
/// handed out twice, even after every entry was trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMeta {
    /// The oldest sequence number not trimmed yet.
    pub first: u64,
    /// The sequence number the next output gets (the first is 1).
    pub next: u64,
}

impl Default for OutboxMeta {
    fn default() -> Self {
        OutboxMeta { first: 1, next: 1 }
    }
}

impl OutboxMeta {
    /// How many entries the outbox holds.
    pub fn len(&self) -> u64 {
        self.next.saturating_sub(self.first)
    }

    /// Whether the outbox holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most entries one producer's outbox holds: an [`Effects`] that would pass it is
/// refused (naming the limit) until the relay has delivered and trimmed, so an unreachable
/// target group holds back its producers instead of filling the source group.
pub const MAX_OUTBOX_ENTRIES: u64 = 65_536;

/// The producer id of the outputs of `function`, committed in group `source`, bound for
/// group `target`. Source and target are numbers at either end, so two different triples
/// never give the same id whatever the function's name holds.
pub fn producer_id(source: crate::GroupId, function: &str, target: crate::GroupId) -> String {
    format!("{}:{function}:{}", source.0, target.0)
}

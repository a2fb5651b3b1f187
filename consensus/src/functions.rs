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
    /// Events to append to their topics' logs.
    pub outputs: Vec<PublishOp>,
}

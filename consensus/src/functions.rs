//! Functions, triggers and their effects inside the groups' state machines.
//!
//! The metadata group holds what users declare (written with [`crate::Op::Internal`] and
//! the [`InternalKey`] that names each record); a data group holds what executions do, next
//! to the topic logs the triggers read. All keys are internal (they start with U+0001):
//!
//! ```text
//!   metadata group                         data group
//!   \x01F/{function}    FunctionSpec       \x01x/{trigger uid}\x00{topic}  next offset (u64)
//!   \x01B/{hash}        module bytes       \x01f/{function}\x00{key}       state value
//!   \x01T/{trigger}     TriggerSpec        \x01v/{function}                state version (u64)
//!   \x01P/{function}    placement decision
//!   \x01M/{function}\x00{peer}  execution-time measurement
//! ```
//!
//! An [`Effects`] entry is how an execution lands: the function's outputs, its state changes
//! and the trigger's cursor move, applied together or not at all. It is refused unless the
//! cursor stands where the executor started and the function's state version is the one it
//! read, so a re-run after a crash, or a second executor racing the first, cannot apply an
//! event's effects twice, and concurrent read-modify-writes of one function's state cannot
//! lose an update.

use crate::topics::PublishOp;
use crate::types::InternalKey;
use serde::{Deserialize, Serialize};

/// The key of a function's spec (metadata group).
pub fn function_key(name: &str) -> String {
    InternalKey::Function(name.to_string()).key()
}

/// The prefix of every function's spec key.
pub const FUNCTION_PREFIX: &str = "\u{1}F/";

/// The key of a module's bytes, by hash (metadata group).
pub fn module_key(hash: &str) -> String {
    InternalKey::Module(hash.to_string()).key()
}

/// The key of a trigger's spec (metadata group).
pub fn trigger_key(name: &str) -> String {
    InternalKey::Trigger(name.to_string()).key()
}

/// The prefix of every trigger's spec key.
pub const TRIGGER_PREFIX: &str = "\u{1}T/";

/// The key of a trigger's cursor on a topic (data group).
pub fn cursor_key(trigger_uid: &str, topic: &str) -> String {
    format!("\u{1}x/{trigger_uid}\u{0}{topic}")
}

/// The key of one entry of a function's state (data group).
pub fn state_key(function: &str, key: &str) -> String {
    format!("{}{key}", state_prefix(function))
}

/// The prefix of a function's state keys.
pub fn state_prefix(function: &str) -> String {
    format!("\u{1}f/{function}\u{0}")
}

/// The key of a function's state version (data group).
pub fn version_key(function: &str) -> String {
    format!("\u{1}v/{function}")
}

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
    /// The cursor move this commits (QoS 1 triggers); `None` for effects with no cursor.
    pub cursor: Option<CursorMove>,
    /// The state version the executor read; `None` applies without the check (QoS 0).
    pub state_version: Option<u64>,
    /// State changes (`None`: delete).
    pub state: Vec<(String, Option<Vec<u8>>)>,
    /// Events to append to their topics' logs.
    pub outputs: Vec<PublishOp>,
}

/// The key of a function's committed placement (metadata group).
pub fn decision_key(function: &str) -> String {
    InternalKey::Placement(function.to_string()).key()
}

/// The key of one peer's execution-time measurement of a function (metadata group).
pub fn measurement_key(function: &str, peer: &str) -> String {
    InternalKey::Measurement {
        function: function.to_string(),
        peer: peer.to_string(),
    }
    .key()
}

/// The prefix of every measurement key.
pub fn measurement_prefix() -> &'static str {
    crate::types::MEASUREMENT_PREFIX
}

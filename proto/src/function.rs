//! Functions and triggers as the cluster stores them, and the names, limits and settings a
//! user gives them — with the validation that turns bad input into a clear error.

use crate::{Topic, TopicFilter};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default memory limit of a function's instance.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
/// The most memory a function may ask for.
pub const MAX_MEMORY_BYTES: u64 = 1 << 30;
/// Default time limit of one invocation, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
/// The longest time limit a function may ask for, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// The largest module accepted by `fn deploy`.
pub const MAX_MODULE_BYTES: usize = 16 << 20;
/// Default number of retries of a failing event before it goes to the dead-letter topic.
pub const DEFAULT_RETRIES: u32 = 3;
/// The most retries a trigger may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Default number of outputs (`publish` and `emit` calls) one invocation may make.
pub const DEFAULT_MAX_OUTPUTS: u32 = 64;
/// The most outputs per invocation a function may ask for.
pub const MAX_MAX_OUTPUTS: u32 = 1_000;
/// Default total bytes of one invocation's outputs (see [`output_cost`]).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// The most output bytes per invocation a function may ask for. With
/// [`MAX_MAX_STATE_BYTES`] and [`MAX_MAX_OUTPUTS`] it keeps one invocation's effects well
/// under what one Raft entry may carry (the node's effects entries are bounded at a quarter
/// of the 64 MiB RPC frame).
pub const MAX_MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// Default total bytes of one invocation's state writes (see [`state_write_cost`]).
pub const DEFAULT_MAX_STATE_BYTES: u64 = 1 << 20;
/// The most state-write bytes per invocation a function may ask for.
pub const MAX_MAX_STATE_BYTES: u64 = 4 << 20;
/// What each output costs on top of its topic, header and payload bytes, and each header
/// on top of its name and value: the framing the entry that carries them needs, so that a
/// flood of tiny outputs or headers is bounded as well as a few big ones.
pub const OUTPUT_FRAMING_BYTES: u64 = 16;
/// What each state write (`set` or `delete`) costs on top of its key and value bytes.
pub const STATE_FRAMING_BYTES: u64 = 16;

/// Why a function or trigger setting is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn check_name(what: &str, name: &str) -> Result<(), SpecError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        return Err(SpecError(format!(
            "{what} name {name:?} is not allowed: use 1-64 letters, digits, `-`, `_` or `.` (not first)"
        )));
    }
    Ok(())
}

/// Checks a function's name.
pub fn check_function_name(name: &str) -> Result<(), SpecError> {
    check_name("function", name)
}

/// Checks a trigger's name.
pub fn check_trigger_name(name: &str) -> Result<(), SpecError> {
    check_name("trigger", name)
}

/// What one invocation of a function may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The most linear memory the instance may grow to, in bytes.
    pub memory_bytes: u64,
    /// The longest one invocation may run, in milliseconds.
    pub timeout_ms: u64,
    /// An instruction budget (wasmtime fuel), if the function has one.
    pub fuel: Option<u64>,
    /// The most outputs (`publish` plus `emit` calls) one invocation may make; default
    /// [`DEFAULT_MAX_OUTPUTS`] (64), at most [`MAX_MAX_OUTPUTS`].
    pub max_outputs: u32,
    /// The most bytes one invocation's outputs may add up to, each counted by
    /// [`output_cost`]; default [`DEFAULT_MAX_OUTPUT_BYTES`] (1 MiB), at most
    /// [`MAX_MAX_OUTPUT_BYTES`].
    pub max_output_bytes: u64,
    /// The most bytes one invocation's state writes may add up to, each counted by
    /// [`state_write_cost`]; default [`DEFAULT_MAX_STATE_BYTES`] (1 MiB), at most
    /// [`MAX_MAX_STATE_BYTES`].
    pub max_state_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            fuel: None,
            max_outputs: DEFAULT_MAX_OUTPUTS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
        }
    }
}

/// What one output counts against [`Limits::max_output_bytes`]: its topic, payload, header
/// names and values, and [`OUTPUT_FRAMING_BYTES`] for the output and for each header.
pub fn output_cost(topic: &str, headers: &[(String, String)], payload: &[u8]) -> u64 {
    let headers: u64 = headers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64 + OUTPUT_FRAMING_BYTES)
        .sum();
    (topic.len() + payload.len()) as u64 + headers + OUTPUT_FRAMING_BYTES
}

/// What one state write counts against [`Limits::max_state_bytes`]: its key, its value (none
/// for a delete) and [`STATE_FRAMING_BYTES`].
pub fn state_write_cost(key: &str, value: Option<&[u8]>) -> u64 {
    (key.len() + value.map_or(0, <[u8]>::len)) as u64 + STATE_FRAMING_BYTES
}

impl Limits {
    /// Checks the limits are within what canal allows.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.memory_bytes < (1 << 20) || self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(SpecError(format!(
                "memory limit {} is not allowed: use 1MiB to {}",
                crate::size::format_bytes(self.memory_bytes),
                crate::size::format_bytes(MAX_MEMORY_BYTES)
            )));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(SpecError(format!(
                "timeout of {} ms is not allowed: use 1ms to {} s",
                self.timeout_ms,
                MAX_TIMEOUT_MS / 1000
            )));
        }
        if self.fuel == Some(0) {
            return Err(SpecError(
                "fuel 0 would stop every invocation at once: give a positive number".into(),
            ));
        }
        if self.max_outputs > MAX_MAX_OUTPUTS {
            return Err(SpecError(format!(
                "max-outputs {} is not allowed: use 0 to {MAX_MAX_OUTPUTS}",
                self.max_outputs
            )));
        }
        if self.max_output_bytes > MAX_MAX_OUTPUT_BYTES {
            return Err(SpecError(format!(
                "max-output-bytes of {} bytes is not allowed: use 0 to {MAX_MAX_OUTPUT_BYTES} bytes ({})",
                self.max_output_bytes,
                crate::size::format_bytes(MAX_MAX_OUTPUT_BYTES)
            )));
        }
        if self.max_state_bytes > MAX_MAX_STATE_BYTES {
            return Err(SpecError(format!(
                "max-state-bytes of {} bytes is not allowed: use 0 to {MAX_MAX_STATE_BYTES} bytes ({})",
                self.max_state_bytes,
                crate::size::format_bytes(MAX_MAX_STATE_BYTES)
            )));
        }
        Ok(())
    }
}

/// Where a function may run, as the placement engine reads it. `hard` constraints fail
/// the placement when no peer meets them; preferred ones fall back and say so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    /// Needs a GPU.
    pub gpu: bool,
    /// The least GPU memory, in bytes, when a GPU is needed.
    #[serde(default)]
    pub gpu_memory_bytes: Option<u64>,
    /// Runs on peers of this tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// Runs on peers with these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many peers run it.
    pub replicas: u32,
    /// Whether the constraints above are hard (fail if unmet) rather than preferred.
    #[serde(default = "yes")]
    pub hard: bool,
}

fn yes() -> bool {
    true
}

/// A deployed function as the metadata group stores it (the module itself is stored apart,
/// by its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Its name.
    pub name: String,
    /// The SHA-256 of the component's bytes, hex.
    pub hash: String,
    /// The component's size in bytes.
    pub size: u64,
    /// Its limits.
    pub limits: Limits,
    /// Its placement requirements.
    pub requirements: Requirements,
    /// The placement policy: `topology`, `spread`, `least-loaded` or `latency`.
    pub policy: String,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_ms: u64,
}

/// A trigger as the metadata group stores it: events matching `filter` run `function`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerSpec {
    /// Its name.
    pub name: String,
    /// A unique id given at creation: cursors are kept under it, so a trigger removed and
    /// added again under the same name starts afresh.
    pub uid: String,
    /// Which topics fire it.
    pub filter: TopicFilter,
    /// The function it runs.
    pub function: String,
    /// Where the function's `emit` goes.
    #[serde(default)]
    pub out: Option<Topic>,
    /// 1: reads the committed log, effects exactly once; 0: runs on QoS 0 events as they
    /// pass, at most once.
    pub qos: u8,
    /// How often a failing event is retried before it goes to the dead letter.
    pub retries: u32,
    /// Where events that kept failing go; `None` means `dead-letter/{trigger}`.
    #[serde(default)]
    pub dead_letter: Option<Topic>,
    /// When it was created, ms since the Unix epoch: it fires on events accepted from then.
    pub created_ms: u64,
}

/// Whose rights a trigger's function publishes with: the subject of the token that created
/// the trigger and that token's publish filters (kept beside the trigger, by its uid, in the
/// metadata group's `\x01O/` table), checked against every output at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerOwner {
    /// The token's subject.
    pub subject: String,
    /// The token's publish allow filters.
    pub publish_allow: Vec<TopicFilter>,
    /// The token's publish deny filters (deny wins).
    pub publish_deny: Vec<TopicFilter>,
}

impl TriggerOwner {
    /// Whether the owner may publish to `topic`: some allow filter matches and no deny does.
    pub fn may_publish(&self, topic: &Topic) -> bool {
        !self.publish_deny.iter().any(|d| d.matches(topic))
            && self.publish_allow.iter().any(|a| a.matches(topic))
    }
}

impl TriggerSpec {
    /// The topic failed events go to.
    pub fn dead_letter_topic(&self) -> Result<Topic, SpecError> {
        match &self.dead_letter {
            Some(t) => Ok(t.clone()),
            None => Topic::new(&format!("dead-letter/{}", self.name))
                .map_err(|e| SpecError(e.to_string())),
        }
    }

    /// Checks the settings a user gave.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_trigger_name(&self.name)?;
        check_function_name(&self.function)?;
        if self.qos > 1 {
            return Err(SpecError(format!(
                "QoS {} is not known: use 0 (at most once) or 1 (exactly-once effects)",
                self.qos
            )));
        }
        if self.retries > MAX_RETRIES {
            return Err(SpecError(format!(
                "{} retries is too many: use 0 to {MAX_RETRIES}",
                self.retries
            )));
        }
        if let Some(out) = &self.out
            && self.filter.matches(out)
        {
            return Err(SpecError(format!(
                "output topic {out} matches the trigger's own filter {}: the function would fire on its own output forever",
                self.filter
            )));
        }
        Ok(())
    }
}

/// What `PUT /v1/triggers/{name}` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// The topic filter (`sensors/+/temp`).
    pub on: String,
    /// The function to run.
    #[serde(rename = "fn")]
    pub function: String,
    /// The output topic.
    #[serde(default)]
    pub out: Option<String>,
    /// 0 or 1 (default 1).
    #[serde(default)]
    pub qos: Option<u8>,
    /// Retries before the dead letter (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// The dead-letter topic (default `dead-letter/{trigger}`).
    #[serde(default)]
    pub dead_letter: Option<String>,
}

/// One line a function logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn`, `error`, or `stdout`/`stderr` for what the guest
    /// printed.
    pub level: String,
    /// The text.
    pub message: String,
}

/// An event a function published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Its topic.
    pub topic: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// What `POST /v1/functions/{name}/invoke` answers: one run, nothing committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeResult {
    /// The function.
    pub function: String,
    /// The peer that ran it.
    pub executor: String,
    /// `ok`, or why it failed.
    pub result: Result<(), String>,
    /// What it would publish.
    pub outputs: Vec<Output>,
    /// The state changes it would make (`None`: deleted).
    pub state: BTreeMap<String, Option<String>>,
    /// What it logged.
    pub logs: Vec<LogLine>,
    /// How long the call took, in microseconds.
    pub micros: u64,
}

/// What `PUT /v1/functions/{name}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployed {
    /// The function as stored.
    pub function: FunctionSpec,
    /// The hash of the module it replaced, if the name was in use.
    #[serde(default)]
    pub replaced: Option<String>,
    /// How long validating and compiling took on the node that took the deploy, in ms.
    pub compile_ms: f64,
}

/// What `GET /v1/functions` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionList {
    /// Every function, by name.
    pub functions: Vec<FunctionSpec>,
}

/// What `GET /v1/triggers` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerList {
    /// Every trigger, by name.
    pub triggers: Vec<TriggerSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger() -> TriggerSpec {
        TriggerSpec {
            name: "alerts".into(),
            uid: "u1".into(),
            filter: TopicFilter::new("sensors/+/temp").unwrap(),
            function: "threshold".into(),
            out: Some(Topic::new("alerts/temp").unwrap()),
            qos: 1,
            retries: 3,
            dead_letter: None,
            created_ms: 0,
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_function_name("threshold-2.v1").is_ok());
        for bad in ["", ".x", "a b", "a/b", &"x".repeat(65)] {
            let e = check_function_name(bad).unwrap_err();
            assert!(e.0.contains("is not allowed"), "{e}");
        }
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits::default().validate().is_ok());
        let small = Limits {
            memory_bytes: 1000,
            ..Limits::default()
        };
        assert!(small.validate().unwrap_err().0.contains("1MiB to"));
        let slow = Limits {
            timeout_ms: MAX_TIMEOUT_MS + 1,
            ..Limits::default()
        };
        assert!(slow.validate().is_err());
        let no_fuel = Limits {
            fuel: Some(0),
            ..Limits::default()
        };
        assert!(no_fuel.validate().is_err());
        let many = Limits {
            max_outputs: MAX_MAX_OUTPUTS + 1,
            ..Limits::default()
        };
        let e = many.validate().unwrap_err().0;
        assert!(
            e.contains("max-outputs 1001") && e.contains("0 to 1000"),
            "{e}"
        );
        let big = Limits {
            max_output_bytes: MAX_MAX_OUTPUT_BYTES + 1,
            ..Limits::default()
        };
        let e = big.validate().unwrap_err().0;
        assert!(e.contains("max-output-bytes") && e.contains("4 MiB"), "{e}");
        let state = Limits {
            max_state_bytes: MAX_MAX_STATE_BYTES + 1,
            ..Limits::default()
        };
        let e = state.validate().unwrap_err().0;
        assert!(e.contains("max-state-bytes"), "{e}");
        let none = Limits {
            max_outputs: 0,
            max_output_bytes: 0,
            max_state_bytes: 0,
            ..Limits::default()
        };
        assert!(none.validate().is_ok());
    }

    #[test]
    fn costs_count_every_byte_and_the_framing() {
        let h = vec![("k".to_string(), "vv".to_string())];
        assert_eq!(
            output_cost("a/b", &h, b"xyz"),
            3 + 3 + 3 + 2 * OUTPUT_FRAMING_BYTES
        );
        assert_eq!(output_cost("a", &[], b""), 1 + OUTPUT_FRAMING_BYTES);
        assert_eq!(
            state_write_cost("key", Some(b"12")),
            5 + STATE_FRAMING_BYTES
        );
        assert_eq!(state_write_cost("key", None), 3 + STATE_FRAMING_BYTES);
    }

    #[test]
    fn a_trigger_cannot_feed_itself() {
        assert!(trigger().validate().is_ok());
        let mut t = trigger();
        t.out = Some(Topic::new("sensors/x/temp").unwrap());
        assert!(t.validate().unwrap_err().0.contains("forever"));
        let mut t = trigger();
        t.qos = 2;
        assert!(t.validate().is_err());
        assert_eq!(
            trigger().dead_letter_topic().unwrap().as_str(),
            "dead-letter/alerts"
        );
    }
}

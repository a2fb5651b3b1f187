//! The host side of the guest interface: what `publish`, `emit`, `state` and `log` do.
//!
//! Nothing a guest does leaves the store until the invocation returns: outputs and state
//! changes are buffered here and handed back in the [`crate::Invocation`], so the node can
//! commit them in one Raft entry with the trigger's cursor, or drop them if the guest failed.
//!
//! What a guest publishes and writes counts against its function's [`Limits`] as it calls:
//! the call that passes one (outputs, output bytes, state bytes, the hop count) traps the
//! guest, and the invocation fails with a [`crate::Failure::Limit`] naming the limit and the
//! value, whatever the guest would have done with an error. Bad input that is no limit (an
//! invalid topic or header) is an error the guest sees and may handle.

use crate::runtime::bindings::canal::functions::{host, state, types};
use canal_proto::Topic;
use canal_proto::function::{Limits, LogLine, Output, output_cost, state_write_cost};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The largest payload one output may carry (a topic's largest payload, too).
pub const MAX_OUTPUT_BYTES: usize = canal_proto::settings::MAX_PAYLOAD_BYTES as usize;
/// The longest state key.
pub const MAX_KEY_BYTES: usize = 512;
/// The largest state value.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most log lines kept per invocation (later ones are counted, not kept).
pub const MAX_LOG_LINES: usize = 200;
/// The most keys `state.list` returns.
pub const MAX_LIST_KEYS: usize = 10_000;

/// A read-only view of a function's replicated state, as of when the invocation started.
/// Implementations must be consistent for the duration of one invocation or the commit that
/// follows must detect that they were not (the node checks a state version).
pub trait StateView: Send + Sync {
    /// The value of `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// The keys that start with `prefix`, in order, at most `limit`.
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String>;
}

/// A state with nothing in it (for `fn invoke` of a function that was never run, and tests).
#[derive(Debug, Default, Clone)]
pub struct EmptyState;

impl StateView for EmptyState {
    fn get(&self, _key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    fn keys(&self, _prefix: &str, _limit: usize) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
}

/// A state view with writes on top: what a guest sees of earlier events of the same batch.
pub struct Overlay {
    /// What was committed.
    pub base: Arc<dyn StateView>,
    /// Changes made since (`None`: deleted).
    pub changes: BTreeMap<String, Option<Vec<u8>>>,
}

impl StateView for Overlay {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        let mut keys: std::collections::BTreeSet<String> = self
            .base
            .keys(prefix, limit.saturating_add(self.changes.len()))?
            .into_iter()
            .collect();
        for (k, v) in self.changes.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(_) => keys.insert(k.clone()),
                None => keys.remove(k),
            };
        }
        Ok(keys.into_iter().take(limit).collect())
    }
}

/// The memory limiter of one store: a [`StoreLimits`] that remembers whether it refused.
pub(crate) struct Limiter {
    pub(crate) inner: StoreLimits,
    pub(crate) refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.inner.memory_growing(current, desired, maximum)?;
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
}

/// Everything one store holds: the WASI context (no files, no network, output captured),
/// the limiter, the state view and what the guest did.
pub(crate) struct Host {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) state: Overlay,
    pub(crate) out: Option<Topic>,
    pub(crate) outputs: Vec<Output>,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) logs_dropped: usize,
    /// The function's limits.
    pub(crate) limits: Limits,
    /// The input event's hop count.
    pub(crate) hops: u32,
    /// What the outputs so far count against `limits.max_output_bytes`.
    pub(crate) output_bytes: u64,
    /// What the state writes so far count against `limits.max_state_bytes`.
    pub(crate) state_bytes: u64,
    /// The limit the guest passed, if it did (its name, and what happened): the invocation
    /// fails with it.
    pub(crate) limit_hit: Option<(&'static str, String)>,
}

impl Host {
    pub(crate) fn log(&mut self, level: &str, message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.logs_dropped += 1;
            return;
        }
        // Lines are for people: keep them to a sane length.
        let mut message = message;
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        self.logs.push(LogLine {
            level: level.to_string(),
            message,
        });
    }

    /// Records that the guest passed a limit and makes the trap that stops it.
    fn passed(&mut self, limit: &'static str, why: String) -> wasmtime::Error {
        let e = wasmtime::Error::msg(why.clone());
        self.limit_hit.get_or_insert((limit, why));
        e
    }

    fn output(
        &mut self,
        topic: Topic,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<(), String>> {
        for (k, v) in &headers {
            if k.is_empty() || k.len() > 128 || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Ok(Err(format!(
                    "header name {k:?} is not allowed: use 1-128 printable ASCII characters"
                )));
            }
            if v.len() > 4096 || v.chars().any(char::is_control) {
                return Ok(Err(format!(
                    "header {k:?} has a value that is too long or holds control characters"
                )));
            }
        }
        if let Err(why) = crate::rules::output_hops(self.hops) {
            return Err(self.passed("hops", why));
        }
        let max = self.limits.max_outputs;
        if self.outputs.len() as u64 >= u64::from(max) {
            return Err(self.passed("max-outputs", format!(
                "max-outputs: output number {} (publish or emit) is over the function's limit of {max} per invocation",
                self.outputs.len() + 1
            )));
        }
        if payload.len() > MAX_OUTPUT_BYTES {
            return Err(self.passed("output-payload", format!(
                "output-payload: {} bytes is over the limit of {MAX_OUTPUT_BYTES} bytes per output",
                payload.len()
            )));
        }
        let total =
            self.output_bytes
                .saturating_add(output_cost(topic.as_str(), &headers, &payload));
        let max = self.limits.max_output_bytes;
        if total > max {
            return Err(self.passed("max-output-bytes", format!(
                "max-output-bytes: the invocation's outputs came to {total} bytes, over the function's limit of {max} bytes"
            )));
        }
        self.output_bytes = total;
        self.outputs.push(Output {
            topic: topic.to_string(),
            headers,
            payload,
        });
        Ok(Ok(()))
    }

    /// Counts a state write against the limit, or stops the guest.
    fn state_write(&mut self, key: &str, value: Option<&[u8]>) -> wasmtime::Result<()> {
        let total = self
            .state_bytes
            .saturating_add(state_write_cost(key, value));
        let max = self.limits.max_state_bytes;
        if total > max {
            return Err(self.passed("max-state-bytes", format!(
                "max-state-bytes: the invocation's state writes came to {total} bytes, over the function's limit of {max} bytes"
            )));
        }
        self.state_bytes = total;
        Ok(())
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for Host {}

impl host::Host for Host {
    fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<(), String>> {
        let topic = match Topic::new(&topic) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.to_string())),
        };
        self.output(topic, payload, headers)
    }

    fn emit(
        &mut self,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<(), String>> {
        let Some(topic) = self.out.clone() else {
            return Ok(Err(
                "this trigger has no output topic: add one with `--out TOPIC`, or use publish"
                    .into(),
            ));
        };
        self.output(topic, payload, headers)
    }

    fn log(&mut self, level: types::Level, message: String) {
        let level = match level {
            types::Level::Trace => "trace",
            types::Level::Debug => "debug",
            types::Level::Info => "info",
            types::Level::Warn => "warn",
            types::Level::Error => "error",
        };
        Host::log(self, level, message);
    }
}

impl state::Host for Host {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        match self.state.get(&key) {
            Ok(v) => v,
            Err(e) => {
                // A read the host cannot serve: the guest sees nothing, the log says why.
                Host::log(self, "error", format!("state get {key:?} failed: {e}"));
                None
            }
        }
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Ok(Err(format!(
                "state key {key:?} is not allowed: use 1-{MAX_KEY_BYTES} bytes without control characters"
            )));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(self.passed(
                "state-value",
                format!(
                    "state-value: {} bytes is over the limit of {MAX_VALUE_BYTES} bytes per value",
                    value.len()
                ),
            ));
        }
        self.state_write(&key, Some(&value))?;
        self.state.changes.insert(key, Some(value));
        Ok(Ok(()))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        // A delete is a write in the entry too: counted, so a flood of them is bounded.
        self.state_write(&key, None)?;
        self.state.changes.insert(key, None);
        Ok(())
    }

    fn list(&mut self, prefix: String) -> Vec<String> {
        match self.state.keys(&prefix, MAX_LIST_KEYS) {
            Ok(keys) => keys,
            Err(e) => {
                Host::log(self, "error", format!("state list {prefix:?} failed: {e}"));
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(BTreeMap<String, Vec<u8>>);
    impl StateView for Fixed {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(self.0.get(key).cloned())
        }
        fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
            Ok(self
                .0
                .keys()
                .filter(|k| k.starts_with(prefix))
                .take(limit)
                .cloned()
                .collect())
        }
    }

    #[test]
    fn an_overlay_shows_writes_over_the_base() {
        let base = Fixed(
            [("a/1", "x"), ("a/2", "y"), ("b/1", "z")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        );
        let mut o = Overlay {
            base: Arc::new(base),
            changes: BTreeMap::new(),
        };
        o.changes.insert("a/2".into(), None);
        o.changes.insert("a/3".into(), Some(b"w".to_vec()));
        assert_eq!(o.get("a/1").unwrap(), Some(b"x".to_vec()));
        assert_eq!(o.get("a/2").unwrap(), None);
        assert_eq!(o.get("a/3").unwrap(), Some(b"w".to_vec()));
        assert_eq!(o.keys("a/", 10).unwrap(), vec!["a/1", "a/3"]);
        assert_eq!(o.keys("", 2).unwrap(), vec!["a/1", "a/3"]);
    }
}

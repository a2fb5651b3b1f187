//! What the latency policy learns from real invocations: an EWMA of each function's
//! execution time on each peer.

use crate::Candidate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Weight of a new measurement in the execution-time EWMA:
/// `mean = EWMA_ALPHA × sample + (1 − EWMA_ALPHA) × mean`; the first sample sets the mean.
pub const EWMA_ALPHA: f64 = 0.2;

/// The execution time assumed, in ms, when no peer has run the function yet.
pub const DEFAULT_EXEC_MS: f64 = 1.0;

/// Execution-time estimates per (function, peer), fed back from real invocations. Plain data
/// with serde, so the node can keep it across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimates {
    /// function -> peer -> EWMA.
    exec: BTreeMap<String, BTreeMap<String, Ewma>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Ewma {
    mean_ms: f64,
    count: u64,
}

/// Where an execution-time estimate came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ExecSource {
    /// Measured on this peer, from this many samples.
    Measured(u64),
    /// Not measured on this peer: the mean over this many peers that did run it.
    MeanOfPeers(usize),
    /// Not measured anywhere: [`DEFAULT_EXEC_MS`].
    Default,
}

impl Estimates {
    /// No measurements.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds back one invocation of `function` on `peer` that ran for `exec_ms`. A sample that
    /// is negative, NaN or infinite is ignored.
    pub fn observe(&mut self, function: &str, peer: &str, exec_ms: f64) {
        if !exec_ms.is_finite() || exec_ms < 0.0 {
            return;
        }
        let per_peer = self.exec.entry(function.to_string()).or_default();
        per_peer
            .entry(peer.to_string())
            .and_modify(|e| {
                e.mean_ms = EWMA_ALPHA * exec_ms + (1.0 - EWMA_ALPHA) * e.mean_ms;
                e.count = e.count.saturating_add(1);
            })
            .or_insert(Ewma {
                mean_ms: exec_ms,
                count: 1,
            });
    }

    /// The EWMA of `function`'s execution time on `peer`, in ms, if it ever ran there.
    pub fn exec_ms(&self, function: &str, peer: &str) -> Option<f64> {
        self.ewma(function, peer).map(|e| e.mean_ms)
    }

    /// How many invocations of `function` on `peer` fed the estimate.
    pub fn samples(&self, function: &str, peer: &str) -> u64 {
        self.ewma(function, peer).map_or(0, |e| e.count)
    }

    /// The mean of `function`'s per-peer estimates, in ms, if any peer ran it.
    pub fn mean_exec_ms(&self, function: &str) -> Option<f64> {
        let per_peer = self.exec.get(function).filter(|m| !m.is_empty())?;
        Some(per_peer.values().map(|e| e.mean_ms).sum::<f64>() / per_peer.len() as f64)
    }

    /// The queueing delay `candidate` would add to `function`, in ms:
    /// `(queue_len + running_invocations) × exec / max(cpu_cores, 1)`, where `exec` is the
    /// function's expected execution time there — each waiting or running event is taken
    /// to cost about as much as this function, served by all cores at once.
    pub fn queue_ms(&self, function: &str, candidate: &Candidate) -> f64 {
        let load = &candidate.caps.load;
        let events = load.queue_len.saturating_add(load.running_invocations) as f64;
        let (exec, _) = self.expected_exec_ms(function, &candidate.peer_id);
        events * exec / f64::from(candidate.caps.cpu_cores.max(1))
    }

    /// Drops every estimate for `peer` (it left the cluster for good).
    pub fn forget_peer(&mut self, peer: &str) {
        for per_peer in self.exec.values_mut() {
            per_peer.remove(peer);
        }
        self.exec.retain(|_, m| !m.is_empty());
    }

    /// The execution time to assume for `function` on `peer`: the peer's own EWMA, else the
    /// mean over the peers that ran it, else [`DEFAULT_EXEC_MS`].
    pub(crate) fn expected_exec_ms(&self, function: &str, peer: &str) -> (f64, ExecSource) {
        if let Some(e) = self.ewma(function, peer) {
            return (e.mean_ms, ExecSource::Measured(e.count));
        }
        match (self.mean_exec_ms(function), self.exec.get(function)) {
            (Some(mean), Some(m)) => (mean, ExecSource::MeanOfPeers(m.len())),
            _ => (DEFAULT_EXEC_MS, ExecSource::Default),
        }
    }

    fn ewma(&self, function: &str, peer: &str) -> Option<&Ewma> {
        self.exec.get(function)?.get(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::candidate;

    #[test]
    fn ewma_starts_at_the_first_sample_and_moves_by_alpha() {
        let mut e = Estimates::new();
        assert_eq!(e.exec_ms("f", "a"), None);
        e.observe("f", "a", 10.0);
        assert_eq!(e.exec_ms("f", "a"), Some(10.0));
        let close = |got: Option<f64>, want: f64| {
            assert!(
                got.is_some_and(|g| (g - want).abs() < 1e-9),
                "{got:?} != {want}"
            )
        };
        e.observe("f", "a", 20.0);
        close(e.exec_ms("f", "a"), 12.0);
        e.observe("f", "a", 2.0);
        close(e.exec_ms("f", "a"), 10.0);
        assert_eq!(e.samples("f", "a"), 3);
        assert_eq!(e.samples("f", "b"), 0);
        assert_eq!(e.exec_ms("g", "a"), None);
    }

    #[test]
    fn bad_samples_are_ignored() {
        let mut e = Estimates::new();
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            e.observe("f", "a", bad);
        }
        assert_eq!(e, Estimates::new());
        e.observe("f", "a", 0.0);
        assert_eq!(e.exec_ms("f", "a"), Some(0.0));
    }

    #[test]
    fn unknown_peers_get_the_mean_then_the_default() {
        let mut e = Estimates::new();
        assert_eq!(
            e.expected_exec_ms("f", "c"),
            (DEFAULT_EXEC_MS, ExecSource::Default)
        );
        e.observe("f", "a", 2.0);
        e.observe("f", "b", 4.0);
        assert_eq!(e.mean_exec_ms("f"), Some(3.0));
        assert_eq!(
            e.expected_exec_ms("f", "c"),
            (3.0, ExecSource::MeanOfPeers(2))
        );
        assert_eq!(e.expected_exec_ms("f", "a"), (2.0, ExecSource::Measured(1)));
    }

    #[test]
    fn queue_wait_counts_waiting_and_running_events_per_core() {
        let mut e = Estimates::new();
        e.observe("f", "a", 4.0);
        let mut c = candidate("a", 0, "edge");
        c.caps.cpu_cores = 2;
        c.caps.load.queue_len = 3;
        c.caps.load.running_invocations = 1;
        assert_eq!(e.queue_ms("f", &c), 8.0);
        c.caps.cpu_cores = 0;
        assert_eq!(e.queue_ms("f", &c), 16.0);
    }

    #[test]
    fn forgets_a_peer_and_survives_serde() {
        let mut e = Estimates::new();
        e.observe("f", "a", 1.5);
        e.observe("f", "b", 2.5);
        e.observe("g", "b", 3.0);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Estimates>(&json).unwrap(), e);
        e.forget_peer("b");
        assert_eq!(e.exec_ms("f", "b"), None);
        assert_eq!(e.exec_ms("f", "a"), Some(1.5));
        assert_eq!(e.mean_exec_ms("g"), None);
    }
}

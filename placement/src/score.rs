//! The numbers the measured policies rank by: a peer's load score and a predicted response
//! time.

use crate::Candidate;
use crate::estimates::{Estimates, ExecSource};
use canal_proto::caps::Capabilities;

/// Weight, in CPU-percent points, of one waiting or running event per core in
/// [`load_score`].
pub const LOAD_EVENT_WEIGHT: f64 = 10.0;

/// What an unmeasured round trip costs on top of the slowest measured one, in ms.
pub const UNKNOWN_RTT_PENALTY_MS: f64 = 10.0;

/// The least-loaded policy's score for a peer, lower is better:
/// `cpu_percent + LOAD_EVENT_WEIGHT × (queue_len + running_invocations) / max(cpu_cores, 1)`,
/// with `cpu_percent` clamped to 0-100 (a missing or garbled value counts as 100).
pub fn load_score(caps: &Capabilities) -> f64 {
    let cpu = f64::from(caps.load.cpu_percent);
    let cpu = if cpu.is_finite() {
        cpu.clamp(0.0, 100.0)
    } else {
        100.0
    };
    let events = caps
        .load
        .queue_len
        .saturating_add(caps.load.running_invocations) as f64;
    cpu + LOAD_EVENT_WEIGHT * events / f64::from(caps.cpu_cores.max(1))
}

/// A round trip usable as a measurement: finite and not negative.
pub(crate) fn measured_rtt(c: &Candidate) -> Option<f64> {
    c.rtt_ms.filter(|r| r.is_finite() && *r >= 0.0)
}

/// The round trip assumed for a peer with no measurement: the slowest measured one among
/// `candidates` (0 if none) plus [`UNKNOWN_RTT_PENALTY_MS`], so an unmeasured peer ranks
/// behind every measured one on the network part.
pub(crate) fn unknown_rtt_ms<'a>(candidates: impl Iterator<Item = &'a Candidate>) -> f64 {
    candidates.filter_map(measured_rtt).fold(0.0, f64::max) + UNKNOWN_RTT_PENALTY_MS
}

/// A predicted response time and its parts, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Prediction {
    pub(crate) queue_ms: f64,
    pub(crate) exec_ms: f64,
    pub(crate) network_ms: f64,
    pub(crate) exec: ExecSource,
    pub(crate) rtt_measured: bool,
}

impl Prediction {
    /// What the latency policy predicts for `function` on `c`.
    pub(crate) fn of(
        estimates: &Estimates,
        function: &str,
        c: &Candidate,
        unknown_rtt_ms: f64,
    ) -> Prediction {
        let (exec_ms, exec) = estimates.expected_exec_ms(function, &c.peer_id);
        let rtt = measured_rtt(c);
        Prediction {
            queue_ms: estimates.queue_ms(function, c),
            exec_ms,
            network_ms: rtt.unwrap_or(unknown_rtt_ms),
            exec,
            rtt_measured: rtt.is_some(),
        }
    }

    /// queue + exec + network.
    pub(crate) fn total_ms(&self) -> f64 {
        self.queue_ms + self.exec_ms + self.network_ms
    }

    /// The parts that are guesses, for a verdict that does not show the sum:
    /// `exec: no measurement yet (mean of 2 peers); network: no round trip measured`.
    pub(crate) fn guesses(&self) -> Option<String> {
        let mut out = Vec::new();
        match self.exec {
            ExecSource::Measured(_) => {}
            ExecSource::MeanOfPeers(n) => out.push(format!(
                "exec: no measurement yet (mean of {n} peer{})",
                if n == 1 { "" } else { "s" }
            )),
            ExecSource::Default => out.push("exec: no measurement yet (default)".into()),
        }
        if !self.rtt_measured {
            out.push("network: no round trip measured (penalty)".into());
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// `predicted 3.2 ms = queue 0.0 + exec 2.2 + network 1.0`, with a note on each part
    /// that is a guess.
    pub(crate) fn explain(&self) -> String {
        let exec_note = match self.exec {
            ExecSource::Measured(_) => String::new(),
            ExecSource::MeanOfPeers(n) => format!(
                " (no measurement yet: mean of {n} peer{})",
                if n == 1 { "" } else { "s" }
            ),
            ExecSource::Default => " (no measurement yet: default)".into(),
        };
        let net_note = if self.rtt_measured {
            ""
        } else {
            " (no round trip measured: penalty)"
        };
        format!(
            "predicted {:.1} ms = queue {:.1} + exec {:.1}{exec_note} + network {:.1}{net_note}",
            self.total_ms(),
            self.queue_ms,
            self.exec_ms,
            self.network_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::candidate;

    #[test]
    fn load_score_formula() {
        let mut c = candidate("a", 0, "edge");
        c.caps.load.cpu_percent = 30.0;
        c.caps.load.queue_len = 6;
        c.caps.load.running_invocations = 2;
        c.caps.cpu_cores = 4;
        assert_eq!(load_score(&c.caps), 50.0);
        c.caps.load.cpu_percent = f32::NAN;
        c.caps.cpu_cores = 0;
        assert_eq!(load_score(&c.caps), 180.0);
        c.caps.load.cpu_percent = 250.0;
        assert_eq!(load_score(&c.caps), 180.0);
    }

    #[test]
    fn unknown_round_trips_cost_more_than_the_slowest_known() {
        let mut a = candidate("a", 0, "edge");
        let mut b = candidate("b", 1, "edge");
        let c = candidate("c", 2, "edge");
        a.rtt_ms = Some(4.0);
        b.rtt_ms = Some(f64::NAN);
        assert_eq!(unknown_rtt_ms([&a, &b, &c].into_iter()), 14.0);
        assert_eq!(unknown_rtt_ms([&c].into_iter()), UNKNOWN_RTT_PENALTY_MS);
    }

    #[test]
    fn explains_its_parts() {
        let mut e = Estimates::new();
        let mut a = candidate("a", 0, "edge");
        a.rtt_ms = Some(1.0);
        e.observe("f", "a", 2.2);
        let p = Prediction::of(&e, "f", &a, 11.0);
        assert_eq!(
            p.explain(),
            "predicted 3.2 ms = queue 0.0 + exec 2.2 + network 1.0"
        );
        let b = candidate("b", 1, "edge");
        let p = Prediction::of(&e, "f", &b, 11.0);
        assert_eq!(
            p.explain(),
            "predicted 13.2 ms = queue 0.0 + exec 2.2 (no measurement yet: mean of 1 peer) + network 11.0 (no round trip measured: penalty)"
        );
        let p = Prediction::of(&e, "g", &a, 11.0);
        assert!(
            p.explain()
                .contains("exec 1.0 (no measurement yet: default)")
        );
        assert_eq!(
            p.guesses(),
            Some("exec: no measurement yet (default)".into())
        );
        let p = Prediction::of(&e, "f", &b, 11.0);
        assert_eq!(
            p.guesses(),
            Some("exec: no measurement yet (mean of 1 peer); network: no round trip measured (penalty)".into())
        );
        assert_eq!(Prediction::of(&e, "f", &a, 11.0).guesses(), None);
    }
}

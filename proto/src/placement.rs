//! The vocabulary of placement that crosses the API: the policies by name, and the decision
//! with its explanation (`GET /v1/functions/{name}/placement`). The engine that makes
//! decisions is the `canal-placement` crate; these are only its inputs and outputs as data.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How the peers that meet a function's requirements are ranked. Chosen per function;
/// the default is [`Policy::Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Closest to the key in the Kademlia keyspace first: the DHT's own answer.
    #[default]
    Topology,
    /// Round-robin across tiers (anti-affinity), closest to the key within a tier.
    Spread,
    /// Lowest advertised load first (see `canal_placement::load_score`).
    LeastLoaded,
    /// Lowest predicted response time first: queueing + execution + network round trip.
    Latency,
}

/// A policy name that is not one of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {name:?}: use topology, spread, least-loaded or latency")]
pub struct PolicyError {
    /// The name that was given.
    pub name: String,
}

impl Policy {
    /// Every policy, in the order they are documented.
    pub const ALL: [Policy; 4] = [
        Policy::Topology,
        Policy::Spread,
        Policy::LeastLoaded,
        Policy::Latency,
    ];

    /// The policy's name: `topology`, `spread`, `least-loaded` or `latency`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Topology => "topology",
            Policy::Spread => "spread",
            Policy::LeastLoaded => "least-loaded",
            Policy::Latency => "latency",
        }
    }

    /// Whether the policy ranks by measurements that drift (load, latency), so that a
    /// previous choice is kept until a challenger beats it by the hysteresis margin.
    pub fn is_measured(self) -> bool {
        matches!(self, Policy::LeastLoaded | Policy::Latency)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| PolicyError {
                name: s.to_string(),
            })
    }
}

/// What the engine made of one candidate, for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The candidate's peer id.
    pub peer_id: String,
    /// Whether it is in [`Decision::chosen`].
    pub chosen: bool,
    /// Whether it could not be chosen at all (not reachable, a hard constraint unmet, a
    /// duplicate record).
    pub rejected: bool,
    /// Why: `chosen: closest to the key (rank 0)`, `rejected: no GPU`,
    /// `not chosen: predicted 42.1 ms, chosen peer 3.2 ms`.
    pub reason: String,
    /// The latency policy's predicted response time, in ms (latency policy, not rejected).
    pub predicted_ms: Option<f64>,
    /// What the policy ranked by, lower is better (rank, load score or predicted ms); `None`
    /// when rejected.
    pub score: Option<f64>,
    /// The preferred constraints this peer does not meet (`tier edge`), relaxed ones left out.
    pub unmet: Vec<String>,
}

/// Where a function or shard runs, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The policy that ranked the candidates.
    pub policy: Policy,
    /// How many peers were wanted (`Requirements::replicas`, at least 1).
    pub replicas: usize,
    /// The chosen peers, in order (the first is the primary); at most `replicas`.
    pub chosen: Vec<String>,
    /// Why no peer could be chosen (a hard constraint nobody meets, or no live peer).
    pub unplaceable: Option<String>,
    /// Which preferred constraints were relaxed or missed, when some were.
    pub fallback: Option<String>,
    /// Why fewer than `replicas` peers were chosen, when so.
    pub shortfall: Option<String>,
    /// One per candidate: chosen first (in order), then the others that fit (best first),
    /// then the rejected ones (by peer id).
    pub verdicts: Vec<Verdict>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (p, name) in [
            (Policy::Topology, "topology"),
            (Policy::Spread, "spread"),
            (Policy::LeastLoaded, "least-loaded"),
            (Policy::Latency, "latency"),
        ] {
            assert_eq!(p.to_string(), name);
            assert_eq!(name.parse::<Policy>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<Policy>(&format!("\"{name}\"")).unwrap(),
                p
            );
        }
        assert_eq!(Policy::default(), Policy::Topology);
    }

    #[test]
    fn a_bad_name_lists_the_allowed_ones() {
        for bad in ["", "closest", "least_loaded", "Latency"] {
            let e = bad.parse::<Policy>().unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "unknown placement policy {bad:?}: use topology, spread, least-loaded or latency"
                )
            );
        }
        assert!(serde_json::from_str::<Policy>("\"fastest\"").is_err());
    }
}

//! The placement policies, by name.

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
    /// Lowest advertised load first (see [`crate::load_score`]).
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

//! Placement decisions as the metadata group holds them: which peers run a function, read
//! from this node's replica, decided by [`canal_placement`] from the peer table, topology and
//! the stored measurements, and committed. The placement job ([`crate::placer`]) and the
//! functions service (a deploy's first placement, [`crate::functions::Functions::runs_here`])
//! share it; it knows neither.

use canal_consensus::keys;
use canal_consensus::{ClientError, Consensus, GroupId, Op, Transport};
use canal_dht::topology::{distance, peer_key, topic_key};
use canal_dht::{DhtHandle, PeerView};
use canal_placement::{Candidate, Decision, Estimates, Policy};
use canal_proto::api::{Measurement, Placed};
use canal_proto::function::FunctionSpec;
use canal_proto::time::now_ms;
use canal_proto::{Capabilities, Topic, wire};
use std::str::FromStr;
use tracing::info;

/// Why a placement was not committed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The decision does not encode (it always should).
    #[error("cannot encode the placement: {0}")]
    Encode(String),
    /// The metadata group did not commit it.
    #[error(transparent)]
    Consensus(#[from] ClientError),
}

/// Where placement reads the peers it chooses from: the mesh's peer table on a node, a list
/// of its own in a test.
pub trait PeerSource: Send + Sync + 'static {
    /// Every peer known alive, this node included.
    fn peers(&self) -> Vec<PeerView>;
}

impl PeerSource for DhtHandle {
    fn peers(&self) -> Vec<PeerView> {
        DhtHandle::peers(self)
    }
}

/// The key of a function in the Kademlia keyspace: topology ranks peers by their distance
/// to it.
fn function_dht_key(name: &str) -> Option<canal_dht::topology::Key> {
    Topic::new(&format!("fn/{name}"))
        .ok()
        .map(|t| topic_key(&t))
}

/// The committed placement of `function`, from this node's replica.
pub fn placed<T: Transport>(consensus: &Consensus<T>, function: &str) -> Option<Placed> {
    let sm = consensus.state_machine(GroupId::METADATA).ok()?;
    sm.record(&keys::placements::<Placed>(), function).ok()?
}

/// Every stored measurement, as estimates.
fn estimates<T: Transport>(consensus: &Consensus<T>) -> Estimates {
    let mut est = Estimates::new();
    let Ok(sm) = consensus.state_machine(GroupId::METADATA) else {
        return est;
    };
    let measurements = sm
        .scan_table(&keys::measurements::<Measurement>())
        .unwrap_or_default();
    for ((function, peer), m) in measurements {
        est.observe(&function, &peer, m.exec_ms);
    }
    est
}

/// The candidates for `spec`: every peer in the table, ranked by distance to the
/// function's key, with the round trip from this node; peers chosen before that are gone
/// from the table appear as not alive, so the explanation says what became of them.
pub fn candidates(
    mut peers: Vec<PeerView>,
    spec: &FunctionSpec,
    previous: Option<&Decision>,
) -> Vec<Candidate> {
    let key = function_dht_key(&spec.name);
    peers.sort_by_key(|p| key.map(|k| distance(&k, &peer_key(&p.peer_id))));
    let mut out: Vec<Candidate> = peers
        .into_iter()
        .enumerate()
        .map(|(rank, p)| Candidate {
            peer_id: p.peer_id.to_base58(),
            rtt_ms: if p.is_self {
                Some(0.0)
            } else {
                p.rtt.map(|d| d.as_secs_f64() * 1000.0)
            },
            caps: p.caps,
            alive: true,
            distance_rank: rank,
        })
        .collect();
    if let Some(prev) = previous {
        for gone in prev.chosen.iter() {
            if !out.iter().any(|c| &c.peer_id == gone) {
                out.push(Candidate {
                    peer_id: gone.clone(),
                    caps: Capabilities {
                        peer_id: gone.clone(),
                        ..Capabilities::default()
                    },
                    alive: false,
                    distance_rank: usize::MAX,
                    rtt_ms: None,
                });
            }
        }
    }
    out
}

/// The policy a function asked for (a stored name this build does not know: topology).
pub fn policy_of(spec: &FunctionSpec) -> Policy {
    Policy::from_str(&spec.policy).unwrap_or_default()
}

/// What placement would decide for `spec` now, from this node's view.
pub fn decide_now<T: Transport>(
    consensus: &Consensus<T>,
    peers: &dyn PeerSource,
    spec: &FunctionSpec,
) -> Decision {
    let previous = placed(consensus, &spec.name).map(|p| p.decision);
    let cands = candidates(peers.peers(), spec, previous.as_ref());
    canal_placement::decide(
        &spec.requirements,
        policy_of(spec),
        &spec.name,
        &cands,
        &estimates(consensus),
        previous.as_ref(),
    )
}

/// Whether two decisions choose the same thing (the explanations may differ).
pub fn same_choice(a: &Decision, b: &Decision) -> bool {
    a.policy == b.policy
        && a.chosen == b.chosen
        && a.unplaceable == b.unplaceable
        && a.fallback == b.fallback
}

/// Commits `decision` as `spec`'s placement.
pub async fn commit<T: Transport>(
    consensus: &Consensus<T>,
    spec: &FunctionSpec,
    decision: Decision,
) -> Result<(), PlacementError> {
    info!(
        function = %spec.name,
        policy = %decision.policy,
        chosen = ?decision.chosen,
        unplaceable = ?decision.unplaceable,
        "placement changed"
    );
    let value = wire::encode(&Placed {
        decision,
        decided_ms: now_ms(),
    })
    .map_err(|e| PlacementError::Encode(e.to_string()))?;
    consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Placement(spec.name.clone()),
                value: Some(value),
            },
        )
        .await?;
    Ok(())
}

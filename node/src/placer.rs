//! Placement on a running node: feeding [`canal_placement`] the peer table, topology and
//! measurements, and committing its decisions.
//!
//! ```text
//!   every node:   invocations ─> local EWMA ─(every 2 s, when changed)─> metadata \x01M/...
//!   data leader:  peer table + RTT + measurements + previous decision
//!                   ─> canal_placement::decide ─(when the choice changes)─> metadata \x01P/...
//!   executors:    Functions::runs_here = "am I the first chosen peer?"
//! ```
//!
//! The decider is the data group's leader because that is where QoS 1 events enter the
//! function's path (the log), so the round trips it measures are the ones events pay.

use crate::functions::{Functions, FunctionsError, STATE_GROUP};
use canal_consensus::functions::{decision_key, measurement_prefix};
use canal_consensus::{GroupId, Op, Request, Transport};
use canal_dht::topology::{distance, peer_key, topic_key};
use canal_dht::{DhtHandle, PeerView};
use canal_placement::{Candidate, Decision, Estimates, Policy};
use canal_proto::function::FunctionSpec;
use canal_proto::{Capabilities, Topic, wire};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

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

/// A peer's execution-time measurement of a function, as stored in the metadata group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The EWMA of the execution time, in milliseconds.
    pub exec_ms: f64,
    /// How many invocations it summarises.
    pub samples: u64,
}

/// A function's committed placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    /// The decision, with the explanation it was made with.
    pub decision: Decision,
    /// When it was made, ms since the Unix epoch.
    pub decided_ms: u64,
}

/// What `GET /v1/functions/{name}/placement` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementAnswer {
    /// The function.
    pub function: String,
    /// Its policy.
    pub policy: String,
    /// The decision in force (what executors follow), if one was made.
    pub committed: Option<Placed>,
    /// What placement would decide now, from the answering node's view, with a verdict for
    /// every candidate.
    pub live: Decision,
    /// The peer that answered (its round trips are the ones in `live`).
    pub answered_by: String,
}

/// The key of a function in the Kademlia keyspace: topology ranks peers by their distance
/// to it.
fn function_key(name: &str) -> Option<canal_dht::topology::Key> {
    Topic::new(&format!("fn/{name}"))
        .ok()
        .map(|t| topic_key(&t))
}

/// The committed placement of `function`, from this node's replica.
pub fn placed<T: Transport>(functions: &Functions<T>, function: &str) -> Option<Placed> {
    let sm = functions.consensus.state_machine(GroupId::METADATA).ok()?;
    let b = sm.get(&decision_key(function)).ok()??;
    wire::decode(&b).ok()
}

/// Every stored measurement, as estimates.
fn estimates<T: Transport>(functions: &Functions<T>) -> Estimates {
    let mut est = Estimates::new();
    let Ok(sm) = functions.consensus.state_machine(GroupId::METADATA) else {
        return est;
    };
    for (k, v) in sm.scan(measurement_prefix()).unwrap_or_default() {
        let Some(rest) = k.strip_prefix(measurement_prefix()) else {
            continue;
        };
        let Some((function, peer)) = rest.split_once('\u{0}') else {
            continue;
        };
        if let Ok(m) = wire::decode::<Measurement>(&v) {
            est.observe(function, peer, m.exec_ms);
        }
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
    let key = function_key(&spec.name);
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
pub fn decide_now<T: Transport>(functions: &Functions<T>, spec: &FunctionSpec) -> Decision {
    let previous = placed(functions, &spec.name).map(|p| p.decision);
    let cands = candidates(functions.peers.peers(), spec, previous.as_ref());
    canal_placement::decide(
        &spec.requirements,
        policy_of(spec),
        &spec.name,
        &cands,
        &estimates(functions),
        previous.as_ref(),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether two decisions choose the same thing (the explanations may differ).
fn same_choice(a: &Decision, b: &Decision) -> bool {
    a.policy == b.policy
        && a.chosen == b.chosen
        && a.unplaceable == b.unplaceable
        && a.fallback == b.fallback
}

/// How often the placement job looks at the peers and the measurements.
pub const PLACE_EVERY: Duration = Duration::from_secs(1);

/// The placement job, a [`canal_worker::Worker`]: every [`PLACE_EVERY`] it decides while this
/// node leads the data group, and every other round it reports this node's measurements.
pub struct Placer<T: Transport> {
    functions: Arc<Functions<T>>,
    reported: HashMap<String, f64>,
    round: u64,
    tick: tokio::time::Interval,
}

impl<T: Transport> Placer<T> {
    /// The job for `functions`, not started yet ([`spawn`] starts it).
    pub fn new(functions: Arc<Functions<T>>) -> Self {
        Placer {
            functions,
            reported: HashMap::new(),
            round: 0,
            tick: canal_worker::ticker(PLACE_EVERY),
        }
    }
}

impl<T: Transport> canal_worker::Worker for Placer<T> {
    fn name(&self) -> &'static str {
        "placer"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        self.round += 1;
        if self.round.is_multiple_of(2) {
            report(&self.functions, &mut self.reported).await;
        }
        let leads = self
            .functions
            .consensus
            .metrics(STATE_GROUP)
            .map(|m| m.current_leader == Some(self.functions.consensus.node_id()))
            .unwrap_or(false);
        if leads {
            place_all(&self.functions).await;
        }
        canal_worker::Flow::Continue
    }
}

/// Starts the placement job: reporting this node's measurements, and deciding while this
/// node leads the data group.
pub fn spawn<T: Transport>(functions: Arc<Functions<T>>) -> canal_worker::WorkerHandle {
    canal_worker::spawn(Placer::new(functions))
}

/// Writes this node's execution-time estimates that moved by more than 10% since the last
/// report.
async fn report<T: Transport>(functions: &Functions<T>, reported: &mut HashMap<String, f64>) {
    let mine: Vec<(String, f64, u64)> = {
        let est = functions
            .estimates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        functions
            .functions()
            .unwrap_or_default()
            .iter()
            .filter_map(|f| {
                est.exec_ms(&f.name, &functions.peer_id)
                    .map(|ms| (f.name.clone(), ms, est.samples(&f.name, &functions.peer_id)))
            })
            .collect()
    };
    for (function, exec_ms, samples) in mine {
        let last = reported.get(&function).copied();
        if last.is_some_and(|l| (exec_ms - l).abs() <= 0.1 * l.max(0.001)) {
            continue;
        }
        let Ok(value) = wire::encode(&Measurement { exec_ms, samples }) else {
            continue;
        };
        let w = functions
            .consensus
            .write_batched(
                GroupId::METADATA,
                Request {
                    id: None,
                    op: Op::Internal {
                        key: canal_consensus::InternalKey::Measurement {
                            function: function.clone(),
                            peer: functions.peer_id.clone(),
                        },
                        value: Some(value),
                    },
                },
            )
            .await;
        if w.is_ok() {
            reported.insert(function, exec_ms);
        }
    }
}

/// Commits `decision` as `spec`'s placement.
pub async fn commit<T: Transport>(
    functions: &Functions<T>,
    spec: &FunctionSpec,
    decision: Decision,
) -> Result<(), FunctionsError> {
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
    .map_err(|e| FunctionsError::Internal(format!("cannot encode the placement: {e}")))?;
    functions
        .consensus
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

/// Decides every function's placement and commits the ones whose choice changed.
async fn place_all<T: Transport>(functions: &Functions<T>) {
    for spec in functions.functions().unwrap_or_default() {
        let previous = placed(functions, &spec.name);
        let next = decide_now(functions, &spec);
        if previous
            .as_ref()
            .is_some_and(|p| same_choice(&p.decision, &next))
        {
            continue;
        }
        if let Err(e) = commit(functions, &spec, next).await {
            debug!(function = %spec.name, error = ?e, "placement not committed; next round");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, Cluster, FixedPeers};
    use libp2p::PeerId;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_placer_commits_a_decision_and_re_decides_when_its_peer_goes() {
        let cluster = Cluster::formed(1).await;
        let me = cluster.members[0].peer;
        let all: Vec<PeerId> = std::iter::once(me)
            .chain((0..3).map(|_| PeerId::random()))
            .collect();
        let peers = FixedPeers::of(&all);
        let f = testkit::functions(&cluster.members[0], peers.clone());
        testkit::deploy(&f, "up", "uppercase").await;
        // The deploy committed the first decision: one of the four, alive.
        let first = placed(&f, "up").expect("the deploy commits a placement");
        assert_eq!(first.decision.chosen.len(), 1, "{first:?}");
        let gone = first.decision.chosen[0].clone();
        assert!(all.iter().any(|p| p.to_base58() == gone));
        // Nothing changed: the job leaves the decision as it is.
        let job = spawn(f.clone());
        tokio::time::sleep(PLACE_EVERY * 2).await;
        assert_eq!(
            placed(&f, "up").map(|p| p.decided_ms),
            Some(first.decided_ms)
        );
        // Its peer leaves the table: the job (this node leads the data group) moves it.
        peers.remove(&gone);
        testkit::until("the placement to move", Duration::from_secs(10), || {
            placed(&f, "up").is_some_and(|p| p.decision.chosen.first() != Some(&gone))
        })
        .await;
        let now = placed(&f, "up").expect("a placement");
        assert_eq!(now.decision.chosen.len(), 1, "{now:?}");
        assert!(
            all.iter()
                .any(|p| p.to_base58() == now.decision.chosen[0] && p.to_base58() != gone)
        );
        assert!(
            job.shutdown(Duration::from_secs(5)).await,
            "the placer did not stop within its deadline"
        );
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_does_not_place() {
        let cluster = Cluster::formed(3).await;
        let leader = cluster.leader(STATE_GROUP).await;
        let follower = (leader + 1) % 3;
        let peers = FixedPeers::of(&[cluster.members[follower].peer]);
        let f = testkit::functions(&cluster.members[follower], peers.clone());
        // A deploy on a follower is forwarded to the leader, and commits a first placement.
        testkit::deploy(&f, "up", "uppercase").await;
        testkit::until(
            "the follower's replica to hold the placement",
            Duration::from_secs(10),
            || placed(&f, "up").is_some(),
        )
        .await;
        let first = placed(&f, "up").expect("the deploy commits a placement");
        let job = spawn(f.clone());
        peers.remove(&first.decision.chosen[0]);
        tokio::time::sleep(PLACE_EVERY * 3).await;
        // Only the data group's leader decides: the follower's job changed nothing.
        assert_eq!(placed(&f, "up"), Some(first));
        assert!(job.shutdown(Duration::from_secs(5)).await);
        cluster.shutdown().await;
    }
}

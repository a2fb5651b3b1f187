//! The placement job on a running node: feeding [`canal_placement`] the peer table, topology
//! and measurements ([`crate::placement`]), and committing its decisions.
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

use crate::functions::Functions;
use crate::placement::{commit, decide_now, placed, same_choice};
use canal_consensus::{GroupId, Op, Request, Transport};
use canal_proto::api::Measurement;
use canal_proto::wire;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

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
        // Only a node leading some group that holds functions places anything.
        if let Ok(route) = self.functions.consensus.route()
            && self.functions.consensus.groups().into_iter().any(|g| {
                g != canal_consensus::GroupId::METADATA && self.functions.consensus.is_leader(g)
            })
        {
            place_all(&self.functions, route).await;
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

/// Decides every function's placement and commits the ones whose choice changed.
async fn place_all<T: Transport>(functions: &Functions<T>, route: canal_consensus::Route) {
    for spec in functions.functions().unwrap_or_default() {
        // The leader of the group its executions commit to places a function.
        if !functions.consensus.is_leader(route.function(&spec.name)) {
            continue;
        }
        let previous = placed(&functions.consensus, &spec.name);
        let next = decide_now(&functions.consensus, &*functions.peers, &spec);
        if previous
            .as_ref()
            .is_some_and(|p| same_choice(&p.decision, &next))
        {
            continue;
        }
        if let Err(e) = commit(&functions.consensus, &spec, next).await {
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
        let first = placed(&f.consensus, "up").expect("the deploy commits a placement");
        assert_eq!(first.decision.chosen.len(), 1, "{first:?}");
        let gone = first.decision.chosen[0].clone();
        assert!(all.iter().any(|p| p.to_base58() == gone));
        // Nothing changed: the job leaves the decision as it is.
        let job = spawn(f.clone());
        tokio::time::sleep(PLACE_EVERY * 2).await;
        assert_eq!(
            placed(&f.consensus, "up").map(|p| p.decided_ms),
            Some(first.decided_ms)
        );
        // Its peer leaves the table: the job (this node leads the data group) moves it.
        peers.remove(&gone);
        testkit::until("the placement to move", Duration::from_secs(10), || {
            placed(&f.consensus, "up").is_some_and(|p| p.decision.chosen.first() != Some(&gone))
        })
        .await;
        let now = placed(&f.consensus, "up").expect("a placement");
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
        let leader = cluster
            .leader(canal_consensus::routing::DEFAULT_GROUP)
            .await;
        let follower = (leader + 1) % 3;
        let peers = FixedPeers::of(&[cluster.members[follower].peer]);
        let f = testkit::functions(&cluster.members[follower], peers.clone());
        // A deploy on a follower is forwarded to the leader, and commits a first placement.
        testkit::deploy(&f, "up", "uppercase").await;
        testkit::until(
            "the follower's replica to hold the placement",
            Duration::from_secs(10),
            || placed(&f.consensus, "up").is_some(),
        )
        .await;
        let first = placed(&f.consensus, "up").expect("the deploy commits a placement");
        let job = spawn(f.clone());
        peers.remove(&first.decision.chosen[0]);
        tokio::time::sleep(PLACE_EVERY * 3).await;
        // Only the data group's leader decides: the follower's job changed nothing.
        assert_eq!(placed(&f.consensus, "up"), Some(first));
        assert!(job.shutdown(Duration::from_secs(5)).await);
        cluster.shutdown().await;
    }
}

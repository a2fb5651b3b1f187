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

use crate::functions::{Functions, STATE_GROUP};
use canal_consensus::functions::{decision_key, measurement_prefix};
use canal_consensus::{GroupId, Op, Request};
use canal_dht::DhtHandle;
use canal_dht::topology::{distance, peer_key, topic_key};
use canal_placement::{Candidate, Decision, Estimates, Policy};
use canal_proto::function::FunctionSpec;
use canal_proto::{Capabilities, Topic, wire};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info};

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
pub fn placed(functions: &Functions, function: &str) -> Option<Placed> {
    let sm = functions.consensus.state_machine(GroupId::METADATA).ok()?;
    let b = sm.get(&decision_key(function)).ok()??;
    wire::decode(&b).ok()
}

/// Every stored measurement, as estimates.
fn estimates(functions: &Functions) -> Estimates {
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
    dht: &DhtHandle,
    spec: &FunctionSpec,
    previous: Option<&Decision>,
) -> Vec<Candidate> {
    let key = function_key(&spec.name);
    let mut peers = dht.peers();
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
pub fn decide_now(functions: &Functions, dht: &DhtHandle, spec: &FunctionSpec) -> Decision {
    let previous = placed(functions, &spec.name).map(|p| p.decision);
    let cands = candidates(dht, spec, previous.as_ref());
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

/// Starts the placement job: reporting this node's measurements, and deciding while this
/// node leads the data group.
pub fn spawn(
    functions: Arc<Functions>,
    dht: DhtHandle,
    mut closing: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reported: HashMap<String, f64> = HashMap::new();
        let mut tick = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            tick += 1;
            if tick.is_multiple_of(2) {
                report(&functions, &mut reported).await;
            }
            let leads = functions
                .consensus
                .metrics(STATE_GROUP)
                .map(|m| m.current_leader == Some(functions.consensus.node_id()))
                .unwrap_or(false);
            if leads {
                place_all(&functions, &dht).await;
            }
        }
    })
}

/// Writes this node's execution-time estimates that moved by more than 10% since the last
/// report.
async fn report(functions: &Functions, reported: &mut HashMap<String, f64>) {
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
pub async fn commit(
    functions: &Functions,
    spec: &FunctionSpec,
    decision: Decision,
) -> Result<(), crate::http::ApiError> {
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
    .map_err(|e| {
        crate::http::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )
    })?;
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
async fn place_all(functions: &Functions, dht: &DhtHandle) {
    for spec in functions.functions().unwrap_or_default() {
        let previous = placed(functions, &spec.name);
        let next = decide_now(functions, dht, &spec);
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

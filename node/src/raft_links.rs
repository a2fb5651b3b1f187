//! How this node's Raft links fare: a member whose measured round trip comes close to the
//! Raft RPC timeout is about to stop committing (openraft drops every answer later than the
//! timeout), so the node says so, once per member every few minutes, naming the flag to
//! raise, and exports the round trips it compares.

use canal_consensus::{Consensus, Transport};
use canal_dht::DhtHandle;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tracing::warn;

// An append frame must fit what the mesh's RPC channel carries, or replication of a large
// batch would fail as "unreachable" and be retried as it is forever.
const _: () = assert!(
    canal_consensus::network::MAX_APPEND_BYTES + 1024 < canal_dht::rpc::MAX_RPC_BYTES,
    "MAX_APPEND_BYTES must stay below the RPC frame limit"
);

/// The share of the RPC timeout above which a member's round trip is reported.
pub const SLOW_SHARE: f64 = 0.8;
/// How often the same slow member is warned about.
const WARN_EVERY: Duration = Duration::from_secs(300);
/// How often round trips are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The watcher's metrics and settings; [`RaftLinks::spawn`] starts it.
pub struct RaftLinks {
    rpc_timeout: Duration,
    rtt_ms: Family<Vec<(String, String)>, Gauge>,
    slow: Gauge,
}

impl RaftLinks {
    /// Registers `canal_raft_member_rtt_milliseconds{peer}`, `canal_raft_slow_members` and
    /// `canal_raft_rpc_timeout_milliseconds`.
    pub fn register(registry: &mut Registry, rpc_timeout: Duration) -> RaftLinks {
        let links = RaftLinks {
            rpc_timeout,
            rtt_ms: Family::default(),
            slow: Gauge::default(),
        };
        let timeout = Gauge::<i64>::default();
        timeout.set(rpc_timeout.as_millis() as i64);
        registry.register(
            "canal_raft_member_rtt_milliseconds",
            "Measured ping round trip to each Raft member of this node's groups",
            links.rtt_ms.clone(),
        );
        registry.register(
            "canal_raft_slow_members",
            "Raft members whose round trip is over 80% of the Raft RPC timeout (raise --raft-election-timeout-ms)",
            links.slow.clone(),
        );
        registry.register(
            "canal_raft_rpc_timeout_milliseconds",
            "How long a Raft leader waits for a follower's answer (2/3 of --raft-election-timeout-ms)",
            timeout,
        );
        links
    }

    /// Starts the watcher: it checks the members' round trips every few seconds.
    pub fn spawn<T: Transport>(
        self,
        consensus: Consensus<T>,
        dht: DhtHandle,
    ) -> canal_worker::WorkerHandle {
        canal_worker::spawn(LinkWatch {
            links: self,
            consensus,
            dht,
            warned: HashMap::new(),
            tick: canal_worker::ticker(CHECK_EVERY),
        })
    }
}

/// The watcher, a [`canal_worker::Worker`].
struct LinkWatch<T: Transport> {
    links: RaftLinks,
    consensus: Consensus<T>,
    dht: DhtHandle,
    warned: HashMap<String, Instant>,
    tick: tokio::time::Interval,
}

impl<T: Transport> canal_worker::Worker for LinkWatch<T> {
    fn name(&self) -> &'static str {
        "raft-links"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        let mut members = BTreeMap::new();
        for g in self.consensus.groups() {
            if let Ok(m) = self.consensus.metrics(g) {
                for (id, node) in m.membership_config.membership().nodes() {
                    if *id != self.consensus.node_id() {
                        members.insert(node.peer_id.clone(), *id);
                    }
                }
            }
        }
        let rtts: HashMap<String, Duration> = self
            .dht
            .peers()
            .into_iter()
            .filter_map(|p| Some((p.peer_id.to_base58(), p.rtt?)))
            .collect();
        let mut slow = 0;
        for peer in members.keys() {
            let Some(rtt) = rtts.get(peer) else { continue };
            self.links
                .rtt_ms
                .get_or_create(&vec![("peer".to_string(), peer.clone())])
                .set(rtt.as_millis() as i64);
            if !is_slow(*rtt, self.links.rpc_timeout) {
                continue;
            }
            slow += 1;
            let due = self
                .warned
                .get(peer)
                .is_none_or(|at| at.elapsed() >= WARN_EVERY);
            if due {
                self.warned.insert(peer.clone(), Instant::now());
                warn!(
                    peer = %peer,
                    rtt_ms = rtt.as_millis() as u64,
                    rpc_timeout_ms = self.links.rpc_timeout.as_millis() as u64,
                    "the round trip to Raft member {peer} is over 80% of the Raft RPC timeout: replication to it will time out and writes may stop committing; raise --raft-election-timeout-ms on every node (the RPC timeout is 2/3 of it) above 1.5x the longest round trip between members"
                );
            }
        }
        self.warned.retain(|p, _| members.contains_key(p));
        self.links.slow.set(slow);
        canal_worker::Flow::Continue
    }
}

/// Whether a round trip leaves too little room under the RPC timeout.
pub fn is_slow(rtt: Duration, rpc_timeout: Duration) -> bool {
    rtt.as_secs_f64() > rpc_timeout.as_secs_f64() * SLOW_SHARE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_near_the_timeout_is_slow() {
        let t = Duration::from_millis(400);
        assert!(!is_slow(Duration::from_millis(60), t));
        assert!(!is_slow(Duration::from_millis(320), t));
        assert!(is_slow(Duration::from_millis(321), t));
        // The fast setting (200 ms elections, 133 ms RPC timeout) cannot carry a 120 ms link.
        assert!(is_slow(
            Duration::from_millis(120),
            Duration::from_millis(133)
        ));
    }
}

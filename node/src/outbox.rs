//! The outbox relay: moves the outputs a function's group kept for topics of other groups
//! ([`canal_consensus::functions::Outbound`]) to those groups, exactly once.
//!
//! ```text
//!   source group (the function's):  Effects{cursor, state, outbox}  ─ one entry
//!   relay (on the source's leader):  outbox, in seq order ─> Deliver{producer, seq, event}
//!                                    ─> target group (dedups by producer seq)
//!                                    answered ─> OutboxTrim{producer, upto} ─> source group
//! ```
//!
//! The relay keeps only where it stands in memory: a relay that crashes, or a new leader,
//! starts again from the oldest entry the outbox still holds and re-sends what was delivered
//! but not trimmed yet; the target answers those as duplicates (the producer's sequence
//! number is at or below the last one it applied), so each output lands once, in sequence
//! order. Two relays at once (an old leader that does not know yet) cannot land one twice
//! either: the target applies each sequence number once and refuses a gap.

use canal_consensus::functions::{MAX_OUTBOX_ENTRIES, OutboxMeta};
use canal_consensus::{Consensus, GroupId, Op, Request, StateMachine, Transport};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::time::Duration;
use tracing::{debug, warn};

/// How often the relay looks at the outboxes of the groups this node leads.
pub const RELAY_EVERY: Duration = Duration::from_millis(20);
/// The most outbox entries one delivery entry carries.
pub const MAX_DELIVERY_ENTRIES: usize = 256;
/// A delivery entry stops growing once it carries this many bytes (one entry always goes:
/// it came from one Effects entry, which fitted).
pub const MAX_DELIVERY_BYTES: usize = 4 << 20;

type Labels = Vec<(String, String)>;

/// The relay's metrics.
#[derive(Clone, Default)]
pub struct OutboxMetrics {
    /// Outbox entries waiting, by source group.
    pub entries: Family<Labels, Gauge>,
    /// Outbox entries the target applied, by source group.
    pub delivered: Family<Labels, Counter>,
    /// Outbox entries the target had applied already (a re-send after a restart or a lost
    /// answer), by source group.
    pub duplicates: Family<Labels, Counter>,
    /// Deliveries the target refused (a gap: the relay starts again from the outbox), by
    /// source group.
    pub refused: Family<Labels, Counter>,
}

impl OutboxMetrics {
    /// Registers `canal_outbox_entries{group}`, `canal_outbox_delivered_total{group}`,
    /// `canal_outbox_duplicates_total{group}` and `canal_outbox_refused_total{group}`.
    pub fn register(registry: &mut Registry) -> OutboxMetrics {
        let m = OutboxMetrics::default();
        registry.register(
            "canal_outbox_entries",
            format!(
                "Outputs for other groups waiting in the outboxes of the groups this node leads, by source group (at most MAX_OUTBOX_ENTRIES = {MAX_OUTBOX_ENTRIES} per producer; a full outbox refuses the function's next step)"
            ),
            m.entries.clone(),
        );
        registry.register(
            "canal_outbox_delivered",
            "Outbox entries applied by their target group, by source group",
            m.delivered.clone(),
        );
        registry.register(
            "canal_outbox_duplicates",
            "Outbox entries re-sent that their target group had applied already (answered as success, applied once), by source group",
            m.duplicates.clone(),
        );
        registry.register(
            "canal_outbox_refused",
            "Deliveries refused by their target group as a gap in the producer's sequence (the relay starts again from the outbox), by source group",
            m.refused.clone(),
        );
        m
    }
}

fn group_label(g: GroupId) -> Labels {
    vec![("group".into(), g.0.to_string())]
}

/// The outbox relay, a [`canal_worker::Worker`]: every [`RELAY_EVERY`] it delivers what the
/// outboxes of the data groups this node leads hold, and trims what was delivered.
pub struct OutboxRelay<T: Transport> {
    consensus: Consensus<T>,
    metrics: OutboxMetrics,
    /// Per source group and producer, the next sequence number to send: the one after the
    /// last this relay heard delivered (set from answers only, so everything below it is
    /// in the target). Forgotten when this node stops leading the group.
    next: HashMap<(GroupId, String), u64>,
    tick: tokio::time::Interval,
    /// Per group, the applied index at which its outboxes were all empty: until the group
    /// applies more, there is nothing to look at (an idle group costs one watch read).
    idle: HashMap<GroupId, u64>,
    /// The groups whose `canal_outbox_entries` this node set while it led them.
    reported: std::collections::BTreeSet<GroupId>,
    /// Whether it trims after a delivery (tests turn it off to act out a relay that always
    /// crashes between the two).
    trims: bool,
}

impl<T: Transport> OutboxRelay<T> {
    /// The relay of `consensus`'s groups, not started yet.
    pub fn new(consensus: Consensus<T>, metrics: OutboxMetrics) -> Self {
        OutboxRelay {
            consensus,
            metrics,
            next: HashMap::new(),
            idle: HashMap::new(),
            reported: Default::default(),
            tick: canal_worker::ticker(RELAY_EVERY),
            trims: true,
        }
    }

    /// A relay that never trims: as one that crashes after every delivery, before its trim.
    #[cfg(test)]
    pub(crate) fn without_trims(mut self) -> Self {
        self.trims = false;
        self
    }

    /// One pass over the outboxes of group `g`, which this node leads; true when they were
    /// all empty.
    async fn relay_group(&mut self, g: GroupId, sm: &StateMachine) -> bool {
        let producers = match sm.outbox_producers() {
            Ok(p) => p,
            Err(e) => {
                warn!(group = %g, error = %e, "cannot read the outboxes");
                return false;
            }
        };
        let waiting: u64 = producers.iter().map(|(_, m)| m.len()).sum();
        self.metrics
            .entries
            .get_or_create(&group_label(g))
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        for (producer, meta) in producers {
            if !meta.is_empty() {
                self.deliver(g, sm, &producer, meta).await;
            }
        }
        waiting == 0
    }

    /// Delivers the next entries of `producer`'s outbox in group `g` as one entry of their
    /// target group, then trims what the answer says was applied.
    async fn deliver(&mut self, g: GroupId, sm: &StateMachine, producer: &str, meta: OutboxMeta) {
        let key = (g, producer.to_string());
        let from = self
            .next
            .get(&key)
            .copied()
            .filter(|n| *n >= meta.first)
            .unwrap_or(meta.first);
        if from >= meta.next {
            // All sent and answered; the trim that followed may have been lost.
            if self.trims && from > meta.first {
                self.trim(g, producer, from - 1).await;
            }
            return;
        }
        let entries = match sm.outbox(producer, from, MAX_DELIVERY_ENTRIES) {
            Ok(e) => e,
            Err(e) => {
                warn!(group = %g, producer, error = %e, "cannot read the outbox");
                return;
            }
        };
        let Some(target) = entries.first().map(|(_, e)| e.target) else {
            return;
        };
        let mut seqs = Vec::new();
        let mut requests = Vec::new();
        let mut bytes = 0;
        for (seq, e) in entries {
            // A producer's entries all go to one target (its id names it); and a gap in
            // what the outbox returned would be refused, so the entry stops before it.
            let size = e.event.payload.len() + e.event.topic.len() + 256;
            if e.target != target
                || seq != from + seqs.len() as u64
                || (!requests.is_empty() && bytes + size > MAX_DELIVERY_BYTES)
            {
                break;
            }
            bytes += size;
            seqs.push(seq);
            requests.push(Request {
                id: None,
                op: Op::Deliver {
                    producer: producer.to_string(),
                    seq,
                    event: e.event,
                },
            });
        }
        let op = if requests.len() == 1 {
            requests.remove(0).op
        } else {
            Op::Batch(requests)
        };
        let one = seqs.len() == 1;
        let answer = match self.consensus.write_op(target, op).await {
            Ok(a) => a,
            Err(e) => {
                // Sent again next time: the target applies it once whatever happened.
                debug!(group = %g, %target, producer, error = %e, "delivery failed; it is sent again");
                return;
            }
        };
        let answers = if one { vec![answer] } else { answer.batch };
        let label = group_label(g);
        // Only what this answer says was applied is trimmed: never an entry the relay
        // only believes delivered.
        let mut heard = None;
        for (seq, a) in seqs.iter().zip(answers) {
            match a.refused {
                None => {
                    if a.duplicate {
                        self.metrics.duplicates.get_or_create(&label).inc();
                    } else {
                        self.metrics.delivered.get_or_create(&label).inc();
                    }
                    heard = Some(*seq);
                }
                Some(why) => {
                    self.metrics.refused.get_or_create(&label).inc();
                    warn!(group = %g, %target, producer, seq, %why, "delivery refused; starting again from the outbox");
                    break;
                }
            }
        }
        match heard {
            Some(last) if Some(&last) == seqs.last() => {
                self.next.insert(key, last + 1);
            }
            // Refused part-way (or not answered in full): start again from what the outbox
            // holds.
            _ => {
                self.next.remove(&key);
            }
        }
        if let Some(last) = heard
            && self.trims
        {
            self.trim(g, producer, last).await;
        }
    }

    /// Trims `producer`'s outbox in `g` up to `upto`, which its target has applied.
    async fn trim(&self, g: GroupId, producer: &str, upto: u64) {
        let op = Op::OutboxTrim {
            producer: producer.to_string(),
            upto,
        };
        if let Err(e) = self.consensus.write_op(g, op).await {
            // The next pass trims again, at least this far.
            debug!(group = %g, producer, error = %e, "outbox trim failed");
        }
    }
}

impl<T: Transport> canal_worker::Worker for OutboxRelay<T> {
    fn name(&self) -> &'static str {
        "outbox-relay"
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }

    async fn work(&mut self) -> canal_worker::Flow {
        let led: Vec<GroupId> = self
            .consensus
            .groups()
            .into_iter()
            .filter(|g| *g != GroupId::METADATA && self.consensus.is_leader(*g))
            .collect();
        // What a group's relay knew is stale once another node led it.
        self.next.retain(|(g, _), _| led.contains(g));
        self.idle.retain(|g, _| led.contains(g));
        // Another node reports the outboxes of the groups it leads now.
        for g in std::mem::take(&mut self.reported) {
            if !led.contains(&g) {
                self.metrics.entries.get_or_create(&group_label(g)).set(0);
            }
        }
        self.reported.extend(led.iter().copied());
        for g in led {
            let sm = match self.consensus.state_machine(g) {
                Ok(sm) => sm,
                Err(e) => {
                    debug!(group = %g, error = %e, "no state machine");
                    continue;
                }
            };
            // Read before the scan: anything applied after it moves the index.
            let applied = *sm.watch_applied().borrow();
            if self.idle.get(&g) == Some(&applied) {
                continue;
            }
            if self.relay_group(g, &sm).await {
                self.idle.insert(g, applied);
            } else {
                self.idle.remove(&g);
            }
        }
        canal_worker::Flow::Continue
    }
}

/// Starts the relay of `consensus`'s groups.
pub fn spawn<T: Transport>(
    consensus: Consensus<T>,
    metrics: OutboxMetrics,
) -> canal_worker::WorkerHandle {
    canal_worker::spawn(OutboxRelay::new(consensus, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_consensus::functions::{Effects, Outbound, producer_id};
    use canal_consensus::topics::PublishOp;
    use canal_worker::Worker;

    fn outputs(g: GroupId, far: GroupId, n: u8) -> Op {
        Op::Effects(Effects {
            function: "f".into(),
            cursors: Vec::new(),
            state_version: None,
            state: Vec::new(),
            outputs: Vec::new(),
            outbox: (0..n)
                .map(|i| Outbound {
                    producer: producer_id(g, "f", far),
                    target: far,
                    event: PublishOp {
                        topic: "out".into(),
                        id: None,
                        headers: Vec::new(),
                        payload: vec![i],
                        retention: Default::default(),
                    },
                })
                .collect(),
        })
    }

    /// A relay whose position is ahead of what the target applied (a stale one) is refused
    /// as a gap, counts it, and starts again from the outbox; every entry lands once and the
    /// outbox is trimmed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gap_is_refused_and_the_relay_starts_again_from_the_outbox() {
        let cluster = crate::testkit::Cluster::formed(1).await;
        let c = cluster.members[0].consensus.clone();
        let a = canal_consensus::Route::Single.function("f");
        let far = GroupId(9);
        cluster.add_group(far).await;
        assert_eq!(
            c.write_op(a, outputs(a, far, 5)).await.unwrap().refused,
            None
        );
        let producer = producer_id(a, "f", far);
        let metrics = OutboxMetrics::default();
        let mut relay = OutboxRelay::new(c.clone(), metrics.clone());
        relay.next.insert((a, producer.clone()), 3);
        let label = group_label(a);
        assert_eq!(relay.work().await, canal_worker::Flow::Continue);
        assert_eq!(metrics.refused.get_or_create(&label).get(), 1);
        let b = c.state_machine(far).unwrap();
        assert_eq!(b.producer_seq(&producer).unwrap(), None);
        // Nothing was trimmed on the relay's belief alone.
        let sm = c.state_machine(a).unwrap();
        assert_eq!(sm.outbox(&producer, 0, 10).unwrap().len(), 5);
        assert_eq!(metrics.entries.get_or_create(&label).get(), 5);
        relay.work().await;
        let meta = sm
            .outbox_producers()
            .unwrap()
            .into_iter()
            .find(|(p, _)| p == &producer)
            .map(|(_, m)| m)
            .unwrap_or_default();
        assert!(meta.is_empty(), "{meta:?}");
        let payloads: Vec<Vec<u8>> = b
            .events("out", 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(payloads, (0..5u8).map(|i| vec![i]).collect::<Vec<_>>());
        assert_eq!(metrics.delivered.get_or_create(&label).get(), 5);
        // Nothing left: the next pass finds the outbox empty and the gauge at 0.
        relay.work().await;
        assert_eq!(metrics.entries.get_or_create(&label).get(), 0);
        cluster.shutdown().await;
    }
}

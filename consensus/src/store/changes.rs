//! Notices of what an apply changed, for the readers that wait on the log (subscribers,
//! trigger executors): beside the state, never in it, so replicas stay identical however
//! their waiters keep up.
//!
//! Each apply call that appended to, trimmed or moved a cursor on some topics sends one
//! [`Changed`] on a bounded broadcast; sending never waits. A waiter that falls more than
//! [`CHANGE_NOTICES`] notices behind is told to rescan everything
//! ([`ChangeWatch::next`] answers [`Wake::Everything`]), so it can miss no change, only
//! coalesce many into one full pass.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

/// How many notices a waiter may fall behind before it is told to rescan everything.
pub const CHANGE_NOTICES: usize = 1024;

/// What one apply call changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The last index the call applied.
    pub index: u64,
    /// The topics whose log (meta, events) or whose subscription or trigger cursors the call
    /// changed, sorted; `None` when anything may have changed (a snapshot was installed).
    pub topics: Option<Arc<[String]>>,
}

/// What a waiter should look at again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// These topics changed (sorted, at least one).
    Topics(BTreeSet<String>),
    /// Anything may have changed: a snapshot was installed, or the waiter fell behind the
    /// notices.
    Everything,
}

/// A waiter's receiver of [`Changed`] notices, from [`crate::StateMachine::watch_changes`].
pub struct ChangeWatch {
    rx: broadcast::Receiver<Changed>,
}

impl ChangeWatch {
    pub(super) fn new(rx: broadcast::Receiver<Changed>) -> ChangeWatch {
        ChangeWatch { rx }
    }

    /// Waits for the next change, and takes every notice already queued with it, so a
    /// waiter that was busy does one pass for all of them. `None` when the state machine is
    /// gone. Cancel-safe: a notice not taken stays queued.
    pub async fn next(&mut self) -> Option<Wake> {
        let first = match self.rx.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(_)) => return Some(self.drain_all()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        let Some(topics) = first.topics else {
            return Some(self.drain_all());
        };
        let mut set: BTreeSet<String> = topics.iter().cloned().collect();
        loop {
            match self.rx.try_recv() {
                Ok(Changed {
                    topics: Some(t), ..
                }) => set.extend(t.iter().cloned()),
                Ok(Changed { topics: None, .. })
                | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    return Some(self.drain_all());
                }
                Err(_) => return Some(Wake::Topics(set)),
            }
        }
    }

    /// Drops what is queued: the waiter rescans everything anyway.
    fn drain_all(&mut self) -> Wake {
        self.rx = self.rx.resubscribe();
        Wake::Everything
    }
}

/// How many recent [`Changed`] notices a state machine remembers for remote readers
/// ([`ChangeRing`]).
pub const RING_NOTICES: usize = 1024;
/// How many topic names those notices may hold together; past it the oldest go.
pub const RING_TOPICS: usize = 64 * 1024;

/// The recent change notices of one state machine, for remote readers that poll with the
/// last index they heard of (`LogQuery::Changes`): beside the state, never part of it, so it
/// may differ between replicas. It knows every topic changed by the applies after
/// `complete_from` up to `applied`.
#[derive(Debug)]
pub(crate) struct ChangeRing {
    notices: VecDeque<(u64, Arc<[String]>)>,
    names: usize,
    complete_from: u64,
    applied: u64,
    max_notices: usize,
    max_names: usize,
}

/// What a [`ChangeRing`] says of the changes after an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RingAnswer {
    /// Answer now: the last applied index and the topics changed after the index asked
    /// about (sorted, at least one), or `None` when anything may have changed.
    Now(u64, Option<Vec<String>>),
    /// No topic changed after it up to this applied index: wait for a later apply.
    Nothing(u64),
}

impl ChangeRing {
    /// An empty ring over a state machine that has applied up to `applied`, keeping at most
    /// `max_notices` notices and `max_names` topic names.
    pub(crate) fn new(applied: u64, max_notices: usize, max_names: usize) -> ChangeRing {
        ChangeRing {
            notices: VecDeque::new(),
            names: 0,
            complete_from: applied,
            applied,
            max_notices: max_notices.max(1),
            max_names: max_names.max(1),
        }
    }

    /// Records an apply up to `index` that changed `topics` (none or empty: no topic).
    pub(crate) fn record(&mut self, index: u64, topics: Option<&Arc<[String]>>) {
        self.applied = self.applied.max(index);
        let Some(t) = topics.filter(|t| !t.is_empty()) else {
            return;
        };
        self.names += t.len();
        self.notices.push_back((index, t.clone()));
        while self.notices.len() > self.max_notices || self.names > self.max_names {
            let Some((i, old)) = self.notices.pop_front() else {
                break;
            };
            self.names -= old.len();
            self.complete_from = self.complete_from.max(i);
        }
    }

    /// Records a snapshot installed up to `index`: anything may have changed, and nothing
    /// before it can be told apart from what the snapshot brought.
    pub(crate) fn reset(&mut self, index: u64) {
        self.notices.clear();
        self.names = 0;
        self.applied = index;
        self.complete_from = index;
    }

    /// The topics changed after index `since`, at most `max_topics` of them (more are
    /// answered as `None`, anything).
    pub(crate) fn since(&self, since: u64, max_topics: usize) -> RingAnswer {
        if since > self.applied || since < self.complete_from {
            return RingAnswer::Now(self.applied, None);
        }
        let mut set = BTreeSet::new();
        for (_, topics) in self.notices.iter().filter(|(i, _)| *i > since) {
            set.extend(topics.iter().cloned());
            if set.len() > max_topics {
                return RingAnswer::Now(self.applied, None);
            }
        }
        if set.is_empty() {
            RingAnswer::Nothing(self.applied)
        } else {
            RingAnswer::Now(self.applied, Some(set.into_iter().collect()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(topics: &[&str]) -> Arc<[String]> {
        topics.iter().map(|t| t.to_string()).collect()
    }

    fn now(index: u64, topics: &[&str]) -> RingAnswer {
        RingAnswer::Now(index, Some(topics.iter().map(|t| t.to_string()).collect()))
    }

    #[test]
    fn the_ring_answers_what_changed_after_an_index_and_anything_past_what_it_kept() {
        let mut r = ChangeRing::new(10, 3, 100);
        assert_eq!(r.since(10, 100), RingAnswer::Nothing(10));
        // Older than what it knew at open, or ahead of it (another replica's index).
        assert_eq!(r.since(9, 100), RingAnswer::Now(10, None));
        assert_eq!(r.since(11, 100), RingAnswer::Now(10, None));
        r.record(11, Some(&names(&["b", "a"])));
        r.record(12, None);
        r.record(13, Some(&names(&["c", "a"])));
        assert_eq!(r.since(10, 100), now(13, &["a", "b", "c"]));
        assert_eq!(r.since(11, 100), now(13, &["a", "c"]));
        assert_eq!(r.since(12, 100), now(13, &["a", "c"]));
        assert_eq!(r.since(13, 100), RingAnswer::Nothing(13));
        // An apply that changed no topic moves the index only.
        r.record(14, Some(&names(&[])));
        assert_eq!(r.since(13, 100), RingAnswer::Nothing(14));
        // More topics than an answer may list: anything.
        assert_eq!(r.since(10, 2), RingAnswer::Now(14, None));
        // A fourth notice into three places: what came at or before the oldest dropped one
        // is no longer known.
        r.record(15, Some(&names(&["d"])));
        r.record(16, Some(&names(&["e"])));
        assert_eq!(r.since(10, 100), RingAnswer::Now(16, None));
        assert_eq!(r.since(11, 100), now(16, &["a", "c", "d", "e"]));
        // A snapshot: nothing before it is known.
        r.reset(20);
        assert_eq!(r.since(16, 100), RingAnswer::Now(20, None));
        assert_eq!(r.since(20, 100), RingAnswer::Nothing(20));
    }

    /// Against a model that keeps every notice: whatever the ring keeps or drops, an
    /// answer naming topics, or saying nothing changed, is never missing a change; and
    /// with room for everything, it says "anything" only where it must.
    #[test]
    fn the_ring_never_hides_a_change() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed, TestRunner};
        // (gap to the next index, topics; None: a snapshot)
        let step = (
            1u64..4,
            proptest::option::weighted(0.9, proptest::collection::vec(0u8..12, 0..5)),
        );
        let strategy = (
            proptest::collection::vec(step, 0..60),
            1usize..8,
            1usize..12,
            0u64..200,
        );
        let mut runner = TestRunner::new(Config {
            cases: 3000,
            rng_seed: RngSeed::Fixed(0x0c4a_0e11),
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&strategy, |(steps, max_notices, max_names, probe)| {
                let start = 5u64;
                let mut small = ChangeRing::new(start, max_notices, max_names);
                let mut roomy = ChangeRing::new(start, usize::MAX, usize::MAX);
                let mut history: Vec<(u64, Option<Vec<String>>)> = Vec::new();
                let mut index = start;
                let mut last_reset = start;
                for (gap, topics) in steps {
                    index += gap;
                    match topics {
                        Some(t) => {
                            let t: Vec<String> = t.iter().map(|n| format!("t{n}")).collect();
                            let arc: Arc<[String]> = t.clone().into();
                            small.record(index, Some(&arc));
                            roomy.record(index, Some(&arc));
                            history.push((index, Some(t)));
                        }
                        None => {
                            small.reset(index);
                            roomy.reset(index);
                            last_reset = index;
                            history.push((index, None));
                        }
                    }
                }
                let since = probe.min(index + 2);
                let changed: BTreeSet<String> = history
                    .iter()
                    .filter(|(i, _)| *i > since)
                    .flat_map(|(_, t)| t.iter().flatten().cloned())
                    .collect();
                let reset_after = history.iter().any(|(i, t)| *i > since && t.is_none());
                for ring in [&small, &roomy] {
                    match ring.since(since, 6) {
                        RingAnswer::Now(i, Some(t)) => {
                            prop_assert_eq!(i, index);
                            prop_assert!(!reset_after && since >= start);
                            prop_assert_eq!(
                                t.into_iter().collect::<BTreeSet<_>>(),
                                changed.clone()
                            );
                        }
                        RingAnswer::Nothing(i) => {
                            prop_assert_eq!(i, index);
                            prop_assert!(!reset_after && since >= start && since <= index);
                            prop_assert!(changed.is_empty());
                        }
                        RingAnswer::Now(i, None) => prop_assert_eq!(i, index),
                    }
                }
                // With room for every notice, "anything" only for an index it cannot know
                // (before the start or the last snapshot, ahead of it) or too many topics.
                if since >= last_reset && since <= index && changed.len() <= 6 {
                    prop_assert!(
                        !matches!(roomy.since(since, 6), RingAnswer::Now(_, None)),
                        "since {} answered anything",
                        since
                    );
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_ring_keeps_at_most_its_names() {
        let mut r = ChangeRing::new(0, 1000, 5);
        r.record(1, Some(&names(&["a", "b", "c"])));
        r.record(2, Some(&names(&["d", "e"])));
        assert_eq!(r.since(0, 100), now(2, &["a", "b", "c", "d", "e"]));
        // Six names: the first notice goes.
        r.record(3, Some(&names(&["f"])));
        assert_eq!(r.names, 3);
        assert_eq!(r.since(0, 100), RingAnswer::Now(3, None));
        assert_eq!(r.since(1, 100), now(3, &["d", "e", "f"]));
        // One notice larger than the whole ring is dropped, and everything before it with it.
        r.record(4, Some(&names(&["1", "2", "3", "4", "5", "6"])));
        assert_eq!((r.notices.len(), r.names), (0, 0));
        assert_eq!(r.since(3, 100), RingAnswer::Now(4, None));
        assert_eq!(r.since(4, 100), RingAnswer::Nothing(4));
    }

    fn notice(index: u64, topics: &[&str]) -> Changed {
        Changed {
            index,
            topics: Some(topics.iter().map(|t| t.to_string()).collect()),
        }
    }

    fn set(topics: &[&str]) -> Wake {
        Wake::Topics(topics.iter().map(|t| t.to_string()).collect())
    }

    #[tokio::test]
    async fn queued_notices_coalesce_and_a_lag_or_snapshot_means_everything() {
        let (tx, rx) = broadcast::channel(4);
        let mut w = ChangeWatch::new(rx);
        tx.send(notice(1, &["a", "b"])).unwrap();
        tx.send(notice(2, &["c", "a"])).unwrap();
        assert_eq!(w.next().await, Some(set(&["a", "b", "c"])));

        tx.send(notice(3, &["a"])).unwrap();
        tx.send(Changed {
            index: 4,
            topics: None,
        })
        .unwrap();
        assert_eq!(w.next().await, Some(Wake::Everything));

        // Five notices into four places: the oldest is lost, so everything is looked at.
        for i in 5..10 {
            tx.send(notice(i, &["x"])).unwrap();
        }
        assert_eq!(w.next().await, Some(Wake::Everything));
        // What was queued went with the rescan; the next notice comes as it is.
        tx.send(notice(10, &["y"])).unwrap();
        assert_eq!(w.next().await, Some(set(&["y"])));
        drop(tx);
        assert_eq!(w.next().await, None);
    }
}

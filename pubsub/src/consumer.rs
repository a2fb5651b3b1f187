//! A subscription's reading position in each topic, as pure state: no clock, no log, no
//! socket. In the spirit of a JetStream consumer: per topic it knows the next offset to send
//! (delivered), the ack floor (from the log: what the durable subscription acknowledged), and
//! for each event sent and not acknowledged when it was last sent and how often (pending).
//!
//! [`ConsumerState::step`] takes the time, what the log says (its first and next offsets and
//! the acknowledged floor) and answers what to do now, as [`Action`]s; the driver does them
//! and reports each event it sent with [`ConsumerState::sent`].
//!
//! ```text
//!   ack floor                 cursor (next to send)          floor + max_pending
//!      │ pending: sent, not acked │ not sent yet                   │
//!   ───┼──────────────────────────┼────────────────────────────────┼──── log
//!      └ not acked ack_timeout after its last send: send again from here, or give it up
//! ```
//!
//! Redelivery goes back to the ack floor and sends on from there, in order, so a client
//! sees events in offset order again after a redelivery (as JetStream's "ack all" policy).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where a subscription starts in each topic it has no acknowledgement on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest stored event of every topic.
    Earliest,
    /// Only events published after the subscription started.
    Latest,
    /// This offset of every matching topic (clamped into what is stored).
    Offset(u64),
    /// The first event accepted at or after this time (ms since the epoch).
    Time(u64),
}

/// How a durable subscription redelivers what its client did not acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redelivery {
    /// An event not acknowledged this long after it was sent is sent again.
    pub ack_timeout: Duration,
    /// After this many deliveries an event is given up on: acknowledged on the client's
    /// behalf and announced as undeliverable, so one poison event cannot stall the rest.
    pub max_deliveries: u32,
    /// At most this many events are sent and not yet acknowledged, per topic.
    pub max_pending: u64,
}

impl Default for Redelivery {
    fn default() -> Self {
        Redelivery {
            ack_timeout: Duration::from_secs(30),
            max_deliveries: 5,
            max_pending: 1000,
        }
    }
}

/// What the log says about one topic, as a subscription reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogView {
    /// The oldest offset still stored (retention drops older ones).
    pub first: u64,
    /// The offset the next event gets.
    pub next: u64,
    /// For a durable subscription, the offset after its last acknowledged event, if it
    /// acknowledged any on this topic (the ack floor).
    pub acked: Option<u64>,
}

/// What a subscription's driver does next for one topic, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Retention dropped `from..to` before the subscriber read them: tell it.
    Gap {
        /// The first offset missed.
        from: u64,
        /// The first offset that is still there.
        to: u64,
    },
    /// The event at the ack floor was not acknowledged in time: the following `Send`
    /// starts there again.
    Redeliver {
        /// The ack floor.
        from: u64,
    },
    /// The event at the ack floor was delivered `deliveries` times and never acknowledged:
    /// commit its acknowledgement on the client's behalf and tell the client; report
    /// success with [`ConsumerState::given_up`].
    GiveUp {
        /// The offset given up on.
        offset: u64,
        /// How often it was delivered.
        deliveries: u32,
    },
    /// Send the events of `from..to` in order (fewer if the client goes away), reporting
    /// each with [`ConsumerState::sent`].
    Send {
        /// The first offset to send.
        from: u64,
        /// The first offset not to send.
        to: u64,
    },
    /// Nothing changes before this instant unless the log does: step again then.
    WaitUntil(Instant),
}

/// One topic as a subscription reads it.
#[derive(Debug, Clone)]
struct TopicState {
    /// The next offset to send.
    cursor: u64,
    /// Where the subscription started on this topic: the floor before any ack.
    start: u64,
    /// Events sent and not acknowledged: when each was last sent, and how often.
    pending: BTreeMap<u64, (Instant, u32)>,
    /// The offset given up on, until its acknowledgement is applied.
    given_up: Option<u64>,
}

/// A subscription's position in every topic it reads.
#[derive(Debug, Clone)]
pub struct ConsumerState {
    start: Start,
    /// `None` for a subscription that is not durable: nothing is redelivered.
    redelivery: Option<Redelivery>,
    /// Until the first pass over the topics ends: topics found later are new ones.
    first_pass: bool,
    topics: BTreeMap<String, TopicState>,
}

impl ConsumerState {
    /// A subscription starting at `start`; durable (acknowledged, redelivered) when it has
    /// `redelivery` settings.
    pub fn new(start: Start, redelivery: Option<Redelivery>) -> ConsumerState {
        ConsumerState {
            start,
            redelivery,
            first_pass: true,
            topics: BTreeMap::new(),
        }
    }

    /// Where a topic first seen now starts: after the last acknowledged event if there is
    /// one, else at the subscription's start. `offset_at` finds the first offset at or
    /// after a time (it reads the log, so it is only called for [`Start::Time`]).
    fn initial_cursor(&self, log: LogView, offset_at: impl FnOnce(u64) -> u64) -> u64 {
        match (log.acked, self.start) {
            (Some(next), _) => next.clamp(log.first, log.next),
            (None, Start::Earliest) => log.first,
            // Topics that appear after the subscription started are new: all of them.
            (None, Start::Latest) if self.first_pass => log.next,
            (None, Start::Latest) => log.first,
            (None, Start::Offset(n)) => n.clamp(log.first, log.next),
            (None, Start::Time(ms)) => offset_at(ms),
        }
    }

    /// The time whose first offset [`ConsumerState::step`] will ask `offset_at` for, when
    /// `topic` is new to this subscription and it starts at a time: a reader whose log reads
    /// are async looks the offset up first.
    pub fn offset_time_needed(&self, topic: &str, acked: Option<u64>) -> Option<u64> {
        match (self.topics.contains_key(topic), acked, self.start) {
            (false, None, Start::Time(ms)) => Some(ms),
            _ => None,
        }
    }

    /// What to do now for `topic`, given the log's view of it at `now`.
    pub fn step(
        &mut self,
        now: Instant,
        topic: &str,
        log: LogView,
        offset_at: impl FnOnce(u64) -> u64,
    ) -> Vec<Action> {
        if !self.topics.contains_key(topic) {
            let cursor = self.initial_cursor(log, offset_at);
            self.topics.insert(
                topic.to_string(),
                TopicState {
                    cursor,
                    start: cursor,
                    pending: BTreeMap::new(),
                    given_up: None,
                },
            );
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        let mut limit = log.next;
        let mut floor = None;
        if let Some(r) = self.redelivery {
            let f = log.acked.unwrap_or(t.start).max(log.first);
            // How far sending may run ahead of the oldest unacknowledged event.
            limit = log.next.min(f.saturating_add(r.max_pending));
            t.pending = t.pending.split_off(&f);
            if t.cursor > f && t.given_up != Some(f) {
                let (at, sends) = *t.pending.entry(f).or_insert((now, 1));
                if now.saturating_duration_since(at) >= r.ack_timeout {
                    if sends >= r.max_deliveries {
                        actions.push(Action::GiveUp {
                            offset: f,
                            deliveries: sends,
                        });
                    } else {
                        t.cursor = f;
                        actions.push(Action::Redeliver { from: f });
                    }
                }
            }
            floor = Some(f);
        }
        if t.cursor < log.first {
            actions.push(Action::Gap {
                from: t.cursor,
                to: log.first,
            });
            t.cursor = log.first;
        }
        let send_from = t.cursor;
        let sends = t.cursor < limit;
        if sends {
            actions.push(Action::Send {
                from: t.cursor,
                to: limit,
            });
        }
        if let (Some(r), Some(f)) = (self.redelivery, floor) {
            let end = if sends { limit } else { t.cursor };
            if end > f && t.given_up != Some(f) {
                // The floor's next check: a timeout after its last send (this one, if it is
                // sent now); one whose check is overdue (a give-up not committed) is retried
                // a quarter timeout from now, not in a busy loop.
                let due = match t.pending.get(&f) {
                    Some((at, _)) if !(sends && send_from <= f) => *at + r.ack_timeout,
                    _ => now + r.ack_timeout,
                };
                let due = if due <= now {
                    now + r.ack_timeout / 4
                } else {
                    due
                };
                actions.push(Action::WaitUntil(due));
            }
        }
        actions
    }

    /// The driver sent the event at `offset` of `topic` at `now`.
    pub fn sent(&mut self, topic: &str, offset: u64, now: Instant) {
        let durable = self.redelivery.is_some();
        if let Some(t) = self.topics.get_mut(topic) {
            t.cursor = offset + 1;
            if durable {
                let entry = t.pending.entry(offset).or_insert((now, 0));
                *entry = (now, entry.1 + 1);
            }
        }
    }

    /// The acknowledgement of a given-up event was committed: wait for it to be applied
    /// rather than give up on it again.
    pub fn given_up(&mut self, topic: &str, offset: u64) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.given_up = Some(offset);
        }
    }

    /// A pass over every topic ended: topics seen from now on appeared after the start.
    pub fn pass_done(&mut self) {
        self.first_pass = false;
    }

    /// The next offset to send on `topic`, if the subscription has read it.
    pub fn cursor(&self, topic: &str) -> Option<u64> {
        self.topics.get(topic).map(|t| t.cursor)
    }

    /// How many events of `topic` are sent and not acknowledged, as last stepped.
    pub fn pending(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, |t| t.pending.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T: &str = "a/b";

    fn log(first: u64, next: u64, acked: Option<u64>) -> LogView {
        LogView { first, next, acked }
    }

    fn no_time(_: u64) -> u64 {
        panic!("the log is read by time only for a time start")
    }

    fn durable(ack_timeout_ms: u64, max_deliveries: u32, max_pending: u64) -> Option<Redelivery> {
        Some(Redelivery {
            ack_timeout: Duration::from_millis(ack_timeout_ms),
            max_deliveries,
            max_pending,
        })
    }

    /// Does what the actions say as a driver would, sending every event at `now`; what was
    /// sent and the other actions.
    fn run(c: &mut ConsumerState, now: Instant, l: LogView) -> (Vec<u64>, Vec<Action>) {
        let mut sent = Vec::new();
        let mut other = Vec::new();
        for a in c.step(now, T, l, no_time) {
            match a {
                Action::Send { from, to } => {
                    for o in from..to {
                        c.sent(T, o, now);
                        sent.push(o);
                    }
                }
                a => other.push(a),
            }
        }
        (sent, other)
    }

    #[test]
    fn first_delivery_from_earliest_latest_an_offset_or_a_time() {
        let now = Instant::now();
        let l = log(2, 6, None);
        let mut c = ConsumerState::new(Start::Earliest, None);
        assert_eq!(run(&mut c, now, l).0, vec![2, 3, 4, 5]);

        let mut c = ConsumerState::new(Start::Latest, None);
        assert_eq!(run(&mut c, now, l).0, Vec::<u64>::new());
        assert_eq!(run(&mut c, now, log(2, 7, None)).0, vec![6]);
        // A topic that appears after the first pass is new: all of it.
        c.pass_done();
        let acts = c.step(now, "new/topic", log(0, 2, None), no_time);
        assert_eq!(acts, vec![Action::Send { from: 0, to: 2 }]);

        let mut c = ConsumerState::new(Start::Offset(4), None);
        assert_eq!(run(&mut c, now, l).0, vec![4, 5]);
        // Offsets are clamped into what is stored.
        let mut c = ConsumerState::new(Start::Offset(0), None);
        assert_eq!(run(&mut c, now, l).0, vec![2, 3, 4, 5]);
        let mut c = ConsumerState::new(Start::Offset(99), None);
        assert_eq!(run(&mut c, now, l).0, Vec::<u64>::new());

        let mut c = ConsumerState::new(Start::Time(1_000), None);
        let acts = c.step(now, T, l, |ms| {
            assert_eq!(ms, 1_000);
            5
        });
        assert_eq!(acts, vec![Action::Send { from: 5, to: 6 }]);
    }

    #[test]
    fn a_subscription_that_is_not_durable_never_waits_on_a_clock() {
        let now = Instant::now();
        let mut c = ConsumerState::new(Start::Earliest, None);
        let (sent, other) = run(&mut c, now, log(0, 3, None));
        assert_eq!((sent, other), (vec![0, 1, 2], vec![]));
        let later = now + Duration::from_secs(3600);
        assert_eq!(run(&mut c, later, log(0, 3, None)), (vec![], vec![]));
    }

    #[test]
    fn max_pending_bounds_what_is_sent_ahead_of_the_ack_floor() {
        let now = Instant::now();
        let mut c = ConsumerState::new(Start::Earliest, durable(1000, 5, 3));
        let (sent, _) = run(&mut c, now, log(0, 10, None));
        assert_eq!(sent, vec![0, 1, 2]);
        assert_eq!(c.pending(T), 3);
        // Nothing more until acks move the floor.
        assert_eq!(run(&mut c, now, log(0, 10, None)).0, Vec::<u64>::new());
        // Acking 0 and 1 opens the window by two.
        let (sent, _) = run(&mut c, now, log(0, 10, Some(2)));
        assert_eq!(sent, vec![3, 4]);
        assert_eq!(c.pending(T), 3);
    }

    #[test]
    fn unacknowledged_events_are_sent_again_from_the_ack_floor_after_the_timeout() {
        let t0 = Instant::now();
        let mut c = ConsumerState::new(Start::Earliest, durable(1000, 5, 100));
        let (sent, other) = run(&mut c, t0, log(0, 4, None));
        assert_eq!(sent, vec![0, 1, 2, 3]);
        assert_eq!(
            other,
            vec![Action::WaitUntil(t0 + Duration::from_millis(1000))]
        );
        // 0 and 1 acknowledged; before the timeout nothing is sent again.
        let t1 = t0 + Duration::from_millis(999);
        let (sent, other) = run(&mut c, t1, log(0, 4, Some(2)));
        assert_eq!(sent, Vec::<u64>::new());
        assert_eq!(
            other,
            vec![Action::WaitUntil(t0 + Duration::from_millis(1000))]
        );
        // At the timeout: from the floor (2) on, in order, again.
        let t2 = t0 + Duration::from_millis(1000);
        let (sent, other) = run(&mut c, t2, log(0, 4, Some(2)));
        assert_eq!(sent, vec![2, 3]);
        assert_eq!(
            other,
            vec![
                Action::Redeliver { from: 2 },
                Action::WaitUntil(t2 + Duration::from_millis(1000))
            ]
        );
        // Everything acknowledged: nothing pending, no clock needed.
        let (sent, other) = run(&mut c, t2, log(0, 4, Some(4)));
        assert_eq!((sent, other), (vec![], vec![]));
        assert_eq!(c.pending(T), 0);
    }

    #[test]
    fn an_event_delivered_max_deliveries_times_is_given_up_once() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(300);
        let mut c = ConsumerState::new(Start::Earliest, durable(300, 2, 100));
        assert_eq!(run(&mut c, t0, log(0, 2, None)).0, vec![0, 1]);
        // Second delivery.
        let t1 = t0 + timeout;
        assert_eq!(run(&mut c, t1, log(0, 2, None)).0, vec![0, 1]);
        // Two deliveries and no ack: give up on 0, and send nothing again.
        let t2 = t1 + timeout;
        let (sent, other) = run(&mut c, t2, log(0, 2, None));
        assert_eq!(sent, Vec::<u64>::new());
        assert_eq!(
            other[0],
            Action::GiveUp {
                offset: 0,
                deliveries: 2
            }
        );
        // Not committed yet: tried again, a quarter timeout later, not at once.
        assert_eq!(other[1], Action::WaitUntil(t2 + timeout / 4));
        c.given_up(T, 0);
        // Committed, not yet applied: no second give-up, no clock.
        let (sent, other) = run(&mut c, t2 + timeout, log(0, 2, None));
        assert_eq!((sent, other), (vec![], vec![]));
        // Applied: the floor is 1, sent twice already, so it is given up on next.
        let (_, other) = run(&mut c, t2 + timeout, log(0, 2, Some(1)));
        assert_eq!(
            other[0],
            Action::GiveUp {
                offset: 1,
                deliveries: 2
            }
        );
    }

    #[test]
    fn acks_move_the_floor_and_forget_what_they_cover() {
        let t0 = Instant::now();
        let mut c = ConsumerState::new(Start::Earliest, durable(1000, 5, 100));
        run(&mut c, t0, log(0, 5, None));
        assert_eq!(c.pending(T), 5);
        run(&mut c, t0, log(0, 5, Some(3)));
        assert_eq!(c.pending(T), 2);
        // Redelivery after the timeout starts at the new floor.
        let (sent, _) = run(&mut c, t0 + Duration::from_secs(1), log(0, 5, Some(3)));
        assert_eq!(sent, vec![3, 4]);
    }

    #[test]
    fn events_trimmed_before_they_were_read_are_a_gap() {
        let now = Instant::now();
        let mut c = ConsumerState::new(Start::Earliest, None);
        assert_eq!(run(&mut c, now, log(0, 2, None)).0, vec![0, 1]);
        // Retention dropped 2..7 before the subscriber read them.
        let (sent, other) = run(&mut c, now, log(7, 9, None));
        assert_eq!(other, vec![Action::Gap { from: 2, to: 7 }]);
        assert_eq!(sent, vec![7, 8]);
        // A durable one too: its floor follows what is stored, and what it had sent and
        // not had acknowledged is no longer pending.
        let mut c = ConsumerState::new(Start::Earliest, durable(1000, 5, 100));
        assert_eq!(run(&mut c, now, log(0, 3, None)).0, vec![0, 1, 2]);
        let acts = c.step(now, T, log(4, 6, None), no_time);
        assert_eq!(acts[0], Action::Gap { from: 3, to: 4 });
        assert_eq!(acts[1], Action::Send { from: 4, to: 6 });
        assert_eq!(c.pending(T), 0);
    }

    #[test]
    fn a_reconnect_continues_after_the_last_ack() {
        let t0 = Instant::now();
        let mut first = ConsumerState::new(Start::Earliest, durable(1000, 5, 100));
        assert_eq!(
            run(&mut first, t0, log(0, 6, None)).0,
            vec![0, 1, 2, 3, 4, 5]
        );
        // The client acknowledged up to 3 and went away; a new connection (on any node)
        // starts after the ack, whatever its own start says.
        for start in [Start::Earliest, Start::Latest, Start::Offset(0)] {
            let mut again = ConsumerState::new(start, durable(1000, 5, 100));
            let (sent, other) = run(&mut again, t0, log(0, 6, Some(4)));
            assert_eq!(sent, vec![4, 5], "{start:?}");
            assert_eq!(other, vec![Action::WaitUntil(t0 + Duration::from_secs(1))]);
        }
    }
}

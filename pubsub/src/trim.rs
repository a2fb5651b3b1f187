//! Retention by age for quiet topics. A busy topic is trimmed as events are appended (the
//! state machine applies each publish's retention); a topic nobody publishes to would keep
//! its old events forever, so the data group's leader proposes a trim for every topic whose
//! oldest event is older than its `max_age`, every few seconds.
//!
//! The trim is an entry like any other: every replica drops the same events at the same
//! point of the log, by the state machine's clock.

use canal_consensus::topics::TopicMeta;
use canal_consensus::{Consensus, Op, Request, Transport};
use canal_proto::settings::{Retention, TopicSettings};
use canal_proto::{Topic, TopicFilter};
use canal_worker::{Flow, Worker};
use std::time::Duration;

/// How often the leader looks for topics to trim.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// A trim to propose: `topic`'s log, by `retention`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    /// The topic.
    pub topic: String,
    /// The retention in force for it.
    pub retention: Retention,
}

/// The trims due at `now` (the state machine's clock, ms): the topics of `topics` with an
/// age limit, more than one event, and an oldest event (its time from `oldest_time`) older
/// than the limit. The newest event always stays, so a topic of one event is never trimmed.
pub fn due_trims(
    all: &[(TopicFilter, TopicSettings)],
    topics: impl IntoIterator<Item = (String, TopicMeta)>,
    now: u64,
    mut oldest_time: impl FnMut(&str, &TopicMeta) -> Option<u64>,
) -> Vec<Trim> {
    if all.iter().all(|(_, s)| s.retention.max_age_ms == 0) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (topic, meta) in topics {
        let Ok(t) = Topic::new(&topic) else { continue };
        let retention = canal_proto::settings::settings_for(&t, all).retention;
        if retention.max_age_ms == 0 || meta.next.saturating_sub(meta.first) <= 1 {
            continue;
        }
        if oldest_time(&topic, &meta).is_some_and(|t| t.saturating_add(retention.max_age_ms) < now)
        {
            out.push(Trim { topic, retention });
        }
    }
    out
}

/// The worker that applies age limits to quiet topics while this node leads the data group.
pub struct Trimmer<T: Transport> {
    consensus: Consensus<T>,
    every: Duration,
}

impl<T: Transport> Trimmer<T> {
    /// A trimmer looking every [`TRIM_EVERY`].
    pub fn new(consensus: Consensus<T>) -> Trimmer<T> {
        Trimmer {
            consensus,
            every: TRIM_EVERY,
        }
    }

    /// The trims this node should propose now, in the data groups it leads.
    fn due(&self) -> Vec<(canal_consensus::GroupId, Trim)> {
        let Ok(all) = crate::settings::all_settings(&self.consensus) else {
            return Vec::new();
        };
        let mut trims = Vec::new();
        // Every group hosted here holding topics (not the metadata group), whatever the
        // routing: a leader trims the logs it holds.
        for group in self.consensus.groups() {
            if group == canal_consensus::GroupId::METADATA || !self.consensus.is_leader(group) {
                continue;
            }
            let Ok(sm) = self.consensus.state_machine(group) else {
                continue;
            };
            // The clock the leader stamps entries with, so the trims it proposes are the
            // ones its entries will find due.
            let now = self.consensus.now_ms();
            trims.extend(
                due_trims(&all, sm.topics().unwrap_or_default(), now, |topic, meta| {
                    sm.events(topic, meta.first, 1)
                        .ok()
                        .and_then(|e| e.first().map(|e| e.time_ms))
                })
                .into_iter()
                .map(|t| (group, t)),
            );
        }
        trims
    }
}

impl<T: Transport> Worker for Trimmer<T> {
    fn name(&self) -> &'static str {
        "trimmer"
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.every).await
    }

    async fn work(&mut self) -> Flow {
        for (group, Trim { topic, retention }) in self.due() {
            let trim = Request {
                id: None,
                op: Op::Trim {
                    topic: topic.clone(),
                    retention,
                },
            };
            if let Err(e) = self.consensus.write(group, trim).await {
                tracing::debug!(%topic, error = %e, "trim not committed; next round");
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn aged(filter: &str, max_age_ms: u64) -> (TopicFilter, TopicSettings) {
        let mut s = TopicSettings::default();
        s.retention.max_age_ms = max_age_ms;
        (TopicFilter::new(filter).unwrap(), s)
    }

    fn meta(first: u64, next: u64) -> TopicMeta {
        TopicMeta {
            first,
            next,
            bytes: 0,
        }
    }

    #[test]
    fn only_topics_with_an_old_enough_oldest_event_are_trimmed() {
        let all = vec![aged("logs/#", 1_000), aged("logs/keep", 0)];
        let topics = vec![
            ("logs/old".to_string(), meta(0, 5)),
            ("logs/young".to_string(), meta(0, 5)),
            ("logs/one".to_string(), meta(4, 5)),
            ("logs/keep".to_string(), meta(0, 5)),
            ("metrics/x".to_string(), meta(0, 5)),
        ];
        let oldest = |t: &str, _: &TopicMeta| match t {
            "logs/young" => Some(9_500),
            _ => Some(1_000),
        };
        let trims = due_trims(&all, topics, 10_000, oldest);
        assert_eq!(
            trims,
            vec![Trim {
                topic: "logs/old".into(),
                retention: all[0].1.retention
            }]
        );
    }

    #[test]
    fn nothing_is_read_when_no_setting_has_an_age_limit() {
        let all = vec![aged("#", 0)];
        let trims = due_trims(&all, vec![("a".to_string(), meta(0, 9))], 10_000, |_, _| {
            panic!("no log read without an age limit")
        });
        assert!(trims.is_empty());
        // Exactly at the limit is not past it.
        let all = vec![aged("#", 1_000)];
        let at = due_trims(&all, vec![("a".to_string(), meta(0, 9))], 2_000, |_, _| {
            Some(1_000)
        });
        assert!(at.is_empty());
    }
}

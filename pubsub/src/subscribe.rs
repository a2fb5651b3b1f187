//! Subscriptions: checking what a subscriber asks for, and the drivers that feed it.
//!
//! QoS 1: a subscriber reads its node's replica of the logs from a cursor per topic
//! (earliest, latest, an offset or a time) and is woken when an apply changes a topic it
//! reads (the state machine's change notices), so it gets every event once, in offset order, and a slow subscriber only slows its own stream
//! (the log is the buffer; nothing is skipped unless retention dropped it first, which the
//! subscriber is told as a `lagged` notice with the gap). A durable subscription also has
//! what it acknowledged in the log, and is redelivered what it did not acknowledge in time
//! ([`crate::consumer`]).
//!
//! QoS 0: the node's [`crate::Qos0Hub`] puts the events into the subscriber's queue; one
//! that stays behind past the hub's wait loses events and is told how many.

use crate::consumer::{Action, ConsumerState, LogView, Redelivery, Start};
use crate::error::PubSubError;
use crate::event::{Delivery, EventData, message};
use crate::feed::FeedTx;
use canal_consensus::topics::TopicMeta;
use canal_consensus::{
    Consensus, GroupId, GroupReader, InternalKey, Op, Request, Route, Transport, Wake,
};
use canal_proto::api::Lagged;
use canal_proto::{Topic, TopicFilter};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// How many events a QoS 1 subscriber reads from the log at once.
const READ_BATCH: usize = 256;

/// What a subscriber asks for, as given (each field is checked by
/// [`crate::PubSub::subscribe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeRequest {
    /// The topic filter (`filter`), required.
    pub filter: Option<String>,
    /// `0` or `1` (`qos`; 1 if not given).
    pub qos: Option<String>,
    /// Where to start (`from`: earliest, latest, an offset or an RFC 3339 time).
    pub from: Option<String>,
    /// The durable subscription's name (`durable`).
    pub durable: Option<String>,
    /// `ack_timeout` of a durable subscription (a duration).
    pub ack_timeout: Option<String>,
    /// `max_deliveries` of a durable subscription.
    pub max_deliveries: Option<String>,
    /// `max_pending` of a durable subscription.
    pub max_pending: Option<String>,
}

/// A subscription, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub(crate) filter: TopicFilter,
    pub(crate) qos: u8,
    pub(crate) from: Start,
    pub(crate) durable: Option<(String, Redelivery)>,
}

/// Checks a subscription's parameters, in the order clients are told about them.
pub(crate) fn check(req: &SubscribeRequest) -> Result<Checked, PubSubError> {
    let filter = req.filter.as_deref().ok_or_else(|| {
        PubSubError::InvalidFilter("filter is missing: add ?filter=sensors/+/temp".into())
    })?;
    let filter = TopicFilter::new(filter).map_err(|e| PubSubError::InvalidFilter(e.to_string()))?;
    let qos = crate::parse_qos(req.qos.as_deref())?.as_u8();
    let from = parse_from(req.from.as_deref())?;
    let name = match &req.durable {
        Some(name) => Some(check_subscription_name(name)?),
        None => None,
    };
    let redelivery = redelivery_settings(req, name.is_some())?;
    if name.is_some() && qos == 0 {
        return Err(PubSubError::InvalidDurable(
            "durable subscriptions read the committed log: use them with QoS 1".into(),
        ));
    }
    Ok(Checked {
        filter,
        qos,
        from,
        durable: name.map(|n| (n, redelivery)),
    })
}

/// Reads `from`: earliest, latest (the default), an offset or an RFC 3339 time.
pub fn parse_from(s: Option<&str>) -> Result<Start, PubSubError> {
    let Some(s) = s else { return Ok(Start::Latest) };
    match s {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ => {
            if let Ok(n) = s.parse::<u64>() {
                return Ok(Start::Offset(n));
            }
            humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| Start::Time(d.as_millis() as u64))
                .ok_or_else(|| {
                    PubSubError::InvalidFrom(format!(
                        "from={s:?} is not a start: use earliest, latest, an offset (0, 42) or an RFC 3339 time (2026-11-24T08:00:00Z)"
                    ))
                })
        }
    }
}

/// Reads a durable subscription's redelivery settings (the defaults for what is not given);
/// refused for a subscription that is not durable.
pub fn redelivery_settings(
    req: &SubscribeRequest,
    durable: bool,
) -> Result<Redelivery, PubSubError> {
    let bad = PubSubError::InvalidDurable;
    let given =
        req.ack_timeout.is_some() || req.max_deliveries.is_some() || req.max_pending.is_some();
    if given && !durable {
        return Err(bad(
            "ack_timeout, max_deliveries and max_pending are for durable subscriptions: add durable=NAME".into(),
        ));
    }
    let mut r = Redelivery::default();
    if let Some(t) = &req.ack_timeout {
        r.ack_timeout = humantime::parse_duration(t)
            .ok()
            .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(3600))
            .ok_or_else(|| {
                bad(format!(
                    "ack_timeout {t:?} is not allowed: use 100ms to 1h, such as 30s"
                ))
            })?;
    }
    if let Some(n) = &req.max_deliveries {
        r.max_deliveries = n
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "max_deliveries {n:?} is not allowed: use 1 to 1000"
                ))
            })?;
    }
    if let Some(n) = &req.max_pending {
        r.max_pending = n
            .parse()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| bad(format!("max_pending {n:?} is not allowed: use 1 to 100000")))?;
    }
    Ok(r)
}

/// Checks a durable subscription's name: 1-64 letters, digits, `-`, `_` or `.`.
pub fn check_subscription_name(name: &str) -> Result<String, PubSubError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(PubSubError::InvalidDurable(format!(
            "subscription name {name:?} is not allowed: use 1-64 letters, digits, `-`, `_` or `.`"
        )));
    }
    Ok(name.to_string())
}

fn decode_start(b: &[u8]) -> Option<Start> {
    let s = std::str::from_utf8(b).ok()?;
    match s.split_once(':') {
        Some(("offset", n)) => n.parse().ok().map(Start::Offset),
        Some(("time", t)) => t.parse().ok().map(Start::Time),
        _ if s == "earliest" => Some(Start::Earliest),
        _ => None,
    }
}

fn encode_start(from: Start, now_ms: u64) -> String {
    match from {
        Start::Earliest => "earliest".to_string(),
        // `latest` is fixed to the creation time, so a reconnect does not skip what was
        // published while the subscriber was away.
        Start::Latest => format!("time:{now_ms}"),
        Start::Offset(n) => format!("offset:{n}"),
        Start::Time(t) => format!("time:{t}"),
    }
}

/// The start of durable subscription `name`: as stored when it was created, or `from`
/// (with `latest` fixed to now) stored now if it is new. Read through its group's leader,
/// wherever that is: a replica here may not have applied the creation yet.
pub(crate) async fn durable_start<T: Transport>(
    consensus: &Consensus<T>,
    route: Route,
    name: &str,
    from: Start,
) -> Result<Start, PubSubError> {
    let starts = &canal_consensus::keys::SUBSCRIPTION_STARTS;
    let group = route.subscription(name);
    let stored = consensus.read_record(group, starts, name, true).await?;
    if let Some(b) = stored {
        return decode_start(&b).ok_or_else(|| {
            PubSubError::Internal(format!("durable subscription {name} has a damaged start"))
        });
    }
    let spec = encode_start(from, canal_proto::time::now_ms());
    // The request id makes the first creation win if two race.
    consensus
        .write(
            group,
            Request {
                id: Some(format!("durable-start/{name}")),
                op: Op::Internal {
                    key: InternalKey::Subscription(name.to_string()),
                    value: Some(spec.into_bytes()),
                },
            },
        )
        .await?;
    let stored = consensus.read_record(group, starts, name, true).await?;
    Ok(stored.as_deref().and_then(decode_start).unwrap_or(from))
}

/// Refuses an offset past the end of an exact topic: a mistake worth saying.
pub(crate) async fn check_offset(
    reader: Option<GroupReader>,
    filter: &TopicFilter,
    from: Start,
) -> Result<(), PubSubError> {
    if let Start::Offset(n) = from
        && filter.is_exact()
        && let Some(reader) = reader
    {
        let next = reader
            .topic_meta(filter.as_str())
            .await
            .map_err(PubSubError::internal)?
            .map(|m| m.next)
            .unwrap_or(0);
        if n > next {
            return Err(PubSubError::InvalidFrom(format!(
                "offset {n} is beyond the end of topic {filter}: its next offset is {next}"
            )));
        }
    }
    Ok(())
}

/// The groups a subscription or a trigger reads, a reader of each, and their change
/// notices as one stream: the one group of an exact filter, every data group of a wildcard.
/// A group that closes here (its replica moved to other nodes) is read where it is then.
pub struct Inputs<T: Transport> {
    consensus: Consensus<T>,
    route: Route,
    readers: BTreeMap<GroupId, GroupReader>,
    /// Only ever used through `&mut self` (`get_mut`, no locking): the mutex makes the
    /// inputs `Sync`, so a reader may be borrowed across an await.
    changes: std::sync::Mutex<futures::stream::SelectAll<WatchStream>>,
}

impl<T: Transport> Inputs<T> {
    /// Readers of every group `filter` may match under `route`, each watched from now on
    /// (so nothing applied after this goes unnoticed by a read that follows).
    pub fn open(
        consensus: &Consensus<T>,
        route: Route,
        filter: &TopicFilter,
    ) -> Result<Inputs<T>, PubSubError> {
        let mut readers = BTreeMap::new();
        for g in route.groups_of_filter(filter) {
            readers.insert(g, consensus.reader(g)?);
        }
        let changes = futures::stream::select_all(readers.iter().map(|(&g, r)| watch_stream(g, r)));
        Ok(Inputs {
            consensus: consensus.clone(),
            route,
            readers,
            changes: std::sync::Mutex::new(changes),
        })
    }

    /// The groups read, in id order.
    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.readers.keys().copied()
    }

    /// The reader of group `g`, if it is one of the groups read.
    pub fn reader(&self, g: GroupId) -> Option<&GroupReader> {
        self.readers.get(&g)
    }

    /// The reader of the group holding `topic`.
    pub fn reader_of(&self, topic: &str) -> Option<&GroupReader> {
        self.readers.get(&self.route.topic(topic))
    }

    /// Every topic with a log in every group read, and where each log starts and ends.
    pub async fn topics(&self) -> Result<Vec<(String, TopicMeta)>, canal_consensus::ReadError> {
        let mut all = Vec::new();
        for r in self.readers.values() {
            all.extend(r.topics().await?);
        }
        Ok(all)
    }

    /// The next change notice of any group read, with its group; every notice already
    /// queued of that group comes with it. `None` when a group is gone and cannot be read
    /// anywhere. Cancel-safe.
    pub async fn next(&mut self) -> Option<(GroupId, Wake)> {
        let changes = self.changes.get_mut().unwrap_or_else(|p| p.into_inner());
        let (g, wake) = changes.next().await?;
        match wake {
            Some(w) => Some((g, w)),
            // The group closed here: read it where it is now, everything afresh.
            None => match self.consensus.reader(g) {
                Ok(r) => {
                    changes.push(watch_stream(g, &r));
                    self.readers.insert(g, r);
                    Some((g, Wake::Everything))
                }
                Err(e) => {
                    tracing::debug!(group = %g, error = %e, "a group read is gone");
                    None
                }
            },
        }
    }

    /// A notice already queued, without waiting.
    pub fn next_ready(&mut self) -> Option<(GroupId, Wake)> {
        futures::FutureExt::now_or_never(self.next()).flatten()
    }
}

type WatchStream = futures::stream::BoxStream<'static, (GroupId, Option<Wake>)>;

fn watch_stream(g: GroupId, r: &GroupReader) -> WatchStream {
    let w = r.watch_changes();
    futures::stream::unfold(Some(w), move |w| async move {
        let mut w = w?;
        match w.next().await {
            Some(wake) => Some(((g, Some(wake)), Some(w))),
            // Said once, then the stream ends.
            None => Some(((g, None), None)),
        }
    })
    .boxed()
}

/// A durable subscription's name and the groups it commits give-ups to.
pub(crate) struct Durable<T: Transport> {
    pub(crate) name: String,
    pub(crate) consensus: Consensus<T>,
    pub(crate) route: Route,
}

/// Feeds a QoS 1 subscription from the groups of `sources` until its client goes away or
/// a log it reads is gone.
///
/// It reads all topics of a group once, at the start (and again only when that group's
/// change notices say anything may have changed: a snapshot, or this subscription fell
/// behind the notices). After that it steps only the topics an apply changed that match its
/// filter (a new topic that matches joins then), and those whose redelivery timer is due:
/// what one publish costs a subscription does not grow with the number of topics, and a
/// subscription on other topics only matches the changed names against its filter. Topics
/// of different groups are independent logs: per-topic offset order holds as in one group.
pub(crate) async fn drive_qos1<T: Transport>(
    mut sources: Inputs<T>,
    filter: TopicFilter,
    mut state: ConsumerState,
    durable: Option<Durable<T>>,
    metrics: crate::PubSubMetrics,
    tx: FeedTx<Delivery>,
) {
    // When each topic's redelivery is due (only topics with something unacknowledged).
    let mut timers: BTreeMap<String, Instant> = BTreeMap::new();
    // Every group is read whole at the start; the watch began when `sources` opened.
    let mut rescan: BTreeSet<GroupId> = sources.groups().collect();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    loop {
        let now = Instant::now();
        let mut todo: BTreeSet<String> = std::mem::take(&mut changed)
            .into_iter()
            .filter(|t| matches(&filter, t))
            .collect();
        for g in std::mem::take(&mut rescan) {
            let Some(reader) = sources.reader(g) else {
                continue;
            };
            metrics.rescans.inc();
            let Ok(topics) = reader.topics().await else {
                return;
            };
            todo.extend(
                topics
                    .into_iter()
                    .map(|(t, _)| t)
                    .filter(|t| matches(&filter, t)),
            );
        }
        todo.extend(
            timers
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(t, _)| t.clone()),
        );
        for topic in todo {
            metrics.topic_reads.inc();
            let Some(reader) = sources.reader_of(&topic) else {
                continue;
            };
            let Ok(meta) = reader.topic_meta(&topic).await else {
                return;
            };
            let Some(meta) = meta else { continue };
            timers.remove(&topic);
            match step_topic(reader, &mut state, &topic, meta, &durable, &metrics, &tx).await {
                Some(Some(at)) => {
                    timers.insert(topic, at);
                }
                Some(None) => {}
                None => return,
            }
        }
        state.pass_done();
        // Redelivery needs a clock; a subscription with nothing unacknowledged does not.
        let next_timer = timers
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let first = tokio::select! {
            w = sources.next() => match w {
                Some(w) => Some(w),
                None => return,
            },
            _ = tokio::time::sleep_until(next_timer.into()) => None,
            _ = tx.closed() => return,
        };
        // Every notice already queued goes into this one pass.
        let mut woken: Vec<(GroupId, Wake)> = first.into_iter().collect();
        while let Some(w) = sources.next_ready() {
            woken.push(w);
        }
        for (g, wake) in woken {
            match wake {
                Wake::Topics(t) => changed.extend(t),
                Wake::Everything => {
                    rescan.insert(g);
                }
            }
        }
    }
}

/// Whether `topic` (a name from the log) is one `filter` reads.
fn matches(filter: &TopicFilter, topic: &str) -> bool {
    Topic::new(topic).is_ok_and(|t| filter.matches(&t))
}

/// Steps one topic and does what its consumer state says: `Some` with when to look again
/// for redelivery (if ever), `None` when the subscriber is gone or the log cannot be read.
async fn step_topic<T: Transport>(
    reader: &GroupReader,
    state: &mut ConsumerState,
    topic: &str,
    meta: TopicMeta,
    durable: &Option<Durable<T>>,
    metrics: &crate::PubSubMetrics,
    tx: &FeedTx<Delivery>,
) -> Option<Option<Instant>> {
    let acked = match durable {
        Some(d) => reader
            .subscription_cursor(&d.name, topic)
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let log = LogView {
        first: meta.first,
        next: meta.next,
        acked,
    };
    let at = match state.offset_time_needed(topic, acked) {
        Some(ms) => reader.offset_at(topic, ms).await.unwrap_or(meta.next),
        None => meta.next,
    };
    let actions = state.step(Instant::now(), topic, log, |_| at);
    let mut wake: Option<Instant> = None;
    for a in actions {
        let ok = match a {
            Action::Gap { from, to } => {
                metrics.lagged_events.inc_by(to - from);
                let gap = Lagged {
                    topic: topic.to_string(),
                    from,
                    to,
                };
                let json = serde_json::to_string(&gap).ok()?;
                tx.send(Delivery::Lagged(json)).await.is_ok()
            }
            Action::Redeliver { from } => {
                tracing::debug!(%topic, from, "redelivering from the ack floor");
                metrics.redeliveries.inc();
                true
            }
            Action::GiveUp { offset, deliveries } => match durable {
                Some(d) => {
                    let ok = give_up(state, d, topic, offset, deliveries, tx).await;
                    metrics.given_up.inc();
                    ok
                }
                None => true,
            },
            Action::Send { from, to } => send_range(reader, state, topic, from, to, tx).await,
            Action::WaitUntil(at) => {
                wake = Some(wake.map_or(at, |w| w.min(at)));
                true
            }
        };
        if !ok {
            return None;
        }
    }
    Some(wake)
}

/// Sends `topic`'s events `from..to`; false when the subscriber is gone or the log cannot
/// be read.
async fn send_range(
    reader: &GroupReader,
    state: &mut ConsumerState,
    topic: &str,
    from: u64,
    to: u64,
    tx: &FeedTx<Delivery>,
) -> bool {
    let mut cursor = from;
    while cursor < to {
        let Ok(batch) = reader.events(topic, cursor, READ_BATCH).await else {
            return false;
        };
        if batch.is_empty() {
            break;
        }
        let last = batch.last().map(|e| e.offset);
        for e in batch.into_iter().take_while(|e| e.offset < to) {
            let offset = e.offset;
            let d = message(
                Some(format!("{topic}:{offset}")),
                EventData::stored(topic, e),
            );
            // Waits while the client is slow: backpressure, not loss.
            if tx.send(d).await.is_err() {
                return false;
            }
            state.sent(topic, offset, Instant::now());
            cursor = offset + 1;
        }
        if last.is_some_and(|o| o + 1 >= to) {
            break;
        }
    }
    true
}

/// Gives up on `offset`: tells the client, and acknowledges it on its behalf; false when
/// the subscriber is gone.
async fn give_up<T: Transport>(
    state: &mut ConsumerState,
    d: &Durable<T>,
    topic: &str,
    offset: u64,
    deliveries: u32,
    tx: &FeedTx<Delivery>,
) -> bool {
    let notice = serde_json::json!({
        "topic": topic, "from": offset, "to": offset + 1,
        "reason": format!("not acknowledged after {deliveries} deliveries"),
    });
    if tx.send(Delivery::Lagged(notice.to_string())).await.is_err() {
        return false;
    }
    let ack = Request {
        id: None,
        op: Op::Ack {
            subscription: d.name.clone(),
            topic: topic.to_string(),
            offset,
        },
    };
    match d.consensus.write_batched(d.route.topic(topic), ack).await {
        Ok(_) => state.given_up(topic, offset),
        Err(e) => tracing::debug!(error = %e, "giving up on an event not committed; later"),
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> SubscribeRequest {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        SubscribeRequest {
            filter: get("filter"),
            qos: get("qos"),
            from: get("from"),
            durable: get("durable"),
            ack_timeout: get("ack_timeout"),
            max_deliveries: get("max_deliveries"),
            max_pending: get("max_pending"),
        }
    }

    fn kind(r: &SubscribeRequest) -> &'static str {
        check(r).err().map(|e| e.kind()).unwrap_or("ok")
    }

    #[test]
    fn subscriptions_are_checked_in_order() {
        assert_eq!(kind(&req(&[])), "invalid_filter");
        assert_eq!(kind(&req(&[("filter", "a/#/b")])), "invalid_filter");
        assert_eq!(
            kind(&req(&[("filter", "a/#"), ("qos", "2")])),
            "invalid_qos"
        );
        assert_eq!(
            kind(&req(&[("filter", "a"), ("from", "soon")])),
            "invalid_from"
        );
        assert_eq!(
            kind(&req(&[("filter", "a"), ("durable", "a b")])),
            "invalid_durable"
        );
        assert_eq!(
            kind(&req(&[("filter", "a"), ("ack_timeout", "1s")])),
            "invalid_durable"
        );
        assert_eq!(
            kind(&req(&[("filter", "a"), ("durable", "d"), ("qos", "0")])),
            "invalid_durable"
        );
        for bad in [
            ("ack_timeout", "10ms"),
            ("ack_timeout", "2h"),
            ("max_deliveries", "0"),
            ("max_pending", "100001"),
        ] {
            let r = req(&[("filter", "a"), ("durable", "d"), bad]);
            let e = check(&r).unwrap_err();
            assert!(e.to_string().contains(bad.0), "{bad:?}: {e}");
        }
        let ok = check(&req(&[
            ("filter", "a/+"),
            ("durable", "d-1.x"),
            ("from", "earliest"),
            ("ack_timeout", "300ms"),
            ("max_deliveries", "2"),
        ]))
        .unwrap();
        assert_eq!(ok.qos, 1);
        assert_eq!(ok.from, Start::Earliest);
        let (name, r) = ok.durable.unwrap();
        assert_eq!(name, "d-1.x");
        assert_eq!(r.ack_timeout, Duration::from_millis(300));
        assert_eq!(r.max_deliveries, 2);
        assert_eq!(r.max_pending, Redelivery::default().max_pending);
    }

    #[test]
    fn starts_are_read_and_stored() {
        assert_eq!(parse_from(None).unwrap(), Start::Latest);
        assert_eq!(parse_from(Some("42")).unwrap(), Start::Offset(42));
        assert_eq!(
            parse_from(Some("1970-01-01T00:00:01Z")).unwrap(),
            Start::Time(1000)
        );
        for s in [Start::Earliest, Start::Offset(7), Start::Time(9)] {
            assert_eq!(decode_start(encode_start(s, 5).as_bytes()), Some(s));
        }
        // `latest` is stored as the time it was created.
        assert_eq!(
            decode_start(encode_start(Start::Latest, 5).as_bytes()),
            Some(Start::Time(5))
        );
        assert_eq!(decode_start(b"offset:x"), None);
        assert!(check_subscription_name(&"x".repeat(65)).is_err());
        assert!(check_subscription_name("").is_err());
    }
}

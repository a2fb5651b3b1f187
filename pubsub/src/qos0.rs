//! QoS 0: never touches Raft. The accepting node hands an event to its own QoS 0
//! subscribers (the [`Qos0Hub`]) and sends one copy to every other live peer whose
//! advertised interest matches the topic, through a [`Qos0Link`] the node provides (the
//! mesh's QoS 0 lane). At most once, but not at the first hiccup: the hub puts each event
//! straight into the queue of every local subscriber whose filter matches
//! ([`crate::feed`]), waiting up to [`QOS0_HUB_WAIT`] for room (backpressure on the
//! publisher, or on the peer's link for events from other nodes), the same shape as the
//! mesh's per-peer QoS 0 link. A subscriber still full after the wait is behind: its events
//! are dropped without waiting, counted (`canal_qos0_hub_dropped_total`) and told to it as
//! `{"dropped":N}`, until half its queue is free again; so a stalled subscriber costs the
//! others one wait, not one per event.
//!
//! ```text
//!   deliver_wait(m) ─> EventData (once, shared) ─> each matching subscriber:
//!        behind? ── half free: no longer behind ── else drop, count
//!        send, waiting until the event's deadline ── timed out: behind, drop, count
//!   triggers: a broadcast of every event (QOS0_HUB_CAPACITY), as before
//! ```

use crate::Delivery;
use crate::event::EventData;
use crate::feed::FeedTx;
use canal_consensus::{Consensus, GroupId, NodeId, Transport};
use canal_proto::{Topic, TopicFilter, wire};
use prometheus_client::metrics::counter::Counter;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

/// How many QoS 0 events the hub's broadcast (what triggers listen to) holds for a slow
/// listener before it starts dropping them for it.
pub const QOS0_HUB_CAPACITY: usize = 4096;

/// How long a QoS 0 event waits for room in a local subscriber's queue before it is
/// dropped for that subscriber (as the mesh's QoS 0 link waits for a peer).
pub const QOS0_HUB_WAIT: Duration = Duration::from_millis(250);

pub use canal_proto::peer::Qos0Message;

/// The peers a node sends QoS 0 events to: the node implements it over its mesh, tests
/// over nothing at all.
pub trait Qos0Link: Send + Sync + 'static {
    /// How a peer is named on the link.
    type Peer: Send;

    /// Every other live peer and the filters it advertises interest in.
    fn peers(&self) -> Vec<(Self::Peer, Vec<String>)>;

    /// Sends one encoded [`Qos0Message`] to `peer`: waits a bounded time for room on the
    /// link (backpressure on the publisher), and drops it, counted, when the link is down
    /// or the wait runs out.
    fn send(&self, peer: Self::Peer, bytes: Vec<u8>) -> impl Future<Output = ()> + Send;
}

/// The peers of `link` whose advertised interest matches `topic`.
pub fn interested_peers<L: Qos0Link>(link: &L, topic: &Topic) -> Vec<L::Peer> {
    link.peers()
        .into_iter()
        .filter(|(_, interest)| {
            interest
                .iter()
                .filter_map(|f| TopicFilter::new(f).ok())
                .any(|f| f.matches(topic))
        })
        .map(|(p, _)| p)
        .collect()
}

/// What this node's QoS 0 subscribers and triggers listen to, which the node advertises so
/// publishers send it only what it wants.
#[derive(Debug, Default)]
pub struct Qos0Interest {
    subscribed: Mutex<BTreeMap<String, usize>>,
    trigger_filters: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counting never panics half-way, so a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Qos0Interest {
    /// Every filter listened to: subscribers' and triggers', each once, in order.
    pub fn filters(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = lock(&self.subscribed).keys().cloned().collect();
        all.extend(lock(&self.trigger_filters).iter().cloned());
        all
    }

    /// The filters of local subscribers, each with how many subscribe with it.
    pub fn subscribed(&self) -> BTreeMap<String, usize> {
        lock(&self.subscribed).clone()
    }
}

/// The node's QoS 0 fan-out point: its local QoS 0 subscribers listen here.
#[derive(Clone)]
pub struct Qos0Hub {
    tx: broadcast::Sender<Arc<Qos0Message>>,
    subs: Arc<Mutex<Subscribers>>,
    interest: Arc<Qos0Interest>,
    dropped: Counter,
}

/// The hub's local subscribers, by the number [`Qos0Hub::attach`] gave them.
#[derive(Default)]
struct Subscribers {
    next: u64,
    by_id: BTreeMap<u64, Arc<HubSub>>,
}

/// One local subscriber: its filter, its queue, and whether it is behind.
struct HubSub {
    filter: TopicFilter,
    tx: FeedTx<Delivery>,
    /// Its queue stayed full past a wait: events are dropped for it without waiting.
    behind: AtomicBool,
    /// Events dropped for it that it has not been told of yet.
    untold: AtomicU64,
}

impl HubSub {
    /// Drops one event for this subscriber: counted, and told later.
    fn drop_one(&self, dropped: &Counter) {
        self.untold.fetch_add(1, Ordering::Relaxed);
        dropped.inc();
    }

    /// The notice of what it missed, if it missed anything, taken to be told now.
    fn take_notice(&self) -> Option<(u64, Delivery)> {
        let n = self.untold.swap(0, Ordering::Relaxed);
        (n > 0).then(|| (n, Delivery::Lagged(format!("{{\"dropped\":{n}}}"))))
    }

    /// Gives it `ev` without waiting: behind, or the broadcast's synchronous path.
    fn offer_now(&self, ev: &Arc<EventData>, dropped: &Counter) {
        if self.behind.load(Ordering::Relaxed) && !self.tx.half_free() {
            self.drop_one(dropped);
            return;
        }
        if let Some((n, notice)) = self.take_notice()
            && self.tx.try_send(notice).is_err()
        {
            self.untold.fetch_add(n, Ordering::Relaxed);
            self.behind.store(true, Ordering::Relaxed);
            self.drop_one(dropped);
            return;
        }
        let d = Delivery::Message {
            id: None,
            event: ev.clone(),
        };
        if self.tx.try_send(d).is_err() {
            self.behind.store(true, Ordering::Relaxed);
            self.drop_one(dropped);
        } else {
            self.behind.store(false, Ordering::Relaxed);
        }
    }

    /// Gives it `ev`, waiting until `deadline` for room unless it is behind.
    async fn offer(&self, ev: &Arc<EventData>, deadline: tokio::time::Instant, dropped: &Counter) {
        if self.behind.load(Ordering::Relaxed) {
            if !self.tx.half_free() {
                self.drop_one(dropped);
                return;
            }
            self.behind.store(false, Ordering::Relaxed);
        }
        if let Some((n, notice)) = self.take_notice() {
            match tokio::time::timeout_at(deadline, self.tx.send(notice)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    self.untold.fetch_add(n, Ordering::Relaxed);
                    self.behind.store(true, Ordering::Relaxed);
                    self.drop_one(dropped);
                    return;
                }
            }
        }
        let d = Delivery::Message {
            id: None,
            event: ev.clone(),
        };
        if tokio::time::timeout_at(deadline, self.tx.send(d))
            .await
            .is_err()
        {
            self.behind.store(true, Ordering::Relaxed);
            self.drop_one(dropped);
        }
    }
}

/// A QoS 0 subscriber's registered interest; dropping it withdraws the interest.
pub struct Interest {
    interest: Arc<Qos0Interest>,
    filter: String,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut m = lock(&self.interest.subscribed);
        if let Some(n) = m.get_mut(&self.filter) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.filter);
            }
        }
    }
}

/// A local subscriber of the hub: dropping it takes the subscriber off the hub and
/// withdraws its interest.
pub struct Attached {
    subs: Arc<Mutex<Subscribers>>,
    id: u64,
    _interest: Interest,
}

impl Drop for Attached {
    fn drop(&mut self) {
        lock(&self.subs).by_id.remove(&self.id);
    }
}

impl Qos0Hub {
    /// A hub whose interest is kept in `interest` (which the node advertises).
    pub fn new(interest: Arc<Qos0Interest>) -> Self {
        Qos0Hub {
            tx: broadcast::channel(QOS0_HUB_CAPACITY).0,
            subs: Arc::default(),
            interest,
            dropped: Counter::default(),
        }
    }

    /// The same hub, counting the events it drops for subscribers that are behind in
    /// `dropped` (the node registers it as `canal_qos0_hub_dropped_total`).
    pub fn counting_drops_in(mut self, dropped: Counter) -> Self {
        self.dropped = dropped;
        self
    }

    /// Events dropped so far for local subscribers that were behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Puts every QoS 0 event that matches `filter` into `tx`, until the guard is dropped
    /// (the interest in `filter` is advertised as long).
    pub fn attach(&self, filter: TopicFilter, tx: FeedTx<Delivery>) -> Attached {
        let interest = self.register(&filter);
        let mut subs = lock(&self.subs);
        subs.next += 1;
        let id = subs.next;
        subs.by_id.insert(
            id,
            Arc::new(HubSub {
                filter,
                tx,
                behind: AtomicBool::new(false),
                untold: AtomicU64::new(0),
            }),
        );
        Attached {
            subs: self.subs.clone(),
            id,
            _interest: interest,
        }
    }

    /// The local subscribers whose filter matches `topic`.
    fn matching(&self, topic: &str) -> Vec<Arc<HubSub>> {
        let Ok(t) = Topic::new(topic) else {
            return Vec::new();
        };
        lock(&self.subs)
            .by_id
            .values()
            .filter(|s| s.filter.matches(&t) && !s.tx.is_closed())
            .cloned()
            .collect()
    }

    /// The event for the broadcast (if anyone listens) and for the local subscribers.
    fn split(&self, m: Qos0Message) -> Arc<EventData> {
        if self.tx.receiver_count() > 0 {
            // No receiver is no error: at most once.
            let _ = self.tx.send(Arc::new(m.clone()));
        }
        Arc::new(EventData::qos0(m))
    }

    /// What this hub's subscribers and triggers listen to.
    pub fn interest(&self) -> &Arc<Qos0Interest> {
        &self.interest
    }

    /// Registers a local subscriber's filter for as long as the guard lives.
    pub fn register(&self, filter: &TopicFilter) -> Interest {
        *lock(&self.interest.subscribed)
            .entry(filter.to_string())
            .or_insert(0) += 1;
        Interest {
            interest: self.interest.clone(),
            filter: filter.to_string(),
        }
    }

    /// Sets the filters of the QoS 0 triggers this node executes.
    pub fn set_trigger_filters(&self, filters: Vec<String>) {
        *lock(&self.interest.trigger_filters) = filters;
    }

    /// Listens to every QoS 0 event that passes this node.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Qos0Message>> {
        self.tx.subscribe()
    }

    /// Hands an event to this node's QoS 0 subscribers without waiting: a subscriber with
    /// no room now misses it (counted, and told). Publishers use [`Qos0Hub::deliver_wait`].
    pub fn deliver(&self, m: Qos0Message) {
        let subs = self.matching(&m.topic);
        let ev = self.split(m);
        for s in subs {
            s.offer_now(&ev, &self.dropped);
        }
    }

    /// Hands an event to this node's QoS 0 subscribers, waiting up to [`QOS0_HUB_WAIT`] in
    /// all for room in the queues of those not behind.
    pub async fn deliver_wait(&self, m: Qos0Message) {
        let subs = self.matching(&m.topic);
        let ev = self.split(m);
        let deadline = tokio::time::Instant::now() + QOS0_HUB_WAIT;
        for s in subs {
            s.offer(&ev, deadline, &self.dropped).await;
        }
    }
}

/// Publishes a QoS 0 event from this node: to its own subscribers and to every other live
/// peer that wants it, once; waits only (a bounded time) for room on the peers' links.
pub async fn publish_qos0<L: Qos0Link>(link: &L, hub: &Qos0Hub, m: Qos0Message) {
    if let (Ok(body), Ok(topic)) = (wire::encode(&m), Topic::new(&m.topic)) {
        for p in interested_peers(link, &topic) {
            link.send(p, body.clone()).await;
        }
    }
    hub.deliver_wait(m).await;
}

/// Why a QoS 0 message from a peer was refused: a kind for the peer's record and a detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos0Refused {
    /// `qos0-decode`, `qos0-forged` or `qos0-invalid`.
    pub kind: &'static str,
    /// What was wrong.
    pub detail: String,
}

/// Checks a QoS 0 message `body` that peer `sender` (its peer id, as written in sources)
/// sent: it decodes within `max_bytes`, names `sender` as its source (events are never
/// relayed), has a valid topic and a payload within [`crate::MAX_PAYLOAD_BYTES`].
pub fn check_qos0(sender: &str, body: &[u8], max_bytes: usize) -> Result<Qos0Message, Qos0Refused> {
    let refused = |kind, detail| Qos0Refused { kind, detail };
    let m: Qos0Message = wire::decode_with_limit(body, max_bytes)
        .map_err(|e| refused("qos0-decode", format!("undecodable QoS 0 event: {e}")))?;
    if m.source.strip_prefix("canal://") != Some(sender) {
        return Err(refused(
            "qos0-forged",
            format!(
                "QoS 0 event from {sender} claims source {:?}",
                m.source.chars().take(80).collect::<String>()
            ),
        ));
    }
    Topic::new(&m.topic).map_err(|e| refused("qos0-invalid", format!("QoS 0 event topic: {e}")))?;
    if m.payload.len() > crate::MAX_PAYLOAD_BYTES {
        return Err(refused(
            "qos0-invalid",
            format!(
                "QoS 0 payload of {} bytes is over the limit of {} (MAX_PAYLOAD_BYTES)",
                m.payload.len(),
                crate::MAX_PAYLOAD_BYTES
            ),
        ));
    }
    Ok(m)
}

/// Whether node `id` is a member (voter or learner) of the metadata group as this node
/// knows it; a node that is no member itself yet takes events from anyone it is connected
/// to (a peer about to be added may send a few).
pub fn sent_by_member<T: Transport>(consensus: &Consensus<T>, id: NodeId) -> bool {
    consensus
        .with_metrics(GroupId::METADATA, |m| {
            let mut nodes = m.membership_config.nodes().peekable();
            nodes.peek().is_none() || nodes.any(|(n, _)| *n == id)
        })
        .unwrap_or(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(source: String) -> Qos0Message {
        Qos0Message {
            topic: "a/b".into(),
            id: "1".into(),
            source,
            time_ms: 1,
            headers: vec![],
            payload: b"x".to_vec(),
        }
    }

    const MAX: usize = 2 << 20;

    #[test]
    fn qos0_events_are_checked() {
        let peer = "12D3KooWpeer";
        let good = wire::encode(&event(format!("canal://{peer}"))).unwrap();
        assert!(check_qos0(peer, &good, MAX).is_ok());
        let forged = wire::encode(&event("canal://12D3KooWother".into())).unwrap();
        assert_eq!(
            check_qos0(peer, &forged, MAX).err().map(|e| e.kind),
            Some("qos0-forged")
        );
        assert_eq!(
            check_qos0(peer, &good[..good.len() - 1], MAX)
                .err()
                .map(|e| e.kind),
            Some("qos0-decode")
        );
        let mut bad_topic = event(format!("canal://{peer}"));
        bad_topic.topic = "a/#".into();
        let bytes = wire::encode(&bad_topic).unwrap();
        assert_eq!(
            check_qos0(peer, &bytes, MAX).err().map(|e| e.kind),
            Some("qos0-invalid")
        );
        let mut big = event(format!("canal://{peer}"));
        big.payload = vec![0; crate::MAX_PAYLOAD_BYTES + 1];
        let e = check_qos0(peer, &wire::encode(&big).unwrap(), MAX).unwrap_err();
        assert!(e.detail.contains("MAX_PAYLOAD_BYTES"), "{e:?}");
    }

    struct Peers(Vec<(u8, Vec<String>)>, Mutex<Vec<(u8, usize)>>);

    impl Qos0Link for Peers {
        type Peer = u8;
        fn peers(&self) -> Vec<(u8, Vec<String>)> {
            self.0.clone()
        }
        async fn send(&self, peer: u8, bytes: Vec<u8>) {
            lock(&self.1).push((peer, bytes.len()));
        }
    }

    #[tokio::test]
    async fn an_event_goes_to_the_interested_peers_and_the_local_subscribers() {
        let link = Peers(
            vec![
                (1, vec!["a/#".into()]),
                (2, vec!["b/+".into(), "not a filter/#/x".into()]),
                (3, vec!["+/b".into()]),
            ],
            Mutex::default(),
        );
        let hub = Qos0Hub::new(Arc::default());
        let mut rx = hub.subscribe();
        publish_qos0(&link, &hub, event("canal://me".into())).await;
        let sent: Vec<u8> = lock(&link.1).iter().map(|(p, _)| *p).collect();
        assert_eq!(sent, vec![1, 3]);
        assert_eq!(rx.recv().await.unwrap().topic, "a/b");
    }

    fn feed() -> (FeedTx<Delivery>, crate::feed::FeedRx<Delivery>) {
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        crate::feed::feed(slot)
    }

    fn numbered(i: usize) -> Qos0Message {
        let mut m = event("canal://me".into());
        m.id = i.to_string();
        m
    }

    #[tokio::test]
    async fn a_subscriber_that_keeps_up_loses_nothing() {
        let hub = Qos0Hub::new(Arc::default());
        let (tx, mut rx) = feed();
        let _a = hub.attach(TopicFilter::new("a/#").unwrap(), tx);
        let (other, _other_rx) = feed();
        let _b = hub.attach(TopicFilter::new("b/#").unwrap(), other);
        const N: usize = 5000;
        let reader = tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < N {
                match rx.recv().await {
                    Some(Delivery::Message { event, .. }) => ids.push(event.id.clone()),
                    other => panic!("{other:?}"),
                }
            }
            ids
        });
        // Far more than a queue holds: the publisher waits for the reader.
        for i in 0..N {
            hub.deliver_wait(numbered(i)).await;
        }
        let ids = reader.await.unwrap();
        assert_eq!(ids, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
        assert_eq!(hub.dropped(), 0);
    }

    #[tokio::test]
    async fn a_stalled_subscriber_costs_one_wait_and_is_told_what_it_missed() {
        let dropped = Counter::default();
        let hub = Qos0Hub::new(Arc::default()).counting_drops_in(dropped.clone());
        let (tx, mut rx) = feed();
        let attached = hub.attach(TopicFilter::new("a/#").unwrap(), tx);
        assert_eq!(hub.interest().subscribed().get("a/#"), Some(&1));
        let started = tokio::time::Instant::now();
        for i in 0..300 {
            hub.deliver_wait(numbered(i)).await;
        }
        // The queue took 256; the 257th waited once, then the rest went without waiting.
        let waited = started.elapsed();
        assert!(
            waited >= QOS0_HUB_WAIT && waited < QOS0_HUB_WAIT * 8,
            "{waited:?}"
        );
        assert_eq!((hub.dropped(), dropped.get()), (44, 44));
        for i in 0..256 {
            match rx.recv().await {
                Some(Delivery::Message { event, .. }) => assert_eq!(event.id, i.to_string()),
                other => panic!("{other:?}"),
            }
        }
        // Caught up: the next event comes after the notice of the 44 it missed.
        hub.deliver_wait(numbered(300)).await;
        assert_eq!(
            rx.recv().await,
            Some(Delivery::Lagged(r#"{"dropped":44}"#.into()))
        );
        match rx.recv().await {
            Some(Delivery::Message { event, .. }) => assert_eq!(event.id, "300"),
            other => panic!("{other:?}"),
        }
        // The synchronous path drops too, without waiting, and counts.
        for i in 0..257 {
            hub.deliver(numbered(i));
        }
        assert_eq!(hub.dropped(), 45);
        drop(attached);
        assert!(hub.interest().subscribed().is_empty());
        assert!(hub.matching("a/b").is_empty());
    }

    #[test]
    fn interest_lives_as_long_as_its_guards() {
        let hub = Qos0Hub::new(Arc::default());
        let f = TopicFilter::new("a/+").unwrap();
        let one = hub.register(&f);
        let two = hub.register(&f);
        hub.set_trigger_filters(vec!["t/#".into()]);
        assert_eq!(hub.interest().subscribed().get("a/+"), Some(&2));
        drop(one);
        assert_eq!(hub.interest().subscribed().get("a/+"), Some(&1));
        drop(two);
        assert!(hub.interest().subscribed().is_empty());
        assert_eq!(
            hub.interest().filters().into_iter().collect::<Vec<_>>(),
            vec!["t/#".to_string()]
        );
    }
}

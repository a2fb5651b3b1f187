//! QoS 0: never touches Raft. The accepting node hands an event to its own QoS 0
//! subscribers (the [`Qos0Hub`]) and sends one copy to every other live peer whose
//! advertised interest matches the topic, through a [`Qos0Link`] the node provides (the
//! mesh's QoS 0 lane). At most once: a full queue anywhere drops the copy.

use canal_consensus::{Consensus, GroupId, NodeId, Transport};
use canal_proto::{Topic, TopicFilter, wire};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// How many QoS 0 events the hub holds for a slow local subscriber before it starts
/// dropping them for it (it is told how many, as `{"dropped":N}`).
pub const QOS0_HUB_CAPACITY: usize = 4096;

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
    interest: Arc<Qos0Interest>,
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

impl Qos0Hub {
    /// A hub whose interest is kept in `interest` (which the node advertises).
    pub fn new(interest: Arc<Qos0Interest>) -> Self {
        Qos0Hub {
            tx: broadcast::channel(QOS0_HUB_CAPACITY).0,
            interest,
        }
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

    /// Hands an event to this node's QoS 0 subscribers.
    pub fn deliver(&self, m: Qos0Message) {
        // No subscriber is no error: at most once.
        let _ = self.tx.send(Arc::new(m));
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
    hub.deliver(m);
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

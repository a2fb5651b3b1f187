//! # canal-mqtt — MQTT 3.1.1 and 5.0 sessions over canal's topics
//!
//! Every node speaks MQTT over the same topic space as its HTTP API: an MQTT publish is a
//! canal publish ([`canal_pubsub::PubSub::publish`]), an MQTT subscription is one canal
//! subscription ([`canal_pubsub::PubSub::subscribe_with_qos0`]: QoS 1 from the committed
//! log, QoS 0 from the node's hub, in one queue), a persistent
//! session is durable subscriptions named after the client. Nothing here stores topics of
//! its own; retained messages and sessions are records of the Raft state machine.
//!
//! ## Layout
//!
//! - [`codec`]: packets in and out for both versions (the `rumqttc` crate's codec, framed by
//!   a small decoder of our own), as one [`codec::Inbound`] and [`codec::Outbound`].
//! - [`topics`]: MQTT's topic rules at canal's edge (`$` topics, `$share/G/F`).
//! - [`records`]: the replicated records: retained messages, persistent sessions, and which
//!   connection holds a client id (so a CONNECT on another node takes the session over).
//! - [`session`]: a session's decisions without I/O: headers of a publish, what a delivery
//!   becomes for a client, topic aliases.
//! - [`share`]: shared subscriptions: replicated members with leases, a message to one.
//! - [`wills`]: wills of clients whose node died, sent once by a live node.
//! - [`conn`]: one connection: CONNECT, then packets in and deliveries out.
//! - [`metrics`]: `canal_mqtt_*` counters.
//! - [`Mqtt`]: the service a node runs; [`Mqtt::serve`] accepts TCP connections,
//!   [`Mqtt::connection`] serves any byte stream (the node's WebSocket on `/mqtt`).
//!
//! ```text
//!   TCP / WebSocket ─> conn: frame ─> decode ─> Inbound
//!        PUBLISH ─> PubSub::publish (QoS 1: PUBACK after commit) [+ retained record]
//!        SUBSCRIBE ─> PubSub::subscribe (hub + log; durable if the session persists)
//!                     └─> deliveries ─> PUBLISH out ─> PUBACK in ─> PubSub::ack
//! ```

pub mod codec;
pub mod conn;
pub mod metrics;
pub mod records;
pub mod session;
pub mod share;
pub mod topics;
pub mod wills;

pub use metrics::MqttMetrics;

use canal_consensus::Transport;
use canal_pubsub::{PubSub, Qos0Link};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The limits of the MQTT listener.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// The largest packet accepted, bytes (5.0 clients are told it as Maximum Packet Size).
    pub max_packet_bytes: usize,
    /// QoS 1 publishes a client may have unacknowledged at once (Receive Maximum); past it a
    /// 5.0 client is disconnected (0x93) and a 3.1.1 client is no longer read from.
    pub max_inflight_in: u16,
    /// QoS 1 messages the node sends a client before waiting for its PUBACKs (or fewer, as
    /// the client's Receive Maximum says).
    pub max_inflight_out: u16,
    // Deliveries waiting for one connection are bounded by the subscriber queue's
    // `canal_pubsub::feed::MAX_BUFFERED_BYTES`: past it the subscriptions wait.
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Topic aliases a 5.0 client may use.
    pub topic_alias_max: u16,
    /// How long a connection may take to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_bytes: canal_pubsub::MAX_PAYLOAD_BYTES + (64 << 10),
            max_inflight_in: 256,
            max_inflight_out: 256,
            max_subscriptions: 100,
            topic_alias_max: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What a CONNECT presents, for [`ConnectAuth`].
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The client id.
    pub client_id: &'a str,
    /// The user name, if given.
    pub username: Option<&'a str>,
    /// The password, if given (where a token goes).
    pub password: Option<&'a str>,
}

/// Why a CONNECT was refused by [`ConnectAuth`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefused {
    /// Credentials missing or wrong (CONNACK 0x86 / 3.1.1: 4).
    #[error("bad user name or password: {0}")]
    BadCredentials(String),
    /// Not allowed (CONNACK 0x87 / 3.1.1: 5).
    #[error("not authorized: {0}")]
    NotAuthorized(String),
}

/// Decides whether a CONNECT may go on, and what the client may do then: the hook where
/// tokens are checked. It runs on the connection's task, so it must not block.
pub trait ConnectAuth: Send + Sync + 'static {
    /// The connection's rights to accept it, or why it is refused.
    fn check(&self, c: Credentials<'_>) -> Result<Arc<dyn Rights>, AuthRefused>;
}

/// What an accepted client may do, checked on each PUBLISH (and the will) and on each
/// SUBSCRIBE filter; a refusal is answered 0x87 (Not authorized) where MQTT can say so.
pub trait Rights: Send + Sync + 'static {
    /// `Err(why)` when the client may not publish to `topic`.
    fn may_publish(&self, topic: &canal_proto::Topic) -> Result<(), String>;
    /// `Err(why)` when the client may not subscribe with `filter`.
    fn may_subscribe(&self, filter: &canal_proto::TopicFilter) -> Result<(), String>;
}

/// Accepts every client and lets it do anything (`--auth none`, and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl ConnectAuth for AcceptAll {
    fn check(&self, _: Credentials<'_>) -> Result<Arc<dyn Rights>, AuthRefused> {
        Ok(Arc::new(AcceptAll))
    }
}

impl Rights for AcceptAll {
    fn may_publish(&self, _: &canal_proto::Topic) -> Result<(), String> {
        Ok(())
    }
    fn may_subscribe(&self, _: &canal_proto::TopicFilter) -> Result<(), String> {
        Ok(())
    }
}

/// The connections of this node by client id, so a second connection with the same id
/// takes the session over (the first is closed, 0x8E), and pending wills by client id, so
/// a client that comes back in time cancels its will.
#[derive(Default)]
pub(crate) struct Local {
    pub(crate) conns: HashMap<String, (u64, watch::Sender<bool>)>,
    pub(crate) wills: HashMap<String, tokio::task::AbortHandle>,
    pub(crate) next: u64,
}

/// The MQTT service of one node. Cheap to clone.
pub struct Mqtt<T: Transport, L: Qos0Link> {
    pub(crate) pubsub: PubSub<T, L>,
    pub(crate) config: Arc<MqttConfig>,
    pub(crate) auth: Arc<dyn ConnectAuth>,
    pub(crate) metrics: MqttMetrics,
    pub(crate) local: Arc<Mutex<Local>>,
    pub(crate) closing: watch::Receiver<bool>,
    pub(crate) nodes: Option<Arc<Nodes>>,
}

/// Which node this is and which nodes are alive: what the will keeper needs.
pub(crate) struct Nodes {
    pub(crate) me: String,
    pub(crate) live: Box<dyn Fn() -> Vec<String> + Send + Sync>,
}

impl<T: Transport, L: Qos0Link> Clone for Mqtt<T, L> {
    fn clone(&self) -> Self {
        Mqtt {
            pubsub: self.pubsub.clone(),
            config: self.config.clone(),
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            local: self.local.clone(),
            closing: self.closing.clone(),
            nodes: self.nodes.clone(),
        }
    }
}

impl<T: Transport, L: Qos0Link> Mqtt<T, L> {
    /// The service over `pubsub`; connections end when `closing` becomes true.
    pub fn new(
        pubsub: PubSub<T, L>,
        config: MqttConfig,
        auth: Arc<dyn ConnectAuth>,
        metrics: MqttMetrics,
        closing: watch::Receiver<bool>,
    ) -> Self {
        Mqtt {
            pubsub,
            config: Arc::new(config),
            auth,
            metrics,
            local: Arc::default(),
            closing,
            nodes: None,
        }
    }

    /// The same service on node `me` (its peer id), with `live` naming the nodes alive now
    /// (the peer table, this node among them): connections then keep their wills in
    /// replicated records, so another node sends a will whose node died
    /// ([`Mqtt::keep_wills`]). Without it a will lives only in its node's memory.
    pub fn with_nodes(
        mut self,
        me: String,
        live: impl Fn() -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.nodes = Some(Arc::new(Nodes {
            me,
            live: Box::new(live),
        }));
        self
    }

    /// Starts this node's will keeper ([`wills`]), until the node closes; nothing without
    /// [`Mqtt::with_nodes`].
    pub fn keep_wills(&self) {
        if self.nodes.is_some() {
            tokio::spawn(conn::keep_wills(self.clone()));
        }
    }

    /// Accepts MQTT connections on `listener` until the node closes.
    pub async fn serve(self, listener: TcpListener) {
        let mut closing = self.closing.clone();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let me = self.clone();
                        tokio::spawn(async move { me.connection(stream, peer.to_string()).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = until_true(&mut closing) => return,
            }
        }
    }

    /// Serves one MQTT connection over `io` (TCP, or a WebSocket's bytes) until it ends.
    pub async fn connection<S>(&self, io: S, peer: String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        conn::run(self.clone(), io, peer).await
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        // Nothing panics while holding it, so a poisoned map is still consistent.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves once `rx` holds true (or its sender is gone); holds no borrow of the value.
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

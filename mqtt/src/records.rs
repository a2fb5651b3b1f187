//! What the MQTT layer keeps replicated: retained messages (per topic, in the topic's data
//! group) and persistent sessions (per client id). Both are records of the state machine's
//! internal keyspace ([`canal_consensus::keys::RETAINED`], [`canal_consensus::keys::MQTT_SESSIONS`])
//! written with `Op::Internal`, so every replica holds the same bytes; the values are
//! encoded in canal's versioned wire envelope.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A retained message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// Its QoS as published (0 or 1).
    pub qos: u8,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its user properties.
    pub user_properties: Vec<(String, String)>,
    /// When it was published, ms since the epoch (the accepting node's clock).
    pub time_ms: u64,
    /// Its message expiry in seconds, if it has one.
    pub expiry_s: Option<u32>,
}

/// One subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSub {
    /// The MQTT filter as the client gave it (may be `$share/G/F`).
    pub filter: String,
    /// The granted QoS.
    pub qos: u8,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// The subscription identifier.
    pub id: Option<usize>,
    /// Retain Handling: 0 send retained messages, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
}

/// A persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Made fresh when the session is created: the durable subscriptions of this session
    /// are named after it, so a new session never inherits an old one's cursors.
    pub epoch: String,
    /// Its subscriptions.
    pub subs: Vec<SessionSub>,
    /// How long it outlives a connection, seconds (`u32::MAX`: for ever).
    pub expiry_s: u32,
    /// When its last connection ended, ms since the epoch; `None` while connected.
    pub disconnected_ms: Option<u64>,
}

impl Session {
    /// Whether the session has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        match (self.disconnected_ms, self.expiry_s) {
            (_, u32::MAX) | (None, _) => false,
            (Some(at), s) => now_ms >= at.saturating_add(u64::from(s) * 1000),
        }
    }
}

/// Which connection holds a client id, cluster-wide: written by every CONNECT, so the
/// connection it replaces (on any node) sees a record that is not its own and closes, as
/// one broker would close the older of two connections with the same client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The connection: a fresh id made at its CONNECT.
    pub conn: String,
}

/// The key of `client`'s [`Owner`] record (next to its session record; no client id
/// starts with `$`, so none can name it).
pub fn owner_key(client: &str) -> String {
    format!("$owner/{client}")
}

/// Whether the connection `conn` was taken over, as the owner record `stored` says: only
/// a record naming another connection says so (one removed, or never written, does not).
pub fn taken_over(stored: Option<&[u8]>, conn: &str) -> bool {
    stored
        .and_then(|b| decode::<Owner>(b).ok())
        .is_some_and(|o| o.conn != conn)
}

/// A connection's will, replicated so that another node sends it if the connection's node
/// dies (the node itself sends it when the connection ends abnormally, and then removes
/// the record; a DISCONNECT 0x00 removes it unsent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    /// The connection it belongs to (its [`Owner::conn`]).
    pub conn: String,
    /// The node the connection was on (its peer id).
    pub node: String,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its QoS (0 or 1).
    pub qos: u8,
    /// Whether it is retained.
    pub retain: bool,
    /// Its user properties.
    pub user_properties: Vec<(String, String)>,
    /// Its message expiry, seconds.
    pub expiry_s: Option<u32>,
    /// Seconds to wait before it is sent: the Will Delay, at most the session's expiry.
    pub delay_s: u32,
}

/// The key of `client`'s [`StoredWill`] record.
pub fn will_key(client: &str) -> String {
    format!("$will/{client}")
}

/// The durable subscription that holds the cursors of `client`'s subscription `filter` in
/// session `epoch`: a name canal accepts (`mqtt-` and 40 hex digits), whatever the client
/// id holds.
pub fn durable_name(client: &str, epoch: &str, filter: &str) -> String {
    let mut h = Sha256::new();
    for part in [client, epoch, filter] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let hex = hex::encode(h.finalize());
    format!("mqtt-{}", &hex[..40])
}

/// Encodes a record in canal's versioned envelope.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, canal_proto::wire::WireError> {
    canal_proto::wire::encode(v)
}

/// Decodes a record written by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, canal_proto::wire::WireError> {
    canal_proto::wire::decode(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_only_once_disconnected() {
        let mut s = Session {
            epoch: "e".into(),
            subs: Vec::new(),
            expiry_s: 10,
            disconnected_ms: None,
        };
        assert!(!s.expired(u64::MAX));
        s.disconnected_ms = Some(1000);
        assert!(!s.expired(10_999));
        assert!(s.expired(11_000));
        s.expiry_s = u32::MAX;
        assert!(!s.expired(u64::MAX));
        let back: Session = decode(&encode(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn only_a_record_of_another_connection_is_a_takeover() {
        let mine = encode(&Owner { conn: "c1".into() }).unwrap();
        let theirs = encode(&Owner { conn: "c2".into() }).unwrap();
        assert!(!taken_over(Some(&mine), "c1"));
        assert!(taken_over(Some(&theirs), "c1"));
        assert!(!taken_over(None, "c1"), "removed: nobody took it");
        assert!(!taken_over(Some(b"damaged"), "c1"));
        assert_eq!(owner_key("a/b"), "$owner/a/b");
    }

    #[test]
    fn durable_names_are_canal_names_and_differ_per_epoch_and_filter() {
        let a = durable_name("client/\u{e9}", "1", "a/#");
        assert!(canal_pubsub::subscribe::check_subscription_name(&a).is_ok());
        assert_ne!(a, durable_name("client/\u{e9}", "2", "a/#"));
        assert_ne!(a, durable_name("client/\u{e9}", "1", "a/+"));
        // Parts are length-prefixed, so shifting a boundary changes the name.
        assert_ne!(durable_name("ab", "c", "d"), durable_name("a", "bc", "d"));
    }
}

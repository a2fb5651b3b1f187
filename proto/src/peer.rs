//! The messages peers send each other outside the topic log: the channel byte that opens
//! every peer RPC, the formation handshake, and QoS 0 events. Each body is a
//! [`crate::wire`] envelope (version byte first).

use serde::{Deserialize, Serialize};

/// The lane a peer RPC travels in, named by its first byte. The bytes are distinct from any
/// wire format version byte, so a message framed wrongly is refused rather than misread.
/// (QoS 0 events have a libp2p protocol of their own and no channel byte.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerChannel {
    /// `R`: a Raft message for one of the groups.
    Raft,
    /// `F`: a request to confirm a cluster formation ([`FormRequest`]).
    Formation,
}

impl PeerChannel {
    /// Every channel.
    pub const ALL: [PeerChannel; 2] = [PeerChannel::Raft, PeerChannel::Formation];

    /// The first byte of an RPC on this channel.
    pub fn byte(self) -> u8 {
        match self {
            PeerChannel::Raft => b'R',
            PeerChannel::Formation => b'F',
        }
    }

    /// The channel a first byte names, if any.
    pub fn from_byte(b: u8) -> Option<PeerChannel> {
        PeerChannel::ALL.into_iter().find(|c| c.byte() == b)
    }

    /// Splits an RPC body into its channel and the rest; `Err` carries the unknown first
    /// byte, `Ok(None)` an empty body.
    pub fn split(body: &[u8]) -> Result<Option<(PeerChannel, &[u8])>, u8> {
        match body.split_first() {
            None => Ok(None),
            Some((&b, rest)) => PeerChannel::from_byte(b).map(|c| Some((c, rest))).ok_or(b),
        }
    }

    /// `body` framed for this channel: the channel byte, then the body.
    pub fn frame(self, body: &[u8]) -> Vec<u8> {
        let mut framed = Vec::with_capacity(body.len() + 1);
        framed.push(self.byte());
        framed.extend_from_slice(body);
        framed
    }
}

/// A forming peer's request to confirm the members of the first cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRequest {
    /// The peer ids of every voter of the cluster to be formed, the initiator included.
    pub members: Vec<String>,
}

/// The answer to a [`FormRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FormAnswer {
    /// This peer takes part, and promises no other initiator for a while.
    Granted,
    /// This peer does not take part, and why.
    Refused(String),
}

/// A QoS 0 event as sent between peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qos0Message {
    /// The event.
    pub topic: String,
    /// Message id.
    pub id: String,
    /// The node that accepted it.
    pub source: String,
    /// Accepted at, ms since the epoch.
    pub time_ms: u64,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Payload (read and written as one slice; the same bytes as a plain `Vec<u8>`).
    #[serde(with = "crate::wire::bytes")]
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_keep_their_bytes() {
        assert_eq!(PeerChannel::Raft.byte(), b'R');
        assert_eq!(PeerChannel::Formation.byte(), b'F');
        for c in PeerChannel::ALL {
            assert_eq!(PeerChannel::from_byte(c.byte()), Some(c));
            assert_ne!(c.byte(), crate::wire::WIRE_VERSION);
        }
        assert_eq!(PeerChannel::from_byte(b'X'), None);
        assert_eq!(PeerChannel::split(b""), Ok(None));
        assert_eq!(
            PeerChannel::split(b"Fxy"),
            Ok(Some((PeerChannel::Formation, &b"xy"[..])))
        );
        assert_eq!(PeerChannel::split(b"?"), Err(b'?'));
        assert_eq!(PeerChannel::Raft.frame(b"ab"), b"Rab");
    }

    #[test]
    fn a_qos0_message_round_trips_on_the_wire() {
        let m = Qos0Message {
            topic: "a/b".into(),
            id: "i".into(),
            source: "p".into(),
            time_ms: 5,
            headers: vec![("k".into(), "v".into())],
            payload: vec![0, 1, 255],
        };
        let bytes = crate::wire::encode(&m).expect("encodes");
        assert_eq!(crate::wire::decode::<Qos0Message>(&bytes).ok(), Some(m));
        let f = FormAnswer::Refused("no".into());
        let bytes = crate::wire::encode(&f).expect("encodes");
        assert_eq!(crate::wire::decode::<FormAnswer>(&bytes).ok(), Some(f));
    }
}

//! Hostile bytes against the check of QoS 0 events from peers: random bytes and valid
//! encodings mutated (bits flipped, bytes cut, inserted, overwritten). The check answers
//! (never panics), and whatever it accepts keeps its promises: the claimed source is the
//! sender, the topic is a topic, the payload is within the limit.

#![allow(clippy::unwrap_used)]

use canal_proto::Topic;
use canal_proto::wire::{self, WIRE_VERSION};
use canal_pubsub::Qos0Message;
use canal_pubsub::qos0::check_qos0;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const SENDER: &str = "12D3KooWsender";
const MAX: usize = 2 << 20;

fn config() -> Config {
    Config {
        cases: 4_000,
        rng_seed: RngSeed::Fixed(0x0905_0b5e_0000),
        failure_persistence: None,
        ..Config::default()
    }
}

fn valid(topic: &str, payload: Vec<u8>, headers: usize) -> Vec<u8> {
    wire::encode(&Qos0Message {
        topic: topic.into(),
        id: "id-1".into(),
        source: format!("canal://{SENDER}"),
        time_ms: 1_700_000_000_000,
        headers: (0..headers)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect(),
        payload,
    })
    .unwrap()
}

fn promises_kept(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = check_qos0(SENDER, bytes, MAX) {
        prop_assert_eq!(m.source, format!("canal://{SENDER}"));
        prop_assert!(Topic::new(&m.topic).is_ok(), "{:?}", m.topic);
        prop_assert!(m.payload.len() <= canal_pubsub::MAX_PAYLOAD_BYTES);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend(body);
        promises_kept(&bytes)?;
    }

    #[test]
    fn mutated_encodings(
        topic in "[a-z]{1,8}(/[a-z+#]{1,4}){0,3}",
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        headers in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut bytes = valid(&topic, payload, headers);
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at % bytes.len();
            match kind {
                0 => bytes[i] ^= 1 << (byte % 8),
                1 => bytes.truncate(i),
                2 => bytes.insert(i, byte),
                _ => bytes[i] = 0xff,
            }
        }
        promises_kept(&bytes)?;
    }

    #[test]
    fn valid_events_from_their_sender_pass(
        topic in "[a-z]{1,8}(/[a-z]{1,4}){0,3}",
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let m = check_qos0(SENDER, &valid(&topic, payload.clone(), 1), MAX).unwrap();
        prop_assert_eq!(m.topic, topic);
        prop_assert_eq!(m.payload, payload);
        // The same bytes from any other peer are forged.
        let forged = check_qos0("12D3KooWother", &valid(&m.id, vec![], 0), MAX);
        prop_assert_eq!(forged.err().map(|e| e.kind), Some("qos0-forged"));
    }
}

//! Hostile bytes against every decoder of peer bytes in proto (and the capability record the
//! dht decodes from gossip): random bytes, and valid encodings mutated by flipping bits,
//! inserting, removing, truncating and overwriting length prefixes with huge values.
//!
//! Each case asserts: the decoder returns (`Ok` or `Err`), it does not panic, and no single
//! allocation made while decoding is larger than the message's claim budget
//! ([`wire::claim_budget`]) nor larger than a small multiple of the bytes actually present.
//! A counting global allocator records the largest allocation of this thread while armed, so
//! the assertion is measured, not assumed.

use canal_proto::caps::{Capabilities, Gpu, GpuSource, Load};
use canal_proto::function::{FunctionSpec, InvokeResult, LogLine, Output, TriggerSpec};
use canal_proto::settings::TopicSettings;
use canal_proto::wire::{self, WIRE_VERSION};
use canal_proto::{Topic, TopicFilter};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the bookkeeping only
// touches const-initialised thread-locals of Copy types, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, same contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, same contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same pointer and layout, same contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same pointer and layout, same contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Decodes `bytes` as a `T`, and returns whether it decoded and the largest allocation made.
fn decode_measured<T: DeserializeOwned>(bytes: &[u8]) -> (bool, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let result = wire::decode::<T>(bytes);
    ARMED.with(|a| a.set(false));
    let ok = result.is_ok();
    drop(result);
    (ok, LARGEST.with(Cell::get))
}

/// The largest allocation any decode may make: a message's claim budget, and also no more than
/// this many times the bytes present (plus a small constant for fixed-size values).
const PRESENT_FACTOR: usize = 64;
const PRESENT_FLOOR: usize = 4 << 10;

fn check<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (_, largest) = decode_measured::<T>(bytes);
    let budget = wire::claim_budget(bytes.len());
    prop_assert!(
        largest <= budget,
        "decoding {} bytes allocated {largest} bytes at once, over the budget of {budget}",
        bytes.len()
    );
    let present = bytes.len() * PRESENT_FACTOR + PRESENT_FLOOR;
    prop_assert!(
        largest <= present,
        "decoding {} bytes allocated {largest} bytes at once, over {present}",
        bytes.len()
    );
    Ok(())
}

/// A QoS 0 event as peers send it (the node's `Qos0Message`, field for field).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct Qos0Like {
    topic: String,
    id: String,
    source: String,
    time_ms: u64,
    headers: Vec<(String, String)>,
    #[serde(with = "canal_proto::wire::bytes")]
    payload: Vec<u8>,
}

fn gpu(model: &str) -> Gpu {
    Gpu {
        model: model.into(),
        memory_bytes: 80 << 30,
        source: GpuSource::Detected,
    }
}

fn caps_samples() -> Vec<Capabilities> {
    let full = Capabilities {
        peer_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
        version: "0.1.0".into(),
        listen_addrs: vec![
            "/ip4/127.0.0.1/tcp/7000/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .into(),
            "/ip4/10.0.0.1/udp/7000/quic-v1".into(),
        ],
        api_addr: Some("127.0.0.1:7070".into()),
        mqtt_addr: None,
        tier: "edge".into(),
        labels: [("zone".to_string(), "eu-1".to_string())].into(),
        cpu_cores: 16,
        memory_total_bytes: 64 << 30,
        memory_available_bytes: 32 << 30,
        gpus_detected: vec![gpu("H100"), gpu("A10G")],
        gpus_declared: vec![Gpu {
            source: GpuSource::Declared,
            ..gpu("L4")
        }],
        load: Load {
            cpu_percent: 42.5,
            queue_len: 3,
            running_invocations: 1,
        },
        raft_member: true,
        forms_cluster: true,
        interest: vec!["sensors/#".into(), "a/+/c".into()],
        seq: u64::MAX,
        measured_at_ms: 1_700_000_000_000,
    };
    vec![Capabilities::default(), full]
}

fn function_samples() -> Vec<FunctionSpec> {
    vec![FunctionSpec {
        name: "uppercase".into(),
        hash: "ab".repeat(32),
        size: 123_456,
        limits: Default::default(),
        requirements: canal_proto::function::Requirements {
            gpu: true,
            gpu_memory_bytes: Some(1 << 30),
            tier: Some("edge".into()),
            labels: [("zone".to_string(), "a".to_string())].into(),
            replicas: 2,
            hard: true,
        },
        policy: "spread".into(),
        deployed_ms: 17,
    }]
}

fn trigger_samples() -> Vec<TriggerSpec> {
    let filter = TopicFilter::new("in/#").ok();
    let out = Topic::new("out/x").ok();
    filter
        .map(|filter| TriggerSpec {
            name: "t1".into(),
            uid: "u-1".into(),
            filter,
            function: "uppercase".into(),
            out: out.clone(),
            qos: 1,
            retries: 3,
            dead_letter: out,
            created_ms: 5,
        })
        .into_iter()
        .collect()
}

fn invoke_samples() -> Vec<InvokeResult> {
    let output = Output {
        topic: "out/x".into(),
        headers: vec![("k".into(), "v".into())],
        payload: b"HELLO".to_vec(),
    };
    vec![
        InvokeResult {
            function: "f".into(),
            executor: "p".into(),
            result: Ok(()),
            outputs: vec![output.clone(), output],
            state: [("a".to_string(), Some("1".to_string())), ("b".into(), None)].into(),
            logs: vec![LogLine {
                level: "info".into(),
                message: "hi".into(),
            }],
            micros: 99,
        },
        InvokeResult {
            function: "f".into(),
            executor: "p".into(),
            result: Err("trap".into()),
            outputs: vec![],
            state: BTreeMap::new(),
            logs: vec![],
            micros: 0,
        },
    ]
}

fn qos0_samples() -> Vec<Qos0Like> {
    vec![Qos0Like {
        topic: "sensors/a".into(),
        id: "id-1".into(),
        source: "12D3KooW".into(),
        time_ms: 1,
        headers: vec![("content-type".into(), "text/plain".into())],
        payload: vec![0xAB; 300],
    }]
}

fn encodings<T: Serialize>(values: &[T]) -> Vec<Vec<u8>> {
    values.iter().filter_map(|v| wire::encode(v).ok()).collect()
}

/// Huge length prefixes as bincode's varint writes them: `0xFB` + u16, `0xFC` + u32,
/// `0xFD` + u64 (little-endian).
fn huge_prefix(kind: u8) -> Vec<u8> {
    match kind % 5 {
        0 => [vec![0xFD], (1u64 << 40).to_le_bytes().to_vec()].concat(),
        1 => [vec![0xFD], u64::MAX.to_le_bytes().to_vec()].concat(),
        2 => [vec![0xFC], u32::MAX.to_le_bytes().to_vec()].concat(),
        3 => [vec![0xFB], u16::MAX.to_le_bytes().to_vec()].concat(),
        _ => [vec![0xFD], (usize::MAX as u64 / 2).to_le_bytes().to_vec()].concat(),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Prefix(usize, u8),
    Overwrite(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(p, k)| Mutation::Prefix(p, k)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, k)| Mutation::Overwrite(p, k)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        // Position 0 is the version byte; mutate the body mostly, but the version too.
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match *m {
            Mutation::Flip(p, bit) if !bytes.is_empty() => {
                let i = at(p, bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Insert(p, b) => {
                let i = at(p, bytes.len() + 1);
                bytes.insert(i, b);
            }
            Mutation::Remove(p) if !bytes.is_empty() => {
                let i = at(p, bytes.len());
                bytes.remove(i);
            }
            Mutation::Truncate(p) => {
                let i = at(p, bytes.len() + 1);
                bytes.truncate(i);
            }
            Mutation::Prefix(p, kind) => {
                // Insert a huge length where a length may be.
                let i = at(p, bytes.len()).max(1);
                let tail = bytes.split_off(i.min(bytes.len()));
                bytes.extend(huge_prefix(kind));
                bytes.extend(tail);
            }
            Mutation::Overwrite(p, kind) => {
                // Replace the bytes at a position with a huge length.
                let i = at(p, bytes.len()).max(1).min(bytes.len());
                let prefix = huge_prefix(kind);
                let end = (i + prefix.len()).min(bytes.len());
                bytes.splice(i..end, prefix);
            }
            _ => {}
        }
    }
    bytes
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2_000,
        rng_seed: RngSeed::Fixed(0x00ca_7a1d_ec0d),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! hostile {
    ($name:ident, $ty:ty, $samples:expr) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn random_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                    let mut bytes = vec![WIRE_VERSION];
                    bytes.extend(body);
                    check::<$ty>(&bytes)?;
                }

                #[test]
                fn mutated_encodings(
                    pick in any::<usize>(),
                    mutations in proptest::collection::vec(mutation(), 1..4),
                ) {
                    let valid = encodings(&$samples);
                    prop_assert!(!valid.is_empty());
                    let bytes = mutate(valid[pick % valid.len()].clone(), &mutations);
                    check::<$ty>(&bytes)?;
                }
            }

            #[test]
            fn valid_encodings_decode() {
                for (value, bytes) in $samples.iter().zip(encodings(&$samples)) {
                    let back = wire::decode::<$ty>(&bytes);
                    assert_eq!(back.ok().as_ref(), Some(value));
                }
            }
        }
    };
}

fn settings_samples() -> Vec<TopicSettings> {
    vec![TopicSettings::default()]
}

fn string_samples() -> Vec<Vec<String>> {
    vec![vec!["a".to_string(), "bc".into()]]
}

fn byte_samples() -> Vec<Vec<u8>> {
    vec![vec![1u8, 2, 3]]
}

hostile!(capabilities, Capabilities, caps_samples());
hostile!(function_spec, FunctionSpec, function_samples());
hostile!(trigger_spec, TriggerSpec, trigger_samples());
hostile!(invoke_result, InvokeResult, invoke_samples());
hostile!(topic_settings, TopicSettings, settings_samples());
hostile!(qos0_message, Qos0Like, qos0_samples());
hostile!(strings, Vec<String>, string_samples());
hostile!(bytes, Vec<u8>, byte_samples());

/// The exact attack of issue 11: a 13-byte gossip message whose first string (the peer id of a
/// capability record) claims 1 TiB. Every node aborted on it.
#[test]
fn the_13_byte_tebibyte_string() {
    let mut attack = vec![WIRE_VERSION, 0xFD];
    attack.extend((1u64 << 40).to_le_bytes());
    attack.extend(*b"abc");
    assert_eq!(attack.len(), 13);
    let (ok, largest) = decode_measured::<Capabilities>(&attack);
    assert!(!ok);
    assert!(largest < 64 << 10, "allocated {largest} bytes at once");
    // The claim of 1 TiB passes the 64 KiB budget of a 13-byte message: refused by name.
    let err = wire::decode::<Capabilities>(&attack);
    assert!(
        matches!(err, Err(wire::WireError::Limit { len: 13, budget }) if budget == 64 << 10),
        "{err:?}"
    );
}

/// A sequence claiming 2^60 elements with nothing behind it preallocates nothing.
#[test]
fn a_sequence_claiming_too_many_elements_preallocates_nothing() {
    let mut attack = vec![WIRE_VERSION];
    attack.extend(huge_prefix(1));
    for (name, (ok, largest)) in [
        ("Vec<Gpu>", decode_measured::<Vec<Gpu>>(&attack)),
        ("Vec<String>", decode_measured::<Vec<String>>(&attack)),
        (
            "BTreeMap",
            decode_measured::<BTreeMap<String, String>>(&attack),
        ),
    ] {
        assert!(!ok, "{name}");
        assert!(largest < 4 << 10, "{name} allocated {largest} bytes");
    }
}

/// The counting allocator sees allocations, so the assertions above can fail.
#[test]
fn the_allocator_counts() {
    let bytes = wire::encode(&vec![0u8; 100_000]).unwrap_or_default();
    let (ok, largest) = decode_measured::<Vec<u8>>(&bytes);
    assert!(ok);
    assert!(largest >= 100_000, "saw {largest}");
}

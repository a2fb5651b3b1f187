//! The versioned binary envelope for peer-to-peer messages.
//!
//! Every message on the wire is one version byte followed by the bincode (standard config)
//! encoding of the value. A peer refuses a version it does not know with an error naming both
//! versions, instead of misreading the bytes.
//!
//! ## Bounded decoding
//!
//! Bytes from a peer, a file or a client may claim any length in a prefix. [`decode`] never
//! allocates what a prefix claims, only what the bytes that follow it can hold:
//!
//! - A message longer than the caller's limit ([`MAX_MESSAGE_BYTES`] for [`decode`]) is
//!   refused before anything is read ([`WireError::TooLarge`]).
//! - Strings and byte buffers are read by borrowing the input first, so a string claiming
//!   1 TiB fails with "unexpected end" instead of allocating 1 TiB; the copy made afterwards
//!   is exactly as long as the bytes present.
//! - Sequences and maps get a capacity hint of at most 16 elements whatever their claimed
//!   length, so they grow only with the elements that actually decode.
//! - bincode's own claim budget (`with_limit`) is a second fence: every read claims its size
//!   first and the decode stops when the claims pass the budget ([`WireError::Limit`]). The
//!   budget is a compile-time constant in bincode, so it is picked from [`CLAIM_TIERS`]: the
//!   smallest tier that holds [`CLAIM_FACTOR`] times the input plus [`CLAIM_FLOOR`]. Every
//!   value bincode reads claims at most 16 times the bytes it takes (a one-byte varint `u128`
//!   claims 16), so a legitimate message always fits its budget.

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::marker::PhantomData;

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// The largest message [`decode`] reads, in bytes: the largest RPC frame a peer accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The claim budget is at least this many times the input length (see the module docs).
pub const CLAIM_FACTOR: usize = 16;

/// The claim budget is at least this many bytes above [`CLAIM_FACTOR`] times the input.
pub const CLAIM_FLOOR: usize = 4 << 10;

/// The claim budgets bincode may be given, smallest first; the last one stands for "no
/// budget beyond the input" and is used only for inputs over [`MAX_MESSAGE_BYTES`], which only
/// callers of [`decode_with_limit`] with a larger limit can pass.
pub const CLAIM_TIERS: [usize; 7] = [
    4 << 10,
    64 << 10,
    1 << 20,
    16 << 20,
    256 << 20,
    2 << 30,
    usize::MAX,
];

/// Why bytes from the wire could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The message was empty.
    #[error("empty message: expected a version byte and a body")]
    Empty,
    /// The version byte is not one this build reads.
    #[error("message has wire version {got}: this build reads version {WIRE_VERSION}")]
    Version {
        /// The version found.
        got: u8,
    },
    /// The message is longer than the reader accepts.
    #[error("message of {len} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The most the reader accepts.
        limit: usize,
    },
    /// The body's length prefixes claim more than its size allows.
    #[error(
        "message of {len} bytes claims more than its decode budget of {budget} bytes \
         (a length prefix larger than the bytes that follow it)"
    )]
    Limit {
        /// The message's length.
        len: usize,
        /// The claim budget it was decoded with.
        budget: usize,
    },
    /// The body did not decode.
    #[error("message body does not decode: {0}")]
    Decode(bincode::error::DecodeError),
    /// The value did not encode.
    #[error("message does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The body decoded but bytes were left over.
    #[error("message has {0} trailing bytes after its body")]
    Trailing(usize),
}

/// Encodes `value` with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    out.extend(bincode::serde::encode_to_vec(
        value,
        bincode::config::standard(),
    )?);
    Ok(out)
}

/// Decodes bytes written by [`encode`], checking the version and that nothing is left over.
/// Refuses messages over [`MAX_MESSAGE_BYTES`] and never allocates what a length prefix
/// claims beyond the bytes present.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    decode_with_limit(bytes, MAX_MESSAGE_BYTES)
}

/// [`decode`] with the caller's own limit on the message's length, in bytes: lower for
/// small records from strangers, higher for the node's own files (snapshots).
pub fn decode_with_limit<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version { got: version });
    }
    let budget = claim_budget(bytes.len());
    let (value, used) = decode_body::<T>(body, budget).map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => WireError::Limit {
            len: bytes.len(),
            budget,
        },
        e => WireError::Decode(e),
    })?;
    if used != body.len() {
        return Err(WireError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// The claim budget a message of `len` bytes is decoded with: the smallest of
/// [`CLAIM_TIERS`] that holds `CLAIM_FACTOR * len + CLAIM_FLOOR`.
pub fn claim_budget(len: usize) -> usize {
    let need = len.saturating_mul(CLAIM_FACTOR).saturating_add(CLAIM_FLOOR);
    CLAIM_TIERS
        .iter()
        .copied()
        .find(|t| *t >= need)
        .unwrap_or(usize::MAX)
}

fn decode_body<T: DeserializeOwned>(
    body: &[u8],
    budget: usize,
) -> Result<(T, usize), bincode::error::DecodeError> {
    // bincode takes its limit as a const generic, hence one arm per tier.
    const T0: usize = CLAIM_TIERS[0];
    const T1: usize = CLAIM_TIERS[1];
    const T2: usize = CLAIM_TIERS[2];
    const T3: usize = CLAIM_TIERS[3];
    const T4: usize = CLAIM_TIERS[4];
    const T5: usize = CLAIM_TIERS[5];
    const T6: usize = CLAIM_TIERS[6];
    let std = bincode::config::standard();
    let seed = Bounded::<T>(PhantomData);
    match budget {
        T0 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T0>()),
        T1 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T1>()),
        T2 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T2>()),
        T3 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T3>()),
        T4 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T4>()),
        T5 => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T5>()),
        _ => bincode::serde::seed_decode_from_slice(seed, body, std.with_limit::<T6>()),
    }
}

// ---------------------------------------------------------------------------------------
// The bounding adaptor: a serde Deserializer that wraps bincode's, so that
// - owned strings and byte buffers are read as borrowed ones (bincode checks a borrowed
//   length against the bytes left before taking them, while its owned path allocates the
//   claimed length first), and
// - sequences and maps report a size hint of at most SEQ_HINT_CAP (serde preallocates up to
//   1 MiB from a hint).
// Everything else is passed through unchanged; every nested value is wrapped again.
// ---------------------------------------------------------------------------------------

/// The most elements a sequence preallocates for, whatever its length prefix claims.
const SEQ_HINT_CAP: usize = 16;

/// The seed that decodes a `T` through [`Guard`].
struct Bounded<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Bounded<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        T::deserialize(Guard(d))
    }
}

/// Wraps a deserializer (see above).
struct Guard<D>(D);
/// Wraps a visitor, so what it is handed is wrapped too.
struct GuardVisitor<V>(V);
/// Wraps a seed, so it deserializes through [`Guard`].
struct GuardSeed<S>(S);
/// Wraps sequence, map and enum access.
struct GuardAccess<A>(A);

macro_rules! forward_deserialize {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.0.$method(GuardVisitor(visitor))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Guard<D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_bytes,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(GuardVisitor(visitor))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_bytes(GuardVisitor(visitor))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, GuardVisitor(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_newtype_struct(name, GuardVisitor(visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, GuardVisitor(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_tuple_struct(name, len, GuardVisitor(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_struct(name, fields, GuardVisitor(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_enum(name, variants, GuardVisitor(visitor))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for GuardVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit!(
        visit_bool: bool,
        visit_i8: i8,
        visit_i16: i16,
        visit_i32: i32,
        visit_i64: i64,
        visit_i128: i128,
        visit_u8: u8,
        visit_u16: u16,
        visit_u32: u32,
        visit_u64: u64,
        visit_u128: u128,
        visit_f32: f32,
        visit_f64: f64,
        visit_char: char,
        visit_str: &str,
        visit_borrowed_str: &'de str,
        visit_string: String,
        visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>,
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Guard(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(Guard(d))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(GuardAccess(seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(GuardAccess(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(GuardAccess(data))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for GuardSeed<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Guard(d))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for GuardAccess<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(GuardSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        // The claimed length is not evidence of anything: grow with what decodes, from a small
        // start.
        self.0.size_hint().map(|n| n.min(SEQ_HINT_CAP))
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for GuardAccess<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(GuardSeed(seed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(GuardSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        None
    }
}

impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for GuardAccess<A> {
    type Error = A::Error;
    type Variant = GuardAccess<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        self.0
            .variant_seed(GuardSeed(seed))
            .map(|(v, access)| (v, GuardAccess(access)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for GuardAccess<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(GuardSeed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, GuardVisitor(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, GuardVisitor(visitor))
    }
}

/// `#[serde(with = "canal_proto::wire::bytes")]` for a `Vec<u8>` field: the same bytes on the
/// wire as a plain `Vec<u8>` (a length, then the bytes), but read and written as one slice
/// instead of one serde call per byte, which matters for payloads.
pub mod bytes {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    /// Writes the bytes as one slice.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Reads bytes written by [`serialize`] (or as a sequence of `u8`, from formats that
    /// write them so).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{Capabilities, Load};

    fn caps() -> Capabilities {
        Capabilities {
            peer_id: "12D3KooW".into(),
            version: "0.1.0".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/7000".into()],
            api_addr: Some("127.0.0.1:7070".into()),
            mqtt_addr: None,
            tier: "edge".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            cpu_cores: 2,
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 29,
            gpus_detected: vec![],
            gpus_declared: vec![],
            load: Load::default(),
            raft_member: false,
            forms_cluster: false,
            interest: Vec::new(),
            seq: 7,
            measured_at_ms: 1,
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&caps()).ok();
        let back: Option<Capabilities> = bytes.and_then(|b| decode(&b).ok());
        assert_eq!(back, Some(caps()));
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut bytes = encode(&caps()).unwrap_or_default();
        bytes[0] = 9;
        assert!(matches!(
            decode::<Capabilities>(&bytes),
            Err(WireError::Version { got: 9 })
        ));
        assert!(matches!(decode::<Capabilities>(&[]), Err(WireError::Empty)));
        assert!(decode::<Capabilities>(&[1, 255, 255, 255]).is_err());
        let mut long = encode(&caps()).unwrap_or_default();
        long.push(0);
        assert!(matches!(
            decode::<Capabilities>(&long),
            Err(WireError::Trailing(1))
        ));
    }

    #[test]
    fn refuses_messages_over_the_limit_naming_it() {
        let bytes = encode(&caps()).unwrap_or_default();
        let err = decode_with_limit::<Capabilities>(&bytes, 10);
        assert!(matches!(err, Err(WireError::TooLarge { limit: 10, .. })));
        let text = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("limit of 10 bytes"), "{text}");
        assert!(decode_with_limit::<Capabilities>(&bytes, bytes.len()).is_ok());
    }

    #[test]
    fn the_budget_grows_with_the_input_in_tiers() {
        assert_eq!(claim_budget(0), 4 << 10);
        assert_eq!(claim_budget(13), 64 << 10);
        assert_eq!(claim_budget(4 << 10), 1 << 20);
        assert_eq!(claim_budget(MAX_MESSAGE_BYTES), 2 << 30);
        assert_eq!(claim_budget(MAX_MESSAGE_BYTES * 4), usize::MAX);
        for len in [1usize, 100, 10_000, 1 << 20, 16 << 20] {
            assert!(claim_budget(len) >= len * CLAIM_FACTOR + CLAIM_FLOOR);
        }
    }

    #[test]
    fn a_string_claiming_a_tebibyte_is_refused() {
        // Version byte, then a varint u64 (0xFD + 8 bytes little-endian) claiming 1 TiB for
        // the first string of a capability record, then nothing: 13 bytes in all.
        let mut attack = vec![WIRE_VERSION, 0xFD];
        attack.extend((1u64 << 40).to_le_bytes());
        attack.extend([b'x', b'y', b'z']);
        assert_eq!(attack.len(), 13);
        assert!(decode::<Capabilities>(&attack).is_err());
        assert!(decode::<String>(&attack).is_err());
        assert!(decode::<Vec<u8>>(&attack).is_err());
        assert!(decode::<Vec<String>>(&attack).is_err());
    }

    #[test]
    fn bytes_fields_have_the_plain_encoding() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast {
            #[serde(with = "super::bytes")]
            payload: Vec<u8>,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain {
            payload: Vec<u8>,
        }
        let payload: Vec<u8> = (0..=255).collect();
        let fast = encode(&Fast {
            payload: payload.clone(),
        })
        .unwrap_or_default();
        let plain = encode(&Plain {
            payload: payload.clone(),
        })
        .unwrap_or_default();
        assert_eq!(fast, plain);
        assert_eq!(
            decode::<Fast>(&plain).ok(),
            Some(Fast {
                payload: payload.clone()
            })
        );
        // A claimed length beyond the bytes present is refused, not allocated.
        let mut attack = vec![WIRE_VERSION, 0xFD];
        attack.extend((1u64 << 40).to_le_bytes());
        assert!(decode::<Fast>(&attack).is_err());
    }

    #[test]
    fn large_legitimate_messages_decode() {
        // A payload near the largest RPC frame, and many small varints (the worst ratio of
        // claimed to present bytes).
        let big = vec![7u8; 8 << 20];
        let bytes = encode(&big).unwrap_or_default();
        assert_eq!(decode::<Vec<u8>>(&bytes).ok(), Some(big));
        let many: Vec<u128> = (0..100_000).map(|i| (i % 100) as u128).collect();
        let bytes = encode(&many).unwrap_or_default();
        assert_eq!(decode::<Vec<u128>>(&bytes).ok(), Some(many));
        let strings: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
        let bytes = encode(&strings).unwrap_or_default();
        assert_eq!(decode::<Vec<String>>(&bytes).ok(), Some(strings));
    }
}

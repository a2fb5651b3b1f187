//! Byte payloads (event payloads, KV values) encoded as one run of bytes instead of a
//! sequence of numbers, for `#[serde(with = "crate::bytes")]`.
//!
//! The encoding is the same (bincode writes a `u8` sequence as its length and the raw
//! bytes either way; JSON as an array of numbers), so wire and disk formats do not change;
//! only the cost does: serde hands bincode the whole slice at once instead of one call per
//! byte, which in a debug build is ~240 ms for 1 MiB, longer than a Raft RPC timeout.

use serde::de::{SeqAccess, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;

/// Serializes `v` as bytes.
pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

/// Deserializes bytes written by [`serialize`] (or a sequence of numbers, as JSON has).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // The hint comes from the sender: never reserve more than a little on its word.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 << 10));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        a: String,
        v: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fast {
        a: String,
        #[serde(with = "super")]
        v: Vec<u8>,
    }

    #[test]
    fn the_encoding_is_unchanged_in_bincode_and_json() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let v: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
            let plain = Plain {
                a: "x".into(),
                v: v.clone(),
            };
            let fast = Fast { a: "x".into(), v };
            let pb = canal_proto::wire::encode(&plain).unwrap();
            let fb = canal_proto::wire::encode(&fast).unwrap();
            assert_eq!(pb, fb, "len {len}");
            assert_eq!(canal_proto::wire::decode::<Fast>(&pb).unwrap(), fast);
            let pj = serde_json::to_string(&plain).unwrap();
            assert_eq!(pj, serde_json::to_string(&fast).unwrap());
            assert_eq!(serde_json::from_str::<Fast>(&pj).unwrap(), fast);
        }
    }
}

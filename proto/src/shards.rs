//! The shard map: for every shard of the topic space, the peers that hold its replicas, the
//! first of them the preferred leader. The placement crate computes it
//! (`canal_placement::shards`); the metadata group will store it, so it has a bounded
//! decoder ([`ShardMap::decode`]) that refuses bytes that are too many, of another format
//! version, or that decode to a map breaking its own invariants (see [`ShardMap::validate`]).

use crate::caps::MAX_ID_BYTES;
use crate::wire::{self, WireError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The most shards a topic space may have.
pub const MAX_SHARDS: u32 = 65_536;
/// The largest replication factor K a shard map may ask for.
pub const MAX_REPLICATION: usize = 16;
/// The most notes (explanations) a map carries.
pub const MAX_NOTES: usize = 64;
/// The most bytes of one note or one shortfall.
pub const MAX_NOTE_BYTES: usize = 1024;
/// The most bytes of an encoded shard map: 65,536 shards of 16 replicas of full-length ids
/// would not fit, but 4,096 shards of K=3 with libp2p ids (52 bytes) take about 700 KiB.
pub const MAX_SHARD_MAP_BYTES: usize = 16 << 20;
/// The format of [`ShardMap`] as encoded: a map of another format is refused, not misread.
/// (The [`crate::wire`] envelope has its own version byte in front.)
pub const SHARD_MAP_FORMAT: u8 = 1;

/// One shard's replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReplicas {
    /// The shard number, equal to the entry's index in [`ShardMap::assignments`].
    pub shard: u32,
    /// Peer ids, distinct, at most [`ShardMap::replication`]; the first is the preferred
    /// leader. Empty when no peer could be chosen.
    pub replicas: Vec<String>,
    /// Why fewer than K replicas were chosen, naming the constraint; `None` when K were.
    pub shortfall: Option<String>,
}

/// Every shard's replicas, as one versioned value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// [`SHARD_MAP_FORMAT`] when written by this version.
    pub format: u8,
    /// Increases by one with every change of the assignments, so a stale map never replaces
    /// a newer one; 1 for the first map.
    pub epoch: u64,
    /// How many shards the topic space has (1 to [`MAX_SHARDS`]).
    pub shards: u32,
    /// K, the replicas wanted per shard (1 to [`MAX_REPLICATION`]).
    pub replication: usize,
    /// The label key replicas are spread over (`zone`), if any.
    pub spread: Option<String>,
    /// One entry per shard, in shard order.
    pub assignments: Vec<ShardReplicas>,
    /// What the map could not do as asked, for people: balance relaxed by a constraint,
    /// peers left out. At most [`MAX_NOTES`].
    pub notes: Vec<String>,
}

/// Why bytes are not a shard map, or a map breaks its invariants.
#[derive(Debug, thiserror::Error)]
pub enum ShardMapError {
    /// The envelope did not decode (too long, another wire version, malformed).
    #[error("shard map does not decode: {0}")]
    Wire(#[from] WireError),
    /// The map decoded but is of a format this version does not read.
    #[error(
        "shard map format {got} is not supported: this version reads format {SHARD_MAP_FORMAT}"
    )]
    Format {
        /// The format found.
        got: u8,
    },
    /// A field is outside what is allowed.
    #[error("shard map {field} is {value}: {allowed}")]
    Invalid {
        /// The field, such as `assignments[3].replicas`.
        field: String,
        /// The value found, cut short.
        value: String,
        /// What is allowed.
        allowed: String,
    },
}

fn invalid(
    field: impl Into<String>,
    value: impl ToString,
    allowed: impl Into<String>,
) -> ShardMapError {
    let mut value = value.to_string();
    if value.len() > 80 {
        let mut cut = 80;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
        value.push('…');
    }
    ShardMapError::Invalid {
        field: field.into(),
        value,
        allowed: allowed.into(),
    }
}

impl ShardMap {
    /// The replicas of `shard`, leader first; empty if the shard is out of range.
    pub fn replicas(&self, shard: u32) -> &[String] {
        self.assignments
            .get(shard as usize)
            .map(|a| a.replicas.as_slice())
            .unwrap_or(&[])
    }

    /// The preferred leader of `shard`, if it has a replica.
    pub fn leader(&self, shard: u32) -> Option<&str> {
        self.replicas(shard).first().map(String::as_str)
    }

    /// Encodes the map in the [`crate::wire`] envelope.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        wire::encode(self)
    }

    /// Decodes bytes written by [`ShardMap::encode`]: at most [`MAX_SHARD_MAP_BYTES`], then
    /// [`ShardMap::validate`].
    pub fn decode(bytes: &[u8]) -> Result<ShardMap, ShardMapError> {
        let map: ShardMap = wire::decode_with_limit(bytes, MAX_SHARD_MAP_BYTES)?;
        map.validate()?;
        Ok(map)
    }

    /// Checks the invariants every map keeps: the format, the shard count and K in range,
    /// one entry per shard in order, at most K distinct non-empty peer ids of at most
    /// [`MAX_ID_BYTES`] per shard, notes and shortfalls within [`MAX_NOTES`] and
    /// [`MAX_NOTE_BYTES`]. The error names the field, its value and what is allowed.
    pub fn validate(&self) -> Result<(), ShardMapError> {
        if self.format != SHARD_MAP_FORMAT {
            return Err(ShardMapError::Format { got: self.format });
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(invalid("shards", self.shards, format!("1 to {MAX_SHARDS}")));
        }
        if !(1..=MAX_REPLICATION).contains(&self.replication) {
            return Err(invalid(
                "replication",
                self.replication,
                format!("1 to {MAX_REPLICATION}"),
            ));
        }
        if let Some(s) = &self.spread
            && (s.is_empty() || s.len() > crate::caps::MAX_NAME_BYTES)
        {
            return Err(invalid(
                "spread",
                format!("{s:?}"),
                format!("a label name of 1 to {} bytes", crate::caps::MAX_NAME_BYTES),
            ));
        }
        if self.assignments.len() != self.shards as usize {
            return Err(invalid(
                "assignments",
                format!("{} entries", self.assignments.len()),
                format!("one per shard ({})", self.shards),
            ));
        }
        for (i, a) in self.assignments.iter().enumerate() {
            if a.shard as usize != i {
                return Err(invalid(
                    format!("assignments[{i}].shard"),
                    a.shard,
                    format!("{i}, the entry's index"),
                ));
            }
            if a.replicas.len() > self.replication {
                return Err(invalid(
                    format!("assignments[{i}].replicas"),
                    format!("{} peers", a.replicas.len()),
                    format!("at most K = {}", self.replication),
                ));
            }
            let mut seen = BTreeSet::new();
            for p in &a.replicas {
                if p.is_empty() || p.len() > MAX_ID_BYTES {
                    return Err(invalid(
                        format!("assignments[{i}].replicas"),
                        format!("{p:?}"),
                        format!("peer ids of 1 to {MAX_ID_BYTES} bytes"),
                    ));
                }
                if !seen.insert(p.as_str()) {
                    return Err(invalid(
                        format!("assignments[{i}].replicas"),
                        format!("{p} twice"),
                        "distinct peers",
                    ));
                }
            }
            if let Some(s) = &a.shortfall
                && s.len() > MAX_NOTE_BYTES
            {
                return Err(invalid(
                    format!("assignments[{i}].shortfall"),
                    format!("{} bytes", s.len()),
                    format!("at most {MAX_NOTE_BYTES} bytes"),
                ));
            }
        }
        if self.notes.len() > MAX_NOTES {
            return Err(invalid(
                "notes",
                format!("{} notes", self.notes.len()),
                format!("at most {MAX_NOTES}"),
            ));
        }
        if let Some((i, n)) = self
            .notes
            .iter()
            .enumerate()
            .find(|(_, n)| n.len() > MAX_NOTE_BYTES)
        {
            return Err(invalid(
                format!("notes[{i}]"),
                format!("{} bytes", n.len()),
                format!("at most {MAX_NOTE_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

/// One peer's part in a shard map, for people (`canal cluster shards`, the bench).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerShare {
    /// The peer id.
    pub peer_id: String,
    /// The value of the spread label (`zone`), empty when there is none.
    pub zone: String,
    /// The host the peer runs on (no two replicas of a shard share one).
    pub host: String,
    /// Replicas it holds.
    pub replicas: usize,
    /// Shards it is the preferred leader of.
    pub leaders: usize,
    /// Replicas its weight and the constraints give it; `replicas` differs only where a
    /// note says why.
    pub target: usize,
    /// Why it holds no replica at all, when it may not (not alive, a requirement unmet, a
    /// duplicate record).
    pub excluded: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(shards: u32) -> ShardMap {
        ShardMap {
            format: SHARD_MAP_FORMAT,
            epoch: 1,
            shards,
            replication: 3,
            spread: Some("zone".into()),
            assignments: (0..shards)
                .map(|s| ShardReplicas {
                    shard: s,
                    replicas: vec![format!("p{s}"), format!("q{s}")],
                    shortfall: Some("2 of 3 replicas placed".into()),
                })
                .collect(),
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn a_map_round_trips_and_answers_for_its_shards() {
        let m = map(4);
        let bytes = m.encode().expect("encodes");
        assert_eq!(ShardMap::decode(&bytes).ok(), Some(m.clone()));
        assert_eq!(m.leader(2), Some("p2"));
        assert_eq!(m.replicas(9), &[] as &[String]);
    }

    #[test]
    fn broken_invariants_are_refused_naming_the_field() {
        type Breaker = Box<dyn Fn(&mut ShardMap)>;
        let cases: Vec<(Breaker, &str)> = vec![
            (Box::new(|m| m.format = 2), "format 2"),
            (Box::new(|m| m.shards = 0), "shards is 0"),
            (Box::new(|m| m.replication = 17), "replication is 17"),
            (Box::new(|m| m.spread = Some(String::new())), "spread"),
            (
                Box::new(|m| m.assignments.pop().map(drop).unwrap_or(())),
                "assignments is 3 entries",
            ),
            (
                Box::new(|m| m.assignments[1].shard = 5),
                "assignments[1].shard is 5",
            ),
            (
                Box::new(|m| m.assignments[0].replicas = vec!["a".into(), "a".into()]),
                "a twice",
            ),
            (
                Box::new(|m| m.assignments[0].replicas = vec!["x".into(); 4]),
                "4 peers: at most K = 3",
            ),
            (
                Box::new(|m| m.assignments[0].replicas = vec![String::new()]),
                "peer ids of 1 to",
            ),
            (Box::new(|m| m.notes = vec!["n".into(); 65]), "65 notes"),
            (
                Box::new(|m| m.notes = vec!["n".repeat(2000)]),
                "notes[0] is 2000 bytes",
            ),
        ];
        for (break_it, text) in cases {
            let mut m = map(4);
            break_it(&mut m);
            let err = m.validate().expect_err(text);
            assert!(err.to_string().contains(text), "{err} lacks {text:?}");
            let bytes = m.encode().expect("encodes");
            assert!(ShardMap::decode(&bytes).is_err());
        }
    }

    #[test]
    fn too_many_bytes_are_refused_before_decoding() {
        let bytes = vec![crate::wire::WIRE_VERSION; MAX_SHARD_MAP_BYTES + 1];
        assert!(matches!(
            ShardMap::decode(&bytes),
            Err(ShardMapError::Wire(WireError::TooLarge { .. }))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 4000,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5a4d),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ShardMap::decode(&bytes);
        }

        #[test]
        fn a_flipped_byte_never_panics(
            shards in 1u32..8, at in any::<prop::sample::Index>(), byte in any::<u8>()
        ) {
            let mut bytes = map(shards).encode().expect("encodes");
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = ShardMap::decode(&bytes);
        }

        #[test]
        fn valid_maps_round_trip(
            epoch in any::<u64>(),
            k in 1usize..=MAX_REPLICATION,
            shards in prop::collection::vec(prop::collection::btree_set("[a-z0-9]{1,60}", 0..5), 1..40),
        ) {
            let m = ShardMap {
                format: SHARD_MAP_FORMAT,
                epoch,
                shards: shards.len() as u32,
                replication: k.max(4),
                spread: None,
                assignments: shards
                    .into_iter()
                    .enumerate()
                    .map(|(i, set)| ShardReplicas {
                        shard: i as u32,
                        replicas: set.into_iter().collect(),
                        shortfall: None,
                    })
                    .collect(),
                notes: Vec::new(),
            };
            prop_assert!(m.validate().is_ok());
            let bytes = m.encode().expect("encodes");
            prop_assert_eq!(ShardMap::decode(&bytes).ok(), Some(m));
        }
    }
}

//! Shared subscriptions (`$share/GROUP/FILTER`): each message to one member of the group,
//! whichever nodes the members are connected to.
//!
//! Every member reads the whole stream of `FILTER` on its own node and keeps only its part:
//! the group's members are replicated records (one per member, in
//! [`canal_consensus::keys::MQTT_SESSIONS`] under a `$share:` name no client id can take,
//! each with a lease its connection renews), and a message belongs to the member whose rank
//! in the sorted list of live members is the message's hash modulo their number. Every node
//! sees the same members and hashes alike, so each message goes to one member; while the
//! membership changes (a member joins, leaves, or its lease runs out after its node died)
//! a message may reach two members or none for up to a lease.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a member's record counts without being renewed.
pub const LEASE_MS: u64 = 15_000;
/// How often a member renews its lease.
pub const RENEW_MS: u64 = 5_000;

/// A member's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Until when the member counts, ms since the epoch.
    pub lease_until_ms: u64,
}

/// The record-name prefix of the members of `group` on `filter`.
pub fn prefix(group: &str, filter: &str) -> String {
    let mut h = Sha256::new();
    for part in [group, filter] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    format!("$share:{}:", &hex::encode(h.finalize())[..24])
}

/// FNV-1a: a hash every node computes alike, whatever its build.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Whether `me` takes the message keyed `key` (a QoS 1 event's topic and offset, or a QoS 0
/// event's id) among `members` (client ids; `me` counts even if its record has not reached
/// this replica yet).
pub fn mine(members: &[String], me: &str, key: &[&[u8]]) -> bool {
    let mut all: Vec<&str> = members.iter().map(String::as_str).collect();
    if !all.contains(&me) {
        all.push(me);
    }
    all.sort_unstable();
    all.dedup();
    let rank = fnv(key) % all.len() as u64;
    all.get(rank as usize) == Some(&me)
}

/// The live members among `records` (name, value) of the members' table whose names start
/// with `prefix`.
pub fn live(records: &[(String, Vec<u8>)], prefix: &str, now_ms: u64) -> Vec<String> {
    records
        .iter()
        .filter_map(|(name, v)| {
            let client = name.strip_prefix(prefix)?;
            let m: Member = crate::records::decode(v).ok()?;
            (m.lease_until_ms > now_ms).then(|| client.to_string())
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_message_goes_to_exactly_one_member() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut counts = [0usize; 3];
        for offset in 0..3000u64 {
            let key: [&[u8]; 2] = [b"t/1", &offset.to_be_bytes()];
            let takers: Vec<usize> = (0..3)
                .filter(|i| mine(&members, &members[*i], &key))
                .collect();
            assert_eq!(takers.len(), 1, "offset {offset}: {takers:?}");
            counts[takers[0]] += 1;
        }
        // Spread over all, roughly evenly.
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        // A member whose record has not arrived yet still counts itself.
        assert!((0..100u64).any(|o| mine(&[], "x", &[&o.to_be_bytes()])));
    }

    #[test]
    fn only_live_members_of_the_group_count() {
        let p = prefix("g", "a/#");
        assert_ne!(p, prefix("g", "a/+"));
        assert_ne!(prefix("ab", "c"), prefix("a", "bc"));
        let rec = |until| {
            crate::records::encode(&Member {
                lease_until_ms: until,
            })
            .unwrap()
        };
        let records = vec![
            (format!("{p}alice"), rec(100)),
            (format!("{p}bob"), rec(10)),
            (format!("{}carol", prefix("h", "a/#")), rec(100)),
            ("dave".to_string(), rec(100)),
        ];
        assert_eq!(live(&records, &p, 50), vec!["alice".to_string()]);
    }
}

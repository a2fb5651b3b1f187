//! Routing: which Raft group holds what. The one place that answers it.
//!
//! Every caller that writes or reads a topic's log, a durable subscription, a publish's
//! dedup id, a function's state or a trigger's cursor asks these functions for the group,
//! instead of naming a group id itself. Today a cluster runs one data group, so every answer
//! is data group 1; issue 14 (a data group per shard) changes only the functions here (and
//! [`DATA_GROUPS`]), not their callers.
//!
//! The metadata group ([`GroupId::METADATA`]) is not routed: membership, functions, triggers,
//! placement and topic settings always live there.

use crate::types::GroupId;

/// The first (today the only) data group.
const FIRST_DATA_GROUP: GroupId = GroupId(1);

/// The data groups a node starts, beside the metadata group, in id order. Code that works
/// over "every topic" or "every trigger cursor" (the trimmer, the executor) loops over these.
pub const DATA_GROUPS: &[GroupId] = &[FIRST_DATA_GROUP];

/// The group an API request means when it names none (`?group=` of `/v1/kv` and
/// `/v1/cluster/digest`): the first data group.
pub const DEFAULT_GROUP: GroupId = FIRST_DATA_GROUP;

/// Every group a node starts: the metadata group, then [`DATA_GROUPS`].
pub fn groups_to_start() -> Vec<GroupId> {
    std::iter::once(GroupId::METADATA)
        .chain(DATA_GROUPS.iter().copied())
        .collect()
}

/// The data group holding `topic`'s log, the cursors and starts of the durable subscriptions
/// on it, and the dedup ids of its publishes.
///
/// Today every topic is in data group 1; issue 14 (shard groups) will answer by the topic's
/// shard here, and only here.
pub fn group_of(topic: &str) -> GroupId {
    let _ = topic;
    FIRST_DATA_GROUP
}

/// The data group holding function `name`'s state, its state version and the cursors of its
/// triggers (an execution's effects commit there atomically).
///
/// Today every function is in data group 1; issue 14 (shard groups) will change only this
/// function.
pub fn group_of_function(name: &str) -> GroupId {
    let _ = name;
    FIRST_DATA_GROUP
}

/// The data group holding durable subscription `name`'s start record.
///
/// Today data group 1, like every topic the subscription reads; issue 14 will change only this
/// function.
pub fn group_of_subscription(name: &str) -> GroupId {
    let _ = name;
    FIRST_DATA_GROUP
}

/// The first id of the shard groups: shard `s`'s group is `SHARD_GROUP_BASE + s`. Above every
/// other group id (the metadata group, data group 1 and the test-only extra groups, at most
/// a thousand or so after it), so no shard group shares an id with another group; with at
/// most [`canal_proto::shards::MAX_SHARDS`] shards every id fits a `u32`.
pub const SHARD_GROUP_BASE: u32 = 1 << 20;

/// The Raft group of shard `shard`: the one place that names it. The group is hosted by the
/// shard's replicas in the committed shard map (when shard groups are on); until routing by
/// shard lands, no topic's log lives in it ([`group_of`] still answers data group 1).
pub fn shard_group(shard: u32) -> GroupId {
    GroupId(SHARD_GROUP_BASE.saturating_add(shard))
}

/// The shard whose group `g` is, or `None` when `g` is no shard group (the metadata group,
/// data group 1, an extra group).
pub fn shard_of_group(g: GroupId) -> Option<u32> {
    g.0.checked_sub(SHARD_GROUP_BASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_answers_a_started_data_group() {
        let started = groups_to_start();
        assert_eq!(started[0], GroupId::METADATA);
        assert!(!DATA_GROUPS.contains(&GroupId::METADATA));
        for g in [
            group_of("a/b"),
            group_of(""),
            group_of_function("f"),
            group_of_subscription("s"),
            DEFAULT_GROUP,
        ] {
            assert!(DATA_GROUPS.contains(&g), "{g} is not a data group");
            assert!(started.contains(&g));
        }
    }

    #[test]
    fn shard_groups_are_apart_from_every_started_group_and_map_back_to_their_shard() {
        let started = groups_to_start();
        for shard in [0, 1, 63, 1023, canal_proto::shards::MAX_SHARDS - 1] {
            let g = shard_group(shard);
            assert!(!started.contains(&g), "{g} collides with a started group");
            assert!(
                g.0 > 1 + 1024,
                "{g} could collide with a test-only extra group"
            );
            assert_eq!(shard_of_group(g), Some(shard));
        }
        assert_eq!(shard_of_group(GroupId::METADATA), None);
        assert_eq!(shard_of_group(DEFAULT_GROUP), None);
        assert_ne!(shard_group(0), shard_group(1));
    }
}

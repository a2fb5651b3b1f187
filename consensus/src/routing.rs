//! Routing: which Raft group holds what. The one place that answers it.
//!
//! Every caller that writes or reads a topic's log, a durable subscription, a publish's
//! dedup id, a function's state or a trigger's cursor asks a [`Route`] (the cluster's,
//! from [`crate::Consensus::route`]) for the group, instead of naming a group id itself.
//!
//! - [`Route::Sharded`]: a cluster's topic space of `shards` shards (its committed shard
//!   map's count, fixed when the cluster formed). A topic lives in the group of its shard
//!   ([`shard_group`] of [`canal_proto::keyspace::shard_of`] its key), hosted by the shard's
//!   replicas; a durable subscription's start in the shard group of its name's key. A
//!   function's state, cursors and outbox stay in data group 1 ([`Route::function`]).
//!   Every canal node routes so.
//! - [`Route::Single`]: one data group (group 1) holds everything: the in-process tests of
//!   the crates below the node, which start groups by hand.
//!
//! The metadata group ([`GroupId::METADATA`]) is not routed: membership, functions, triggers,
//! placement, tokens, the shard map and topic settings always live there. Data group 1 is
//! still started by every node: it holds the client keys of `/v1/kv`.

use crate::types::GroupId;
use canal_proto::TopicFilter;
use canal_proto::keyspace::{name_key, shard_of, topic_name_key};

/// Data group 1: every topic's group under [`Route::Single`], and the client keys' group.
const FIRST_DATA_GROUP: GroupId = GroupId(1);

/// The data groups a node starts beside the metadata group, in id order (shard groups are
/// opened as the shard map says, not started).
pub const DATA_GROUPS: &[GroupId] = &[FIRST_DATA_GROUP];

/// The group an API request means when it names none (`?group=` of `/v1/kv` and
/// `/v1/cluster/digest`): data group 1.
pub const DEFAULT_GROUP: GroupId = FIRST_DATA_GROUP;

/// Every group a node starts: the metadata group, then [`DATA_GROUPS`].
pub fn groups_to_start() -> Vec<GroupId> {
    std::iter::once(GroupId::METADATA)
        .chain(DATA_GROUPS.iter().copied())
        .collect()
}

/// The group of the small records every node reads from its own replica: MQTT sessions,
/// session owners, wills, shared-subscription members and retained messages. Data group 1,
/// which every node hosts (as a voter or a learner), whatever the routing.
pub fn mqtt_records() -> GroupId {
    FIRST_DATA_GROUP
}

/// How a cluster maps topics, functions and subscriptions to groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Everything in data group 1 (the in-process tests of the crates below the node).
    Single,
    /// A topic space of `shards` shards, each its own group.
    Sharded {
        /// The number of shards (1 to [`canal_proto::shards::MAX_SHARDS`]).
        shards: u32,
    },
}

impl Route {
    /// The group holding `topic`'s log, the cursors of the durable subscriptions on it,
    /// and the dedup ids of its publishes.
    pub fn topic(self, topic: &str) -> GroupId {
        match self {
            Route::Single => FIRST_DATA_GROUP,
            Route::Sharded { shards } => shard_group(shard_of(&topic_name_key(topic), shards)),
        }
    }

    /// The shard of `topic`, or `None` under [`Route::Single`].
    pub fn shard_of_topic(self, topic: &str) -> Option<u32> {
        match self {
            Route::Single => None,
            Route::Sharded { shards } => Some(shard_of(&topic_name_key(topic), shards)),
        }
    }

    /// The group holding function `name`'s state, its state version, the cursors of its
    /// triggers and its outbox (an execution's effects commit there atomically): data group
    /// 1 under either routing. Every node hosts it (as a voter or a learner), so a function
    /// runs wherever placement puts it (a GPU peer, the peer nearest its events) and reads
    /// its state from the replica at hand, while its inputs are read from their shards'
    /// groups and its outputs reach theirs through the outbox.
    pub fn function(self, name: &str) -> GroupId {
        let _ = name;
        FIRST_DATA_GROUP
    }

    /// The group holding durable subscription `name`'s start record.
    pub fn subscription(self, name: &str) -> GroupId {
        self.named("subscription", name)
    }

    fn named(self, kind: &str, name: &str) -> GroupId {
        match self {
            Route::Single => FIRST_DATA_GROUP,
            Route::Sharded { shards } => shard_group(shard_of(&name_key(kind, name), shards)),
        }
    }

    /// Every group whose topics `filter` may match, in id order: the one group of an exact
    /// filter, every data group of a wildcard.
    pub fn groups_of_filter(self, filter: &TopicFilter) -> Vec<GroupId> {
        if filter.is_exact() {
            return vec![self.topic(filter.as_str())];
        }
        self.data_groups()
    }

    /// Every group that holds topics, in id order.
    pub fn data_groups(self) -> Vec<GroupId> {
        match self {
            Route::Single => vec![FIRST_DATA_GROUP],
            Route::Sharded { shards } => (0..shards).map(shard_group).collect(),
        }
    }
}

/// The first id of the shard groups: shard `s`'s group is `SHARD_GROUP_BASE + s`. Above every
/// other group id (the metadata group, data group 1 and the test-only extra groups, at most
/// a thousand or so after it), so no shard group shares an id with another group; with at
/// most [`canal_proto::shards::MAX_SHARDS`] shards every id fits a `u32`.
pub const SHARD_GROUP_BASE: u32 = 1 << 20;

/// The Raft group of shard `shard`: the one place that names it. The group is hosted by the
/// shard's replicas in the committed shard map.
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
    fn single_routes_everything_to_a_started_data_group() {
        let started = groups_to_start();
        assert_eq!(started[0], GroupId::METADATA);
        assert!(!DATA_GROUPS.contains(&GroupId::METADATA));
        let r = Route::Single;
        for g in [
            r.topic("a/b"),
            r.topic(""),
            r.function("f"),
            r.subscription("s"),
            DEFAULT_GROUP,
        ] {
            assert!(DATA_GROUPS.contains(&g), "{g} is not a data group");
            assert!(started.contains(&g));
        }
        assert_eq!(r.data_groups(), DATA_GROUPS);
    }

    #[test]
    fn sharded_routes_by_the_key_of_each_name_to_shard_groups() {
        let r = Route::Sharded { shards: 64 };
        let t = canal_proto::Topic::new("sensors/room1/temp").unwrap_or_else(|e| panic!("{e}"));
        let shard = shard_of(&canal_proto::keyspace::topic_key(&t), 64);
        // The group of a topic is the group of the shard the DHT computes for it.
        assert_eq!(r.topic(t.as_str()), shard_group(shard));
        assert_eq!(r.shard_of_topic(t.as_str()), Some(shard));
        let all = r.data_groups();
        assert_eq!(all.len(), 64);
        let mut spread = std::collections::BTreeSet::new();
        for i in 0..256 {
            let g = r.topic(&format!("t/{i}"));
            assert!(all.contains(&g));
            spread.insert(g);
            assert_eq!(r.function(&format!("f{i}")), FIRST_DATA_GROUP);
            assert!(all.contains(&r.subscription(&format!("s{i}"))));
        }
        assert!(
            spread.len() > 48,
            "256 topics fell in only {} shards",
            spread.len()
        );
        let exact = TopicFilter::new("a/b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.groups_of_filter(&exact), vec![r.topic("a/b")]);
        let wild = TopicFilter::new("a/#").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.groups_of_filter(&wild), all);
        // A subscription and a topic of one name need not share a group: their keys differ.
        assert_ne!(name_key("subscription", "x"), topic_name_key("x"));
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

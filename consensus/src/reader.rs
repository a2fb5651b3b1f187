//! Reading one group's log state, for subscribers, trigger executors and MQTT sessions:
//! this node's replica when it hosts the group.
//!
//! (Stand-in of the integrator's until remote reads land: local replicas only.)

use crate::store::{ChangeWatch, ReadError, StateMachine, Wake};
use crate::topics::{StoredEvent, TopicMeta};
use crate::types::GroupId;

/// Reads one group's log state: this node's replica if it hosts the group.
#[derive(Clone)]
pub struct GroupReader {
    sm: StateMachine,
    group: GroupId,
}

impl GroupReader {
    /// A reader of this node's replica `sm` of group `g`.
    pub fn local(sm: StateMachine, g: GroupId) -> GroupReader {
        GroupReader { sm, group: g }
    }

    /// The group read.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Whether it reads this node's own replica.
    pub fn is_local(&self) -> bool {
        true
    }

    /// Every topic with a log, and where its log starts and ends.
    pub async fn topics(&self) -> Result<Vec<(String, TopicMeta)>, ReadError> {
        self.sm.topics()
    }

    /// Where one topic's log starts and ends, if it has one.
    pub async fn topic_meta(&self, topic: &str) -> Result<Option<TopicMeta>, ReadError> {
        self.sm.topic_meta(topic)
    }

    /// Up to `limit` events of `topic` from offset `from` on, in offset order.
    pub async fn events(
        &self,
        topic: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        self.sm.events(topic, from, limit)
    }

    /// The offset of the first event of `topic` accepted at or after `time_ms`.
    pub async fn offset_at(&self, topic: &str, time_ms: u64) -> Result<u64, ReadError> {
        self.sm.offset_at(topic, time_ms)
    }

    /// Where durable subscription `name` continues on `topic`, if it acknowledged any.
    pub async fn subscription_cursor(
        &self,
        name: &str,
        topic: &str,
    ) -> Result<Option<u64>, ReadError> {
        self.sm.subscription_cursor(name, topic)
    }

    /// Change notices of the group; create it before the first read.
    pub fn watch_changes(&self) -> GroupWatch {
        GroupWatch {
            w: self.sm.watch_changes(),
        }
    }
}

/// Change notices of a [`GroupReader`]'s group.
pub struct GroupWatch {
    w: ChangeWatch,
}

impl GroupWatch {
    /// Like [`ChangeWatch::next`]: `None` when the group is gone for good.
    pub async fn next(&mut self) -> Option<Wake> {
        self.w.next().await
    }
}

impl<T: crate::Transport> crate::Consensus<T> {
    /// A reader of group `g`: this node's replica.
    pub fn reader(&self, g: GroupId) -> Result<GroupReader, crate::ClientError> {
        Ok(GroupReader::local(self.state_machine(g)?, g))
    }
}

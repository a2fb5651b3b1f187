//! Notices of what an apply changed, for the readers that wait on the log (subscribers,
//! trigger executors): beside the state, never in it, so replicas stay identical however
//! their waiters keep up.
//!
//! Each apply call that appended to, trimmed or moved a cursor on some topics sends one
//! [`Changed`] on a bounded broadcast; sending never waits. A waiter that falls more than
//! [`CHANGE_NOTICES`] notices behind is told to rescan everything
//! ([`ChangeWatch::next`] answers [`Wake::Everything`]), so it can miss no change, only
//! coalesce many into one full pass.

use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::broadcast;

/// How many notices a waiter may fall behind before it is told to rescan everything.
pub const CHANGE_NOTICES: usize = 1024;

/// What one apply call changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The last index the call applied.
    pub index: u64,
    /// The topics whose log (meta, events) or whose subscription or trigger cursors the call
    /// changed, sorted; `None` when anything may have changed (a snapshot was installed).
    pub topics: Option<Arc<[String]>>,
}

/// What a waiter should look at again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// These topics changed (sorted, at least one).
    Topics(BTreeSet<String>),
    /// Anything may have changed: a snapshot was installed, or the waiter fell behind the
    /// notices.
    Everything,
}

/// A waiter's receiver of [`Changed`] notices, from [`crate::StateMachine::watch_changes`].
pub struct ChangeWatch {
    rx: broadcast::Receiver<Changed>,
}

impl ChangeWatch {
    pub(super) fn new(rx: broadcast::Receiver<Changed>) -> ChangeWatch {
        ChangeWatch { rx }
    }

    /// Waits for the next change, and takes every notice already queued with it, so a
    /// waiter that was busy does one pass for all of them. `None` when the state machine is
    /// gone. Cancel-safe: a notice not taken stays queued.
    pub async fn next(&mut self) -> Option<Wake> {
        let first = match self.rx.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(_)) => return Some(self.drain_all()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        let Some(topics) = first.topics else {
            return Some(self.drain_all());
        };
        let mut set: BTreeSet<String> = topics.iter().cloned().collect();
        loop {
            match self.rx.try_recv() {
                Ok(Changed {
                    topics: Some(t), ..
                }) => set.extend(t.iter().cloned()),
                Ok(Changed { topics: None, .. })
                | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    return Some(self.drain_all());
                }
                Err(_) => return Some(Wake::Topics(set)),
            }
        }
    }

    /// Drops what is queued: the waiter rescans everything anyway.
    fn drain_all(&mut self) -> Wake {
        self.rx = self.rx.resubscribe();
        Wake::Everything
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn notice(index: u64, topics: &[&str]) -> Changed {
        Changed {
            index,
            topics: Some(topics.iter().map(|t| t.to_string()).collect()),
        }
    }

    fn set(topics: &[&str]) -> Wake {
        Wake::Topics(topics.iter().map(|t| t.to_string()).collect())
    }

    #[tokio::test]
    async fn queued_notices_coalesce_and_a_lag_or_snapshot_means_everything() {
        let (tx, rx) = broadcast::channel(4);
        let mut w = ChangeWatch::new(rx);
        tx.send(notice(1, &["a", "b"])).unwrap();
        tx.send(notice(2, &["c", "a"])).unwrap();
        assert_eq!(w.next().await, Some(set(&["a", "b", "c"])));

        tx.send(notice(3, &["a"])).unwrap();
        tx.send(Changed {
            index: 4,
            topics: None,
        })
        .unwrap();
        assert_eq!(w.next().await, Some(Wake::Everything));

        // Five notices into four places: the oldest is lost, so everything is looked at.
        for i in 5..10 {
            tx.send(notice(i, &["x"])).unwrap();
        }
        assert_eq!(w.next().await, Some(Wake::Everything));
        // What was queued went with the rescan; the next notice comes as it is.
        tx.send(notice(10, &["y"])).unwrap();
        assert_eq!(w.next().await, Some(set(&["y"])));
        drop(tx);
        assert_eq!(w.next().await, None);
    }
}

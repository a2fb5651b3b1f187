//! A subscriber's queue between the task that reads events for it and the connection that
//! writes them: bounded in deliveries and in bytes, so a slow or stalled client costs the
//! node at most [`MAX_BUFFERED_BYTES`] of memory, and the reader waits (backpressure)
//! instead of buffering more or dropping. The receiving end holds one of the node's
//! subscriber slots, given back when the subscription ends.
//!
//! ```text
//!   reader task ── send(d): wait for len(d) bytes of budget ──> queue ──> recv() ──> client
//!                                                              budget returned on recv
//! ```

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// The most bytes of events waiting for one subscriber's connection.
pub const MAX_BUFFERED_BYTES: usize = 8 << 20;
/// The most deliveries waiting for one subscriber's connection.
const MAX_BUFFERED: usize = 256;

/// Something that can be queued: how many bytes it holds.
pub trait Weighed {
    /// The bytes it costs while queued.
    fn weight(&self) -> usize;
}

/// The sending end of a subscriber's queue.
pub struct FeedTx<T> {
    tx: mpsc::Sender<(T, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
}

impl<T> Clone for FeedTx<T> {
    fn clone(&self) -> Self {
        FeedTx {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// The receiving end of a subscriber's queue; it holds the subscriber's slot.
pub struct FeedRx<T> {
    rx: mpsc::Receiver<(T, OwnedSemaphorePermit)>,
    _slot: OwnedSemaphorePermit,
}

/// A queue for a subscriber that holds `slot`.
pub fn feed<T: Weighed>(slot: OwnedSemaphorePermit) -> (FeedTx<T>, FeedRx<T>) {
    let (tx, rx) = mpsc::channel(MAX_BUFFERED);
    (
        FeedTx {
            tx,
            budget: Arc::new(Semaphore::new(MAX_BUFFERED_BYTES)),
        },
        FeedRx { rx, _slot: slot },
    )
}

impl<T: Weighed> FeedTx<T> {
    /// Queues `item`, waiting while the queue is full; `Err` if the subscriber is gone.
    /// One item larger than the whole budget takes all of it, so it still goes through.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let cost = item.weight().clamp(1, MAX_BUFFERED_BYTES) as u32;
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(cost) => match p {
                Ok(p) => p,
                Err(_) => return Err(item),
            },
            _ = self.tx.closed() => return Err(item),
        };
        self.tx.send((item, permit)).await.map_err(|e| e.0.0)
    }

    /// Queues `item` if there is room now; `Err` with it if the queue is full or the
    /// subscriber is gone.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        let cost = item.weight().clamp(1, MAX_BUFFERED_BYTES) as u32;
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(cost) else {
            return Err(item);
        };
        self.tx.try_send((item, permit)).map_err(|e| match e {
            mpsc::error::TrySendError::Full((item, _)) => item,
            mpsc::error::TrySendError::Closed((item, _)) => item,
        })
    }

    /// Whether at least half the queue is free, in deliveries and in bytes: a subscriber
    /// that fell behind has caught up this far.
    pub fn half_free(&self) -> bool {
        self.tx.capacity() >= MAX_BUFFERED / 2
            && self.budget.available_permits() >= MAX_BUFFERED_BYTES / 2
    }

    /// Whether the subscriber is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the subscriber is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl<T> FeedRx<T> {
    /// The next item; `None` when the reader has stopped.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await.map(|(item, _budget)| item)
    }

    /// The next item and, with it, those already waiting (at most `max` in all, at least
    /// one), in order: under load a writer sends them as one write instead of one each.
    /// `None` when the reader has stopped.
    pub async fn recv_many(&mut self, max: usize) -> Option<Vec<T>> {
        let mut buf = Vec::new();
        if self.rx.recv_many(&mut buf, max.max(1)).await == 0 {
            return None;
        }
        Some(buf.into_iter().map(|(item, _budget)| item).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl Weighed for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_holds_back_its_reader_at_the_byte_budget() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots
            .clone()
            .try_acquire_owned()
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = feed::<Vec<u8>>(slot);
        // No second subscriber while this one lives.
        assert!(slots.clone().try_acquire_owned().is_err());
        let chunk = MAX_BUFFERED_BYTES / 4;
        for _ in 0..4 {
            assert!(tx.send(vec![0; chunk]).await.is_ok());
        }
        // The budget is spent: the fifth waits until the client takes one.
        let fifth = tokio::time::timeout(Duration::from_millis(200), tx.send(vec![0; chunk])).await;
        assert!(fifth.is_err(), "the reader must wait, not buffer more");
        assert_eq!(rx.recv().await.map(|v| v.len()), Some(chunk));
        assert!(tx.send(vec![0; chunk]).await.is_ok());
        // A single item over the budget still goes through, alone.
        for _ in 0..4 {
            let _ = rx.recv().await;
        }
        assert!(tx.send(vec![0; MAX_BUFFERED_BYTES * 2]).await.is_ok());
        drop(rx);
        assert!(tx.send(vec![1]).await.is_err());
        // The slot came back with the receiver.
        assert!(slots.try_acquire_owned().is_ok());
    }

    #[tokio::test]
    async fn try_send_takes_only_what_fits_now() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots
            .clone()
            .try_acquire_owned()
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = feed::<Vec<u8>>(slot);
        for i in 0..MAX_BUFFERED {
            assert!(tx.try_send(vec![i as u8]).is_ok(), "{i}");
            assert_eq!(tx.half_free(), i < MAX_BUFFERED / 2, "{i}");
        }
        assert_eq!(tx.try_send(vec![9]), Err(vec![9]), "full in deliveries");
        for _ in 0..MAX_BUFFERED / 2 {
            let _ = rx.recv().await;
        }
        assert!(tx.half_free());
        // Full in bytes while there is room in deliveries.
        // 128 one-byte items are still queued: 72 bytes are left after this one.
        assert!(tx.try_send(vec![0; MAX_BUFFERED_BYTES - 200]).is_ok());
        assert!(!tx.half_free());
        assert!(tx.try_send(vec![0; 100]).is_err());
        drop(rx);
        assert!(tx.is_closed());
        assert!(tx.try_send(vec![1]).is_err());
    }

    #[tokio::test]
    async fn what_is_waiting_is_taken_together_in_order() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots
            .clone()
            .try_acquire_owned()
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = feed::<Vec<u8>>(slot);
        for i in 0..5u8 {
            assert!(tx.send(vec![i]).await.is_ok());
        }
        assert_eq!(rx.recv_many(3).await, Some(vec![vec![0], vec![1], vec![2]]));
        assert_eq!(rx.recv_many(64).await, Some(vec![vec![3], vec![4]]));
        // Nothing waiting: it waits for the next one, and takes it alone.
        let (got, sent) = tokio::join!(rx.recv_many(64), tx.send(vec![5]));
        assert!(sent.is_ok());
        assert_eq!(got, Some(vec![vec![5]]));
        drop(tx);
        assert_eq!(rx.recv_many(64).await, None);
    }
}

//! # canal-worker — one shape for background jobs
//!
//! Every background job of a node (retention trimming, placement, the executor, membership,
//! the Raft link watch) has the same life: wait until there is work, do it, and when the node
//! stops, finish the work in hand and end within a deadline. A [`Worker`] says how to wait and
//! how to work; [`spawn`] runs it and gives a [`WorkerHandle`] that stops it.
//!
//! Shutdown never cancels [`Worker::work`] half-way (a Raft write in flight is answered, a
//! batch of effects is committed or not); it only cancels [`Worker::wait`]. A job still busy
//! when the deadline passes is aborted and says so in the log.
//!
//! ```text
//!   spawn ─> loop { wait (cancelled by stop) ─> work (never cancelled) } ─> stopped
//! ```

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// A background job.
pub trait Worker: Send + 'static {
    /// Its name, for logs.
    fn name(&self) -> &'static str;

    /// Waits until there is work: a timer, a notification, a changed watch. Shutdown cancels
    /// it, so it must hold nothing that cannot be dropped at an await.
    fn wait(&mut self) -> impl Future<Output = ()> + Send;

    /// Does the work there is. Shutdown lets it run to its end; it returns [`Flow::Stop`]
    /// when the job has nothing more to do ever.
    fn work(&mut self) -> impl Future<Output = Flow> + Send;
}

/// What a worker does after a round of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Wait for more work.
    Continue,
    /// End the job.
    Stop,
}

/// A running worker.
pub struct WorkerHandle {
    name: &'static str,
    stop: watch::Sender<bool>,
    join: JoinHandle<()>,
}

/// Runs `worker` on the runtime until it stops or its handle shuts it down.
pub fn spawn<W: Worker>(mut worker: W) -> WorkerHandle {
    let name = worker.name();
    let (stop, mut stopping) = watch::channel(false);
    let join = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => break,
                () = worker.wait() => {}
            }
            // A stop that came while waiting ends the job before it starts more work.
            if *stopping.borrow() {
                break;
            }
            if worker.work().await == Flow::Stop {
                break;
            }
        }
        debug!(worker = name, "worker stopped");
    });
    WorkerHandle { name, stop, join }
}

impl WorkerHandle {
    /// The worker's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the job has ended (it stopped, or it panicked).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Asks the worker to stop without waiting for it ([`WorkerHandle::shutdown`] waits).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the worker: the work in hand finishes, then the job ends. Past `deadline` it is
    /// aborted. True when it ended on its own.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        self.stop();
        let mut join = self.join;
        match tokio::time::timeout(deadline, &mut join).await {
            Ok(_) => true,
            Err(_) => {
                warn!(
                    worker = self.name,
                    ?deadline,
                    "worker still busy at the shutdown deadline; aborting it"
                );
                join.abort();
                false
            }
        }
    }
}

/// Shuts down every handle of `workers` at once, each within `deadline`; the names of those
/// that had to be aborted.
pub async fn shutdown_all(workers: Vec<WorkerHandle>, deadline: Duration) -> Vec<&'static str> {
    for w in &workers {
        w.stop();
    }
    let mut aborted = Vec::new();
    for w in workers {
        let name = w.name;
        if !w.shutdown(deadline).await {
            aborted.push(name);
        }
    }
    aborted
}

/// A wait for the next tick of `every`, for workers that poll: the first tick comes after one
/// period, and ticks missed while working are skipped, not bunched.
pub fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::sync::Notify;

    /// Counts rounds; its work takes `work_for` and notes when it finished.
    struct Counting {
        rounds: Arc<AtomicU32>,
        finished: Arc<AtomicU32>,
        kick: Arc<Notify>,
        work_for: Duration,
        stop_after: Option<u32>,
    }

    impl Worker for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn wait(&mut self) {
            self.kick.notified().await;
        }
        async fn work(&mut self) -> Flow {
            let n = self.rounds.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.work_for).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            if self.stop_after == Some(n) {
                Flow::Stop
            } else {
                Flow::Continue
            }
        }
    }

    fn counting(
        work_for: Duration,
        stop_after: Option<u32>,
    ) -> (Counting, Arc<AtomicU32>, Arc<AtomicU32>, Arc<Notify>) {
        let rounds = Arc::new(AtomicU32::new(0));
        let finished = Arc::new(AtomicU32::new(0));
        let kick = Arc::new(Notify::new());
        let w = Counting {
            rounds: rounds.clone(),
            finished: finished.clone(),
            kick: kick.clone(),
            work_for,
            stop_after,
        };
        (w, rounds, finished, kick)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn it_works_once_per_wakeup_and_stops_when_asked() {
        let (w, rounds, finished, kick) = counting(Duration::ZERO, None);
        let h = spawn(w);
        kick.notify_one();
        until("one round", || finished.load(Ordering::SeqCst) == 1).await;
        kick.notify_one();
        until("two rounds", || finished.load(Ordering::SeqCst) == 2).await;
        assert!(h.shutdown(Duration::from_secs(5)).await);
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn shutdown_lets_the_work_in_hand_finish() {
        let (w, rounds, finished, kick) = counting(Duration::from_millis(200), None);
        let h = spawn(w);
        kick.notify_one();
        until("work to start", || rounds.load(Ordering::SeqCst) == 1).await;
        assert!(h.shutdown(Duration::from_secs(5)).await);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the round in hand was cut short"
        );
    }

    #[tokio::test]
    async fn work_past_the_deadline_is_aborted() {
        let (w, rounds, finished, kick) = counting(Duration::from_secs(60), None);
        let h = spawn(w);
        kick.notify_one();
        until("work to start", || rounds.load(Ordering::SeqCst) == 1).await;
        assert!(!h.shutdown(Duration::from_millis(50)).await);
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_worker_that_says_stop_ends() {
        let (w, _rounds, _finished, kick) = counting(Duration::ZERO, Some(1));
        let h = spawn(w);
        kick.notify_one();
        until("the job to end", || h.is_finished()).await;
        assert!(h.shutdown(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn shutdown_all_names_the_aborted() {
        let (quick, _, _, _) = counting(Duration::ZERO, None);
        let (slow, rounds, _, kick) = counting(Duration::from_secs(60), None);
        let a = spawn(quick);
        let b = spawn(slow);
        kick.notify_one();
        until("slow work to start", || rounds.load(Ordering::SeqCst) == 1).await;
        let aborted = shutdown_all(vec![a, b], Duration::from_millis(50)).await;
        assert_eq!(aborted, vec!["counting"]);
    }
}

//! The executor: runs triggers' functions on the events that fire them.
//!
//! ```text
//!   metadata group ──(applied)──> supervisor ──> one task per QoS 1 trigger
//!                                     │              │  read batch from the committed log
//!                                     │              │  invoke each event (retries, backoff,
//!                                     │              │    dead letter after the last)
//!                                     │              └> commit Effects{outputs, state, cursor}
//!                                     │                 (refused if the cursor or state moved)
//!                                     └──> QoS 0 loop: events as they pass the node's hub,
//!                                          run once, outputs fanned out at QoS 0
//! ```
//!
//! A QoS 1 trigger's effects land exactly once: its cursor, its function's outputs and its
//! state changes are one Raft entry, applied only if the cursor stands where the batch
//! started. A crash before the commit re-runs the batch; a crash after it finds the cursor
//! moved. Which node executes is [`Functions::runs_here`]'s decision alone.

use crate::functions::{Functions, FunctionsError};
use crate::pubsub::Qos0Hub;
use canal_consensus::functions::{CursorMove, Effects, MAX_OUTBOX_ENTRIES, Outbound};
use canal_consensus::topics::PublishOp;
use canal_consensus::{ClientError, GroupId, Op, Route, StateMachine, Transport, Wake};
use canal_dht::DhtHandle;
use canal_proto::Topic;
use canal_proto::TopicFilter;
use canal_proto::function::{FunctionSpec, Limits, Output, TriggerSpec, state_write_cost};
use canal_proto::peer::Qos0Message;
use canal_proto::settings::{TopicSettings, settings_for};
use canal_proto::time::now_ms;
use canal_triggers::host::Overlay;
use canal_triggers::runtime::EventIn;
use canal_triggers::{Failure, Invocation, Prepared, StateView, rules};
use canal_worker::{Flow, Worker, WorkerHandle};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

/// The most events one commit covers.
const BATCH_EVENTS: u64 = 64;
/// How long an executor waits for its replica to apply its own commit before going on.
const APPLY_WAIT: Duration = Duration::from_millis(500);
/// A batch stops growing once its outputs reach this many bytes.
const BATCH_BYTES: u64 = 4 << 20;
/// The most bytes one Effects entry may hold, by [`EntryBudget`]'s count: a quarter of what
/// one RPC frame carries (`canal_dht::rpc::MAX_RPC_BYTES`, 64 MiB), so the entry fits one
/// frame with Raft's own framing and room for other entries beside it. A batch stops before
/// the event whose worst case would pass it.
pub const MAX_EFFECTS_BYTES: u64 = canal_dht::rpc::MAX_RPC_BYTES as u64 / 4;
/// What an entry costs besides its outputs and state: the function's name, the cursor move,
/// the state version, the request around it.
const ENTRY_OVERHEAD_BYTES: u64 = 4 << 10;
/// What the executor adds to each output beyond what the guest's limit counted
/// ([`canal_proto::function::output_cost`]): provenance and hop headers, the id, the time,
/// the retention.
const OUTPUT_OVERHEAD_BYTES: u64 = 2 << 10;
/// What a dead letter adds to its event: the error headers (`canal-error` cut to
/// [`MAX_ERROR_HEADER_BYTES`]), id, time, retention.
const DEAD_LETTER_OVERHEAD_BYTES: u64 = 4 << 10;
/// The longest `canal-error` header of a dead letter: a guest's error text can be long.
const MAX_ERROR_HEADER_BYTES: usize = 1 << 10;

/// The most bytes one successful invocation under `limits` can add to an entry: its counted
/// outputs and state writes, and what the executor adds to each output.
pub const fn invocation_bound(
    max_outputs: u32,
    max_output_bytes: u64,
    max_state_bytes: u64,
) -> u64 {
    max_output_bytes + max_state_bytes + max_outputs as u64 * OUTPUT_OVERHEAD_BYTES
}

// The largest invocation a function may ask for always fits one entry.
const _: () = assert!(
    ENTRY_OVERHEAD_BYTES
        + invocation_bound(
            canal_proto::function::MAX_MAX_OUTPUTS,
            canal_proto::function::MAX_MAX_OUTPUT_BYTES,
            canal_proto::function::MAX_MAX_STATE_BYTES,
        )
        <= MAX_EFFECTS_BYTES
);

/// An upper bound of what `op` takes in an encoded entry: its strings and bytes, and a
/// generous allowance for each length prefix and fixed field.
pub fn publish_cost(op: &PublishOp) -> u64 {
    let headers: u64 = op
        .headers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64 + 16)
        .sum();
    (op.topic.len() + op.id.as_deref().map_or(0, str::len) + op.payload.len()) as u64
        + headers
        + 128
}

/// An upper bound of what one more cursor move takes in an encoded entry: its two names and
/// an allowance for its numbers and length prefixes.
pub fn cursor_move_cost(trigger_uid: &str, topic: &str) -> u64 {
    (trigger_uid.len() + topic.len()) as u64 + 64
}

/// An upper bound of what a batch's state changes take in an encoded entry.
pub fn state_cost(changes: &BTreeMap<String, Option<Vec<u8>>>) -> u64 {
    changes
        .iter()
        .map(|(k, v)| state_write_cost(k, v.as_deref()))
        .sum()
}

/// How much of an Effects entry a batch has used, so that it stops before it could pass
/// [`MAX_EFFECTS_BYTES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryBudget {
    /// What the outputs (and dead letters) so far cost, by [`publish_cost`].
    pub outputs: u64,
    /// What the state changes so far cost, by [`state_cost`].
    pub state: u64,
}

impl EntryBudget {
    /// The entry's size so far, by this count.
    pub fn used(&self) -> u64 {
        ENTRY_OVERHEAD_BYTES + self.outputs + self.state
    }

    /// Whether an event that may add `need` bytes still goes in this batch. The first one
    /// always does: alone it is no bigger than the entries that brought its event in.
    pub fn admits(&self, need: u64) -> bool {
        self.outputs + self.state == 0 || self.used().saturating_add(need) <= MAX_EFFECTS_BYTES
    }

    /// The most one event (`payload` and `headers`) may add under `limits`: its invocation's
    /// worst case, or its dead letter if it fails.
    pub fn need(limits: &Limits, headers: &[(String, String)], payload: &[u8]) -> u64 {
        let ok = invocation_bound(
            limits.max_outputs,
            limits.max_output_bytes,
            limits.max_state_bytes,
        );
        let dead = canal_proto::function::output_cost("", headers, payload)
            + canal_proto::topic::MAX_TOPIC_BYTES as u64
            + DEAD_LETTER_OVERHEAD_BYTES;
        ok.max(dead)
    }
}

type Labels = Vec<(String, String)>;

/// The executor's metrics.
#[derive(Clone)]
pub struct ExecMetrics {
    invocations: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram>,
    commits: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    limits: Family<Labels, Counter>,
    entry_full: Family<Labels, Counter>,
    qos0_skipped: Counter,
    step_seconds: Family<Labels, Histogram>,
}

impl ExecMetrics {
    /// Registers the metrics: `canal_fn_invocations{function,result}`,
    /// `canal_fn_invocation_seconds{function}`, `canal_trigger_commits{trigger}`,
    /// `canal_trigger_refused_commits{trigger}`, `canal_trigger_dead_letters{trigger}`,
    /// `canal_fn_limit_exceeded{function,limit}` (invocations stopped by a per-invocation
    /// limit, by its name) and `canal_trigger_entry_full{trigger}` (batches cut short to keep
    /// their entry under [`MAX_EFFECTS_BYTES`]) and `canal_trigger_qos0_skipped` (events QoS 0
    /// triggers missed because this node's executor fell behind them: at most once, so
    /// they are counted, not waited for) and `canal_trigger_step_seconds{phase}` (where a
    /// run's time goes: prepare, plan, commit, apply).
    pub fn register(registry: &mut Registry) -> ExecMetrics {
        let m = ExecMetrics {
            invocations: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
            }),
            commits: Family::default(),
            refused: Family::default(),
            dead_letters: Family::default(),
            limits: Family::default(),
            entry_full: Family::default(),
            qos0_skipped: Counter::default(),
            step_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 2.0, 18))
            }),
        };
        registry.register(
            "canal_fn_invocations",
            "Function invocations, by result",
            m.invocations.clone(),
        );
        registry.register(
            "canal_fn_invocation_seconds",
            "Time of one invocation, instantiation included",
            m.seconds.clone(),
        );
        registry.register(
            "canal_trigger_commits",
            "Batches of a QoS 1 trigger committed",
            m.commits.clone(),
        );
        registry.register(
            "canal_trigger_refused_commits",
            "Commits refused because the cursor or the state had moved (a re-run or a race)",
            m.refused.clone(),
        );
        registry.register(
            "canal_trigger_dead_letters",
            "Events sent to the dead-letter topic after their last retry",
            m.dead_letters.clone(),
        );
        registry.register(
            "canal_fn_limit_exceeded",
            "Invocations stopped by a per-invocation limit (max-outputs, max-output-bytes, max-state-bytes, hops, output-payload, state-value)",
            m.limits.clone(),
        );
        registry.register(
            "canal_trigger_entry_full",
            "Batches of a QoS 1 trigger cut short so their Effects entry stays under the entry limit",
            m.entry_full.clone(),
        );
        registry.register(
            "canal_trigger_step_seconds",
            "Where a QoS 1 trigger's run spends its time, by phase: prepare (reading the function, its module, owner and settings), plan (reading events and running the function), commit (waiting for an Effects entry to commit, beyond what planning overlapped), apply (waiting for this replica to apply the run's last commit)",
            m.step_seconds.clone(),
        );
        registry.register(
            "canal_trigger_qos0_skipped",
            "Events QoS 0 triggers missed because this node's executor fell behind (at most once)",
            m.qos0_skipped.clone(),
        );
        m
    }

    fn phase(&self, phase: &'static str, since: Instant) {
        self.step_seconds
            .get_or_create(&vec![("phase".into(), phase.into())])
            .observe(since.elapsed().as_secs_f64());
    }

    fn observe(&self, function: &str, inv: &Invocation) {
        let result = match &inv.result {
            Ok(()) => "ok",
            Err(f) => f.kind(),
        };
        self.invocations
            .get_or_create(&vec![
                ("function".into(), function.to_string()),
                ("result".into(), result.to_string()),
            ])
            .inc();
        self.seconds
            .get_or_create(&vec![("function".into(), function.to_string())])
            .observe(inv.elapsed.as_secs_f64());
        if let Err(Failure::Limit { limit, .. }) = &inv.result {
            self.limits
                .get_or_create(&vec![
                    ("function".into(), function.to_string()),
                    ("limit".into(), limit.to_string()),
                ])
                .inc();
        }
    }
}

/// Why a trigger's step or a QoS 0 run did not happen; the trigger tries again.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The functions service could not answer (a function, its module, its state).
    #[error(transparent)]
    Functions(#[from] FunctionsError),
    /// The Raft groups could not answer or commit.
    #[error(transparent)]
    Consensus(#[from] ClientError),
    /// This node's replica could not be read, or holds a value that does not decode.
    #[error("reading this node's replica: {0}")]
    Replica(String),
    /// The trigger's spec names a topic that does not read.
    #[error("trigger {trigger}: {why}")]
    Trigger {
        /// The trigger.
        trigger: String,
        /// What is wrong with it.
        why: String,
    },
    /// The topic settings could not be read.
    #[error("reading the topic settings: {0}")]
    Settings(String),
}

fn replica(e: impl std::fmt::Display) -> ExecError {
    ExecError::Replica(e.to_string())
}

/// The most steps one pipelined run takes before it waits for this replica to apply its
/// commits and starts again from the replica: it bounds what a run holds in memory and how
/// long a stop waits for it.
const MAX_RUN_STEPS: usize = 8;
/// How many steps of one run may be committing at once (steps that write no state; one
/// that does is waited for before the next is proposed).
const STEPS_IN_FLIGHT: usize = 4;
/// How many times one run looks for events at most (it looks again when a step in flight
/// answers or the trigger's topics change while it has nothing to plan).
const MAX_RUN_ROUNDS: usize = 4 * MAX_RUN_STEPS;
/// A run also ends once the state writes it chains (not yet applied here) pass this many
/// bytes.
const MAX_CHAIN_STATE_BYTES: u64 = 4 << 20;

/// What every step of one run of a trigger uses.
struct Run<'a> {
    spec: &'a TriggerSpec,
    function: FunctionSpec,
    module: Arc<Prepared>,
    /// Who made the trigger: its function's outputs must stay within their rights.
    owner: Option<canal_proto::function::TriggerOwner>,
    dead_letter: Topic,
    settings: Vec<(TopicFilter, TopicSettings)>,
}

/// Where a run's steps leave the trigger once they commit: the next step starts from here,
/// not from this replica, which may not have applied them yet.
struct Chain {
    /// Each topic's cursor after the steps so far (`None`: no cursor stored yet).
    cursors: BTreeMap<String, Option<u64>>,
    /// The function's state version after them.
    version: u64,
    /// Their state writes (`None`: deleted), over what this replica has applied.
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    /// What `overlay` holds, by [`state_cost`].
    overlay_bytes: u64,
}

impl Chain {
    fn new(version: u64) -> Chain {
        Chain {
            cursors: BTreeMap::new(),
            version,
            overlay: BTreeMap::new(),
            overlay_bytes: 0,
        }
    }

    /// Takes `plan` as committed (it is proposed next) and returns its entry's op: the
    /// outputs for topics of `group` (the function's) are appended there; the others go to
    /// the group's outbox, for the relay ([`crate::outbox`]) to deliver.
    fn advance(
        &mut self,
        route: Route,
        function: &str,
        group: GroupId,
        routes: &Routes,
        plan: Plan,
    ) -> Op {
        for c in &plan.cursors {
            self.cursors.insert(c.topic.clone(), Some(c.next));
        }
        let expected = self.version;
        if !plan.state.is_empty() {
            // The state machine moves the version with each Effects that writes state.
            self.version += 1;
        }
        self.overlay.extend(plan.state.clone());
        self.overlay_bytes = state_cost(&self.overlay);
        let (outputs, outbox) = routes.split(route, function, group, plan.outputs);
        Op::Effects(Effects {
            function: function.to_string(),
            cursors: plan.cursors,
            state_version: Some(expected),
            state: plan.state.into_iter().collect(),
            outputs,
            outbox,
        })
    }
}

/// One step's work: the batches of every topic it ran, committed as one Effects.
#[derive(Default)]
struct Plan {
    /// Each topic's cursor move, in the order the topics ran.
    cursors: Vec<CursorMove>,
    /// The step's state writes, all topics together.
    state: BTreeMap<String, Option<Vec<u8>>>,
    /// The outputs and dead letters, in the order of their events.
    outputs: Vec<PublishOp>,
}

/// A step's entry on its way through Raft.
struct Committing(tokio::task::JoinHandle<Result<canal_consensus::Response, ClientError>>);

impl Committing {
    /// Its answer, or why there is none (then what it did is unknown, and the next step
    /// reads from the replica).
    async fn finish(mut self) -> Result<canal_consensus::Response, ExecError> {
        self.answer().await
    }

    /// [`Committing::finish`] without giving the step up: cancel-safe, for a `select!`
    /// (once it has answered, it must not be awaited again).
    async fn answer(&mut self) -> Result<canal_consensus::Response, ExecError> {
        Ok((&mut self.0)
            .await
            .map_err(|e| ExecError::Replica(format!("the commit task failed: {e}")))??)
    }
}

/// What a run waiting with nothing to plan got first.
enum Got {
    /// The oldest step in flight answered.
    Answer(Result<canal_consensus::Response, ExecError>),
    /// The trigger's topics changed (`None`: the state machine is gone).
    Wake(Option<Wake>),
}

/// How many QoS 0 trigger runs a node has in progress at most: enough to keep its cores
/// busy while some wait on a commit of their state, few enough that a flood queues in the
/// hub's bounded channel rather than in tasks.
const QOS0_RUNS: usize = 64;

/// How long a QoS 1 trigger with nothing to do waits before it looks again (a change of
/// leader or of placement shows no new applied entry).
const TRIGGER_IDLE: Duration = Duration::from_millis(250);
/// How long the supervisor waits for a metadata change before it looks again.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// What the executor shares between its tasks.
pub struct Executor<T: Transport> {
    /// The functions service.
    pub functions: Arc<Functions<T>>,
    /// The mesh, for QoS 0 outputs.
    pub dht: DhtHandle,
    /// The node's QoS 0 hub.
    pub qos0: Qos0Hub,
    /// Metrics.
    pub metrics: ExecMetrics,
    /// Each QoS 1 trigger's events waiting here, by trigger uid.
    pub backlog: std::sync::Mutex<HashMap<String, u64>>,
    /// Which group holds each output's topic.
    pub routes: Routes,
}

/// The first outbox of `function` (committed in `group`) that holds at least half of
/// [`MAX_OUTBOX_ENTRIES`], and how many entries it holds: while one does, the trigger
/// waits instead of running steps whose effects the limit would refuse.
fn outbox_backlog(
    sm: &StateMachine,
    group: GroupId,
    function: &str,
) -> Result<Option<(String, u64)>, ExecError> {
    let mine = format!("{}:{function}:", group.0);
    Ok(sm
        .outbox_producers()
        .map_err(replica)?
        .into_iter()
        .find(|(p, m)| {
            // Exactly this function's: the rest is the target group's number.
            p.strip_prefix(&mine)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                && m.len() >= MAX_OUTBOX_ENTRIES / 2
        })
        .map(|(p, m)| (p, m.len())))
}

/// Which group holds an output's topic, as the executor sees it: the cluster's route,
/// unless a test put another answer in front of it (so a test
/// can put a function's outputs in another group than the function without changing
/// routing's answers).
#[derive(Clone, Default)]
pub struct Routes {
    #[cfg(test)]
    outputs: Option<Arc<OutputGroups>>,
}

/// A test's answer to which group holds a topic (`None`: routing's answer).
#[cfg(test)]
type OutputGroups = dyn Fn(&str) -> Option<GroupId> + Send + Sync;

impl Routes {
    /// Routes where `groups` answers first, for the topics it names.
    #[cfg(test)]
    pub(crate) fn with_outputs(
        groups: impl Fn(&str) -> Option<GroupId> + Send + Sync + 'static,
    ) -> Routes {
        Routes {
            outputs: Some(Arc::new(groups)),
        }
    }

    /// The group that holds `topic`'s log under `route`.
    pub fn group_of(&self, route: Route, topic: &str) -> GroupId {
        #[cfg(test)]
        if let Some(g) = self.outputs.as_ref().and_then(|f| f(topic)) {
            return g;
        }
        route.topic(topic)
    }

    /// Splits the outputs of `function`, committed in `group`: those whose topic `group`
    /// holds, in order, and the others as outbox entries, in order, under the producer of
    /// their target group.
    pub fn split(
        &self,
        route: Route,
        function: &str,
        group: GroupId,
        outputs: Vec<PublishOp>,
    ) -> (Vec<PublishOp>, Vec<Outbound>) {
        let mut here = Vec::new();
        let mut away = Vec::new();
        for event in outputs {
            let target = self.group_of(route, &event.topic);
            if target == group {
                here.push(event);
            } else {
                away.push(Outbound {
                    producer: canal_consensus::functions::producer_id(group, function, target),
                    target,
                    event,
                });
            }
        }
        (here, away)
    }
}

fn log_lines(function: &str, inv: &Invocation) {
    for l in &inv.logs {
        info!(target: "canal::fn", function, level = %l.level, "{}", l.message);
    }
}

/// The executor's jobs: its supervisor, one job per QoS 1 trigger and the QoS 0 loop, each a
/// [`canal_worker::Worker`]. [`ExecutorHandle::shutdown`] stops the supervisor first (so no
/// trigger starts after), then the rest; a batch being run finishes and commits, or is not
/// committed at all (its Raft write is never cut short).
pub struct ExecutorHandle {
    supervisor: WorkerHandle,
    jobs: Arc<std::sync::Mutex<Jobs>>,
}

/// The jobs the supervisor started: by trigger uid, and the QoS 0 loop.
#[derive(Default)]
struct Jobs {
    triggers: HashMap<String, WorkerHandle>,
    qos0: Option<WorkerHandle>,
}

impl ExecutorHandle {
    /// Stops the executor: the supervisor, then every trigger job and the QoS 0 loop, each
    /// within `deadline`. The names of the jobs that had to be aborted.
    pub async fn shutdown(self, deadline: Duration) -> Vec<&'static str> {
        let mut aborted = Vec::new();
        if !self.supervisor.shutdown(deadline).await {
            aborted.push("executor");
        }
        let handles: Vec<WorkerHandle> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let mut h: Vec<WorkerHandle> = jobs.triggers.drain().map(|(_, h)| h).collect();
            h.extend(jobs.qos0.take());
            h
        };
        aborted.extend(canal_worker::shutdown_all(handles, deadline).await);
        aborted
    }

    /// How many QoS 1 trigger jobs run now.
    pub fn triggers_running(&self) -> usize {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .triggers
            .values()
            .filter(|h| !h.is_finished())
            .count()
    }
}

/// The supervisor: starts and stops the trigger jobs as the metadata group's triggers change.
struct Supervisor<T: Transport> {
    exec: Arc<Executor<T>>,
    /// The metadata group's applied index; `None` when this node has no metadata group.
    applied: Option<watch::Receiver<u64>>,
    qos0: watch::Sender<Arc<Vec<TriggerSpec>>>,
    jobs: Arc<std::sync::Mutex<Jobs>>,
    first: bool,
    closed: bool,
}

impl<T: Transport> Worker for Supervisor<T> {
    fn name(&self) -> &'static str {
        "executor"
    }

    async fn wait(&mut self) {
        if std::mem::take(&mut self.first) {
            return;
        }
        let Some(applied) = self.applied.as_mut() else {
            return;
        };
        tokio::select! {
            r = applied.changed() => if r.is_err() { self.closed = true },
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
    }

    async fn work(&mut self) -> Flow {
        let Some(applied) = self.applied.as_mut() else {
            warn!("no metadata group: functions cannot run");
            return Flow::Stop;
        };
        if self.closed {
            return Flow::Stop;
        }
        applied.borrow_and_update();
        let exec = &self.exec;
        match (exec.functions.functions(), exec.functions.triggers()) {
            (Ok(functions), Ok(triggers)) => {
                // Compile what is placed here before its first event arrives (the node
                // that took the deploy has it prepared already); a node placement did not
                // name compiles nothing until it is named.
                for f in &functions {
                    if exec.functions.runtime.get(&f.hash).is_none()
                        && exec.functions.placed_here(f)
                        && let Err(e) = exec.functions.module(f).await
                    {
                        debug!(function = %f.name, error = ?e, "module not ready yet");
                    }
                }
                {
                    let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                    jobs.triggers.retain(|uid, job| {
                        let keep = triggers.iter().any(|t| &t.uid == uid) && !job.is_finished();
                        if !keep {
                            // It ends after the batch in hand, if any: never half-way.
                            job.stop();
                        }
                        keep
                    });
                    for t in triggers.iter().filter(|t| t.qos == 1) {
                        if !jobs.triggers.contains_key(&t.uid)
                            && let Some(job) = TriggerJob::new(exec.clone(), t.clone())
                        {
                            jobs.triggers
                                .insert(t.uid.clone(), canal_worker::spawn(job));
                        }
                    }
                }
                let qos0: Vec<TriggerSpec> = triggers.into_iter().filter(|t| t.qos == 0).collect();
                // Advertise what the QoS 0 triggers executed here listen to, so
                // publishers send those events here.
                let here: Vec<String> = qos0
                    .iter()
                    .filter(|t| {
                        functions
                            .iter()
                            .any(|f| f.name == t.function && exec.functions.runs_here(f))
                    })
                    .map(|t| t.filter.to_string())
                    .collect();
                exec.qos0.set_trigger_filters(here);
                self.qos0.send_replace(Arc::new(qos0));
            }
            (Err(e), _) | (_, Err(e)) => warn!(error = ?e, "cannot read functions"),
        }
        Flow::Continue
    }
}

/// One QoS 1 trigger: batches from the committed log, while this node is its executor.
struct TriggerJob<T: Transport> {
    exec: Arc<Executor<T>>,
    spec: TriggerSpec,
    /// This node's replica of the function's group: its state and the trigger's cursors.
    sm: StateMachine,
    /// The groups of the topics the trigger reads, and the topics each apply there
    /// changed: the job wakes for those its filter matches only.
    inputs: canal_pubsub::Inputs<T>,
    /// What the next step looks at.
    next: Next,
    /// Where the last run left the trigger, for the next one to start from while this
    /// replica has not applied it yet.
    carry: Option<Carried>,
    closed: bool,
}

/// A run's chain after its last commit (all answered, none refused), and that commit's log
/// index: the next run starts from it until this replica has applied that index, instead
/// of waiting for the apply.
struct Carried {
    index: u64,
    chain: Chain,
}

/// What a trigger job's next step looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// Every matching topic: at the start, after a failed step or an idle wait (a change of
    /// leader or placement shows in no topic), or when the change notices were missed.
    All,
    /// These matching topics: they changed, or their last step committed a batch (there
    /// may be more).
    Topics(BTreeSet<String>),
    /// Nothing until a matching topic changes or the idle wait ends.
    Wait,
}

impl<T: Transport> TriggerJob<T> {
    fn new(exec: Arc<Executor<T>>, spec: TriggerSpec) -> Option<Self> {
        let consensus = &exec.functions.consensus;
        let route = consensus.route().ok()?;
        let sm = consensus
            .state_machine(route.function(&spec.function))
            .ok()?;
        // Before the first read, so nothing applied after it goes unnoticed.
        let inputs = canal_pubsub::Inputs::open(consensus, route, &spec.filter).ok()?;
        Some(TriggerJob {
            exec,
            spec,
            sm,
            inputs,
            next: Next::All,
            carry: None,
            closed: false,
        })
    }
}

impl<T: Transport> Worker for TriggerJob<T> {
    fn name(&self) -> &'static str {
        "trigger"
    }

    async fn wait(&mut self) {
        if self.next != Next::Wait {
            return;
        }
        // New events on a matching topic, or a change of leader or placement (which the
        // timeout notices).
        let idle = tokio::time::sleep(TRIGGER_IDLE);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                w = self.inputs.next() => match w {
                    None => {
                        self.closed = true;
                        return;
                    }
                    Some((_, Wake::Everything)) => {
                        self.next = Next::All;
                        return;
                    }
                    Some((_, Wake::Topics(changed))) => {
                        let mine: BTreeSet<String> = changed
                            .into_iter()
                            .filter(|t| Topic::new(t).is_ok_and(|t| self.spec.filter.matches(&t)))
                            .collect();
                        if !mine.is_empty() {
                            self.next = Next::Topics(mine);
                            return;
                        }
                    }
                },
                _ = &mut idle => {
                    self.next = Next::All;
                    return;
                }
            }
        }
    }

    async fn work(&mut self) -> Flow {
        if self.closed {
            return Flow::Stop;
        }
        let only = match std::mem::replace(&mut self.next, Next::Wait) {
            Next::All => None,
            Next::Topics(t) => Some(t),
            Next::Wait => return Flow::Continue,
        };
        let carry = self.carry.take();
        let stepped = self
            .exec
            .step(&self.sm, &mut self.inputs, &self.spec, only.as_ref(), carry)
            .await;
        self.next = match stepped {
            // What committed may have more: the same topics again at once.
            Ok((true, carry)) => {
                self.carry = carry;
                only.map_or(Next::All, Next::Topics)
            }
            Ok((false, carry)) => {
                self.carry = carry;
                Next::Wait
            }
            Err(e) => {
                warn!(trigger = %self.spec.name, error = %e, "trigger step failed; trying again");
                Next::Wait
            }
        };
        Flow::Continue
    }
}

/// QoS 0 triggers: each event that passes this node's hub, run once if this node executes the
/// function; outputs go out at QoS 0, state changes are committed after. At most
/// [`QOS0_RUNS`] run at once: past that the job stops taking events, and what the hub's
/// channel cannot hold meanwhile is skipped and counted.
struct Qos0Job<T: Transport> {
    exec: Arc<Executor<T>>,
    /// One permit per run in progress.
    runs: Arc<tokio::sync::Semaphore>,
    rx: broadcast::Receiver<Arc<Qos0Message>>,
    triggers: watch::Receiver<Arc<Vec<TriggerSpec>>>,
    next: Option<Result<Arc<Qos0Message>, broadcast::error::RecvError>>,
}

impl<T: Transport> Worker for Qos0Job<T> {
    fn name(&self) -> &'static str {
        "qos0-triggers"
    }

    async fn wait(&mut self) {
        // Cancel-safe: a message not taken stays in the channel.
        self.next = Some(self.rx.recv().await);
    }

    async fn work(&mut self) -> Flow {
        let m = match self.next.take() {
            Some(Ok(m)) => m,
            Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                self.exec.metrics.qos0_skipped.inc_by(n);
                warn!(
                    dropped = n,
                    "QoS 0 triggers fell behind; events skipped (at most once)"
                );
                return Flow::Continue;
            }
            Some(Err(broadcast::error::RecvError::Closed)) => return Flow::Stop,
            None => return Flow::Continue,
        };
        let list = self.triggers.borrow().clone();
        if list.is_empty() {
            return Flow::Continue;
        }
        let Ok(topic) = Topic::new(&m.topic) else {
            return Flow::Continue;
        };
        for spec in rules::matching(&list, &topic, 0) {
            // Backpressure: a flood waits here (and the hub's channel holds the events)
            // instead of growing one task per event.
            let Ok(permit) = self.runs.clone().acquire_owned().await else {
                return Flow::Stop;
            };
            let this = self.exec.clone();
            let spec = spec.clone();
            let m = m.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = this.run_qos0(&spec, &m).await {
                    debug!(trigger = %spec.name, error = %e, "QoS 0 trigger did not run");
                }
            });
        }
        Flow::Continue
    }
}

impl<T: Transport> Executor<T> {
    /// Starts the supervisor, which starts the trigger jobs and the QoS 0 loop.
    pub fn spawn(self: Arc<Self>) -> ExecutorHandle {
        let applied = self
            .functions
            .consensus
            .state_machine(GroupId::METADATA)
            .ok()
            .map(|m| m.watch_applied());
        let (qos0_tx, qos0_rx) = watch::channel(Arc::new(Vec::<TriggerSpec>::new()));
        let jobs = Arc::new(std::sync::Mutex::new(Jobs {
            triggers: HashMap::new(),
            qos0: Some(canal_worker::spawn(Qos0Job {
                exec: self.clone(),
                runs: Arc::new(tokio::sync::Semaphore::new(QOS0_RUNS)),
                rx: self.qos0.subscribe(),
                triggers: qos0_rx,
                next: None,
            })),
        }));
        let supervisor = canal_worker::spawn(Supervisor {
            exec: self,
            applied,
            qos0: qos0_tx,
            jobs: jobs.clone(),
            first: true,
            closed: false,
        });
        ExecutorHandle { supervisor, jobs }
    }

    /// Runs the trigger's matching topics (those in `only`, if given) as a pipeline: the next
    /// step's invocations run while the previous step's Effects entry commits, starting from
    /// where that entry leaves the cursors and the state ([`Chain`]). Each step commits every
    /// topic it ran in one entry. Says whether anything was committed or refused (then the
    /// caller goes again at once).
    ///
    /// Each Effects names the cursors and the state version it expects. A step is proposed
    /// while earlier ones commit (up to [`STEPS_IN_FLIGHT`]) only if none of those writes
    /// state; otherwise, and after any refusal, it waits for their answers. So a step built
    /// on a refused or lost one never applies: the chain changes when it runs, never what
    /// commits.
    async fn step(
        &self,
        sm: &StateMachine,
        inputs: &mut canal_pubsub::Inputs<T>,
        spec: &TriggerSpec,
        only: Option<&BTreeSet<String>>,
        carry: Option<Carried>,
    ) -> Result<(bool, Option<Carried>), ExecError> {
        let began = Instant::now();
        let Some(function) = self.functions.function(&spec.function)? else {
            return Ok((false, None));
        };
        if !self.functions.runs_here(&function) {
            return Ok((false, None));
        }
        let run = Run {
            spec,
            module: self.functions.module(&function).await?,
            owner: self.functions.trigger_owner(&spec.uid)?,
            dead_letter: spec.dead_letter_topic().map_err(|e| ExecError::Trigger {
                trigger: spec.name.clone(),
                why: e.0,
            })?,
            settings: canal_pubsub::settings::all_settings(&self.functions.consensus)
                .map_err(|e| ExecError::Settings(e.to_string()))?,
            function,
        };
        let route = self.functions.consensus.route()?;
        let group = route.function(&run.function.name);
        if let Some((producer, n)) = outbox_backlog(sm, group, &run.function.name)? {
            // Its effects would soon be refused by the outbox limit: the relay delivers
            // first, and the trigger looks again after its idle wait.
            debug!(trigger = %spec.name, producer, entries = n, "the function's outbox is half full; waiting for the relay");
            return Ok((false, carry));
        }
        // The last run's chain while this replica is behind it; the replica once it has
        // caught up (it then holds the same, and what others committed since).
        let applied_here = *sm.watch_applied().borrow();
        let (mut chain, carried_index) = match carry {
            Some(c) if applied_here < c.index => (c.chain, Some(c.index)),
            _ => (
                Chain::new(self.functions.state_version(&run.function.name)?),
                None,
            ),
        };
        let mut topics: Option<BTreeSet<String>> = only.cloned();
        // Steps proposed and not answered yet, oldest first, each with whether it writes
        // state.
        let mut inflight: VecDeque<(Committing, bool)> = VecDeque::new();
        let mut progressed = false;
        let mut last_index = None;
        let mut broken = false;
        self.metrics.phase("prepare", began);
        let (mut proposed, mut rounds) = (0, 0);
        while proposed < MAX_RUN_STEPS && rounds < MAX_RUN_ROUNDS {
            rounds += 1;
            let planning = Instant::now();
            let plan = self.plan(sm, inputs, &run, topics.as_ref(), &chain).await;
            self.metrics.phase("plan", planning);
            // Before the next step is proposed, settle what it may not overlap: a step that
            // writes state (the next one's state version would name the version it makes,
            // which a rival write could make too if this one were refused), and anything
            // past the depth. A step that writes no state leaves the version where it was,
            // and moves each cursor to an offset no refused step leaves it at, so the next
            // one may go while it commits: whatever this one's fate, the next applies only
            // on the cursors and the state it was planned on.
            while let Some((_, stateful)) = inflight.front() {
                let settle = plan.is_err()
                    || (matches!(plan, Ok(Some(_)))
                        && (*stateful || inflight.len() >= STEPS_IN_FLIGHT));
                if !settle {
                    break;
                }
                let Some((prev, _)) = inflight.pop_front() else {
                    break;
                };
                let committing = Instant::now();
                let r = prev.finish().await;
                self.metrics.phase("commit", committing);
                match r {
                    Ok(r) => {
                        if !self.took(spec, &r, &mut progressed, &mut last_index) {
                            // The chain broke: what was planned on it would be refused.
                            broken = true;
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = self.settle(spec, inflight).await;
                        return Err(e);
                    }
                }
            }
            if broken {
                break;
            }
            let plan = match plan {
                Ok(Some(plan)) => plan,
                Ok(None) if inflight.is_empty() => break,
                Ok(None) => {
                    // Nothing new yet while steps commit: the oldest one's answer, or new
                    // events on the trigger's topics (planned at once, while the rest
                    // commit), whichever comes first; then look again.
                    let committing = Instant::now();
                    let got = {
                        let Some((front, _)) = inflight.front_mut() else {
                            break;
                        };
                        tokio::select! {
                            r = front.answer() => Got::Answer(r),
                            w = inputs.next() => Got::Wake(w.map(|(_, w)| w)),
                        }
                    };
                    match got {
                        Got::Answer(r) => {
                            self.metrics.phase("commit", committing);
                            inflight.pop_front();
                            match r {
                                Ok(r) => {
                                    if !self.took(spec, &r, &mut progressed, &mut last_index) {
                                        broken = true;
                                        break;
                                    }
                                }
                                Err(e) => {
                                    let _ = self.settle(spec, inflight).await;
                                    return Err(e);
                                }
                            }
                        }
                        Got::Wake(None) => break,
                        Got::Wake(Some(Wake::Everything)) => topics = None,
                        Got::Wake(Some(Wake::Topics(changed))) => {
                            if let Some(topics) = topics.as_mut() {
                                topics.extend(changed.into_iter().filter(|t| {
                                    Topic::new(t).is_ok_and(|t| spec.filter.matches(&t))
                                }));
                            }
                        }
                    }
                    continue;
                }
                Err(e) => {
                    let _ = self.settle(spec, inflight).await;
                    return Err(e);
                }
            };
            topics = Some(plan.cursors.iter().map(|c| c.topic.clone()).collect());
            let stateful = !plan.state.is_empty();
            let op = chain.advance(route, &run.function.name, group, &self.routes, plan);
            // Proposed here, in order: steps in flight reach the log in the order planned.
            let answer = self
                .functions
                .consensus
                .start_write(group, canal_consensus::Request { id: None, op })
                .await;
            inflight.push_back((Committing(tokio::spawn(answer)), stateful));
            proposed += 1;
            if chain.overlay_bytes > MAX_CHAIN_STATE_BYTES {
                break;
            }
        }
        let (settled, unrefused) = self.settle(spec, inflight).await?;
        if let Some(index) = settled {
            progressed = true;
            last_index = Some(last_index.map_or(index, |i: u64| i.max(index)));
        }
        if !progressed {
            self.set_backlog(&spec.uid, 0);
        }
        if let Some(index) = last_index.or(carried_index)
            && !broken
            && unrefused
            && chain.overlay_bytes <= MAX_CHAIN_STATE_BYTES
        {
            // Everything committed as chained: the next run goes on from the chain.
            return Ok((progressed, Some(Carried { index, chain })));
        }
        if let Some(index) = last_index {
            let applying = Instant::now();
            // The next run starts from this replica's cursors: wait until it has applied the
            // last commit, or an executor away from the leader would re-run the batch it just
            // committed (and be refused) until its replica caught up. Bounded: a replica that
            // hears of the commit late costs one refused re-run, not a stall.
            let mut applied = sm.watch_applied();
            if tokio::time::timeout(APPLY_WAIT, applied.wait_for(|i| *i >= index))
                .await
                .is_err()
            {
                debug!(trigger = %spec.name, index, "this replica has not applied the trigger's commit yet");
            }
            self.metrics.phase("apply", applying);
        }
        Ok((progressed, None))
    }

    /// Waits for every step still in flight and counts its answer; returns the log index of
    /// the last one answered and whether none was refused, or the first error (after the
    /// rest were waited for).
    async fn settle(
        &self,
        spec: &TriggerSpec,
        inflight: VecDeque<(Committing, bool)>,
    ) -> Result<(Option<u64>, bool), ExecError> {
        let mut last = None;
        let mut unrefused = true;
        let mut failed = None;
        for (c, _) in inflight {
            let committing = Instant::now();
            let r = c.finish().await;
            self.metrics.phase("commit", committing);
            match r {
                Ok(r) => {
                    last = Some(r.index);
                    unrefused &= self.count_answer(spec, &r);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((last, unrefused)),
        }
    }

    /// Takes a step's answer into the run: it progressed, up to the answer's index; true
    /// when the step was not refused (counted either way).
    fn took(
        &self,
        spec: &TriggerSpec,
        r: &canal_consensus::Response,
        progressed: &mut bool,
        last_index: &mut Option<u64>,
    ) -> bool {
        *progressed = true;
        *last_index = Some(r.index);
        self.count_answer(spec, r)
    }

    /// Counts a step's answer; true when it was not refused.
    fn count_answer(&self, spec: &TriggerSpec, r: &canal_consensus::Response) -> bool {
        let label = vec![("trigger".into(), spec.name.clone())];
        match &r.refused {
            None => {
                self.metrics.commits.get_or_create(&label).inc();
                true
            }
            Some(why) => {
                debug!(trigger = %spec.name, %why, "commit refused; reading again");
                self.metrics.refused.get_or_create(&label).inc();
                false
            }
        }
    }

    /// Runs the next batch of each matching topic (of `only`, if given) from where `chain`
    /// leaves it, and returns their effects, or `None` when no topic has events to run.
    async fn plan(
        &self,
        sm: &StateMachine,
        inputs: &canal_pubsub::Inputs<T>,
        run: &Run<'_>,
        only: Option<&BTreeSet<String>>,
        chain: &Chain,
    ) -> Result<Option<Plan>, ExecError> {
        let spec = run.spec;
        let topics = match only {
            None => inputs.topics().await.map_err(replica)?,
            Some(only) => {
                let mut metas = Vec::with_capacity(only.len());
                for topic in only {
                    let Some(reader) = inputs.reader_of(topic) else {
                        continue;
                    };
                    if let Some(meta) = reader.topic_meta(topic).await.map_err(replica)? {
                        metas.push((topic.clone(), meta));
                    }
                }
                metas
            }
        };
        // What this replica applied, with the writes of the steps it may not have applied
        // yet on top.
        let replica_state: Arc<dyn StateView> =
            Arc::new(self.functions.state_view(&run.function.name)?);
        let chained: Arc<dyn StateView> = Arc::new(Overlay {
            base: replica_state,
            changes: chain.overlay.clone(),
        });
        let mut plan = Plan::default();
        let mut budget = EntryBudget::default();
        let mut state_done = 0u64;
        let mut backlog = 0u64;
        'topics: for (topic, meta) in topics {
            let Ok(t) = Topic::new(&topic) else { continue };
            if !spec.filter.matches(&t) || t == run.dead_letter {
                continue;
            }
            let Some(reader) = inputs.reader_of(&topic) else {
                continue;
            };
            let stored = match chain.cursors.get(&topic) {
                Some(c) => *c,
                None => sm.trigger_cursor(&spec.uid, &topic).map_err(replica)?,
            };
            let created_at = match stored {
                Some(_) => 0,
                None => reader
                    .offset_at(&topic, spec.created_ms)
                    .await
                    .map_err(replica)?,
            };
            let start = rules::start(stored, meta.first, meta.next, created_at);
            if let Some((from, to)) = start.skipped {
                warn!(trigger = %spec.name, %topic, from, to, "retention dropped events before the trigger ran them");
            }
            if start.offset >= meta.next {
                continue;
            }
            backlog += meta.next - start.offset;
            let end = rules::batch_end(start.offset, meta.next, BATCH_EVENTS);
            let events = reader
                .events(&topic, start.offset, (end - start.offset) as usize)
                .await
                .map_err(replica)?;
            // Earlier topics of this step wrote on top of the chain.
            let base: Arc<dyn StateView> = if plan.state.is_empty() {
                chained.clone()
            } else {
                Arc::new(Overlay {
                    base: chained.clone(),
                    changes: plan.state.clone(),
                })
            };
            if !plan.cursors.is_empty() {
                // Another cursor move in the entry ([`ENTRY_OVERHEAD_BYTES`] counts the first).
                budget.outputs += cursor_move_cost(&spec.uid, &topic);
            }
            let mut changes = BTreeMap::new();
            let mut outputs = Vec::new();
            let mut next = start.offset;
            let mut full = false;
            for ev in events {
                if ev.offset >= end {
                    break;
                }
                if !budget.admits(EntryBudget::need(
                    &run.function.limits,
                    &ev.headers,
                    &ev.payload,
                )) {
                    // The rest goes in the next entry: this one must fit one RPC frame.
                    debug!(trigger = %spec.name, %topic, offset = ev.offset, used = budget.used(), limit = MAX_EFFECTS_BYTES, "the batch's entry is full");
                    self.metrics
                        .entry_full
                        .get_or_create(&vec![("trigger".into(), spec.name.clone())])
                        .inc();
                    full = true;
                    break;
                }
                let event = EventIn {
                    topic: topic.clone(),
                    id: ev
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("{topic}:{}", ev.offset)),
                    offset: Some(ev.offset),
                    time_ms: ev.time_ms,
                    headers: ev.headers.clone(),
                    payload: ev.payload.clone(),
                };
                match self
                    .run_with_retries(spec, &run.function, &run.module, event, &base, &changes)
                    .await
                    .and_then(|inv| denied(run.owner.as_ref(), &inv.outputs).map_or(Ok(inv), Err))
                {
                    Ok(inv) => {
                        changes = inv.state;
                        budget.state = state_done + state_cost(&changes);
                        let hops = rules::hops(&ev.headers);
                        for (n, out) in inv.outputs.into_iter().enumerate() {
                            let op = self.output_op(
                                spec,
                                &topic,
                                ev.offset,
                                hops,
                                n,
                                out,
                                &run.settings,
                            );
                            budget.outputs += publish_cost(&op);
                            outputs.push(op);
                        }
                    }
                    Err(failure) => {
                        warn!(trigger = %spec.name, %topic, offset = ev.offset, error = %failure, "event goes to the dead letter");
                        self.metrics
                            .dead_letters
                            .get_or_create(&vec![("trigger".into(), spec.name.clone())])
                            .inc();
                        let mut headers = ev.headers.clone();
                        headers.extend(dead_letter_headers(
                            spec,
                            &topic,
                            Some(ev.offset),
                            &failure,
                        ));
                        let op = PublishOp {
                            topic: run.dead_letter.to_string(),
                            id: Some(rules::output_id(&spec.uid, &topic, ev.offset, 0)),
                            headers,
                            payload: ev.payload,
                            retention: settings_for(&run.dead_letter, &run.settings).retention,
                        };
                        budget.outputs += publish_cost(&op);
                        outputs.push(op);
                    }
                }
                next = ev.offset + 1;
                if budget.outputs >= BATCH_BYTES {
                    full = true;
                    break;
                }
            }
            if next > start.offset {
                state_done += state_cost(&changes);
                plan.cursors.push(CursorMove {
                    trigger_uid: spec.uid.clone(),
                    topic: topic.clone(),
                    expected: stored,
                    next,
                });
                plan.outputs.extend(outputs);
                plan.state.extend(changes);
            }
            if full {
                break 'topics;
            }
        }
        self.set_backlog(&spec.uid, backlog);
        Ok((!plan.cursors.is_empty()).then_some(plan))
    }

    /// Records a trigger's backlog here and advertises the node's total as its queue length
    /// (placement's least-loaded and latency policies read it).
    fn set_backlog(&self, uid: &str, n: u64) {
        let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        if n == 0 {
            b.remove(uid);
        } else {
            b.insert(uid.to_string(), n);
        }
        self.functions
            .live
            .queue_len
            .store(b.values().sum(), Ordering::Relaxed);
    }

    /// Runs one event, retrying failures with backoff up to the trigger's retries.
    async fn run_with_retries(
        &self,
        spec: &TriggerSpec,
        function: &FunctionSpec,
        module: &Arc<Prepared>,
        event: EventIn,
        base: &Arc<dyn StateView>,
        changes: &BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<Invocation, Failure> {
        let mut attempt = 0;
        loop {
            let inv = self
                .invoke(
                    function,
                    module,
                    event.clone(),
                    base.clone(),
                    changes.clone(),
                    spec.out.clone(),
                )
                .await;
            match inv.result {
                Ok(()) => return Ok(inv),
                Err(failure) => {
                    attempt += 1;
                    debug!(trigger = %spec.name, attempt, error = %failure, "invocation failed");
                    if attempt > spec.retries {
                        return Err(failure);
                    }
                    tokio::time::sleep(rules::backoff(attempt)).await;
                }
            }
        }
    }

    async fn invoke(
        &self,
        function: &FunctionSpec,
        module: &Arc<Prepared>,
        event: EventIn,
        base: Arc<dyn StateView>,
        changes: BTreeMap<String, Option<Vec<u8>>>,
        out: Option<Topic>,
    ) -> Invocation {
        let inv = self
            .functions
            .run(module.clone(), event, base, changes, out, function.limits)
            .await
            .unwrap_or_else(|e| Invocation {
                result: Err(Failure::Start(e)),
                outputs: Vec::new(),
                state: BTreeMap::new(),
                logs: Vec::new(),
                elapsed: Duration::ZERO,
                fuel_used: None,
            });
        self.metrics.observe(&function.name, &inv);
        if inv.result.is_ok() {
            self.functions.observe(&function.name, inv.elapsed);
        }
        log_lines(&function.name, &inv);
        inv
    }

    #[allow(clippy::too_many_arguments)]
    fn output_op(
        &self,
        spec: &TriggerSpec,
        topic: &str,
        offset: u64,
        hops: u32,
        n: usize,
        out: Output,
        settings: &[(TopicFilter, TopicSettings)],
    ) -> PublishOp {
        output_op(
            &self.functions.peer_id,
            spec,
            topic,
            offset,
            hops,
            n,
            out,
            settings,
        )
    }

    /// Headers that say where an output came from: the trigger, the executing peer and the
    /// input event; and its hop count, from the input's `hops`.
    fn provenance(
        &self,
        spec: &TriggerSpec,
        topic: &str,
        offset: Option<u64>,
        hops: u32,
        headers: &mut Vec<(String, String)>,
    ) {
        provenance(&self.functions.peer_id, spec, topic, offset, hops, headers)
    }

    async fn run_qos0(&self, spec: &TriggerSpec, m: &Qos0Message) -> Result<(), ExecError> {
        let Some(function) = self.functions.function(&spec.function)? else {
            return Ok(());
        };
        if !self.functions.runs_here(&function) {
            return Ok(());
        }
        let module = self.functions.module(&function).await?;
        let base: Arc<dyn StateView> = Arc::new(self.functions.state_view(&function.name)?);
        let event = EventIn {
            topic: m.topic.clone(),
            id: m.id.clone(),
            offset: None,
            time_ms: m.time_ms,
            headers: m.headers.clone(),
            payload: m.payload.clone(),
        };
        let inv = self
            .invoke(
                &function,
                &module,
                event,
                base,
                BTreeMap::new(),
                spec.out.clone(),
            )
            .await;
        let owner = self.functions.trigger_owner(&spec.uid)?;
        let verdict = match (&inv.result, denied(owner.as_ref(), &inv.outputs)) {
            (Ok(()), Some(refused)) => Err(refused),
            (r, _) => r.clone(),
        };
        let outputs: Vec<Output> = match &verdict {
            Ok(()) => inv
                .outputs
                .iter()
                .map(|o| {
                    let mut headers = o.headers.clone();
                    self.provenance(spec, &m.topic, None, rules::hops(&m.headers), &mut headers);
                    Output {
                        topic: o.topic.clone(),
                        headers,
                        payload: o.payload.clone(),
                    }
                })
                .collect(),
            Err(failure) => {
                self.metrics
                    .dead_letters
                    .get_or_create(&vec![("trigger".into(), spec.name.clone())])
                    .inc();
                let mut headers = m.headers.clone();
                headers.extend(dead_letter_headers(spec, &m.topic, None, failure));
                let dl = spec.dead_letter_topic().map_err(|e| ExecError::Trigger {
                    trigger: spec.name.clone(),
                    why: e.0,
                })?;
                vec![Output {
                    topic: dl.to_string(),
                    headers,
                    payload: m.payload.clone(),
                }]
            }
        };
        for (n, out) in outputs.into_iter().enumerate() {
            crate::pubsub::publish_qos0(
                &self.dht,
                &self.qos0,
                Qos0Message {
                    topic: out.topic,
                    id: format!("{}/{}/{n}", spec.uid, m.id),
                    source: format!("canal://{}", self.functions.peer_id),
                    time_ms: now_ms(),
                    headers: out.headers,
                    payload: out.payload,
                },
            )
            .await;
        }
        if verdict.is_ok() && !inv.state.is_empty() {
            let fx = Effects {
                function: function.name.clone(),
                cursors: Vec::new(),
                state_version: None,
                state: inv.state.into_iter().collect(),
                outputs: Vec::new(),
                outbox: Vec::new(),
            };
            self.functions
                .consensus
                .write_op(
                    self.functions.consensus.route()?.function(&function.name),
                    Op::Effects(fx),
                )
                .await?;
        }
        Ok(())
    }
}

/// The entry op of output `n` of the event at `offset` of `topic`, which had `hops`.
#[allow(clippy::too_many_arguments)]
fn output_op(
    peer_id: &str,
    spec: &TriggerSpec,
    topic: &str,
    offset: u64,
    hops: u32,
    n: usize,
    out: Output,
    settings: &[(TopicFilter, TopicSettings)],
) -> PublishOp {
    // The host checked the topic; an unreadable one gets the defaults.
    let retention = Topic::new(&out.topic)
        .map(|t| settings_for(&t, settings).retention)
        .unwrap_or_default();
    let mut headers = out.headers;
    provenance(peer_id, spec, topic, Some(offset), hops, &mut headers);
    PublishOp {
        topic: out.topic,
        id: Some(rules::output_id(&spec.uid, topic, offset, n)),
        headers,
        payload: out.payload,
        retention,
    }
}

/// Adds to an output's `headers` where it came from (the trigger, the executing peer, the
/// input event) and sets its hop count to one more than its input's `hops` (the host refused
/// outputs past [`rules::MAX_HOPS`] already).
fn provenance(
    peer_id: &str,
    spec: &TriggerSpec,
    topic: &str,
    offset: Option<u64>,
    hops: u32,
    headers: &mut Vec<(String, String)>,
) {
    let source = match offset {
        Some(o) => format!("{topic}:{o}"),
        None => topic.to_string(),
    };
    headers.extend([
        ("canal-trigger".into(), spec.name.clone()),
        ("canal-executor".into(), peer_id.to_string()),
        ("canal-source".into(), source),
    ]);
    rules::set_hops(headers, rules::output_hops(hops).unwrap_or(rules::MAX_HOPS));
}

/// `text` cut to at most `max` bytes, at a character boundary, with `…` when cut.
fn cut(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut t = text[..end].to_string();
    t.push('…');
    t
}

/// Why an invocation's outputs are refused: one goes where the trigger's owner may not
/// publish (no owner: a trigger created without a token, unchecked).
fn denied(
    owner: Option<&canal_proto::function::TriggerOwner>,
    outputs: &[Output],
) -> Option<Failure> {
    let owner = owner?;
    outputs.iter().find_map(|o| match Topic::new(&o.topic) {
        Ok(t) if owner.may_publish(&t) => None,
        _ => Some(Failure::Denied(format!(
            "the trigger's owner {:?} may not publish to {:?}: no publish allow filter of its token matches it, or a deny filter does",
            owner.subject, o.topic
        ))),
    })
}

fn dead_letter_headers(
    spec: &TriggerSpec,
    topic: &str,
    offset: Option<u64>,
    failure: &Failure,
) -> Vec<(String, String)> {
    let mut h = vec![
        // A guest's error text is its own: kept to a size every entry can carry.
        (
            "canal-error".into(),
            cut(failure.to_string(), MAX_ERROR_HEADER_BYTES),
        ),
        ("canal-error-kind".into(), failure.kind().to_string()),
        ("canal-trigger".into(), spec.name.clone()),
        ("canal-function".into(), spec.function.clone()),
        ("canal-source-topic".into(), topic.to_string()),
        ("canal-attempts".into(), (spec.retries + 1).to_string()),
    ];
    if let Some(o) = offset {
        h.push(("canal-source-offset".into(), o.to_string()));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_consensus::Request;
    use canal_proto::function::{
        MAX_MAX_OUTPUT_BYTES, MAX_MAX_OUTPUTS, MAX_MAX_STATE_BYTES, output_cost,
    };
    use canal_proto::topic::MAX_TOPIC_BYTES;

    /// A small seeded generator: the same cases on every run.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % below.max(1)
        }
        fn text(&mut self, max: u64) -> String {
            // Multi-byte characters too: lengths are bytes.
            (0..self.next(max + 1))
                .map(|i| if i % 7 == 3 { 'é' } else { 'a' })
                .collect()
        }
    }

    fn trigger(name_len: usize, topic: &str) -> TriggerSpec {
        TriggerSpec {
            name: "t".repeat(name_len),
            uid: format!("{}-1764583000000000000-999999", "P".repeat(52)),
            filter: TopicFilter::new(topic).unwrap(),
            function: "f".repeat(64),
            out: None,
            qos: 1,
            retries: 3,
            dead_letter: None,
            created_ms: 0,
        }
    }

    #[test]
    fn the_largest_invocation_fits_one_entry_and_one_frame() {
        let worst = ENTRY_OVERHEAD_BYTES
            + invocation_bound(MAX_MAX_OUTPUTS, MAX_MAX_OUTPUT_BYTES, MAX_MAX_STATE_BYTES);
        assert!(worst <= MAX_EFFECTS_BYTES, "{worst}");
        assert!(MAX_EFFECTS_BYTES * 4 <= canal_dht::rpc::MAX_RPC_BYTES as u64);
        // The defaults leave room for several invocations per entry.
        let d = Limits::default();
        let one = invocation_bound(d.max_outputs, d.max_output_bytes, d.max_state_bytes);
        assert!(MAX_EFFECTS_BYTES / one >= 4, "{one}");
    }

    #[test]
    fn the_count_bounds_the_encoded_entry() {
        let mut g = Lcg(0x5eed_ca9a1);
        for case in 0..500 {
            let mut outputs = Vec::new();
            let mut budget = EntryBudget::default();
            for _ in 0..g.next(40) {
                let op = PublishOp {
                    topic: g.text(MAX_TOPIC_BYTES as u64),
                    id: (g.next(2) == 0).then(|| g.text(400)),
                    headers: (0..g.next(30))
                        .map(|_| {
                            let long = if g.next(4) == 0 { 4096 } else { 8 };
                            (g.text(128), g.text(long))
                        })
                        .collect(),
                    payload: vec![7; g.next(3000) as usize],
                    retention: canal_proto::settings::Retention {
                        max_events: u64::MAX,
                        max_bytes: u64::MAX,
                        max_age_ms: u64::MAX,
                        dedup_window_ms: u64::MAX,
                    },
                };
                budget.outputs += publish_cost(&op);
                outputs.push(op);
            }
            let state: BTreeMap<String, Option<Vec<u8>>> = (0..g.next(200))
                .map(|_| {
                    let v = (g.next(3) > 0).then(|| vec![1; g.next(300) as usize]);
                    (g.text(512), v)
                })
                .collect();
            budget.state = state_cost(&state);
            // A step of several topics: the first move is in the entry's overhead.
            let cursors: Vec<CursorMove> = (0..1 + g.next(8))
                .map(|_| CursorMove {
                    trigger_uid: g.text(200),
                    topic: "x".repeat(MAX_TOPIC_BYTES),
                    expected: Some(u64::MAX),
                    next: u64::MAX,
                })
                .collect();
            for c in &cursors[1..] {
                budget.outputs += cursor_move_cost(&c.trigger_uid, &c.topic);
            }
            let fx = Effects {
                function: "f".repeat(64),
                cursors,
                state_version: Some(u64::MAX),
                state: state.into_iter().collect(),
                outputs,
                outbox: Vec::new(),
            };
            let req = Request {
                id: Some(g.text(300)),
                op: Op::Effects(fx),
            };
            let encoded = canal_proto::wire::encode(&req).unwrap().len() as u64;
            assert!(
                encoded <= budget.used(),
                "case {case}: {encoded} bytes encoded, counted {}",
                budget.used()
            );
        }
    }

    #[test]
    fn what_the_executor_adds_to_an_output_is_bounded() {
        let topic = "x".repeat(MAX_TOPIC_BYTES);
        let spec = trigger(64, &topic);
        let peer = "P".repeat(64);
        for headers in [vec![], vec![("a".to_string(), "b".to_string())]] {
            let out = Output {
                topic: topic.clone(),
                headers: headers.clone(),
                payload: b"hello".to_vec(),
            };
            let guest = output_cost(&out.topic, &out.headers, &out.payload);
            let op = output_op(&peer, &spec, &topic, u64::MAX, 15, 999, out, &[]);
            assert!(
                publish_cost(&op) <= guest + OUTPUT_OVERHEAD_BYTES,
                "{} > {guest} + {OUTPUT_OVERHEAD_BYTES}",
                publish_cost(&op)
            );
            assert_eq!(rules::hops(&op.headers), 16);
        }
    }

    #[test]
    fn a_batch_stops_before_its_entry_could_pass_the_limit() {
        let worst = Limits {
            max_outputs: MAX_MAX_OUTPUTS,
            max_output_bytes: MAX_MAX_OUTPUT_BYTES,
            max_state_bytes: MAX_MAX_STATE_BYTES,
            ..Limits::default()
        };
        let need = EntryBudget::need(&worst, &[], b"event");
        let mut b = EntryBudget::default();
        let mut events = 0;
        // Each admitted event uses all it may; the entry never passes the limit.
        while b.admits(need) {
            b.outputs += need;
            events += 1;
            assert!(b.used() <= MAX_EFFECTS_BYTES, "{events}: {}", b.used());
        }
        assert!(events >= 1);
        // An empty batch takes any event, so a batch always makes progress.
        assert!(EntryBudget::default().admits(u64::MAX));
        // A failing event's dead letter counts with its payload and headers.
        let big = vec![0u8; 8 << 20];
        let h = vec![("k".to_string(), "v".repeat(100))];
        assert!(EntryBudget::need(&Limits::default(), &h, &big) > big.len() as u64 + 100);
        let half = EntryBudget {
            outputs: MAX_EFFECTS_BYTES / 2,
            state: 0,
        };
        assert!(!half.admits(MAX_EFFECTS_BYTES / 2));
        assert!(half.admits(MAX_EFFECTS_BYTES / 4));
    }

    #[test]
    fn a_long_error_is_cut_for_its_dead_letter() {
        let spec = trigger(5, "a/b");
        let long = Failure::Error("é".repeat(10_000));
        let h = dead_letter_headers(&spec, "a/b", Some(1), &long);
        let (_, error) = h.iter().find(|(k, _)| k == "canal-error").unwrap();
        assert!(error.len() <= MAX_ERROR_HEADER_BYTES && error.ends_with('…'));
        let short = Failure::Limit {
            limit: "hops",
            detail: "hops: 17".into(),
        };
        let h = dead_letter_headers(&spec, "a/b", None, &short);
        assert!(h.contains(&("canal-error-kind".to_string(), "limit".to_string())));
        assert!(
            h.iter()
                .any(|(k, v)| k == "canal-error" && v.ends_with("hops: 17"))
        );
    }

    /// A mesh of one peer, for the executor's QoS 0 outputs (the QoS 1 path does not use it).
    async fn lone_mesh() -> canal_dht::Dht {
        struct Plain;
        impl canal_dht::LocalRecord for Plain {
            fn measure(&mut self) -> canal_proto::Capabilities {
                canal_proto::Capabilities::default()
            }
        }
        let config = canal_dht::DhtConfig::new(
            libp2p::identity::Keypair::generate_ed25519(),
            vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        );
        canal_dht::Dht::start(config, Box::new(Plain), &mut Registry::default())
            .await
            .unwrap()
    }

    fn executor<T: Transport>(functions: Arc<Functions<T>>, dht: &canal_dht::Dht) -> Executor<T> {
        Executor {
            qos0: Qos0Hub::new(functions.live.qos0.clone()),
            functions,
            dht: dht.handle(),
            metrics: ExecMetrics::register(&mut Registry::default()),
            backlog: Default::default(),
            routes: Routes::default(),
        }
    }

    async fn publish<T: Transport>(f: &Functions<T>, topic: &str, payload: &str) {
        f.consensus
            .write_op(
                canal_consensus::Route::Single.topic(topic),
                Op::Publish(PublishOp {
                    topic: topic.to_string(),
                    id: None,
                    headers: vec![("k".into(), "v".into())],
                    payload: payload.as_bytes().to_vec(),
                    retention: canal_proto::settings::Retention::default(),
                }),
            )
            .await
            .unwrap();
    }

    fn payloads(sm: &StateMachine, topic: &str) -> Vec<String> {
        sm.events(topic, 0, 1000)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.payload).unwrap())
            .collect()
    }

    fn cursor(sm: &StateMachine, uid: &str, topic: &str) -> Option<u64> {
        sm.trigger_cursor(uid, topic).unwrap()
    }

    /// A one-node cluster with `up` (uppercase.wasm) deployed and QoS 1 trigger `shout` from
    /// `in/#` to `out/loud`; the functions service, the trigger and the data group's replica.
    async fn one_node_with_a_trigger() -> (
        crate::testkit::Cluster,
        Arc<Functions<canal_consensus::mem::MemTransport>>,
        TriggerSpec,
        StateMachine,
    ) {
        one_node_trigger("up", "uppercase", "shout", "in/#", "out/loud").await
    }

    /// A one-member cluster with guest `guest` deployed as `function` and QoS 1 trigger
    /// `name` from `on` to `out` (no retries), and the replica of the function's group.
    async fn one_node_trigger(
        function: &str,
        guest: &str,
        name: &str,
        on: &str,
        out: &str,
    ) -> (
        crate::testkit::Cluster,
        Arc<Functions<canal_consensus::mem::MemTransport>>,
        TriggerSpec,
        StateMachine,
    ) {
        use crate::testkit::{self, Cluster, FixedPeers};
        let cluster = Cluster::formed(1).await;
        let m = &cluster.members[0];
        let f = testkit::functions(m, FixedPeers::of(&[m.peer]));
        testkit::deploy(&f, function, guest).await;
        let spec = f
            .trigger_add(
                name,
                canal_proto::function::TriggerRequest {
                    on: on.into(),
                    function: function.into(),
                    out: Some(out.into()),
                    qos: Some(1),
                    retries: Some(0),
                    dead_letter: None,
                },
            )
            .await
            .unwrap();
        let sm = m
            .consensus
            .state_machine(canal_consensus::Route::Single.function(function))
            .unwrap();
        (cluster, f, spec, sm)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_qos1_trigger_runs_each_event_once_and_a_rerun_applies_nothing_twice() {
        use crate::testkit;
        let (cluster, f, spec, sm) = one_node_with_a_trigger().await;
        for i in 0..5 {
            publish(&f, "in/a", &format!("hello {i}")).await;
        }
        let dht = lone_mesh().await;
        let running = Arc::new(executor(f.clone(), &dht)).spawn();
        let want: Vec<String> = (0..5).map(|i| format!("HELLO {i}")).collect();
        testkit::until("five outputs", Duration::from_secs(20), || {
            payloads(&sm, "out/loud").len() >= 5
        })
        .await;
        // Each event once, in order; the cursor stands past the last event its outputs came
        // from.
        assert_eq!(payloads(&sm, "out/loud"), want);
        assert_eq!(cursor(&sm, &spec.uid, "in/a"), Some(5));
        assert!(running.triggers_running() == 1);
        // Events published while it runs are picked up too.
        publish(&f, "in/a", "hello 5").await;
        testkit::until("the sixth output", Duration::from_secs(20), || {
            payloads(&sm, "out/loud").len() >= 6
        })
        .await;
        let aborted = running.shutdown(Duration::from_secs(10)).await;
        assert!(aborted.is_empty(), "jobs aborted at shutdown: {aborted:?}");
        assert_eq!(cursor(&sm, &spec.uid, "in/a"), Some(6));

        // A crash between the commit and the executor hearing of it: the batch runs again
        // from where it started. Its effects are refused, as the cursor moved.
        let rerun = Effects {
            function: "up".into(),
            cursors: vec![CursorMove {
                trigger_uid: spec.uid.clone(),
                topic: "in/a".into(),
                expected: None,
                next: 5,
            }],
            state_version: Some(0),
            state: Vec::new(),
            outputs: vec![PublishOp {
                topic: "out/loud".into(),
                id: Some(rules::output_id(&spec.uid, "in/a", 0, 0)),
                headers: Vec::new(),
                payload: b"HELLO 0".to_vec(),
                retention: canal_proto::settings::Retention::default(),
            }],
            outbox: Vec::new(),
        };
        let r = f
            .consensus
            .write_op(
                canal_consensus::Route::Single.function("up"),
                Op::Effects(rerun),
            )
            .await
            .unwrap();
        assert!(
            r.refused.is_some(),
            "a re-run's effects were applied: {r:?}"
        );

        // A restarted executor on the same replica goes on from the cursor: nothing twice.
        publish(&f, "in/a", "hello 6").await;
        let again = Arc::new(executor(f.clone(), &dht)).spawn();
        testkit::until("the seventh output", Duration::from_secs(20), || {
            payloads(&sm, "out/loud").len() >= 7
        })
        .await;
        let aborted = again.shutdown(Duration::from_secs(10)).await;
        assert!(aborted.is_empty(), "{aborted:?}");
        let all: Vec<String> = (0..7).map(|i| format!("HELLO {i}")).collect();
        assert_eq!(payloads(&sm, "out/loud"), all);
        assert_eq!(cursor(&sm, &spec.uid, "in/a"), Some(7));
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_lets_a_batch_in_flight_commit() {
        use crate::testkit;
        let (cluster, f, spec, sm) = one_node_with_a_trigger().await;
        let dht = lone_mesh().await;
        let running = Arc::new(executor(f.clone(), &dht)).spawn();
        testkit::until("the trigger's job", Duration::from_secs(10), || {
            running.triggers_running() == 1
        })
        .await;
        for i in 0..40 {
            publish(&f, "in/b", &format!("e{i}")).await;
        }
        // Stop as soon as the first batch has started to produce: whatever was committed
        // is whole (cursor and outputs together), nothing is cut half-way.
        testkit::until("a batch to start", Duration::from_secs(20), || {
            f.live.running_invocations.load(Ordering::Relaxed) > 0
                || !payloads(&sm, "out/loud").is_empty()
        })
        .await;
        let aborted = running.shutdown(Duration::from_secs(10)).await;
        assert!(aborted.is_empty(), "{aborted:?}");
        let done = cursor(&sm, &spec.uid, "in/b").unwrap_or(0);
        assert_eq!(payloads(&sm, "out/loud").len() as u64, done);
        assert!(done >= 1, "the batch in flight was not committed");
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trigger_job_wakes_for_its_filters_topics_only() {
        let (cluster, f, spec, _sm) = one_node_with_a_trigger().await;
        let dht = lone_mesh().await;
        let exec = Arc::new(executor(f.clone(), &dht));
        let mut job = TriggerJob::new(exec, spec).unwrap();
        assert_eq!(job.next, Next::All, "a job starts with a full pass");
        job.next = Next::Wait;
        // Applied before the job waits, so their notices are queued: the ones on other
        // topics (and the trigger's own outputs' topic) pass it by, the one on `in/#` wakes it.
        for i in 0..20 {
            publish(&f, &format!("elsewhere/{i}"), "x").await;
        }
        publish(&f, "out/loud", "not an input").await;
        publish(&f, "in/a", "hello").await;
        job.wait().await;
        assert_eq!(job.next, Next::Topics(BTreeSet::from(["in/a".to_string()])));
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    /// One key counted across four topics by a stateful function: each step commits every
    /// topic's batch in one entry, the next step runs on the state the one before leaves,
    /// and a rival write of the state in the middle breaks the chain without any event
    /// counted twice or not at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipelined_stateful_trigger_counts_every_event_once_across_topics() {
        use crate::testkit;
        let (cluster, f, spec, sm) =
            one_node_trigger("count", "counter", "tally", "clicks/+", "tally/out").await;
        let group = canal_consensus::Route::Single.function("count");
        let dht = lone_mesh().await;
        let running = Arc::new(executor(f.clone(), &dht)).spawn();
        let click = |topic: String| PublishOp {
            topic,
            id: None,
            headers: vec![("key".into(), "k".into())],
            payload: b"click".to_vec(),
            retention: canal_proto::settings::Retention::default(),
        };
        // Four topics at once, many times: steps of several topics, chained.
        const ROUNDS: usize = 30;
        for round in 0..ROUNDS {
            let reqs = (0..4)
                .map(|t| canal_consensus::Request {
                    id: None,
                    op: Op::Publish(click(format!("clicks/t{t}"))),
                })
                .collect();
            f.consensus.write_op(group, Op::Batch(reqs)).await.unwrap();
            if round == ROUNDS / 2 {
                // Another writer of the function's state (as a QoS 0 trigger's run is): the
                // version moves under the chain.
                let rival = Effects {
                    function: "count".into(),
                    cursors: Vec::new(),
                    state_version: None,
                    state: vec![("count/k".into(), Some(b"1000".to_vec()))],
                    outputs: Vec::new(),
                    outbox: Vec::new(),
                };
                f.consensus
                    .write_op(group, Op::Effects(rival))
                    .await
                    .unwrap();
            }
        }
        let total = 4 * ROUNDS as u64;
        testkit::until("every click counted", Duration::from_secs(30), || {
            (0..4).all(|t| cursor(&sm, &spec.uid, &format!("clicks/t{t}")) == Some(ROUNDS as u64))
        })
        .await;
        let aborted = running.shutdown(Duration::from_secs(10)).await;
        assert!(aborted.is_empty(), "{aborted:?}");
        // One output per click, and no count twice: each output is the count after its own
        // event, over whatever state the rival left.
        let counts: Vec<u64> = payloads(&sm, "tally/out")
            .iter()
            .map(|p| p.strip_prefix("k ").unwrap().parse().unwrap())
            .collect();
        assert_eq!(counts.len() as u64, total, "{counts:?}");
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "a count repeated or went back: {counts:?}"
        );
        let stored: u64 = String::from_utf8(
            sm.record(&canal_consensus::keys::STATE, ("count", "count/k"))
                .unwrap()
                .unwrap(),
        )
        .unwrap()
        .parse()
        .unwrap();
        assert_eq!(stored, *counts.last().unwrap());
        // The rival's write landed between two of them, and every click after it counted on.
        assert!(counts.iter().any(|c| *c > 1000), "{counts:?}");
        let after = counts.iter().filter(|c| **c > 1000).count() as u64;
        assert_eq!(stored, 1000 + after, "{counts:?}");
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_steps_of_two_racing_executors_output_each_event_once_in_order() {
        use crate::testkit;
        let (cluster, f, spec, sm) =
            one_node_trigger("upper", "uppercase", "shout", "words/+", "shout/out").await;
        let group = canal_consensus::Route::Single.function("upper");
        let dht = lone_mesh().await;
        // Two executors of one trigger (as during a placement change): their stateless
        // steps overlap in flight, and they refuse each other's.
        let first = Arc::new(executor(f.clone(), &dht)).spawn();
        let second = Arc::new(executor(f.clone(), &dht)).spawn();
        const ROUNDS: usize = 40;
        for round in 0..ROUNDS {
            let reqs = (0..4)
                .map(|t| canal_consensus::Request {
                    id: None,
                    op: Op::Publish(PublishOp {
                        topic: format!("words/t{t}"),
                        id: None,
                        headers: Vec::new(),
                        payload: format!("t{t}-{round}").into_bytes(),
                        retention: canal_proto::settings::Retention::default(),
                    }),
                })
                .collect();
            f.consensus.write_op(group, Op::Batch(reqs)).await.unwrap();
        }
        testkit::until("every word shouted", Duration::from_secs(30), || {
            (0..4).all(|t| cursor(&sm, &spec.uid, &format!("words/t{t}")) == Some(ROUNDS as u64))
        })
        .await;
        for running in [first, second] {
            let aborted = running.shutdown(Duration::from_secs(10)).await;
            assert!(aborted.is_empty(), "{aborted:?}");
        }
        let out = payloads(&sm, "shout/out");
        assert_eq!(out.len(), 4 * ROUNDS, "{out:?}");
        for t in 0..4 {
            let rounds: Vec<usize> = out
                .iter()
                .filter_map(|p| p.strip_prefix(&format!("T{t}-")))
                .map(|r| r.parse().unwrap())
                .collect();
            assert_eq!(
                rounds,
                (0..ROUNDS).collect::<Vec<_>>(),
                "topic t{t}: {out:?}"
            );
        }
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos0_events_a_busy_executor_misses_are_counted() {
        let (cluster, f, _spec, _sm) = one_node_with_a_trigger().await;
        let dht = lone_mesh().await;
        let exec = Arc::new(executor(f.clone(), &dht));
        let (_tx, triggers) = watch::channel(Arc::new(Vec::<TriggerSpec>::new()));
        let mut job = Qos0Job {
            exec: exec.clone(),
            runs: Arc::new(tokio::sync::Semaphore::new(QOS0_RUNS)),
            rx: exec.qos0.subscribe(),
            triggers,
            next: None,
        };
        // More than the hub holds arrive before the job takes one.
        let extra = 10;
        for i in 0..canal_pubsub::qos0::QOS0_HUB_CAPACITY + extra {
            exec.qos0.deliver(Qos0Message {
                topic: "in/a".into(),
                id: format!("e{i}"),
                source: "test".into(),
                time_ms: 0,
                headers: Vec::new(),
                payload: Vec::new(),
            });
        }
        job.wait().await;
        assert_eq!(job.work().await, Flow::Continue);
        assert_eq!(exec.metrics.qos0_skipped.get(), extra as u64);
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    /// A trigger whose function commits in group A and whose output topic lives in group B
    /// (routes only this test sets; routing's answers are unchanged): the outputs wait in
    /// A's outbox and the relay delivers them to B. The first relays never trim (as if each
    /// crashed after every delivery) and are killed mid-stream; more events come while no
    /// relay runs; fresh relays re-send from the outbox and B applies every output once, in
    /// order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outputs_for_another_group_land_there_once_across_relay_restarts() {
        use crate::outbox::{OutboxMetrics, OutboxRelay};
        use crate::testkit::{self, Cluster, FixedPeers};
        let cluster = Cluster::formed(3).await;
        let a = canal_consensus::Route::Single.function("up");
        let b = GroupId(7);
        assert_ne!(a, b);
        cluster.add_group(b).await;

        let m = &cluster.members[0];
        let f = testkit::functions(m, FixedPeers::of(&[m.peer]));
        testkit::deploy(&f, "up", "uppercase").await;
        let spec = f
            .trigger_add(
                "shout",
                canal_proto::function::TriggerRequest {
                    on: "in/#".into(),
                    function: "up".into(),
                    out: Some("out/loud".into()),
                    qos: Some(1),
                    retries: Some(0),
                    dead_letter: None,
                },
            )
            .await
            .unwrap();
        let sm_a = m.consensus.state_machine(a).unwrap();
        let sm_b = m.consensus.state_machine(b).unwrap();
        let dht = lone_mesh().await;
        let mut exec = executor(f.clone(), &dht);
        exec.routes = Routes::with_outputs(move |t| t.starts_with("out/").then_some(b));
        let running = Arc::new(exec).spawn();
        let producer = canal_consensus::functions::producer_id(a, "up", b);
        let metrics = OutboxMetrics::default();
        let relays = |trims: bool| -> Vec<WorkerHandle> {
            cluster
                .members
                .iter()
                .map(|m| {
                    let r = OutboxRelay::new(m.consensus.clone(), metrics.clone());
                    canal_worker::spawn(if trims { r } else { r.without_trims() })
                })
                .collect()
        };
        let delivered = |sm: &StateMachine| sm.producer_seq(&producer).unwrap().unwrap_or(0);
        let outbox = |sm: &StateMachine| {
            sm.outbox_producers()
                .unwrap()
                .into_iter()
                .find(|(p, _)| p == &producer)
                .map(|(_, m)| m)
                .unwrap_or_default()
        };

        // The first wave, with relays that never trim; they are killed once some landed.
        let first = relays(false);
        for i in 0..20 {
            publish(&f, "in/a", &format!("hello {i}")).await;
        }
        testkit::until("a first delivery", Duration::from_secs(20), || {
            delivered(&sm_b) >= 1
        })
        .await;
        for r in first {
            r.shutdown(Duration::ZERO).await;
        }
        // The second wave while no relay runs: it waits in A's outbox.
        for i in 20..40 {
            publish(&f, "in/a", &format!("hello {i}")).await;
        }
        testkit::until("the trigger's commits", Duration::from_secs(20), || {
            cursor(&sm_a, &spec.uid, "in/a") == Some(40)
        })
        .await;
        let waiting = outbox(&sm_a);
        assert_eq!(waiting.next, 41, "each output got one sequence number");
        assert_eq!(waiting.first, 1, "nothing was trimmed");
        assert!(delivered(&sm_b) < 40);
        assert!(sm_a.topic_meta("out/loud").unwrap().is_none());

        // Fresh relays start from the outbox: what landed already is answered as a
        // duplicate, the rest lands once.
        let second = relays(true);
        testkit::until("every output in B", Duration::from_secs(30), || {
            payloads(&sm_b, "out/loud").len() >= 40 && outbox(&sm_a).is_empty()
        })
        .await;
        let want: Vec<String> = (0..40).map(|i| format!("HELLO {i}")).collect();
        assert_eq!(payloads(&sm_b, "out/loud"), want);
        assert_eq!(delivered(&sm_b), 40);
        assert!(sm_a.topic_meta("out/loud").unwrap().is_none());
        let label = vec![("group".to_string(), a.0.to_string())];
        let dups = metrics.duplicates.get_or_create(&label).get();
        let landed = metrics.delivered.get_or_create(&label).get();
        assert!(dups >= 1, "the fresh relays re-sent what had landed");
        // A relay killed before it heard its answer did not count what it delivered.
        assert!(landed <= 40, "{landed} applied for 40 outputs");
        assert!(landed + dups >= 40, "{landed} applied, {dups} duplicates");
        // Every replica of B holds the same.
        testkit::until("B's replicas", Duration::from_secs(20), || {
            cluster.members.iter().all(|m| {
                let sm = m.consensus.state_machine(b).unwrap();
                payloads(&sm, "out/loud").len() == 40
            })
        })
        .await;
        for m in &cluster.members {
            let sm = m.consensus.state_machine(b).unwrap();
            assert_eq!(payloads(&sm, "out/loud"), want);
        }
        for r in second {
            r.shutdown(Duration::from_secs(5)).await;
        }
        running.shutdown(Duration::from_secs(10)).await;
        dht.shutdown().await;
        cluster.shutdown().await;
    }

    /// A function's outbox at half its limit holds that function back, and no other (not
    /// even one whose name extends it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_full_outbox_holds_back_its_function_only() {
        let cluster = crate::testkit::Cluster::formed(1).await;
        let c = &cluster.members[0].consensus;
        let g = canal_consensus::Route::Single.function("up");
        let far = GroupId(7);
        let fill = |function: &str| {
            let producer = canal_consensus::functions::producer_id(g, function, far);
            Op::Effects(Effects {
                function: function.into(),
                cursors: Vec::new(),
                state_version: None,
                state: Vec::new(),
                outputs: Vec::new(),
                outbox: (0..MAX_OUTBOX_ENTRIES / 2)
                    .map(|_| Outbound {
                        producer: producer.clone(),
                        target: far,
                        event: PublishOp {
                            topic: "out/x".into(),
                            id: None,
                            headers: Vec::new(),
                            payload: Vec::new(),
                            retention: Default::default(),
                        },
                    })
                    .collect(),
            })
        };
        let sm = c.state_machine(g).unwrap();
        assert_eq!(outbox_backlog(&sm, g, "up").unwrap(), None);
        let r = c.write_op(g, fill("up:7")).await.unwrap();
        assert_eq!(r.refused, None);
        assert_eq!(outbox_backlog(&sm, g, "up").unwrap(), None);
        let r = c.write_op(g, fill("up")).await.unwrap();
        assert_eq!(r.refused, None);
        assert_eq!(
            outbox_backlog(&sm, g, "up").unwrap(),
            Some((
                canal_consensus::functions::producer_id(g, "up", far),
                MAX_OUTBOX_ENTRIES / 2
            ))
        );
        assert_eq!(outbox_backlog(&sm, g, "u").unwrap(), None);
        cluster.shutdown().await;
    }
}

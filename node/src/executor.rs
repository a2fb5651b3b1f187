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

use crate::functions::{Functions, STATE_GROUP};
use crate::pubsub::{Qos0Hub, Qos0Message};
use canal_consensus::functions::{CursorMove, Effects, cursor_key};
use canal_consensus::topics::PublishOp;
use canal_consensus::{GroupId, Op, StateMachine};
use canal_dht::DhtHandle;
use canal_proto::TopicFilter;
use canal_proto::function::{FunctionSpec, Limits, Output, TriggerSpec, state_write_cost};
use canal_proto::settings::{TopicSettings, settings_for};
use canal_proto::{Topic, wire};
use canal_triggers::runtime::EventIn;
use canal_triggers::{Failure, Invocation, Prepared, StateView, rules};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
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
}

impl ExecMetrics {
    /// Registers the metrics: `canal_fn_invocations{function,result}`,
    /// `canal_fn_invocation_seconds{function}`, `canal_trigger_commits{trigger}`,
    /// `canal_trigger_refused_commits{trigger}`, `canal_trigger_dead_letters{trigger}`,
    /// `canal_fn_limit_exceeded{function,limit}` (invocations stopped by a per-invocation
    /// limit, by its name) and `canal_trigger_entry_full{trigger}` (batches cut short to keep
    /// their entry under [`MAX_EFFECTS_BYTES`]).
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
        m
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

/// What the executor shares between its tasks.
pub struct Executor {
    /// The functions service.
    pub functions: Arc<Functions>,
    /// The mesh, for QoS 0 outputs.
    pub dht: DhtHandle,
    /// The node's QoS 0 hub.
    pub qos0: Qos0Hub,
    /// Metrics.
    pub metrics: ExecMetrics,
    /// Each QoS 1 trigger's events waiting here, by trigger uid.
    pub backlog: std::sync::Mutex<HashMap<String, u64>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn log_lines(function: &str, inv: &Invocation) {
    for l in &inv.logs {
        info!(target: "canal::fn", function, level = %l.level, "{}", l.message);
    }
}

impl Executor {
    /// Starts the supervisor; it stops when `closing` becomes true.
    pub fn spawn(self: Arc<Self>, closing: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.supervise(closing).await })
    }

    async fn supervise(self: Arc<Self>, mut closing: watch::Receiver<bool>) {
        let Ok(meta) = self.functions.consensus.state_machine(GroupId::METADATA) else {
            warn!("no metadata group: functions cannot run");
            return;
        };
        let mut applied = meta.watch_applied();
        let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let (qos0_tx, qos0_rx) = watch::channel(Arc::new(Vec::<TriggerSpec>::new()));
        let qos0_task = tokio::spawn(self.clone().qos0_loop(qos0_rx));
        loop {
            applied.borrow_and_update();
            match (self.functions.functions(), self.functions.triggers()) {
                (Ok(functions), Ok(triggers)) => {
                    // Compile what is new before its first event arrives.
                    for f in &functions {
                        if self.functions.runtime.get(&f.hash).is_none()
                            && let Err(e) = self.functions.module(f).await
                        {
                            debug!(function = %f.name, error = ?e, "module not ready yet");
                        }
                    }
                    tasks.retain(|uid, task| {
                        let keep = triggers.iter().any(|t| &t.uid == uid) && !task.is_finished();
                        if !keep {
                            task.abort();
                        }
                        keep
                    });
                    for t in triggers.iter().filter(|t| t.qos == 1) {
                        if !tasks.contains_key(&t.uid) {
                            let task = tokio::spawn(self.clone().run_trigger(t.clone()));
                            tasks.insert(t.uid.clone(), task);
                        }
                    }
                    let qos0: Vec<TriggerSpec> =
                        triggers.into_iter().filter(|t| t.qos == 0).collect();
                    // Advertise what the QoS 0 triggers executed here listen to, so
                    // publishers send those events here.
                    let here: Vec<String> = qos0
                        .iter()
                        .filter(|t| {
                            functions
                                .iter()
                                .any(|f| f.name == t.function && self.functions.runs_here(f))
                        })
                        .map(|t| t.filter.to_string())
                        .collect();
                    self.qos0.set_trigger_filters(here);
                    qos0_tx.send_replace(Arc::new(qos0));
                }
                (Err(e), _) | (_, Err(e)) => warn!(error = ?e, "cannot read functions"),
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = closing.wait_for(|c| *c) => break,
            }
        }
        for (_, t) in tasks {
            t.abort();
        }
        qos0_task.abort();
    }

    /// One QoS 1 trigger: batches from the committed log, while this node is its executor.
    async fn run_trigger(self: Arc<Self>, spec: TriggerSpec) {
        let Ok(sm) = self.functions.consensus.state_machine(STATE_GROUP) else {
            return;
        };
        let mut applied = sm.watch_applied();
        loop {
            applied.borrow_and_update();
            let progressed = match self.step(&sm, &spec).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(trigger = %spec.name, error = %e, "trigger step failed; trying again");
                    false
                }
            };
            if !progressed {
                // New events, or a change of leader (which the timeout notices).
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    }

    /// Processes the next batch of every matching topic; says whether anything was
    /// committed or refused (then the caller goes again at once).
    async fn step(&self, sm: &StateMachine, spec: &TriggerSpec) -> Result<bool, String> {
        let e = |e: crate::http::ApiError| format!("{e:?}");
        let Some(function) = self.functions.function(&spec.function).map_err(e)? else {
            return Ok(false);
        };
        if !self.functions.runs_here(&function) {
            return Ok(false);
        }
        let module = self.functions.module(&function).await.map_err(e)?;
        let dead_letter = spec.dead_letter_topic().map_err(|e| e.0)?;
        let settings =
            crate::pubsub::all_settings(&self.functions.consensus).map_err(|e| e.to_string())?;
        let mut progressed = false;
        let mut backlog = 0u64;
        for (topic, meta) in sm.topics().map_err(|e| e.to_string())? {
            let Ok(t) = Topic::new(&topic) else { continue };
            if !spec.filter.matches(&t) || t == dead_letter {
                continue;
            }
            let stored: Option<u64> = match sm
                .get(&cursor_key(&spec.uid, &topic))
                .map_err(|e| e.to_string())?
            {
                Some(b) => Some(wire::decode(&b).map_err(|e| e.to_string())?),
                None => None,
            };
            let created_at = match stored {
                Some(_) => 0,
                None => sm
                    .offset_at(&topic, spec.created_ms)
                    .map_err(|e| e.to_string())?,
            };
            let start = rules::start(stored, meta.first, meta.next, created_at);
            if let Some((from, to)) = start.skipped {
                warn!(trigger = %spec.name, %topic, from, to, "retention dropped events before the trigger ran them");
            }
            if start.offset >= meta.next {
                continue;
            }
            backlog += meta.next - start.offset;
            self.set_backlog(&spec.uid, backlog);
            let end = rules::batch_end(start.offset, meta.next, BATCH_EVENTS);
            let events = sm
                .events(&topic, start.offset, (end - start.offset) as usize)
                .map_err(|e| e.to_string())?;
            let version = self.functions.state_version(&function.name).map_err(e)?;
            let base: Arc<dyn StateView> =
                Arc::new(self.functions.state_view(&function.name).map_err(e)?);
            let mut changes = BTreeMap::new();
            let mut outputs = Vec::new();
            let mut budget = EntryBudget::default();
            let mut next = start.offset;
            for ev in events {
                if ev.offset >= end {
                    break;
                }
                if !budget.admits(EntryBudget::need(
                    &function.limits,
                    &ev.headers,
                    &ev.payload,
                )) {
                    // The rest goes in the next entry: this one must fit one RPC frame.
                    debug!(trigger = %spec.name, %topic, offset = ev.offset, used = budget.used(), limit = MAX_EFFECTS_BYTES, "the batch's entry is full");
                    self.metrics
                        .entry_full
                        .get_or_create(&vec![("trigger".into(), spec.name.clone())])
                        .inc();
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
                    .run_with_retries(spec, &function, &module, event, &base, &changes)
                    .await
                {
                    Ok(inv) => {
                        changes = inv.state;
                        budget.state = state_cost(&changes);
                        let hops = rules::hops(&ev.headers);
                        for (n, out) in inv.outputs.into_iter().enumerate() {
                            let op =
                                self.output_op(spec, &topic, ev.offset, hops, n, out, &settings);
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
                            topic: dead_letter.to_string(),
                            id: Some(rules::output_id(&spec.uid, &topic, ev.offset, 0)),
                            headers,
                            payload: ev.payload,
                            retention: settings_for(&dead_letter, &settings).retention,
                        };
                        budget.outputs += publish_cost(&op);
                        outputs.push(op);
                    }
                }
                next = ev.offset + 1;
                if budget.outputs >= BATCH_BYTES {
                    break;
                }
            }
            if next == start.offset {
                continue;
            }
            let fx = Effects {
                function: function.name.clone(),
                cursor: Some(CursorMove {
                    trigger_uid: spec.uid.clone(),
                    topic: topic.clone(),
                    expected: stored,
                    next,
                }),
                state_version: Some(version),
                state: changes.into_iter().collect(),
                outputs,
            };
            let r = self
                .functions
                .consensus
                .write_op(STATE_GROUP, Op::Effects(fx))
                .await
                .map_err(|e| e.to_string())?;
            // The next batch starts from this replica's cursor: wait until it has applied
            // this entry, or an executor away from the leader would re-run the batch it just
            // committed (and be refused) until its replica caught up.
            let mut applied = sm.watch_applied();
            // Bounded: a replica that hears of the commit late costs one refused re-run, not
            // a stall.
            if tokio::time::timeout(APPLY_WAIT, applied.wait_for(|i| *i >= r.index))
                .await
                .is_err()
            {
                debug!(trigger = %spec.name, index = r.index, "this replica has not applied the trigger's commit yet");
            }
            let label = vec![("trigger".into(), spec.name.clone())];
            match r.refused {
                None => {
                    self.metrics.commits.get_or_create(&label).inc();
                }
                Some(why) => {
                    debug!(trigger = %spec.name, %topic, %why, "commit refused; reading again");
                    self.metrics.refused.get_or_create(&label).inc();
                }
            };
            progressed = true;
        }
        if !progressed {
            self.set_backlog(&spec.uid, 0);
        }
        Ok(progressed)
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

    /// QoS 0 triggers: each event that passes this node's hub, run once if this node
    /// executes the function; outputs go out at QoS 0, state changes are committed after.
    async fn qos0_loop(self: Arc<Self>, triggers: watch::Receiver<Arc<Vec<TriggerSpec>>>) {
        let mut rx = self.qos0.subscribe();
        loop {
            let m = match rx.recv().await {
                Ok(m) => m,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(
                        dropped = n,
                        "QoS 0 triggers fell behind; events skipped (at most once)"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let list = triggers.borrow().clone();
            if list.is_empty() {
                continue;
            }
            let Ok(topic) = Topic::new(&m.topic) else {
                continue;
            };
            for spec in rules::matching(&list, &topic, 0) {
                let this = self.clone();
                let spec = spec.clone();
                let m = m.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.run_qos0(&spec, &m).await {
                        debug!(trigger = %spec.name, error = %e, "QoS 0 trigger did not run");
                    }
                });
            }
        }
    }

    async fn run_qos0(&self, spec: &TriggerSpec, m: &Qos0Message) -> Result<(), String> {
        let e = |e: crate::http::ApiError| format!("{e:?}");
        let Some(function) = self.functions.function(&spec.function).map_err(e)? else {
            return Ok(());
        };
        if !self.functions.runs_here(&function) {
            return Ok(());
        }
        let module = self.functions.module(&function).await.map_err(e)?;
        let base: Arc<dyn StateView> =
            Arc::new(self.functions.state_view(&function.name).map_err(e)?);
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
        let outputs: Vec<Output> = match &inv.result {
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
                let dl = spec.dead_letter_topic().map_err(|e| e.0)?;
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
            );
        }
        if inv.result.is_ok() && !inv.state.is_empty() {
            let fx = Effects {
                function: function.name.clone(),
                cursor: None,
                state_version: None,
                state: inv.state.into_iter().collect(),
                outputs: Vec::new(),
            };
            self.functions
                .consensus
                .write_op(STATE_GROUP, Op::Effects(fx))
                .await
                .map_err(|e| e.to_string())?;
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
            let fx = Effects {
                function: "f".repeat(64),
                cursor: Some(CursorMove {
                    trigger_uid: g.text(200),
                    topic: "x".repeat(MAX_TOPIC_BYTES),
                    expected: Some(u64::MAX),
                    next: u64::MAX,
                }),
                state_version: Some(u64::MAX),
                state: state.into_iter().collect(),
                outputs,
            };
            let req = Request {
                id: Some(g.text(300)),
                op: Op::Effects(fx),
            };
            let encoded = wire::encode(&req).unwrap().len() as u64;
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
}

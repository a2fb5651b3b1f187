//! Functions and triggers over the client API: deploy, list, remove, invoke, state; and the
//! [`Functions`] service the executor shares with the handlers.
//!
//! A deploy is validated and compiled on the node that takes it before anything is stored:
//! a module that is not a component, does not compile, imports what canal does not provide
//! or lacks the `handle` export is refused with the reason and nothing is registered. The
//! module is then stored by content hash in the metadata group, and the function's spec
//! under its name; every node reads both from its replica and compiles (or loads from its
//! artifact cache) before the function's first event.

use crate::cluster::MeshTransport;
use crate::http::{ApiError, ApiState};
use axum::http::{HeaderMap, StatusCode};
use canal_consensus::functions::{
    FUNCTION_PREFIX, TRIGGER_PREFIX, function_key, module_key, state_key, state_prefix,
    trigger_key, version_key,
};
use canal_consensus::{Consensus, GroupId, Op, Request, StateMachine};
use canal_proto::function::{
    Deployed, FunctionSpec, InvokeResult, Limits, MAX_MODULE_BYTES, Requirements, TriggerRequest,
    TriggerSpec, check_function_name, check_trigger_name,
};
use canal_proto::{Topic, TopicFilter, wire};
use canal_triggers::runtime::{EventIn, module_hash};
use canal_triggers::{DeployError, Invocation, Prepared, Runtime, StateView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The data group that holds trigger cursors and function state (with the topic logs).
pub const STATE_GROUP: GroupId = GroupId(1);

/// The functions side of a node: the WebAssembly runtime and what reads the stored specs.
pub struct Functions {
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// The Raft groups.
    pub consensus: Consensus<MeshTransport>,
    /// This node's peer id, base58: the executor header of what it runs.
    pub peer_id: String,
    /// Bounds the invocations in flight to the instance pool's size.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// This node's execution-time estimates per function, which placement reads.
    pub estimates: std::sync::Mutex<canal_placement::Estimates>,
    /// The load counters this node advertises.
    pub live: Arc<crate::caps::LoadCounters>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

impl Functions {
    fn metadata(&self) -> Result<StateMachine, ApiError> {
        Ok(self.consensus.state_machine(GroupId::METADATA)?)
    }

    /// Every function, from this node's replica of the metadata group.
    pub fn functions(&self) -> Result<Vec<FunctionSpec>, ApiError> {
        decode_all(&self.metadata()?, FUNCTION_PREFIX)
    }

    /// Every trigger, from this node's replica of the metadata group.
    pub fn triggers(&self) -> Result<Vec<TriggerSpec>, ApiError> {
        decode_all(&self.metadata()?, TRIGGER_PREFIX)
    }

    /// One function, from this node's replica.
    pub fn function(&self, name: &str) -> Result<Option<FunctionSpec>, ApiError> {
        match self
            .metadata()?
            .get(&function_key(name))
            .map_err(internal)?
        {
            Some(b) => Ok(Some(wire::decode(&b).map_err(internal)?)),
            None => Ok(None),
        }
    }

    /// One function, read through the leader: sees every write acknowledged before.
    pub async fn function_now(&self, name: &str) -> Result<Option<FunctionSpec>, ApiError> {
        match self
            .consensus
            .read(GroupId::METADATA, &function_key(name), true)
            .await?
        {
            Some(b) => Ok(Some(wire::decode(&b).map_err(internal)?)),
            None => Ok(None),
        }
    }

    /// The function's module, ready to run: prepared already, or read from the replica by
    /// hash and prepared now (compiled, or loaded from the artifact cache).
    pub async fn module(&self, spec: &FunctionSpec) -> Result<Arc<Prepared>, ApiError> {
        if let Some(p) = self.runtime.get(&spec.hash) {
            return Ok(p);
        }
        let bytes = self
            .metadata()?
            .get(&module_key(&spec.hash))
            .map_err(internal)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "module_missing",
                    format!(
                        "this node has not received module {} of {} yet: it is replicated with the metadata group",
                        spec.hash, spec.name
                    ),
                )
            })?;
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.prepare(&bytes))
            .await
            .map_err(internal)?
            .map_err(|e| ApiError::bad_request("invalid_module", e.to_string()))
    }

    /// A view of `function`'s state on this node's replica.
    pub fn state_view(&self, function: &str) -> Result<ReplicaState, ApiError> {
        Ok(ReplicaState {
            sm: self.consensus.state_machine(STATE_GROUP)?,
            function: function.to_string(),
        })
    }

    /// The function's state version on this node's replica.
    pub fn state_version(&self, function: &str) -> Result<u64, ApiError> {
        let sm = self.consensus.state_machine(STATE_GROUP)?;
        match sm.get(&version_key(function)).map_err(internal)? {
            Some(b) => wire::decode(&b).map_err(internal),
            None => Ok(0),
        }
    }

    /// Whether this node runs `function` now: the first peer of its committed placement. A
    /// function without a placement yet (deploy commits the first one), or one placement
    /// found no peer for, runs nowhere: its QoS 1 events wait in the log.
    pub fn runs_here(&self, function: &FunctionSpec) -> bool {
        crate::placer::placed(self, &function.name)
            .is_some_and(|p| p.decision.chosen.first() == Some(&self.peer_id))
    }

    /// Runs one invocation on the blocking pool in one of the node's instance slots; see
    /// [`run_in_slot`].
    pub async fn run(
        &self,
        module: Arc<Prepared>,
        event: EventIn,
        state: Arc<dyn StateView>,
        changes: BTreeMap<String, Option<Vec<u8>>>,
        out: Option<Topic>,
        limits: Limits,
    ) -> Result<Invocation, String> {
        let rt = self.runtime.clone();
        run_in_slot(self.slots.clone(), self.live.clone(), move || {
            rt.invoke(&module, event, state, changes, out, &limits)
        })
        .await
    }

    /// Feeds one invocation's time into this node's estimates.
    pub fn observe(&self, function: &str, elapsed: std::time::Duration) {
        self.estimates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(function, &self.peer_id, elapsed.as_secs_f64() * 1000.0);
    }
}

/// Counts one running invocation in the node's load for as long as it lives.
struct Running(Arc<crate::caps::LoadCounters>);

impl Running {
    fn start(live: Arc<crate::caps::LoadCounters>) -> Running {
        live.running_invocations.fetch_add(1, Ordering::Relaxed);
        Running(live)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running_invocations.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs blocking `work` on the blocking pool once it has one of `slots`, counted in `live`'s
/// running invocations. The spawned task owns the permit and the count, so both last exactly
/// as long as the work, even when whoever awaits the answer goes away (an HTTP client that
/// disconnects, an aborted trigger task): the pool's size is never overrun by instances
/// still running for nobody. Waiting for a slot is cancelled with the caller; the work is
/// not. The error says why the task did not return.
pub async fn run_in_slot<T: Send + 'static>(
    slots: Arc<tokio::sync::Semaphore>,
    live: Arc<crate::caps::LoadCounters>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let permit = slots
        .acquire_owned()
        .await
        .map_err(|e| format!("no instance slot: {e}"))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = Running::start(live);
        work()
    })
    .await
    .map_err(|e| format!("the invocation task failed: {e}"))
}

fn decode_all<T: serde::de::DeserializeOwned>(
    sm: &StateMachine,
    prefix: &str,
) -> Result<Vec<T>, ApiError> {
    sm.scan(prefix)
        .map_err(internal)?
        .into_iter()
        .map(|(_, v)| wire::decode(&v).map_err(internal))
        .collect()
}

/// A function's state as this node's replica of the data group holds it.
pub struct ReplicaState {
    sm: StateMachine,
    function: String,
}

impl StateView for ReplicaState {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.sm
            .get(&state_key(&self.function, key))
            .map_err(|e| e.to_string())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        let full = state_prefix(&self.function);
        Ok(self
            .sm
            .scan(&format!("{full}{prefix}"))
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&full).map(str::to_string))
            .take(limit)
            .collect())
    }
}

fn bad(kind: &'static str) -> impl Fn(canal_proto::function::SpecError) -> ApiError {
    move |e| ApiError::bad_request(kind, e.0)
}

/// Reads limits and requirements from the deploy's query.
fn deploy_settings(
    q: &HashMap<String, String>,
) -> Result<(Limits, Requirements, canal_placement::Policy), ApiError> {
    const KNOWN: [&str; 12] = [
        "memory",
        "timeout",
        "fuel",
        "max-outputs",
        "max-output-bytes",
        "max-state-bytes",
        "gpu",
        "tier",
        "labels",
        "replicas",
        "hard",
        "policy",
    ];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_setting",
            format!("{k:?} is not a deploy setting: use {}", KNOWN.join(", ")),
        ));
    }
    let mut limits = Limits::default();
    if let Some(m) = q.get("memory") {
        limits.memory_bytes = canal_proto::size::parse_bytes(m)
            .map_err(|e| ApiError::bad_request("invalid_limits", format!("memory: {e}")))?;
    }
    if let Some(t) = q.get("timeout") {
        let d = humantime::parse_duration(t).map_err(|e| {
            ApiError::bad_request(
                "invalid_limits",
                format!("timeout {t:?} is not a duration ({e}): write 500ms, 2s or 1m"),
            )
        })?;
        limits.timeout_ms = d.as_millis().min(u64::MAX as u128) as u64;
    }
    if let Some(f) = q.get("fuel") {
        limits.fuel = Some(f.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_limits",
                format!("fuel {f:?} is not a whole number of instructions"),
            )
        })?);
    }
    if let Some(n) = q.get("max-outputs") {
        limits.max_outputs = n.trim().parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_limits",
                format!(
                    "max-outputs {n:?} is not a whole number: use 0 to {}",
                    canal_proto::function::MAX_MAX_OUTPUTS
                ),
            )
        })?;
    }
    for (key, field) in [
        ("max-output-bytes", &mut limits.max_output_bytes),
        ("max-state-bytes", &mut limits.max_state_bytes),
    ] {
        if let Some(v) = q.get(key) {
            *field = canal_proto::size::parse_bytes(v)
                .map_err(|e| ApiError::bad_request("invalid_limits", format!("{key}: {e}")))?;
        }
    }
    limits.validate().map_err(bad("invalid_limits"))?;
    let mut req = Requirements {
        replicas: 1,
        hard: true,
        ..Requirements::default()
    };
    match q.get("gpu").map(String::as_str) {
        None | Some("false") => {}
        Some("true") | Some("") => req.gpu = true,
        Some(mem) => {
            req.gpu = true;
            req.gpu_memory_bytes =
                Some(canal_proto::size::parse_bytes(mem).map_err(|e| {
                    ApiError::bad_request("invalid_requirements", format!("gpu: {e}"))
                })?);
        }
    }
    if let Some(t) = q.get("tier") {
        req.tier = Some(t.clone());
    }
    if let Some(labels) = q.get("labels").filter(|l| !l.is_empty()) {
        for pair in labels.split(',') {
            let (k, v) = crate::config::parse_label(pair)
                .map_err(|e| ApiError::bad_request("invalid_requirements", e))?;
            req.labels.insert(k, v);
        }
    }
    if let Some(r) = q.get("replicas") {
        req.replicas = r
            .parse()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_requirements",
                    format!("replicas {r:?} is not allowed: use 1 to 16"),
                )
            })?;
    }
    match q.get("hard").map(String::as_str) {
        None | Some("true") => {}
        Some("false") => req.hard = false,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_requirements",
                format!("hard={other:?}: use true (fail if unmet) or false (prefer)"),
            ));
        }
    }
    let policy = match q.get("policy") {
        None => canal_placement::Policy::default(),
        Some(p) => p.parse().map_err(|e: canal_placement::PolicyError| {
            ApiError::bad_request("invalid_policy", e.to_string())
        })?,
    };
    Ok((limits, req, policy))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `PUT /v1/functions/{name}`: body = the component.
pub async fn deploy(
    st: &ApiState,
    name: &str,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Result<(StatusCode, Deployed), ApiError> {
    check_function_name(name).map_err(bad("invalid_name"))?;
    let (limits, requirements, policy) = deploy_settings(q)?;
    if body.len() > MAX_MODULE_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the module is {} bytes: at most {MAX_MODULE_BYTES} are allowed",
                body.len()
            ),
        ));
    }
    let started = Instant::now();
    let rt = st.functions.runtime.clone();
    let bytes = body.to_vec();
    let prepared = tokio::task::spawn_blocking(move || rt.prepare(&bytes))
        .await
        .map_err(internal)?
        .map_err(|e: DeployError| ApiError::bad_request("invalid_module", e.to_string()))?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    debug_assert_eq!(prepared.hash, module_hash(body));
    // The module first, so a spec never names a module the cluster does not have; the
    // request id makes storing the same module twice one write.
    st.consensus
        .write(
            GroupId::METADATA,
            Request {
                id: Some(format!("module/{}", prepared.hash)),
                op: Op::Internal {
                    key: canal_consensus::InternalKey::Module(prepared.hash.clone()),
                    value: Some(body.to_vec()),
                },
            },
        )
        .await?;
    let spec = FunctionSpec {
        name: name.to_string(),
        hash: prepared.hash.clone(),
        size: body.len() as u64,
        limits,
        requirements,
        policy: policy.to_string(),
        deployed_ms: now_ms(),
    };
    let r = st
        .consensus
        .write(
            GroupId::METADATA,
            Request {
                id: Some(crate::http::fresh_id(st)),
                op: Op::Internal {
                    key: canal_consensus::InternalKey::Function(name.to_string()),
                    value: Some(wire::encode(&spec).map_err(internal)?),
                },
            },
        )
        .await?;
    // The first placement at once, so the function's first events need not wait for the
    // placement job's next round (which refines it from the data group's leader).
    crate::placer::commit(
        &st.functions,
        &spec,
        crate::placer::decide_now(&st.functions, &st.dht, &spec),
    )
    .await?;
    let replaced = r
        .previous
        .and_then(|b| wire::decode::<FunctionSpec>(&b).ok())
        .map(|old| old.hash);
    let status = if replaced.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Deployed {
            function: spec,
            replaced,
            compile_ms,
        },
    ))
}

/// `DELETE /v1/functions/{name}`: refused while a trigger runs it.
pub async fn remove(st: &ApiState, name: &str) -> Result<(), ApiError> {
    check_function_name(name).map_err(bad("invalid_name"))?;
    if st.functions.function_now(name).await?.is_none() {
        return Err(ApiError::not_found(format!("no function named {name}")));
    }
    let users: Vec<String> = st
        .functions
        .triggers()?
        .into_iter()
        .filter(|t| t.function == name)
        .map(|t| t.name)
        .collect();
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "function {name} is run by trigger(s) {}: remove them first with `canal trigger rm`",
                users.join(", ")
            ),
        ));
    }
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Function(name.to_string()),
                value: None,
            },
        )
        .await?;
    // Its placement goes with it (its module stays: another function may share it).
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Placement(name.to_string()),
                value: None,
            },
        )
        .await?;
    Ok(())
}

/// `POST /v1/functions/{name}/invoke`: runs the function once on this node with the body as
/// the payload and reports what it did. Nothing is committed.
pub async fn invoke(
    st: &ApiState,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<InvokeResult, ApiError> {
    check_function_name(name).map_err(bad("invalid_name"))?;
    let spec = st
        .functions
        .function_now(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    let topic = match headers.get("canal-topic") {
        Some(v) => Topic::new(v.to_str().unwrap_or("\u{0}"))
            .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?,
        None => Topic::new(&format!("invoke/{name}")).map_err(internal)?,
    };
    let custom = crate::http::parse::custom_headers(headers)?;
    let module = st.functions.module(&spec).await?;
    let state: Arc<dyn StateView> = Arc::new(st.functions.state_view(name)?);
    let out = Topic::new(&format!("invoke/{name}/out")).map_err(internal)?;
    let event = EventIn {
        topic: topic.to_string(),
        id: crate::http::fresh_id(st),
        offset: None,
        time_ms: now_ms(),
        headers: custom,
        payload: body.to_vec(),
    };
    // The run owns its slot: a client that goes away does not free it while the guest runs.
    let r = st
        .functions
        .run(
            module,
            event,
            state,
            BTreeMap::new(),
            Some(out),
            spec.limits,
        )
        .await
        .map_err(internal)?;
    Ok(InvokeResult {
        function: name.to_string(),
        executor: st.functions.peer_id.clone(),
        result: r.result.map_err(|e| e.to_string()),
        outputs: r.outputs,
        state: r
            .state
            .into_iter()
            .map(|(k, v)| (k, v.map(|b| String::from_utf8_lossy(&b).into_owned())))
            .collect(),
        logs: r.logs,
        micros: r.elapsed.as_micros() as u64,
    })
}

/// `GET /v1/functions/{name}/state/{key}`: one value, read linearizably unless
/// `?read=local`.
pub async fn state_get(
    st: &ApiState,
    name: &str,
    key: &str,
    local: bool,
) -> Result<Option<Vec<u8>>, ApiError> {
    check_function_name(name).map_err(bad("invalid_name"))?;
    Ok(st
        .consensus
        .read(STATE_GROUP, &state_key(name, key), !local)
        .await?)
}

/// One entry of a function's state, as `GET /v1/functions/{name}/state` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateEntry {
    /// The key.
    pub key: String,
    /// The value, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// What `GET /v1/functions/{name}/state` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateList {
    /// The entries, in key order.
    pub entries: Vec<StateEntry>,
}

/// `GET /v1/functions/{name}/state?prefix=P`: the function's state on this node's replica.
pub fn state_list(st: &ApiState, name: &str, prefix: &str) -> Result<StateList, ApiError> {
    use base64::Engine;
    check_function_name(name).map_err(bad("invalid_name"))?;
    let view = st.functions.state_view(name)?;
    let mut entries = Vec::new();
    for key in view.keys(prefix, 10_000).map_err(internal)? {
        let v = view.get(&key).map_err(internal)?.unwrap_or_default();
        let (value, value_base64) = match String::from_utf8(v) {
            Ok(s) => (Some(s), None),
            Err(e) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
            ),
        };
        entries.push(StateEntry {
            key,
            value,
            value_base64,
        });
    }
    Ok(StateList { entries })
}

/// `PUT /v1/triggers/{name}`: body = [`TriggerRequest`].
pub async fn trigger_add(
    st: &ApiState,
    name: &str,
    req: TriggerRequest,
) -> Result<TriggerSpec, ApiError> {
    check_trigger_name(name).map_err(bad("invalid_name"))?;
    let filter = TopicFilter::new(&req.on)
        .map_err(|e| ApiError::bad_request("invalid_filter", e.to_string()))?;
    let topic = |what: &str, t: &Option<String>| -> Result<Option<Topic>, ApiError> {
        t.as_deref()
            .map(|t| {
                Topic::new(t)
                    .map_err(|e| ApiError::bad_request("invalid_topic", format!("{what}: {e}")))
            })
            .transpose()
    };
    let spec = TriggerSpec {
        name: name.to_string(),
        uid: crate::http::fresh_id(st),
        filter,
        function: req.function.clone(),
        out: topic("output topic", &req.out)?,
        qos: req.qos.unwrap_or(1),
        retries: req
            .retries
            .unwrap_or(canal_proto::function::DEFAULT_RETRIES),
        dead_letter: topic("dead-letter topic", &req.dead_letter)?,
        created_ms: now_ms(),
    };
    spec.validate().map_err(bad("invalid_trigger"))?;
    if st.functions.function_now(&spec.function).await?.is_none() {
        return Err(ApiError::bad_request(
            "unknown_function",
            format!(
                "no function named {}: deploy it first with `canal fn deploy`",
                spec.function
            ),
        ));
    }
    if st
        .consensus
        .read(GroupId::METADATA, &trigger_key(name), true)
        .await?
        .is_some()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("trigger {name} exists: remove it first with `canal trigger rm {name}`"),
        ));
    }
    st.consensus
        .write(
            GroupId::METADATA,
            Request {
                id: Some(format!("trigger/{}", spec.uid)),
                op: Op::Internal {
                    key: canal_consensus::InternalKey::Trigger(name.to_string()),
                    value: Some(wire::encode(&spec).map_err(internal)?),
                },
            },
        )
        .await?;
    Ok(spec)
}

/// `DELETE /v1/triggers/{name}`.
pub async fn trigger_remove(st: &ApiState, name: &str) -> Result<(), ApiError> {
    check_trigger_name(name).map_err(bad("invalid_name"))?;
    if st
        .consensus
        .read(GroupId::METADATA, &trigger_key(name), true)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!("no trigger named {name}")));
    }
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Trigger(name.to_string()),
                value: None,
            },
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_keeps_its_slot_when_its_caller_goes_away() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let live = Arc::new(crate::caps::LoadCounters::default());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn(run_in_slot(slots.clone(), live.clone(), move || {
            let _ = started_tx.send(());
            // Stands for a guest that runs on after the HTTP client disconnected.
            let _ = wait.recv();
        }));
        started.await.unwrap();
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The caller is gone, the work is not: its slot and its count stay taken.
        assert_eq!(slots.available_permits(), 0);
        assert_eq!(live.running_invocations.load(Ordering::Relaxed), 1);
        let mut second = tokio::spawn(run_in_slot(slots.clone(), live.clone(), || 7));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), &mut second).await;
        assert!(waited.is_err(), "a second run started in a taken slot");
        release.send(()).unwrap();
        assert_eq!(second.await.unwrap(), Ok(7));
        // The first run gave its slot back before the second could take it, and the second
        // gave it back before it answered.
        assert_eq!(slots.available_permits(), 1);
        assert_eq!(live.running_invocations.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn deploy_settings_are_read_and_checked() {
        let (l, r, p) = deploy_settings(&q(&[
            ("memory", "32MiB"),
            ("timeout", "250ms"),
            ("fuel", "1000000"),
            ("max-outputs", "10"),
            ("max-output-bytes", "64KiB"),
            ("max-state-bytes", "0"),
            ("gpu", "16GiB"),
            ("tier", "edge"),
            ("labels", "zone=eu,rack=2"),
            ("replicas", "2"),
            ("hard", "false"),
            ("policy", "latency"),
        ]))
        .unwrap();
        assert_eq!(p, canal_placement::Policy::Latency);
        assert_eq!(l.memory_bytes, 32 << 20);
        assert_eq!(l.timeout_ms, 250);
        assert_eq!(l.fuel, Some(1_000_000));
        assert_eq!(
            (l.max_outputs, l.max_output_bytes, l.max_state_bytes),
            (10, 64 << 10, 0)
        );
        let (d, _, _) = deploy_settings(&q(&[])).unwrap();
        assert_eq!(d, Limits::default());
        assert!(r.gpu && r.gpu_memory_bytes == Some(16 << 30));
        assert_eq!(r.tier.as_deref(), Some("edge"));
        assert_eq!(r.labels.len(), 2);
        assert_eq!(r.replicas, 2);
        assert!(!r.hard);
        for bad in [
            q(&[("memory", "lots")]),
            q(&[("memory", "10GiB")]),
            q(&[("timeout", "soon")]),
            q(&[("fuel", "-1")]),
            q(&[("max-outputs", "1001")]),
            q(&[("max-outputs", "many")]),
            q(&[("max-output-bytes", "5MiB")]),
            q(&[("max-state-bytes", "lots")]),
            q(&[("replicas", "0")]),
            q(&[("labels", "novalue")]),
            q(&[("colour", "red")]),
            q(&[("policy", "fastest")]),
        ] {
            assert!(deploy_settings(&bad).is_err(), "{bad:?}");
        }
    }
}

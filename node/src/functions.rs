//! The functions service: deploy, list, remove and invoke functions; triggers; function
//! state. The client API ([`crate::http`]) and the executor share it; it knows nothing of HTTP
//! and answers [`FunctionsError`].
//!
//! A deploy is validated and compiled on the node that takes it before anything is stored:
//! a module that is not a component, does not compile, imports what canal does not provide
//! or lacks the `handle` export is refused with the reason and nothing is registered. The
//! module is then stored by content hash in the metadata group, and the function's spec
//! under its name; every node reads both from its replica and compiles (or loads from its
//! artifact cache) before the function's first event.

use crate::placement::{PeerSource, PlacementError};
use canal_consensus::keys;
use canal_consensus::{ClientError, Consensus, GroupId, Op, Request, StateMachine, Transport};
use canal_proto::api::{StateEntry, StateList};
use canal_proto::function::{
    Deployed, FunctionSpec, InvokeResult, Limits, MAX_MODULE_BYTES, Requirements, TriggerRequest,
    TriggerSpec, check_function_name, check_trigger_name,
};
use canal_proto::time::now_ms;
use canal_proto::{Topic, TopicFilter, wire};
use canal_triggers::runtime::{EventIn, module_hash};
use canal_triggers::{DeployError, Invocation, Prepared, Runtime, StateView};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Why the functions service refused or failed a request. Each variant's text names what was
/// wrong and what is allowed; [`crate::http::error`] gives each its status and `kind`.
#[derive(Debug, thiserror::Error)]
pub enum FunctionsError {
    /// A function or trigger name that is not allowed.
    #[error("{0}")]
    InvalidName(String),
    /// A deploy setting this node does not know.
    #[error("{name:?} is not a deploy setting: use {known}")]
    UnknownSetting {
        /// The setting given.
        name: String,
        /// The settings there are, comma-separated.
        known: String,
    },
    /// Limits that do not read or are out of range.
    #[error("{0}")]
    InvalidLimits(String),
    /// Placement requirements that do not read or are out of range.
    #[error("{0}")]
    InvalidRequirements(String),
    /// A placement policy this build does not know.
    #[error("{0}")]
    InvalidPolicy(String),
    /// A module over [`MAX_MODULE_BYTES`].
    #[error("the module is {size} bytes: at most {limit} are allowed")]
    ModuleTooLarge {
        /// Its size.
        size: usize,
        /// The limit, [`MAX_MODULE_BYTES`].
        limit: usize,
    },
    /// A module that is no component, does not compile, or imports or exports the wrong
    /// things.
    #[error("{0}")]
    InvalidModule(String),
    /// This node's replica does not hold the module a function names yet.
    #[error(
        "this node has not received module {hash} of {function} yet: it is replicated with the metadata group"
    )]
    ModuleMissing {
        /// The module's hash.
        hash: String,
        /// The function.
        function: String,
    },
    /// No function by that name.
    #[error("no function named {0}")]
    NoFunction(String),
    /// No trigger by that name.
    #[error("no trigger named {0}")]
    NoTrigger(String),
    /// A function that triggers still run cannot be removed.
    #[error(
        "function {function} is run by trigger(s) {}: remove them first with `canal trigger rm`",
        .triggers.join(", ")
    )]
    InUse {
        /// The function.
        function: String,
        /// The triggers that run it.
        triggers: Vec<String>,
    },
    /// A trigger that does not validate.
    #[error("{0}")]
    InvalidTrigger(String),
    /// A trigger's filter that does not read.
    #[error("{0}")]
    InvalidFilter(String),
    /// A topic (a trigger's output or dead-letter topic) that does not read.
    #[error("{0}")]
    InvalidTopic(String),
    /// A trigger names a function that is not deployed.
    #[error("no function named {0}: deploy it first with `canal fn deploy`")]
    UnknownFunction(String),
    /// A trigger by that name exists already.
    #[error("trigger {0} exists: remove it first with `canal trigger rm {0}`")]
    TriggerExists(String),
    /// The Raft groups could not answer.
    #[error(transparent)]
    Consensus(#[from] ClientError),
    /// The first placement was not committed.
    #[error(transparent)]
    Placement(PlacementError),
    /// Something that should not fail did: a stored value that does not decode, a failed
    /// task.
    #[error("{0}")]
    Internal(String),
}

impl From<PlacementError> for FunctionsError {
    fn from(e: PlacementError) -> Self {
        match e {
            // A Raft error is the same answer whichever write met it.
            PlacementError::Consensus(c) => FunctionsError::Consensus(c),
            other => FunctionsError::Placement(other),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> FunctionsError {
    FunctionsError::Internal(e.to_string())
}

/// What a deploy is asked to store, its settings read already.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploySettings {
    /// The per-invocation limits.
    pub limits: Limits,
    /// What a peer must have to run the function.
    pub requirements: Requirements,
    /// How placement chooses among the peers that may.
    pub policy: canal_placement::Policy,
}

impl Default for DeploySettings {
    /// What a deploy without settings gets: the default limits, one replica that must meet
    /// the requirements, the default policy.
    fn default() -> Self {
        DeploySettings {
            limits: Limits::default(),
            requirements: Requirements {
                replicas: 1,
                hard: true,
                ..Requirements::default()
            },
            policy: canal_placement::Policy::default(),
        }
    }
}

/// A deploy: the function's name, its settings and its component.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The function's name.
    pub name: String,
    /// Its settings.
    pub settings: DeploySettings,
    /// The component's bytes.
    pub module: Vec<u8>,
}

/// One invocation by hand: nothing it does is committed.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// The function.
    pub function: String,
    /// The topic the event claims to come from; `invoke/{function}` when none.
    pub topic: Option<Topic>,
    /// The event's custom headers.
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// The functions side of a node: the WebAssembly runtime and what reads the stored specs.
pub struct Functions<T: Transport> {
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// The Raft groups.
    pub consensus: Consensus<T>,
    /// This node's peer id, base58: the executor header of what it runs.
    pub peer_id: String,
    /// Bounds the invocations in flight to the instance pool's size.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// This node's execution-time estimates per function, which placement reads.
    pub estimates: std::sync::Mutex<canal_placement::Estimates>,
    /// The load counters this node advertises.
    pub live: Arc<crate::caps::LoadCounters>,
    /// The peers placement chooses from (the mesh's peer table).
    pub peers: Arc<dyn PeerSource>,
}

impl<T: Transport> Functions<T> {
    fn metadata(&self) -> Result<StateMachine, FunctionsError> {
        Ok(self.consensus.state_machine(GroupId::METADATA)?)
    }

    /// Whose publish rights trigger `uid`'s function has, from this node's replica; `None`
    /// for a trigger created without a token (`--auth none`, or before tokens).
    pub fn trigger_owner(
        &self,
        uid: &str,
    ) -> Result<Option<canal_proto::function::TriggerOwner>, FunctionsError> {
        self.metadata()?
            .record(&keys::TRIGGER_OWNERS, uid)
            .map_err(|e| internal(e.to_string()))
    }

    /// Every function, from this node's replica of the metadata group.
    pub fn functions(&self) -> Result<Vec<FunctionSpec>, FunctionsError> {
        values(&self.metadata()?, &keys::FUNCTIONS)
    }

    /// Every trigger, from this node's replica of the metadata group.
    pub fn triggers(&self) -> Result<Vec<TriggerSpec>, FunctionsError> {
        values(&self.metadata()?, &keys::TRIGGERS)
    }

    /// One function, from this node's replica.
    pub fn function(&self, name: &str) -> Result<Option<FunctionSpec>, FunctionsError> {
        self.metadata()?
            .record(&keys::FUNCTIONS, name)
            .map_err(internal)
    }

    /// One function, read through the leader: sees every write acknowledged before.
    pub async fn function_now(&self, name: &str) -> Result<Option<FunctionSpec>, FunctionsError> {
        Ok(self
            .consensus
            .read_record(GroupId::METADATA, &keys::FUNCTIONS, name, true)
            .await?)
    }

    /// The function's module, ready to run: prepared already, or read from the replica by
    /// hash and prepared now (compiled, or loaded from the artifact cache).
    pub async fn module(&self, spec: &FunctionSpec) -> Result<Arc<Prepared>, FunctionsError> {
        if let Some(p) = self.runtime.get(&spec.hash) {
            return Ok(p);
        }
        let bytes = self
            .metadata()?
            .record(&keys::MODULES, &spec.hash)
            .map_err(internal)?
            .ok_or_else(|| FunctionsError::ModuleMissing {
                hash: spec.hash.clone(),
                function: spec.name.clone(),
            })?;
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.prepare(&bytes))
            .await
            .map_err(internal)?
            .map_err(|e| FunctionsError::InvalidModule(e.to_string()))
    }

    /// A view of `function`'s state on this node's replica.
    pub fn state_view(&self, function: &str) -> Result<ReplicaState, FunctionsError> {
        Ok(ReplicaState {
            sm: self
                .consensus
                .state_machine(self.consensus.route()?.function(function))?,
            function: function.to_string(),
        })
    }

    /// The function's state version on this node's replica.
    pub fn state_version(&self, function: &str) -> Result<u64, FunctionsError> {
        let sm = self
            .consensus
            .state_machine(self.consensus.route()?.function(function))?;
        Ok(sm
            .record(&keys::STATE_VERSIONS, function)
            .map_err(internal)?
            .unwrap_or(0))
    }

    /// Whether this node runs `function` now: the first peer of its committed placement. A
    /// function without a placement yet (deploy commits the first one), or one placement
    /// found no peer for, runs nowhere: its QoS 1 events wait in the log.
    pub fn runs_here(&self, function: &FunctionSpec) -> bool {
        crate::placement::placed(&self.consensus, &function.name)
            .is_some_and(|p| p.decision.chosen.first() == Some(&self.peer_id))
    }

    /// Whether the committed placement of `function` names this node at all (its executor or
    /// a standby): then its module is compiled here as soon as the placement applies, not at
    /// its first event.
    pub fn placed_here(&self, function: &FunctionSpec) -> bool {
        crate::placement::placed(&self.consensus, &function.name)
            .is_some_and(|p| p.decision.chosen.contains(&self.peer_id))
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

/// Every record of `table` on this replica, without their keys.
fn values<S: keys::Shape, C: keys::Codec>(
    sm: &StateMachine,
    table: &keys::Table<S, C>,
) -> Result<Vec<C::Value>, FunctionsError> {
    Ok(sm
        .scan_table(table)
        .map_err(internal)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// A function's state as this node's replica of the data group holds it.
pub struct ReplicaState {
    sm: StateMachine,
    function: String,
}

impl StateView for ReplicaState {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.sm
            .record(&keys::STATE, (&self.function, key))
            .map_err(|e| e.to_string())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        Ok(self
            .sm
            .scan_group(&keys::STATE, &self.function, prefix, limit)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|((_, key), _)| key)
            .collect())
    }
}

fn invalid_name(e: canal_proto::function::SpecError) -> FunctionsError {
    FunctionsError::InvalidName(e.0)
}

impl<T: Transport> Functions<T> {
    /// A new id no other of any node has, for what this node creates (requests, triggers,
    /// events of invocations by hand).
    pub fn fresh_id(&self) -> String {
        canal_proto::time::fresh_id(&self.peer_id)
    }

    /// Deploys a function: checks and compiles the module, stores it and the function's
    /// spec, and commits its first placement. The answer says which module it replaced, if
    /// any.
    pub async fn deploy(&self, req: DeployRequest) -> Result<Deployed, FunctionsError> {
        let DeployRequest {
            name,
            settings,
            module: body,
        } = req;
        check_function_name(&name).map_err(invalid_name)?;
        if body.len() > MAX_MODULE_BYTES {
            return Err(FunctionsError::ModuleTooLarge {
                size: body.len(),
                limit: MAX_MODULE_BYTES,
            });
        }
        let started = Instant::now();
        let rt = self.runtime.clone();
        let bytes = body.clone();
        let prepared = tokio::task::spawn_blocking(move || rt.prepare(&bytes))
            .await
            .map_err(internal)?
            .map_err(|e: DeployError| FunctionsError::InvalidModule(e.to_string()))?;
        let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
        debug_assert_eq!(prepared.hash, module_hash(&body));
        let size = body.len() as u64;
        // The module first, so a spec never names a module the cluster does not have; the
        // request id makes storing the same module twice one write.
        self.consensus
            .write(
                GroupId::METADATA,
                Request {
                    id: Some(format!("module/{}", prepared.hash)),
                    op: Op::Internal {
                        key: canal_consensus::InternalKey::Module(prepared.hash.clone()),
                        value: Some(body),
                    },
                },
            )
            .await?;
        let spec = FunctionSpec {
            name: name.clone(),
            hash: prepared.hash.clone(),
            size,
            limits: settings.limits,
            requirements: settings.requirements,
            policy: settings.policy.to_string(),
            deployed_ms: now_ms(),
        };
        let r = self
            .consensus
            .write(
                GroupId::METADATA,
                Request {
                    id: Some(self.fresh_id()),
                    op: Op::Internal {
                        key: canal_consensus::InternalKey::Function(name),
                        value: Some(wire::encode(&spec).map_err(internal)?),
                    },
                },
            )
            .await?;
        // The first placement at once, so the function's first events need not wait for the
        // placement job's next round (which refines it from the data group's leader).
        let first = crate::placement::decide_now(&self.consensus, &*self.peers, &spec);
        crate::placement::commit(&self.consensus, &spec, first).await?;
        let replaced = r
            .previous
            .and_then(|b| wire::decode::<FunctionSpec>(&b).ok())
            .map(|old| old.hash);
        Ok(Deployed {
            function: spec,
            replaced,
            compile_ms,
        })
    }

    /// Removes a function and its placement; refused while a trigger runs it.
    pub async fn remove(&self, name: &str) -> Result<(), FunctionsError> {
        check_function_name(name).map_err(invalid_name)?;
        if self.function_now(name).await?.is_none() {
            return Err(FunctionsError::NoFunction(name.to_string()));
        }
        let users: Vec<String> = self
            .triggers()?
            .into_iter()
            .filter(|t| t.function == name)
            .map(|t| t.name)
            .collect();
        if !users.is_empty() {
            return Err(FunctionsError::InUse {
                function: name.to_string(),
                triggers: users,
            });
        }
        self.forget(canal_consensus::InternalKey::Function(name.to_string()))
            .await?;
        // Its placement goes with it (its module stays: another function may share it).
        self.forget(canal_consensus::InternalKey::Placement(name.to_string()))
            .await?;
        Ok(())
    }

    /// Runs the function once on this node with the request's payload and reports what it
    /// did. Nothing is committed.
    pub async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, FunctionsError> {
        let name = req.function.as_str();
        check_function_name(name).map_err(invalid_name)?;
        let spec = self
            .function_now(name)
            .await?
            .ok_or_else(|| FunctionsError::NoFunction(name.to_string()))?;
        let topic = match req.topic {
            Some(t) => t,
            None => Topic::new(&format!("invoke/{name}")).map_err(internal)?,
        };
        let module = self.module(&spec).await?;
        let state: Arc<dyn StateView> = Arc::new(self.state_view(name)?);
        let out = Topic::new(&format!("invoke/{name}/out")).map_err(internal)?;
        let event = EventIn {
            topic: topic.to_string(),
            id: self.fresh_id(),
            offset: None,
            time_ms: now_ms(),
            headers: req.headers,
            payload: req.payload,
        };
        // The run owns its slot: a caller that goes away does not free it while the guest
        // runs.
        let r = self
            .run(
                module,
                event,
                state,
                BTreeMap::new(),
                Some(out),
                spec.limits,
            )
            .await
            .map_err(FunctionsError::Internal)?;
        Ok(InvokeResult {
            function: name.to_string(),
            executor: self.peer_id.clone(),
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

    /// One value of a function's state: read through the leader when `linearizable`, else
    /// from this node's replica.
    pub async fn state_get(
        &self,
        name: &str,
        key: &str,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>, FunctionsError> {
        check_function_name(name).map_err(invalid_name)?;
        Ok(self
            .consensus
            .read_record(
                self.consensus.routing().await?.function(name),
                &keys::STATE,
                (name, key),
                linearizable,
            )
            .await?)
    }

    /// A function's state under `prefix` on this node's replica.
    pub fn state_list(&self, name: &str, prefix: &str) -> Result<StateList, FunctionsError> {
        use base64::Engine;
        check_function_name(name).map_err(invalid_name)?;
        let view = self.state_view(name)?;
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

    /// Adds a trigger: checks it, that its function exists and that no trigger has its name.
    pub async fn trigger_add(
        &self,
        name: &str,
        req: TriggerRequest,
    ) -> Result<TriggerSpec, FunctionsError> {
        self.trigger_add_owned(name, req, None).await
    }

    /// Like [`Functions::trigger_add`], recording `owner` (whose publish rights the
    /// function's outputs are checked against) in the same entry; `None`: unchecked
    /// (`--auth none`).
    pub async fn trigger_add_owned(
        &self,
        name: &str,
        req: TriggerRequest,
        owner: Option<canal_proto::function::TriggerOwner>,
    ) -> Result<TriggerSpec, FunctionsError> {
        check_trigger_name(name).map_err(invalid_name)?;
        let filter =
            TopicFilter::new(&req.on).map_err(|e| FunctionsError::InvalidFilter(e.to_string()))?;
        let topic = |what: &str, t: &Option<String>| -> Result<Option<Topic>, FunctionsError> {
            t.as_deref()
                .map(|t| {
                    Topic::new(t).map_err(|e| FunctionsError::InvalidTopic(format!("{what}: {e}")))
                })
                .transpose()
        };
        let spec = TriggerSpec {
            name: name.to_string(),
            uid: self.fresh_id(),
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
        spec.validate()
            .map_err(|e| FunctionsError::InvalidTrigger(e.0))?;
        if self.function_now(&spec.function).await?.is_none() {
            return Err(FunctionsError::UnknownFunction(spec.function));
        }
        if self.trigger_now(name).await?.is_some() {
            return Err(FunctionsError::TriggerExists(name.to_string()));
        }
        let trigger = Request {
            id: Some(format!("trigger/{}", spec.uid)),
            op: Op::Internal {
                key: canal_consensus::InternalKey::Trigger(name.to_string()),
                value: Some(wire::encode(&spec).map_err(internal)?),
            },
        };
        let req = match owner {
            None => trigger,
            // One entry, so a trigger never runs without the owner it was created with.
            Some(owner) => Request {
                id: None,
                op: Op::Batch(vec![
                    Request {
                        id: None,
                        op: Op::Internal {
                            key: canal_consensus::InternalKey::TriggerOwner(spec.uid.clone()),
                            value: Some(keys::TRIGGER_OWNERS.encode(&owner).map_err(internal)?),
                        },
                    },
                    trigger,
                ]),
            },
        };
        self.consensus.write(GroupId::METADATA, req).await?;
        Ok(spec)
    }

    /// Deletes internal record `key` of the metadata group.
    async fn forget(&self, key: canal_consensus::InternalKey) -> Result<(), FunctionsError> {
        self.consensus
            .write_op(GroupId::METADATA, Op::Internal { key, value: None })
            .await?;
        Ok(())
    }

    /// One trigger, read through the leader: sees every write acknowledged before.
    async fn trigger_now(&self, name: &str) -> Result<Option<TriggerSpec>, FunctionsError> {
        Ok(self
            .consensus
            .read_record(GroupId::METADATA, &keys::TRIGGERS, name, true)
            .await?)
    }

    /// Removes a trigger.
    pub async fn trigger_remove(&self, name: &str) -> Result<(), FunctionsError> {
        check_trigger_name(name).map_err(invalid_name)?;
        let Some(spec) = self.trigger_now(name).await? else {
            return Err(FunctionsError::NoTrigger(name.to_string()));
        };
        self.forget(canal_consensus::InternalKey::Trigger(name.to_string()))
            .await?;
        // Its owner goes after it (a trigger never runs without the owner it was made with);
        // one left behind by a failure here is keyed by a uid no trigger has again.
        self.forget(canal_consensus::InternalKey::TriggerOwner(spec.uid))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_on_a_follower_are_forwarded_to_the_leader() {
        use crate::testkit::{self, Cluster, FixedPeers};
        let cluster = Cluster::formed(3).await;
        let leader = cluster.leader(GroupId::METADATA).await;
        let follower = (leader + 1) % 3;
        let on_follower = testkit::functions(
            &cluster.members[follower],
            FixedPeers::of(&[cluster.members[follower].peer]),
        );
        let on_leader = testkit::functions(
            &cluster.members[leader],
            FixedPeers::of(&[cluster.members[leader].peer]),
        );
        testkit::deploy(&on_follower, "up", "uppercase").await;
        let t = on_follower
            .trigger_add(
                "shout",
                TriggerRequest {
                    on: "in/#".into(),
                    function: "up".into(),
                    out: None,
                    qos: None,
                    retries: None,
                    dead_letter: None,
                },
            )
            .await
            .unwrap();
        // Read through the leader: both writes were committed there.
        assert!(on_leader.function_now("up").await.unwrap().is_some());
        let again = on_leader
            .trigger_add(
                "shout",
                TriggerRequest {
                    on: "in/#".into(),
                    function: "up".into(),
                    out: None,
                    qos: None,
                    retries: None,
                    dead_letter: None,
                },
            )
            .await;
        assert!(
            matches!(&again, Err(FunctionsError::TriggerExists(n)) if n == "shout"),
            "{again:?}"
        );
        // A removal from the follower is refused while the trigger runs the function (as its
        // replica knows once it has applied the trigger).
        testkit::until(
            "the follower's replica to hold the trigger",
            std::time::Duration::from_secs(10),
            || on_follower.triggers().is_ok_and(|t| t.len() == 1),
        )
        .await;
        let busy = on_follower.remove("up").await;
        assert!(
            matches!(&busy, Err(FunctionsError::InUse { triggers, .. }) if triggers == &vec![t.name.clone()]),
            "{busy:?}"
        );
        on_follower.trigger_remove("shout").await.unwrap();
        // The check reads the follower's replica: once it has applied the removal, the
        // function may go.
        testkit::until(
            "the follower's replica to drop the trigger",
            std::time::Duration::from_secs(10),
            || on_follower.triggers().is_ok_and(|t| t.is_empty()),
        )
        .await;
        on_follower.remove("up").await.unwrap();
        assert!(on_leader.function_now("up").await.unwrap().is_none());
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_batched_writes_share_entries_and_each_is_answered() {
        use crate::testkit::Cluster;
        let cluster = Cluster::formed(3).await;
        let group = canal_consensus::routing::DEFAULT_GROUP;
        let leader = cluster.leader(group).await;
        let follower = cluster.members[(leader + 1) % 3].consensus.clone();
        const N: usize = 64;
        let writes = (0..N).map(|i| {
            let c = follower.clone();
            tokio::spawn(async move {
                c.write_batched(
                    group,
                    Request {
                        id: Some(format!("w{i}")),
                        op: Op::Add {
                            key: "sum".into(),
                            delta: i as i64,
                        },
                    },
                )
                .await
            })
        });
        let answers: Vec<canal_consensus::Response> = futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert!(answers.iter().all(|r| r.refused.is_none() && !r.duplicate));
        let entries: std::collections::BTreeSet<u64> = answers.iter().map(|r| r.index).collect();
        assert!(
            entries.len() < N,
            "{N} concurrent writes took {} entries: none was batched",
            entries.len()
        );
        // Each applied once.
        let sum = cluster.members[leader]
            .consensus
            .read(group, &canal_consensus::UserKey::new("sum").unwrap(), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(sum).unwrap(),
            ((N * (N - 1)) / 2).to_string()
        );
        cluster.shutdown().await;
    }
}

//! The wasmtime engine, module preparation and invocation with limits.
//!
//! One [`Runtime`] per node. Instances come from a pooling allocator sized from the node's
//! configuration; a thread ticks the engine's epoch so that an invocation past its time
//! limit traps; fuel, when a function declares a budget, bounds its instructions; a
//! [`Limiter`] refuses memory growth past the function's limit and remembers that it did,
//! so the failure can say "memory limit" rather than a bare trap.

use crate::host::{Host, Limiter, Overlay, StateView};
use canal_proto::Topic;
use canal_proto::function::{Limits, LogLine, Output};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
    Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Bindings generated from `wit/canal.wit`.
#[allow(missing_docs, unreachable_pub)]
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit",
        // These may stop the guest: the call that passes a limit traps.
        imports: {
            "canal:functions/host.publish": trappable,
            "canal:functions/host.emit": trappable,
            "canal:functions/state.set": trappable,
            "canal:functions/state.delete": trappable,
        },
    });
}

use bindings::{Handler, HandlerPre};

/// How often the engine's epoch advances: the resolution of time limits.
const TICK: Duration = Duration::from_millis(2);
/// How much a guest may print to stdout and stderr per invocation (kept as log lines).
const MAX_PRINTED_BYTES: usize = 16 << 10;
/// How much of a slot's memory and tables is zeroed in place when an instance ends, rather
/// than released to the kernel (which costs a page fault per page the next instance touches).
const KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// How a node's runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled artifacts are kept across restarts (`None`: not kept).
    pub cache_dir: Option<PathBuf>,
    /// How many instances may exist at once (the pool's size).
    pub instances: u32,
    /// The most memory any instance may have: the pool reserves this per slot.
    pub max_memory_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            instances: 64,
            max_memory_bytes: canal_proto::function::MAX_MEMORY_BYTES,
        }
    }
}

/// Why a module cannot be deployed. Each message names what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// Not WebAssembly, or a core module rather than a component.
    #[error("{0}")]
    NotAComponent(String),
    /// The component does not compile.
    #[error("the component does not compile: {0}")]
    Invalid(String),
    /// It imports something canal does not provide.
    #[error(
        "the component imports something canal does not provide: {0} (canal provides canal:functions/host, canal:functions/state and the WASI 0.2 interfaces wasi:io, wasi:cli, wasi:clocks and wasi:random; no wasi:filesystem or wasi:sockets)"
    )]
    Imports(String),
    /// It does not export `handle` with the right type.
    #[error(
        "the component does not export the canal handler: {0} (build it against wit/canal.wit, world `handler`)"
    )]
    Exports(String),
    /// The engine itself failed (not the module's fault).
    #[error("the WebAssembly engine failed: {0}")]
    Engine(String),
}

/// Why an invocation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The guest returned an error.
    #[error("the function returned an error: {0}")]
    Error(String),
    /// The guest trapped.
    #[error("the function trapped: {0}")]
    Trap(String),
    /// It ran past its time limit.
    #[error("the function ran past its time limit of {0} ms")]
    Timeout(u64),
    /// It tried to grow its memory past its limit.
    #[error("the function tried to grow its memory past its limit of {0} bytes")]
    Memory(u64),
    /// It used up its fuel.
    #[error("the function used up its fuel of {0}")]
    Fuel(u64),
    /// No instance could be made (the pool is full, the host failed).
    #[error("the function could not be started: {0}")]
    Start(String),
    /// It passed one of its per-invocation limits.
    #[error("the function passed a limit: {detail}")]
    Limit {
        /// Which: `max-outputs`, `max-output-bytes`, `max-state-bytes`, `hops`,
        /// `output-payload` or `state-value`.
        limit: &'static str,
        /// What happened, naming the limit and the value.
        detail: String,
    },
    /// It published where the owner of its trigger may not (the token that created the
    /// trigger holds no publish right there); its outputs and state changes are dropped.
    #[error("the function's output was refused: {0}")]
    Denied(String),
}

impl Failure {
    /// A short name for headers and metrics: `error`, `trap`, `timeout`, `memory`, `fuel`,
    /// `start`, `limit`, `denied`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Error(_) => "error",
            Failure::Trap(_) => "trap",
            Failure::Timeout(_) => "timeout",
            Failure::Memory(_) => "memory",
            Failure::Fuel(_) => "fuel",
            Failure::Start(_) => "start",
            Failure::Limit { .. } => "limit",
            Failure::Denied(_) => "denied",
        }
    }
}

/// An event as a function sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventIn {
    /// Its topic.
    pub topic: String,
    /// Its id.
    pub id: String,
    /// Its offset (QoS 1).
    pub offset: Option<u64>,
    /// When it was accepted, ms since the Unix epoch.
    pub time_ms: u64,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// What one invocation did. Outputs and state changes take effect only if the caller commits
/// them, which it should do only when `result` is `Ok`.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Success, or why not.
    pub result: Result<(), Failure>,
    /// The events it published.
    pub outputs: Vec<Output>,
    /// The state changes, including those the call started with (`None`: deleted).
    pub state: BTreeMap<String, Option<Vec<u8>>>,
    /// What it logged and printed.
    pub logs: Vec<LogLine>,
    /// How long it took, instantiation included.
    pub elapsed: Duration,
    /// The fuel it used, if it had a budget.
    pub fuel_used: Option<u64>,
}

/// A module ready to run: validated, compiled, linked.
pub struct Prepared {
    /// The SHA-256 of its bytes, hex.
    pub hash: String,
    /// Whether the compiled artifact came from the disk cache.
    pub from_cache: bool,
    /// How long preparation took.
    pub prepare_time: Duration,
    pre: HandlerPre<Host>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("hash", &self.hash)
            .field("from_cache", &self.from_cache)
            .finish()
    }
}

/// The node's WebAssembly runtime. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    compat: u64,
    prepared: Mutex<HashMap<String, Arc<Prepared>>>,
    /// WASI contexts of finished invocations, kept for the next: building one seeds two
    /// random generators (twice, as `WasiCtxBuilder::build` makes a fresh builder), which
    /// cost more than the rest of a no-op invocation's host side. At most `slots` are kept.
    contexts: Mutex<Vec<Context>>,
    slots: usize,
    stop_ticker: Arc<AtomicBool>,
}

/// A WASI context for one invocation at a time, with the pipes its stdout and stderr write to.
/// Nothing a guest can change is in it but the random generators' positions: no files, no
/// environment, no sockets.
struct Context {
    wasi: WasiCtx,
    stdout: Capture,
    stderr: Capture,
}

impl Context {
    fn new() -> Context {
        let stdout = Capture::default();
        let stderr = Capture::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build();
        Context {
            wasi,
            stdout,
            stderr,
        }
    }
}

/// An output stream whose destination is swapped per invocation, so that a context can be
/// reused while each invocation still sees only what it printed itself.
#[derive(Clone)]
struct Capture(Arc<Mutex<MemoryOutputPipe>>);

impl Default for Capture {
    fn default() -> Self {
        Capture(Arc::new(Mutex::new(MemoryOutputPipe::new(
            MAX_PRINTED_BYTES,
        ))))
    }
}

impl Capture {
    fn current(&self) -> std::sync::MutexGuard<'_, MemoryOutputPipe> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new invocation's output; returns the pipe it goes to.
    fn fresh(&self) -> MemoryOutputPipe {
        let pipe = MemoryOutputPipe::new(MAX_PRINTED_BYTES);
        *self.current() = pipe.clone();
        pipe
    }
}

impl wasmtime_wasi::cli::IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.current().clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.current().clone())
    }
}

/// The SHA-256 of a module's bytes, hex: its name in the cluster.
pub fn module_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Runtime {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, DeployError> {
        let engine_err = |e: wasmtime::Error| DeployError::Engine(format!("{e:#}"));
        let slots = config.instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(8))
            .max_core_instances_per_component(32)
            .max_memories_per_component(2)
            .max_tables_per_component(16)
            .max_memory_size(config.max_memory_bytes as usize)
            // A slot's memory is reset by zeroing its first pages in place, not by handing
            // them back to the kernel and faulting them in again on the next instance.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES)
            // Reuse the slot that last held the same module: its image is mapped already.
            .max_unused_warm_slots(slots);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            // Data segments are mapped copy-on-write and tables filled on first use, so a
            // new instance copies nothing up front.
            .memory_init_cow(true)
            .table_lazy_init(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(engine_err)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = hasher.finish();
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                DeployError::Engine(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("canal-wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| DeployError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Runtime {
            engine,
            cache_dir: config.cache_dir.clone(),
            compat,
            prepared: Mutex::new(HashMap::new()),
            contexts: Mutex::new(Vec::new()),
            slots: slots as usize,
            stop_ticker,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Prepared>>> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The module with this hash, if it has been prepared.
    pub fn get(&self, hash: &str) -> Option<Arc<Prepared>> {
        self.lock().get(hash).cloned()
    }

    /// Forgets a prepared module (its cached artifact stays on disk).
    pub fn forget(&self, hash: &str) {
        self.lock().remove(hash);
    }

    /// Validates `bytes` as a canal function and makes it ready to run: checks that it is a
    /// component, compiles it (or loads the compiled artifact from the cache), checks that
    /// everything it imports is provided and that it exports `handle`. Blocking: compiling
    /// takes tens of milliseconds.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Arc<Prepared>, DeployError> {
        let hash = module_hash(bytes);
        if let Some(p) = self.get(&hash) {
            return Ok(p);
        }
        check_header(bytes)?;
        let started = Instant::now();
        let (component, from_cache) = self.compile(&hash, bytes)?;
        let pre = linker_for(&self.engine, &component)?
            .instantiate_pre(&component)
            .map_err(|e| DeployError::Imports(format!("{e:#}")))?;
        let pre = HandlerPre::new(pre).map_err(|e| DeployError::Exports(format!("{e:#}")))?;
        let prepared = Arc::new(Prepared {
            hash: hash.clone(),
            from_cache,
            prepare_time: started.elapsed(),
            pre,
        });
        self.lock().insert(hash, prepared.clone());
        Ok(prepared)
    }

    fn cache_path(&self, hash: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{:016x}.cwasm", self.compat)))
    }

    fn compile(&self, hash: &str, bytes: &[u8]) -> Result<(Component, bool), DeployError> {
        let path = self.cache_path(hash);
        if let Some(path) = &path
            && path.exists()
        {
            // SAFETY: the artifact was written by this runtime into the node's own data
            // directory, under a name that includes the engine's compatibility hash;
            // wasmtime checks its header and version again before using it.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled artifact unusable; compiling again");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        if let Some(path) = &path {
            match component.serialize() {
                Ok(art) => {
                    let tmp = path.with_extension("tmp");
                    if let Err(e) =
                        std::fs::write(&tmp, &art).and_then(|_| std::fs::rename(&tmp, path))
                    {
                        tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled artifact");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot serialize the compiled artifact"),
            }
        }
        Ok((component, false))
    }

    /// Runs `event` through `module` in a fresh instance, with `limits`. `state` is what the
    /// function's state looked like (with `changes` of earlier events of the same batch on
    /// top); `out` is the trigger's output topic. Blocking: call it off the async runtime.
    pub fn invoke(
        &self,
        module: &Prepared,
        event: EventIn,
        state: Arc<dyn StateView>,
        changes: BTreeMap<String, Option<Vec<u8>>>,
        out: Option<Topic>,
        limits: &Limits,
    ) -> Invocation {
        let started = Instant::now();
        let context = self
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(Context::new);
        let Context {
            wasi,
            stdout: stdout_capture,
            stderr: stderr_capture,
        } = context;
        let stdout = stdout_capture.fresh();
        let stderr = stderr_capture.fresh();
        let limits_store = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes as usize)
            .instances(64)
            .tables(64)
            .memories(4)
            .build();
        let host = Host {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                inner: limits_store,
                refused: false,
            },
            state: Overlay {
                base: state,
                changes,
            },
            out,
            outputs: Vec::new(),
            logs: Vec::new(),
            logs_dropped: 0,
            limits: *limits,
            hops: crate::rules::hops(&event.headers),
            output_bytes: 0,
            state_bytes: 0,
            limit_hit: None,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        let ticks = limits.timeout_ms.div_ceil(TICK.as_millis() as u64) + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        let result = match store.set_fuel(fuel) {
            Err(e) => Err(Failure::Start(format!("{e:#}"))),
            Ok(()) => match module.pre.instantiate(&mut store) {
                Err(e) => Err(classify(e, &store, limits, true)),
                Ok(handler) => {
                    let event = bindings::canal::functions::types::Event {
                        topic: event.topic,
                        id: event.id,
                        offset: event.offset,
                        time_ms: event.time_ms,
                        headers: event.headers,
                        payload: event.payload,
                    };
                    match handler.call_handle(&mut store, &event) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(msg)) => Err(Failure::Error(msg)),
                        Err(e) => Err(classify(e, &store, limits, false)),
                    }
                }
            },
        };
        let fuel_used = limits
            .fuel
            .map(|f| f.saturating_sub(store.get_fuel().unwrap_or(0)));
        let mut host = store.into_data();
        // A limit passed is the reason, whatever the guest or the trap made of it.
        let result = match host.limit_hit.take() {
            Some((limit, detail)) => Err(Failure::Limit { limit, detail }),
            None => result,
        };
        for (level, pipe) in [("stdout", &stdout), ("stderr", &stderr)] {
            let printed = pipe.contents();
            for line in String::from_utf8_lossy(&printed).lines() {
                host.log(level, line.to_string());
            }
        }
        if host.logs_dropped > 0 {
            let n = host.logs_dropped;
            host.logs_dropped = 0;
            host.logs.push(LogLine {
                level: "warn".into(),
                message: format!("{n} more log lines were dropped"),
            });
        }
        let invocation = Invocation {
            result,
            outputs: host.outputs,
            state: host.state.changes,
            logs: host.logs,
            elapsed: started.elapsed(),
            fuel_used,
        };
        let mut contexts = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        if contexts.len() < self.slots {
            contexts.push(Context {
                wasi: host.wasi,
                stdout: stdout_capture,
                stderr: stderr_capture,
            });
        }
        invocation
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Adds one WASI interface to a linker.
type AddInterface = fn(&mut Linker<Host>) -> wasmtime::Result<()>;

/// The WASI interfaces canal provides, by name without version: standard streams,
/// environment (empty), exit, clocks and random. Not files, not sockets: a component that
/// imports those is refused at deploy, naming the import.
const WASI_INTERFACES: &[(&str, AddInterface)] = {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, random, sync::io};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};
    &[
        ("wasi:io/error", |l| {
            io::error::add_to_linker::<Host, IoTable>(l, table)
        }),
        ("wasi:io/poll", |l| {
            io::poll::add_to_linker::<Host, IoTable>(l, table)
        }),
        ("wasi:io/streams", |l| {
            io::streams::add_to_linker::<Host, IoTable>(l, table)
        }),
        ("wasi:cli/environment", |l| {
            cli::environment::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/exit", |l| {
            cli::exit::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/stdin", |l| {
            cli::stdin::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/stdout", |l| {
            cli::stdout::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/stderr", |l| {
            cli::stderr::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/terminal-input", |l| {
            cli::terminal_input::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/terminal-output", |l| {
            cli::terminal_output::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/terminal-stdin", |l| {
            cli::terminal_stdin::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/terminal-stdout", |l| {
            cli::terminal_stdout::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:cli/terminal-stderr", |l| {
            cli::terminal_stderr::add_to_linker::<Host, WasiCli>(l, <Host as WasiCliView>::cli)
        }),
        ("wasi:clocks/wall-clock", |l| {
            clocks::wall_clock::add_to_linker::<Host, WasiClocks>(
                l,
                <Host as WasiClocksView>::clocks,
            )
        }),
        ("wasi:clocks/monotonic-clock", |l| {
            clocks::monotonic_clock::add_to_linker::<Host, WasiClocks>(
                l,
                <Host as WasiClocksView>::clocks,
            )
        }),
        ("wasi:random/random", |l| {
            random::random::add_to_linker::<Host, WasiRandom>(l, <Host as WasiRandomView>::random)
        }),
        ("wasi:random/insecure", |l| {
            random::insecure::add_to_linker::<Host, WasiRandom>(l, <Host as WasiRandomView>::random)
        }),
        ("wasi:random/insecure-seed", |l| {
            random::insecure_seed::add_to_linker::<Host, WasiRandom>(
                l,
                <Host as WasiRandomView>::random,
            )
        }),
    ]
};

/// The view of the host the `wasi:io` interfaces need: its resource table.
struct IoTable;

impl wasmtime::component::HasData for IoTable {
    type Data<'a> = &'a mut ResourceTable;
}

fn table(h: &mut Host) -> &mut ResourceTable {
    &mut h.table
}

/// A linker with canal's own interfaces and just the WASI interfaces `component` imports,
/// so that a module's instances carry nothing it does not use. An import canal does not
/// provide is left out, and `instantiate_pre` then refuses the module, naming it.
fn linker_for(engine: &Engine, component: &Component) -> Result<Linker<Host>, DeployError> {
    let engine_err = |e: wasmtime::Error| DeployError::Engine(format!("{e:#}"));
    let mut linker = Linker::<Host>::new(engine);
    Handler::add_to_linker::<Host, wasmtime::component::HasSelf<Host>>(&mut linker, |h| h)
        .map_err(engine_err)?;
    for (name, _) in component.component_type().imports(engine) {
        let unversioned = name.split('@').next().unwrap_or(name);
        if let Some((_, add)) = WASI_INTERFACES.iter().find(|(n, _)| *n == unversioned) {
            add(&mut linker).map_err(engine_err)?;
        }
    }
    Ok(linker)
}

fn classify(e: wasmtime::Error, store: &Store<Host>, limits: &Limits, starting: bool) -> Failure {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::Timeout(limits.timeout_ms),
        Some(Trap::OutOfFuel) => Failure::Fuel(limits.fuel.unwrap_or(u64::MAX)),
        _ if store.data().limiter.refused => Failure::Memory(limits.memory_bytes),
        Some(t) => Failure::Trap(t.to_string()),
        None if starting => Failure::Start(format!("{e:#}")),
        None => Failure::Trap(e.root_cause().to_string()),
    }
}

fn check_header(bytes: &[u8]) -> Result<(), DeployError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(DeployError::NotAComponent(
            "the file is not WebAssembly: it does not start with \\0asm (give the .wasm a build produced, e.g. target/wasm32-wasip2/release/NAME.wasm)".into(),
        ));
    }
    match &bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(DeployError::NotAComponent(
            "the file is a core WebAssembly module, not a component: canal runs components of the world in wit/canal.wit (build with `cargo build --target wasm32-wasip2`, or wrap a module with `wasm-tools component new`)".into(),
        )),
        other => Err(DeployError::NotAComponent(format!(
            "the file is WebAssembly of an unknown version or layer {other:02x?}: canal runs components (version 0x0d, layer 1)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime::new(&RuntimeConfig {
            instances: 4,
            max_memory_bytes: 64 << 20,
            ..RuntimeConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn refuses_what_is_not_a_component() {
        let rt = runtime();
        let e = rt.prepare(b"hello, world").unwrap_err();
        assert!(e.to_string().contains("does not start with"), "{e}");
        let core = wat::parse_str("(module)").unwrap();
        let e = rt.prepare(&core).unwrap_err();
        assert!(e.to_string().contains("core WebAssembly module"), "{e}");
    }

    #[test]
    fn refuses_unknown_imports_and_missing_exports() {
        let rt = runtime();
        let evil = wat::parse_str(
            r#"(component (import "canal:evil/net@1.0.0" (instance (export "connect" (func)))))"#,
        )
        .unwrap();
        let e = rt.prepare(&evil).unwrap_err();
        assert!(matches!(e, DeployError::Imports(_)), "{e}");
        assert!(e.to_string().contains("canal:evil/net"), "{e}");
        let empty = wat::parse_str("(component)").unwrap();
        let e = rt.prepare(&empty).unwrap_err();
        assert!(matches!(e, DeployError::Exports(_)), "{e}");
        assert!(e.to_string().contains("handle"), "{e}");
    }

    #[test]
    fn a_damaged_component_is_refused_with_the_reason() {
        let rt = runtime();
        let mut bytes = wat::parse_str("(component)").unwrap();
        bytes.extend_from_slice(&[0xff, 0x00, 0x13]);
        let e = rt.prepare(&bytes).unwrap_err();
        assert!(matches!(e, DeployError::Invalid(_)), "{e}");
    }

    fn event(topic: &str, payload: &str) -> EventIn {
        EventIn {
            topic: topic.into(),
            id: "e1".into(),
            offset: Some(0),
            time_ms: 0,
            headers: vec![("h".into(), "v".into())],
            payload: payload.as_bytes().to_vec(),
        }
    }

    fn run(rt: &Runtime, name: &str, payload: &str, limits: &Limits) -> Invocation {
        let m = rt
            .prepare(&canal_testnet::guests::bytes(name).unwrap())
            .unwrap();
        rt.invoke(
            &m,
            event("sensors/r1/temp", payload),
            Arc::new(crate::host::EmptyState),
            BTreeMap::new(),
            Some(Topic::new("out/x").unwrap()),
            limits,
        )
    }

    #[test]
    fn runs_a_transform() {
        let rt = runtime();
        let r = run(&rt, "uppercase", "hello", &Limits::default());
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.outputs.len(), 1);
        assert_eq!(r.outputs[0].topic, "out/x");
        assert_eq!(r.outputs[0].payload, b"HELLO");
        assert_eq!(
            r.outputs[0].headers,
            vec![("h".to_string(), "v".to_string())]
        );
    }

    #[test]
    fn state_is_buffered_and_seen_by_later_events() {
        let rt = runtime();
        let m = rt
            .prepare(&canal_testnet::guests::bytes("threshold").unwrap())
            .unwrap();
        let mut changes = BTreeMap::new();
        let mut alerts = 0;
        for v in ["10", "20", "40"] {
            let r = rt.invoke(
                &m,
                event("sensors/r1/temp", v),
                Arc::new(crate::host::EmptyState),
                changes,
                Some(Topic::new("alerts/temp").unwrap()),
                &Limits::default(),
            );
            assert_eq!(r.result, Ok(()), "{:?}", r.logs);
            alerts += r.outputs.len();
            changes = r.state;
        }
        assert_eq!(alerts, 1);
        let mean = changes["mean/sensors/r1/temp"].clone().unwrap();
        let mean: f64 = String::from_utf8(mean).unwrap().parse().unwrap();
        assert!((mean - 70.0 / 3.0).abs() < 1e-9, "{mean}");
        // A reading that is not a number fails, naming it.
        let r = run(&rt, "threshold", "warm", &Limits::default());
        assert!(
            matches!(&r.result, Err(Failure::Error(m)) if m.contains("warm")),
            "{:?}",
            r.result
        );
    }

    #[test]
    fn limits_stop_abusive_guests_and_the_runtime_goes_on() {
        let rt = runtime();
        let limits = Limits {
            memory_bytes: 16 << 20,
            timeout_ms: 200,
            ..Limits::default()
        };
        let r = run(&rt, "misbehave", "loop", &limits);
        assert_eq!(r.result, Err(Failure::Timeout(200)));
        let r = run(&rt, "misbehave", "grow", &limits);
        assert_eq!(r.result, Err(Failure::Memory(16 << 20)));
        let r = run(&rt, "misbehave", "trap", &limits);
        assert!(matches!(r.result, Err(Failure::Trap(_))), "{:?}", r.result);
        let r = run(&rt, "misbehave", "err", &limits);
        assert_eq!(r.result, Err(Failure::Error("asked to fail".into())));
        let fuel = Limits {
            fuel: Some(100_000),
            ..limits
        };
        let r = run(&rt, "misbehave", "loop", &fuel);
        assert_eq!(r.result, Err(Failure::Fuel(100_000)));
        // Nothing of a failed run escapes, and the next one works.
        let r = run(&rt, "misbehave", "ok", &limits);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.outputs[0].payload, b"ok");
    }

    fn limit_of(r: &Invocation) -> String {
        match &r.result {
            Err(f @ Failure::Limit { limit, detail }) => {
                assert_eq!(f.kind(), "limit");
                assert!(detail.starts_with(limit), "{limit}: {detail}");
                detail.clone()
            }
            other => panic!("expected a limit failure, got {other:?}"),
        }
    }

    #[test]
    fn output_and_state_limits_stop_a_guest_that_ignores_errors() {
        let rt = runtime();
        let d = Limits::default();
        // Up to the limit is fine.
        let r = run(&rt, "misbehave", "spam:64:1", &d);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.outputs.len(), 64);
        // One more and the invocation fails, though the guest ignored the error.
        let why = limit_of(&run(&rt, "misbehave", "spam:65:1", &d));
        assert!(
            why.contains("max-outputs") && why.contains("65") && why.contains("64"),
            "{why}"
        );
        let why = limit_of(&run(&rt, "misbehave", "spam:3:400000", &d));
        assert!(
            why.contains("max-output-bytes") && why.contains("1048576"),
            "{why}"
        );
        let why = limit_of(&run(&rt, "misbehave", "state:3:400000", &d));
        assert!(
            why.contains("max-state-bytes") && why.contains("1048576"),
            "{why}"
        );
        // The function's own settings count, down to nothing at all.
        let tight = Limits {
            max_outputs: 2,
            max_state_bytes: 0,
            ..d
        };
        assert_eq!(run(&rt, "misbehave", "spam:2:1", &tight).result, Ok(()));
        assert!(limit_of(&run(&rt, "misbehave", "spam:3:1", &tight)).contains("of 2"));
        assert!(limit_of(&run(&rt, "misbehave", "state:1:1", &tight)).contains("of 0 bytes"));
        // A failed invocation leaves nothing behind for the next.
        let r = run(&rt, "misbehave", "ok", &d);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.outputs.len(), 1);
    }

    #[test]
    fn an_event_past_the_hop_limit_cannot_publish() {
        let rt = runtime();
        let m = rt
            .prepare(&canal_testnet::guests::bytes("misbehave").unwrap())
            .unwrap();
        let at = |hops: u32| {
            let mut ev = event("loop/in", "republish");
            ev.headers.push(("canal-hops".into(), hops.to_string()));
            rt.invoke(
                &m,
                ev,
                Arc::new(crate::host::EmptyState),
                BTreeMap::new(),
                None,
                &Limits::default(),
            )
        };
        let r = at(crate::rules::MAX_HOPS - 1);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.outputs[0].topic, "loop/in");
        let why = limit_of(&at(crate::rules::MAX_HOPS));
        assert!(why.contains("hop limit") && why.contains("17"), "{why}");
    }

    /// A canal function written by hand: it imports nothing at all and returns `ok`.
    const IMPORTS_NOTHING: &str = r#"(component
        (type $event' (record
            (field "topic" string) (field "id" string) (field "offset" (option u64))
            (field "time-ms" u64) (field "headers" (list (tuple string string)))
            (field "payload" (list u8))))
        (export $event "event" (type $event'))
        (core module $m
            (memory (export "memory") 1)
            (global $next (mut i32) (i32.const 1024))
            (func (export "realloc") (param i32 i32 i32 i32) (result i32)
                (local $at i32)
                (local.set $at (global.get $next))
                (global.set $next (i32.add (local.get $at) (i32.and
                    (i32.add (local.get 3) (i32.const 7)) (i32.const -8))))
                (local.get $at))
            (func (export "handle")
                (param i32 i32 i32 i32 i32 i64 i64 i32 i32 i32 i32) (result i32)
                (i32.store8 (i32.const 16) (i32.const 0))
                (i32.const 16)))
        (core instance $i (instantiate $m))
        (alias core export $i "memory" (core memory $mem))
        (alias core export $i "realloc" (core func $realloc))
        (alias core export $i "handle" (core func $handle))
        (func $h (param "event" $event) (result (result (error string)))
            (canon lift (core func $handle) (memory $mem) (realloc $realloc)))
        (export "handle" (func $h)))"#;

    #[test]
    fn a_component_that_imports_nothing_runs_with_nothing_linked() {
        let rt = runtime();
        let m = rt
            .prepare(&wat::parse_str(IMPORTS_NOTHING).unwrap())
            .unwrap();
        let r = rt.invoke(
            &m,
            event("a/b", "x"),
            Arc::new(crate::host::EmptyState),
            BTreeMap::new(),
            None,
            &Limits::default(),
        );
        assert_eq!(r.result, Ok(()), "{:?}", r.logs);
        assert!(r.outputs.is_empty() && r.logs.is_empty());
    }

    #[test]
    fn wasi_files_and_sockets_are_refused_at_deploy_naming_the_import() {
        let rt = runtime();
        for import in ["wasi:filesystem/preopens@0.2.6", "wasi:sockets/tcp@0.2.6"] {
            let bytes = wat::parse_str(format!(
                r#"(component (import "{import}" (instance (export "f" (func)))))"#
            ))
            .unwrap();
            let e = rt.prepare(&bytes).unwrap_err();
            assert!(matches!(e, DeployError::Imports(_)), "{e}");
            assert!(e.to_string().contains(import), "{e}");
        }
        // What a Rust guest imports is all provided, stdout included.
        let m = rt.prepare(&canal_testnet::guests::bytes("noop").unwrap());
        assert!(m.is_ok(), "{m:?}");
    }

    #[test]
    fn a_reused_context_shows_each_invocation_only_its_own_output() {
        use wasmtime_wasi::cli::StdoutStream;
        let capture = Capture::default();
        let first = capture.fresh();
        let mut stream = capture.p2_stream();
        stream
            .write(bytes::Bytes::from_static(b"from the first\n"))
            .unwrap();
        assert_eq!(&first.contents()[..], b"from the first\n");
        // The next invocation's stream writes to its own pipe, and the first's is untouched.
        let second = capture.fresh();
        assert!(second.contents().is_empty());
        capture
            .p2_stream()
            .write(bytes::Bytes::from_static(b"from the second\n"))
            .unwrap();
        assert_eq!(&second.contents()[..], b"from the second\n");
        assert_eq!(&first.contents()[..], b"from the first\n");
    }

    #[test]
    fn contexts_are_reused_and_bounded_by_the_pool() {
        let rt = runtime();
        for _ in 0..10 {
            assert_eq!(
                run(&rt, "uppercase", "hi", &Limits::default()).result,
                Ok(())
            );
        }
        let kept = rt.contexts.lock().unwrap().len();
        // One at a time: the one context made is the one reused.
        assert_eq!(kept, 1);
    }

    #[test]
    fn the_artifact_cache_survives_a_new_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            cache_dir: Some(dir.path().to_path_buf()),
            instances: 2,
            max_memory_bytes: 64 << 20,
        };
        let bytes = canal_testnet::guests::bytes("uppercase").unwrap();
        let first = Runtime::new(&config).unwrap().prepare(&bytes).unwrap();
        assert!(!first.from_cache);
        let again = Runtime::new(&config).unwrap().prepare(&bytes).unwrap();
        assert!(again.from_cache);
        assert_eq!(first.hash, again.hash);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Not a test of behaviour: prints the per-event cost of the no-op guest. Run with
    /// `cargo test -p canal-triggers --lib -- --ignored --nocapture per_event_cost`.
    #[test]
    #[ignore]
    fn per_event_cost() {
        let rt = Runtime::new(&RuntimeConfig::default()).unwrap();
        let bytes = canal_testnet::guests::bytes("noop").unwrap();
        let m = rt.prepare(&bytes).unwrap();
        let c = Component::new(&rt.engine, &bytes).unwrap();
        for (name, _) in c.component_type().imports(&rt.engine) {
            println!("import {name}");
        }
        let mut lat = Vec::new();
        for i in 0..5200 {
            let t = Instant::now();
            let r = rt.invoke(
                &m,
                EventIn {
                    topic: "bench/in".into(),
                    id: "e".into(),
                    offset: Some(0),
                    time_ms: 0,
                    headers: Vec::new(),
                    payload: b"21.5".to_vec(),
                },
                Arc::new(crate::host::EmptyState),
                BTreeMap::new(),
                None,
                &Limits::default(),
            );
            assert_eq!(r.result, Ok(()));
            if i >= 200 {
                lat.push(t.elapsed());
            }
        }
        lat.sort();
        println!(
            "p50 {:?} p99 {:?}",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
    }
}

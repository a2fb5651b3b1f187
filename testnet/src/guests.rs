//! The guest functions of `examples/functions`, built for `wasm32-wasip2` on first use, for
//! tests and benchmarks that need real WebAssembly components.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The guest workspace.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("functions")
}

/// Builds the guest functions (once per process; cargo makes later builds no-ops) and
/// returns the path of `name`'s component (`uppercase`, `threshold`, `counter`,
/// `misbehave`).
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let ws = workspace();
    BUILT
        .get_or_init(|| build(&ws).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let p = ws
        .join("target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    if !p.exists() {
        bail!(
            "{} was not built: is {name} a member of {}?",
            p.display(),
            ws.display()
        );
    }
    Ok(p)
}

/// The bytes of `name`'s component.
pub fn bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let p = path(name)?;
    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
}

fn build(ws: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .current_dir(ws)
        // The outer build's settings are not the guests'.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .context("cannot run cargo to build the guest functions")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("wasm32-wasip2") && err.contains("target may not be installed") {
            "\nthe wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`"
        } else {
            ""
        };
        bail!(
            "building the guest functions in {} failed:\n{err}{hint}",
            ws.display()
        );
    }
    Ok(())
}

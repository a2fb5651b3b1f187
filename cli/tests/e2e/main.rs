//! End-to-end tests: real `canal node` processes on loopback, each with its own data
//! directory, driven through the HTTP API and the `canal` CLI. One test crate, so the stack is
//! linked once.

#![allow(clippy::unwrap_used, missing_docs)]

mod admission;
mod auth;
mod functions;
mod hostile;
mod mesh;
mod mqtt;
mod pubsub;
mod raft;
mod shard_groups;
mod tiers;

use canal_proto::api::Peers;
use canal_testnet::{Testnet, wait_for};
use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_canal");

/// Runs the `canal` CLI and returns its output. It carries the harness's admin token
/// (`CANAL_TOKEN`), and a `canal testnet up` gets the harness's token key, so that the
/// persistent testnet accepts that token too.
pub(crate) async fn canal(args: &[&str]) -> Output {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if args.len() >= 2 && args[0] == "testnet" && args[1] == "up" {
        let key = canal_testnet::auth::process_key_file().unwrap();
        args.extend(["--token-key".into(), key.display().to_string()]);
    }
    tokio::process::Command::new(BIN)
        .args(&args)
        .env_remove("CANAL_API")
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until node `i` lists exactly the peer ids in `want`.
pub(crate) async fn wait_peer_set(
    net: &Testnet,
    i: usize,
    want: &BTreeSet<String>,
    timeout: Duration,
) -> Peers {
    let api = net.api(i).unwrap();
    let what = format!(
        "{} to list exactly {} peers",
        net.node(i).name(),
        want.len()
    );
    wait_for(&what, timeout, || {
        let api = api.clone();
        async move {
            let peers: Peers = api.get("/v1/peers").await.map_err(|e| e.to_string())?;
            let got: BTreeSet<String> =
                peers.peers.iter().map(|p| p.caps.peer_id.clone()).collect();
            if &got == want {
                Ok(peers)
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await
    .unwrap()
}

/// Asserts a failed command: the exit code, one line on stderr that contains `needle`, and
/// no panic.
pub(crate) fn assert_clear_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

/// The last line a node printed (errors come after log lines).
pub(crate) fn last_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or_default().to_string()
}

//! The relay process of the persistent testnet (`canal testnet relay`, started by `up`).
//!
//! The nodes of `canal testnet up --tiers ...` outlive the command, so their relays must too:
//! one detached process runs a [`Fabric`] with a relay per node on the ports `up` chose, and
//! takes partitions through a control file. Everything is on disk, versioned:
//!
//! ```text
//!   DIR/relays.json        the plan, written by `up`: each node's tier, real listen address,
//!                          relay address and link
//!   DIR/relay.pid          written right after spawning, so `down` stops the relays even
//!                          after an interrupted `up`
//!   DIR/relay.log          the process's output
//!   DIR/partition.json     the control file: `partition` and `heal` write it (a generation
//!                          number and the nodes cut off), the process polls it
//!   DIR/relay-state.json   written by the process: its pid and the generation it applied
//!                          (first written once every relay listens)
//! ```

use crate::relay::{Fabric, LinkSettings};
use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The version of the files below.
const FORMAT: u32 = 1;

/// How often the process looks at the control file.
const POLL: Duration = Duration::from_millis(100);

/// One node's relay, as planned by `up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayPlanNode {
    /// `node0`, ...
    pub name: String,
    /// Its tier.
    pub tier: String,
    /// Where the node really listens for peers.
    pub listen: SocketAddr,
    /// Where its relay listens: the address the node announces.
    pub relay: SocketAddr,
    /// Its link, as `LATENCY[±JITTER][/LOSS%]`.
    pub link: String,
}

/// `DIR/relays.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayPlan {
    /// The file format's version (`FORMAT`).
    pub version: u32,
    /// The nodes, in index order.
    pub nodes: Vec<RelayPlanNode>,
}

/// `DIR/partition.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// The file format's version (`FORMAT`).
    pub version: u32,
    /// Bumped on every write, so the process can say which it applied.
    pub generation: u64,
    /// The indices of the nodes cut off from the rest; empty: none.
    pub cut: Vec<usize>,
}

/// `DIR/relay-state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayState {
    /// The file format's version (`FORMAT`).
    pub version: u32,
    /// The relay process.
    pub pid: u32,
    /// The control generation in force.
    pub generation: u64,
    /// The nodes cut off now.
    pub cut: Vec<usize>,
}

/// The plan file of the testnet in `dir`.
pub fn plan_path(dir: &Path) -> PathBuf {
    dir.join("relays.json")
}

/// The pid file of its relay process.
pub fn pid_path(dir: &Path) -> PathBuf {
    dir.join("relay.pid")
}

/// The log of its relay process.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("relay.log")
}

/// Its control file.
pub fn control_path(dir: &Path) -> PathBuf {
    dir.join("partition.json")
}

/// The state its relay process reports.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("relay-state.json")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
}

/// Writes `value` to `path` through a temporary file and a rename, so a reader never sees
/// half a file.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads the plan of the testnet in `dir`; `None` if it runs without relays.
pub fn read_plan(dir: &Path) -> anyhow::Result<Option<RelayPlan>> {
    let path = plan_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let plan: RelayPlan = read_json(&path)?;
    if plan.version != FORMAT {
        bail!(
            "{} has format version {}, this canal reads version {FORMAT}",
            path.display(),
            plan.version
        );
    }
    Ok(Some(plan))
}

/// The control file's content now (the default if there is none).
pub fn read_control(dir: &Path) -> anyhow::Result<Control> {
    let path = control_path(dir);
    if !path.exists() {
        return Ok(Control {
            version: FORMAT,
            ..Control::default()
        });
    }
    let c: Control = read_json(&path)?;
    if c.version != FORMAT {
        bail!(
            "{} has format version {}, this canal reads version {FORMAT}",
            path.display(),
            c.version
        );
    }
    Ok(c)
}

/// What the relay process last reported, if anything.
pub fn read_state(dir: &Path) -> Option<RelayState> {
    read_json(&state_path(dir)).ok()
}

/// Runs the relays of the testnet in `dir` until `shutdown` resolves: binds every relay of
/// the plan, then applies the control file whenever it changes. Reports itself in
/// `DIR/relay-state.json`.
pub async fn run(dir: &Path, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let plan = read_plan(dir)?.ok_or_else(|| {
        anyhow!(
            "{} is missing: the testnet in {} has no relays",
            plan_path(dir).display(),
            dir.display()
        )
    })?;
    let fabric = Fabric::new();
    for (i, n) in plan.nodes.iter().enumerate() {
        let link = LinkSettings::parse(&n.link)
            .map_err(|e| anyhow!("{}: {}'s link: {e}", plan_path(dir).display(), n.name))?;
        let r = fabric
            .add_at(n.relay, Some(n.listen), link)
            .await
            .with_context(|| format!("cannot listen for {}'s relay on {}", n.name, n.relay))?;
        debug_assert_eq!(r, i);
        eprintln!(
            "{}: relay {} -> {} ({}, {link})",
            n.name, n.relay, n.listen, n.tier
        );
    }
    let pid = std::process::id();
    let mut applied: Option<u64> = None;
    tokio::pin!(shutdown);
    loop {
        // The nodes' pids (they change on restart), so the relays can place a connection
        // from an unknown port by the process that holds it.
        for (i, n) in plan.nodes.iter().enumerate() {
            let pid = std::fs::read_to_string(dir.join(&n.name).join("pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            fabric.set_pid(i, pid);
        }
        match read_control(dir) {
            Ok(c) if applied != Some(c.generation) => {
                let cut: Vec<usize> = c
                    .cut
                    .iter()
                    .copied()
                    .filter(|i| *i < fabric.len())
                    .collect();
                fabric.partition(&cut);
                write_json(
                    &state_path(dir),
                    &RelayState {
                        version: FORMAT,
                        pid,
                        generation: c.generation,
                        cut: cut.clone(),
                    },
                )?;
                if !cut.is_empty() {
                    eprintln!("generation {}: cut off {cut:?}", c.generation);
                } else if applied.is_some() {
                    eprintln!("generation {}: healed", c.generation);
                }
                applied = Some(c.generation);
            }
            Ok(_) => {}
            // A damaged control file changes nothing; `partition` rewrites it whole.
            Err(e) => eprintln!("{e:#}"),
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    eprintln!("relays stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::wait_for;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn the_process_serves_the_plan_and_follows_the_control_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        // Two "nodes": echo servers; node 0's outgoing connections come from its port.
        let mut nodes = Vec::new();
        for i in 0..2 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket.set_reuseport(true).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l = socket.listen(16).unwrap();
            let listen = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
            nodes.push(RelayPlanNode {
                name: format!("node{i}"),
                tier: "edge".into(),
                listen,
                relay: relay.local_addr().unwrap(),
                link: "5ms".into(),
            });
        }
        write_json(
            &plan_path(&dir),
            &RelayPlan {
                version: FORMAT,
                nodes: nodes.clone(),
            },
        )
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let d = dir.clone();
        let task = tokio::spawn(async move {
            run(&d, async {
                let _ = stopped.await;
            })
            .await
        });
        let d = &dir;
        wait_for(
            "the relays to listen",
            Duration::from_secs(10),
            || async move { read_state(d).ok_or_else(|| "no state yet".to_string()) },
        )
        .await
        .unwrap();

        // From node 0's port to node 1's relay: through, then cut, then healed.
        let from0 = |to: SocketAddr, from: SocketAddr| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(from)?;
            let mut s: TcpStream = socket.connect(to).await?;
            s.write_all(b"hi").await?;
            let mut got = [0u8; 2];
            s.read_exact(&mut got).await?;
            std::io::Result::Ok(got)
        };
        assert_eq!(
            &from0(nodes[1].relay, nodes[0].listen).await.unwrap(),
            b"hi"
        );
        for (generation, cut, through) in [(1, vec![1], false), (2, vec![], true)] {
            write_json(
                &control_path(&dir),
                &Control {
                    version: FORMAT,
                    generation,
                    cut: cut.clone(),
                },
            )
            .unwrap();
            let n = &nodes;
            let cut = &cut;
            wait_for(
                "the control file to apply",
                Duration::from_secs(10),
                || async move {
                    match read_state(d) {
                        Some(s) if s.generation == generation && s.cut == *cut => {}
                        other => return Err(format!("{other:?}")),
                    }
                    // A connection may linger in TIME_WAIT for a moment: retry until it holds.
                    match from0(n[1].relay, n[0].listen).await.is_ok() == through {
                        true => Ok(()),
                        false => Err(format!("connection through: {}", !through)),
                    }
                },
            )
            .await
            .unwrap();
        }
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}

//! Output: aligned tables with units for people, JSON for scripts.

use canal_proto::api::{Locate, Peers};
use canal_proto::size::format_bytes;
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

fn ago(ms: u64) -> String {
    if ms < 1000 {
        "now".into()
    } else {
        format!("{:.0}s ago", ms as f64 / 1000.0)
    }
}

pub(crate) fn peers(p: &Peers, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(p);
    }
    let mut t = table(&[
        "PEER",
        "TIER",
        "LABELS",
        "CPU",
        "MEMORY",
        "GPUS",
        "LOAD",
        "RTT",
        "SEEN",
        "ADDRESSES",
    ]);
    for peer in &p.peers {
        let c = &peer.caps;
        let id = if peer.is_self {
            format!("{} (self)", c.peer_id)
        } else {
            c.peer_id.clone()
        };
        let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let gpus: Vec<String> = c.gpus().map(|g| g.describe()).collect();
        t.add_row(vec![
            id,
            c.tier.clone(),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            format!("{} cores", c.cpu_cores),
            format!(
                "{} free of {}",
                format_bytes(c.memory_available_bytes),
                format_bytes(c.memory_total_bytes)
            ),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(", ")
            },
            format!(
                "cpu {:.0}%, queue {}, running {}",
                c.load.cpu_percent, c.load.queue_len, c.load.running_invocations
            ),
            peer.rtt_ms
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            if peer.is_self {
                "-".into()
            } else {
                ago(peer.last_seen_ms)
            },
            c.listen_addrs.join(" "),
        ]);
    }
    println!("{t}");
    println!("{} peers", p.peers.len());
    Ok(())
}

pub(crate) fn locate(l: &Locate, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(l);
    }
    println!("topic     {}", l.topic);
    println!("key       {}", l.key);
    println!(
        "shard     {} of {} (key {})",
        l.shard, l.shards, l.shard_key
    );
    println!("policy    {}", l.policy);
    println!(
        "home      {} closest of {} peers (replication factor {})",
        l.home.len(),
        l.members,
        l.replication_factor
    );
    let mut t = table(&["HOME PEER", "XOR DISTANCE", "REPLICA"]);
    for h in &l.home {
        let replica = if l.replicas.contains(&h.peer_id) {
            "yes"
        } else {
            "no"
        };
        t.add_row(vec![h.peer_id.clone(), h.distance.clone(), replica.into()]);
    }
    for r in l
        .replicas
        .iter()
        .filter(|r| !l.home.iter().any(|h| &h.peer_id == *r))
    {
        t.add_row(vec![r.clone(), "-".into(), "yes (placed)".into()]);
    }
    println!("{t}");
    Ok(())
}

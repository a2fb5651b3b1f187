//! Output: aligned tables with units for people, JSON for scripts.

use canal_proto::api::{ClusterShards, ClusterStatus, Locate, Peers};
use canal_proto::size::format_bytes;
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

/// Prints `v` as pretty JSON.
pub(crate) fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A table for people: no borders, a header row.
pub(crate) fn table(header: &[&str]) -> Table {
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
        "MQTT",
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
            c.mqtt_addr.clone().unwrap_or_else(|| "-".into()),
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
    match l.map_epoch {
        Some(epoch) => println!(
            "planned   {} (shard map epoch {epoch}, preferred leader first)",
            if l.planned_replicas.is_empty() {
                "no replica".to_string()
            } else {
                l.planned_replicas.join(", ")
            }
        ),
        None => println!("planned   - (no shard map committed yet)"),
    }
    println!("policy    {}", l.policy);
    println!(
        "home      {} closest of {} peers (replication factor {})",
        l.home.len(),
        l.members,
        l.replication_factor
    );
    let mut t = table(&["PEER", "XOR DISTANCE", "REPLICA", "PLANNED"]);
    let planned = |p: &str| {
        match l.planned_replicas.iter().position(|r| r == p) {
            Some(0) => "yes (preferred leader)",
            Some(_) => "yes",
            None => "no",
        }
        .to_string()
    };
    for h in &l.home {
        let replica = if l.replicas.contains(&h.peer_id) {
            "yes"
        } else {
            "no"
        };
        t.add_row(vec![
            h.peer_id.clone(),
            h.distance.clone(),
            replica.into(),
            planned(&h.peer_id),
        ]);
    }
    for r in l
        .replicas
        .iter()
        .filter(|r| !l.home.iter().any(|h| &h.peer_id == *r))
    {
        t.add_row(vec![
            r.clone(),
            "-".into(),
            "yes (placed)".into(),
            planned(r),
        ]);
    }
    for p in l
        .planned_replicas
        .iter()
        .filter(|p| !l.home.iter().any(|h| &h.peer_id == *p) && !l.replicas.contains(p))
    {
        t.add_row(vec![p.clone(), "-".into(), "no".into(), planned(p)]);
    }
    println!("{t}");
    // Where the events are: the Raft group that holds the topic's log, as the answering
    // node's replica knows it (a node that hosts no such group knows no members).
    if !l.group.is_empty() {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        println!(
            "group     {} (leader {}): holds the log",
            l.group,
            l.leader.as_deref().unwrap_or("none known")
        );
        println!("voters    {}", list(&l.voters));
        println!("learners  {}", list(&l.learners));
    }
    Ok(())
}

/// A shard's own group in a cell: its id and state, then its leader, voters and learners
/// where the node hosts it.
fn shard_group(g: &canal_proto::api::ShardGroupStatus) -> String {
    let mut out = format!("{} {}", g.group, g.state);
    if let Some(l) = &g.leader {
        out.push_str(&format!("; leader {l}"));
    }
    if !g.voters.is_empty() {
        out.push_str(&format!("; voters {}", g.voters.join(", ")));
    }
    if !g.learners.is_empty() {
        out.push_str(&format!("; learners {}", g.learners.join(", ")));
    }
    out
}

/// The shard map: a line on the map, a row per shard, a row per peer, the notes and the
/// planned moves (each one with `moves`).
pub(crate) fn shards(c: &ClusterShards, moves: bool, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(c);
    }
    if c.epoch == 0 {
        for n in &c.notes {
            println!("{n}");
        }
        return Ok(());
    }
    println!(
        "shard map epoch {}: {} shards, K = {}, {}",
        c.epoch,
        c.shards,
        c.replication,
        match &c.spread {
            Some(label) => format!("spread over {label}"),
            None => "no spread label".to_string(),
        }
    );
    let mut t = table(&[
        "SHARD",
        "REPLICAS (PREFERRED LEADER FIRST)",
        "SERVED BY",
        "GROUP LEADER",
        "SHARD GROUP (AS THIS NODE SEES IT)",
    ]);
    for r in &c.rows {
        let mut replicas = if r.replicas.is_empty() {
            "-".to_string()
        } else {
            r.replicas.join(", ")
        };
        if let Some(why) = &r.shortfall {
            replicas.push_str(&format!(" ({why})"));
        }
        t.add_row(vec![
            r.shard.to_string(),
            replicas,
            r.served_by.clone(),
            r.group_leader
                .clone()
                .unwrap_or_else(|| "none known".into()),
            r.shard_group
                .as_ref()
                .map_or_else(|| "-".to_string(), shard_group),
        ]);
    }
    println!("{t}");
    let mut p = table(&["PEER", "REPLICAS", "PREFERRED LEADER OF"]);
    for l in &c.peers {
        p.add_row(vec![
            l.peer_id.clone(),
            l.replicas.to_string(),
            l.leaders.to_string(),
        ]);
    }
    println!("{p}");
    for n in &c.notes {
        println!("note: {n}");
    }
    match c.moves_from {
        None => println!("moves: none (the first map)"),
        Some(from) => {
            let count = |step: &str| c.moves.iter().filter(|m| m.step == step).count();
            println!(
                "moves from epoch {from}: {} planned ({} add learner, {} promote, {} transfer leader, {} remove); each shard group's leader makes them one at a time (SHARD GROUP shows where it stands)",
                c.moves.len(),
                count("add_learner"),
                count("promote"),
                count("transfer_leader"),
                count("remove"),
            );
            if moves {
                let mut m = table(&["SHARD", "STEP", "PEER", "TO"]);
                for mv in &c.moves {
                    m.add_row(vec![
                        mv.shard.to_string(),
                        mv.step.replace('_', " "),
                        mv.peer.clone(),
                        mv.to.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                println!("{m}");
            }
        }
    }
    Ok(())
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub(crate) fn cluster(c: &ClusterStatus, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(c);
    }
    for g in &c.groups {
        let view = g.members.iter().find_map(|m| m.status.as_ref());
        let peer_of = |id: u64| {
            view.and_then(|v| {
                v.nodes
                    .iter()
                    .find(|(n, _)| *n == id)
                    .map(|(_, p)| p.clone())
            })
            .unwrap_or_else(|| id.to_string())
        };
        let leader = g
            .members
            .iter()
            .filter_map(|m| m.status.as_ref())
            .find_map(|s| s.leader);
        let term = g
            .members
            .iter()
            .filter_map(|m| m.status.as_ref())
            .map(|s| s.term)
            .max();
        println!(
            "group {}: leader {}, term {}, {} voters, {} learners",
            g.group,
            leader.map(peer_of).unwrap_or_else(|| "none".into()),
            opt(term),
            view.map(|v| v.voters.len()).unwrap_or(0),
            view.map(|v| v.learners.len()).unwrap_or(0),
        );
        let mut t = table(&[
            "MEMBER",
            "ROLE",
            "STATE",
            "TERM",
            "LAST LOG",
            "COMMITTED",
            "APPLIED",
            "SNAPSHOT",
        ]);
        for m in &g.members {
            let role = match view {
                Some(v) if v.voters.contains(&m.node_id) => "voter",
                Some(v) if v.learners.contains(&m.node_id) => "learner",
                _ => "-",
            };
            match &m.status {
                Some(s) => t.add_row(vec![
                    s.peer_id.clone(),
                    role.into(),
                    s.state.clone(),
                    s.term.to_string(),
                    opt(s.last_log_index),
                    opt(s.committed_index),
                    opt(s.applied_index),
                    opt(s.snapshot_index),
                ]),
                None => t.add_row(vec![
                    peer_of(m.node_id),
                    role.into(),
                    format!("unreachable: {}", m.error.clone().unwrap_or_default()),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]),
            };
        }
        println!("{t}");
    }
    Ok(())
}

/// A topic's settings, and the filter they come from.
pub(crate) fn settings(
    a: &canal_proto::settings::SettingsAnswer,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        return json(a);
    }
    let s = &a.settings;
    let or_none = |n: u64, f: &dyn Fn(u64) -> String| {
        if n == 0 { "no limit".to_string() } else { f(n) }
    };
    println!(
        "{}: from {}",
        a.topic,
        a.from.as_deref().unwrap_or("the defaults")
    );
    println!("  retain events  {}", s.retention.max_events);
    println!(
        "  retain bytes   {}",
        or_none(s.retention.max_bytes, &canal_proto::size::format_bytes)
    );
    println!(
        "  retain age     {}",
        or_none(s.retention.max_age_ms, &|ms| humantime_ms(ms))
    );
    println!(
        "  max payload    {}",
        canal_proto::size::format_bytes(s.max_payload_bytes)
    );
    println!(
        "  dedup window   {}",
        humantime_ms(s.retention.dedup_window_ms)
    );
    Ok(())
}

fn humantime_ms(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0 => format!("{ms} ms"),
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

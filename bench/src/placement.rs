//! `canal bench placement`: how well the `latency` policy places a function, against
//! `topology`, on a local testnet with emulated tiers.
//!
//! Three cloud voters (one of them leads the data group, where events enter) behind 1 ms
//! links, and three workers the function may run on: two edge peers behind 30 ms links and
//! one cloud peer behind 1 ms. For each policy the same function (`uppercase`) is deployed,
//! restricted to the workers, and events are published through it; the oracle is the worker
//! with the lowest true response time (round trip from the event source plus execution,
//! the same on every worker here, so the cloud worker). Reported: the fraction of events
//! each policy ran on the oracle (placement accuracy), and publish -> output -> subscriber
//! latency p50/p99.

use crate::{collect_events, ms, pct, publish_many, subscribe};
use anyhow::{Context, bail};
use canal_client::Method;
use canal_testnet::{Api, LinkSettings, NodeOptions, Testnet, wait_for};
use std::time::{Duration, Instant};

const EDGE: Duration = Duration::from_millis(30);
const CLOUD: Duration = Duration::from_millis(1);

async fn put(api: &Api, path: &str, body: Vec<u8>) -> anyhow::Result<()> {
    let (status, text) = api.send(Method::PUT, path, body, None).await?;
    if !(200..300).contains(&status) {
        bail!("PUT {path}: HTTP {status}: {text}");
    }
    Ok(())
}

/// The testnet: voters 0-2 (cloud), workers 3-4 (edge) and 5 (cloud).
async fn tiers() -> anyhow::Result<Testnet> {
    let bin = std::env::current_exe().context("cannot find the canal binary to run nodes with")?;
    eprintln!("starting 3 cloud voters and 3 workers (2 edge at 30 ms, 1 cloud at 1 ms) ...");
    let quiet = ["--log".to_string(), "warn".to_string()];
    let mut voter_args = vec![
        "--bootstrap-expect".into(),
        "3".into(),
        "--voters".into(),
        "3".into(),
    ];
    voter_args.extend(quiet.iter().cloned());
    let mut net = Testnet::start(&bin, 3, |_| NodeOptions {
        link: Some(LinkSettings::latency(CLOUD)),
        tier: Some("cloud".into()),
        extra_args: voter_args.clone(),
        ..Default::default()
    })
    .await?;
    let netr = &net;
    wait_for(
        "the cluster to elect a leader",
        Duration::from_secs(60),
        || async move {
            match crate::leader(netr).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("no leader yet".to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    for (tier, delay) in [("edge", EDGE), ("edge", EDGE), ("cloud", CLOUD)] {
        let mut args = vec!["--voters".to_string(), "3".to_string()];
        args.extend(quiet.iter().cloned());
        net.add_node(NodeOptions {
            link: Some(LinkSettings::latency(delay)),
            tier: Some(tier.into()),
            labels: vec![("pool".into(), "workers".into())],
            bootstrap_from_first: true,
            extra_args: args,
            ..Default::default()
        })
        .await?;
    }
    // Every node measures its round trip to every other: the decider may be any voter.
    for i in 0..net.len() {
        let api = net.api(i)?;
        wait_for(
            &format!("node{i} to measure its round trips to all six"),
            Duration::from_secs(90),
            || {
                let api = api.clone();
                async move {
                    let p: canal_proto::api::Peers =
                        api.get("/v1/peers").await.map_err(|e| e.to_string())?;
                    let measured = p
                        .peers
                        .iter()
                        .filter(|p| p.is_self || p.rtt_ms.is_some())
                        .count();
                    if measured == 6 {
                        Ok(())
                    } else {
                        Err(format!("{measured} of 6 peers measured"))
                    }
                }
            },
        )
        .await?;
    }
    Ok(net)
}

/// `canal bench placement`: `events` events per policy with `publishers` in flight on emulated tiers; how often the latency policy runs them on the best peer, and end-to-end latency, against topology.
pub async fn run(events: usize, publishers: usize, json: bool) -> anyhow::Result<()> {
    if events == 0 || publishers == 0 {
        bail!("--events and --publishers must be at least 1");
    }
    let net = tiers().await?;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i)).collect::<anyhow::Result<_>>()?;
    let oracle = net.node(5).info()?.peer_id.clone();
    let wasm = canal_testnet::guests::bytes("uppercase")?;
    let mut results = Vec::new();
    for policy in ["topology", "latency"] {
        let name = format!("p-{policy}");
        put(
            &apis[0],
            &format!("/v1/functions/{name}?policy={policy}&labels=pool=workers"),
            wasm.clone(),
        )
        .await?;
        let trigger = serde_json::json!({
            "on": format!("bench-place/{policy}/+"), "fn": name, "out": format!("bench-place/out-{policy}"),
        });
        put(
            &apis[0],
            &format!("/v1/triggers/t-{policy}"),
            serde_json::to_vec(&trigger)?,
        )
        .await?;
        // Warm up: a few events, so execution times are measured and the placement settles.
        let base = apis[0].clone();
        let fname = name.clone();
        let chosen = wait_for("the function to be placed", Duration::from_secs(60), || {
            let api = base.clone();
            let fname = fname.clone();
            async move {
                let a: canal_proto::api::PlacementAnswer = api
                    .get(&format!("/v1/functions/{fname}/placement"))
                    .await
                    .map_err(|e| e.to_string())?;
                match a.committed.and_then(|p| p.decision.chosen.first().cloned()) {
                    Some(peer) => Ok(peer),
                    None => Err("not placed yet".to_string()),
                }
            }
        })
        .await?;
        let path = format!("/v1/subscribe?filter=bench-place%2Fout-{policy}&from=earliest");
        let resp = subscribe(&apis[2], &path).await?;
        let sub = collect_events(resp, events);
        let started = Instant::now();
        let topic = move |i: usize| format!("bench-place/{policy}/s{}", i % 4);
        publish_many(
            &apis,
            topic,
            1,
            events,
            publishers,
            b"reading".to_vec(),
            &format!("pl-{policy}"),
        )
        .await?;
        let (got, _) = sub.await?;
        let executors: Vec<String> = got
            .iter()
            .map(|(_, e)| e.headers.get("canal-executor").cloned().unwrap_or_default())
            .collect();
        let mut lat: Vec<Duration> = got.into_iter().map(|(d, _)| d).collect();
        lat.sort();
        if lat.len() < events {
            // Say why: the executing peer's warnings.
            for i in 0..net.len() {
                if net.node(i).info().is_ok_and(|n| n.peer_id == chosen) {
                    let api = net.api(i)?;
                    eprintln!(
                        "executor: {} commits, {} refused, {} invocations",
                        api.metric_sum("canal_trigger_commits_total")
                            .await
                            .unwrap_or(-1.0),
                        api.metric_sum("canal_trigger_refused_commits_total")
                            .await
                            .unwrap_or(-1.0),
                        api.metric_sum("canal_fn_invocations_total")
                            .await
                            .unwrap_or(-1.0),
                    );
                    eprintln!(
                        "only {} of {events} outputs arrived; the executor's log ends:\n{}",
                        lat.len(),
                        net.node(i).log_tail(20)
                    );
                }
            }
        }
        let on_oracle = executors.iter().filter(|e| **e == oracle).count();
        let accuracy = on_oracle as f64 / executors.len().max(1) as f64;
        eprintln!(
            "{policy:>8}: placed on {} ({}); {} of {} events on the oracle ({:.0}%); latency p50 {} p99 {} ({:.1} s)",
            short(&chosen),
            if chosen == oracle {
                "the oracle"
            } else {
                "not the oracle"
            },
            on_oracle,
            executors.len(),
            accuracy * 100.0,
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 99.0)),
            started.elapsed().as_secs_f64(),
        );
        results.push(serde_json::json!({
            "policy": policy, "chosen": chosen, "oracle": oracle, "events": executors.len(),
            "accuracy": accuracy,
            "p50_ms": pct(&lat, 50.0).as_secs_f64() * 1000.0,
            "p99_ms": pct(&lat, 99.0).as_secs_f64() * 1000.0,
        }));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": results }))?
        );
    }
    Ok(())
}

fn short(peer: &str) -> String {
    let n = peer.len();
    format!("…{}", &peer[n.saturating_sub(8)..])
}

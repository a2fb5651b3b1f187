//! `canal bench fn`: what running functions costs.
//!
//! In this process, on one core: the per-event overhead of the `noop` example function (a
//! fresh pooled instance, the call, the teardown) as p50/p99 and events/s; the first event
//! after a deploy (compile + first call) and after a restart (artifact cache + first call).
//! Then on a local 3-node cluster: publish -> function (`uppercase`) -> output ->
//! subscriber latency, for a QoS 1 and a QoS 0 trigger.

use crate::{collect_latencies, local_cluster, ms, pct, publish_many, subscribe};
use anyhow::{Context, bail};
use canal_client::Method;
use canal_proto::Topic;
use canal_proto::function::Limits;
use canal_testnet::Api;
use canal_triggers::host::EmptyState;
use canal_triggers::runtime::EventIn;
use canal_triggers::{Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn event() -> EventIn {
    EventIn {
        topic: "bench/in".into(),
        id: "e".into(),
        offset: Some(0),
        time_ms: 0,
        headers: Vec::new(),
        payload: b"21.5".to_vec(),
    }
}

/// Measures the runtime in this process; returns the figures as JSON.
fn in_process(count: usize) -> anyhow::Result<serde_json::Value> {
    let bytes = canal_testnet::guests::bytes("noop")?;
    let cache = std::env::temp_dir().join(format!("canal-bench-fn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let config = RuntimeConfig {
        cache_dir: Some(cache.clone()),
        instances: 16,
        ..RuntimeConfig::default()
    };
    let limits = Limits::default();
    let run = |rt: &Runtime, m: &canal_triggers::Prepared| {
        rt.invoke(
            m,
            event(),
            Arc::new(EmptyState),
            BTreeMap::new(),
            Some(Topic::new("bench/out").map_err(|e| anyhow::anyhow!("{e}"))?),
            &limits,
        )
        .result
        .map_err(|e| anyhow::anyhow!("the noop function failed: {e}"))
    };

    let rt = Runtime::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    let m = rt.prepare(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&rt, &m)?;
    let after_deploy = t.elapsed();

    // Warm up, then time each event on this one thread.
    for _ in 0..200 {
        run(&rt, &m)?;
    }
    let mut lat = Vec::with_capacity(count);
    let all = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        run(&rt, &m)?;
        lat.push(t.elapsed());
    }
    let total = all.elapsed();
    lat.sort();
    drop(m);
    drop(rt);

    // A restarted node: a new engine, the compiled artifact from the disk cache.
    let rt = Runtime::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    let m = rt.prepare(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&rt, &m)?;
    let after_restart = t.elapsed();
    if !m.from_cache {
        bail!("the restarted runtime compiled again instead of loading its cache");
    }
    let _ = std::fs::remove_dir_all(&cache);

    let rate = count as f64 / total.as_secs_f64();
    eprintln!(
        "noop per event (fresh pooled instance, one core): p50 {:.1} us, p99 {:.1} us, {rate:.0} events/s",
        us(pct(&lat, 50.0)),
        us(pct(&lat, 99.0)),
    );
    eprintln!(
        "first event after deploy (compile + call): {}; after a restart (cached artifact + call): {}",
        ms(after_deploy),
        ms(after_restart)
    );
    Ok(serde_json::json!({
        "noop_p50_us": us(pct(&lat, 50.0)),
        "noop_p99_us": us(pct(&lat, 99.0)),
        "noop_events_per_s": rate,
        "first_after_deploy_ms": after_deploy.as_secs_f64() * 1000.0,
        "first_after_restart_ms": after_restart.as_secs_f64() * 1000.0,
    }))
}

async fn put(api: &Api, path: &str, body: Vec<u8>) -> anyhow::Result<()> {
    let (status, text) = api.send(Method::PUT, path, body, None).await?;
    if !(200..300).contains(&status) {
        bail!("PUT {path}: HTTP {status}: {text}");
    }
    Ok(())
}

/// Publish -> function -> output -> subscriber on a local cluster, per QoS.
async fn end_to_end(count: usize, publishers: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let net = local_cluster().await?;
    let apis: Vec<Api> = (0..3).map(|i| net.api(i)).collect::<anyhow::Result<_>>()?;
    let wasm = canal_testnet::guests::bytes("uppercase")?;
    put(&apis[0], "/v1/functions/upper", wasm).await?;
    let mut results = Vec::new();
    for q in [1u8, 0] {
        let trigger = serde_json::json!({
            "on": format!("bench-fn/in{q}/+"), "fn": "upper",
            "out": format!("bench-fn/out{q}"), "qos": q,
        });
        put(
            &apis[0],
            &format!("/v1/triggers/bench{q}"),
            serde_json::to_vec(&trigger)?,
        )
        .await?;
        // Let every node learn the trigger before events flow (QoS 0 runs as events pass).
        canal_testnet::wait_for(
            "the trigger to reach every node",
            Duration::from_secs(30),
            || {
                let apis = apis.clone();
                async move {
                    for a in &apis {
                        let (s, _) = a
                            .get_raw(&format!("/v1/triggers/bench{q}"))
                            .await
                            .map_err(|e| e.to_string())?;
                        if s != 200 {
                            return Err(format!("HTTP {s}"));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await?;
        let path = format!("/v1/subscribe?filter=bench-fn%2Fout{q}&qos={q}&from=earliest");
        let resp = subscribe(&apis[2], &path).await?;
        let sub = collect_latencies(resp, count);
        if q == 0 {
            // The executor must be known to want the trigger's input, the subscriber's node
            // its output.
            let placed: canal_proto::api::PlacementAnswer =
                apis[0].get("/v1/functions/upper/placement").await?;
            let executor = placed
                .committed
                .and_then(|p| p.decision.chosen.first().cloned())
                .context("the function is not placed")?;
            crate::wait_interest(&apis, &executor, "bench-fn/in0/+").await?;
            crate::wait_interest(&apis, &net.node(2).info()?.peer_id, "bench-fn/out0").await?;
        }
        let started = Instant::now();
        let topic = move |i: usize| format!("bench-fn/in{q}/s{}", i % 4);
        publish_many(
            &apis[1..2],
            topic,
            q,
            count,
            publishers,
            b"reading".to_vec(),
            &format!("fn{q}"),
        )
        .await?;
        let (mut lat, done) = sub.await?;
        lat.sort();
        let rate = lat.len() as f64 / done.duration_since(started).as_secs_f64();
        eprintln!(
            "QoS {q} publish -> function -> subscriber: {} of {count} outputs at {rate:.0}/s; latency p50 {} p99 {}",
            lat.len(),
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 99.0)),
        );
        results.push(serde_json::json!({
            "qos": q, "published": count, "delivered": lat.len(), "delivered_per_s": rate,
            "p50_ms": pct(&lat, 50.0).as_secs_f64() * 1000.0,
            "p99_ms": pct(&lat, 99.0).as_secs_f64() * 1000.0,
        }));
    }
    Ok(results)
}

/// `canal bench fn`: the per-event overhead of a no-op function in this process (`count` invocations), the first event after a deploy and after a restart, and publish -> function -> subscriber latency of `events` events with `publishers` in flight on a local cluster.
pub async fn run(count: usize, events: usize, publishers: usize, json: bool) -> anyhow::Result<()> {
    if count == 0 || publishers == 0 {
        bail!("--count and --publishers must be at least 1");
    }
    let local = tokio::task::spawn_blocking(move || in_process(count)).await??;
    let e2e = if events > 0 {
        end_to_end(events, publishers).await?
    } else {
        Vec::new()
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "runtime": local, "end_to_end": e2e })
            )?
        );
    }
    Ok(())
}

//! `canal bench mqtt [--compare-mosquitto]`: MQTT publish and subscribe on a local 3-node
//! cluster, and with `--compare-mosquitto` the same load on a local `mosquitto` in the same
//! run, side by side with the ratio.
//!
//! For each QoS: `publishers` MQTT 3.1.1 clients, one connection each, spread over the
//! nodes (client `p` on node `p % 3`), publish `count` messages of `size` bytes in all to
//! `bench/mqtt/{run}/t{p % 8}`; one subscriber on node 2 takes them all. Each payload starts
//! with its publish time (ns since the epoch), so the subscriber measures publish-to-delivery
//! latency. A QoS 1 publish counts when its PUBACK comes: on canal after a majority of three
//! replicas committed it, on mosquitto (one process, in memory) at once — the numbers say
//! what each costs, not the same guarantee.

use crate::{ms, now_ns, pct};
use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One run's numbers.
#[derive(Debug, Clone)]
struct Stats {
    qos: u8,
    published_per_s: f64,
    delivered: usize,
    delivered_per_s: f64,
    p50: Duration,
    p99: Duration,
}

fn opts(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(256);
    o.set_request_channel_capacity(1024);
    // canal takes the token as the password; mosquitto (anonymous) ignores it.
    o.set_credentials("canal", canal_testnet::admin_token());
    o
}

/// A subscriber on `addr` for `filter`; its latencies come on the returned channel once
/// `count` messages came or `idle` passed with none.
async fn subscriber(
    addr: SocketAddr,
    filter: &str,
    qos: QoS,
    count: usize,
    idle: Duration,
) -> anyhow::Result<(
    AsyncClient,
    tokio::task::JoinHandle<(Vec<Duration>, Instant)>,
)> {
    let (client, mut el) = AsyncClient::new(opts("bench-sub", addr), 1024);
    client.subscribe(filter, qos).await?;
    // Wait for the SUBACK before anyone publishes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), el.poll())
            .await
            .context("no SUBACK within 30 s")??;
        if let Event::Incoming(Packet::SubAck(_)) = ev {
            break;
        }
    }
    let task = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(count);
        let mut last = Instant::now();
        while lat.len() < count {
            match tokio::time::timeout(idle, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Some(b) = p.payload.get(..16) {
                        let mut t = [0u8; 16];
                        t.copy_from_slice(b);
                        let sent = u128::from_be_bytes(t);
                        lat.push(Duration::from_nanos(
                            now_ns().saturating_sub(sent).min(u64::MAX as u128) as u64,
                        ));
                        last = Instant::now();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (lat, last)
    });
    Ok((client, task))
}

/// One publisher: `n` messages to `topic`; done when the last is acknowledged (QoS 1) or,
/// for QoS 0, when the broker closed the connection after the DISCONNECT that follows the
/// last: it read them all (the client's "sent" only means queued in its own buffers, which
/// a broker that pushes back leaves full).
async fn publisher(
    id: String,
    addr: SocketAddr,
    topic: String,
    qos: QoS,
    n: usize,
    size: usize,
    done: mpsc::Sender<anyhow::Result<()>>,
) {
    let (client, mut el) = AsyncClient::new(opts(&id, addr), 1024);
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            let mut payload = vec![b'x'; size.max(16)];
            payload[..16].copy_from_slice(&now_ns().to_be_bytes());
            if client.publish(&topic, qos, false, payload).await.is_err() {
                return;
            }
        }
        if qos == QoS::AtMostOnce {
            let _ = client.disconnect().await;
        }
        // Keeps the client (and so the connection) until the acks are in.
        std::future::pending::<()>().await;
    });
    let mut left = n;
    let mut disconnecting = false;
    let r = loop {
        if left == 0 && qos == QoS::AtLeastOnce {
            break Ok(());
        }
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => left -= 1,
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                left = left.saturating_sub(1)
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => disconnecting = true,
            Ok(_) => {}
            // The broker closes the connection once it read the DISCONNECT.
            Err(_) if disconnecting && left == 0 => break Ok(()),
            Err(e) => break Err(anyhow::anyhow!("publisher {id}: {e}")),
        }
    };
    sender.abort();
    let _ = done.send(r).await;
}

/// One run against the brokers at `addrs` (publisher `p` on `addrs[p % len]`, the
/// subscriber on the last).
async fn run_once(
    addrs: &[SocketAddr],
    run: usize,
    q: u8,
    count: usize,
    publishers: usize,
    size: usize,
    before_publish: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Stats> {
    let qos = if q == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let filter = format!("bench/mqtt/{run}/#");
    let sub_addr = *addrs.last().context("no broker")?;
    let (_sub, sub) = subscriber(sub_addr, &filter, qos, count, Duration::from_secs(10)).await?;
    before_publish.await?;
    let (tx, mut rx) = mpsc::channel(publishers);
    let started = Instant::now();
    for p in 0..publishers {
        let n = count / publishers + usize::from(p < count % publishers);
        tokio::spawn(publisher(
            format!("bench-pub-{run}-{p}"),
            addrs[p % addrs.len()],
            format!("bench/mqtt/{run}/t{}", p % 8),
            qos,
            n,
            size,
            tx.clone(),
        ));
    }
    drop(tx);
    while let Some(r) = rx.recv().await {
        r?;
    }
    let published = started.elapsed();
    let (mut lat, last) = sub.await?;
    let delivered_in = last.saturating_duration_since(started).max(published);
    lat.sort();
    Ok(Stats {
        qos: q,
        published_per_s: count as f64 / published.as_secs_f64(),
        delivered: lat.len(),
        delivered_per_s: lat.len() as f64 / delivered_in.as_secs_f64(),
        p50: pct(&lat, 50.0),
        p99: pct(&lat, 99.0),
    })
}

/// The counters of the stages a message passes on its way to an MQTT subscriber (summed
/// over the nodes after each run, so a loss is seen where it happens): sent to and
/// received from peers on the QoS 0 lane, dropped on it (`canal_qos0_dropped_total`),
/// dropped by the subscriber's node's hub for a subscriber behind past its wait
/// (`canal_qos0_hub_dropped_total`), and missed as MQTT subscribers were told
/// (`canal_mqtt_missed_total`).
const STAGES: [&str; 5] = [
    "canal_qos0_sent_total",
    "canal_qos0_received_total",
    "canal_qos0_dropped_total",
    "canal_qos0_hub_dropped_total",
    "canal_mqtt_missed_total",
];

/// [`STAGES`] now, summed over `apis` (0 where a node does not answer).
async fn stages(apis: &[canal_testnet::Api]) -> Vec<f64> {
    let mut sums = vec![0.0; STAGES.len()];
    for api in apis {
        for (i, name) in STAGES.iter().enumerate() {
            sums[i] += api.metric_sum(name).await.unwrap_or(0.0);
        }
    }
    sums
}

/// A local mosquitto on a free loopback port, killed when dropped.
struct Mosquitto {
    _child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start_mosquitto(bin: &Path) -> anyhow::Result<Mosquitto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 256\nmax_queued_messages 100000\n"
        ),
    )?;
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {}: install it with apt-get install mosquitto, or give its path with --mosquitto",
                bin.display()
            )
        })?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    canal_testnet::wait_for(
        "mosquitto to listen",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    Ok(Mosquitto {
        _child: child,
        addr,
        _dir: dir,
    })
}

/// `canal bench mqtt`.
pub async fn run(
    count: usize,
    qos: Vec<u8>,
    publishers: usize,
    size: usize,
    mosquitto: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    if count == 0 || publishers == 0 || qos.iter().any(|q| *q > 1) {
        bail!("--count and --publishers must be at least 1, and --qos only 0 or 1");
    }
    let net = crate::local_cluster().await?;
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| net.node(i).mqtt_addr())
        .collect::<anyhow::Result<_>>()?;
    let apis: Vec<canal_testnet::Api> =
        (0..3).map(|i| net.api(i)).collect::<anyhow::Result<_>>()?;
    let peer2 = net.node(2).info()?.peer_id.clone();
    let mut canal = Vec::new();
    for (run, &q) in qos.iter().enumerate() {
        eprintln!("canal: QoS {q}, {count} messages of {size} B, {publishers} publishers ...");
        let filter = format!("bench/mqtt/{run}/#");
        let (ready_apis, peer2) = (apis.clone(), peer2.clone());
        // QoS 0 reaches other nodes once they know the subscriber's node wants it.
        let ready = async move {
            if q == 0 {
                crate::wait_interest(&ready_apis, &peer2, &filter).await?;
            }
            Ok(())
        };
        let before = stages(&apis).await;
        canal.push(run_once(&addrs, run, q, count, publishers, size, ready).await?);
        let after = stages(&apis).await;
        // Where messages went, summed over the nodes: a loss is attributed to a stage.
        let diff: Vec<String> = STAGES
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(name, (b, a))| format!("{name} {}", a - b))
            .collect();
        eprintln!("canal: QoS {q} stages: {}", diff.join(", "));
    }
    drop(net);
    let mut mosq = Vec::new();
    if let Some(bin) = &mosquitto {
        let m = start_mosquitto(bin).await?;
        for (run, &q) in qos.iter().enumerate() {
            eprintln!("mosquitto: QoS {q} ...");
            mosq.push(
                run_once(&[m.addr], run, q, count, publishers, size, async { Ok(()) }).await?,
            );
        }
    }
    if json {
        let row = |s: &Stats| {
            serde_json::json!({
                "qos": s.qos, "published_per_s": s.published_per_s, "delivered": s.delivered,
                "delivered_per_s": s.delivered_per_s,
                "p50_ms": s.p50.as_secs_f64() * 1000.0, "p99_ms": s.p99.as_secs_f64() * 1000.0,
            })
        };
        let out = serde_json::json!({
            "count": count, "size": size, "publishers": publishers,
            "canal": canal.iter().map(row).collect::<Vec<_>>(),
            "mosquitto": mosq.iter().map(row).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(vec![
        "BROKER",
        "QOS",
        "PUBLISHED/S",
        "DELIVERED",
        "DELIVERED/S",
        "P50",
        "P99",
        "PUBACK MEANS",
    ]);
    for (name, rows) in [("canal (3 nodes)", &canal), ("mosquitto (1 node)", &mosq)] {
        for s in rows.iter() {
            let means = match (s.qos, name.starts_with("canal")) {
                (0, _) => "-",
                (_, true) => "committed on 2 of 3 replicas",
                (_, false) => "received, in memory, one process",
            };
            t.add_row(vec![
                name.to_string(),
                s.qos.to_string(),
                format!("{:.0}", s.published_per_s),
                format!("{}/{count}", s.delivered),
                format!("{:.0}", s.delivered_per_s),
                ms(s.p50),
                ms(s.p99),
                means.to_string(),
            ]);
        }
    }
    println!("{t}");
    for (c, m) in canal.iter().zip(&mosq) {
        println!(
            "QoS {}: canal/mosquitto published {:.2}x, delivered {:.2}x",
            c.qos,
            c.published_per_s / m.published_per_s,
            c.delivered_per_s / m.delivered_per_s
        );
    }
    Ok(())
}

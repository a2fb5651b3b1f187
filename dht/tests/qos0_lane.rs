//! The QoS 0 lane: events go on their own protocol and per-peer queue, so a flood of them is
//! dropped and counted where a queue is full, and RPCs (Raft's channel) are still answered.

use canal_dht::{Dht, DhtConfig, LocalRecord};
use canal_proto::Capabilities;
use libp2p::identity;
use libp2p::metrics::Registry;
use std::time::{Duration, Instant};

struct Plain;

impl LocalRecord for Plain {
    fn measure(&mut self) -> Capabilities {
        Capabilities::default()
    }
}

async fn start(bootstrap: Vec<libp2p::Multiaddr>) -> Result<(Dht, Registry), String> {
    let mut config = DhtConfig::new(
        identity::Keypair::generate_ed25519(),
        vec!["/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?],
    );
    config.bootstrap = bootstrap;
    config.advertise_interval = Duration::from_millis(300);
    let mut registry = Registry::default();
    let dht = Dht::start(config, Box::new(Plain), &mut registry)
        .await
        .map_err(|e| e.to_string())?;
    Ok((dht, registry))
}

/// The sum of every metric line that starts with `prefix`.
fn metric_sum(registry: &Registry, prefix: &str) -> f64 {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_is_dropped_and_counted_while_rpcs_are_answered() -> Result<(), String> {
    let (a, reg_a) = start(Vec::new()).await?;
    let ha = a.handle();
    let addr_a = ha
        .wait_listening(1, Duration::from_secs(10))
        .await
        .into_iter()
        .next()
        .ok_or("node A does not listen")?;
    let (mut b, reg_b) = start(vec![addr_a]).await?;
    let hb = b.handle();
    let mut rpc_in = b.take_inbound().ok_or("no RPC inbound")?;
    let mut qos0_in = b.take_qos0_inbound().ok_or("no QoS 0 inbound")?;
    tokio::spawn(async move {
        while let Some(rpc) = rpc_in.recv().await {
            let _ = rpc.reply.send(rpc.body);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while ha.peers().len() < 2 || hb.peers().len() < 2 {
        if Instant::now() > deadline {
            return Err("A and B never saw each other".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to_b = hb.local_peer_id();

    // One event arrives on the lane, as sent.
    assert!(ha.send_qos0(to_b, b"hello".to_vec()));
    let first = tokio::time::timeout(Duration::from_secs(10), qos0_in.recv())
        .await
        .map_err(|_| "the first QoS 0 event did not arrive")?
        .ok_or("QoS 0 inbound closed")?;
    assert_eq!(first.body, b"hello");
    assert_eq!(first.peer, ha.local_peer_id());

    // A flood that B does not read: far more than every queue holds.
    let payload = vec![0x5A; 4 << 10];
    let mut queued = 0usize;
    for _ in 0..20_000 {
        if ha.send_qos0(to_b, payload.clone()) {
            queued += 1;
        }
    }
    // Raft's channel is not behind the flood: an RPC is answered promptly.
    let started = Instant::now();
    let echo = ha
        .request(to_b, Vec::new(), b"ping".to_vec())
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(echo, b"ping");
    let rpc_time = started.elapsed();
    assert!(
        rpc_time < Duration::from_secs(3),
        "RPC took {rpc_time:?} during the flood"
    );

    // Every event is either queued or counted as dropped at A; B's full inbound queue counts
    // its own drops.
    let refused = metric_sum(
        &reg_a,
        &format!("canal_qos0_dropped_total{{peer=\"{to_b}\",reason=\"queue-full\"}}"),
    );
    assert_eq!(queued as f64 + refused, 20_000.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = metric_sum(&reg_a, "canal_qos0_dropped_total{")
            + metric_sum(&reg_b, "canal_qos0_dropped_total{");
        if dropped > 0.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err("no QoS 0 event of the flood was counted as dropped".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What B's queue held is there to read.
    let next = tokio::time::timeout(Duration::from_secs(10), qos0_in.recv())
        .await
        .map_err(|_| "no flooded event arrived")?
        .ok_or("QoS 0 inbound closed")?;
    assert_eq!(next.body.len(), 4 << 10);

    b.shutdown().await;
    a.shutdown().await;
    Ok(())
}

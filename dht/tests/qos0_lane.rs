//! The peer links: QoS 0 events go on a stream and queue of their own, so a flood of them
//! waits (and past the wait bound is dropped and counted) while RPCs are still answered;
//! many requests share one RPC link, and a dead peer fails all of them at once.

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
async fn a_qos0_flood_waits_then_is_dropped_and_counted_while_rpcs_are_answered()
-> Result<(), String> {
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
    assert!(ha.send_qos0(to_b, b"hello".to_vec()).await);
    let first = tokio::time::timeout(Duration::from_secs(10), qos0_in.recv())
        .await
        .map_err(|_| "the first QoS 0 event did not arrive")?
        .ok_or("QoS 0 inbound closed")?;
    assert_eq!(first.body, b"hello");
    assert_eq!(first.peer, ha.local_peer_id());

    // A flood that B does not read: far more than every queue and window holds, all sent at
    // once. Each send waits a bounded time for room, then is dropped and counted.
    let payload = vec![0x5A; 4 << 10];
    let flood = tokio::spawn({
        let ha = ha.clone();
        async move {
            let sends = (0..20_000).map(|_| ha.send_qos0(to_b, payload.clone()));
            futures::future::join_all(sends).await
        }
    });
    // Raft's lane is not behind the flood: an RPC is answered while it waits.
    let echo = ha
        .request(to_b, Vec::new(), b"ping".to_vec())
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(echo, b"ping");
    let sent = flood.await.map_err(|e| e.to_string())?;
    let queued = sent.iter().filter(|s| **s).count();

    // Every event is either queued or counted as dropped, at A, for having waited too long.
    let waited_out = metric_sum(
        &reg_a,
        &format!("canal_qos0_dropped_total{{peer=\"{to_b}\",reason=\"wait-timeout\"}}"),
    );
    assert!(waited_out > 0.0, "no event of the flood waited out");
    assert_eq!(queued as f64 + waited_out, 20_000.0);
    // B dropped nothing: it stopped reading instead.
    assert_eq!(metric_sum(&reg_b, "canal_qos0_dropped_total{"), 0.0);
    // What was queued is delivered, in order, once B reads.
    for _ in 0..queued {
        let next = tokio::time::timeout(Duration::from_secs(10), qos0_in.recv())
            .await
            .map_err(|_| "a queued event did not arrive")?
            .ok_or("QoS 0 inbound closed")?;
        assert_eq!(next.body.len(), 4 << 10);
    }
    // One stream per lane carried it all.
    assert!(
        metric_sum(
            &reg_a,
            "canal_link_frames_total{lane=\"qos0\",direction=\"out\"}"
        ) >= queued as f64
    );
    assert_eq!(metric_sum(&reg_a, "canal_link_reconnects_total"), 0.0);

    b.shutdown().await;
    a.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_share_one_link_are_matched_to_their_answers_and_fail_together_when_the_peer_dies()
-> Result<(), String> {
    let (a, reg_a) = start(Vec::new()).await?;
    let ha = a.handle();
    let addr_a = ha
        .wait_listening(1, Duration::from_secs(10))
        .await
        .into_iter()
        .next()
        .ok_or("node A does not listen")?;
    let (mut b, _reg_b) = start(vec![addr_a]).await?;
    let hb = b.handle();
    let mut rpc_in = b.take_inbound().ok_or("no RPC inbound")?;
    // B answers "n" requests after a delay that falls with n (so answers come out of order),
    // and never answers "hold".
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(rpc) = rpc_in.recv().await {
            if rpc.body == b"hold" {
                held.push(rpc.reply);
                continue;
            }
            let n: u64 = String::from_utf8_lossy(&rpc.body).parse().unwrap_or(0);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200 - n * 2)).await;
                let _ = rpc.reply.send(rpc.body);
            });
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

    let asks = (0..50u64).map(|n| ha.request(to_b, Vec::new(), n.to_string().into_bytes()));
    let answers = futures::future::join_all(asks).await;
    for (n, a) in answers.into_iter().enumerate() {
        assert_eq!(a.map_err(|e| e.to_string())?, n.to_string().into_bytes());
    }
    assert_eq!(metric_sum(&reg_a, "canal_links{lane=\"rpc\"}"), 1.0);

    // Requests B will never answer, then B goes away: all of them fail at once, long before
    // the 10 s a request-response substream used to wait for each.
    let held = tokio::spawn({
        let ha = ha.clone();
        async move {
            let asks = (0..10).map(|_| ha.request(to_b, Vec::new(), b"hold".to_vec()));
            futures::future::join_all(asks).await
        }
    });
    let until = Instant::now() + Duration::from_secs(10);
    while metric_sum(
        &reg_a,
        "canal_link_frames_total{lane=\"rpc\",direction=\"out\"}",
    ) < 60.0
    {
        if Instant::now() > until {
            return Err("the held requests were never sent".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    b.shutdown().await;
    let failed = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .map_err(|_| "the pending requests did not fail within 5 s of the peer's death")?
        .map_err(|e| e.to_string())?;
    assert!(failed.iter().all(|r| r.is_err()), "{failed:?}");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");

    a.shutdown().await;
    Ok(())
}

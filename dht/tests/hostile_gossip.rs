//! A stranger on the capability gossip topic: a plain libp2p gossipsub client (no canal code)
//! dials a canal peer and publishes bad records — the 13-byte record whose first string claims
//! 1 TiB, a record signed by one peer describing another, and a record over the interest
//! limits. The canal peer stays up, refuses and counts each, disconnects the stranger every
//! time, bans it after the third, and never forwards a bad record to its honest neighbour.

use canal_dht::{CAPS_TOPIC, Dht, DhtConfig, DhtHandle, LocalRecord};
use canal_proto::{Capabilities, wire};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::metrics::Registry;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identity, noise, tcp, yamux};
use std::time::{Duration, Instant};

struct Plain;

impl LocalRecord for Plain {
    fn measure(&mut self) -> Capabilities {
        Capabilities {
            version: canal_proto::VERSION.into(),
            ..Capabilities::default()
        }
    }
}

async fn start(bootstrap: Vec<Multiaddr>) -> Result<(Dht, Registry), String> {
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

fn metrics(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The value of the first metric line that starts with `prefix`, or 0.
fn metric(registry: &Registry, prefix: &str) -> f64 {
    metrics(registry)
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn stranger() -> Result<Swarm<gossipsub::Behaviour>, String> {
    let swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(200))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()?;
            let mut gossip =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?;
            gossip.subscribe(&IdentTopic::new(CAPS_TOPIC))?;
            Ok(gossip)
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// Dials `target`, publishes `data` on the capability topic as soon as the target is known to
/// subscribe, and waits until the target closes the connection. `Err` if it does not within
/// the deadline.
async fn send_and_get_dropped(
    swarm: &mut Swarm<gossipsub::Behaviour>,
    target: &Multiaddr,
    data: Vec<u8>,
) -> Result<(), String> {
    swarm.dial(target.clone()).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        tokio::select! {
            ev = swarm.select_next_some() => {
                if let SwarmEvent::ConnectionClosed { num_established: 0, .. } = ev
                    && sent
                {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                if !sent {
                    sent = swarm
                        .behaviour_mut()
                        .publish(IdentTopic::new(CAPS_TOPIC), data.clone())
                        .is_ok();
                }
            }
        }
    }
    Err(format!("not disconnected after publishing (sent: {sent})"))
}

/// Whether `swarm` can connect to `target` within a few seconds.
async fn can_connect(swarm: &mut Swarm<gossipsub::Behaviour>, target: &Multiaddr) -> bool {
    if swarm.dial(target.clone()).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let step = tokio::time::timeout(Duration::from_millis(200), swarm.select_next_some()).await;
        match step {
            // A banned peer's connection is denied by the target as soon as it is made.
            Ok(SwarmEvent::ConnectionEstablished { .. }) => {
                let hold = Instant::now() + Duration::from_secs(1);
                while Instant::now() < hold {
                    let ev =
                        tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some())
                            .await;
                    if let Ok(SwarmEvent::ConnectionClosed { .. }) = ev {
                        return false;
                    }
                }
                return true;
            }
            Ok(SwarmEvent::OutgoingConnectionError { .. }) => return false,
            _ => {}
        }
    }
    false
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting for {what}"))
}

fn forged_record(claimed: PeerId) -> Vec<u8> {
    let caps = Capabilities {
        peer_id: claimed.to_base58(),
        version: canal_proto::VERSION.into(),
        ..Capabilities::default()
    };
    wire::encode(&caps).unwrap_or_default()
}

fn oversized_interest(own: PeerId) -> Vec<u8> {
    let caps = Capabilities {
        peer_id: own.to_base58(),
        version: canal_proto::VERSION.into(),
        interest: (0..500).map(|i| format!("t/{i}")).collect(),
        ..Capabilities::default()
    };
    wire::encode(&caps).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_with_bad_records_is_refused_counted_disconnected_and_banned()
-> Result<(), String> {
    let (a, reg_a) = start(Vec::new()).await?;
    let ha: DhtHandle = a.handle();
    let addr_a = ha
        .wait_listening(1, Duration::from_secs(10))
        .await
        .into_iter()
        .next()
        .ok_or("node A does not listen")?;
    let (b, reg_b) = start(vec![addr_a.clone()]).await?;
    let hb = b.handle();
    wait_until("A and B to see each other", || {
        ha.peers().len() == 2 && hb.peers().len() == 2
    })
    .await?;

    let mut evil = stranger()?;
    let evil_id = *evil.local_peer_id();

    // 1: the exact attack of issue 11.
    let mut attack = vec![wire::WIRE_VERSION, 0xFD];
    attack.extend((1u64 << 40).to_le_bytes());
    attack.extend(*b"abc");
    send_and_get_dropped(&mut evil, &addr_a, attack).await?;
    let decode =
        format!("canal_peer_bad_messages_total{{peer=\"{evil_id}\",kind=\"gossip-decode\"}}");
    wait_until("the decode offence to be counted", || {
        metric(&reg_a, &decode) == 1.0
    })
    .await?;

    // 2: a record describing B, signed by the stranger.
    send_and_get_dropped(&mut evil, &addr_a, forged_record(hb.local_peer_id())).await?;
    let forged =
        format!("canal_peer_bad_messages_total{{peer=\"{evil_id}\",kind=\"gossip-forged\"}}");
    wait_until("the forged record to be counted", || {
        metric(&reg_a, &forged) == 1.0
    })
    .await?;
    assert_eq!(metric(&reg_a, "canal_peers_banned"), 0.0);

    // 3: a record over the limits: the third offence in ten minutes bans.
    send_and_get_dropped(&mut evil, &addr_a, oversized_interest(evil_id)).await?;
    let invalid =
        format!("canal_peer_bad_messages_total{{peer=\"{evil_id}\",kind=\"gossip-invalid\"}}");
    wait_until("the invalid record to be counted", || {
        metric(&reg_a, &invalid) == 1.0
    })
    .await?;
    wait_until("the stranger to be banned", || {
        metric(&reg_a, "canal_peers_banned") == 1.0
    })
    .await?;
    assert!(
        !can_connect(&mut evil, &addr_a).await,
        "a banned peer connected"
    );

    // A still serves, knows only the honest peers, and forwarded nothing bad to B.
    assert!(ha.is_running());
    assert_eq!(ha.readiness(), Ok(()));
    assert!(ha.peers().iter().all(|p| p.peer_id != evil_id));
    assert_eq!(ha.peers().len(), 2);
    assert_eq!(
        metric(&reg_b, "canal_capability_records_rejected_total"),
        0.0
    );
    assert!(!metrics(&reg_b).contains("canal_peer_bad_messages_total{"));
    assert!(metric(&reg_b, "canal_capability_records_received_total") > 0.0);

    b.shutdown().await;
    a.shutdown().await;
    assert!(!ha.is_running());
    assert_eq!(
        ha.readiness(),
        Err("the peer mesh is shut down".to_string())
    );
    Ok(())
}

/// Opens a link stream on `protocol` to `target` and writes a frame header of `kind` claiming
/// `claim` bytes, then a few bytes; returns once the target closed the connection.
async fn send_oversized_frame(
    target: &Multiaddr,
    target_id: PeerId,
    protocol: &'static str,
    kind: u8,
    claim: u32,
) -> Result<(), String> {
    use futures::AsyncWriteExt;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .map_err(|e| e.to_string())?
        .build();
    swarm.dial(target.clone()).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // The stream is opened only on an established connection: asked for earlier, the stream
    // behaviour dials the target by peer id, finds no address for it and fails, and the
    // connection then closes after its idle timeout with nothing sent.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, swarm.select_next_some()).await {
            Ok(SwarmEvent::ConnectionEstablished { .. }) => break,
            Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                return Err(format!("dialling the target failed: {error}"));
            }
            Ok(_) => {}
            Err(_) => return Err("no connection to the target".into()),
        }
    }
    let mut control = swarm.behaviour().new_control();
    let mut writer = tokio::spawn(async move {
        let mut s = control
            .open_stream(target_id, libp2p::StreamProtocol::new(protocol))
            .await
            .map_err(|e| format!("opening the {protocol} stream failed: {e}"))?;
        let mut header = vec![canal_dht::frame::FRAME_VERSION, kind];
        header.extend(7u64.to_be_bytes());
        header.extend(claim.to_be_bytes());
        s.write_all(&header).await.map_err(|e| e.to_string())?;
        s.write_all(b"garbage").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        // Held open past the deadline: the target must close the connection; neither the end
        // of the stream nor an idle timeout may.
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, String>(s)
    });
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            ev = swarm.select_next_some() => {
                if let SwarmEvent::ConnectionClosed { num_established: 0, .. } = ev {
                    break Ok(());
                }
            }
            done = &mut writer => {
                break match done {
                    Ok(Err(e)) => Err(e),
                    _ => Err(format!("the writer of the oversized frame on {protocol} stopped")),
                };
            }
            _ = tokio::time::sleep(left) => {
                break Err(format!("not disconnected after an oversized frame on {protocol}"));
            }
        }
    };
    writer.abort();
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_on_rpc_and_qos0_are_offences() -> Result<(), String> {
    let (a, reg_a) = start(Vec::new()).await?;
    let ha = a.handle();
    let addr_a = ha
        .wait_listening(1, Duration::from_secs(10))
        .await
        .into_iter()
        .next()
        .ok_or("node A does not listen")?;
    send_oversized_frame(
        &addr_a,
        ha.local_peer_id(),
        canal_dht::rpc::RPC_PROTOCOL,
        canal_dht::frame::Kind::Request.byte(),
        u32::MAX,
    )
    .await?;
    wait_until("the RPC frame offence to be counted", || {
        metrics(&reg_a).contains("kind=\"rpc-frame\"} 1")
    })
    .await?;
    send_oversized_frame(
        &addr_a,
        ha.local_peer_id(),
        canal_dht::rpc::QOS0_PROTOCOL,
        canal_dht::frame::Kind::Event.byte(),
        3 << 20,
    )
    .await?;
    wait_until("the QoS 0 frame offence to be counted", || {
        metrics(&reg_a).contains("kind=\"qos0-frame\"} 1")
    })
    .await?;
    assert_eq!(ha.readiness(), Ok(()));
    a.shutdown().await;
    Ok(())
}

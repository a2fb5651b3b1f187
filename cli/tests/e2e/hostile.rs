//! A hostile peer: a plain libp2p client, written here and sharing no code with the node's
//! swarm, dials a healthy cluster and sends oversized, truncated, garbage and
//! well-formed-but-forged messages on every protocol a node speaks (capability gossip, the
//! RPC channel with its Raft, QoS 0 and formation messages). Every node must stay up,
//! healthy and replicating, apply nothing the stranger sent, and count what it refused.
//!
//! It runs against a keyless loopback mesh (where anyone on the host can connect) and against
//! a keyed mesh, first without the key (it cannot even connect) and then with it (an
//! insider that is no member of the Raft groups).

use canal_consensus::rpc::RpcRequest;
use canal_consensus::types::{GroupId, Op, Request, TypeConfig, node_id_of};
use canal_proto::api::ClusterStatus;
use canal_testnet::{Api, NodeOptions, Testnet, wait_for};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::transport::upgrade::Version;
use libp2p::core::{Transport, muxing::StreamMuxerBox};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identity, noise, tcp, yamux};
use openraft::{Entry, EntryPayload, LeaderId, LogId, Vote};
use std::time::Duration;

use crate::BIN;

const RPC: &str = "/canal/rpc/2.0.0";
const QOS0: &str = "/canal/qos0/2.0.0";
/// The link frame's version and kinds, written out here rather than taken from the node.
const FRAME_VERSION: u8 = 1;
const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;
const EVENT: u8 = 4;
const CAPS_TOPIC: &str = "canal/caps/v1";

#[derive(NetworkBehaviour)]
struct Hostile {
    gossipsub: gossipsub::Behaviour,
    stream: libp2p_stream::Behaviour,
}

fn swarm(key: Option<PreSharedKey>) -> Swarm<Hostile> {
    let behaviour = |k: &identity::Keypair| {
        let config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_millis(200))
            // Big enough to send what the nodes must refuse.
            .max_transmit_size(1 << 20)
            .validation_mode(gossipsub::ValidationMode::Permissive)
            .build()
            .unwrap();
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(k.clone()), config)
                .unwrap();
        gossipsub
            .subscribe(&gossipsub::IdentTopic::new(CAPS_TOPIC))
            .unwrap();
        Hostile {
            gossipsub,
            stream: libp2p_stream::Behaviour::new(),
        }
    };
    let builder = libp2p::SwarmBuilder::with_new_identity().with_tokio();
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    match key {
        None => builder
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(behaviour)
            .unwrap()
            .with_swarm_config(idle)
            .build(),
        Some(psk) => builder
            .with_other_transport(|k| {
                let noise = noise::Config::new(k).unwrap();
                tcp::tokio::Transport::new(tcp::Config::default())
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            })
            .unwrap()
            .with_behaviour(behaviour)
            .unwrap()
            .with_swarm_config(idle)
            .build(),
    }
}

/// Drives the swarm until `done` says so or `timeout` passes; returns the events seen.
async fn drive(swarm: &mut Swarm<Hostile>, timeout: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            ev = swarm.select_next_some() => seen.push(format!("{ev:?}")),
            _ = tokio::time::sleep_until(deadline) => return seen,
        }
    }
}

/// Opens a stream on `protocol` to `target`, writes `bytes` exactly as given (so a frame can
/// lie about its own length) and, unless `answer` is false, reads one frame back. Drives the
/// swarm meanwhile, for at most `wait`; returns the kind and body of the answer, if one came.
async fn send_raw(
    swarm: &mut Swarm<Hostile>,
    target: PeerId,
    protocol: &'static str,
    bytes: Vec<u8>,
    answer: bool,
    wait: Duration,
) -> Option<(u8, Vec<u8>)> {
    let mut control = swarm.behaviour().stream.new_control();
    let io = tokio::spawn(async move {
        let mut s = control
            .open_stream(target, StreamProtocol::new(protocol))
            .await
            .ok()?;
        s.write_all(&bytes).await.ok()?;
        s.flush().await.ok()?;
        if !answer {
            let _ = s.close().await;
            return None;
        }
        let mut head = [0u8; 14];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([head[10], head[11], head[12], head[13]]) as usize;
        let mut body = Vec::new();
        (&mut s)
            .take(len.min(16 << 20) as u64)
            .read_to_end(&mut body)
            .await
            .ok()?;
        Some((head[1], body))
    });
    let deadline = tokio::time::Instant::now() + wait;
    tokio::pin!(io);
    loop {
        tokio::select! {
            _ = swarm.select_next_some() => {}
            r = &mut io => return r.ok().flatten(),
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Whether a request on the RPC lane gets an answer (within 10 s) rather than nothing.
async fn answered(swarm: &mut Swarm<Hostile>, target: PeerId, bytes: Vec<u8>) -> bool {
    matches!(
        send_raw(swarm, target, RPC, bytes, true, Duration::from_secs(10)).await,
        Some((RESPONSE, _))
    )
}

/// Dials `addr` and waits for the connection (or its failure).
async fn connect(swarm: &mut Swarm<Hostile>, addr: &Multiaddr) -> Result<PeerId, String> {
    swarm.dial(addr.clone()).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => return Ok(peer_id),
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.to_string()),
                _ => {}
            },
            _ = tokio::time::sleep_until(deadline) => return Err("no connection within 20 s".into()),
        }
    }
}

/// The 13 bytes that took every node down: wire version 1, then a capability record whose
/// first string (the peer id) claims to be 1 TiB long.
fn one_tebibyte_string() -> Vec<u8> {
    let mut m = vec![1u8, 253];
    m.extend((1u64 << 40).to_le_bytes());
    m.extend(b"abc");
    assert_eq!(m.len(), 13);
    m
}

/// A link frame header of `kind` with id 1, claiming `len` body bytes.
fn header(kind: u8, len: u32) -> Vec<u8> {
    let mut out = vec![FRAME_VERSION, kind];
    out.extend(1u64.to_be_bytes());
    out.extend(len.to_be_bytes());
    out
}

/// A request frame on the RPC lane: the channel byte, then `body`.
fn framed(channel: u8, body: &[u8]) -> Vec<u8> {
    let mut out = header(REQUEST, body.len() as u32 + 1);
    out.push(channel);
    out.extend(body);
    out
}

fn raft(req: &RpcRequest) -> Vec<u8> {
    framed(b'R', &canal_proto::wire::encode(req).unwrap())
}

fn put(key: &str) -> Request {
    Request {
        id: Some(format!("hostile-{key}")),
        op: Op::Put {
            key: key.into(),
            value: b"forged".to_vec(),
        },
    }
}

/// Everything the hostile peer sends on the RPC channel, with what each message is.
fn rpc_attacks(
    me: PeerId,
    leader: u64,
    term: u64,
    last_index: u64,
) -> Vec<(&'static str, Vec<u8>)> {
    let mine = node_id_of(&me.to_bytes());
    let entry = |index: u64, key: &str| Entry::<TypeConfig> {
        log_id: LogId::new(LeaderId::new(term + 100, leader), index),
        payload: EntryPayload::Normal(canal_consensus::types::Proposal {
            time_ms: 0,
            request: put(key),
        }),
    };
    let append = |vote: Vote<u64>, key: &str| {
        RpcRequest::Append(
            GroupId::METADATA,
            openraft::raft::AppendEntriesRequest {
                vote,
                prev_log_id: None,
                entries: vec![entry(last_index + 1, key)],
                leader_commit: Some(LogId::new(
                    LeaderId::new(term + 100, leader),
                    last_index + 1,
                )),
            },
        )
    };
    let mut huge_len = header(REQUEST, u32::MAX);
    huge_len.extend([b'R'; 64]);
    let mut truncated = header(REQUEST, 1000);
    truncated.extend([b'R', 1, 2, 3]);
    vec![
        ("a frame claiming 4 GiB", huge_len),
        ("a truncated frame", truncated),
        ("garbage on the Raft channel", framed(b'R', &[0xff; 200])),
        (
            "a Raft message whose string claims 1 TiB",
            framed(b'R', &one_tebibyte_string()),
        ),
        (
            "a vote request from a non-member with a huge term",
            raft(&RpcRequest::Vote(
                GroupId::METADATA,
                openraft::raft::VoteRequest {
                    vote: Vote::new(term + 1000, mine),
                    last_log_id: Some(LogId::new(
                        LeaderId::new(term + 1000, mine),
                        last_index + 1000,
                    )),
                },
            )),
        ),
        (
            "an append naming the real leader, sent by someone else",
            raft(&append(
                Vote::new_committed(term + 100, leader),
                "forged-as-leader",
            )),
        ),
        (
            "an append from a non-member naming itself leader",
            raft(&append(
                Vote::new_committed(term + 100, mine),
                "forged-by-stranger",
            )),
        ),
        (
            "a forwarded write from a non-member",
            raft(&RpcRequest::Write(
                canal_consensus::routing::DEFAULT_GROUP,
                put("forged-write"),
            )),
        ),
        (
            "a forwarded write to the metadata group's internal keys",
            raft(&RpcRequest::Write(
                GroupId::METADATA,
                put(&canal_consensus::keys::ADMITTED.key("forged")),
            )),
        ),
        (
            "the old QoS 0 channel byte on the RPC lane",
            framed(b'Q', &[0xfe; 300]),
        ),
        ("a formation request to a member", framed(b'F', &[1, 1, 0])),
        ("an unknown channel", framed(b'Z', b"hello")),
        ("an empty frame", header(REQUEST, 0)),
        ("a frame of an unknown kind", header(9, 0)),
        ("a frame of another version", {
            let mut h = header(REQUEST, 0);
            h[0] = 7;
            h
        }),
        ("an event on the RPC lane", header(EVENT, 0)),
    ]
}

/// An event frame on the QoS 0 lane.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = header(EVENT, body.len() as u32);
    out.extend(body);
    out
}

/// Everything the hostile peer sends on the QoS 0 lane.
fn qos0_attacks(target: PeerId) -> Vec<(&'static str, Vec<u8>)> {
    let forged = canal_proto::wire::encode(&canal_proto::peer::Qos0Message {
        topic: "sensors/forged".into(),
        id: "forged".into(),
        source: target.to_base58(),
        time_ms: 0,
        headers: vec![],
        payload: b"forged".to_vec(),
    })
    .unwrap();
    let mut huge_len = header(EVENT, u32::MAX);
    huge_len.extend([0u8; 64]);
    vec![
        ("a QoS 0 frame claiming 4 GiB", huge_len),
        ("a request on the QoS 0 lane", header(REQUEST, 0)),
        ("garbage on the QoS 0 lane", frame(&[0xfe; 300])),
        (
            "a QoS 0 event whose string claims 1 TiB",
            frame(&one_tebibyte_string()),
        ),
        (
            "a QoS 0 event claiming the node itself as its source",
            frame(&forged),
        ),
    ]
}

/// What the cluster looks like before the attack: node 0's view of the metadata leader's
/// node id, the term and the last log index.
async fn raft_view(api: &Api) -> (u64, u64, u64) {
    let s: ClusterStatus = api.get("/v1/cluster/status").await.unwrap();
    let g = s.groups.iter().find(|g| g.group == "metadata").unwrap();
    let me = g.members[0].status.as_ref().unwrap();
    (me.leader.unwrap(), me.term, me.last_log_index.unwrap_or(0))
}

/// Runs the whole attack on `net` from `swarm`, connected to node 0, and checks the mesh
/// came through.
/// A hostile peer with a fresh identity, connected to node 0: a peer banned for its first
/// offences must not keep the rest of the attack from being tried.
async fn fresh(net: &Testnet, key: &Option<PreSharedKey>) -> (Swarm<Hostile>, PeerId) {
    let mut swarm = swarm(*key);
    let target = connect(&mut swarm, &node0_addr(net)).await.unwrap();
    (swarm, target)
}

/// Runs the whole attack on `net`, each message from a fresh identity, then gets one
/// identity banned; checks the mesh came through.
async fn attack(net: &Testnet, key: Option<PreSharedKey>) {
    let api0 = net.api(0).unwrap();
    let (leader, term, last) = raft_view(&api0).await;
    let topic = gossipsub::IdentTopic::new(CAPS_TOPIC);
    let forged_record = {
        let mut caps: canal_proto::Capabilities = api0
            .get::<canal_proto::api::Peers>("/v1/peers")
            .await
            .unwrap()
            .peers[0]
            .caps
            .clone();
        caps.tier = "forged".into();
        canal_proto::wire::encode(&caps).unwrap()
    };
    let gossip: Vec<(&str, Vec<u8>)> = vec![
        ("the 13-byte 1 TiB string", one_tebibyte_string()),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "a record signed by us, claiming another peer",
            forged_record,
        ),
        ("a 300 KiB record", vec![1u8; 300 << 10]),
    ];
    for (what, bytes) in gossip {
        let (mut swarm, _) = fresh(net, &key).await;
        // Let the subscriptions be exchanged first: gossip goes only to subscribers.
        drive(&mut swarm, Duration::from_millis(1500)).await;
        let r = swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), bytes);
        eprintln!("hostile gossip: {what}: {r:?}");
        drive(&mut swarm, Duration::from_millis(500)).await;
    }
    let (probe, _) = fresh(net, &key).await;
    let me = *probe.local_peer_id();
    drop(probe);
    for (what, bytes) in rpc_attacks(me, leader, term, last) {
        let (mut swarm, target) = fresh(net, &key).await;
        eprintln!("hostile rpc: {what}");
        send_raw(
            &mut swarm,
            target,
            RPC,
            bytes,
            false,
            Duration::from_secs(2),
        )
        .await;
        drive(&mut swarm, Duration::from_millis(400)).await;
    }
    let (swarm, target) = fresh(net, &key).await;
    drop(swarm);
    for (what, bytes) in qos0_attacks(target) {
        let (mut swarm, target) = fresh(net, &key).await;
        eprintln!("hostile qos0: {what}");
        send_raw(
            &mut swarm,
            target,
            QOS0,
            bytes,
            false,
            Duration::from_secs(2),
        )
        .await;
        drive(&mut swarm, Duration::from_millis(400)).await;
    }
    // A harmless request of a stranger is answered (refused, with the reason), so the
    // check below can tell...
    let status = raft(&RpcRequest::Status(GroupId::METADATA));
    let (mut swarm, target) = fresh(net, &key).await;
    assert!(
        answered(&mut swarm, target, status.clone()).await,
        "a stranger's status request got no answer"
    );
    drop(swarm);
    // ...but one identity that keeps offending is banned: its connections are refused.
    let (mut swarm, target) = fresh(net, &key).await;
    for _ in 0..4 {
        let _ = swarm.dial(node0_addr(net));
        let garbage = framed(b'R', &[0xff; 64]);
        send_raw(
            &mut swarm,
            target,
            RPC,
            garbage,
            false,
            Duration::from_secs(2),
        )
        .await;
        drive(&mut swarm, Duration::from_millis(400)).await;
    }
    wait_for("the offender to be banned", Duration::from_secs(20), || {
        let api = api0.clone();
        async move {
            let banned = api
                .metric_sum("canal_peers_banned")
                .await
                .map_err(|e| e.to_string())?;
            if banned >= 1.0 {
                Ok(())
            } else {
                Err(format!("{banned} banned"))
            }
        }
    })
    .await
    .unwrap();
    // Its new connections are closed as they open: no request of it is answered.
    let _ = swarm.dial(node0_addr(net));
    assert!(
        !answered(&mut swarm, target, status).await,
        "a banned peer was answered"
    );
    drop(swarm);
    survived(net, term).await;
}

/// Every node is healthy, replicates a new write, holds none of the forged keys, agrees on
/// the state, did not follow the forged term, and counted what it refused.
async fn survived(net: &Testnet, term_before: u64) {
    for i in 0..net.len() {
        let api = net.api(i).unwrap();
        wait_for("the node to be healthy", Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                match api.get_raw("/v1/health").await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await
        .unwrap();
    }
    let api0 = net.api(0).unwrap();
    let (status, body) = api0
        .send(
            reqwest::Method::PUT,
            "/v1/kv/after-attack",
            b"still-here".to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for i in 0..net.len() {
        let api = net.api(i).unwrap();
        let (status, body) = api.get_raw("/v1/kv/after-attack").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "still-here"), "node{i}");
        for key in ["forged-as-leader", "forged-by-stranger", "forged-write"] {
            for group in [0, 1] {
                let (status, _) = api
                    .get_raw(&format!("/v1/kv/{key}?group={group}&read=local"))
                    .await
                    .unwrap();
                assert_eq!(status, 404, "node{i} holds {key} in group {group}");
            }
        }
        let peers: canal_proto::api::Peers = api.get("/v1/peers").await.unwrap();
        assert!(
            peers.peers.iter().all(|p| p.caps.tier != "forged"),
            "node{i} took the forged capability record"
        );
    }
    let (_, term, _) = raft_view(&api0).await;
    assert!(
        term < term_before + 100,
        "the cluster followed a forged term ({term})"
    );
    // Every replica of both groups converges on one state.
    let all: Vec<usize> = (0..net.len()).collect();
    for group in ["metadata", "data-1"] {
        crate::raft::wait_same_digest(net, &all, group).await;
    }
    let api = net.api(0).unwrap();
    let bad = api
        .metric_sum("canal_peer_bad_messages_total")
        .await
        .unwrap();
    let refused = api
        .metric_sum("canal_raft_refused_rpcs_total")
        .await
        .unwrap();
    // Every undecodable or forged message on every lane (the non-member refusals are
    // counted apart, as refused Raft RPCs).
    assert!(bad >= 10.0, "node0 counted {bad} bad messages");
    assert!(refused >= 3.0, "node0 refused {refused} Raft RPCs");
}

/// Three nodes that form one cluster of three voters, with or without the testnet's key.
pub(crate) async fn mesh(keyless: bool) -> Testnet {
    let net = Testnet::start(BIN, 3, |_| NodeOptions {
        keyless,
        extra_args: vec!["--bootstrap-expect".into(), "3".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        crate::raft::wait_formed(&net, i, 3).await;
    }
    net
}

fn node0_addr(net: &Testnet) -> Multiaddr {
    net.node(0).info().unwrap().listen_addrs[0].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_a_keyless_mesh_cannot_crash_join_or_rewrite_it() {
    let net = mesh(true).await;
    attack(&net, None).await;
    // Nobody admitted it, so it never became a member.
    let s: ClusterStatus = net.api(0).unwrap().get("/v1/cluster/status").await.unwrap();
    for g in &s.groups {
        let st = g.members[0].status.as_ref().unwrap();
        assert_eq!(st.nodes.len(), 3, "{}: {:?}", g.group, st.nodes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_mesh_keeps_strangers_out_and_insiders_in_their_place() {
    let mut net = mesh(false).await;
    // Without the key the handshake fails: nothing reaches the node.
    let mut outsider = swarm(None);
    assert!(connect(&mut outsider, &node0_addr(&net)).await.is_err());
    drop(outsider);
    // With the key, a peer that is no Raft member yet gets nowhere either.
    let text = std::fs::read_to_string(net.cluster_key().unwrap()).unwrap();
    let psk: PreSharedKey = text.trim().parse().unwrap();
    attack(&net, Some(psk)).await;
}

//! MQTT on every node, with real clients (rumqttc's 3.1.1 and 5.0 clients): publish and
//! subscribe across nodes and with HTTP, retained messages, wills, QoS 2 refused, a
//! persistent session resumed on another node after kill -9, bad input refused while
//! another session goes on, and one client's QoS 1 publishes kept in order.

use crate::raft::{cluster, wait_same_digest};
use canal_testnet::{Api, Testnet, wait_for};
use reqwest::Method;
use rumqttc::v5::mqttbytes::v5 as p5;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// A 3.1.1 client whose event loop runs in a task; what it receives comes on `rx`.
struct V4 {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn v4_opts(id: &str, addr: SocketAddr) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    // The token is the password.
    o.set_credentials("canal", canal_testnet::admin_token());
    o
}

fn v4(opts: rumqttc::MqttOptions) -> V4 {
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    V4 { client, rx, task }
}

impl V4 {
    /// The next packet that `pick` takes, within [`WAIT`].
    async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(p))) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Ok(Some(Err(e))) => panic!("waiting for {what}: the connection ended: {e}"),
                Ok(None) => panic!("waiting for {what}: the event loop is gone"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    async fn publish(&mut self, what: &str) -> rumqttc::Publish {
        self.next(what, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    async fn suback(&mut self) -> rumqttc::SubAck {
        self.next("SUBACK", |p| match p {
            rumqttc::Packet::SubAck(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// Whether the connection ends within [`WAIT`].
    async fn ended(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    async fn connack(&mut self) -> rumqttc::ConnAck {
        self.next("CONNACK", |p| match p {
            rumqttc::Packet::ConnAck(a) => Some(a),
            _ => None,
        })
        .await
    }
}

/// A 5.0 client, like [`V4`].
struct V5 {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<p5::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn v5(id: &str, addr: SocketAddr) -> V5 {
    v5_with(id, addr, Some(canal_testnet::admin_token()))
}

/// A 5.0 client whose CONNECT password is `token` (none: no user name or password).
fn v5_with(id: &str, addr: SocketAddr, token: Option<&str>) -> V5 {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(t) = token {
        o.set_credentials("canal", t);
    }
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    V5 { client, rx, task }
}

impl V5 {
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(p5::Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(p))) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Ok(Some(Err(e))) => panic!("waiting for {what}: the connection ended: {e}"),
                Ok(None) => panic!("waiting for {what}: the event loop is gone"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    async fn publish(&mut self, what: &str) -> p5::Publish {
        self.next(what, |p| match p {
            p5::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Waits for the connection to end, with whatever the server said last.
    async fn ended(&mut self, what: &str) -> Option<p5::Disconnect> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut said = None;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(p5::Packet::Disconnect(d)))) => said = Some(d),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return said,
                Err(_) => panic!("{what}: the connection did not end within {WAIT:?}"),
            }
        }
    }
}

fn mqtt_addr(net: &Testnet, i: usize) -> SocketAddr {
    net.node(i).mqtt_addr().unwrap()
}

/// Publishes over HTTP through `api` until it is acknowledged.
async fn http_publish(api: &Api, topic: &str, payload: &str) {
    let path = format!("/v1/topics/{}/events", topic.replace('/', "%2F"));
    wait_for(&format!("HTTP publish to {topic}"), WAIT, || {
        let api = api.clone();
        let path = path.clone();
        let payload = payload.to_string();
        async move {
            let (status, body) = api
                .send(Method::POST, &path, payload.into_bytes(), None)
                .await
                .map_err(|e| e.to_string())?;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        }
    })
    .await
    .unwrap();
}

fn text(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_clients_of_both_versions_meet_each_other_and_http_across_nodes() {
    let net = cluster(3, &[]).await;
    let api0 = net.api(0).unwrap();
    // /v1/health and the peer records name each node's MQTT address.
    let h: canal_proto::api::Health = api0.get("/v1/health").await.unwrap();
    assert_eq!(h.mqtt_addr, Some(mqtt_addr(&net, 0).to_string()));
    let want: Vec<String> = (0..3).map(|i| mqtt_addr(&net, i).to_string()).collect();
    wait_for("every peer record to carry its MQTT address", WAIT, || {
        let api = api0.clone();
        let want = want.clone();
        async move {
            let p: canal_proto::api::Peers =
                api.get("/v1/peers").await.map_err(|e| e.to_string())?;
            let mut got: Vec<String> = p
                .peers
                .iter()
                .filter_map(|p| p.caps.mqtt_addr.clone())
                .collect();
            got.sort();
            let mut want = want;
            want.sort();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await
    .unwrap();

    // A 3.1.1 subscriber on node 1, a 5.0 one on node 2; QoS 2 is granted as QoS 1.
    let mut s4 = v4(v4_opts("sub-v4", mqtt_addr(&net, 1)));
    s4.client
        .subscribe("sensors/+/temp", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    let ack = s4.suback().await;
    assert_eq!(
        ack.return_codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    let mut s5 = v5("sub-v5", mqtt_addr(&net, 2));
    s5.client
        .subscribe("sensors/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    s5.next("SUBACK", |p| {
        matches!(p, p5::Packet::SubAck(_)).then_some(())
    })
    .await;
    // An SSE subscriber on node 0 sees what MQTT clients publish.
    let sse = crate::pubsub::sub(&net.node(0).info().unwrap().api, "sensors/#", 2);

    // QoS 1 from a 3.1.1 publisher on node 0, with PUBACK after commit.
    let mut p4 = v4(v4_opts("pub-v4", mqtt_addr(&net, 0)));
    p4.client
        .publish(
            "sensors/room1/temp",
            rumqttc::QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .unwrap();
    p4.next("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    let got = s4.publish("the QoS 1 publish on node 1").await;
    assert_eq!(
        (got.topic.as_str(), text(&got.payload).as_str()),
        ("sensors/room1/temp", "21.5")
    );
    assert_eq!(got.qos, rumqttc::QoS::AtLeastOnce);
    let got = s5.publish("the QoS 1 publish on node 2").await;
    assert_eq!(text(&got.payload), "21.5");

    // 5.0 user properties become canal headers and come back as user properties.
    let props = p5::PublishProperties {
        user_properties: vec![("unit".into(), "celsius".into())],
        ..Default::default()
    };
    s5.client
        .publish_with_properties(
            "sensors/room2/temp",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "19",
            props,
        )
        .await
        .unwrap();
    let got = s5.publish("its own 5.0 publish with user properties").await;
    let up = got
        .properties
        .map(|p| p.user_properties)
        .unwrap_or_default();
    assert_eq!(up, vec![("unit".to_string(), "celsius".to_string())]);
    assert_eq!(
        text(&s4.publish("the 5.0 publish on node 1").await.payload),
        "19"
    );
    let out = tokio::time::timeout(WAIT, sse.wait_with_output())
        .await
        .expect("the SSE subscriber got both MQTT publishes")
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("21.5") && out.contains("19"), "{out}");
    assert!(out.contains("celsius"), "user properties as headers: {out}");

    // HTTP publishes reach MQTT subscribers.
    http_publish(&net.api(0).unwrap(), "sensors/hall/temp", "from-http").await;
    assert_eq!(
        text(&s4.publish("the HTTP publish on node 1").await.payload),
        "from-http"
    );
    assert_eq!(
        text(&s5.publish("the HTTP publish on node 2").await.payload),
        "from-http"
    );

    // QoS 0 reaches other nodes once their interest is known: retried until it does.
    let mut got0 = None;
    for i in 0..60 {
        p4.client
            .publish(
                "sensors/q0/temp",
                rumqttc::QoS::AtMostOnce,
                false,
                format!("q{i}"),
            )
            .await
            .unwrap();
        if let Ok(Some(Ok(rumqttc::Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_millis(500), s4.rx.recv()).await
        {
            got0 = Some(p);
            break;
        }
    }
    let got0 = got0.expect("a QoS 0 publish from node 0 reached node 1");
    assert_eq!(got0.qos, rumqttc::QoS::AtMostOnce);
    assert!(text(&got0.payload).starts_with('q'));

    // Retained: stored replicated, sent to a later subscriber on another node, cleared by
    // an empty retained payload.
    p4.client
        .publish("status/door", rumqttc::QoS::AtLeastOnce, true, "open")
        .await
        .unwrap();
    p4.next("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    let mut late = v4(v4_opts("late", mqtt_addr(&net, 2)));
    late.client
        .subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let r = late.publish("the retained message").await;
    assert!(r.retain, "sent as retained");
    assert_eq!(text(&r.payload), "open");
    p4.client
        .publish("status/door", rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    p4.next("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    let mut later = v4(v4_opts("later", mqtt_addr(&net, 1)));
    later
        .client
        .subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    later.suback().await;
    p4.client
        .publish("status/window", rumqttc::QoS::AtLeastOnce, false, "shut")
        .await
        .unwrap();
    let first = later
        .publish("the first message after the retained one was cleared")
        .await;
    assert_eq!(
        text(&first.payload),
        "shut",
        "a cleared retained message is not sent: {first:?}"
    );

    // A will is sent when its client goes away without DISCONNECT.
    let mut wopts = v4_opts("willing", mqtt_addr(&net, 1));
    wopts.set_last_will(rumqttc::LastWill::new(
        "wills/willing",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut w = v4(wopts);
    w.connack().await;
    let mut wsub = v5("will-watch", mqtt_addr(&net, 2));
    wsub.client
        .subscribe("wills/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    wsub.next("SUBACK", |p| {
        matches!(p, p5::Packet::SubAck(_)).then_some(())
    })
    .await;
    // Dropping the event loop closes the socket with no DISCONNECT.
    w.task.abort();
    drop(w);
    let got = wsub.publish("the will").await;
    assert_eq!(text(&got.payload), "gone");

    // A shared subscription: two members on two nodes, each message to one of them.
    let mut m1 = v4(v4_opts("worker-1", mqtt_addr(&net, 1)));
    let mut m2 = v5("worker-2", mqtt_addr(&net, 2));
    m1.client
        .subscribe("$share/workers/jobs/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    m1.suback().await;
    m2.client
        .subscribe(
            "$share/workers/jobs/#",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    m2.next("SUBACK", |p| {
        matches!(p, p5::Packet::SubAck(_)).then_some(())
    })
    .await;
    // Both members' records are on every replica before the first job.
    wait_same_digest(&net, &[0, 1, 2], "data-1").await;
    const JOBS: usize = 30;
    for i in 0..JOBS {
        http_publish(&api0, &format!("jobs/j{}", i % 3), &format!("job{i}")).await;
    }
    let mut got: Vec<String> = Vec::new();
    let (mut n1, mut n2) = (0, 0);
    while got.len() < JOBS {
        tokio::select! {
            p = m1.publish("a job") => { got.push(text(&p.payload)); n1 += 1; }
            p = m2.publish("a job") => { got.push(text(&p.payload)); n2 += 1; }
        }
    }
    got.sort();
    let mut want: Vec<String> = (0..JOBS).map(|i| format!("job{i}")).collect();
    want.sort();
    assert_eq!(got, want, "every job once");
    assert!(n1 > 0 && n2 > 0, "both members got jobs: {n1} and {n2}");
    // And no job twice: nothing more comes to either.
    http_publish(&api0, "jobs/last", "last").await;
    let last = tokio::select! {
        p = m1.publish("the last job") => text(&p.payload),
        p = m2.publish("the last job") => text(&p.payload),
    };
    assert_eq!(last, "last", "no job was sent twice");

    // QoS 2 is refused the 5.0 way: the server says Maximum QoS 1 and a QoS 2 publish ends
    // the connection with 0x9B.
    let mut q2 = v5("qos2", mqtt_addr(&net, 0));
    let connack = q2
        .next("CONNACK", |p| match p {
            p5::Packet::ConnAck(c) => Some(c),
            _ => None,
        })
        .await;
    assert_eq!(connack.properties.and_then(|p| p.max_qos), Some(1));
    q2.client
        .publish(
            "sensors/x/temp",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            false,
            "2",
        )
        .await
        .unwrap();
    let d = q2.ended("a QoS 2 publish").await;
    if let Some(d) = d {
        assert_eq!(d.reason_code, p5::DisconnectReasonCode::QoSNotSupported);
    }
    let m = api0.metric_sum("canal_mqtt_refused_total").await.unwrap();
    assert!(m >= 1.0, "refusals are counted: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_resumes_on_another_node_after_kill_9() {
    let mut net = cluster(3, &[]).await;
    let api1 = net.api(1).unwrap();
    let mut opts = v4_opts("meter-7", mqtt_addr(&net, 0));
    opts.set_clean_session(false);
    let mut s = v4(opts);
    assert!(!s.connack().await.session_present);
    s.client
        .subscribe("meters/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    s.suback().await;
    for i in 0..10 {
        http_publish(&api1, "meters/m7", &format!("m{i}")).await;
    }
    for i in 0..10 {
        let p = s.publish("the first ten").await;
        assert_eq!(text(&p.payload), format!("m{i}"));
    }
    // The client acknowledged all ten; wait until node 0 has committed those acks.
    let api0 = net.api(0).unwrap();
    wait_for("ten acks committed", WAIT, || {
        let api0 = api0.clone();
        async move {
            let n = api0
                .metric_sum("canal_mqtt_acks_recorded_total")
                .await
                .map_err(|e| e.to_string())?;
            if n >= 10.0 {
                Ok(())
            } else {
                Err(n.to_string())
            }
        }
    })
    .await
    .unwrap();
    net.kill(0).await.unwrap();
    drop(s);
    for i in 10..20 {
        http_publish(&api1, "meters/m7", &format!("m{i}")).await;
    }
    // Back on node 2: the session is there, and it gets exactly what it had not
    // acknowledged, in order.
    let mut opts = v4_opts("meter-7", mqtt_addr(&net, 2));
    opts.set_clean_session(false);
    let mut s = v4(opts);
    assert!(s.connack().await.session_present, "the session was resumed");
    for i in 10..20 {
        let p = s.publish("the ten it missed").await;
        assert_eq!(
            text(&p.payload),
            format!("m{i}"),
            "nothing acknowledged comes twice"
        );
    }
    // A clean session ends it: a later persistent connect finds none.
    drop(s);
    let mut clean = v4(v4_opts("meter-7", mqtt_addr(&net, 1)));
    clean.connack().await;
    clean.client.disconnect().await.unwrap();
    drop(clean);
    let mut opts = v4_opts("meter-7", mqtt_addr(&net, 1));
    opts.set_clean_session(false);
    let mut s = v4(opts);
    assert!(
        !s.connack().await.session_present,
        "a clean session removed the old one"
    );
}

/// Reads until the server closes the connection; true if it did within [`WAIT`].
async fn closed(sock: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Reads exactly `n` bytes, within [`WAIT`].
async fn read_n(sock: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, sock.read_exact(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    buf
}

/// Reads one packet whose remaining length fits one byte.
async fn read_packet(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut head = read_n(sock, 2).await;
    assert!(head[1] < 0x80, "a short packet: {head:?}");
    let body = read_n(sock, head[1] as usize).await;
    head.extend(body);
    head
}

fn connect_bytes(id: &str) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    let mut c = rumqttc::Connect::new(id);
    c.set_login("canal", canal_testnet::admin_token());
    rumqttc::Packet::Connect(c)
        .write(&mut b, usize::MAX)
        .unwrap();
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mqtt_input_is_refused_while_another_session_goes_on() {
    let net = cluster(1, &[]).await;
    let addr = mqtt_addr(&net, 0);
    let mut good = v4(v4_opts("steady", addr));
    good.client
        .subscribe("steady/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    good.suback().await;

    // Garbage instead of CONNECT.
    let mut g = tokio::net::TcpStream::connect(addr).await.unwrap();
    g.write_all(&[0xff; 64]).await.unwrap();
    assert!(closed(&mut g).await, "garbage closes the connection");
    // A packet that says it is far over the limit, right after CONNECT.
    let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
    big.write_all(&connect_bytes("big")).await.unwrap();
    big.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap();
    assert!(
        closed(&mut big).await,
        "an oversized packet closes the connection"
    );
    // CONNECT twice.
    let mut twice = tokio::net::TcpStream::connect(addr).await.unwrap();
    twice.write_all(&connect_bytes("twice")).await.unwrap();
    twice.write_all(&connect_bytes("twice")).await.unwrap();
    assert!(
        closed(&mut twice).await,
        "a second CONNECT closes the connection"
    );
    // A topic canal cannot store (an empty level): 5.0 gets PUBACK 0x90.
    let mut bad5 = v5("bad-topic", addr);
    bad5.client
        .publish("a//b", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let ack = bad5
        .next("PUBACK", |p| match p {
            p5::Packet::PubAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(ack.reason, p5::PubAckReason::TopicNameInvalid);
    // An invalid filter (sent raw: the clients refuse to send one): 3.1.1 SUBACK failure
    // 0x80, 5.0 0x8F; the connection stays.
    let mut raw4 = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw4.write_all(&connect_bytes("bad-filter")).await.unwrap();
    assert_eq!(read_n(&mut raw4, 4).await, vec![0x20, 0x02, 0x00, 0x00]);
    let mut sub = rumqttc::Subscribe::new("a/#/b", rumqttc::QoS::AtLeastOnce);
    sub.pkid = 1;
    let mut b = bytes::BytesMut::new();
    rumqttc::Packet::Subscribe(sub)
        .write(&mut b, usize::MAX)
        .unwrap();
    raw4.write_all(&b).await.unwrap();
    assert_eq!(
        read_n(&mut raw4, 5).await,
        vec![0x90, 0x03, 0x00, 0x01, 0x80]
    );
    let mut raw5 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = bytes::BytesMut::new();
    p5::Packet::Connect(
        p5::Connect {
            keep_alive: 30,
            client_id: "bad-filter-5".into(),
            clean_start: true,
            properties: None,
        },
        None,
        Some(p5::Login {
            username: "canal".into(),
            password: canal_testnet::admin_token().into(),
        }),
    )
    .write(&mut b, None)
    .unwrap();
    raw5.write_all(&b).await.unwrap();
    let connack = read_packet(&mut raw5).await;
    assert_eq!(connack[0], 0x20, "CONNACK");
    let mut b = bytes::BytesMut::new();
    let mut sub = p5::Subscribe::new(
        p5::Filter::new("x/#/y", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    );
    sub.pkid = 2;
    p5::Packet::Subscribe(sub).write(&mut b, None).unwrap();
    raw5.write_all(&b).await.unwrap();
    let suback = read_packet(&mut raw5).await;
    assert_eq!(suback[0], 0x90, "SUBACK");
    assert_eq!(
        suback.last(),
        Some(&0x8F),
        "Topic Filter invalid: {suback:?}"
    );
    // 3.1.1 publishing to a topic canal cannot store is disconnected.
    let mut bad4 = v4(v4_opts("bad-topic-4", addr));
    bad4.client
        .publish("/lead", rumqttc::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert!(bad4.ended().await, "3.1.1: a bad topic ends the connection");

    // A second connection with the same client id takes the session over.
    let mut older = v4(v4_opts("twin", addr));
    older.connack().await;
    let mut newer = v4(v4_opts("twin", addr));
    newer.connack().await;
    assert!(older.ended().await, "the older connection is closed");

    // Through all of it the steady session goes on.
    good.client
        .publish("steady/ok", rumqttc::QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(
        text(&good.publish("its own publish").await.payload),
        "still here"
    );

    // MQTT over WebSocket on the HTTP port (subprotocol mqtt).
    let api = net.node(0).info().unwrap().api.clone();
    let url = format!("{}/mqtt", api.replace("http://", "ws://"));
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt")
    );
    use futures::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        connect_bytes("browser").into(),
    ))
    .await
    .unwrap();
    let m = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let bytes = m.into_data();
    assert_eq!(
        &bytes[..],
        &[0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted over WebSocket"
    );

    let api0 = net.api(0).unwrap();
    for reason in [
        "malformed",
        "too_large",
        "connect_twice",
        "topic_invalid",
        "filter_invalid",
    ] {
        let (_, body) = api0.get_raw("/metrics").await.unwrap();
        assert!(
            body.contains(&format!("canal_mqtt_refused_total{{reason=\"{reason}\"}}")),
            "{reason} counted: {}",
            body.lines()
                .filter(|l| l.contains("mqtt"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_see_mqtt_publishes_and_their_outputs_reach_mqtt() {
    let net = cluster(1, &[]).await;
    let api = net.api(0).unwrap();
    let addr = mqtt_addr(&net, 0);
    let (status, body) = api
        .send(
            Method::PUT,
            "/v1/functions/threshold",
            canal_testnet::guests::bytes("threshold").unwrap(),
            None,
        )
        .await
        .unwrap();
    assert!((200..300).contains(&status), "deploy: {status} {body}");
    let spec = serde_json::json!({"on": "sensors/+/temp", "fn": "threshold", "out": "alerts/temp"});
    let (status, body) = api
        .send(
            Method::PUT,
            "/v1/triggers/alerts",
            serde_json::to_vec(&spec).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "trigger: {body}");
    let mut alerts = v5("alert-watch", addr);
    alerts
        .client
        .subscribe("alerts/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    alerts
        .next("SUBACK", |p| {
            matches!(p, p5::Packet::SubAck(_)).then_some(())
        })
        .await;
    // A 3.1.1 reading over the default threshold (30) runs the function; its alert comes
    // back over MQTT.
    let p = v4(v4_opts("sensor", addr));
    p.client
        .publish("sensors/r1/temp", rumqttc::QoS::AtLeastOnce, false, "35")
        .await
        .unwrap();
    let a = alerts.publish("the function's alert").await;
    assert!(text(&a.payload).contains("35"), "{}", text(&a.payload));
    // A 5.0 user property is a header the function reads: threshold 10 makes 20 an alert.
    let p5c = v5("sensor-5", addr);
    let props = p5::PublishProperties {
        user_properties: vec![("threshold".into(), "10".into())],
        ..Default::default()
    };
    p5c.client
        .publish_with_properties(
            "sensors/r2/temp",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "20",
            props,
        )
        .await
        .unwrap();
    let a = alerts
        .publish("the alert of a user-property threshold")
        .await;
    assert!(text(&a.payload).contains("20"), "{}", text(&a.payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_options_no_local_subscription_ids_topic_aliases_and_retain_as_published() {
    let net = cluster(1, &[]).await;
    let addr = mqtt_addr(&net, 0);
    let q1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    let mut a = v5("opts-a", addr);
    let filter = |path: &str, nolocal: bool, rap: bool| p5::Filter {
        path: path.into(),
        qos: q1,
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: p5::RetainForwardRule::OnEverySubscribe,
    };
    a.client
        .subscribe_many_with_properties(
            [filter("own/#", true, false)],
            p5::SubscribeProperties {
                id: Some(5),
                user_properties: Vec::new(),
            },
        )
        .await
        .unwrap();
    a.next("SUBACK", |p| {
        matches!(p, p5::Packet::SubAck(_)).then_some(())
    })
    .await;
    a.client
        .subscribe_many([filter("kept/#", false, true)])
        .await
        .unwrap();
    a.next("SUBACK", |p| {
        matches!(p, p5::Packet::SubAck(_)).then_some(())
    })
    .await;
    // No Local: its own publish does not come back; another client's does, with the
    // subscription identifier.
    a.client.publish("own/x", q1, false, "mine").await.unwrap();
    a.next("PUBACK", |p| {
        matches!(p, p5::Packet::PubAck(_)).then_some(())
    })
    .await;
    let b = v5("opts-b", addr);
    // A topic alias set with a topic, then used with an empty one.
    let alias = |n| p5::PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    };
    b.client
        .publish_with_properties("own/x", q1, false, "theirs", alias(1))
        .await
        .unwrap();
    b.client
        .publish_with_properties("", q1, false, "by-alias", alias(1))
        .await
        .unwrap();
    let got = a.publish("another client's publish").await;
    assert_eq!(text(&got.payload), "theirs", "its own publish came back");
    assert_eq!(
        got.properties.map(|p| p.subscription_identifiers),
        Some(vec![5])
    );
    let got = a.publish("the publish by topic alias").await;
    assert_eq!(
        (text(&got.payload).as_str(), &got.topic[..]),
        ("by-alias", &b"own/x"[..])
    );
    // Retain As Published: a live retained message keeps its flag for that subscription.
    b.client
        .publish("kept/door", q1, true, "open")
        .await
        .unwrap();
    let got = a.publish("the retained publish").await;
    assert!(got.retain, "retain as published");
    assert_eq!(text(&got.payload), "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_clients_need_a_token_and_act_within_its_rights() {
    let net = cluster(1, &[]).await;
    let addr = mqtt_addr(&net, 0);
    let admin = net.api(0).unwrap();
    // No token, or one the cluster did not sign: CONNACK 0x87, nothing else.
    for (id, token) in [("no-token", None), ("forged", Some("canal1.forged"))] {
        let mut c = v5_with(id, addr, token);
        match tokio::time::timeout(WAIT, c.rx.recv()).await {
            Ok(Some(Err(e))) => assert!(e.contains("NotAuthorized"), "{id}: {e}"),
            other => panic!("{id}: the CONNECT was not refused: {other:?}"),
        }
    }
    let room1 = crate::auth::create(
        &admin,
        &[
            "--sub",
            "room1",
            "--pub",
            "sensors/room1/#",
            "--sub-filter",
            "sensors/room1/#",
        ],
    )
    .await;
    let mut c = v5_with("room1", addr, Some(&room1.token));
    // A filter wider than the token's: 0x87; its own: granted.
    for (filter, want) in [
        ("sensors/#", p5::SubscribeReasonCode::NotAuthorized),
        (
            "sensors/room1/#",
            p5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        ),
    ] {
        c.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        let ack = c
            .next("SUBACK", |p| match p {
                p5::Packet::SubAck(a) => Some(a),
                _ => None,
            })
            .await;
        assert_eq!(ack.return_codes, vec![want], "{filter}");
    }
    // A publish outside its rights: PUBACK 0x87 and nothing stored; inside: stored, and
    // delivered to the granted subscription (which may come before or after its PUBACK).
    let mut delivered = Vec::new();
    for (topic, want) in [
        ("sensors/room2/t", p5::PubAckReason::NotAuthorized),
        ("sensors/room1/t", p5::PubAckReason::Success),
    ] {
        c.client
            .publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "21")
            .await
            .unwrap();
        let ack = c
            .next("PUBACK", |p| match p {
                p5::Packet::PubAck(a) => Some(a),
                p5::Packet::Publish(p) => {
                    delivered.push(p.topic.to_vec());
                    None
                }
                _ => None,
            })
            .await;
        assert_eq!(ack.reason, want, "{topic}");
    }
    let log = |t: &str| format!("/v1/topics/{}/log", t.replace('/', "%2F"));
    let room2: canal_proto::api::TopicLog = admin.get(&log("sensors/room2/t")).await.unwrap();
    assert_eq!(room2.next, 0, "a refused publish was stored");
    let room1_log: canal_proto::api::TopicLog = admin.get(&log("sensors/room1/t")).await.unwrap();
    assert_eq!(room1_log.next, 1);
    if delivered.is_empty() {
        delivered.push(c.publish("the allowed event").await.topic.to_vec());
    }
    assert_eq!(delivered, vec![b"sensors/room1/t".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connecting_on_another_node_takes_the_session_over() {
    let net = cluster(3, &[]).await;
    let api2 = net.api(2).unwrap();
    let connack5 = |p| match p {
        p5::Packet::ConnAck(c) => Some(c),
        _ => None,
    };
    // 5.0: the older connection, on node 0, is told 0x8E Session taken over.
    let mut older = v5("roamer-5", mqtt_addr(&net, 0));
    older.next("CONNACK on node 0", connack5).await;
    let mut newer = v5("roamer-5", mqtt_addr(&net, 1));
    newer.next("CONNACK on node 1", connack5).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let why = loop {
        match tokio::time::timeout_at(deadline, older.rx.recv()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => break e,
            Ok(None) => panic!("the older connection's event loop is gone"),
            Err(_) => panic!("the older connection on node 0 stayed open"),
        }
    };
    assert!(why.contains("SessionTakenOver"), "{why}");
    // The newer one carries on.
    newer
        .client
        .subscribe("roam/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    newer
        .next("SUBACK", |p| {
            matches!(p, p5::Packet::SubAck(_)).then_some(())
        })
        .await;
    http_publish(&api2, "roam/a", "after the takeover").await;
    assert_eq!(
        text(&newer.publish("a message after the takeover").await.payload),
        "after the takeover"
    );

    // 3.1.1, a persistent session: the older is closed, the newer on node 1 resumes the
    // session and gets its messages.
    let mut o = v4_opts("roamer-4", mqtt_addr(&net, 0));
    o.set_clean_session(false);
    let mut older = v4(o);
    older.connack().await;
    older
        .client
        .subscribe("roam4/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    older.suback().await;
    let mut o = v4_opts("roamer-4", mqtt_addr(&net, 1));
    o.set_clean_session(false);
    let mut newer = v4(o);
    assert!(newer.connack().await.session_present);
    assert!(
        older.ended().await,
        "the older connection on node 0 stayed open"
    );
    for i in 0..3 {
        http_publish(&api2, "roam4/a", &format!("r{i}")).await;
    }
    for i in 0..3 {
        let p = newer.publish("the session's messages on node 1").await;
        assert_eq!(text(&p.payload), format!("r{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_sent_once_by_another_node_when_the_clients_node_dies() {
    let mut net = cluster(3, &[]).await;
    let mut watcher = v4(v4_opts("will-watcher", mqtt_addr(&net, 1)));
    watcher.connack().await;
    watcher
        .client
        .subscribe("lastwill/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    watcher.suback().await;
    let mut o = v4_opts("doomed", mqtt_addr(&net, 0));
    o.set_last_will(rumqttc::LastWill::new(
        "lastwill/doomed",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut doomed = v4(o);
    doomed.connack().await;
    // The will record is written before CONNACK; a round trip makes sure it is committed.
    doomed
        .client
        .subscribe("nothing/here", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    doomed.suback().await;
    net.kill(0).await.unwrap();
    // Node 0's peers drop it from their peer table after its TTL; then one of them sends it.
    let p = tokio::time::timeout(Duration::from_secs(60), watcher.publish("the will"))
        .await
        .expect("no will within 60 s of the node's death");
    assert_eq!(
        (p.topic.as_str(), text(&p.payload).as_str()),
        ("lastwill/doomed", "gone")
    );
    drop(doomed);
    // Once: one node sent it, and what comes next on the topic is what is published next.
    let (api1, api2) = (net.api(1).unwrap(), net.api(2).unwrap());
    let sent_by_keepers = || {
        let (api1, api2) = (api1.clone(), api2.clone());
        async move {
            let name = "canal_mqtt_wills_sent_total{by=\"keeper\"}";
            let a = api1.metric_sum(name).await.map_err(|e| e.to_string())?;
            let b = api2.metric_sum(name).await.map_err(|e| e.to_string())?;
            Ok::<f64, String>(a + b)
        }
    };
    wait_for("the keeper's will counted", WAIT, || async {
        match sent_by_keepers().await? {
            1.0 => Ok(()),
            n => Err(format!("{n} wills sent by keepers")),
        }
    })
    .await
    .unwrap();
    http_publish(&api2, "lastwill/doomed", "after").await;
    let p = watcher.publish("the message after the will").await;
    assert_eq!(text(&p.payload), "after", "the will came twice");
    assert_eq!(sent_by_keepers().await.unwrap(), 1.0, "sent by one node");
}

/// One MQTT client's QoS 1 publishes to a topic are stored, and so delivered, in the order
/// it sent them, many in flight through a node that does not lead the topic's group: the
/// connection queues each publish in packet order and awaits only the PUBACKs together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_qos1_publishes_keep_their_order_through_a_follower() {
    const N: usize = 400;
    const TOPIC: &str = "order/mqtt";
    let net = cluster(3, &[]).await;
    let (group, lead, via) = crate::raft::topic_leader_and_follower(&net, TOPIC).await;
    let mut sub = v4(v4_opts("order-sub", mqtt_addr(&net, lead)));
    sub.connack().await;
    sub.client
        .subscribe(TOPIC, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let mut publisher = v4(v4_opts("order-pub", mqtt_addr(&net, via)));
    publisher.connack().await;
    // All go out without waiting for PUBACKs (rumqttc keeps up to 100 in flight).
    for i in 0..N {
        publisher
            .client
            .publish(TOPIC, rumqttc::QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        got.push(text(&sub.publish("the next event in order").await.payload));
    }
    // Order is promised while the leader stays: it did.
    assert_eq!(
        crate::raft::leader(&net, 0, &group).await,
        lead,
        "the leader changed"
    );
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let first_out = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(
        first_out,
        None,
        "delivered out of send order from {first_out:?}: {:?}",
        first_out.map(|i| &got[i..(i + 5).min(N)])
    );
}

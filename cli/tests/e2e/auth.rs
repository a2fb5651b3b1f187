//! Tokens on real nodes: every endpoint refuses a missing, malformed, expired, revoked,
//! forged or foreign token (401) and a token without the right (403), and stores nothing;
//! per-topic rights on publish, SSE and WebSocket; a revocation in force on every node within
//! a second; a founding node's own key and admin token; functions publishing within their
//! trigger owner's rights; `--auth none`.

use crate::functions::{dead_letters, deploy, log};
use crate::raft::cluster;
use crate::{BIN, assert_clear_error, canal, stderr};
use canal_proto::api::{TokenInfo, TokenIssued};
use canal_testnet::{Api, NodeOptions, Testnet, wait_for};
use reqwest::Method;
use std::time::Duration;

/// Issues a token through `api` (admin) from `canal token create` arguments.
pub(crate) async fn create(api: &Api, args: &[&str]) -> TokenIssued {
    let mut all = vec!["--api", api.base(), "--json", "token", "create"];
    all.extend_from_slice(args);
    let o = canal(&all).await;
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every route of the API, with a method and a body that would change something if let in.
fn routes() -> Vec<(Method, &'static str, &'static [u8])> {
    vec![
        (Method::GET, "/v1/peers", b""),
        (Method::GET, "/v1/topics/a/locate", b""),
        (Method::GET, "/v1/topics/a/log", b""),
        (Method::GET, "/v1/topics/a/settings", b""),
        (
            Method::PUT,
            "/v1/topics/a/settings",
            b"{\"retain_events\": 1}",
        ),
        (Method::DELETE, "/v1/topics/a/settings", b""),
        // A settings change whose `/settings` is percent-encoded is one too.
        (
            Method::PUT,
            "/v1/topics/a%2Fsettings",
            b"{\"retain_events\": 1}",
        ),
        (Method::POST, "/v1/topics/a/events", b"x"),
        (
            Method::POST,
            "/v1/events",
            b"{\"topic\": \"a\", \"payload\": \"x\"}\n",
        ),
        (Method::GET, "/v1/publish", b""),
        (Method::GET, "/v1/subscribe?filter=a&qos=0", b""),
        (
            Method::POST,
            "/v1/subscriptions/s/ack?topic=a&offset=0",
            b"",
        ),
        (Method::GET, "/v1/cluster/status", b""),
        (Method::GET, "/v1/cluster/digest", b""),
        (Method::GET, "/v1/cluster/shards", b""),
        (Method::POST, "/v1/cluster/remove/12D3KooWAbc", b""),
        (Method::POST, "/v1/cluster/admit/12D3KooWAbc", b""),
        (Method::GET, "/v1/kv/k", b""),
        (Method::PUT, "/v1/kv/k", b"v"),
        (Method::POST, "/v1/kv/k", b"1"),
        (Method::GET, "/metrics", b""),
        (Method::GET, "/v1/functions", b""),
        (Method::PUT, "/v1/functions/f", b"\0asm"),
        (Method::GET, "/v1/functions/f", b""),
        (Method::DELETE, "/v1/functions/f", b""),
        (Method::POST, "/v1/functions/f/invoke", b"x"),
        (Method::GET, "/v1/functions/f/placement", b""),
        (Method::GET, "/v1/functions/f/state", b""),
        (Method::GET, "/v1/functions/f/state/k", b""),
        (Method::GET, "/v1/triggers", b""),
        (
            Method::PUT,
            "/v1/triggers/t",
            b"{\"on\": \"a\", \"fn\": \"f\"}",
        ),
        (Method::GET, "/v1/triggers/t", b""),
        (Method::DELETE, "/v1/triggers/t", b""),
        (Method::GET, "/v1/tokens", b""),
        (
            Method::POST,
            "/v1/tokens",
            b"{\"subject\": \"x\", \"ttl_s\": 60, \"admin\": true}",
        ),
        (Method::DELETE, "/v1/tokens/abc", b""),
    ]
}

/// Sends every route with `api`'s token and checks each answer is `status` with `kind` and
/// a message holding `needle`.
async fn refused_everywhere(api: &Api, status: u16, kind: &str, needle: &str) {
    for (method, path, body) in routes() {
        let (got, text) = api
            .send(method.clone(), path, body.to_vec(), None)
            .await
            .unwrap();
        assert_eq!(got, status, "{method} {path}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["kind"], kind, "{method} {path}: {text}");
        let msg = e["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: {needle:?} not in {msg}"
        );
    }
}

/// A token signed with `key`, naming cluster `cluster`, with every right.
fn signed(key: &canal_auth::SigningKey, cluster: &str, expires_ms: u64) -> String {
    let now = canal_proto::time::now_ms();
    key.issue(&canal_auth::Claims {
        id: canal_auth::fresh_token_id().unwrap(),
        subject: "mallory".into(),
        cluster: cluster.into(),
        issued_ms: now.min(expires_ms - 1),
        expires_ms,
        publish: canal_auth::Permission::everything(),
        subscribe: canal_auth::Permission::everything(),
        admin: true,
    })
    .unwrap()
}

/// Waits until `api` answers `GET /v1/cluster/status` with `status`.
async fn wait_status(api: &Api, status: u16, what: &str, within: Duration) {
    wait_for(what, within, || {
        let api = api.clone();
        async move {
            let (got, body) = api
                .get_raw("/v1/cluster/status")
                .await
                .map_err(|e| e.to_string())?;
            if got == status {
                Ok(())
            } else {
                Err(format!("{got} {body}"))
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_bad_tokens_and_missing_rights_and_stores_nothing() {
    let net = cluster(3, &[]).await;
    let admin = net.api(0).unwrap();
    let base = admin.base().to_string();
    let cluster_id = canal_auth::cluster_id(&canal_testnet::auth::token_key().public());

    // Health stays open for probes.
    let (status, _) = Api::with_token(&base, None)
        .get_raw("/v1/health")
        .await
        .unwrap();
    assert_eq!(status, 200);

    refused_everywhere(
        &Api::with_token(&base, None),
        401,
        "unauthorized",
        "no token",
    )
    .await;
    refused_everywhere(
        &Api::with_token(&base, Some("not-a-token")),
        401,
        "unauthorized",
        "malformed",
    )
    .await;
    // Signed by another key, but naming this cluster: forged.
    let other = canal_auth::SigningKey::from_bytes(&[7; 32]);
    let far = canal_proto::time::now_ms() + 3_600_000;
    let forged = signed(&other, &cluster_id, far);
    refused_everywhere(
        &Api::with_token(&base, Some(&forged)),
        401,
        "unauthorized",
        "signature does not verify",
    )
    .await;
    // Another cluster's own token.
    let foreign = signed(&other, &canal_auth::cluster_id(&other.public()), far);
    refused_everywhere(
        &Api::with_token(&base, Some(&foreign)),
        401,
        "unauthorized",
        "issued by cluster",
    )
    .await;
    // Expired: signed by the right key, a moment in the past.
    let key = canal_testnet::auth::token_key();
    let expired = signed(key, &cluster_id, canal_proto::time::now_ms() - 1);
    refused_everywhere(
        &Api::with_token(&base, Some(&expired)),
        401,
        "unauthorized",
        "expired",
    )
    .await;
    // A token without admin rights gets 403 on every admin route, naming the right.
    let user = create(
        &admin,
        &[
            "--sub",
            "alice",
            "--pub",
            "sensors/#",
            "--sub-filter",
            "sensors/#",
            "--ttl",
            "1h",
        ],
    )
    .await;
    let alice = Api::with_token(&base, Some(&user.token));
    for (method, path, body) in routes() {
        let bare = path.split('?').next().unwrap_or_default();
        let topic_route = path.starts_with("/v1/topics/")
            || ["/v1/events", "/v1/publish", "/v1/subscribe"].contains(&bare)
            || path.starts_with("/v1/subscriptions/");
        let admin_route = !topic_route || (path.ends_with("/settings") && method != Method::GET);
        let (got, text) = alice
            .send(method.clone(), path, body.to_vec(), None)
            .await
            .unwrap();
        if admin_route {
            assert_eq!(got, 403, "{method} {path}: {text}");
            assert!(text.contains("admin"), "{method} {path}: {text}");
            assert!(text.contains("alice"), "{method} {path}: {text}");
        } else if path.contains("topics/a") || path == "/v1/events" || path.contains("topic=a") {
            // Topic `a` is outside sensors/#: reads and writes of it are refused too.
            let open =
                path.ends_with("/locate") || (path.ends_with("/settings") && method == Method::GET);
            if !open {
                assert_eq!(got, 403, "{method} {path}: {text}");
            }
        }
    }

    // Revoked: in force on every node within a second of the answer.
    let doomed = create(&admin, &["--sub", "bob", "--admin", "--ttl", "1h"]).await;
    for i in 0..3 {
        let api = Api::with_token(net.api(i).unwrap().base(), Some(&doomed.token));
        let (s, body) = api.get_raw("/v1/cluster/status").await.unwrap();
        assert_eq!(s, 200, "node{i}: {body}");
    }
    let o = canal(&["--api", &base, "token", "revoke", &doomed.info.id]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..3 {
        let api = Api::with_token(net.api(i).unwrap().base(), Some(&doomed.token));
        wait_status(
            &api,
            401,
            &format!("node{i} to refuse the revoked token"),
            Duration::from_secs(1),
        )
        .await;
    }
    refused_everywhere(
        &Api::with_token(&base, Some(&doomed.token)),
        401,
        "unauthorized",
        "revoked",
    )
    .await;
    let o = canal(&["--api", &base, "--json", "token", "list"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let list: Vec<TokenInfo> = serde_json::from_slice(&o.stdout).unwrap();
    let listed = |id: &str| list.iter().find(|t| t.id == id).cloned();
    assert!(
        listed(&doomed.info.id).is_some_and(|t| t.revoked),
        "{list:?}"
    );
    assert!(listed(&user.info.id).is_some_and(|t| !t.revoked && t.publish == ["sensors/#"]));

    // Nothing that was refused is stored.
    let (s, _) = admin.get_raw("/v1/kv/k").await.unwrap();
    assert_eq!(s, 404, "a refused KV write was stored");
    assert_eq!(
        log(&admin, "a").await.next,
        0,
        "a refused publish was stored"
    );
    let (s, _) = admin.get_raw("/v1/triggers/t").await.unwrap();
    assert_eq!(s, 404, "a refused trigger was stored");
    let (s, body) = admin.get_raw("/v1/topics/a/settings").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        !body.contains("\"retain_events\":1"),
        "a refused setting was stored: {body}"
    );
    let o = canal(&["--api", &base, "--json", "token", "list"]).await;
    let list: Vec<TokenInfo> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        !list.iter().any(|t| t.subject == "x"),
        "a refused token was issued: {list:?}"
    );
    // Each refusal was counted by reason.
    for reason in [
        "missing",
        "malformed",
        "bad_signature",
        "foreign_cluster",
        "expired",
        "revoked",
        "admin",
    ] {
        let n = admin
            .metric_sum(&format!("canal_auth_refused_total{{reason=\"{reason}\"}}"))
            .await
            .unwrap();
        assert!(n > 0.0, "no refusal counted for {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_rights_hold_on_publish_sse_and_websocket() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let net = cluster(1, &[]).await;
    let admin = net.api(0).unwrap();
    let base = admin.base().to_string();
    let publisher = create(&admin, &["--sub", "pub-only", "--pub", "sensors/#"]).await;
    let room1 = create(
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
    canal_client::tls::install_provider();
    let http = reqwest::Client::new();
    let get = |path: String, token: &str| {
        http.get(format!("{base}{path}"))
            .bearer_auth(token.to_string())
            .send()
    };

    // A publish-only token publishes but cannot subscribe.
    let r = http
        .post(format!("{base}/v1/topics/sensors%2Froom2%2Ft/events"))
        .bearer_auth(&publisher.token)
        .body("21.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = get(
        "/v1/subscribe?filter=sensors/%23&qos=0".into(),
        &publisher.token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("subscribe") && text.contains("sensors/#"),
        "{text}"
    );

    // room1 may not publish to room2, and nothing is stored.
    let r = http
        .post(format!("{base}/v1/topics/sensors%2Froom2%2Ft/events"))
        .bearer_auth(&room1.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("publish") && text.contains("sensors/room2/t"),
        "{text}"
    );
    assert_eq!(log(&admin, "sensors/room2/t").await.next, 1);
    // A batch with one refused line stores none of its lines.
    let r = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(&room1.token)
        .header("content-type", "application/x-ndjson")
        .body("{\"topic\": \"sensors/room1/t\", \"payload\": \"ok\"}\n{\"topic\": \"sensors/room2/t\", \"payload\": \"no\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(log(&admin, "sensors/room1/t").await.next, 0);

    // SSE: a filter wider than the token's is refused whole (403), one within it is served.
    let r = get(
        "/v1/subscribe?filter=sensors/%23&qos=0".into(),
        &room1.token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("sensors/#") && text.contains("room1"),
        "{text}"
    );
    let r = get(
        "/v1/subscribe?filter=sensors/room1/%23&qos=0".into(),
        &room1.token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);

    // WebSocket with the token as a query parameter, as a browser sends it.
    let ws = base.replace("http://", "ws://");
    let wide = format!(
        "{ws}/v1/subscribe?filter=sensors/%23&qos=0&token={}",
        room1.token
    );
    match tokio_tungstenite::connect_async(&wide).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("a wide WebSocket subscription was not refused: {other:?}"),
    }
    let narrow = format!(
        "{ws}/v1/subscribe?filter=sensors/room1/%23&qos=0&token={}",
        room1.token
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(&narrow).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        while let Some(Ok(m)) = socket.next().await {
            if let Message::Text(t) = m
                && tx.send(t.to_string()).await.is_err()
            {
                break;
            }
        }
    });
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    // QoS 0 reaches only a subscriber already listening: publish until one arrives.
    let got = wait_for(
        "the WebSocket to deliver an event of room1",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            let base = base.clone();
            let token = room1.token.clone();
            let rx = rx.clone();
            async move {
                let _ = http
                    .post(format!("{base}/v1/topics/sensors%2Froom1%2Ft/events"))
                    .bearer_auth(token)
                    .header("canal-qos", "0")
                    .body("warm")
                    .send()
                    .await;
                rx.lock().await.try_recv().map_err(|e| e.to_string())
            }
        },
    )
    .await
    .unwrap();
    assert!(got.contains("sensors/room1/t"), "{got}");
    let none = Api::with_token(&base, None);
    let (s, _) = none
        .get_raw("/v1/subscribe?filter=sensors/room1/%23")
        .await
        .unwrap();
    assert_eq!(s, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_publishes_only_where_its_trigger_owner_may() {
    let net = cluster(1, &[]).await;
    let admin = net.api(0).unwrap();
    let base = admin.base().to_string();
    deploy(&admin, "abuse", "misbehave", "").await;
    // An operator who may deploy, but publish only to alerts/#.
    let ops = create(
        &admin,
        &[
            "--sub",
            "ops",
            "--admin",
            "--pub",
            "alerts/#",
            "--sub-filter",
            "#",
        ],
    )
    .await;
    let ops_api = Api::with_token(&base, Some(&ops.token));
    // An output topic outside its rights is refused when the trigger is made...
    let (s, body) = ops_api
        .send(
            Method::PUT,
            "/v1/triggers/bad",
            br#"{"on": "in/#", "fn": "abuse", "out": "cmd/x"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("cmd/x"), "{body}");
    // ...and a function that publishes there itself has its event sent to the dead letter.
    let (s, body) = ops_api
        .send(
            Method::PUT,
            "/v1/triggers/t",
            br#"{"on": "in/#", "fn": "abuse", "out": "alerts/out", "retries": 0}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{body}");
    for payload in ["publish:cmd/x", "ok"] {
        let (s, body) = admin
            .send(
                Method::POST,
                "/v1/topics/in%2Fa/events",
                payload.as_bytes().to_vec(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "{body}");
    }
    wait_for(
        "the dead letter and the allowed output",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move {
                let dl = log(&admin, "dead-letter/t").await.next;
                let out = log(&admin, "alerts/out").await.next;
                if dl >= 1 && out >= 1 {
                    Ok(())
                } else {
                    Err(format!("dead letters {dl}, outputs {out}"))
                }
            }
        },
    )
    .await
    .unwrap();
    let dead = dead_letters(&admin, "dead-letter/t", 1).await;
    assert_eq!(dead[0].0, "publish:cmd/x");
    assert_eq!(dead[0].1, "denied", "{dead:?}");
    assert!(
        dead[0].2.contains("cmd/x") && dead[0].2.contains("ops"),
        "{dead:?}"
    );
    assert_eq!(
        log(&admin, "cmd/x").await.next,
        0,
        "the function published to cmd/x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founding_node_makes_its_key_and_prints_one_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let net = Testnet::start(BIN, 1, |_| NodeOptions {
        extra_args: vec!["--bootstrap-expect".into(), "1".into()],
        own_token_key: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = net.node(0).data_dir().to_path_buf();
    let file = dir.join("admin-token");
    let token = wait_for("the admin token", Duration::from_secs(60), || {
        let file = file.clone();
        async move {
            std::fs::read_to_string(&file)
                .map(|t| t.trim().to_string())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .unwrap();
    for f in ["admin-token", "token-key"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let printed = std::fs::read_to_string(dir.join("node.log")).unwrap();
    assert_eq!(
        printed.matches(&token).count(),
        1,
        "printed once: {printed}"
    );
    let base = net.api(0).unwrap().base().to_string();
    let mine = Api::with_token(&base, Some(&token));
    wait_status(
        &mine,
        200,
        "the admin token to work",
        Duration::from_secs(30),
    )
    .await;
    // The harness's token is another cluster's here.
    let (s, body) = net
        .api(0)
        .unwrap()
        .get_raw("/v1/cluster/status")
        .await
        .unwrap();
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("issued by cluster"), "{body}");
    // The founding node issues tokens with its own key.
    let o = canal(&[
        "--api", &base, "--token", &token, "--json", "token", "create", "--sub", "x",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_none_serves_anyone_on_loopback_only_and_says_so() {
    let net = Testnet::start(BIN, 1, |_| NodeOptions {
        extra_args: vec!["--auth".into(), "none".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let api = Api::with_token(net.api(0).unwrap().base(), None);
    let (s, body) = api.get_raw("/v1/peers").await.unwrap();
    assert_eq!(s, 200, "{body}");
    let printed = std::fs::read_to_string(net.node(0).data_dir().join("node.log")).unwrap();
    assert!(printed.contains("--auth none"), "{printed}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let o = canal(&[
        "node",
        "--data-dir",
        &data,
        "--api-listen",
        "0.0.0.0:0",
        "--auth",
        "none",
    ])
    .await;
    assert_clear_error(&o, 2, "auth");
    assert!(stderr(&o).contains("0.0.0.0"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_talks_to_a_tls_node_with_ca_and_refuses_a_certificate_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let files = canal_testnet::tls::ensure_local_ca(&dir.path().join("tls")).unwrap();
    let net = Testnet::start(BIN, 1, |_| NodeOptions {
        extra_args: vec![
            "--bootstrap-expect".into(),
            "1".into(),
            "--tls-cert".into(),
            files.cert.display().to_string(),
            "--tls-key".into(),
            files.key.display().to_string(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let api = net.node(0).info().unwrap().api.clone();
    assert!(api.starts_with("https://127.0.0.1:"), "{api}");
    let ca = files.ca.display().to_string();
    // With the CA: the CLI verifies the node and talks to it.
    wait_for("the TLS node to answer", Duration::from_secs(60), || {
        let (api, ca) = (api.clone(), ca.clone());
        async move {
            let o = canal(&["--api", &api, "--ca", &ca, "cluster", "status"]).await;
            if o.status.success() {
                Ok(())
            } else {
                Err(stderr(&o))
            }
        }
    })
    .await
    .unwrap();
    // Without it (the system's roots) and with another CA, the certificate is refused.
    let o = canal(&["--api", &api, "peers"]).await;
    assert_clear_error(&o, 1, "certificate");
    let other = canal_testnet::tls::ensure_local_ca(&dir.path().join("other")).unwrap();
    let o = canal(&[
        "--api",
        &api,
        "--ca",
        &other.ca.display().to_string(),
        "peers",
    ])
    .await;
    assert_clear_error(&o, 1, "certificate");
    // Plain HTTP to the TLS port gets no answer.
    let plain = api.replace("https://", "http://");
    let o = canal(&["--api", &plain, "peers"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// A one-node cluster serving TLS with the local CA's files in `dir/tls`, and `extra` node
/// arguments besides; answers once the CLI (trusting the CA) gets its cluster status.
async fn tls_node(
    dir: &std::path::Path,
    extra: &[String],
) -> (Testnet, canal_testnet::tls::TlsFiles, String) {
    let files = canal_testnet::tls::ensure_local_ca(&dir.join("tls")).unwrap();
    let mut args = vec![
        "--bootstrap-expect".to_string(),
        "1".into(),
        "--tls-cert".into(),
        files.cert.display().to_string(),
        "--tls-key".into(),
        files.key.display().to_string(),
    ];
    args.extend_from_slice(extra);
    let net = Testnet::start(BIN, 1, |_| NodeOptions {
        extra_args: args.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = net.node(0).info().unwrap().api.clone();
    assert!(api.starts_with("https://127.0.0.1:"), "{api}");
    (net, files, api)
}

/// `canal pub --stdin` over the node's `wss://` publish stream, run with `args` first.
async fn pub_stdin(args: &[&str], topic: &str, input: &'static [u8]) -> std::process::Output {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(BIN)
        .env("CANAL_TOKEN", canal_testnet::admin_token())
        .env_remove("CANAL_API")
        .env_remove("CANAL_CA")
        .args(args)
        .args(["--json", "pub", topic, "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("canal pub --stdin did not end")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_stdin_streams_over_wss_to_a_tls_node_and_refuses_an_unknown_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, files, api) = tls_node(dir.path(), &[]).await;
    let ca = files.ca.display().to_string();
    wait_for(
        "the TLS node to take publishes",
        Duration::from_secs(60),
        || {
            let (api, ca) = (api.clone(), ca.clone());
            async move {
                let o = canal(&["--api", &api, "--ca", &ca, "pub", "tls/ready", "x"]).await;
                if o.status.success() {
                    Ok(())
                } else {
                    Err(stderr(&o))
                }
            }
        },
    )
    .await
    .unwrap();
    let out = pub_stdin(&["--api", &api, "--ca", &ca], "tls/s", b"one\ntwo\nthree\n").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let acks: Vec<canal_proto::api::StreamAck> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut offsets: Vec<Option<u64>> = acks.iter().map(|a| a.offset).collect();
    offsets.sort();
    assert_eq!(offsets, vec![Some(0), Some(1), Some(2)], "{acks:?}");
    // The node stored the three lines.
    let o = canal(&[
        "--api", &api, "--ca", &ca, "--json", "topic", "log", "tls/s",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let log: canal_proto::api::TopicLog = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((log.first, log.next), (0, 3), "{log:?}");

    // Another CA's certificate is refused, and nothing is stored.
    let other = canal_testnet::tls::ensure_local_ca(&dir.path().join("other")).unwrap();
    let other = other.ca.display().to_string();
    let out = pub_stdin(&["--api", &api, "--ca", &other], "tls/s", b"four\n").await;
    assert_clear_error(&out, 1, "certificate");
    let o = canal(&[
        "--api", &api, "--ca", &ca, "--json", "topic", "log", "tls/s",
    ])
    .await;
    let log: canal_proto::api::TopicLog = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(log.next, 3, "{log:?}");
}

/// rustls client settings trusting only the CA certificate in `ca`.
fn trusting(ca: &std::path::Path) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS connection to `addr` (`127.0.0.1`) trusting only the CA certificate in `ca`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = trusting(ca);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("the TLS handshake timed out"))?
}

/// Writes one MQTT 3.1.1 packet.
async fn mqtt_send<S: tokio::io::AsyncWrite + Unpin>(io: &mut S, packet: rumqttc::Packet) {
    use tokio::io::AsyncWriteExt;
    let mut b = bytes::BytesMut::new();
    packet.write(&mut b, usize::MAX).unwrap();
    io.write_all(&b).await.unwrap();
    io.flush().await.unwrap();
}

/// Reads the next MQTT 3.1.1 packet, within 10 s.
async fn mqtt_next<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut bytes::BytesMut,
) -> rumqttc::Packet {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rumqttc::Packet::read(buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("a packet that does not read: {e:?}"),
        }
        let n = tokio::time::timeout_at(deadline, io.read_buf(buf))
            .await
            .expect("a packet in time")
            .unwrap();
        assert!(n > 0, "the connection closed");
    }
}

/// CONNECTs as `id` with `token` as the password; answers the CONNACK's code.
async fn mqtt_login<S>(io: &mut S, buf: &mut bytes::BytesMut, id: &str, token: &str) -> u8
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut c = rumqttc::Connect::new(id);
    c.set_login("canal", token);
    mqtt_send(io, rumqttc::Packet::Connect(c)).await;
    match mqtt_next(io, buf).await {
        rumqttc::Packet::ConnAck(a) => a.code as u8,
        other => panic!("CONNACK expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_takes_the_token_and_refuses_a_client_that_does_not_trust_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (net, files, api) = tls_node(dir.path(), &[]).await;
    let info = net.node(0).info().unwrap().clone();
    let mqtts = net.node(0).mqtts_addr().unwrap();
    assert_ne!(info.mqtt, info.mqtts, "{info:?}");
    // health shows it next to the MQTT address.
    let ca = files.ca.display().to_string();
    // (`--json` prints the report whether or not the node is ready yet.)
    let o = canal(&["--api", &api, "--ca", &ca, "--json", "health"]).await;
    let h: canal_proto::api::Health =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    assert_eq!(h.mqtts_addr, Some(mqtts.to_string()), "{h:?}");
    assert_eq!(h.mqtt_addr, info.mqtt, "{h:?}");

    // A subscriber and a publisher, both over TLS with the admin token, once the node
    // has formed its cluster (QoS 0 needs no Raft, but the token key needs the record).
    let sub = wait_for("an MQTT-over-TLS login", Duration::from_secs(60), || {
        let ca = files.ca.clone();
        async move {
            let mut io = tls_connect(mqtts, &ca).await.map_err(|e| e.to_string())?;
            let mut buf = bytes::BytesMut::new();
            match mqtt_login(&mut io, &mut buf, "tls-sub", canal_testnet::admin_token()).await {
                0 => Ok((io, buf)),
                code => Err(format!("CONNACK code {code}")),
            }
        }
    })
    .await
    .unwrap();
    let (mut sub, mut sub_buf) = sub;
    mqtt_send(
        &mut sub,
        rumqttc::Packet::Subscribe(rumqttc::Subscribe::new("tls/#", rumqttc::QoS::AtMostOnce)),
    )
    .await;
    match mqtt_next(&mut sub, &mut sub_buf).await {
        rumqttc::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::AtMostOnce
            )]
        ),
        other => panic!("SUBACK expected, got {other:?}"),
    }
    let mut publ = tls_connect(mqtts, &files.ca).await.unwrap();
    let mut pub_buf = bytes::BytesMut::new();
    let code = mqtt_login(
        &mut publ,
        &mut pub_buf,
        "tls-pub",
        canal_testnet::admin_token(),
    )
    .await;
    assert_eq!(code, 0);
    mqtt_send(
        &mut publ,
        rumqttc::Packet::Publish(rumqttc::Publish::new(
            "tls/m",
            rumqttc::QoS::AtMostOnce,
            "over tls",
        )),
    )
    .await;
    match mqtt_next(&mut sub, &mut sub_buf).await {
        rumqttc::Packet::Publish(p) => {
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("tls/m", &b"over tls"[..])
            );
        }
        other => panic!("PUBLISH expected, got {other:?}"),
    }

    // A bad token over TLS is refused as on plain MQTT (3.1.1: 5, not authorized).
    let mut bad = tls_connect(mqtts, &files.ca).await.unwrap();
    let code = mqtt_login(
        &mut bad,
        &mut bytes::BytesMut::new(),
        "tls-bad",
        "canal1.AAAA",
    )
    .await;
    assert_eq!(code, 5);
    // A client trusting another CA refuses the node's certificate in the handshake.
    let other = canal_testnet::tls::ensure_local_ca(&dir.path().join("other")).unwrap();
    let err = tls_connect(mqtts, &other.ca).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // Plain MQTT on the TLS port gets no CONNACK: the node hangs up.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(mqtts).await.unwrap();
    let mut b = bytes::BytesMut::new();
    let mut c = rumqttc::Connect::new("plain");
    c.set_login("canal", canal_testnet::admin_token());
    rumqttc::Packet::Connect(c)
        .write(&mut b, usize::MAX)
        .unwrap();
    plain.write_all(&b).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(&[0x20]),
        "a CONNACK over plain TCP: {answer:?} ({read:?})"
    );
    // Both refused handshakes are counted (another CA's client, plain TCP).
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(trusting(&files.ca))
        .build()
        .unwrap();
    let metrics = http
        .get(format!("{api}/metrics"))
        .bearer_auth(canal_testnet::admin_token())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("canal_tls_handshake_failures_total")
                && l.contains("listener=\"mqtt\"")
                && l.contains("reason=\"refused\"")
        })
        .unwrap_or_else(|| panic!("no refused MQTT handshakes counted:\n{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_tls_client_ca_serves_the_cli_with_cert_and_key_and_refuses_it_without() {
    let dir = tempfile::tempdir().unwrap();
    // The local CA signs both the node's and the client's certificate.
    let ca_path = dir.path().join("tls").join("ca.pem");
    let files = canal_testnet::tls::ensure_local_ca(&dir.path().join("tls")).unwrap();
    assert!(files.client_cert.exists() && files.client_key.exists());
    let (_net, files, api) = tls_node(
        dir.path(),
        &["--tls-client-ca".into(), ca_path.display().to_string()],
    )
    .await;
    let ca = files.ca.display().to_string();
    let cert = files.client_cert.display().to_string();
    let key = files.client_key.display().to_string();
    wait_for(
        "the mutual-TLS node to answer",
        Duration::from_secs(60),
        || {
            let (api, ca, cert, key) = (api.clone(), ca.clone(), cert.clone(), key.clone());
            async move {
                let o = canal(&[
                    "--api",
                    &api,
                    "--ca",
                    &ca,
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                    "pub",
                    "mtls/ready",
                    "x",
                ])
                .await;
                if o.status.success() {
                    Ok(())
                } else {
                    Err(stderr(&o))
                }
            }
        },
    )
    .await
    .unwrap();
    // The publish stream shows the certificate too.
    let out = pub_stdin(
        &["--api", &api, "--ca", &ca, "--cert", &cert, "--key", &key],
        "mtls/s",
        b"one\ntwo\n",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Without a certificate the handshake is refused, and so is the publish stream; the
    // error names the flags (as the alert, or as a connection closed during the handshake,
    // whichever reaches the client first under TLS 1.3).
    let o = canal(&["--api", &api, "--ca", &ca, "peers"]).await;
    assert_clear_error(&o, 1, "give --cert and --key");
    let out = pub_stdin(&["--api", &api, "--ca", &ca], "mtls/s", b"three\n").await;
    assert_clear_error(&out, 1, "give --cert and --key");
    // A certificate of another CA is refused likewise.
    let other = canal_testnet::tls::ensure_local_ca(&dir.path().join("other")).unwrap();
    let o = canal(&[
        "--api",
        &api,
        "--ca",
        &ca,
        "--cert",
        &other.client_cert.display().to_string(),
        "--key",
        &other.client_key.display().to_string(),
        "peers",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // Only the two lines sent with the certificate were stored.
    let o = canal(&[
        "--api", &api, "--ca", &ca, "--cert", &cert, "--key", &key, "--json", "topic", "log",
        "mtls/s",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let log: canal_proto::api::TopicLog = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(log.next, 2, "{log:?}");
    // A key that is not the certificate's is a usage error, named.
    let o = canal(&[
        "--api",
        &api,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &other.client_key.display().to_string(),
        "peers",
    ])
    .await;
    assert_clear_error(&o, 2, "--key");
}

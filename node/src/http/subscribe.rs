//! `GET /v1/subscribe`: a subscription's deliveries as Server-Sent Events, or as WebSocket
//! frames with acknowledgements coming back on the same socket. What is delivered is
//! [`canal_pubsub`]'s; this is only the framing.

use super::{ApiError, ApiState};
use crate::tokens::Caller;
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use canal_pubsub::Delivery;
use canal_pubsub::feed::{FeedRx, Weighed};
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

/// `GET /v1/subscribe?filter=F&qos=0|1&from=...&durable=NAME`: a WebSocket upgrade gets a
/// WebSocket, anything else Server-Sent Events.
pub(super) async fn subscribe(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Everything is checked before answering, so bad input is a plain HTTP error. A filter
    // wider than the token's is refused whole (see canal_auth::claims).
    if let Some(filter) = q.get("filter") {
        super::auth::check_subscribe(&st, &caller, filter)?;
    }
    let req = super::parse::subscribe_request(&q);
    let rx = st.pubsub.subscribe(&req).await?;
    Ok(match ws {
        Ok(ws) => {
            let durable = req.durable;
            ws.on_upgrade(move |socket| websocket(st, caller, rx, durable, socket))
        }
        Err(_) => sse(rx),
    })
}

/// Server-Sent Events: one `message` event per event (data: the event's JSON, id:
/// `topic:offset` for QoS 1), `lagged` for events missed. Under load the deliveries waiting
/// go out in one write (at most [`SSE_BATCH`]); an idle stream sends a comment every
/// [`SSE_KEEP_ALIVE`] so that proxies and clients see it is alive.
fn sse(rx: FeedRx<Delivery>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        // Cancel-safe: what the timeout cuts short stays queued.
        let ds = match tokio::time::timeout(SSE_KEEP_ALIVE, rx.recv_many(SSE_BATCH)).await {
            Ok(Some(ds)) => ds,
            Ok(None) => return None,
            Err(_) => return Some((Ok::<_, Infallible>(Bytes::from_static(b":\n\n")), rx)),
        };
        let mut out = String::with_capacity(ds.iter().map(|d| d.weight() + 32).sum());
        for d in ds {
            sse_frame(&mut out, d);
        }
        Some((Ok(Bytes::from(out)), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// How many deliveries one SSE write carries at most.
const SSE_BATCH: usize = 64;
/// How long an SSE stream may be silent before it sends a keep-alive comment.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Appends `d` to `out` as one SSE event. A line break in the data would end the field
/// early, so each line goes in a `data:` field of its own (clients join them with `\n`).
fn sse_frame(out: &mut String, d: Delivery) {
    match &d {
        Delivery::Message { id, event } => sse_event(out, "message", id.as_deref(), event.json()),
        Delivery::Lagged(json) => sse_event(out, "lagged", None, json),
    }
}

/// Appends one SSE event named `event` with `data` and, if given, `id`.
fn sse_event(out: &mut String, event: &str, id: Option<&str>, data: &str) {
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str("id: ");
        // An id is `topic:offset`, and topics hold no line breaks; kept on one line anyway.
        out.extend(id.chars().filter(|c| *c != '\n' && *c != '\r'));
        out.push('\n');
    }
    out.push('\n');
}

/// A WebSocket: each event is a text frame holding its JSON, missed events a text frame
/// `{"lagged": ...}`. A durable subscriber acknowledges with text frames
/// `{"ack": {"topic": T, "offset": N}}`; a refused one is answered `{"error": "..."}`.
async fn websocket(
    st: ApiState,
    caller: Caller,
    mut rx: FeedRx<Delivery>,
    durable: Option<String>,
    mut socket: WebSocket,
) {
    loop {
        tokio::select! {
            ds = rx.recv_many(WS_BATCH) => {
                let Some(ds) = ds else { break };
                // Under load what is waiting goes out together: one frame each, as before,
                // flushed once.
                if send_all(&mut socket, ds).await.is_err() {
                    break;
                }
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Err(e) = ws_ack(&st, &caller, durable.as_deref(), t.as_str()).await {
                        let body = serde_json::json!({"error": e}).to_string();
                        if socket.send(Message::Text(body.into())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// How many deliveries a WebSocket writes before it flushes.
const WS_BATCH: usize = 64;

/// Writes `ds` as text frames, in order, and flushes once.
async fn send_all(socket: &mut WebSocket, ds: Vec<Delivery>) -> Result<(), axum::Error> {
    use futures::SinkExt;
    for d in ds {
        let text = match d {
            Delivery::Message { event, .. } => event.json().to_string(),
            Delivery::Lagged(json) => format!("{{\"lagged\":{json}}}"),
        };
        socket.feed(Message::Text(text.into())).await?;
    }
    socket.flush().await
}

async fn ws_ack(
    st: &ApiState,
    caller: &Caller,
    durable: Option<&str>,
    text: &str,
) -> Result<(), String> {
    let Some(name) = durable else {
        return Err("acks are for durable subscriptions: subscribe with ?durable=NAME".into());
    };
    let a: canal_proto::api::WsAck = serde_json::from_str(text)
        .map_err(|e| format!("{e}: send {{\"ack\": {{\"topic\": TOPIC, \"offset\": N}}}}"))?;
    super::auth::check_read(st, caller, &a.ack.topic).map_err(|e| e.message().to_string())?;
    let offset = a.ack.offset.to_string();
    st.pubsub
        .ack(name, Some(&a.ack.topic), Some(&offset))
        .await
        .map(|_| ())
        .map_err(|e| format!("{:?}", ApiError::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_written_as_sse_events_a_client_reads_back() {
        let event = std::sync::Arc::new(canal_pubsub::event::EventData::qos0(
            canal_pubsub::Qos0Message {
                topic: "a/b".into(),
                id: "m".into(),
                source: "canal://p".into(),
                time_ms: 0,
                headers: vec![],
                payload: b"x".to_vec(),
            },
        ));
        let json = event.json().to_string();
        assert!(json.contains(r#""data":"x""#), "{json}");
        let mut text = String::new();
        sse_frame(
            &mut text,
            Delivery::Message {
                id: Some("a/b:7".into()),
                event,
            },
        );
        sse_frame(&mut text, Delivery::Lagged(r#"{"dropped":3}"#.into()));
        // Line breaks in data or id cannot end the event early.
        sse_event(&mut text, "message", Some("bad\nid"), "two\nlines\r");
        assert_eq!(
            text,
            format!(
                "event: message\ndata: {json}\nid: a/b:7\n\n\
                 event: lagged\ndata: {{\"dropped\":3}}\n\n\
                 event: message\ndata: two\ndata: lines\nid: badid\n\n"
            )
        );
        // What canal's own client parses out of it.
        let mut parser = canal_client::sse::SseParser::new();
        let events = parser.push(text.as_bytes()).unwrap();
        let got: Vec<(String, String, Option<String>)> = events
            .into_iter()
            .map(|e| (e.event, e.data, e.id))
            .collect();
        assert_eq!(
            got,
            vec![
                ("message".into(), json.clone(), Some("a/b:7".into())),
                // The id carries over, as in a browser.
                (
                    "lagged".into(),
                    r#"{"dropped":3}"#.into(),
                    Some("a/b:7".into())
                ),
                ("message".into(), "two\nlines".into(), Some("badid".into())),
            ]
        );
    }
}

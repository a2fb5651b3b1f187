//! `GET /v1/subscribe`: a subscription's deliveries as Server-Sent Events, or as WebSocket
//! frames with acknowledgements coming back on the same socket. What is delivered is
//! [`canal_pubsub`]'s; this is only the framing.

use super::{ApiError, ApiState};
use crate::tokens::Caller;
use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use canal_pubsub::Delivery;
use canal_pubsub::feed::FeedRx;
use std::collections::HashMap;
use std::convert::Infallible;

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
        Err(_) => sse(rx).into_response(),
    })
}

/// Server-Sent Events: one `message` event per event (data: the event's JSON, id:
/// `topic:offset` for QoS 1), `lagged` for events missed.
fn sse(rx: FeedRx<Delivery>) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let d = rx.recv().await?;
        let sse = match d {
            Delivery::Message { id, json } => {
                let e = SseEvent::default().event("message").data(json);
                match id {
                    Some(id) => e.id(id),
                    None => e,
                }
            }
            Delivery::Lagged(json) => SseEvent::default().event("lagged").data(json),
        };
        Some((Ok(sse), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
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
            Delivery::Message { json, .. } => json,
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

//! `GET /mqtt`: MQTT over WebSocket (subprotocol `mqtt`), for browser clients. The frames'
//! bytes are the MQTT stream; the session is the same as over TCP.

use super::ApiState;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How many bytes the pipe between the WebSocket and the MQTT session holds each way.
const PIPE_BYTES: usize = 64 << 10;

/// Upgrades to a WebSocket speaking MQTT.
pub(super) async fn mqtt_ws(State(st): State<ApiState>, ws: WebSocketUpgrade) -> Response {
    ws.protocols(["mqtt"])
        .on_upgrade(move |socket| pump(st, socket))
}

/// Carries binary frames into the session and its bytes back out as binary frames.
async fn pump(st: ApiState, socket: WebSocket) {
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let session = tokio::spawn({
        let mqtt = st.mqtt.clone();
        async move { mqtt.connection(theirs, "websocket".to_string()).await }
    });
    let (mut rd, mut wr) = tokio::io::split(ours);
    let (mut sink, mut stream) = socket.split();
    let inbound = async {
        while let Some(Ok(m)) = stream.next().await {
            let bytes = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                // MQTT over WebSocket is binary frames only; the rest carries nothing.
                _ => continue,
            };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(buf[..n].to_vec().into());
                    if sink.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    // The session ends when the client's side closes (it then sends the will if it must)
    // or by itself; either way both pumps end, and the session's own ending runs to its end.
    let ((), ()) = tokio::join!(inbound, outbound);
    let _ = session.await;
}

//! `GET /v1/publish`: a publish stream over a WebSocket, in the shape of JetStream's async
//! publish. The client sends text frames, each a [`StreamPublish`] numbered by its `seq`;
//! the node answers each with a [`StreamAck`], in the order the frames came, with up to
//! [`PUBLISH_WINDOW`] publishes in flight at once (past that it stops reading the socket, so
//! a fast client is slowed by TCP, never dropped). What a publish does is
//! [`canal_pubsub`]'s; this is the framing and the pipelining.

use super::{ApiError, ApiState};
use crate::tokens::Caller;
use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::Response;
use canal_proto::api::{StreamAck, StreamError, StreamPublish};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};

/// The most publishes one stream has unanswered; past it the node stops reading the socket.
pub const PUBLISH_WINDOW: usize = 1024;

/// What a stream frame looks like, for the errors that say so.
const FRAME_SHAPE: &str = r#"{"seq": N, "topic": T, "payload": TEXT | "payload_base64": BASE64, "id"?: ID, "headers"?: {NAME: VALUE}, "qos"?: 0|1}"#;

/// `GET /v1/publish`: upgrades to a publish stream, if the node serves fewer than
/// `max_publish_streams` (else 503 `too_many_streams`).
pub(super) async fn publish_stream(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| {
        ApiError::bad_request(
            "not_websocket",
            format!("GET /v1/publish is a WebSocket ({e}): connect with a WebSocket client, or publish with POST /v1/topics/{{topic}}/events"),
        )
    })?;
    let slot = st
        .publish_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            st.pubsub.metrics().publish_streams_refused.inc();
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "this node already serves its limit of {} publish streams (max_publish_streams): publish through another node, or later",
                    st.max_publish_streams
                ),
            )
        })?;
    Ok(ws.on_upgrade(move |socket| async move {
        let _slot = slot;
        let open = st.pubsub.metrics().publish_streams.clone();
        open.inc();
        websocket(st, caller, socket).await;
        open.dec();
    }))
}

/// Serves one publish stream until the client closes it or the node shuts down.
async fn websocket(st: ApiState, caller: Caller, socket: WebSocket) {
    let (sink, stream) = socket.split();
    // Control frames are tungstenite's; a binary frame is answered, not taken.
    let frames = stream
        .take_while(|m| {
            futures::future::ready(matches!(m, Ok(m) if !matches!(m, Message::Close(_))))
        })
        .filter_map(|m| {
            futures::future::ready(match m {
                Ok(Message::Text(t)) => Some(Ok(t.as_str().to_string())),
                Ok(Message::Binary(_)) => Some(Err(format!(
                    "binary frames are not publishes: send text frames, each {FRAME_SHAPE}"
                ))),
                _ => None,
            })
        });
    let sink = sink.with(|text: String| {
        futures::future::ready(Ok::<_, axum::Error>(Message::Text(text.into())))
    });
    let pubsub = st.pubsub.clone();
    let check = st.clone();
    let publish = move |f: StreamPublish| -> BoxFuture<'static, Started> {
        let pubsub = pubsub.clone();
        let check = check.clone();
        let caller = caller.clone();
        async move {
            start_frame(&pubsub, f, |topic| {
                super::auth::check_publish(&check, &caller, topic)
            })
            .await
        }
        .boxed()
    };
    let mut closing = st.closing.clone();
    tokio::select! {
        _ = drive(Box::pin(frames), Box::pin(sink), PUBLISH_WINDOW, publish) => {}
        _ = closing.wait_for(|c| *c) => {}
    }
}

/// A publish on its way: its ack, to await with the others in flight.
pub(crate) struct Started(BoxFuture<'static, StreamAck>);

/// One decoded frame, started: its ack (or its error) to await. Returns once the publish is
/// on its way ([`canal_pubsub::PubSub::start_publish`]), so frames started one after another
/// keep their order into the log.
/// A frame the token may not publish is answered 403's way (`forbidden`), stored nowhere.
async fn start_frame(
    pubsub: &crate::pubsub::PubSub,
    f: StreamPublish,
    allowed: impl Fn(&str) -> Result<(), ApiError>,
) -> Started {
    let seq = f.seq;
    let req = canal_pubsub::parse_qos(f.qos.map(|q| q.to_string()).as_deref())
        .map_err(ApiError::from)
        .and_then(|qos| super::parse::publish_line(None, qos, f.line))
        .and_then(|req| allowed(&req.topic).map(|()| req));
    let started = match req {
        Ok(req) => pubsub.start_publish(req).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let answer = match started {
        Ok(answer) => answer,
        Err(e) => {
            let ack = error_ack(Some(seq), e.kind(), e.message().to_string());
            return Started(futures::future::ready(ack).boxed());
        }
    };
    Started(
        async move {
            match answer.await.map_err(ApiError::from) {
                Ok(p) => StreamAck {
                    seq: Some(seq),
                    topic: Some(p.topic),
                    offset: p.offset,
                    duplicate: p.duplicate,
                    error: None,
                },
                Err(e) => error_ack(Some(seq), e.kind(), e.message().to_string()),
            }
        }
        .boxed(),
    )
}

fn error_ack(seq: Option<u64>, kind: &str, message: String) -> StreamAck {
    StreamAck {
        seq,
        topic: None,
        offset: None,
        duplicate: false,
        error: Some(StreamError {
            kind: kind.to_string(),
            message,
        }),
    }
}

/// A frame's text as a publish, or the error ack that says what is allowed (with the
/// frame's `seq`, where it has one that reads).
fn decode(text: &str) -> Result<StreamPublish, StreamAck> {
    serde_json::from_str::<StreamPublish>(text).map_err(|e| {
        let seq = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
        error_ack(
            seq,
            "invalid_frame",
            format!("the frame is not a publish ({e}): each frame is {FRAME_SHAPE}"),
        )
    })
}

/// The pipeline of one stream: reads frames (text, or an error to answer) from `frames`,
/// starts each publish with `publish` (awaited here, one frame after another, so publishes
/// are on their way in frame order), and writes the acks to `acks` in the order the frames
/// came, with at most `window` unanswered; past that it reads no more until an ack goes
/// out. Ends when the frames end and every ack is written, or `acks` fails.
///
/// The starts are not left to the in-flight set to poll: it polls its futures in the order
/// they were woken, and a publish that yields before it is queued (tokio's cooperative
/// budget ran out) would be overtaken by the next one, which then gets the lower offset.
pub(crate) async fn drive<R, W, P>(mut frames: R, mut acks: W, window: usize, publish: P)
where
    R: Stream<Item = Result<String, String>> + Unpin,
    W: Sink<String> + Unpin,
    P: Fn(StreamPublish) -> BoxFuture<'static, Started>,
{
    let mut inflight: FuturesOrdered<BoxFuture<'static, StreamAck>> = FuturesOrdered::new();
    let mut reading = true;
    loop {
        if !reading && inflight.is_empty() {
            break;
        }
        tokio::select! {
            // Acks first: they free the window.
            biased;
            Some(ack) = inflight.next(), if !inflight.is_empty() => {
                // Every ack that is ready goes out in one write: a flush per ack is a
                // syscall (and a TCP segment) per publish.
                let mut ready = Some(ack);
                while let Some(ack) = ready.take() {
                    let text = match serde_json::to_string(&ack) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "a publish ack did not serialize");
                            return;
                        }
                    };
                    if acks.feed(text).await.is_err() {
                        return;
                    }
                    ready = inflight.next().now_or_never().flatten();
                }
                if acks.flush().await.is_err() {
                    return;
                }
            }
            f = frames.next(), if reading && inflight.len() < window => match f {
                None => reading = false,
                Some(Ok(text)) => match decode(&text) {
                    Ok(p) => inflight.push_back(publish(p).await.0),
                    Err(ack) => inflight.push_back(futures::future::ready(ack).boxed()),
                },
                Some(Err(message)) => inflight.push_back(
                    futures::future::ready(error_ack(None, "invalid_frame", message)).boxed(),
                ),
            },
        }
    }
    let _ = acks.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn frame(seq: u64) -> Result<String, String> {
        Ok(format!(
            r#"{{"seq": {seq}, "topic": "a", "payload": "p{seq}"}}"#
        ))
    }

    type Start = BoxFuture<'static, Started>;

    /// A start that is done at once and leaves `answer` to await.
    fn started(answer: impl Future<Output = StreamAck> + Send + 'static) -> Start {
        futures::future::ready(Started(answer.boxed())).boxed()
    }

    fn ack(seq: u64, topic: Option<String>) -> StreamAck {
        StreamAck {
            seq: Some(seq),
            topic,
            offset: Some(seq),
            duplicate: false,
            error: None,
        }
    }

    /// A publish that takes longer the earlier its seq, so answers finish in reverse.
    fn slow_reverse(n: u64) -> impl Fn(StreamPublish) -> Start {
        move |f: StreamPublish| {
            started(async move {
                tokio::time::sleep(Duration::from_millis((n - f.seq) * 2)).await;
                ack(f.seq, f.line.topic)
            })
        }
    }

    /// Starts that yield a different number of times each (as a publish does whose
    /// cooperative budget runs out before it is queued) still happen in frame order, and
    /// each is done before the next frame's starts.
    #[tokio::test]
    async fn publishes_start_in_frame_order_though_starts_yield() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = order.clone();
        let publish = move |f: StreamPublish| -> Start {
            let seen = seen.clone();
            async move {
                for _ in 0..(f.seq * 7919) % 5 {
                    tokio::task::yield_now().await;
                }
                seen.lock().unwrap().push(f.seq);
                Started(futures::future::ready(ack(f.seq, None)).boxed())
            }
            .boxed()
        };
        let (tx, rx) = futures::channel::mpsc::unbounded::<String>();
        drive(futures::stream::iter((0..300).map(frame)), tx, 64, publish).await;
        assert_eq!(rx.count().await, 300);
        assert_eq!(*order.lock().unwrap(), (0..300).collect::<Vec<u64>>());
    }

    async fn run(frames: Vec<Result<String, String>>, window: usize, n: u64) -> Vec<StreamAck> {
        let (tx, rx) = futures::channel::mpsc::unbounded::<String>();
        drive(futures::stream::iter(frames), tx, window, slow_reverse(n)).await;
        rx.map(|t| serde_json::from_str::<StreamAck>(&t).expect("an ack reads"))
            .collect()
            .await
    }

    #[tokio::test]
    async fn acks_come_in_frame_order_though_publishes_finish_in_reverse() {
        let acks = run((0..50).map(frame).collect(), 1024, 50).await;
        let seqs: Vec<Option<u64>> = acks.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (0..50).map(Some).collect::<Vec<_>>());
        assert!(acks.iter().all(|a| a.error.is_none()));
    }

    #[tokio::test]
    async fn a_bad_frame_gets_an_error_ack_in_its_place_and_the_stream_goes_on() {
        let frames = vec![
            frame(0),
            Ok(r#"{"seq": 1, "topic": "a", "paylod": "x"}"#.to_string()),
            Ok("not json".to_string()),
            Err("binary frames are not publishes".to_string()),
            frame(4),
        ];
        let acks = run(frames, 1024, 5).await;
        let seqs: Vec<Option<u64>> = acks.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![Some(0), Some(1), None, None, Some(4)]);
        let kinds: Vec<Option<&str>> = acks
            .iter()
            .map(|a| a.error.as_ref().map(|e| e.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                None,
                Some("invalid_frame"),
                Some("invalid_frame"),
                Some("invalid_frame"),
                None
            ]
        );
        let message = &acks[1].error.as_ref().expect("an error").message;
        assert!(message.contains("\"seq\": N"), "{message}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 4000, rng_seed: proptest::test_runner::RngSeed::Fixed(14), ..proptest::prelude::ProptestConfig::default() })]

        /// Any text is a publish or an `invalid_frame` ack that says what a frame is, never
        /// a panic; a frame that reads keeps its seq.
        #[test]
        fn any_frame_decodes_or_is_answered(
            text in proptest::prelude::any::<String>(),
            seq in proptest::prelude::any::<u64>(),
            payload in "[ -~]{0,40}",
        ) {
            if let Err(ack) = decode(&text) {
                let e = ack.error.expect("an error ack");
                proptest::prop_assert_eq!(e.kind, "invalid_frame");
                proptest::prop_assert!(e.message.contains("\"seq\": N"));
            }
            let good = serde_json::json!({"seq": seq, "topic": "a", "payload": payload}).to_string();
            let f = decode(&good).map_err(|a| format!("{a:?}"));
            proptest::prop_assert_eq!(f.map(|f| f.seq), Ok(seq));
        }
    }

    #[tokio::test]
    async fn no_more_than_the_window_is_in_flight() {
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (n, m) = (now.clone(), most.clone());
        let publish = move |f: StreamPublish| -> Start {
            let (n, m) = (n.clone(), m.clone());
            let at = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(at, Ordering::SeqCst);
            started(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                ack(f.seq, None)
            })
        };
        let (tx, rx) = futures::channel::mpsc::unbounded::<String>();
        drive(futures::stream::iter((0..200).map(frame)), tx, 8, publish).await;
        assert_eq!(rx.count().await, 200);
        let most = most.load(Ordering::SeqCst);
        assert!(
            (2..=8).contains(&most),
            "at most {most} in flight with a window of 8"
        );
    }
}

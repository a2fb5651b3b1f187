//! A publish stream (`GET /v1/publish`): many publishes in flight on one WebSocket, each
//! numbered by a `seq` this client hands out, answered by acks that come back in the order
//! sent. [`PublishStream::connect`], then [`PublishStream::split`] to send from one task and
//! read acks in another.

use crate::{ClientError, StatusCode, api_error};
use canal_proto::api::{PublishLine, StreamAck, StreamPublish};
use futures::stream::{SplitSink, SplitStream};
use futures::task::AtomicWaker;
use futures::{SinkExt, Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A connected publish stream.
pub struct PublishStream {
    sender: PublishSender,
    acks: PublishAcks,
}

/// The sending half of a [`PublishStream`].
pub struct PublishSender {
    sink: SplitSink<Ws, Message>,
    next_seq: u64,
    url: String,
    shared: Arc<Shared>,
}

/// The acks of a [`PublishStream`], in the order the publishes were sent; ends once
/// [`PublishSender::finish`] was called and every publish sent has its ack, or when the
/// connection ends.
pub struct PublishAcks {
    stream: SplitStream<Ws>,
    url: String,
    shared: Arc<Shared>,
    received: u64,
}

/// What the two halves share: how many were sent, and whether more come.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    finished: AtomicBool,
    waker: AtomicWaker,
}

impl PublishStream {
    /// Opens a publish stream to the node at `base` (`http://127.0.0.1:7070`); an
    /// `https://` base connects to `wss://`, verified as the HTTP client verifies (`--ca`).
    pub async fn connect(base: &str, token: Option<&str>) -> Result<PublishStream, ClientError> {
        let base = base.trim_end_matches('/');
        let ws_base = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            return Err(ClientError::BadUrl { base: base.into() });
        };
        let url = format!("{ws_base}/v1/publish");
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::BadUrl {
                base: format!("{base} ({e})"),
            })?;
        if let Some(t) = token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Build {
                    cause: "the token is not printable ASCII".into(),
                })?;
            req.headers_mut().insert("authorization", v);
        }
        // The HTTP client's rustls settings (`--ca`, else the system's roots) for `wss://`;
        // `ws://` gets a plain connection whatever the connector.
        let connector = if ws_base.starts_with("wss://") {
            crate::tls::install_provider();
            let config =
                crate::tls::client_config(true).map_err(|cause| ClientError::Build { cause })?;
            Some(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
        } else {
            Some(tokio_tungstenite::Connector::Plain)
        };
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    let status = StatusCode::from_u16(r.status().as_u16())
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                    api_error(status, r.body().as_deref().unwrap_or_default())
                }
                other => ClientError::Unreachable {
                    base: base.to_string(),
                    cause: crate::tls_hint(other.to_string()),
                },
            })?;
        let (sink, stream) = ws.split();
        let shared = Arc::new(Shared::default());
        Ok(PublishStream {
            sender: PublishSender {
                sink,
                next_seq: 0,
                url: url.clone(),
                shared: shared.clone(),
            },
            acks: PublishAcks {
                stream,
                url,
                shared,
                received: 0,
            },
        })
    }

    /// Sends one publish (see [`PublishSender::send`]).
    pub async fn send(&mut self, line: PublishLine, qos: Option<u8>) -> Result<u64, ClientError> {
        self.sender.send(line, qos).await
    }

    /// The acks, in the order sent.
    pub fn acks(&mut self) -> &mut PublishAcks {
        &mut self.acks
    }

    /// The two halves, to send and read acks at once.
    pub fn split(self) -> (PublishSender, PublishAcks) {
        (self.sender, self.acks)
    }
}

impl PublishSender {
    /// Sends one publish and answers the `seq` its ack will carry (0, 1, 2, ... on this
    /// stream). The node stops reading past its window of unanswered publishes, so this
    /// waits then: read acks meanwhile.
    pub async fn send(&mut self, line: PublishLine, qos: Option<u8>) -> Result<u64, ClientError> {
        let seq = self.feed(line, qos).await?;
        self.flush().await?;
        Ok(seq)
    }

    /// Queues one publish without flushing the connection, and answers its `seq`: for a
    /// sender with several publishes at hand, which then [`flush`](Self::flush)es once, so
    /// they go out in one write. What is queued is sent at the next flush (or `send`).
    pub async fn feed(&mut self, line: PublishLine, qos: Option<u8>) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        let frame = StreamPublish { seq, qos, line };
        let text = serde_json::to_string(&frame).map_err(|e| self.stream_error(e))?;
        self.sink
            .feed(Message::Text(text.into()))
            .await
            .map_err(|e| self.stream_error(e))?;
        self.next_seq += 1;
        self.shared.sent.store(self.next_seq, Ordering::SeqCst);
        Ok(seq)
    }

    /// Sends what [`feed`](Self::feed) queued.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.sink.flush().await.map_err(|e| self.stream_error(e))
    }

    fn stream_error(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Stream {
            url: self.url.clone(),
            cause: e.to_string(),
        }
    }

    /// Says no more publishes come, so the acks end after the last one sent. (A WebSocket
    /// close would end the stream at once, with acks still owed, so none is sent.)
    pub fn finish(&mut self) {
        self.shared.finished.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
    }

    /// Closes the connection: for after the last ack, or to give up on those owed.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.sink.close().await.map_err(|e| self.stream_error(e))
    }
}

impl Stream for PublishAcks {
    type Item = Result<StreamAck, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            self.shared.waker.register(cx.waker());
            if self.shared.finished.load(Ordering::SeqCst)
                && self.received >= self.shared.sent.load(Ordering::SeqCst)
            {
                return Poll::Ready(None);
            }
            let m = match self.stream.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(m)) => m,
            };
            let url = self.url.clone();
            if matches!(m, Ok(Message::Text(_))) {
                self.received += 1;
            }
            return Poll::Ready(match m {
                Ok(Message::Text(t)) => {
                    Some(
                        serde_json::from_str(t.as_str()).map_err(|e| ClientError::Decode {
                            url,
                            cause: format!("an ack that does not read ({e}): {}", t.as_str()),
                        }),
                    )
                }
                Ok(Message::Close(_)) => None,
                Ok(_) => continue,
                Err(e) => Some(Err(ClientError::Stream {
                    url,
                    cause: e.to_string(),
                })),
            });
        }
    }
}

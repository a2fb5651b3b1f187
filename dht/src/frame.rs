//! The frames of a peer link: what goes on the one long-lived stream per peer and lane.
//!
//! ```text
//!   version u8 | kind u8 | id u64 BE | len u32 BE | body (len bytes)
//! ```
//!
//! `version` is [`FRAME_VERSION`]; `kind` says what the body is ([`Kind`]); `id` pairs a
//! response with its request (0 for events); `len` is bounded per lane, and a frame over it
//! is refused before any of its body is read or anything is allocated for it.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;

/// The version byte every frame starts with. A peer that sends another is refused (and the
/// stream closed): a later version is a new protocol name, not a silent reinterpretation.
pub const FRAME_VERSION: u8 = 1;

/// The bytes before a frame's body.
pub const HEADER_LEN: usize = 14;

/// How many bytes a reader asks the stream for at once; the read buffer grows only by what
/// actually arrived.
const READ_CHUNK: usize = 64 << 10;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A request; its answer comes back with the same id.
    Request,
    /// The answer to the request with the same id.
    Response,
    /// The request with this id got no answer (the handler gave up, or was absent): the
    /// caller fails at once instead of at its timeout.
    NoAnswer,
    /// A one-way event (the QoS 0 lane); the id is not used.
    Event,
}

impl Kind {
    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Response => 2,
            Kind::NoAnswer => 3,
            Kind::Event => 4,
        }
    }

    /// The kind of a wire byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::NoAnswer,
            4 => Kind::Event,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// The request it belongs to (0 for events).
    pub id: u64,
    /// The body.
    pub body: Vec<u8>,
}

/// Why bytes from a peer are not a frame. Each is the peer's offence: a canal peer never
/// writes them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The version byte is not [`FRAME_VERSION`].
    #[error("frame version {got} is not supported: this node speaks version {FRAME_VERSION}")]
    Version {
        /// The byte that came.
        got: u8,
    },
    /// The kind byte names no kind.
    #[error("frame kind {got} is unknown: the kinds are 1 (request) to 4 (event)")]
    Kind {
        /// The byte that came.
        got: u8,
    },
    /// The claimed body length is over the lane's limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes of this lane")]
    TooLong {
        /// The claimed length.
        len: usize,
        /// The lane's limit.
        max: usize,
    },
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer sent something that is not a frame (its offence).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed or ended in the middle of a frame (not an offence).
    #[error("the link failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads the header at the start of `buf`: `Ok(None)` while fewer than [`HEADER_LEN`] bytes
/// are there, else the kind, id and body length (checked against `max`).
pub fn parse_header(buf: &[u8], max: usize) -> Result<Option<(Kind, u64, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        // A bad version or kind is refused as soon as its byte is there.
        if let Some(&v) = buf.first()
            && v != FRAME_VERSION
        {
            return Err(FrameError::Version { got: v });
        }
        if let Some(&k) = buf.get(1)
            && Kind::from_byte(k).is_none()
        {
            return Err(FrameError::Kind { got: k });
        }
        return Ok(None);
    };
    if head[0] != FRAME_VERSION {
        return Err(FrameError::Version { got: head[0] });
    }
    let kind = Kind::from_byte(head[1]).ok_or(FrameError::Kind { got: head[1] })?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[2..10]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[10..14]);
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(Some((kind, u64::from_be_bytes(id), len)))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` while it is incomplete, else the frame
/// and how many bytes it took. Allocates only for a body whose bytes are all in `buf`.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some((kind, id, len)) = parse_header(buf, max)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((
        Frame {
            kind,
            id,
            body: body.to_vec(),
        },
        HEADER_LEN + len,
    )))
}

/// Appends one frame to `out`. The caller keeps bodies within the lane's limit (the link
/// refuses a longer one before queueing it); the length is written as `u32`.
pub fn encode_into(out: &mut Vec<u8>, kind: Kind, id: u64, body: &[u8]) {
    out.reserve(HEADER_LEN + body.len());
    out.push(FRAME_VERSION);
    out.push(kind.byte());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads frames off one stream, at most `max` body bytes each.
pub struct FrameReader<R> {
    io: R,
    max: usize,
    buf: Vec<u8>,
    /// Where the unread bytes of `buf` start.
    start: usize,
    chunk: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `io` for a lane whose frames carry at most `max` bytes.
    pub fn new(io: R, max: usize) -> Self {
        FrameReader {
            io,
            max,
            buf: Vec::new(),
            start: 0,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames. Cancel-safe:
    /// bytes read are kept in the reader between calls.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some((frame, used)) = decode(&self.buf[self.start..], self.max)? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(frame));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let n = self.io.read(&mut self.chunk).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the link ended inside a frame ({} bytes of it read)",
                        self.buf.len()
                    ),
                )));
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

/// Writes `bytes` (one or many encoded frames) and flushes once.
pub async fn write_batch<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestRunner};

    fn frame(kind: Kind, id: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(&mut out, kind, id, body);
        out
    }

    #[test]
    fn a_frame_round_trips_and_says_how_long_it_was() {
        let mut bytes = frame(Kind::Request, 7, b"hello");
        bytes.extend(frame(Kind::Event, 0, b""));
        let (f, used) = decode(&bytes, 100).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.id, f.body.as_slice()),
            (Kind::Request, 7, &b"hello"[..])
        );
        assert_eq!(used, HEADER_LEN + 5);
        let (g, used2) = decode(&bytes[used..], 100).unwrap().unwrap();
        assert_eq!((g.kind, g.body.len(), used2), (Kind::Event, 0, HEADER_LEN));
    }

    #[test]
    fn an_incomplete_frame_waits_for_more() {
        let bytes = frame(Kind::Response, 1, &[9; 40]);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], 100).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn a_claimed_length_over_the_limit_is_refused_from_the_header_alone() {
        let mut bytes = frame(Kind::Request, 1, b"");
        bytes[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&bytes, 1000),
            Err(FrameError::TooLong {
                len: u32::MAX as usize,
                max: 1000
            })
        );
        // At the limit is fine.
        let ok = frame(Kind::Event, 0, &[0; 1000]);
        assert!(decode(&ok, 1000).unwrap().is_some());
    }

    #[test]
    fn a_bad_version_or_kind_is_refused_as_soon_as_its_byte_arrives() {
        assert_eq!(decode(&[2], 10), Err(FrameError::Version { got: 2 }));
        assert_eq!(
            decode(&[FRAME_VERSION, 0], 10),
            Err(FrameError::Kind { got: 0 })
        );
        assert_eq!(
            decode(&[FRAME_VERSION, 9, 0, 0], 10),
            Err(FrameError::Kind { got: 9 })
        );
    }

    #[tokio::test]
    async fn the_reader_takes_frames_split_anyhow_and_ends_cleanly() {
        let mut bytes = Vec::new();
        for i in 0..50u64 {
            bytes.extend(frame(Kind::Request, i, &vec![i as u8; i as usize * 3]));
        }
        let mut r = FrameReader::new(futures::io::Cursor::new(bytes), 1 << 10);
        for i in 0..50u64 {
            let f = r.next().await.unwrap().unwrap();
            assert_eq!((f.id, f.body.len()), (i, i as usize * 3));
        }
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_reader_fails_a_stream_that_ends_inside_a_frame() {
        let bytes = frame(Kind::Request, 1, b"hello");
        let mut r = FrameReader::new(futures::io::Cursor::new(bytes[..8].to_vec()), 100);
        assert!(matches!(r.next().await, Err(ReadError::Io(_))));
    }

    fn runner() -> TestRunner {
        TestRunner::new(Config {
            cases: 5000,
            rng_seed: RngSeed::Fixed(0x00ca_11f7),
            failure_persistence: None,
            ..Config::default()
        })
    }

    /// Decodes everything in `bytes`; checks every frame is within `max` and consumed bytes
    /// add up.
    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Frame>, FrameError> {
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((f, used)) = decode(&bytes[at..], max)? {
            assert!(f.body.len() <= max);
            assert_eq!(used, HEADER_LEN + f.body.len());
            at += used;
            out.push(f);
        }
        assert!(bytes.len() - at < HEADER_LEN + max);
        Ok(out)
    }

    #[test]
    fn the_decoder_never_panics_on_random_bytes() {
        runner()
            .run(&proptest::collection::vec(any::<u8>(), 0..600), |bytes| {
                let _ = decode_all(&bytes, 256);
                // With a valid version and kind in front, the rest is still random.
                let mut v = vec![FRAME_VERSION, Kind::Request.byte()];
                v.extend(&bytes);
                let _ = decode_all(&v, 256);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_decoder_never_panics_on_mutated_frames_and_keeps_valid_ones() {
        let strategy = (
            proptest::collection::vec(
                (
                    0u8..4,
                    any::<u64>(),
                    proptest::collection::vec(any::<u8>(), 0..64),
                ),
                1..6,
            ),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        );
        runner()
            .run(&strategy, |(frames, edits)| {
                let kinds = [Kind::Request, Kind::Response, Kind::NoAnswer, Kind::Event];
                let mut bytes = Vec::new();
                for (k, id, body) in &frames {
                    encode_into(&mut bytes, kinds[*k as usize], *id, body);
                }
                if edits.is_empty() {
                    let got = decode_all(&bytes, 64).unwrap();
                    prop_assert_eq!(got.len(), frames.len());
                    for (g, (k, id, body)) in got.iter().zip(&frames) {
                        prop_assert_eq!(g.kind, kinds[*k as usize]);
                        prop_assert_eq!(g.id, *id);
                        prop_assert_eq!(&g.body, body);
                    }
                }
                for (at, value, how) in edits {
                    if bytes.is_empty() {
                        break;
                    }
                    let i = at.index(bytes.len());
                    match how {
                        0 => bytes[i] = value,
                        1 => bytes.truncate(i),
                        2 => bytes.insert(i, value),
                        // A length turned huge.
                        _ => bytes.splice(i..i, [0xff, 0xff, 0xff, 0xff]).for_each(drop),
                    }
                }
                let _ = decode_all(&bytes, 64);
                Ok(())
            })
            .unwrap();
    }
}

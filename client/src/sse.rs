//! A Server-Sent Events parser (the `text/event-stream` format of the WHATWG HTML standard)
//! over byte chunks as they come off the network, with no I/O of its own.
//!
//! Lines end with `\n`, `\r\n` or `\r`, wherever the chunks split them; `:` starts a comment
//! (the node's keep-alives); `field: value` sets `event`, `id` or `retry`, or appends a
//! `data` line; a blank line ends the event. An event with no data is not dispatched, as the
//! standard says. Bytes that are not UTF-8 are replaced, never refused: only size is.

/// The most bytes one event may take (its lines, before the blank line that ends it): a
/// payload at the node's 1 MiB limit in base64, with its JSON, fits many times over.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its type: the last `event:` field, `message` when it had none.
    pub event: String,
    /// Its `data:` lines, joined by `\n`.
    pub data: String,
    /// The last event id the stream set (it carries over to later events, as in a browser),
    /// if any.
    pub id: Option<String>,
}

/// What can go wrong reading a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// An event grew past [`MAX_EVENT_BYTES`] before its blank line.
    #[error(
        "a Server-Sent Event grew past {limit} bytes (MAX_EVENT_BYTES) without ending: the stream is not one canal writes"
    )]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The bytes of the line not ended yet.
    line: Vec<u8>,
    /// The line ended with `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    /// Whether the start of the stream (where a byte order mark may stand) is behind us.
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    retry_ms: Option<u64>,
    /// Bytes taken by the event being read, against [`MAX_EVENT_BYTES`].
    event_bytes: usize,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Takes the next chunk of the stream; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        let mut chunk = chunk;
        if !self.started {
            // A UTF-8 byte order mark may open the stream, possibly split across chunks.
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            let have = self.line.len();
            let take = (BOM.len() - have).min(chunk.len());
            if BOM[have..have + take] == chunk[..take] {
                self.line.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.line.len() < BOM.len() {
                    return Ok(out);
                }
                self.line.clear();
            } else {
                // Not a mark after all: the bytes held back are the line's start.
            }
            self.started = true;
        }
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(e) = self.line_ended(&line) {
                        out.push(e);
                    }
                }
                _ => {
                    self.event_bytes += 1;
                    if self.event_bytes > MAX_EVENT_BYTES {
                        return Err(SseError::TooLarge {
                            limit: MAX_EVENT_BYTES,
                        });
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    /// The reconnection time the stream asked for (`retry:`), in milliseconds, if any.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    fn line_ended(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = value.into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"id" if !value.contains('\0') => self.last_id = Some(value.into_owned()),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.event_bytes = 0;
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.map(str::to_string),
        }
    }

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c).expect("within limits"));
        }
        out
    }

    #[test]
    fn events_split_across_chunks_keep_alives_and_crlf() {
        let got = all(&[
            b"event: message\nid: a:1\ndata: {\"x\"",
            b":1}\n\n: keep-alive\n\ndata: 2\r\n\r\nevent: lagged\ndata: 3\n\n",
        ]);
        assert_eq!(
            got,
            [
                ev("message", "{\"x\":1}", Some("a:1")),
                ev("message", "2", Some("a:1")),
                ev("lagged", "3", Some("a:1")),
            ]
        );
    }

    #[test]
    fn multi_line_data_is_joined_by_newlines() {
        assert_eq!(
            all(&[b"data: a\ndata:b\ndata\ndata:  c\n\n"]),
            [ev("message", "a\nb\n\n c", None)]
        );
    }

    #[test]
    fn a_cr_alone_ends_a_line_even_across_chunks() {
        assert_eq!(
            all(&[b"data: x\r", b"\r", b"data: y\r\n", b"\r\n"]),
            [ev("message", "x", None), ev("message", "y", None),]
        );
        // `\r` then `\n` in the next chunk is one line end, not two (which would dispatch).
        assert_eq!(
            all(&[b"data: x\r", b"\ndata: y\n\n"]),
            [ev("message", "x\ny", None)]
        );
    }

    #[test]
    fn events_without_data_and_unknown_fields_are_not_dispatched() {
        assert_eq!(
            all(&[b"event: lagged\n\nfoo: bar\n\n:only a comment\n\n"]),
            []
        );
        // The type does not leak into the next event.
        assert_eq!(
            all(&[b"event: x\n\ndata: 1\n\n"]),
            [ev("message", "1", None)]
        );
    }

    #[test]
    fn ids_retry_and_a_byte_order_mark() {
        let mut p = SseParser::new();
        let got = p
            .push(b"\xEF\xBB")
            .and_then(|mut a| {
                a.extend(
                    p.push(b"\xBFid: 7\nretry: 1500\nretry: soon\ndata: d\n\nid\ndata: e\n\n")?,
                );
                Ok(a)
            })
            .expect("within limits");
        assert_eq!(
            got,
            [ev("message", "d", Some("7")), ev("message", "e", Some(""))]
        );
        assert_eq!(p.retry_ms(), Some(1500));
        // Without a mark, the first bytes are the first line.
        assert_eq!(
            all(&[b"\xEFdata: x\n\ndata: y\n\n"]),
            [ev("message", "y", None)]
        );
    }

    #[test]
    fn an_endless_event_is_refused_by_name() {
        let mut p = SseParser::new();
        let big = vec![b'x'; MAX_EVENT_BYTES];
        assert_eq!(p.push(b"data: ").map(|v| v.len()), Ok(0));
        let e = p.push(&big).expect_err("past the limit");
        assert!(e.to_string().contains("MAX_EVENT_BYTES"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A valid stream made of these pieces, in canal's style and the standard's.
        fn stream() -> impl Strategy<Value = Vec<u8>> {
            let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
            let text = "[a-zA-Z0-9 {}\":,é]{0,20}";
            let field = (
                prop_oneof![
                    Just("data: "),
                    Just("data:"),
                    Just("event: "),
                    Just("id: "),
                    Just(": "),
                    Just("retry: ")
                ],
                text,
                line_end.clone(),
            )
                .prop_map(|(f, v, e)| format!("{f}{v}{e}"));
            let event = (proptest::collection::vec(field, 0..6), line_end)
                .prop_map(|(fields, end)| format!("{}{end}", fields.concat()));
            proptest::collection::vec(event, 0..8).prop_map(|e| e.concat().into_bytes())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4000, rng_seed: proptest::test_runner::RngSeed::Fixed(12), ..ProptestConfig::default() })]

            #[test]
            fn any_chunking_yields_the_same_events(s in stream(), cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8)) {
                let whole = {
                    let mut p = SseParser::new();
                    p.push(&s).expect("within limits")
                };
                let mut at: Vec<usize> = cuts.iter().map(|i| i.index(s.len() + 1)).collect();
                at.sort_unstable();
                let mut p = SseParser::new();
                let mut got = Vec::new();
                let mut from = 0;
                for cut in at.into_iter().chain([s.len()]) {
                    got.extend(p.push(&s[from..cut]).expect("within limits"));
                    from = cut;
                }
                prop_assert_eq!(got, whole);
            }

            #[test]
            fn random_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
                let mut p = SseParser::new();
                for c in &chunks {
                    let events = p.push(c).expect("far below the limit");
                    for e in events {
                        prop_assert!(!e.event.is_empty());
                    }
                }
            }
        }
    }
}

//! `canal pub` and `canal sub`.

use crate::client::{Client, encode_segment};
use anyhow::{Context, bail};
use canal_proto::api::{Event, Published};
use canal_proto::{Topic, TopicFilter};
use clap::Args;
use futures::StreamExt;
use std::io::BufRead;
use std::time::Duration;

/// Parses a topic name (no wildcards).
pub(crate) fn parse_topic(s: &str) -> Result<Topic, String> {
    Topic::new(s).map_err(|e| e.to_string())
}

/// Parses a topic filter (`+` and a final `#` allowed).
pub(crate) fn parse_filter(s: &str) -> Result<TopicFilter, String> {
    TopicFilter::new(s).map_err(|e| e.to_string())
}

/// Parses `--qos`: 0 or 1, as the node does ([`canal_proto::Qos`]).
pub(crate) fn parse_qos(s: &str) -> Result<u8, canal_proto::QosError> {
    s.parse::<canal_proto::Qos>().map(u8::from)
}

/// Parses `--header KEY=VALUE`; the key is lowercased.
pub(crate) fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Ok((k.to_ascii_lowercase(), v.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not KEY=VALUE with a key of letters, digits, - and _"
        )),
    }
}

/// `canal pub`.
#[derive(Args, Debug)]
pub(crate) struct PubArgs {
    /// The topic, such as sensors/room1/temp (no wildcards).
    #[arg(value_parser = parse_topic)]
    topic: Topic,
    /// The message; `-` reads messages from standard input, one a line. Empty if left out.
    message: Option<String>,
    /// 0: at most once; 1: committed on a majority before the answer.
    #[arg(long, default_value = "1", value_parser = parse_qos)]
    qos: u8,
    /// Message id: a publish with an id already stored is not stored again (with --count,
    /// the ids are ID-0, ID-1, ...).
    #[arg(long)]
    id: Option<String>,
    /// A custom header KEY=VALUE; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Publish the message this many times.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// At most this many publishes per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Publish every line of standard input as one message, over one publish stream
    /// (`GET /v1/publish`) with many in flight; acks are printed as they come, and the exit
    /// status is non-zero if any publish failed. With --id, the ids are ID-0, ID-1, ...
    #[arg(long, conflicts_with_all = ["message", "count", "rate"])]
    stdin: bool,
}

/// `canal sub`.
#[derive(Args, Debug)]
pub(crate) struct SubArgs {
    /// A filter: a topic, with `+` for one level and a final `#` for the rest.
    #[arg(value_parser = parse_filter)]
    filter: TopicFilter,
    /// 0: live events at most once; 1: the committed log, every event once, in order.
    #[arg(long, default_value = "1", value_parser = parse_qos)]
    qos: u8,
    /// Where to start (QoS 1): earliest, latest, an offset, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    from: String,
    /// A durable subscription: the node keeps this name's cursor (acknowledged after each
    /// event is printed), and a later `canal sub --durable NAME`, on any node, resumes after
    /// the last acknowledged event.
    #[arg(long)]
    durable: Option<String>,
    /// Exit 0 after this many events.
    #[arg(long)]
    count: Option<u64>,
}

pub(crate) async fn publish(
    api: &str,
    token: Option<&str>,
    a: PubArgs,
    json: bool,
) -> anyhow::Result<()> {
    if a.count == 0 {
        bail!("--count 0 publishes nothing: give 1 or more");
    }
    if let Some(r) = a.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate {r} is not a rate: give a number of publishes per second above 0");
    }
    if a.stdin {
        return publish_stdin(api, token, a, json).await;
    }
    let client = Client::new(api, token)?;
    let path = format!("/v1/topics/{}/events", encode_segment(a.topic.as_str()));
    let messages: Vec<String> = match a.message.as_deref() {
        Some("-") => std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<_, _>>()
            .context("cannot read messages from standard input")?,
        Some(m) => vec![m.to_string()],
        None => vec![String::new()],
    };
    let mut ticker = a
        .rate
        .map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let mut n = 0u64;
    for m in &messages {
        for i in 0..a.count {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let mut headers: Vec<(String, String)> = vec![("canal-qos".into(), a.qos.to_string())];
            if let Some(id) = &a.id {
                let id = if a.count == 1 && messages.len() == 1 {
                    id.clone()
                } else {
                    format!("{id}-{n}")
                };
                headers.push(("canal-id".into(), id));
            }
            for (k, v) in &a.headers {
                headers.push((format!("canal-header-{k}"), v.clone()));
            }
            let p: Published = client
                .post_json(&path, m.clone().into_bytes(), &headers)
                .await?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else if let Some(offset) = p.offset {
                println!(
                    "{} {offset}{}",
                    p.topic,
                    if p.duplicate { " (duplicate)" } else { "" }
                );
            }
            n += 1;
            let _ = i;
        }
    }
    Ok(())
}

/// `canal pub --stdin`: one publish stream, the sender and the ack reader at once.
async fn publish_stdin(
    api: &str,
    token: Option<&str>,
    a: PubArgs,
    json: bool,
) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let stream = canal_client::PublishStream::connect(api, token).await?;
    let (mut tx, mut acks) = stream.split();
    let headers: std::collections::BTreeMap<String, String> = a.headers.iter().cloned().collect();
    let topic = a.topic.to_string();
    let sender = async {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut n = 0u64;
        while let Some(line) = lines
            .next_line()
            .await
            .context("cannot read messages from standard input")?
        {
            let publish = canal_proto::api::PublishLine {
                topic: Some(topic.clone()),
                payload: Some(line),
                payload_base64: None,
                id: a.id.as_ref().map(|id| format!("{id}-{n}")),
                headers: headers.clone(),
            };
            tx.feed(publish, Some(a.qos)).await?;
            n += 1;
            // Lines already read in go out together; a line typed by hand at once.
            if lines.get_ref().buffer().is_empty() {
                tx.flush().await?;
            }
        }
        tx.flush().await?;
        tx.finish();
        anyhow::Ok(n)
    };
    let reader = async {
        let (mut got, mut failed) = (0u64, 0u64);
        while let Some(ack) = acks.next().await {
            let ack = ack?;
            got += 1;
            if json {
                println!("{}", serde_json::to_string(&ack)?);
            }
            match (&ack.error, ack.offset) {
                (Some(e), _) => {
                    failed += 1;
                    let line = ack
                        .seq
                        .map(|s| (s + 1).to_string())
                        .unwrap_or_else(|| "-".into());
                    eprintln!("line {line}: {} ({})", e.message, e.kind);
                }
                (None, Some(offset)) if !json => println!(
                    "{} {offset}{}",
                    ack.topic.as_deref().unwrap_or(&topic),
                    if ack.duplicate { " (duplicate)" } else { "" }
                ),
                _ => {}
            }
        }
        anyhow::Ok((got, failed))
    };
    let (sent, (got, failed)) = tokio::try_join!(sender, reader)?;
    if got < sent {
        bail!("the node closed the publish stream after {got} of {sent} acks");
    }
    if failed > 0 {
        bail!("{failed} of {sent} publishes failed");
    }
    Ok(())
}

pub(crate) async fn subscribe(
    api: &str,
    token: Option<&str>,
    a: SubArgs,
    json: bool,
) -> anyhow::Result<()> {
    let client = Client::streaming(api, token)?;
    let mut path = format!(
        "/v1/subscribe?filter={}&qos={}&from={}",
        encode_segment(a.filter.as_str()),
        a.qos,
        encode_segment(&a.from)
    );
    if let Some(d) = &a.durable {
        path.push_str(&format!("&durable={}", encode_segment(d)));
    }
    let acker = Client::new(api, token)?;
    let events = client.events(&path).await?;
    let mut events = std::pin::pin!(events);
    let mut seen = 0u64;
    if a.count == Some(0) {
        return Ok(());
    }
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let data = &ev.data;
        if ev.event == "lagged" {
            eprintln!("warning: events were dropped before they could be read: {data}");
            continue;
        }
        let e: Event = serde_json::from_str(data)
            .with_context(|| format!("bad event from the node: {data}"))?;
        print_event(&e, json)?;
        if let (Some(name), Some(offset)) = (&a.durable, e.offset) {
            // At least once: printed, then acknowledged; a crash in between prints the
            // event again next time.
            let ack = format!(
                "/v1/subscriptions/{}/ack?topic={}&offset={offset}",
                encode_segment(name),
                encode_segment(&e.topic)
            );
            acker
                .post(&ack)
                .await
                .context("cannot acknowledge the event")?;
        }
        seen += 1;
        if a.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
    match a.count {
        Some(c) => bail!("the node closed the subscription after {seen} of {c} events"),
        None => bail!("the node closed the subscription"),
    }
}

fn print_event(e: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        let mut o = serde_json::json!({
            "topic": e.topic, "id": e.id, "time": e.time, "headers": e.headers, "qos": e.qos,
        });
        if let Some(off) = e.offset {
            o["offset"] = off.into();
        }
        match (&e.data, &e.data_base64) {
            (Some(text), _) => o["payload"] = text.clone().into(),
            (None, Some(b64)) => o["payload_base64"] = b64.clone().into(),
            (None, None) => o["payload"] = "".into(),
        }
        println!("{o}");
    } else {
        let payload = e
            .data
            .clone()
            .or_else(|| e.data_base64.clone())
            .unwrap_or_default();
        let offset = e
            .offset
            .map(|o| o.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{} {offset} {payload}", e.topic);
    }
    Ok(())
}

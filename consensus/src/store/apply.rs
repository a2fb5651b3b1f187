//! The deterministic apply of operations: the clock, dedup, topic logs, effects.

use super::overlay::Writes;
use super::state::StateMachine;
use super::*;
use crate::functions::{Effects, MAX_OUTBOX_ENTRIES, OutboxEntry};
use crate::keys;
use crate::topics::{PublishOp, StoredEvent, TopicMeta};
use crate::types::{InternalKey, Op, Proposal, Request, Response, TypeConfig};
use openraft::{Entry, EntryPayload, StorageIOError, StoredMembership};
use std::sync::Arc;

/// Moves the state machine's clock to `stamp` unless it already stands later, and returns
/// it: time inside the state machine never goes backwards, even when leadership moves to a
/// node whose clock is behind.
fn advance_clock(w: &mut Writes<'_>, stamp: u64) -> Result<u64, String> {
    let stored = match w.raw_get(CLOCK_KEY)? {
        Some(b) => dec::<u64>(&b).map_err(|e| format!("the state machine's clock: {e}"))?,
        None => 0,
    };
    if stamp > stored {
        w.raw_set(
            CLOCK_KEY.to_vec(),
            Some(enc(&stamp).map_err(|e| e.to_string())?),
        );
        Ok(stamp)
    } else {
        Ok(stored)
    }
}

/// Applies one client request of the entry at `index`, at the state machine's time `now`:
/// once per request id, however often it is proposed.
fn apply_request(
    index: u64,
    now: u64,
    Request { id, op }: Request,
    w: &mut Writes<'_>,
) -> Result<Response, String> {
    // A publish's id is remembered for its dedup window only. Expired ids are forgotten
    // before the id is looked up, through this call's earlier writes, so a reused id past its
    // window is new on every replica however the entries were grouped into apply calls.
    let dedup_window = match (&id, &op) {
        (Some(_), Op::Publish(p)) => Some(p.retention.dedup_window_ms.max(1)),
        _ => None,
    };
    if dedup_window.is_some() {
        forget_old_ids(w, now)?;
    }
    if let Some(id) = &id
        && let Some(b) = w.raw_get(&request_key(id))?
    {
        let mut first: Response = dec(&b).map_err(|e| format!("response of {id:?}: {e}"))?;
        first.duplicate = true;
        return Ok(first);
    }
    let (previous, refused, offset, duplicate) = match op {
        Op::Deliver {
            producer,
            seq,
            event,
        } => {
            let (duplicate, refused, offset) = apply_deliver(w, now, &producer, seq, event)?;
            (None, refused, offset, duplicate)
        }
        op => {
            let (previous, refused, offset) = apply_op(w, now, op)?;
            (previous, refused, offset, false)
        }
    };
    if let (Some(window), Some(id)) = (dedup_window, &id) {
        w.set_record(
            &keys::DEDUP,
            (now.saturating_add(window), id.as_str()),
            Some(&Vec::new()),
        )?;
    }
    let reply = Response {
        index,
        duplicate,
        previous,
        refused,
        offset,
        batch: Vec::new(),
    };
    if let Some(id) = id {
        // The stored copy drops `previous`: a duplicate learns only where the first write
        // landed.
        let stored = Response {
            previous: None,
            ..reply.clone()
        };
        w.raw_set(
            request_key(&id),
            Some(enc(&stored).map_err(|e| e.to_string())?),
        );
    }
    Ok(reply)
}

/// What one operation did: the previous value, why it was refused (if it was), and for a
/// publish the event's offset.
type Applied = (Option<Vec<u8>>, Option<String>, Option<u64>);

/// Why a client key operation may not touch `key`: the internal keyspace is written only by
/// the operations that own it.
fn internal_refusal(key: &str) -> Option<String> {
    keys::is_internal(key).then(|| {
        format!(
            "key {key:?} is in the internal keyspace (it starts with U+0001): only the operations that own internal records write them"
        )
    })
}

/// Why a topic named in a replicated operation is refused: it must be a valid topic name,
/// so it cannot reach into another topic's keys.
fn topic_refusal(topic: &str) -> Option<String> {
    canal_proto::Topic::new(topic)
        .err()
        .map(|e| format!("topic {topic:?} is refused: {e}"))
}

/// Why a name that is part of internal keys (a subscription, a function, a trigger uid) is
/// refused: it must be 1 to 1024 bytes without control characters (the keys' separators).
fn name_refusal(what: &str, name: &str) -> Option<String> {
    let max = crate::types::MAX_INTERNAL_NAME_BYTES;
    (name.is_empty() || name.len() > max || name.chars().any(char::is_control))
        .then(|| format!("{what} {name:?} is refused: 1 to {max} bytes, no control characters"))
}

/// Applies one operation at the state machine's time `now`; returns the previous value, why
/// it was refused (if it was), and for a publish the event's offset.
fn apply_op(w: &mut Writes<'_>, now: u64, op: crate::types::Op) -> Result<Applied, String> {
    let refuse = |why: String| Ok((None, Some(why), None));
    match op {
        Op::Put { key, value } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            w.set(key, Some(value));
            Ok((previous, None, None))
        }
        Op::Delete { key } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            w.set(key, None);
            Ok((previous, None, None))
        }
        Op::Add { key, delta } => {
            if let Some(why) = internal_refusal(&key) {
                return refuse(why);
            }
            let previous = w.get(&key)?;
            match add(previous.as_deref(), delta) {
                Ok(v) => {
                    w.set(key, Some(v));
                    Ok((previous, None, None))
                }
                Err(why) => Ok((previous, Some(why), None)),
            }
        }
        Op::Internal { key, value } => {
            if let Err(why) = key.check() {
                return refuse(why);
            }
            if key == InternalKey::ShardMap {
                return apply_shard_map(w, value);
            }
            let set_once = matches!(key, InternalKey::TokenKey(_));
            let what = key.to_string();
            let key = key.key();
            let previous = w.get(&key)?;
            // Tokens in circulation are signed by the key first recorded; replacing it
            // would void every one of them, so no entry may.
            if set_once && previous.is_some() && previous != value {
                return Ok((
                    previous,
                    Some(format!(
                        "the cluster's {what} is already set: it is set once, at formation"
                    )),
                    None,
                ));
            }
            w.set(key, value);
            Ok((previous, None, None))
        }
        Op::Ack {
            subscription,
            topic,
            offset,
        } => {
            if let Some(why) =
                name_refusal("subscription", &subscription).or_else(|| topic_refusal(&topic))
            {
                return refuse(why);
            }
            // An ack of an offset the topic never had would let a cursor run ahead of the
            // log and skip events published later.
            let end = w.record(&keys::TOPIC_META, &topic)?.map_or(0, |m| m.next);
            if offset >= end {
                return refuse(match end {
                    0 => format!(
                        "offset {offset} is beyond the end of topic {topic}: it has no events"
                    ),
                    n => format!(
                        "offset {offset} is beyond the end of topic {topic}: its last offset is {}",
                        n - 1
                    ),
                });
            }
            let cursors = &keys::SUBSCRIPTION_CURSORS;
            let parts = (subscription.as_str(), topic.as_str());
            // A damaged cursor counts as none: the ack moves it to a good value.
            let current = w
                .get(&cursors.key(parts))?
                .and_then(|b| cursors.decode(&b).ok())
                .unwrap_or(0);
            let next = current.max(offset.saturating_add(1));
            w.set_record(cursors, parts, Some(&next))?;
            w.touch(&topic);
            Ok((None, None, Some(next)))
        }
        Op::Publish(event) => {
            if let Some(why) = topic_refusal(&event.topic) {
                return refuse(why);
            }
            let offset = append_event(w, event, now)?;
            Ok((None, None, Some(offset)))
        }
        Op::Effects(fx) => apply_effects(w, fx, now),
        Op::Trim { topic, retention } => {
            if let Some(why) = topic_refusal(&topic) {
                return refuse(why);
            }
            apply_trim(w, &topic, &retention, now)
        }
        // A batch is unpacked by `apply`; one inside another is not a thing clients send.
        Op::Batch(_) => refuse("a batch cannot hold a batch".into()),
        // Answered with a duplicate flag, so `apply_request` applies it itself.
        Op::Deliver { .. } => refuse("a delivery is applied on its own".into()),
        Op::OutboxTrim { producer, upto } => {
            if let Some(why) = name_refusal("producer", &producer) {
                return refuse(why);
            }
            apply_outbox_trim(w, &producer, upto)
        }
    }
}

/// Replaces the committed shard map with `value` if it decodes, validates, keeps the
/// committed shard count and is at the committed epoch + 1 (1 for the first map); the map it
/// replaces is kept as [`keys::SHARD_MAP_PREVIOUS`]. Anything else is refused, changing
/// nothing: a stale leader's map (an epoch already taken) never replaces a newer one. The
/// answer carries no previous value: a map can be large, and `previous` holds it.
fn apply_shard_map(w: &mut Writes<'_>, value: Option<Vec<u8>>) -> Result<Applied, String> {
    use canal_proto::shards::ShardMap;
    let refuse = |why: String| Ok((None, Some(why), None));
    let Some(bytes) = value else {
        return refuse(
            "the shard map cannot be removed: a new map (the committed epoch + 1) replaces it"
                .into(),
        );
    };
    let new = match ShardMap::decode(&bytes) {
        Ok(m) => m,
        Err(e) => return refuse(format!("the shard map is refused: {e}")),
    };
    let key = keys::SHARD_MAP.key(keys::SHARD_MAP_CURRENT);
    let stored = w.get(&key)?;
    // A stored map that no longer decodes counts as none (sled checksums its pages, so
    // this is no expected state): the next map starts again at epoch 1.
    let current = stored.as_deref().and_then(|b| ShardMap::decode(b).ok());
    let next = current.as_ref().map_or(1, |c| c.epoch.saturating_add(1));
    if new.epoch != next {
        return refuse(match &current {
            Some(c) => format!(
                "shard map epoch {} is refused: the committed map is at epoch {}, so only epoch {next} may replace it (a map computed from an older one is stale)",
                new.epoch, c.epoch
            ),
            None => format!(
                "shard map epoch {} is refused: no map is committed, so the first must be epoch 1",
                new.epoch
            ),
        });
    }
    if let Some(c) = &current
        && c.shards != new.shards
    {
        return refuse(format!(
            "a shard map of {} shards is refused: the cluster has {} shards, fixed when it was created",
            new.shards, c.shards
        ));
    }
    if stored.is_some() {
        w.set(keys::SHARD_MAP.key(keys::SHARD_MAP_PREVIOUS), stored);
    }
    w.set(key, Some(bytes));
    Ok((None, None, None))
}

/// How many expired ids one publish forgets at most: pruning keeps pace with publishing
/// without making one apply slow.
const FORGET_PER_PUBLISH: usize = 64;

/// Forgets (up to [`FORGET_PER_PUBLISH`]) the publish ids whose dedup window ended at or
/// before `now`, earliest expiry first.
fn forget_old_ids(w: &mut Writes<'_>, now: u64) -> Result<(), String> {
    // The keys sort by expiry, so the ones due by `now` are those before the first key of
    // `now + 1`.
    let start = data_key(keys::DEDUP.prefix());
    let end = data_key(&keys::DEDUP.key((now.saturating_add(1), "")));
    for raw in w.keys_in(&start, &end, FORGET_PER_PUBLISH)? {
        let key = String::from_utf8_lossy(&raw[2..]).into_owned();
        if let Some((_, id)) = keys::DEDUP.parse(&key) {
            w.raw_set(request_key(&id), None);
        }
        w.raw_set(raw, None);
    }
    Ok(())
}

/// Appends an event to its topic's log at time `now`, applying the topic's retention;
/// returns its offset.
fn append_event(w: &mut Writes<'_>, event: PublishOp, now: u64) -> Result<u64, String> {
    let mut meta = w
        .record(&keys::TOPIC_META, &event.topic)?
        .unwrap_or_default();
    let offset = meta.next;
    meta.bytes += event.payload.len() as u64;
    let stored = StoredEvent {
        offset,
        time_ms: now,
        id: event.id,
        headers: event.headers,
        payload: event.payload,
    };
    w.set_record(&keys::EVENTS, (&event.topic, offset), Some(&stored))?;
    meta.next += 1;
    trim(w, &event.topic, &mut meta, &event.retention, now)?;
    w.set_record(&keys::TOPIC_META, &event.topic, Some(&meta))?;
    w.touch(&event.topic);
    Ok(offset)
}

/// Drops a topic's oldest events while the log passes a retention limit at time `now_ms`
/// (the state machine's clock, so every replica drops the same events). The newest event
/// always stays.
fn trim(
    w: &mut Writes<'_>,
    topic: &str,
    meta: &mut TopicMeta,
    retention: &canal_proto::settings::Retention,
    now_ms: u64,
) -> Result<(), String> {
    while meta.next - meta.first > 1 {
        let oldest = w.record(&keys::EVENTS, (topic, meta.first))?;
        let (size, time) = oldest
            .as_ref()
            .map(|e| (e.payload.len() as u64, e.time_ms))
            .unwrap_or((0, now_ms));
        let over = meta.next - meta.first > retention.max_events.max(1)
            || (retention.max_bytes > 0 && meta.bytes > retention.max_bytes)
            || (retention.max_age_ms > 0 && time.saturating_add(retention.max_age_ms) < now_ms);
        if !over {
            break;
        }
        w.set_record(&keys::EVENTS, (topic, meta.first), None)?;
        meta.bytes = meta.bytes.saturating_sub(size);
        meta.first += 1;
    }
    Ok(())
}

/// Applies a topic's retention at `now_ms` without appending (age limits on a quiet topic).
fn apply_trim(
    w: &mut Writes<'_>,
    topic: &str,
    retention: &canal_proto::settings::Retention,
    now_ms: u64,
) -> Result<Applied, String> {
    let Some(mut meta) = w.record(&keys::TOPIC_META, topic)? else {
        return Ok((None, None, None));
    };
    let first = meta.first;
    trim(w, topic, &mut meta, retention, now_ms)?;
    if meta.first != first {
        w.set_record(&keys::TOPIC_META, topic, Some(&meta))?;
        w.touch(topic);
    }
    Ok((None, None, Some(meta.first)))
}

/// Applies an execution's effects at time `now` if all its cursors and its state version
/// still hold; otherwise refuses, changing nothing.
fn apply_effects(w: &mut Writes<'_>, fx: Effects, now: u64) -> Result<Applied, String> {
    let refusal = name_refusal("function", &fx.function)
        .or_else(|| {
            fx.cursors.iter().find_map(|c| {
                name_refusal("trigger uid", &c.trigger_uid).or_else(|| topic_refusal(&c.topic))
            })
        })
        .or_else(|| {
            // Two moves of one cursor would make the entry's outcome depend on their order.
            let mut seen = std::collections::BTreeSet::new();
            fx.cursors.iter().find_map(|c| {
                (!seen.insert((&c.trigger_uid, &c.topic))).then(|| {
                    format!(
                        "the effects move the cursor of trigger {} on {} twice: one move per topic is allowed",
                        c.trigger_uid, c.topic
                    )
                })
            })
        })
        .or_else(|| fx.outputs.iter().find_map(|o| topic_refusal(&o.topic)))
        .or_else(|| {
            fx.outbox.iter().find_map(|o| {
                name_refusal("producer", &o.producer).or_else(|| topic_refusal(&o.event.topic))
            })
        });
    if let Some(why) = refusal {
        return Ok((None, Some(why), None));
    }
    for c in &fx.cursors {
        let now = w.record(&keys::TRIGGER_CURSORS, (&c.trigger_uid, &c.topic))?;
        if now != c.expected {
            return Ok((
                None,
                Some(format!(
                    "the trigger's cursor on {} is at {now:?}, not {:?}: another execution committed first",
                    c.topic, c.expected
                )),
                None,
            ));
        }
    }
    let version = w.record(&keys::STATE_VERSIONS, &fx.function)?.unwrap_or(0);
    if let Some(expected) = fx.state_version
        && expected != version
    {
        return Ok((
            None,
            Some(format!(
                "the state of {} is at version {version}, not {expected}: it changed since it was read",
                fx.function
            )),
            None,
        ));
    }
    // The whole entry is refused if one outbox would pass its limit, before anything is
    // written: the cursor stays, and the step runs again once the relay has caught up.
    let mut adding: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for o in &fx.outbox {
        *adding.entry(o.producer.as_str()).or_default() += 1;
    }
    for (producer, n) in &adding {
        let meta = w.record(&keys::OUTBOX_META, producer)?.unwrap_or_default();
        if meta.len().saturating_add(*n) > MAX_OUTBOX_ENTRIES {
            return Ok((
                None,
                Some(format!(
                    "the outbox of producer {producer} holds {} entries and {n} more would pass its limit of {MAX_OUTBOX_ENTRIES} (MAX_OUTBOX_ENTRIES): the relay has not delivered them yet",
                    meta.len()
                )),
                None,
            ));
        }
    }
    if !fx.state.is_empty() {
        for (k, v) in fx.state {
            w.set_record(&keys::STATE, (&fx.function, &k), v.as_ref())?;
        }
        w.set_record(&keys::STATE_VERSIONS, &fx.function, Some(&(version + 1)))?;
    }
    let mut last = None;
    for out in fx.outputs {
        last = Some(append_event(w, out, now)?);
    }
    for o in fx.outbox {
        let mut meta = w
            .record(&keys::OUTBOX_META, &o.producer)?
            .unwrap_or_default();
        let entry = OutboxEntry {
            target: o.target,
            event: o.event,
        };
        w.set_record(&keys::OUTBOX, (&o.producer, meta.next), Some(&entry))?;
        meta.next += 1;
        w.set_record(&keys::OUTBOX_META, &o.producer, Some(&meta))?;
    }
    for c in fx.cursors {
        w.set_record(
            &keys::TRIGGER_CURSORS,
            (&c.trigger_uid, &c.topic),
            Some(&c.next),
        )?;
        w.touch(&c.topic);
    }
    Ok((None, None, last))
}

/// Applies delivery `seq` of `producer` at time `now`: appends the event once, in sequence
/// order. Returns whether it was a duplicate (at or below the last sequence number applied:
/// nothing changes, and it is success), why it was refused (a gap, a bad name), and the
/// event's offset.
fn apply_deliver(
    w: &mut Writes<'_>,
    now: u64,
    producer: &str,
    seq: u64,
    event: PublishOp,
) -> Result<(bool, Option<String>, Option<u64>), String> {
    if let Some(why) = name_refusal("producer", producer).or_else(|| topic_refusal(&event.topic)) {
        return Ok((false, Some(why), None));
    }
    if seq == 0 {
        return Ok((
            false,
            Some(format!(
                "delivery #0 of producer {producer} is refused: sequence numbers start at 1"
            )),
            None,
        ));
    }
    let last = w.record(&keys::PRODUCER_SEQS, producer)?.unwrap_or(0);
    if seq <= last {
        return Ok((true, None, None));
    }
    if seq > last + 1 {
        return Ok((
            false,
            Some(format!(
                "delivery #{seq} of producer {producer} is refused as a gap: the last applied is #{last}, so only #{} comes next",
                last + 1
            )),
            None,
        ));
    }
    let offset = append_event(w, event, now)?;
    w.set_record(&keys::PRODUCER_SEQS, producer, Some(&seq))?;
    Ok((false, None, Some(offset)))
}

/// Removes `producer`'s outbox entries up to `upto`, never past the last sequence number
/// handed out (so a trim cannot skip a later entry); the reply's offset is the oldest
/// sequence number kept.
fn apply_outbox_trim(w: &mut Writes<'_>, producer: &str, upto: u64) -> Result<Applied, String> {
    let Some(mut meta) = w.record(&keys::OUTBOX_META, producer)? else {
        return Ok((None, None, Some(1)));
    };
    let end = upto.min(meta.next.saturating_sub(1));
    if end >= meta.first {
        for seq in meta.first..=end {
            w.set_record(&keys::OUTBOX, (producer, seq), None)?;
        }
        meta.first = end + 1;
        w.set_record(&keys::OUTBOX_META, producer, Some(&meta))?;
    }
    Ok((None, None, Some(meta.first)))
}

/// `previous + delta`, as decimal text; a missing value counts as 0.
fn add(previous: Option<&[u8]>, delta: i64) -> Result<Vec<u8>, String> {
    let current: i64 = match previous {
        None => 0,
        Some(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| "the key does not hold a whole number".to_string())?,
    };
    let sum = current
        .checked_add(delta)
        .ok_or_else(|| format!("{current} + {delta} overflows a 64-bit number"))?;
    Ok(sum.to_string().into_bytes())
}

/// Applies `entries` in order as one atomic write ([`StateMachine::write`]): their data, the
/// applied log id and the membership together, every read of the call seeing its earlier
/// writes.
pub(super) fn apply_entries<I>(sm: &StateMachine, entries: I) -> Result<Vec<Response>, SErr>
where
    I: IntoIterator<Item = Entry<TypeConfig>>,
{
    let werr = |e: String| StorageIOError::write_state_machine(openraft::AnyError::error(e));
    let mut w = Writes::new(&sm.sm);
    let mut replies = Vec::new();
    let mut last = None;
    let mut membership = None;
    for entry in entries {
        last = Some(entry.log_id);
        let index = entry.log_id.index;
        match entry.payload {
            EntryPayload::Blank => replies.push(Response {
                index,
                ..Default::default()
            }),
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(entry.log_id), m));
                replies.push(Response {
                    index,
                    ..Default::default()
                });
            }
            EntryPayload::Normal(Proposal { time_ms, request }) => {
                let now = advance_clock(&mut w, time_ms).map_err(werr)?;
                match request {
                    Request {
                        id: None,
                        op: Op::Batch(requests_of_batch),
                    } => {
                        // Many client writes in one entry: each keeps its own id and
                        // answer, and all share the entry's time.
                        let mut answers = Vec::with_capacity(requests_of_batch.len());
                        for req in requests_of_batch {
                            answers.push(apply_request(index, now, req, &mut w).map_err(werr)?);
                        }
                        replies.push(Response {
                            index,
                            batch: answers,
                            ..Default::default()
                        });
                    }
                    req => replies.push(apply_request(index, now, req, &mut w).map_err(werr)?),
                }
            }
        }
    }
    if let Some(last) = last {
        w.raw_set(
            b"m/applied".to_vec(),
            Some(enc(&Some(last)).map_err(|e| werr(e.to_string()))?),
        );
    }
    if let Some(m) = membership {
        w.raw_set(
            b"m/membership".to_vec(),
            Some(enc(&m).map_err(|e| werr(e.to_string()))?),
        );
    }
    let changed: Option<Arc<[String]>> =
        (!w.changed().is_empty()).then(|| w.changed().iter().cloned().collect());
    sm.write(w.into_pending())
        .map_err(|e| werr(e.to_string()))?;
    if let Some(last) = last {
        // The ring before the index: a remote poll woken by the index finds the topics.
        sm.ring().record(last.index, changed.as_ref());
        // The topic notice first: a waiter woken by the index may look for it.
        if let Some(topics) = changed {
            sm.notify_changes(last.index, Some(topics));
        }
        sm.applied_tx.send_replace(last.index);
    }
    Ok(replies)
}

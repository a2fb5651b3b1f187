//! `threshold`: reads sensor values (decimal text such as `21.5`), keeps a running mean per
//! topic in state (`mean/{topic}`, `count/{topic}`) and, when a reading is above the
//! threshold, emits a JSON alert to the trigger's output topic and adds one to the state key
//! `alerts`. The threshold is the event's `threshold` header, else the state key
//! `config/threshold`, else 30. A payload that is not a number fails the invocation.
//!
//! Bind it with an output topic for the alerts:
//! `canal trigger add alerts --on 'sensors/+/temp' --fn threshold --out alerts/temp`

use canal_function::{Event, Function, emit, export, state};

const DEFAULT_THRESHOLD: f64 = 30.0;

struct Threshold;

impl Function for Threshold {
    fn handle(event: Event) -> Result<(), String> {
        let value = parse_number(&event.payload).ok_or_else(|| {
            format!(
                "payload {:?} is not a number",
                String::from_utf8_lossy(&event.payload)
            )
        })?;
        let threshold = match event.header("threshold") {
            Some(h) => h
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite())
                .ok_or_else(|| format!("header threshold {h:?} is not a number"))?,
            None => state::get_f64("config/threshold").unwrap_or(DEFAULT_THRESHOLD),
        };

        let topic = &event.topic;
        let (count_key, mean_key) = (format!("count/{topic}"), format!("mean/{topic}"));
        let count = state::get_u64(&count_key).unwrap_or(0) + 1;
        let old_mean = state::get_f64(&mean_key).unwrap_or(0.0);
        let mean = old_mean + (value - old_mean) / count as f64;
        state::set_u64(&count_key, count)?;
        state::set_f64(&mean_key, mean)?;

        if value > threshold {
            state::increment("alerts")?;
            let alert = format!(
                r#"{{"topic":"{}","value":{value},"mean":{mean},"threshold":{threshold}}}"#,
                json_escape(topic)
            );
            emit(alert, &[])?;
        }
        Ok(())
    }
}

/// The payload as a finite decimal number, if it is one.
fn parse_number(payload: &[u8]) -> Option<f64> {
    let value: f64 = std::str::from_utf8(payload).ok()?.trim().parse().ok()?;
    value.is_finite().then_some(value)
}

/// `s` escaped for a JSON string (topics may hold `"` or `\`).
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

export!(Threshold);

//! `/metrics` in the Prometheus text format (0.0.4) for clients that do not ask for
//! OpenMetrics: `promtool check metrics`, `curl`, older scrapers.
//!
//! prometheus-client writes only OpenMetrics 1.0, where a counter family `x` has samples
//! `x_total` and the text ends in `# EOF`. Read as the Prometheus text format, those
//! samples have no HELP or TYPE of their own. The conversion names each family after its
//! samples (`x_total` for counters, `x_info` for info metrics, typed gauge), drops what the
//! older format has no place for (`# UNIT`, `# EOF`, `_created` samples, exemplars), and
//! keeps every sample's name, labels and value as they were.

/// The content type of what [`to_prometheus_text`] returns.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type prometheus-client's encoder writes.
pub(crate) const OPENMETRICS_TEXT: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics (as Prometheus' own scrapes do).
pub(crate) fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let is_om = params.next() == Some("application/openmetrics-text");
            // `q=0` means "not this one".
            is_om
                && !params.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f64>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// The OpenMetrics text `om` in the Prometheus text format.
pub(crate) fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The family being read: its OpenMetrics name, and the name it has here.
    let mut family: Option<(String, String, &'static str)> = None;
    let mut pending_help: Option<(String, String)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // HELP comes before TYPE: hold it until the type says what to call the family.
            flush_help(&mut out, &mut pending_help, None);
            pending_help = Some((name.to_string(), help.to_string()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (renamed, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_string(), "gauge"),
                "gaugehistogram" => (name.to_string(), "histogram"),
                "gauge" => (name.to_string(), "gauge"),
                "histogram" => (name.to_string(), "histogram"),
                "summary" => (name.to_string(), "summary"),
                _ => (name.to_string(), "untyped"),
            };
            flush_help(&mut out, &mut pending_help, Some((name, &renamed)));
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            family = Some((name.to_string(), renamed, kind));
            continue;
        }
        if line.starts_with('#') {
            // `# UNIT`, `# EOF` and other comments have no place in the older format.
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let sample = strip_exemplar(line);
        if let Some((om_name, _, "counter")) = &family
            && sample_name(sample) == format!("{om_name}_created")
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    flush_help(&mut out, &mut pending_help, None);
    out
}

/// Writes a held HELP line, under the family's new name when `rename` is its (old, new).
fn flush_help(
    out: &mut String,
    pending: &mut Option<(String, String)>,
    rename: Option<(&str, &str)>,
) {
    if let Some((name, help)) = pending.take() {
        let name = match rename {
            Some((old, new)) if old == name => new.to_string(),
            _ => name,
        };
        out.push_str(&format!("# HELP {name} {help}\n"));
    }
}

/// The metric name of a sample line.
fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// A sample line without its exemplar (` # {trace_id="..."} 1.0`), which only OpenMetrics
/// has. A `#` inside a label value is not an exemplar, so the search starts after the labels.
fn strip_exemplar(line: &str) -> &str {
    let after_labels = match line.find('{') {
        Some(open) => closing_brace(line, open).map_or(line.len(), |c| c + 1),
        None => 0,
    };
    match line[after_labels..].find(" # ") {
        Some(i) => &line[..after_labels + i],
        None => line,
    }
}

/// The index of the `}` that closes the label set opened at `open`, skipping quoted values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(open + i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_samples() {
        let om = "# HELP canal_publish Events published.\n# TYPE canal_publish counter\ncanal_publish_total{qos=\"1\"} 3\ncanal_publish_created{qos=\"1\"} 1.7e9\n# HELP up_bytes Bytes.\n# TYPE up_bytes gauge\n# UNIT up_bytes bytes\nup_bytes 7\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP canal_publish_total Events published.\n# TYPE canal_publish_total counter\ncanal_publish_total{qos=\"1\"} 3\n# HELP up_bytes Bytes.\n# TYPE up_bytes gauge\nup_bytes 7\n"
        );
    }

    #[test]
    fn histograms_info_and_exemplars() {
        let om = "# HELP lat Latency.\n# TYPE lat histogram\nlat_sum 1.5\nlat_count 2\nlat_bucket{le=\"+Inf\"} 2 # {trace=\"a # b\"} 0.5\n# HELP build Build.\n# TYPE build info\nbuild_info{v=\"x # y\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP lat Latency.\n# TYPE lat histogram\nlat_sum 1.5\nlat_count 2\nlat_bucket{le=\"+Inf\"} 2\n# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"x # y\"} 1\n"
        );
    }

    #[test]
    fn scrapers_that_ask_for_openmetrics_get_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }
}

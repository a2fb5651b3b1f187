//! `canal testnet scenario`: the command line of the scenarios that
//! [`canal_bench::scenario`] runs.

use canal_bench::scenario::{DEFAULT_WASM, IotOptions};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// `canal testnet scenario`.
#[derive(Args, Debug)]
pub(crate) struct ScenarioArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Sensors publish on edge nodes, the threshold function fires alerts, a subscriber on
    /// a cloud node checks each arrives once; exits 1 if anything expected did not happen.
    Iot(IotArgs),
}

/// `canal testnet scenario iot`.
#[derive(Args, Debug, Clone)]
pub(crate) struct IotArgs {
    /// The threshold function, built with
    /// `cd examples/functions && cargo build --release --target wasm32-wasip2`.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_WASM)]
    wasm: PathBuf,
    /// How many readings to publish.
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    events: u64,
    /// How many sensors (topics) the readings come from.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1_000))]
    sensors: u64,
    /// API URLs of edge nodes, comma-separated, instead of the testnet's (needs
    /// --api-cloud too).
    #[arg(long, value_name = "URL,...", value_delimiter = ',', value_parser = parse_url,
          requires = "api_cloud")]
    api_edge: Vec<String>,
    /// API URLs of cloud nodes, comma-separated, instead of the testnet's (needs --api-edge
    /// too).
    #[arg(long, value_name = "URL,...", value_delimiter = ',', value_parser = parse_url,
          requires = "api_edge")]
    api_cloud: Vec<String>,
    /// The longest any one step may wait, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    timeout: u64,
    /// Names this run's topics (sensors/RUN-K/temp); a fresh one by default.
    #[arg(long, value_name = "RUN", value_parser = parse_run_id)]
    run_id: Option<String>,
}

fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| {
            format!("{s:?} is not an http:// URL: write, for example, http://127.0.0.1:7071")
        })?;
    if rest.is_empty() || rest.contains('/') {
        return Err(format!(
            "{s:?} is not the base URL of a node's API: write, for example, http://127.0.0.1:7071"
        ));
    }
    Ok(s.to_string())
}

fn parse_run_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 40 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!(
            "{s:?} is not a run id: use 1-40 letters, digits and `-`"
        ));
    }
    Ok(s.to_string())
}

/// Runs `canal testnet scenario ...` against the testnet in `dir` (unless URLs are given).
pub(crate) async fn run(args: ScenarioArgs, dir: &Path, json: bool) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Iot(a) => canal_bench::scenario::iot(a.into(), dir, json).await,
    }
}

impl From<IotArgs> for IotOptions {
    fn from(a: IotArgs) -> IotOptions {
        IotOptions {
            wasm: a.wasm,
            events: a.events,
            sensors: a.sensors,
            api_edge: a.api_edge,
            api_cloud: a.api_cloud,
            timeout: a.timeout,
            run_id: a.run_id,
        }
    }
}

/// One reading a sensor publishes.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        scenario: Scenario,
    }

    fn iot_args(args: &[&str]) -> Result<IotArgs, clap::Error> {
        let mut all = vec!["scenario", "iot"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.scenario {
            Scenario::Iot(a) => Ok(a),
        }
    }

    #[test]
    fn options_have_defaults_and_are_checked() {
        let a = iot_args(&[]).unwrap();
        assert_eq!(a.wasm, PathBuf::from(DEFAULT_WASM));
        assert_eq!((a.events, a.sensors, a.timeout), (200, 4, 60));
        assert!(a.api_edge.is_empty() && a.api_cloud.is_empty() && a.run_id.is_none());

        let a = iot_args(&[
            "--api-edge",
            "http://127.0.0.1:7071,http://127.0.0.1:7072/",
            "--api-cloud",
            "http://127.0.0.1:7073",
            "--events",
            "10",
            "--run-id",
            "ci-1",
        ])
        .unwrap();
        assert_eq!(
            a.api_edge,
            ["http://127.0.0.1:7071", "http://127.0.0.1:7072"]
        );
        assert_eq!(a.api_cloud, ["http://127.0.0.1:7073"]);
        assert_eq!(a.events, 10);
        assert_eq!(a.run_id.as_deref(), Some("ci-1"));

        for bad in [
            &["--api-edge", "http://127.0.0.1:7071"][..],
            &["--api-cloud", "http://127.0.0.1:7071"],
            &["--api-edge", "127.0.0.1:7071", "--api-cloud", "http://a:1"],
            &["--api-edge", "http://a:1/v1", "--api-cloud", "http://a:1"],
            &["--events", "0"],
            &["--sensors", "0"],
            &["--timeout", "0"],
            &["--run-id", "a/b"],
            &["--run-id", ""],
        ] {
            let e = iot_args(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }
}

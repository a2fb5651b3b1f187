//! `canal bench`: the command line of the load generators that [`canal_bench`] runs.

use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Publish and subscribe on a local 3-node cluster: events/s published and delivered,
    /// publish-to-delivery latency percentiles, for each QoS and payload size.
    Pubsub {
        /// Events per run.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Payload sizes in bytes, comma-separated.
        #[arg(long, default_value = "64,4096", value_delimiter = ',')]
        sizes: Vec<usize>,
        /// QoS levels, comma-separated.
        #[arg(long, default_value = "0,1", value_delimiter = ',')]
        qos: Vec<u8>,
        /// Publishes in flight.
        #[arg(long, default_value_t = 64)]
        publishers: usize,
        /// Local canal nodes (3 to 16); publishers go through all of them. NATS (with
        /// --compare-nats) stays at three servers.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// After canal's runs, make the same runs on three local nats-server processes
        /// (JetStream, a 3-replica stream for QoS 1) and print both side by side.
        #[arg(long)]
        compare_nats: bool,
        /// The nats-server binary for --compare-nats: a path, or a name to look up on PATH.
        #[arg(long, default_value = "nats-server")]
        nats_server: PathBuf,
    },
    /// MQTT on a local 3-node cluster: many publishers, one connection each, one subscriber;
    /// messages/s published and delivered, latency percentiles, for each QoS.
    Mqtt {
        /// Messages per run.
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        /// QoS levels, comma-separated.
        #[arg(long, default_value = "0,1", value_delimiter = ',')]
        qos: Vec<u8>,
        /// Publishing clients, one connection each.
        #[arg(long, default_value_t = 16)]
        publishers: usize,
        /// Payload size in bytes (at least 16: the publish time rides in it).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// After canal's runs, make the same runs on a local mosquitto (one process, in
        /// memory) and print both side by side with the ratio.
        #[arg(long)]
        compare_mosquitto: bool,
        /// The mosquitto binary for --compare-mosquitto.
        #[arg(long, default_value = "mosquitto")]
        mosquitto: PathBuf,
    },
    /// Functions: per-event overhead of a no-op function, the first event after a deploy and
    /// after a restart, and publish -> function -> subscriber latency on a local cluster.
    Fn {
        /// Invocations of the no-op function timed in this process.
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        /// Events through each trigger on the local cluster (0 skips that part).
        #[arg(long, default_value_t = 2_000)]
        events: usize,
        /// Publishes in flight on the cluster.
        #[arg(long, default_value_t = 8)]
        publishers: usize,
    },
    /// Placement on emulated tiers (edge peers at 30 ms, cloud at 1 ms): how often the
    /// latency policy runs events on the best peer, and end-to-end latency, against topology.
    Placement {
        /// Events per policy.
        #[arg(long, default_value_t = 500)]
        events: usize,
        /// Publishes in flight.
        #[arg(long, default_value_t = 8)]
        publishers: usize,
    },
    /// The shard map at scale, simulated in this process (no nodes): replicas and leaders per
    /// peer, replicas moved when one peer joins and when one leaves against the minimum, and
    /// the time to compute each map.
    Shards {
        /// Simulated peers.
        #[arg(long, default_value_t = 100)]
        peers: usize,
        /// Shards.
        #[arg(long, default_value_t = 1000)]
        shards: u32,
        /// K, replicas per shard.
        #[arg(long, default_value_t = 3)]
        replication: usize,
        /// Zones the peers are spread over (the `zone` label); 0 spreads over none.
        #[arg(long, default_value_t = 3)]
        zones: usize,
        /// Tiers given to the peers round-robin, comma-separated.
        #[arg(long, default_value = "cloud,edge,core", value_delimiter = ',')]
        tiers: Vec<String>,
        /// Only peers of this tier hold replicas.
        #[arg(long)]
        tier: Option<String>,
        /// Peers per host (no two replicas of a shard share a host).
        #[arg(long, default_value_t = 1)]
        peers_per_host: usize,
    },
    /// Replicated writes on a local 3-node cluster: throughput, commit latency, failover time.
    Raft {
        /// Writes per run.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Concurrent writers of the runs, comma-separated.
        #[arg(long, default_value = "1,64", value_delimiter = ',')]
        writers: Vec<usize>,
        /// Bytes per value.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Leader kills to time (0 to skip).
        #[arg(long, default_value_t = 10)]
        failovers: usize,
    },
}

/// Runs `canal bench ...`.
pub(crate) async fn run(args: BenchArgs, json: bool) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Raft {
            count,
            writers,
            size,
            failovers,
        } => canal_bench::raft(count, writers, size, failovers, json).await,
        BenchCommand::Pubsub {
            count,
            sizes,
            qos,
            publishers,
            nodes,
            compare_nats,
            nats_server,
        } => {
            let nats_server = compare_nats.then_some(nats_server);
            canal_bench::pubsub(count, sizes, qos, publishers, nodes, nats_server, json).await
        }
        BenchCommand::Mqtt {
            count,
            qos,
            publishers,
            size,
            compare_mosquitto,
            mosquitto,
        } => {
            let mosquitto = compare_mosquitto.then_some(mosquitto);
            canal_bench::mqtt(count, qos, publishers, size, mosquitto, json).await
        }
        BenchCommand::Fn {
            count,
            events,
            publishers,
        } => canal_bench::functions(count, events, publishers, json).await,
        BenchCommand::Shards {
            peers,
            shards,
            replication,
            zones,
            tiers,
            tier,
            peers_per_host,
        } => canal_bench::shards(
            canal_bench::ShardsBench {
                peers,
                shards,
                replication,
                zones,
                tiers,
                tier,
                peers_per_host,
            },
            json,
        ),
        BenchCommand::Placement { events, publishers } => {
            canal_bench::placement(events, publishers, json).await
        }
    }
}

//! The compose files of a canal mesh in containers, generated from one description.
//!
//! Two files come from here and are committed:
//!
//! - `testnet/docker-compose.yml`, for real hosts with Docker: five nodes in two tiers (3
//!   `edge`, 2 `cloud`), the last declaring a GPU, the image built from source with
//!   `testnet/Dockerfile`.
//! - `testnet/podman/compose.yml`, for CI with podman and podman-compose: three nodes (2
//!   `edge`, 1 `cloud`) running a local image that `testnet/podman/run.sh` makes from the
//!   binary the tests were built with.
//!
//! Both are [`Compose::render`]ed from [`Compose::docker`] and [`Compose::podman`], which
//! share every rule (service names, ports, data directory, flags, bootstrap by service name,
//! health check); a test checks the committed files are what the generator makes, so they
//! cannot drift apart. After changing this file, regenerate them with
//! `CANAL_UPDATE_COMPOSE=1 cargo test -p canal-testnet compose`.

use std::fmt::Write as _;

/// The port every node listens on for peers, inside its container.
pub const PEER_PORT: u16 = 7000;
/// The port of every node's HTTP API, inside its container.
pub const API_PORT: u16 = 7070;
/// Where a node keeps its data, inside its container (a named volume).
pub const DATA_DIR: &str = "/data";
/// The cluster key every node is given, inside its container: a volume of its own
/// ([`KEY_VOLUME`]) that the one-shot [`KEYGEN`] service fills with a fresh key once, so
/// the mesh runs keyed without a key committed anywhere.
pub const KEY_FILE: &str = "/key/swarm.key";
/// The named volume holding [`KEY_FILE`].
pub const KEY_VOLUME: &str = "cluster-key";
/// The service that writes the key (`canal cluster keygen --if-missing`) before the nodes
/// start.
pub const KEYGEN: &str = "keygen";
/// The token key every node is given (`--token-key`), in the key volume beside the cluster
/// key: written once by [`KEYGEN`], so admin tokens can be minted from it on the host
/// (`canal token mint --key /key/token.key ...` in a one-off container; see docs/auth.md).
pub const TOKEN_KEY_FILE: &str = "/key/token.key";
/// Where the keygen service puts the local CA and the nodes' API certificate (`canal testnet
/// certs --dir /key`): every API speaks HTTPS, verified with [`CA_FILE`].
pub const TLS_DIR: &str = "/key/tls";
/// The local CA's certificate, for `canal --ca` (the health check, and the host: see
/// docs/auth.md for copying it out of the volume).
pub const CA_FILE: &str = "/key/tls/ca.pem";
/// `--bootstrap-expect`: how many nodes form the Raft cluster (as voters).
///
/// Every node gets the flag, as with `canal testnet up`: the services start together, and the
/// node that forms the cluster is the one with the lowest peer id of all the peers it sees,
/// so a node without the flag that happens to have the lowest id would leave the mesh
/// without a cluster. The others join the one cluster as learners, promoted up to `--voters`.
pub const BOOTSTRAP_EXPECT: usize = 3;
/// The GPU the last node declares.
pub const GPU: &str = "H100:80GiB";
/// The image the podman path runs (made by `testnet/podman/run.sh`).
pub const PODMAN_IMAGE: &str = "localhost/canal-testnet:ci";
/// The image the Docker path builds.
pub const DOCKER_IMAGE: &str = "canal-testnet:local";

/// How the services get their image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// Built from source: `context` and `dockerfile` relative to the compose file, tagged
    /// `tag`.
    Build {
        /// The build context.
        context: String,
        /// The Dockerfile, relative to the context.
        dockerfile: String,
        /// The tag the built image gets.
        tag: String,
    },
    /// An image that is already there.
    Local(String),
}

/// Where a node's API is published on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPort {
    /// This port on 127.0.0.1.
    Fixed(u16),
    /// A free port on 127.0.0.1 that the engine picks (`podman port` tells which).
    Ephemeral,
}

/// One node: one compose service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeNode {
    /// The service name, which is also its host name on the compose network (`edge1`).
    pub name: String,
    /// Its tier.
    pub tier: String,
    /// The GPU it declares, if any.
    pub gpu: Option<String>,
    /// `--bootstrap-expect N` (see [`BOOTSTRAP_EXPECT`]).
    pub bootstrap_expect: Option<usize>,
    /// Where its API is published on the host.
    pub api_port: HostPort,
}

/// A mesh of canal nodes as compose services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    /// The first comment lines: what the file is and how to run it.
    pub header: Vec<String>,
    /// Where the image comes from.
    pub image: Image,
    /// The nodes, in start order.
    pub nodes: Vec<ComposeNode>,
}

impl Compose {
    /// The nodes of a mesh with these tiers (`[("edge", 3), ("cloud", 2)]`): services named
    /// `{tier}{k}` from 1, [`BOOTSTRAP_EXPECT`] of them forming the Raft cluster, the last
    /// declaring [`GPU`], each API published as `port(i)`.
    pub fn nodes(tiers: &[(&str, usize)], port: impl Fn(usize) -> HostPort) -> Vec<ComposeNode> {
        let total: usize = tiers.iter().map(|(_, n)| n).sum();
        let expect = total.min(BOOTSTRAP_EXPECT);
        let mut nodes = Vec::new();
        for (tier, n) in tiers {
            for k in 1..=*n {
                let i = nodes.len();
                nodes.push(ComposeNode {
                    name: format!("{tier}{k}"),
                    tier: tier.to_string(),
                    gpu: (i + 1 == total).then(|| GPU.to_string()),
                    bootstrap_expect: Some(expect),
                    api_port: port(i),
                });
            }
        }
        nodes
    }

    /// The Docker file: five nodes, built from source, APIs on 127.0.0.1:7071-7075.
    pub fn docker() -> Compose {
        Compose {
            header: vec![
                "A five-node canal mesh for a host with Docker: 3 edge nodes, 2 cloud nodes, the"
                    .into(),
                "last declaring a GPU. From the repository root:".into(),
                String::new(),
                "    docker compose -f testnet/docker-compose.yml up --build -d".into(),
                "    export CANAL_API=https://127.0.0.1:7071     # edge1; 7072-7075 are the others"
                    .into(),
                "    export CANAL_TOKEN=$(docker compose -f testnet/docker-compose.yml run --rm --entrypoint canal keygen \\"
                    .into(),
                "        token mint --key /key/token.key --sub admin --admin --pub '#' --sub-filter '#')"
                    .into(),
                "    docker compose -f testnet/docker-compose.yml run --rm --entrypoint cat keygen /key/tls/ca.pem > canal-ca.pem"
                    .into(),
                "    export CANAL_CA=$PWD/canal-ca.pem           # the APIs speak HTTPS with the local CA's certificates"
                    .into(),
                "    docker compose -f testnet/docker-compose.yml down -v   # -v: the data too"
                    .into(),
            ],
            image: Image::Build {
                context: "..".into(),
                dockerfile: "testnet/Dockerfile".into(),
                tag: DOCKER_IMAGE.into(),
            },
            nodes: Compose::nodes(&[("edge", 3), ("cloud", 2)], |i| {
                HostPort::Fixed(API_PORT + 1 + i as u16)
            }),
        }
    }

    /// The podman file of CI: three nodes of a local image, APIs on ports podman picks.
    pub fn podman() -> Compose {
        Compose {
            header: vec![
                "A three-node canal mesh for CI with podman-compose: 2 edge nodes, 1 cloud node,"
                    .into(),
                format!(
                    "running {PODMAN_IMAGE}, which testnet/podman/run.sh makes from the binary"
                ),
                "the tests were built with. Run it through that script.".into(),
            ],
            image: Image::Local(PODMAN_IMAGE.into()),
            nodes: Compose::nodes(&[("edge", 2), ("cloud", 1)], |_| HostPort::Ephemeral),
        }
    }

    /// The `canal` command line of node `i` in its container.
    pub fn command(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "node".into(),
            "--data-dir".into(),
            DATA_DIR.into(),
            "--listen".into(),
            format!("/ip4/0.0.0.0/tcp/{PEER_PORT}"),
            "--api-listen".into(),
            format!("0.0.0.0:{API_PORT}"),
            "--tier".into(),
            n.tier.clone(),
            "--cluster-key".into(),
            KEY_FILE.into(),
            "--token-key".into(),
            TOKEN_KEY_FILE.into(),
            "--tls-cert".into(),
            format!("{TLS_DIR}/node.pem"),
            "--tls-key".into(),
            format!("{TLS_DIR}/node-key.pem"),
        ];
        if let Some(g) = &n.gpu {
            args.extend(["--gpu".into(), g.clone()]);
        }
        if let Some(e) = n.bootstrap_expect {
            args.extend(["--bootstrap-expect".into(), e.to_string()]);
        }
        // Every node knows every other by service name, so any of them can restart alone.
        for (j, other) in self.nodes.iter().enumerate() {
            if j != i {
                args.extend([
                    "--bootstrap".into(),
                    format!("/dns4/{}/tcp/{PEER_PORT}", other.name),
                ]);
            }
        }
        args
    }

    /// The health check of every service: `canal health` asks the node's own API
    /// (`GET /v1/health`, which answers 200 once the node is ready).
    pub fn healthcheck() -> Vec<String> {
        vec![
            "CMD".into(),
            "canal".into(),
            "health".into(),
            "--api".into(),
            format!("https://127.0.0.1:{API_PORT}"),
            "--ca".into(),
            CA_FILE.into(),
        ]
    }

    /// The compose file, as YAML.
    pub fn render(&self) -> String {
        let mut y = String::new();
        y.push_str(
            "# Generated by testnet/src/compose.rs: edit that, then run\n\
             # `CANAL_UPDATE_COMPOSE=1 cargo test -p canal-testnet compose` to write this file.\n#\n",
        );
        for line in &self.header {
            if line.is_empty() {
                y.push_str("#\n");
            } else {
                let _ = writeln!(y, "# {line}");
            }
        }
        y.push_str("\nservices:\n");
        let _ = writeln!(y, "  {KEYGEN}:");
        self.render_image(&mut y);
        // Both keys in one one-shot run (the image's entrypoint is canal; it has a shell).
        let keygen: Vec<String> = [
            "-c".to_string(),
            format!(
                "canal cluster keygen {KEY_FILE} --if-missing && canal token keygen {TOKEN_KEY_FILE} --if-missing && canal testnet certs --dir /key"
            ),
        ]
        .into();
        let _ = writeln!(y, "    entrypoint: {}", flow(&["/bin/sh".to_string()]));
        let _ = writeln!(y, "    command: {}", flow(&keygen));
        y.push_str("    volumes:\n");
        let key_dir = KEY_FILE.rsplit_once('/').map_or("/", |(d, _)| d);
        let _ = writeln!(y, "      - {}", q(&format!("{KEY_VOLUME}:{key_dir}")));
        y.push_str("    restart: \"no\"\n");
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(y, "  {}:", n.name);
            self.render_image(&mut y);
            let _ = writeln!(y, "    hostname: {}", q(&n.name));
            let _ = writeln!(y, "    command: {}", flow(&self.command(i)));
            y.push_str("    depends_on:\n");
            let _ = writeln!(y, "      {KEYGEN}:");
            y.push_str("        condition: service_completed_successfully\n");
            y.push_str("    environment:\n");
            let _ = writeln!(y, "      CANAL_LOG: {}", q("info"));
            y.push_str("    ports:\n");
            let port = match n.api_port {
                HostPort::Fixed(p) => format!("127.0.0.1:{p}:{API_PORT}"),
                HostPort::Ephemeral => format!("127.0.0.1::{API_PORT}"),
            };
            let _ = writeln!(y, "      - {}", q(&port));
            y.push_str("    volumes:\n");
            let _ = writeln!(y, "      - {}", q(&format!("{}-data:{DATA_DIR}", n.name)));
            let _ = writeln!(y, "      - {}", q(&format!("{KEY_VOLUME}:{key_dir}:ro")));
            y.push_str("    healthcheck:\n");
            let _ = writeln!(y, "      test: {}", flow(&Compose::healthcheck()));
            y.push_str("      interval: 5s\n      timeout: 3s\n      retries: 12\n");
            y.push_str("      start_period: 10s\n");
            y.push_str("    stop_grace_period: 30s\n");
            y.push_str("    restart: unless-stopped\n");
        }
        y.push_str("\nvolumes:\n");
        let _ = writeln!(y, "  {KEY_VOLUME}: {{}}");
        for n in &self.nodes {
            let _ = writeln!(y, "  {}-data: {{}}", n.name);
        }
        y
    }

    /// The lines saying where a service's image comes from.
    fn render_image(&self, y: &mut String) {
        match &self.image {
            Image::Build {
                context,
                dockerfile,
                tag,
            } => {
                y.push_str("    build:\n");
                let _ = writeln!(y, "      context: {}", q(context));
                let _ = writeln!(y, "      dockerfile: {}", q(dockerfile));
                let _ = writeln!(y, "    image: {}", q(tag));
            }
            Image::Local(image) => {
                let _ = writeln!(y, "    image: {}", q(image));
            }
        }
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// A YAML flow sequence of strings.
fn flow(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn check_file(rel: &str, want: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
        if std::env::var_os("CANAL_UPDATE_COMPOSE").is_some() {
            std::fs::write(&path, want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is not what testnet/src/compose.rs generates: run \
             `CANAL_UPDATE_COMPOSE=1 cargo test -p canal-testnet compose` and commit the result",
            path.display()
        );
    }

    #[test]
    fn compose_files_are_generated() {
        check_file("docker-compose.yml", &Compose::docker().render());
        check_file("podman/compose.yml", &Compose::podman().render());
    }

    #[test]
    fn compose_podman_and_docker_agree() {
        let (d, p) = (Compose::docker(), Compose::podman());
        let names = |c: &Compose| c.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&d), ["edge1", "edge2", "edge3", "cloud1", "cloud2"]);
        assert_eq!(names(&p), ["edge1", "edge2", "cloud1"]);
        // Every podman service is a Docker service of the same name and tier, started the
        // same way: the flags differ only where the mesh differs (which peers to bootstrap
        // from, which node is last and declares the GPU).
        let core = |c: &Compose, i: usize| -> Vec<String> {
            let args = c.command(i);
            let mut out = Vec::new();
            let mut it = args.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--bootstrap" | "--gpu" => {
                        it.next();
                    }
                    _ => out.push(a.clone()),
                }
            }
            out
        };
        for (i, n) in p.nodes.iter().enumerate() {
            let j = d.nodes.iter().position(|m| m.name == n.name).unwrap();
            assert_eq!(d.nodes[j].tier, n.tier);
            assert_eq!(core(&d, j), core(&p, i), "{}", n.name);
        }
        for c in [&d, &p] {
            let all = names(c);
            for (i, n) in c.nodes.iter().enumerate() {
                let args = c.command(i);
                // It bootstraps from every other service, by name, on the peer port.
                let boots: Vec<&String> = args
                    .iter()
                    .zip(args.iter().skip(1))
                    .filter(|(a, _)| *a == "--bootstrap")
                    .map(|(_, b)| b)
                    .collect();
                assert_eq!(boots.len(), all.len() - 1, "{}", n.name);
                for other in all.iter().filter(|o| **o != n.name) {
                    let want = format!("/dns4/{other}/tcp/{PEER_PORT}");
                    assert!(boots.contains(&&want), "{} lacks {want}", n.name);
                }
                assert_eq!(n.bootstrap_expect, Some(BOOTSTRAP_EXPECT), "{}", n.name);
            }
            // Exactly one node declares the GPU: the last.
            let gpus: Vec<usize> = (0..c.nodes.len())
                .filter(|i| c.nodes[*i].gpu.is_some())
                .collect();
            assert_eq!(gpus, [c.nodes.len() - 1]);
            // Each file has both tiers and a published API and health check per service.
            let y = c.render();
            assert_eq!(
                y.matches(&format!(":{API_PORT}\"\n")).count(),
                c.nodes.len()
            );
            assert_eq!(y.matches("\"health\"").count(), c.nodes.len());
        }
    }

    #[test]
    fn compose_yaml_is_plain() {
        let y = Compose::docker().render();
        assert!(y.contains("  edge1:\n    build:\n      context: \"..\"\n"));
        assert!(y.contains("\"127.0.0.1:7071:7070\""));
        assert!(y.contains("\"127.0.0.1:7075:7070\""));
        assert!(y.contains("\"--bootstrap-expect\", \"3\""));
        assert!(y.contains("\"--gpu\", \"H100:80GiB\""));
        assert!(y.contains("  cloud2-data: {}\n"));
        let p = Compose::podman().render();
        assert!(!p.contains("build:"));
        assert!(p.contains(&format!("image: \"{PODMAN_IMAGE}\"")));
        assert!(p.contains("\"127.0.0.1::7070\""));
        assert_eq!(q("a\"b"), "\"a\\\"b\"");
    }
}

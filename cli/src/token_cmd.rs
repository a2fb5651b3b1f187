//! `canal token`: issue, list and revoke tokens through a node (admin token needed), make a
//! token key file, and mint a token offline from one.

use crate::client::{Client, UsageError, encode_segment};
use anyhow::Context;
use canal_proto::api::{TokenInfo, TokenIssued, TokenRequest};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// `canal token ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Issue a token (needs an admin token); prints the new token once.
    Create(Grant),
    /// Every issued token: id, subject, expiry, permissions, whether revoked.
    List,
    /// Revoke a token on every node (in force within a second).
    Revoke {
        /// The token's id (from `canal token list`, or `canal token create`'s answer).
        id: String,
    },
    /// Write a new token signing key to FILE (mode 0600), for `canal node --token-key FILE`.
    Keygen {
        /// Where to write the key; refused if the file exists.
        file: PathBuf,
        /// Keep FILE if it exists already (exit 0): for containers that share one key.
        #[arg(long)]
        if_missing: bool,
    },
    /// Sign a token offline with a token key file (the operator's key), no node needed.
    Mint {
        /// The token key file (`canal token keygen`, or a founding node's DATA_DIR/token-key).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        grant: Grant,
    },
}

/// What a token grants.
#[derive(Args, Debug, Clone)]
pub(crate) struct Grant {
    /// Who will hold it.
    #[arg(long = "sub")]
    subject: String,
    /// A topic filter it may publish to (repeat for more).
    #[arg(long = "pub")]
    publish: Vec<String>,
    /// A topic filter it may not publish to, whatever --pub says (deny wins).
    #[arg(long = "pub-deny")]
    publish_deny: Vec<String>,
    /// A topic filter it may subscribe with (repeat for more).
    #[arg(long = "sub-filter")]
    subscribe: Vec<String>,
    /// A topic filter it may not subscribe to, whatever --sub-filter says (deny wins).
    #[arg(long = "sub-deny")]
    subscribe_deny: Vec<String>,
    /// Admin rights: functions, triggers, settings, membership, KV, tokens, metrics.
    #[arg(long)]
    admin: bool,
    /// How long it is valid (`30d`, `12h`, `90m`).
    #[arg(long, default_value = "30d")]
    ttl: String,
}

impl Grant {
    fn request(&self) -> anyhow::Result<TokenRequest> {
        let ttl = humantime::parse_duration(&self.ttl).map_err(|e| {
            UsageError(format!(
                "--ttl {:?} is not a duration ({e}): write, for example, 30d, 12h or 90m",
                self.ttl
            ))
        })?;
        if ttl < Duration::from_secs(1) {
            return Err(UsageError(format!("--ttl {:?} is under a second", self.ttl)).into());
        }
        Ok(TokenRequest {
            subject: self.subject.clone(),
            publish: self.publish.clone(),
            publish_deny: self.publish_deny.clone(),
            subscribe: self.subscribe.clone(),
            subscribe_deny: self.subscribe_deny.clone(),
            admin: self.admin,
            ttl_s: ttl.as_secs(),
        })
    }
}

/// Runs `canal token ...`.
pub(crate) async fn run(
    api: &str,
    token: Option<&str>,
    command: TokenCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(grant) => {
            let client = Client::new(api, token)?;
            let req = grant.request()?;
            let issued: TokenIssued = client
                .post_json("/v1/tokens", serde_json::to_vec(&req)?, &[])
                .await?;
            print_issued(&issued, json)
        }
        TokenCommand::List => {
            let client = Client::new(api, token)?;
            let list: Vec<TokenInfo> = client.get("/v1/tokens").await?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header([
                "ID",
                "SUBJECT",
                "EXPIRES",
                "PUBLISH",
                "SUBSCRIBE",
                "ADMIN",
                "REVOKED",
            ]);
            for i in list {
                t.add_row([
                    i.id,
                    i.subject,
                    expiry(i.expires_ms),
                    rights(&i.publish, &i.publish_deny),
                    rights(&i.subscribe, &i.subscribe_deny),
                    yes(i.admin),
                    yes(i.revoked),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let client = Client::new(api, token)?;
            client
                .delete(&format!("/v1/tokens/{}", encode_segment(&id)))
                .await?;
            eprintln!("revoked token {id} on every node");
            Ok(())
        }
        TokenCommand::Keygen { file, if_missing } => {
            if if_missing && file.exists() {
                eprintln!("{} exists: keeping it", file.display());
                return Ok(());
            }
            let key = canal_auth::SigningKey::generate()?;
            canal_node::tokens::write_private_file(&file, &key.to_text())
                .with_context(|| format!("cannot write {} (it must not exist)", file.display()))?;
            eprintln!(
                "wrote a token key for cluster {} to {}: give it to the nodes that issue tokens with --token-key",
                canal_auth::cluster_id(&key.public()),
                file.display()
            );
            Ok(())
        }
        TokenCommand::Mint { key, grant } => {
            let key = canal_node::tokens::read_key_file(&key)?;
            let req = grant.request()?;
            let issued = mint(&key, &req)?;
            print_issued(&issued, json)
        }
    }
}

/// Signs a token for `req` with `key`, no node involved (it is recorded nowhere, so
/// `canal token list` does not show it; `canal token revoke ID` still works).
pub(crate) fn mint(
    key: &canal_auth::SigningKey,
    req: &TokenRequest,
) -> anyhow::Result<TokenIssued> {
    let filters = |what: &str, l: &[String]| -> anyhow::Result<Vec<canal_proto::TopicFilter>> {
        l.iter()
            .map(|s| {
                canal_proto::TopicFilter::new(s)
                    .map_err(|e| UsageError(format!("{what} filter {s:?}: {e}")).into())
            })
            .collect()
    };
    let now = canal_proto::time::now_ms();
    let claims = canal_auth::Claims {
        id: canal_auth::fresh_token_id()?,
        subject: req.subject.clone(),
        cluster: canal_auth::cluster_id(&key.public()),
        issued_ms: now,
        expires_ms: now.saturating_add(req.ttl_s.saturating_mul(1000)),
        publish: canal_auth::Permission {
            allow: filters("--pub", &req.publish)?,
            deny: filters("--pub-deny", &req.publish_deny)?,
        },
        subscribe: canal_auth::Permission {
            allow: filters("--sub-filter", &req.subscribe)?,
            deny: filters("--sub-deny", &req.subscribe_deny)?,
        },
        admin: req.admin,
    };
    let token = key.issue(&claims)?;
    Ok(TokenIssued {
        token,
        info: canal_node::tokens::info_of(&claims, false),
    })
}

fn print_issued(issued: &TokenIssued, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(issued)?);
    } else {
        eprintln!(
            "token {} for {:?}, expires {} (shown once; revoke with `canal token revoke {}`):",
            issued.info.id,
            issued.info.subject,
            expiry(issued.info.expires_ms),
            issued.info.id
        );
        println!("{}", issued.token);
    }
    Ok(())
}

fn expiry(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn rights(allow: &[String], deny: &[String]) -> String {
    let mut s = if allow.is_empty() {
        "-".to_string()
    } else {
        allow.join(",")
    };
    if !deny.is_empty() {
        s.push_str(&format!(" (not {})", deny.join(",")));
    }
    s
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "" }.to_string()
}

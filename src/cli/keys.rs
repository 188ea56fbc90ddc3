//! `leasehold keys …`: the coordinator's fence-signing keys. `list` and
//! `export` read the public keys (`LeaseService.PublicKeys`, no credential);
//! `rotate` and `retire` change the key set over the admin API.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use leasehold_fence::signed::{FenceVerifier, KeyId, KeyStatus, PublicKey};
use serde::Serialize;
use tonic::Code;

use super::common::{AdminArgs, ConnectArgs};
use super::exit::{FAILED as EXIT_FAILED, NOT_FOUND as EXIT_NOT_FOUND};
use super::output::{self, Failure};
use crate::proto::{self, lease_service_client::LeaseServiceClient};

/// Options of `leasehold keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the signing keys: id, status (signing, active, retired), dates, public key.
    List(ListArgs),
    /// Print the public keys as a key file for storage services (`fenced_store --verify-key FILE`).
    Export(ExportArgs),
    /// Add a new signing key; the current one stays verifiable until retired.
    Rotate(RotateArgs),
    /// Retire a key that no longer signs: storage refuses the fences it signed.
    Retire(RetireArgs),
}

/// Options of `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// One JSON object per key, one per line.
    #[arg(long)]
    pub json: bool,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Options of `keys export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Options of `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Print the new key as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options of `keys retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The key's id (8 hex digits, from `keys list`).
    pub id: String,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// The `--json` form of a key.
#[derive(Debug, Serialize)]
struct KeyJson {
    id: String,
    status: &'static str,
    public_key: String,
    created_at: String,
    created_at_unix_ms: u64,
    retired_at: Option<String>,
    retired_at_unix_ms: Option<u64>,
}

fn status_name(status: i32) -> &'static str {
    match proto::KeyStatus::try_from(status) {
        Ok(proto::KeyStatus::Signing) => "signing",
        Ok(proto::KeyStatus::Active) => "active",
        Ok(proto::KeyStatus::Retired) => "retired",
        _ => "unknown",
    }
}

fn public_text(k: &proto::PublicKey) -> String {
    PublicKey::from_bytes(&k.public_key).map_or_else(|e| format!("<{e}>"), |p| p.to_text())
}

impl From<&proto::PublicKey> for KeyJson {
    fn from(k: &proto::PublicKey) -> Self {
        let retired = (k.retired_at_unix_ms != 0).then_some(k.retired_at_unix_ms);
        KeyJson {
            id: k.key_id.clone(),
            status: status_name(k.status),
            public_key: public_text(k),
            created_at: output::rfc3339(k.created_at_unix_ms),
            created_at_unix_ms: k.created_at_unix_ms,
            retired_at: retired.map(output::rfc3339),
            retired_at_unix_ms: retired,
        }
    }
}

/// Runs a `keys` subcommand; returns the exit code.
pub async fn run(args: KeysArgs) -> anyhow::Result<i32> {
    match args.command {
        KeysCommand::List(a) => list(a).await,
        KeysCommand::Export(a) => export(a).await,
        KeysCommand::Rotate(a) => rotate(a).await,
        KeysCommand::Retire(a) => retire(a).await,
    }
}

/// The coordinator's public keys, fetched once (`PublicKeys`).
pub async fn fetch(connect: &ConnectArgs) -> anyhow::Result<Vec<proto::PublicKey>> {
    let channel = connect.connect().await?;
    let keys = LeaseServiceClient::new(channel)
        .public_keys(proto::PublicKeysRequest {})
        .await
        .map_err(|s| Failure::from_status(&s, &connect.server))?
        .into_inner()
        .keys;
    Ok(keys)
}

/// A verifier holding `keys` (retired ones marked retired). Fails on a key
/// that is not a valid Ed25519 public key or whose id is not its own.
pub fn verifier(keys: &[proto::PublicKey]) -> anyhow::Result<FenceVerifier> {
    let mut verifier = FenceVerifier::new();
    for k in keys {
        let public = PublicKey::from_bytes(&k.public_key)
            .map_err(|e| anyhow::anyhow!("the coordinator's key {}: {e}", k.key_id))?;
        anyhow::ensure!(
            public.id().to_string() == k.key_id,
            "the coordinator's key {} has the id {}: is it a leasehold coordinator of this version?",
            k.key_id,
            public.id()
        );
        let status = match proto::KeyStatus::try_from(k.status) {
            Ok(proto::KeyStatus::Retired) => KeyStatus::Retired,
            _ => KeyStatus::Active,
        };
        verifier.insert(public, status);
    }
    Ok(verifier)
}

async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let keys = fetch(&args.connect).await?;
    if args.json {
        for k in &keys {
            output::print_json(&KeyJson::from(k))?;
        }
        return Ok(0);
    }
    if keys.is_empty() {
        println!("the coordinator has no signing keys");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.key_id.clone(),
                status_name(k.status).to_owned(),
                output::rfc3339(k.created_at_unix_ms),
                if k.retired_at_unix_ms == 0 {
                    "-".to_owned()
                } else {
                    output::rfc3339(k.retired_at_unix_ms)
                },
                public_text(k),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["ID", "STATUS", "CREATED", "RETIRED", "PUBLIC KEY"], &rows)
    );
    Ok(0)
}

async fn export(args: ExportArgs) -> anyhow::Result<i32> {
    let keys = fetch(&args.connect).await?;
    print!("{}", verifier(&keys)?.to_key_file());
    Ok(0)
}

async fn rotate(args: RotateArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let key = client
        .rotate_key(proto::RotateKeyRequest {})
        .await
        .map_err(|s| Failure::from_status(&s, &args.admin.connect.server))?
        .into_inner()
        .key
        .unwrap_or_default();
    if args.json {
        output::print_json(&KeyJson::from(&key))?;
    } else {
        println!(
            "rotated: {} now signs new fences; older keys stay verifiable until `leasehold keys retire ID`",
            key.key_id
        );
    }
    Ok(0)
}

async fn retire(args: RetireArgs) -> anyhow::Result<i32> {
    let id: KeyId = args
        .id
        .parse()
        .map_err(|e| Failure::new(EXIT_FAILED, format!("{e}")))?;
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::new(
                EXIT_FAILED,
                "refusing to retire without confirmation: stdin is not a terminal; pass --yes",
            )
            .into());
        }
        let question = format!(
            "retire key {id}? Storage that knows it is retired refuses every fence it signed"
        );
        if !super::leases::confirm(&question)? {
            return Err(Failure::new(EXIT_FAILED, "not retired").into());
        }
    }
    let mut client = args.admin.client().await?;
    let reply = client
        .retire_key(proto::RetireKeyRequest {
            key_id: id.to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            Code::NotFound => Failure::new(EXIT_NOT_FOUND, s.message().to_owned()),
            Code::FailedPrecondition => Failure::new(EXIT_FAILED, s.message().to_owned()),
            _ => Failure::from_status(&s, &args.admin.connect.server),
        })?
        .into_inner();
    if reply.retired {
        println!("retired {id}: storage services refuse its fences once they know (`leasehold keys export`)");
    } else {
        println!("{id} was already retired");
    }
    Ok(0)
}

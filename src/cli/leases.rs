//! `leasehold leases …`: what operators do with live leases (list, get,
//! revoke, watch, history), over the admin API. Lease ids are never shown:
//! operators revoke by resource, guarded by the token they saw.

use std::io::{BufRead, IsTerminal, Write};

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::Code;

use super::common::{AdminArgs, AdminClient};
use super::exit::{FAILED as EXIT_FAILED, NOT_FOUND as EXIT_NOT_FOUND};
use super::output::{self, Failure, LeaseJson};
use crate::proto;

/// Options of `leasehold leases`.
#[derive(Debug, Args)]
pub struct LeasesArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: LeasesCommand,
}

/// The `leases` subcommands.
#[derive(Debug, Subcommand)]
pub enum LeasesCommand {
    /// List live leases in resource order (a table, or JSON lines with --json).
    List(ListArgs),
    /// Show the live lease on one resource (exit 3 if it is free).
    Get(GetArgs),
    /// Free a resource at once; its holder's next renew gets NOT_FOUND.
    Revoke(RevokeArgs),
    /// Print lease events (acquired, released, expired, revoked) as they happen.
    Watch(WatchArgs),
    /// The last grants on a resource, newest first: who held it, with which token, when.
    History(HistoryArgs),
}

/// Options of `leases list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only resources starting with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// One JSON object per lease, one per line.
    #[arg(long)]
    pub json: bool,
    /// Leases fetched per request.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: u32,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options of `leases get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The resource.
    pub resource: String,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options of `leases revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The resource to free.
    pub resource: String,
    /// Revoke only if the lease still carries this token.
    #[arg(long)]
    pub token: Option<u64>,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print the revoked lease as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options of `leases watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only resources starting with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Also print renewals (busy servers renew a lot).
    #[arg(long)]
    pub renewals: bool,
    /// One JSON object per event, one per line.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options of `leases history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The resource.
    pub resource: String,
    /// At most this many grants (0: all the server keeps).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// One JSON object per grant, one per line.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs a `leases` subcommand; returns the exit code.
pub async fn run(args: LeasesArgs) -> anyhow::Result<i32> {
    match args.command {
        LeasesCommand::List(a) => list(a).await,
        LeasesCommand::Get(a) => get(a).await,
        LeasesCommand::Revoke(a) => revoke(a).await,
        LeasesCommand::Watch(a) => watch(a).await,
        LeasesCommand::History(a) => history(a).await,
    }
}

fn fail(status: tonic::Status, admin: &AdminArgs) -> anyhow::Error {
    Failure::from_status(&status, &admin.connect.server).into()
}

async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let mut rows = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_leases(proto::ListLeasesRequest {
                prefix: args.prefix.clone(),
                page_size: args.page_size,
                page_token: page_token.clone(),
            })
            .await
            .map_err(|s| fail(s, &args.admin))?
            .into_inner();
        for lease in &page.leases {
            if args.json {
                output::print_json(&LeaseJson::from(lease))?;
            } else {
                rows.push(output::lease_row(lease));
            }
        }
        // Tokens are resource names and only move forward, so this ends.
        if page.next_page_token.is_empty() || page.next_page_token <= page_token {
            break;
        }
        page_token = page.next_page_token;
    }
    if !args.json {
        if rows.is_empty() {
            println!("no live leases{}", prefix_note(&args.prefix));
        } else {
            print!("{}", output::table(&output::LEASE_HEADERS, &rows));
        }
    }
    Ok(0)
}

fn prefix_note(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!(" under prefix {prefix:?}")
    }
}

/// The live lease on exactly `resource`, if any.
async fn find(
    client: &mut AdminClient,
    admin: &AdminArgs,
    resource: &str,
) -> anyhow::Result<Option<proto::LeaseInfo>> {
    // `resource` sorts before every other name it prefixes, so it comes first.
    let page = client
        .list_leases(proto::ListLeasesRequest {
            prefix: resource.to_owned(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .map_err(|s| fail(s, admin))?
        .into_inner();
    Ok(page.leases.into_iter().find(|l| l.resource == resource))
}

async fn get(args: GetArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let Some(lease) = find(&mut client, &args.admin, &args.resource).await? else {
        return Err(Failure::new(EXIT_NOT_FOUND, format!("{} is not held", args.resource)).into());
    };
    if args.json {
        output::print_json(&LeaseJson::from(&lease))?;
    } else {
        let rows = [
            ("resource", lease.resource.clone()),
            ("holder", lease.holder.clone()),
            ("token", lease.token.to_string()),
            ("ttl", output::duration_ms(lease.ttl_ms)),
            ("expires in", output::duration_ms(lease.expires_in_ms)),
            (
                "acquired at",
                format!(
                    "{} ({})",
                    output::rfc3339(lease.acquired_at_unix_ms),
                    output::ago(lease.acquired_at_unix_ms)
                ),
            ),
            ("renewals", lease.renew_count.to_string()),
            ("waiters", lease.waiters.to_string()),
        ];
        for (k, v) in rows {
            println!("{k:<12} {v}");
        }
    }
    Ok(0)
}

/// Asks on the terminal; `Ok(false)` when the operator says no.
pub(crate) fn confirm(question: &str) -> anyhow::Result<bool> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{question} [y/N] ")?;
    stderr.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let Some(lease) = find(&mut client, &args.admin, &args.resource).await? else {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!("{} is not held; nothing to revoke", args.resource),
        )
        .into());
    };
    if let Some(want) = args.token {
        if want != lease.token {
            return Err(Failure::new(
                EXIT_NOT_FOUND,
                format!(
                    "{} is held by {} with token {}, not {want}; nothing revoked",
                    lease.resource, lease.holder, lease.token
                ),
            )
            .into());
        }
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::new(
                EXIT_FAILED,
                "refusing to revoke without confirmation: stdin is not a terminal; pass --yes",
            )
            .into());
        }
        let question = format!(
            "revoke lease on {} held by {} (token {})?",
            lease.resource, lease.holder, lease.token
        );
        if !confirm(&question)? {
            return Err(Failure::new(EXIT_FAILED, "not revoked").into());
        }
    }
    // Revoke exactly the lease that was shown (or confirmed), never a newer one.
    let reply = client
        .revoke(proto::RevokeRequest {
            resource: args.resource.clone(),
            lease_id: String::new(),
            token: lease.token,
        })
        .await
        .map_err(|s| fail(s, &args.admin))?
        .into_inner();
    match reply.lease.filter(|_| reply.revoked) {
        Some(revoked) => {
            if args.json {
                output::print_json(&LeaseJson::from(&revoked))?;
            } else {
                println!(
                    "revoked {} (holder {}, token {})",
                    revoked.resource, revoked.holder, revoked.token
                );
            }
            Ok(0)
        }
        None => Err(Failure::new(
            EXIT_NOT_FOUND,
            format!(
                "the lease on {} (token {}) ended or changed before the revoke; nothing revoked",
                args.resource, lease.token
            ),
        )
        .into()),
    }
}

/// The `--json` form of a watch event.
#[derive(Debug, Serialize)]
struct EventJson {
    sequence: u64,
    kind: &'static str,
    lease: LeaseJson,
}

fn event_kind(kind: i32) -> &'static str {
    match proto::EventKind::try_from(kind) {
        Ok(proto::EventKind::Acquired) => "acquired",
        Ok(proto::EventKind::Released) => "released",
        Ok(proto::EventKind::Expired) => "expired",
        Ok(proto::EventKind::Revoked) => "revoked",
        Ok(proto::EventKind::Renewed) => "renewed",
        _ => "unknown",
    }
}

async fn watch(args: WatchArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let mut stream = client
        .watch(proto::WatchRequest {
            prefix: args.prefix.clone(),
            include_renewals: args.renewals,
        })
        .await
        .map_err(|s| fail(s, &args.admin))?
        .into_inner();
    eprintln!(
        "watching leases{} at {} (ctrl-c to stop)",
        prefix_note(&args.prefix),
        args.admin.connect.server
    );
    loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let event = match next {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(Failure::unreachable("the server ended the watch").into());
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                return Err(Failure::new(EXIT_FAILED, s.message().to_owned()).into());
            }
            Err(s) => return Err(fail(s, &args.admin)),
        };
        let kind = event_kind(event.kind);
        let lease = event.lease.unwrap_or_default();
        if args.json {
            output::print_json(&EventJson {
                sequence: event.sequence,
                kind,
                lease: LeaseJson::from(&lease),
            })?;
        } else {
            println!(
                "#{:<6} {kind:<8}  {}  holder={} token={} ttl={}",
                event.sequence,
                lease.resource,
                lease.holder,
                lease.token,
                output::duration_ms(lease.ttl_ms)
            );
        }
    }
}

/// The `--json` form of a past grant.
#[derive(Debug, Serialize)]
struct GrantJson {
    token: u64,
    holder: String,
    ttl_ms: u64,
    acquired_at: String,
    acquired_at_unix_ms: u64,
    ended: &'static str,
    ended_at: Option<String>,
    ended_at_unix_ms: Option<u64>,
}

fn end_kind(kind: i32) -> &'static str {
    match proto::EndKind::try_from(kind) {
        Ok(proto::EndKind::Live) => "live",
        Ok(proto::EndKind::Released) => "released",
        Ok(proto::EndKind::Expired) => "expired",
        Ok(proto::EndKind::Revoked) => "revoked",
        _ => "unknown",
    }
}

async fn history(args: HistoryArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let grants = client
        .history(proto::HistoryRequest {
            resource: args.resource.clone(),
            limit: args.limit,
        })
        .await
        .map_err(|s| fail(s, &args.admin))?
        .into_inner()
        .grants;
    if args.json {
        for g in &grants {
            let ended = (g.ended_at_unix_ms != 0).then_some(g.ended_at_unix_ms);
            output::print_json(&GrantJson {
                token: g.token,
                holder: g.holder.clone(),
                ttl_ms: g.ttl_ms,
                acquired_at: output::rfc3339(g.acquired_at_unix_ms),
                acquired_at_unix_ms: g.acquired_at_unix_ms,
                ended: end_kind(g.ended),
                ended_at: ended.map(output::rfc3339),
                ended_at_unix_ms: ended,
            })?;
        }
        return Ok(0);
    }
    if grants.is_empty() {
        println!("no grants recorded on {}", args.resource);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            let (ended_at, held) = if g.ended_at_unix_ms == 0 {
                (
                    "-".to_owned(),
                    format!(
                        "{} so far",
                        output::duration_ms(output::elapsed_ms(g.acquired_at_unix_ms))
                    ),
                )
            } else {
                (
                    output::rfc3339(g.ended_at_unix_ms),
                    output::duration_ms(g.ended_at_unix_ms.saturating_sub(g.acquired_at_unix_ms)),
                )
            };
            vec![
                g.token.to_string(),
                g.holder.clone(),
                output::rfc3339(g.acquired_at_unix_ms),
                ended_at,
                end_kind(g.ended).to_owned(),
                held,
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "TOKEN",
                "HOLDER",
                "ACQUIRED AT",
                "ENDED AT",
                "HOW",
                "HELD FOR"
            ],
            &rows
        )
    );
    Ok(0)
}

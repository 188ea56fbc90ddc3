//! `leasehold status`: the coordinator's figures (Stats), for a quick look
//! or, with `--json`, for a monitoring script.

use clap::Args;
use serde::Serialize;

use super::common::AdminArgs;
use super::output::{self, Failure};
use crate::proto;

/// Options of `leasehold status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
    /// Server and credentials.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// The `--json` form; field names are stable (README, "For operators").
#[derive(Debug, Serialize)]
struct StatusJson {
    server: String,
    live_leases: u64,
    waiters: u64,
    token_high_water: u64,
    grants: u64,
    renewals: u64,
    releases: u64,
    expiries: u64,
    revocations: u64,
    uptime_ms: u64,
    data_size_bytes: u64,
    commit_batches: u64,
}

/// Runs `leasehold status`; returns the exit code.
pub async fn run(args: StatusArgs) -> anyhow::Result<i32> {
    let mut client = args.admin.client().await?;
    let s = client
        .stats(proto::StatsRequest {})
        .await
        .map_err(|s| Failure::from_status(&s, &args.admin.connect.server))?
        .into_inner();
    if args.json {
        output::print_json(&StatusJson {
            server: args.admin.connect.server.clone(),
            live_leases: s.live_leases,
            waiters: s.waiters,
            token_high_water: s.token_high_water,
            grants: s.grants,
            renewals: s.renewals,
            releases: s.releases,
            expiries: s.expiries,
            revocations: s.revocations,
            uptime_ms: s.uptime_ms,
            data_size_bytes: s.data_size_bytes,
            commit_batches: s.commit_batches,
        })?;
        return Ok(0);
    }
    let rows = [
        ("server", args.admin.connect.server.clone()),
        ("uptime", output::duration_ms(s.uptime_ms)),
        ("live leases", s.live_leases.to_string()),
        ("waiters", s.waiters.to_string()),
        ("token high-water", s.token_high_water.to_string()),
        ("grants", s.grants.to_string()),
        ("renewals", s.renewals.to_string()),
        ("releases", s.releases.to_string()),
        ("expiries", s.expiries.to_string()),
        ("revocations", s.revocations.to_string()),
        ("data on disk", output::bytes(s.data_size_bytes)),
        ("commit batches", s.commit_batches.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<17} {v}");
    }
    Ok(0)
}

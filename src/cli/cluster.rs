//! `leasehold cluster`: a cluster's members, leader and progress
//! (`status`), and membership changes (`add`, `remove`). Status answers for
//! the node asked; add and remove are forwarded to the leader.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::common::ConnectArgs;
use super::output::Failure;
use crate::proto;
use crate::proto::cluster_service_client::ClusterServiceClient;

/// Options of `leasehold cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// The `cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, term, log and applied index, and each member's lag (as the node asked sees it).
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
        /// Server and credentials.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Adds a node (started with `serve --node-id ID --join`): first as a
    /// learner until it has caught up, then as a voter.
    Add {
        /// `ID=URL`, for example `4=http://10.0.0.4:7420`.
        member: String,
        /// Server and credentials.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Removes a node from the cluster.
    Remove {
        /// The node's id.
        id: u64,
        /// Server and credentials.
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// The `--json` form of `cluster status`; field names are stable.
#[derive(Debug, Serialize)]
struct StatusJson {
    node_id: u64,
    state: String,
    term: u64,
    leader_id: Option<u64>,
    leader_address: Option<String>,
    last_log_index: u64,
    applied_index: u64,
    snapshot_index: u64,
    serving: bool,
    members: Vec<MemberJson>,
}

#[derive(Debug, Serialize)]
struct MemberJson {
    node_id: u64,
    address: String,
    voter: bool,
    /// Entries the member is behind the leader's log (leader only).
    lag: Option<u64>,
}

/// Runs `leasehold cluster`; returns the exit code.
pub async fn run(args: ClusterArgs) -> anyhow::Result<i32> {
    let connect = match &args.command {
        ClusterCommand::Status { connect, .. }
        | ClusterCommand::Add { connect, .. }
        | ClusterCommand::Remove { connect, .. } => connect.clone(),
    };
    let server = connect.server.clone();
    let mut client = ClusterServiceClient::new(connect.connect().await?);
    let failed = |s: tonic::Status| Failure::from_status(&s, &server);
    match args.command {
        ClusterCommand::Status { json, .. } => {
            let s = client
                .status(proto::ClusterStatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            print_status(&s, json)?;
        }
        ClusterCommand::Add { member, .. } => {
            let (id, address) = member
                .split_once('=')
                .and_then(|(id, url)| Some((id.trim().parse::<u64>().ok()?, url.trim().to_owned())))
                .ok_or_else(|| {
                    anyhow::anyhow!("{member:?} is not ID=URL (example: 4=http://10.0.0.4:7420)")
                })?;
            let m = client
                .add_member(proto::AddMemberRequest {
                    node_id: id,
                    address,
                })
                .await
                .map_err(failed)?
                .into_inner();
            println!("voters {:?} learners {:?}", m.voters, m.learners);
        }
        ClusterCommand::Remove { id, .. } => {
            let m = client
                .remove_member(proto::RemoveMemberRequest { node_id: id })
                .await
                .map_err(failed)?
                .into_inner();
            println!("voters {:?} learners {:?}", m.voters, m.learners);
        }
    }
    Ok(0)
}

fn print_status(s: &proto::ClusterStatusResponse, json: bool) -> anyhow::Result<()> {
    let lag = |m: &proto::Member| {
        m.matched_known
            .then(|| s.last_log_index.saturating_sub(m.matched_index))
    };
    if json {
        return super::output::print_json(&StatusJson {
            node_id: s.node_id,
            state: s.state.clone(),
            term: s.term,
            leader_id: (s.leader_id != 0).then_some(s.leader_id),
            leader_address: (!s.leader_address.is_empty()).then(|| s.leader_address.clone()),
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            serving: s.serving,
            members: s
                .members
                .iter()
                .map(|m| MemberJson {
                    node_id: m.node_id,
                    address: m.address.clone(),
                    voter: m.voter,
                    lag: lag(m),
                })
                .collect(),
        });
    }
    let leader = if s.leader_id == 0 {
        "none known".to_owned()
    } else {
        format!("{} ({})", s.leader_id, s.leader_address)
    };
    let rows = [
        ("node", s.node_id.to_string()),
        ("state", s.state.clone()),
        ("term", s.term.to_string()),
        ("leader", leader),
        ("last log index", s.last_log_index.to_string()),
        ("applied index", s.applied_index.to_string()),
        ("snapshot index", s.snapshot_index.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
    println!();
    println!("{:<6} {:<8} {:<10} ADDRESS", "ID", "ROLE", "LAG");
    for m in &s.members {
        let lag = lag(m).map_or_else(|| "-".to_owned(), |l| l.to_string());
        let role = if m.voter { "voter" } else { "learner" };
        println!("{:<6} {role:<8} {lag:<10} {}", m.node_id, m.address);
    }
    Ok(())
}

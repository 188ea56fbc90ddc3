//! The processes the harness runs, and the coordinator they make up: one
//! `leasehold serve`, or (`--cluster`) three nodes of a Raft cluster whose
//! every node-to-node link goes through a [`Proxy`] the harness can break.
//!
//! Every process is killed when its handle is dropped (also on panic or
//! interrupt), and keeps its address across restarts: workers and peers
//! find it again where it was.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::Rng;
use rustix::process::{kill_process as kill, Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::proxy::{Mode, Proxy};

/// A child process, killed when dropped (also on panic or interrupt).
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: Option<tokio::io::Lines<BufReader<ChildStdout>>>,
}

impl Proc {
    /// A process whose output the harness does not read.
    pub fn new(name: String, child: Child) -> Proc {
        Proc {
            name,
            child,
            _stdout: None,
        }
    }

    pub fn pid(&self) -> anyhow::Result<Pid> {
        let id = self
            .child
            .id()
            .with_context(|| format!("{} has exited", self.name))?;
        Pid::from_raw(id as i32).with_context(|| format!("{} has no pid", self.name))
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(self.pid()?, sig).with_context(|| format!("cannot send {sig:?} to {}", self.name))
    }

    /// `kill -9`, and reap it.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    /// SIGTERM, then `kill -9` after `grace`. Whether it exited 0 by itself.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        if self.signal(Signal::TERM).is_err() {
            return false;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                self.kill9().await;
                false
            }
        }
    }
}

/// Starts a server process that prints `listening on ADDR` first.
pub async fn spawn_server(
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut proc = Proc::new(name.to_owned(), child);
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    let addr = match line {
        Ok(Ok(Some(line))) => line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{name}: unexpected first line {line:?}"))?,
        _ => {
            proc.kill9().await;
            bail!("{name} did not report its address (see its log)");
        }
    };
    proc._stdout = Some(lines);
    Ok((proc, addr))
}

/// Starts a server on a fixed address, retrying while the port is still
/// taken (50 × 100 ms at most).
pub async fn respawn_at(
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Proc> {
    let mut last = None;
    for _ in 0..50 {
        match spawn_server(name, program, args, log).await {
            Ok((proc, _)) => return Ok(proc),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} did not start")))
}

/// The coordinator: one node, or a three-node cluster.
pub struct Coordinators {
    program: PathBuf,
    nodes: Vec<Proc>,
    /// Each node's address, the same across restarts.
    pub addrs: Vec<SocketAddr>,
    /// Each node's command line (with its fixed address).
    args: Vec<Vec<String>>,
    logs: Vec<PathBuf>,
    /// `links[i][j]`: node `i`'s only way to node `j` (cluster only).
    links: Vec<Vec<Option<Proxy>>>,
}

impl Coordinators {
    /// Starts one node (data in `out/coordinator`), or with `cluster` three
    /// (`out/coordinator/nN`) that form a cluster through their links.
    pub async fn start(program: &Path, out: &Path, cluster: bool) -> anyhow::Result<Self> {
        let data = out.join("coordinator");
        let serve = |listen: &str, data: &Path| {
            vec![
                "serve".to_owned(),
                "--listen".to_owned(),
                listen.to_owned(),
                "--data-dir".to_owned(),
                data.to_string_lossy().into_owned(),
            ]
        };
        let mut c = Coordinators {
            program: program.to_owned(),
            nodes: Vec::new(),
            addrs: Vec::new(),
            args: Vec::new(),
            logs: Vec::new(),
            links: Vec::new(),
        };
        if !cluster {
            let log = out.join("logs/coordinator.log");
            let (proc, addr) =
                spawn_server("coordinator", program, &serve("127.0.0.1:0", &data), &log).await?;
            c.nodes.push(proc);
            c.args.push(serve(&addr.to_string(), &data));
            c.addrs.push(addr);
            c.logs.push(log);
            return Ok(c);
        }
        // Fixed ports, known before any node starts: every node's peer list
        // names them (through the links). Held together, so they differ.
        let probes: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        c.addrs = probes
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        drop(probes);
        for i in 0..3 {
            let mut row = Vec::new();
            let mut peers = Vec::new();
            for j in 0..3 {
                if i == j {
                    row.push(None);
                    peers.push(format!("{}=http://{}", j + 1, c.addrs[j]));
                } else {
                    let link = Proxy::start(c.addrs[j]).await?;
                    peers.push(format!("{}=http://{}", j + 1, link.addr));
                    row.push(Some(link));
                }
            }
            c.links.push(row);
            let mut args = serve(&c.addrs[i].to_string(), &data.join(format!("n{}", i + 1)));
            args.extend([
                "--node-id".to_owned(),
                (i + 1).to_string(),
                "--peers".to_owned(),
                peers.join(","),
            ]);
            c.args.push(args);
            c.logs.push(out.join(format!("logs/node-{}.log", i + 1)));
        }
        for i in 0..3 {
            let proc = respawn_at(&c.name(i), program, &c.args[i], &c.logs[i]).await?;
            c.nodes.push(proc);
        }
        Ok(c)
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    fn name(&self, i: usize) -> String {
        if self.args.len() == 1 {
            "coordinator".to_owned()
        } else {
            format!("node {}", i + 1)
        }
    }

    /// The node serving as leader now (the only node, without a cluster);
    /// `None` if no node says so within 300 ms.
    pub async fn leader(&self) -> Option<usize> {
        use leasehold::proto::{
            cluster_service_client::ClusterServiceClient, ClusterStatusRequest,
        };
        if self.len() == 1 {
            return Some(0);
        }
        for (i, addr) in self.addrs.iter().enumerate() {
            let ask = async {
                let mut c = ClusterServiceClient::connect(format!("http://{addr}")).await?;
                let s = c
                    .status(ClusterStatusRequest::default())
                    .await?
                    .into_inner();
                anyhow::Ok(s.serving)
            };
            if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_millis(300), ask).await {
                return Some(i);
            }
        }
        None
    }

    /// A node to strike, with its description: in a cluster the leader if
    /// `leader` (waiting up to 2 s for one to be known), any node otherwise.
    pub async fn pick(&self, rng: &mut StdRng, leader: bool) -> (usize, String) {
        let any = rng.random_range(0..self.len());
        if self.len() == 1 {
            return (0, self.name(0));
        }
        let mut known = self.leader().await;
        // Bounded: 20 tries, 100 ms apart (an election takes about 1 s).
        for _ in 0..20 {
            if known.is_some() || !leader {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            known = self.leader().await;
        }
        let i = known.filter(|_| leader).unwrap_or(any);
        let role = if known == Some(i) {
            "leader"
        } else {
            "follower"
        };
        (i, format!("{} ({role})", self.name(i)))
    }

    /// Sends `sig` to node `i`.
    pub fn signal(&self, i: usize, sig: Signal) -> anyhow::Result<()> {
        self.nodes[i].signal(sig)
    }

    /// `kill -9` of node `i`, `down` of downtime, and a restart on the same
    /// address and data.
    pub async fn kill_and_restart(&mut self, i: usize, down: Duration) -> anyhow::Result<()> {
        self.nodes[i].kill9().await;
        tokio::time::sleep(down).await;
        self.nodes[i] =
            respawn_at(&self.name(i), &self.program, &self.args[i], &self.logs[i]).await?;
        Ok(())
    }

    /// Cuts node `i` off from the other nodes (`Mode::Up` heals it). The
    /// workers still reach it.
    pub fn partition(&self, i: usize, mode: Mode) {
        for (a, row) in self.links.iter().enumerate() {
            for (b, link) in row.iter().enumerate() {
                if let Some(link) = link.as_ref().filter(|_| a == i || b == i) {
                    link.set(mode);
                }
            }
        }
    }

    /// SIGTERMs every node; what went wrong, if anything.
    pub async fn terminate(&mut self, grace: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for node in &mut self.nodes {
            if !node.terminate(grace).await {
                problems.push(format!(
                    "{} did not exit 0 on SIGTERM within {grace:?}",
                    node.name
                ));
            }
        }
        problems
    }
}

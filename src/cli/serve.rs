//! `leasehold serve`: run the coordinator until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::auth::AdminToken;
use crate::clock::Clock;
use crate::coordinator::Config;
use crate::keys::KeyOptions;
use crate::lease::Bounds;
use crate::server::{self, ServerConfig};
use crate::state::TableLimits;
use crate::store::StoreOptions;
use crate::tls::ServerTlsFiles;

/// Options of `leasehold serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7420", env = "LEASEHOLD_LISTEN")]
    pub listen: String,
    /// Directory for the store (created if missing).
    #[arg(long, default_value = "./leasehold-data", env = "LEASEHOLD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Shortest TTL a lease may ask for.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    pub min_ttl: Duration,
    /// Longest TTL a lease may ask for.
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    pub max_ttl: Duration,
    /// Longest an Acquire may wait in line.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub max_wait: Duration,
    /// How long idempotency keys are kept at least.
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    pub request_retention: Duration,
    /// Most live leases at once.
    #[arg(long, default_value_t = TableLimits::default().max_leases)]
    pub max_leases: usize,
    /// Most waiters queued on one resource.
    #[arg(long, default_value_t = TableLimits::default().max_waiters_per_resource)]
    pub max_waiters_per_resource: usize,
    /// Most waiters queued in all.
    #[arg(long, default_value_t = TableLimits::default().max_waiters)]
    pub max_waiters: usize,
    /// Past grants kept per resource for `leases history`.
    #[arg(long, default_value_t = StoreOptions::default().history_per_resource)]
    pub history: usize,
    /// Largest request message, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = server::TransportLimits::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Most calls open at once on one connection (HTTP/2 max concurrent streams).
    #[arg(long, default_value_t = server::TransportLimits::default().max_streams_per_connection)]
    pub max_streams_per_connection: u32,
    /// The server's TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "LEASEHOLD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "LEASEHOLD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS; needs --tls-cert).
    #[arg(long, env = "LEASEHOLD_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// A file holding the admin token; admin calls must then send
    /// `authorization: Bearer <token>`.
    #[arg(long, env = "LEASEHOLD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API without a token on a non-loopback address
    /// (anyone who can connect may revoke leases).
    #[arg(long)]
    pub insecure_admin: bool,
    /// The signing key file (default DATA_DIR/signing-keys); created with a
    /// new key only when the data directory is new.
    #[arg(long, env = "LEASEHOLD_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Create the signing key file if it is missing even though the data
    /// directory is not new (storage must then be given the new public key).
    #[arg(long)]
    pub create_signing_key: bool,
    /// Send leases without a signed fence (saves one Ed25519 signature per
    /// grant; only for storage that does not verify signed fences).
    #[arg(long)]
    pub no_signed_fences: bool,
    /// Also serve /metrics, /healthz, /readyz and the lease page over HTTP
    /// on this address (`--http` alone: 127.0.0.1:7480); TLS and the admin
    /// token apply.
    #[arg(long, env = "LEASEHOLD_HTTP", num_args = 0..=1, default_missing_value = "127.0.0.1:7480")]
    pub http: Option<String>,
    /// Cluster: this node's id (with --peers or --join).
    #[arg(long, env = "LEASEHOLD_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster: every initial member, this node included, as
    /// `1=http://host:port,2=...`; the same list on every node. Without it
    /// (and without --join) the server is a single node.
    #[arg(long, env = "LEASEHOLD_PEERS", value_parser = parse_peer, value_delimiter = ',')]
    pub peers: Vec<(u64, String)>,
    /// Cluster: start empty and wait to be added with `leasehold cluster add`.
    #[arg(long, requires = "node_id")]
    pub join: bool,
    /// Cluster: T, where a follower that hears nothing from the leader for
    /// 3 T to 4 T starts an election (openraft's leader lease of 2 T, then a
    /// random T to 2 T).
    #[arg(long, default_value = "250ms", value_parser = super::parse_duration)]
    pub election_timeout: Duration,
    /// Cluster: how often the leader sends heartbeats (at most half the
    /// election timeout). openraft also gives each AppendEntries this long
    /// to be answered, so it must cover a batch's transfer and fsync on a
    /// busy follower.
    #[arg(long, default_value = "125ms", value_parser = super::parse_duration)]
    pub heartbeat: Duration,
    /// Cluster: longest a write or a leadership check may take before the
    /// call is answered UNAVAILABLE.
    #[arg(long, default_value = "3s", value_parser = super::parse_duration)]
    pub commit_timeout: Duration,
    /// Cluster: take a snapshot (and compact the log) once this many
    /// entries were applied since the last one and the log written since is
    /// at least as large as that snapshot.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_every: u64,
    /// Cluster: the CA that signed the other members' certificates (for
    /// `https://` peers; default: --client-ca, else the system's roots).
    /// Under mTLS a node presents --tls-cert/--tls-key to its peers.
    #[arg(long, env = "LEASEHOLD_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
}

/// Parses one `ID=URL` of `--peers`.
fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=URL (example: 1=http://10.0.0.1:7420)"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{id:?} in {s:?} is not a node id (a number above 0)"))?;
    if id == 0 {
        return Err(format!("node ids start at 1 ({s:?})"));
    }
    let url = url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{url:?} must start with http:// or https:// (example: 1=http://10.0.0.1:7420)"
        ));
    }
    Ok((id, url.to_owned()))
}

impl ServeArgs {
    /// The server configuration these options describe.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        anyhow::ensure!(
            self.min_ttl <= self.max_ttl && !self.min_ttl.is_zero(),
            "--min-ttl must be above zero and at most --max-ttl"
        );
        anyhow::ensure!(
            self.max_message_bytes >= 1024,
            "--max-message-bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.max_streams_per_connection >= 1,
            "--max-streams-per-connection must be at least 1"
        );
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            _ => None,
        };
        // Load now, so a bad path stops the server before it listens.
        if let Some(tls) = &tls {
            tls.load()?;
        }
        let admin_token = self
            .admin_token_file
            .as_deref()
            .map(AdminToken::from_file)
            .transpose()?;
        let cluster = self.cluster(tls.as_ref())?;
        Ok(ServerConfig {
            cluster,
            tls,
            admin_token,
            insecure_admin: self.insecure_admin,
            metrics: if self.http.is_some() {
                crate::metrics::Metrics::enabled()
            } else {
                crate::metrics::Metrics::disabled()
            },
            limits: server::TransportLimits {
                max_message_bytes: self.max_message_bytes,
                max_streams_per_connection: self.max_streams_per_connection,
            },
            data_dir: self.data_dir.clone(),
            keys: KeyOptions {
                path: self.signing_key.clone(),
                create: self.create_signing_key,
                no_signed_fences: self.no_signed_fences,
            },
            coordinator: Config {
                bounds: Bounds {
                    min_ttl: self.min_ttl,
                    max_ttl: self.max_ttl,
                    max_wait: self.max_wait,
                },
                limits: TableLimits {
                    request_retention: self.request_retention,
                    max_leases: self.max_leases,
                    max_waiters_per_resource: self.max_waiters_per_resource,
                    max_waiters: self.max_waiters,
                },
                store: StoreOptions {
                    history_per_resource: self.history.max(1),
                    ..StoreOptions::default()
                },
                clock: Clock::start(),
            },
        })
    }
}

impl ServeArgs {
    fn cluster(
        &self,
        tls: Option<&ServerTlsFiles>,
    ) -> anyhow::Result<Option<crate::raft::ClusterConfig>> {
        if self.peers.is_empty() && !self.join {
            anyhow::ensure!(
                self.node_id.is_none(),
                "--node-id needs --peers (or --join); without them the server is a single node"
            );
            return Ok(None);
        }
        let node_id = self
            .node_id
            .context("--peers needs --node-id: which of the peers this node is")?;
        let peers: std::collections::BTreeMap<u64, String> = self.peers.iter().cloned().collect();
        anyhow::ensure!(
            peers.len() == self.peers.len(),
            "--peers names a node id twice"
        );
        anyhow::ensure!(
            self.heartbeat * 2 <= self.election_timeout && !self.heartbeat.is_zero(),
            "--heartbeat must be above zero and at most half of --election-timeout"
        );
        let peer_tls = match tls {
            None => None,
            Some(tls) => Some(
                crate::tls::ClientTlsFiles {
                    ca_cert: self.peer_ca.clone().or_else(|| tls.client_ca.clone()),
                    client_cert: tls.client_ca.as_ref().map(|_| tls.cert.clone()),
                    client_key: tls.client_ca.as_ref().map(|_| tls.key.clone()),
                }
                .load()?,
            ),
        };
        Ok(Some(crate::raft::ClusterConfig {
            node_id,
            peers,
            join: self.join,
            election_timeout: self.election_timeout,
            heartbeat: self.heartbeat,
            commit_timeout: self.commit_timeout,
            snapshot_every: self.snapshot_every.max(100),
            peer_tls,
        }))
    }
}

/// Binds, serves, and returns the exit code once shut down.
pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    // The faster scheduler needs a compile-time cfg that `.cargo/config.toml`
    // sets; a build from elsewhere (`cargo install --git`) lacks it. Say so
    // rather than run ~10 % slower without a word.
    #[cfg(not(tokio_unstable))]
    tracing::warn!(
        "built without `--cfg tokio_unstable`: Tokio's LIFO slot stays on, which costs \
         about 10 % of lock-cycle throughput; see README \"Installing\" for the build command"
    );
    let config = args.config()?;
    let opened = server::open(&config).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // Tests and scripts read this line to learn the port of `--listen
    // 127.0.0.1:0`; it comes once the store is open and the port bound.
    println!("listening on {}", listener.local_addr()?);
    let http = match &args.http {
        Some(addr) => Some(
            super::serve_http::start(addr, &config, &opened.coordinator, opened.node.as_ref())
                .await?,
        ),
        None => None,
    };
    server::serve(listener, config, opened, shutdown_signal()).await?;
    if let Some(http) = http {
        // It stops with the coordinator; give it its grace period.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), http).await;
    }
    Ok(0)
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

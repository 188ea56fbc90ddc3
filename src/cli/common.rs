//! Options every client command shares: which server, and how to reach it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::output::Failure;
use crate::auth::{AdminToken, BearerAuth};
use crate::proto::admin_service_client::AdminServiceClient;
use crate::tls::ClientTlsFiles;

/// How long a command waits to connect before saying the server is unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the coordinator.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The coordinator's URL (`https://` for TLS); for a cluster, any
    /// number of its nodes, comma-separated (every node forwards to the leader).
    #[arg(
        long,
        default_value = "http://127.0.0.1:7420",
        env = "LEASEHOLD_SERVER"
    )]
    pub server: String,
    /// The CA certificate (PEM) that signed the server's certificate;
    /// without it, an https:// server is checked against the system's roots.
    #[arg(long, env = "LEASEHOLD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate (PEM), for servers that require mutual TLS.
    #[arg(long, env = "LEASEHOLD_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// This client's private key (PEM), for servers that require mutual TLS.
    #[arg(long, env = "LEASEHOLD_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ConnectArgs {
    /// The TLS files these options name.
    pub fn tls_files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }

    /// The endpoint these options describe (no connection is made yet).
    /// TLS is configured for `https://` URLs, and refused for `http://` ones
    /// when TLS files are given (they would silently go unused).
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let first = self.servers().next().unwrap_or_default().to_owned();
        self.endpoint_for(&first)
    }

    /// The URLs of `--server`, a comma-separated list for a cluster.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    fn endpoint_for(&self, server: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(server.to_owned())
            .map_err(|e| anyhow::anyhow!("--server {server:?} is not a URL: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        let files = self.tls_files();
        let https = endpoint.uri().scheme_str() == Some("https");
        if !https {
            anyhow::ensure!(
                !files.is_set(),
                "--ca-cert/--client-cert/--client-key need an https:// URL, but --server is {server}"
            );
            return Ok(endpoint);
        }
        let tls = files.load()?;
        endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("cannot set up TLS for {server}: {e}"))
    }

    /// A channel that connects on first use; over several servers (a
    /// cluster), calls are spread over those that answer.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let servers: Vec<&str> = self.servers().collect();
        if servers.len() <= 1 {
            return Ok(self.endpoint()?.connect_lazy());
        }
        let endpoints = servers
            .iter()
            .map(|s| self.endpoint_for(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Channel::balance_list(endpoints.into_iter()))
    }

    /// A channel connected now; an unreachable server (or a failed TLS
    /// handshake) is reported here, clearly, rather than on the first call.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        // Several servers: the first that answers (any node forwards to the leader).
        let servers: Vec<&str> = self.servers().collect();
        for server in servers.iter().take(servers.len().saturating_sub(1)) {
            if let Ok(channel) = self.endpoint_for(server)?.connect().await {
                return Ok(channel);
            }
        }
        let endpoint = self.endpoint_for(servers.last().copied().unwrap_or_default())?;
        endpoint.connect().await.map_err(|e| {
            Failure::unreachable(format!(
                "cannot reach the coordinator at {}: {}; is it running? (--server / LEASEHOLD_SERVER)",
                self.server,
                super::output::error_chain(&e)
            ))
            .into()
        })
    }
}

/// The admin API's client, with the bearer token attached.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Options of commands that use the admin API.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// A file holding the admin token (else the LEASEHOLD_ADMIN_TOKEN
    /// variable holds the token itself).
    #[arg(long, env = "LEASEHOLD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// The admin token from `--admin-token-file` or `LEASEHOLD_ADMIN_TOKEN`, if any.
    pub fn token(&self) -> anyhow::Result<Option<AdminToken>> {
        if let Some(path) = &self.admin_token_file {
            return Ok(Some(AdminToken::from_file(path)?));
        }
        match std::env::var("LEASEHOLD_ADMIN_TOKEN") {
            Ok(text) if !text.trim().is_empty() => {
                Ok(Some(AdminToken::new(&text, "in LEASEHOLD_ADMIN_TOKEN")?))
            }
            _ => Ok(None),
        }
    }

    /// Connects and returns an admin client that sends the token.
    pub async fn client(&self) -> anyhow::Result<AdminClient> {
        let token = self.token()?;
        let channel = self.connect.connect().await?;
        Ok(AdminServiceClient::with_interceptor(
            channel,
            BearerAuth::new(token.as_ref()),
        ))
    }
}

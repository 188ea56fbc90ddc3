//! Options every client command shares: which server, and how to reach it.

use clap::Args;
use tonic::transport::{Channel, Endpoint};

/// How to reach the coordinator.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7420",
        env = "LEASEHOLD_SERVER"
    )]
    pub server: String,
}

impl ConnectArgs {
    /// The endpoint these options describe (no connection is made yet).
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| anyhow::anyhow!("--server {:?} is not a URL: {e}", self.server))?;
        Ok(endpoint)
    }

    /// A channel that connects on first use.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        Ok(self.endpoint()?.connect_lazy())
    }
}

//! The `leasehold` binary: parse the command line, set up logging, dispatch.

use clap::Parser;
use tracing_subscriber::EnvFilter;

// The server and the load generator allocate per request (HTTP/2 frames,
// protobuf messages); mimalloc is measurably cheaper than glibc's malloc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = leasehold::cli::Cli::parse();
    let code = leasehold::cli::run(cli).await?;
    std::process::exit(code);
}

//! The `leasehold` binary: parse the command line, set up logging, dispatch.

use clap::Parser;

// The server and the load generator allocate per request (HTTP/2 frames,
// protobuf messages); mimalloc is measurably cheaper than glibc's malloc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // By default a task woken by a running task runs next (Tokio's LIFO
    // slot). Here that task is the HTTP/2 connection, woken by every reply:
    // it then writes each response on its own while other requests wait.
    // In order, the replies of a batch go out together. Measured on 2 vCPUs
    // (server and load generator both): 4.6 responses per `writev` instead
    // of 0.84, cycle +14 %, p99 6.1 → 5.5 ms, contended +5 %.
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime.build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let guard = leasehold::otlp::init();
    let cli = leasehold::cli::Cli::parse();
    let code = leasehold::cli::run(cli).await?;
    drop(guard);
    std::process::exit(code);
}

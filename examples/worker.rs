//! `worker`: a fenced worker. Acquires a lease, checks it, writes to the
//! fenced store with the lease's token, and releases.
//!
//! ```text
//! cargo run --release -- serve &                       # the coordinator, :7420
//! cargo run --example fenced_store -- --data-dir /tmp/kv &   # prints its address
//! cargo run --example worker -- --store http://127.0.0.1:PORT --key k --value v
//! ```
//!
//! `--pause-before-write` stretches the moment between checking the lease
//! and writing, where a GC pause or a stalled VM strikes in real life; the
//! tests stop the process there (SIGSTOP) to replay Kleppmann's scenario.
//! The write is still safe: the store rejects a token older than one it
//! has already accepted.
//!
//! Prints `acquired RESOURCE token N` once it has checked its lease, then `accepted highest H` or
//! `rejected: REASON` (exit code 2).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use leasehold_client::Client;
use leasehold_guard::proto::{fenced_kv_client::FencedKvClient, PutRequest};
use tonic::{Code, Request};

#[derive(Debug, Parser)]
struct Args {
    /// The coordinator.
    #[arg(long, default_value = "http://127.0.0.1:7420")]
    coordinator: String,
    /// The fenced store.
    #[arg(long)]
    store: String,
    /// The resource whose lease guards the write.
    #[arg(long, default_value = "orders")]
    resource: String,
    /// The key to write.
    #[arg(long)]
    key: String,
    /// The value to write.
    #[arg(long)]
    value: String,
    /// The lease's TTL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How long to wait for the lease.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// A stand-in for a process pause between checking the lease and writing.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pause_before_write: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(args.coordinator.clone())?;
    let lease = client
        .acquire(args.resource.clone())
        .ttl(args.ttl)
        .wait(args.wait)
        .await?;
    // Check, then announce: a pause that strikes after this line falls
    // between the check and the write, where fencing has to catch it.
    anyhow::ensure!(lease.is_valid(), "the lease ran out before the write");
    println!("acquired {} token {}", lease.resource(), lease.token());
    std::io::stdout().flush()?;
    tokio::time::sleep(args.pause_before_write).await;

    let mut store = FencedKvClient::connect(args.store.clone())
        .await
        .with_context(|| format!("cannot reach the store at {}", args.store))?;
    let mut req = Request::new(PutRequest {
        key: args.key,
        value: args.value.into_bytes(),
    });
    lease.attach(&mut req)?;
    match store.put(req).await {
        Ok(resp) => println!("accepted highest {}", resp.into_inner().highest_token),
        Err(status) if status.code() == Code::FailedPrecondition => {
            println!("rejected: {}", status.message());
            let _ = lease.release().await;
            std::process::exit(2);
        }
        Err(status) => return Err(status.into()),
    }
    lease.release().await?;
    Ok(())
}

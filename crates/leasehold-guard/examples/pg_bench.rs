//! `pg_bench`: what fencing costs in PostgreSQL, as a measured ratio.
//!
//! ```text
//! cargo run --release -p leasehold-guard --features postgres --example pg_bench -- \
//!     [--postgres URL] [--duration 10s] [--concurrency 16] [--rounds 3]
//! ```
//!
//! Without `--postgres` it starts a throwaway server of its own
//! ([`TempPostgres::start`]: PostgreSQL's default durability, every commit
//! waits for its WAL flush) and stops it at the end. Each round runs four
//! workloads for `--duration` each, one after the other, with
//! `--concurrency` writers, each on a resource of its own and holding one
//! connection; every operation is one commit:
//!
//! | workload | one operation |
//! |---|---|
//! | `tx-plain` | `BEGIN`; upsert the row; `COMMIT` |
//! | `tx-guarded` | `BEGIN`; [`PgGuard::write`] (fence, then the same upsert); `COMMIT` |
//! | `row-plain` | the upsert alone (autocommit) |
//! | `row-fenced` | [`FencedRow::upsert`]: the same upsert, conditional on the row's fence |
//!
//! It prints each workload's median rate over the rounds with p50/p99
//! latency, the ratios guarded ÷ plain, and its checks (a stale token is
//! refused and writes nothing, on both paths); it exits 1 if a check failed.
//! A benchmark, not a test: nothing here is asserted on time.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use deadpool_postgres::Pool;
use leasehold_guard::pg::{self, FencedRow, PgGuard, TempPostgres};
use leasehold_guard::GuardError;
use tokio_postgres::types::Type;

/// Guarded versus plain writes per second against one PostgreSQL.
#[derive(Debug, Parser)]
struct Args {
    /// The database to use (its tables are created; `bench_*` ones are
    /// emptied). Default: a throwaway server of our own on loopback.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// How long each workload runs, per round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent writers (and connections).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Rounds of the four workloads; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// An operation slower than this counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    op_timeout: Duration,
}

const SETUP: &str = "
CREATE TABLE IF NOT EXISTS bench_data (key text PRIMARY KEY, token bigint NOT NULL, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS bench_rows (key text PRIMARY KEY, fence bigint NOT NULL, value bytea NOT NULL);
TRUNCATE bench_data, bench_rows;
DELETE FROM leasehold_fences WHERE resource LIKE 'bench/%';
";
const UPSERT_DATA: &str = "INSERT INTO bench_data (key, token, value) VALUES ($1, $2, $3) \
                           ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, value = EXCLUDED.value";
const UPSERT_ROW: &str = "INSERT INTO bench_rows (key, fence, value) VALUES ($1, $2, $3) \
                          ON CONFLICT (key) DO UPDATE SET fence = EXCLUDED.fence, value = EXCLUDED.value";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    TxPlain,
    TxGuarded,
    RowPlain,
    RowFenced,
}

const WORKLOADS: [Workload; 4] = [
    Workload::TxPlain,
    Workload::TxGuarded,
    Workload::RowPlain,
    Workload::RowFenced,
];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::TxPlain => "tx-plain      BEGIN; upsert; COMMIT",
            Workload::TxGuarded => "tx-guarded    BEGIN; PgGuard::write(fence, upsert); COMMIT",
            Workload::RowPlain => "row-plain     upsert (autocommit)",
            Workload::RowFenced => "row-fenced    FencedRow::upsert (autocommit)",
        }
    }
}

/// One workload's run: operations, errors, latencies (µs).
#[derive(Default)]
struct Run {
    ops: u64,
    errors: u64,
    latencies: Vec<u32>,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }
}

/// One operation of `workload` by writer `w` with `token`.
async fn op(
    workload: Workload,
    client: &mut deadpool_postgres::Object,
    row: &FencedRow,
    resource: &str,
    token: u64,
    value: &[u8],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let sql_token = i64::try_from(token)?;
    match workload {
        Workload::TxPlain => {
            let tx = client.transaction().await?;
            tx.execute_typed(
                UPSERT_DATA,
                &[
                    (&resource, Type::TEXT),
                    (&sql_token, Type::INT8),
                    (&value, Type::BYTEA),
                ],
            )
            .await?;
            tx.commit().await?;
        }
        Workload::TxGuarded => {
            let tx = client.transaction().await?;
            PgGuard
                .write(&tx, resource, token, |tx| async move {
                    tx.execute_typed(
                        UPSERT_DATA,
                        &[
                            (&resource, Type::TEXT),
                            (&sql_token, Type::INT8),
                            (&value, Type::BYTEA),
                        ],
                    )
                    .await
                })
                .await?;
            tx.commit().await?;
        }
        Workload::RowPlain => {
            client
                .execute_typed(
                    UPSERT_ROW,
                    &[
                        (&resource, Type::TEXT),
                        (&sql_token, Type::INT8),
                        (&value, Type::BYTEA),
                    ],
                )
                .await?;
        }
        Workload::RowFenced => {
            row.upsert(&***client, &resource, token, &[&value]).await?;
        }
    }
    Ok(())
}

async fn run(
    pool: &Pool,
    row: &FencedRow,
    workload: Workload,
    args: &Args,
    tokens: &Arc<AtomicU64>,
) -> Result<Run, Box<dyn std::error::Error>> {
    let mut clients = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        clients.push(pool.get().await?);
    }
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, mut client)| {
            let (row, tokens, timeout) = (row.clone(), tokens.clone(), args.op_timeout);
            tokio::spawn(async move {
                let resource = format!("bench/{w}");
                let value = vec![b'v'; 100];
                let mut run = Run::default();
                while Instant::now() < deadline {
                    let token = tokens.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    let done = tokio::time::timeout(
                        timeout,
                        op(workload, &mut client, &row, &resource, token, &value),
                    )
                    .await;
                    match done {
                        Ok(Ok(())) => {
                            run.ops += 1;
                            let micros = t0.elapsed().as_micros();
                            run.latencies
                                .push(u32::try_from(micros).unwrap_or(u32::MAX));
                        }
                        Ok(Err(e)) => {
                            run.errors += 1;
                            if run.errors == 1 {
                                eprintln!("{}: {e}", workload.name());
                            }
                        }
                        // A hung operation leaves its connection in an unknown state.
                        Err(_) => {
                            run.errors += 1;
                            break;
                        }
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for task in tasks {
        let run = task.await?;
        total.ops += run.ops;
        total.errors += run.errors;
        total.latencies.extend(run.latencies);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// A stale token is refused and writes nothing, on both fenced paths.
async fn checks(pool: &Pool, row: &FencedRow) -> Result<bool, Box<dyn std::error::Error>> {
    let mut client = pool.get().await?;
    let before: Vec<u8> = client
        .query_one("SELECT value FROM bench_data WHERE key = 'bench/0'", &[])
        .await?
        .get(0);
    let tx = client.transaction().await?;
    let stale = PgGuard
        .write(&tx, "bench/0", 1, |tx| async move {
            tx.execute(
                "UPDATE bench_data SET value = 'stale' WHERE key = 'bench/0'",
                &[],
            )
            .await
        })
        .await;
    tx.commit().await?;
    let after: Vec<u8> = client
        .query_one("SELECT value FROM bench_data WHERE key = 'bench/0'", &[])
        .await?
        .get(0);
    let tx_ok = matches!(stale, Err(GuardError::StaleToken { .. })) && before == after;
    let stale_row = row
        .upsert(&**client, &"bench/0", 1, &[&b"stale".as_slice()])
        .await;
    let row_value: Vec<u8> = client
        .query_one("SELECT value FROM bench_rows WHERE key = 'bench/0'", &[])
        .await?
        .get(0);
    let row_ok = matches!(stale_row, Err(GuardError::StaleToken { .. })) && row_value != b"stale";
    println!(
        "checks: stale token refused and nothing written: PgGuard::write {}, FencedRow::upsert {}",
        if tx_ok { "ok" } else { "FAILED" },
        if row_ok { "ok" } else { "FAILED" }
    );
    Ok(tx_ok && row_ok)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn bench(args: Args, url: &str) -> Result<bool, Box<dyn std::error::Error>> {
    let pool = pg::pool(url, args.concurrency + 1)?;
    {
        let mut client = pool.get().await?;
        pg::migrate(&mut client).await?;
        client.batch_execute(SETUP).await?;
        let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        let sync: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await?
            .get(0);
        println!(
            "pg_bench: PostgreSQL {version} (synchronous_commit {sync}), {} writers on {} \
             resources, {:?} per workload, {} rounds",
            args.concurrency, args.concurrency, args.duration, args.rounds
        );
    }
    let row =
        FencedRow::new("bench_rows", "key", Type::TEXT, "fence")?.column("value", Type::BYTEA)?;
    let tokens = Arc::new(AtomicU64::new(1_000));
    let mut runs: Vec<Vec<Run>> = WORKLOADS.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for (i, &workload) in WORKLOADS.iter().enumerate() {
            let run = run(&pool, &row, workload, &args, &tokens).await?;
            println!(
                "  round {}: {:<62} {:>9.0}/s  errors {}",
                round + 1,
                workload.name(),
                run.rate(),
                run.errors
            );
            runs[i].push(run);
        }
    }
    println!("medians over {} rounds:", args.rounds);
    let mut rates = Vec::new();
    let mut errors = 0;
    for (i, &workload) in WORKLOADS.iter().enumerate() {
        let rate = median(runs[i].iter().map(Run::rate).collect());
        let mut all = Run::default();
        for run in &mut runs[i] {
            all.latencies.append(&mut run.latencies);
            errors += run.errors;
        }
        println!(
            "  {:<62} {:>9.0}/s  p50 {:.2} ms  p99 {:.2} ms",
            workload.name(),
            rate,
            all.percentile(0.50),
            all.percentile(0.99)
        );
        rates.push(rate);
    }
    println!(
        "ratio tx-guarded / tx-plain: {:.2}; row-fenced / row-plain: {:.2}; tx-guarded / row-plain: {:.2}",
        rates[1] / rates[0],
        rates[3] / rates[2],
        rates[1] / rates[2]
    );
    let checked = checks(&pool, &row).await?;
    println!("errors: {errors}");
    Ok(checked && errors == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pg_bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The throwaway server lives until the end of `main`, and is stopped
    // when dropped (also on an error below).
    let (server, url) = match &args.postgres {
        Some(url) => (None, url.clone()),
        None => match TempPostgres::start() {
            Ok(server) => {
                let url = server.url();
                (Some(server), url)
            }
            Err(e) => {
                eprintln!("pg_bench: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let outcome = runtime.block_on(bench(args, &url));
    drop(runtime);
    drop(server);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pg_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

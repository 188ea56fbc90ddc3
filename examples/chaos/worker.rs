//! The worker process of the chaos run (`chaos --worker N …`): loops
//! acquire → one or two fenced writes → release with random TTLs, waits and
//! think times, and appends one JSON line per operation to its history file.
//!
//! Between checking its lease and writing, the worker "thinks" for a random
//! while: that is where the harness's SIGSTOP (a GC pause) does harm, and
//! where the store's fencing check must catch the late write.
//!
//! A worker started with `--session` takes its leases over one
//! [`Session`] stream instead (no keepalive: it writes only while the
//! grant's conservative validity lasts), so both client paths face the
//! same faults.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use leasehold_client::{AcquireError, Client, ClientError, Lease, LeaseHandle, LostReason};
use leasehold_client::{Grant, Session};
use leasehold_guard::proto::{fenced_kv_client::FencedKvClient, PutRequest};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::check::{Op, OpKind, Outcome};

/// What the harness tells a worker.
pub struct WorkerArgs {
    /// The worker's number.
    pub id: u32,
    /// The coordinator's URL (through the proxy).
    pub coordinator: String,
    /// The fenced store's URL.
    pub store: String,
    /// How many resources (`r0`, `r1`, …) to contend for.
    pub resources: u32,
    /// The run's seed (the worker adds its number).
    pub seed: u64,
    /// Start no new cycle after this time (unix ms).
    pub until_unix_ms: u64,
    /// The history file to append to.
    pub history: PathBuf,
    /// Take leases over a Session stream instead of keepalive-backed leases.
    pub session: bool,
}

/// How a worker talks to the coordinator.
enum Coordinator {
    Leases(Client),
    /// Opened on first use, so a coordinator that is down at the start is
    /// just a failed acquire.
    Session(Client, Option<Box<Session>>),
}

/// A lease while the worker holds it.
enum Holding {
    /// A keepalive-backed lease, and the task recording its loss (started
    /// once the grant is recorded).
    Lease(Lease, Option<tokio::task::JoinHandle<()>>),
    Grant(Grant),
}

impl Holding {
    fn token(&self) -> u64 {
        match self {
            Holding::Lease(l, _) => l.token(),
            Holding::Grant(g) => g.token(),
        }
    }

    fn valid_for(&self) -> Duration {
        match self {
            Holding::Lease(l, _) => l.valid_for(),
            Holding::Grant(g) => g.valid_for(),
        }
    }

    fn attach<T>(&self, req: &mut tonic::Request<T>) {
        let attached = match self {
            Holding::Lease(l, _) => l.attach(req),
            Holding::Grant(g) => g.fence().and_then(|f| f.attach_to(req)),
        };
        attached.expect("a valid fence");
    }
}

impl Coordinator {
    async fn acquire(
        &mut self,
        resource: &str,
        ttl: Duration,
        wait: Duration,
        holder: String,
    ) -> Result<Holding, AcquireError> {
        match self {
            Coordinator::Leases(client) => client
                .acquire(resource)
                .ttl(ttl)
                .wait(wait)
                .holder(holder)
                .await
                .map(|l| Holding::Lease(l, None)),
            Coordinator::Session(client, session) => {
                let s = match session {
                    Some(s) => s,
                    None => session.insert(Box::new(client.session().await?.holder(holder))),
                };
                s.acquire(resource, ttl, wait).await.map(Holding::Grant)
            }
        }
    }

    async fn release(&mut self, held: Holding) -> Result<bool, ClientError> {
        match (held, self) {
            (Holding::Lease(lease, watcher), _) => {
                let result = lease.release().await;
                if let Some(watcher) = watcher {
                    let _ = watcher.await;
                }
                result
            }
            (Holding::Grant(grant), Coordinator::Session(_, Some(s))) => s.release(grant).await,
            (Holding::Grant(_), _) => unreachable!("a grant comes from the session"),
        }
    }
}

/// CLOCK_REALTIME in nanoseconds: the clock every process shares.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Appends history lines, one `write` per line, so a killed worker leaves
/// whole lines behind.
#[derive(Clone)]
struct Recorder {
    file: Arc<Mutex<std::fs::File>>,
}

impl Recorder {
    fn record(&self, op: &Op) {
        let mut line = serde_json::to_string(op).expect("an op serializes");
        line.push('\n');
        self.file
            .lock()
            .write_all(line.as_bytes())
            .expect("cannot append to the history file");
    }
}

/// Runs the worker loop until `until_unix_ms`; a hard stop 20 s later.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.history)
        .with_context(|| format!("cannot open {}", args.history.display()))?;
    let rec = Recorder {
        file: Arc::new(Mutex::new(file)),
    };
    let client = Client::connect(args.coordinator.clone())?;
    let mut coordinator = match args.session {
        true => Coordinator::Session(client, None),
        false => Coordinator::Leases(client),
    };
    let channel = Endpoint::from_shared(args.store.clone())
        .with_context(|| format!("bad store URL {}", args.store))?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let store = FencedKvClient::new(channel);
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(u64::from(args.id)));
    let until_ns = args.until_unix_ms.saturating_mul(1_000_000);
    let hard_stop =
        Duration::from_nanos(until_ns.saturating_sub(now_ns())) + Duration::from_secs(20);
    let looping = async {
        // Bounded in count too: a cycle takes at least a few ms.
        for cycle in 0..1_000_000u64 {
            if now_ns() >= until_ns {
                break;
            }
            one_cycle(
                &args,
                cycle,
                &mut coordinator,
                store.clone(),
                &rec,
                &mut rng,
            )
            .await;
        }
    };
    if tokio::time::timeout(hard_stop, looping).await.is_err() {
        anyhow::bail!("worker {} overran its deadline by 20 s", args.id);
    }
    Ok(())
}

async fn one_cycle(
    args: &WorkerArgs,
    cycle: u64,
    coordinator: &mut Coordinator,
    mut store: FencedKvClient<Channel>,
    rec: &Recorder,
    rng: &mut StdRng,
) {
    let resource = format!("r{}", rng.random_range(0..args.resources.max(1)));
    let ttl = Duration::from_millis(rng.random_range(300..=1500));
    let wait = Duration::from_millis(rng.random_range(0..=2000));
    let op = |kind, token, start_ns, result| Op {
        worker: args.id,
        op: kind,
        resource: resource.clone(),
        token,
        start_ns,
        end_ns: now_ns(),
        result,
        highest: None,
        check_ns: None,
        valid_ms: None,
        detail: None,
    };

    let start = now_ns();
    let acquired = coordinator
        .acquire(&resource, ttl, wait, format!("w{}", args.id))
        .await;
    let lease = match acquired {
        Ok(mut held) => {
            rec.record(&Op {
                detail: Some(format!("ttl {} ms", ttl.as_millis())),
                ..op(OpKind::Acquire, Some(held.token()), start, Outcome::Granted)
            });
            if let Holding::Lease(l, watcher) = &mut held {
                *watcher = Some(tokio::spawn(watch_loss(
                    l.handle(),
                    rec.clone(),
                    args.id,
                    resource.clone(),
                )));
            }
            held
        }
        Err(AcquireError::Held { token, .. }) => {
            rec.record(&Op {
                highest: Some(token),
                ..op(OpKind::Acquire, None, start, Outcome::Held)
            });
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..=100))).await;
            return;
        }
        Err(e) => {
            rec.record(&Op {
                detail: Some(e.to_string()),
                ..op(OpKind::Acquire, None, start, Outcome::Failed)
            });
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..=200))).await;
            return;
        }
    };
    let token = lease.token();

    for i in 0..rng.random_range(1..=2u32) {
        // Check, think, write: a pause after the check makes the write late.
        let check_ns = now_ns();
        let valid = lease.valid_for();
        let valid_ms = valid.as_secs_f64() * 1e3;
        if valid.is_zero() {
            rec.record(&Op {
                check_ns: Some(check_ns),
                valid_ms: Some(0.0),
                ..op(OpKind::Write, Some(token), check_ns, Outcome::Skipped)
            });
            break;
        }
        let think = ttl.mul_f64(rng.random_range(0.0..0.5));
        tokio::time::sleep(think).await;
        let key = format!("{resource}/k{i}");
        let mut req = tonic::Request::new(PutRequest {
            key: key.clone(),
            value: format!("w{} cycle {cycle} token {token}", args.id).into_bytes(),
        });
        lease.attach(&mut req);
        let start = now_ns();
        let put = tokio::time::timeout(Duration::from_secs(3), store.put(req)).await;
        let (result, highest, detail) = match put {
            Ok(Ok(resp)) => (
                Outcome::Accepted,
                Some(resp.into_inner().highest_token),
                None,
            ),
            Ok(Err(s)) if s.code() == Code::FailedPrecondition => (
                Outcome::Rejected,
                named_highest(s.message()),
                Some(s.message().to_owned()),
            ),
            Ok(Err(s)) => (
                Outcome::Failed,
                None,
                Some(format!("{:?}: {}", s.code(), s.message())),
            ),
            Err(_) => (Outcome::Failed, None, Some("timed out after 3 s".into())),
        };
        rec.record(&Op {
            highest,
            check_ns: Some(check_ns),
            valid_ms: Some(valid_ms),
            detail: Some(detail.map_or(key.clone(), |d| format!("{key}: {d}"))),
            ..op(OpKind::Write, Some(token), start, result)
        });
        if result == Outcome::Rejected {
            // A fenced worker stops at the first rejection: it was superseded.
            break;
        }
    }

    let start = now_ns();
    let released = coordinator.release(lease).await;
    let (result, detail) = match released {
        Ok(true) => (Outcome::Released, None),
        Ok(false) => (Outcome::NotHeld, None),
        Err(e) => (Outcome::Failed, Some(e.to_string())),
    };
    rec.record(&Op {
        detail,
        ..op(OpKind::Release, Some(token), start, result)
    });
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..=300))).await;
}

/// The token a stale-token rejection names: `… highest accepted N; …`.
fn named_highest(message: &str) -> Option<u64> {
    let rest = message.split("highest accepted ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Records the loss of a lease (other than by release), with a lower bound
/// of the validity the holder still had when the library reported it.
async fn watch_loss(lease: LeaseHandle, rec: Recorder, worker: u32, resource: String) {
    // The sample (t, v) means valid_until ≥ t + v: valid_for() is read after
    // t. A later renewal only moves valid_until further. So at the loss,
    // v − (now − t) is a lower bound of what was left.
    let mut sample = (Instant::now(), lease.valid_for());
    let start = now_ns();
    // Bounded: a lease is lost or released within its TTL plus the retries.
    for _ in 0..100_000 {
        tokio::select! {
            reason = lease.lost() => {
                let result = match reason {
                    LostReason::Released => return,
                    LostReason::Gone => Outcome::Gone,
                    LostReason::TimedOut => Outcome::TimedOut,
                };
                let left = sample.1.as_secs_f64() - sample.0.elapsed().as_secs_f64();
                rec.record(&Op {
                    worker,
                    op: OpKind::Lost,
                    resource,
                    token: Some(lease.token()),
                    start_ns: start,
                    end_ns: now_ns(),
                    result,
                    highest: None,
                    check_ns: None,
                    valid_ms: Some(left * 1e3),
                    detail: None,
                });
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                let t = Instant::now();
                let v = lease.valid_for();
                if !v.is_zero() {
                    sample = (t, v);
                }
            }
        }
    }
}

//! A replicated coordinator: three (or four) `leasehold serve --peers`
//! processes on 127.0.0.1 with temporary data directories, faults injected
//! with kill -9, SIGSTOP/SIGCONT and an in-test TCP proxy per node-to-node
//! link. Every wait is bounded.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold::proto::acquire_response::Outcome;
use leasehold::proto::cluster_service_client::ClusterServiceClient;
use leasehold::proto::lease_service_client::LeaseServiceClient;
use leasehold::proto::{self, ClusterStatusResponse};
use tonic::transport::{Channel, Endpoint};

use crate::support::{acquire_req, admin_over, binary, run_cli, ServerProcess};

/// A port that was free a moment ago (the nodes must know each other's
/// addresses before they start). Drawn below Linux's ephemeral range
/// (32768 and up), so no outgoing connection takes it before the node binds it.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

fn lazy(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(4))
        .connect_lazy()
}

fn lease_client(url: &str) -> LeaseServiceClient<Channel> {
    LeaseServiceClient::new(lazy(url))
}

struct Cluster {
    dir: tempfile::TempDir,
    /// Node `i + 1` listens on `urls[i]`.
    urls: Vec<String>,
    /// The `--peers` value of each node.
    peers: Vec<String>,
    nodes: Vec<Option<ServerProcess>>,
    extra: Vec<String>,
}

impl Cluster {
    /// `n` nodes that reach each other directly.
    async fn start(n: usize, extra: &[&str]) -> Self {
        let urls: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let all = peers_arg(&urls);
        Self::start_with(urls, vec![all; n], extra)
    }

    fn start_with(urls: Vec<String>, peers: Vec<String>, extra: &[&str]) -> Self {
        let mut c = Cluster {
            dir: tempfile::tempdir().expect("temp dir"),
            nodes: urls.iter().map(|_| None).collect(),
            urls,
            peers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..c.urls.len() {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let dir = self.dir.path().join(format!("n{}", i + 1));
        let listen = self.urls[i].trim_start_matches("http://").to_owned();
        let id = (i + 1).to_string();
        let mut args = vec![
            "serve",
            "--node-id",
            &id,
            "--listen",
            &listen,
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--peers",
            &self.peers[i],
        ];
        args.extend(self.extra.iter().map(String::as_str));
        self.nodes[i] = Some(ServerProcess::spawn_program(&binary(), &args));
    }

    fn node(&mut self, i: usize) -> &mut ServerProcess {
        self.nodes[i].as_mut().expect("node running")
    }

    /// The index of the node that serves (leads and has taken over), among
    /// `among`, within `within`.
    async fn leader_among(&self, among: &[usize], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            for &i in among {
                if status(&self.urls[i]).await.is_some_and(|s| s.serving) {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {among:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader(&self, within: Duration) -> usize {
        let all: Vec<usize> = (0..self.urls.len()).collect();
        self.leader_among(&all, within).await
    }
}

/// Cluster tests run one at a time (the other tests of this binary still
/// run beside them): three servers each on two cores, twice over, would
/// stretch the election timing they measure (failover within 2 s).
async fn one_cluster_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE.lock().await
}

fn peers_arg(urls: &[String]) -> String {
    urls.iter()
        .enumerate()
        .map(|(i, u)| format!("{}={u}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// A node's view of the cluster, or `None` if it does not answer within 300 ms.
async fn status(url: &str) -> Option<ClusterStatusResponse> {
    let mut c = ClusterServiceClient::new(lazy(url));
    let call = c.status(proto::ClusterStatusRequest {});
    match tokio::time::timeout(Duration::from_millis(300), call).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// Waits until every node in `among` has applied the same last index,
/// at or past `at_least`, and returns it.
async fn converged(urls: &[String], among: &[usize], at_least: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = Vec::new();
        for &i in among {
            seen.push(
                status(&urls[i])
                    .await
                    .map(|s| (s.last_log_index, s.applied_index)),
            );
        }
        if let Some(Some((last, applied))) = seen.first().copied() {
            if applied >= at_least && seen.iter().all(|s| *s == Some((last, applied))) {
                return applied;
            }
        }
        assert!(
            Instant::now() < deadline,
            "nodes {among:?} did not converge past {at_least} within {within:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An Acquire that must be granted; UNAVAILABLE (an election under way:
/// this machine's load can cost a leader its heartbeats) is retried for up
/// to 5 s, as the client library does.
async fn grant(c: &mut LeaseServiceClient<Channel>, req: proto::AcquireRequest) -> proto::Lease {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_acquire(c, req.clone()).await {
            Ok(Outcome::Lease(l)) => return l,
            Ok(other) => panic!("expected a lease on {}, got {other:?}", req.resource),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("acquire of {} failed: {s:?}", req.resource),
        }
    }
}

async fn try_acquire(
    c: &mut LeaseServiceClient<Channel>,
    req: proto::AcquireRequest,
) -> Result<Outcome, tonic::Status> {
    let outcome = c.acquire(req).await?.into_inner().outcome;
    Ok(outcome.expect("an outcome"))
}

/// Every live lease under `prefix`, by resource, as the leader lists it
/// (through whichever node `url` is: it forwards).
async fn list(url: &str, prefix: &str) -> BTreeMap<String, u64> {
    let mut admin = admin_over(lazy(url), None);
    let mut out = BTreeMap::new();
    let mut page_token = String::new();
    for _ in 0..1000 {
        let page = admin
            .list_leases(proto::ListLeasesRequest {
                prefix: prefix.into(),
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.leases.into_iter().map(|l| (l.resource, l.token)));
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
    panic!("more than 1000 pages");
}

/// Three nodes form a cluster by themselves; a grant through a follower
/// works; kill -9 of the leader under concurrent load loses no
/// acknowledged grant, tokens strictly increase and are never reused, a
/// survivor grants again within 2 s; the killed node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_under_load_loses_nothing() {
    const WORKERS: usize = 3;
    let _one = one_cluster_at_a_time().await;
    let mut c = Cluster::start(3, &[]).await;
    let formed = Instant::now();
    let leader = c.leader(Duration::from_secs(5)).await;
    eprintln!("formed in {:?}", formed.elapsed());
    let follower = (leader + 1) % 3;
    let mut via_follower = lease_client(&c.urls[follower]);
    let first = grant(&mut via_follower, acquire_req("via/follower", "w0", 60_000)).await;
    // A follower that knows the leader reports SERVING.
    let mut health = tonic_health::pb::health_client::HealthClient::new(lazy(&c.urls[follower]));
    let check = tonic_health::pb::HealthCheckRequest {
        service: "leasehold.v1.LeaseService".into(),
    };
    let serving = health
        .check(check)
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(serving, 1, "not SERVING");
    // Three grants of one resource, two released: its history, asked of
    // the follower (forwarded), lists them newest first.
    let mut past = Vec::new();
    for _ in 0..3 {
        let l = grant(&mut via_follower, acquire_req("hist/a", "h", 60_000)).await;
        past.push(l.token);
        if past.len() < 3 {
            let released = via_follower
                .release(proto::ReleaseRequest {
                    lease_id: l.lease_id,
                    token: l.token,
                })
                .await
                .expect("release")
                .into_inner();
            assert!(released.released);
        }
    }
    let history = |url: &str| {
        let url = url.to_owned();
        async move {
            admin_over(lazy(&url), None)
                .history(proto::HistoryRequest {
                    resource: "hist/a".into(),
                    limit: 0,
                })
                .await
                .expect("history")
                .into_inner()
                .grants
        }
    };
    let shown = history(&c.urls[follower]).await;
    let tokens: Vec<u64> = shown.iter().map(|g| g.token).collect();
    assert_eq!(tokens, past.iter().rev().copied().collect::<Vec<_>>());
    let ends: Vec<i32> = shown.iter().map(|g| g.ended).collect();
    let (live, released) = (proto::EndKind::Live as i32, proto::EndKind::Released as i32);
    assert_eq!(ends, [live, released, released], "{shown:?}");

    // Acknowledged grants: (when, worker, resource, token).
    type Acks = Vec<(Instant, usize, String, u64)>;
    let acks: Arc<parking_lot::Mutex<Acks>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    // Three workers, one per node to start with: load enough to catch a lost
    // or reused grant, while leaving the two cores to the election the test
    // times (with six, the suite's load once stretched it to 2.1 s).
    for w in 0..WORKERS {
        let (acks, stop, urls) = (acks.clone(), stop.clone(), c.urls.clone());
        workers.push(tokio::spawn(async move {
            let mut at = w % 3;
            let mut client = lease_client(&urls[at]);
            let started = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                let resource = format!("load/{w}/{i}");
                match try_acquire(&mut client, acquire_req(&resource, "w", 60_000)).await {
                    Ok(Outcome::Lease(l)) => {
                        acks.lock().push((Instant::now(), w, resource, l.token));
                        i += 1;
                    }
                    Ok(other) => panic!("{resource} is new, yet: {other:?}"),
                    Err(_) => {
                        // Move on to the next node (the resource may or may
                        // not have been granted: take a fresh one).
                        i += 1;
                        at = (at + 1) % 3;
                        client = lease_client(&urls[at]);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    c.node(leader).kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    let acks = acks.lock().clone();
    let before: Vec<u64> = acks
        .iter()
        .filter(|a| a.0 < killed_at)
        .map(|a| a.3)
        .collect();
    let after: Vec<&(Instant, usize, String, u64)> =
        acks.iter().filter(|a| a.0 >= killed_at).collect();
    assert!(
        !before.is_empty() && !after.is_empty(),
        "{} before, {} after",
        before.len(),
        after.len()
    );

    // A survivor grants again within 2 s.
    let regained = after.iter().map(|a| a.0).min().expect("a grant after") - killed_at;
    eprintln!(
        "first grant {regained:?} after kill -9 of the leader; {} grants in all",
        acks.len()
    );
    assert!(regained <= Duration::from_secs(2), "took {regained:?}");

    // Tokens strictly increase (per worker, whose calls are sequential),
    // across the leader change too, and no token is handed out twice.
    for w in 0..WORKERS {
        let tokens: Vec<u64> = acks.iter().filter(|a| a.1 == w).map(|a| a.3).collect();
        assert!(
            tokens.windows(2).all(|p| p[0] < p[1]),
            "worker {w}: {tokens:?}"
        );
    }
    let mut all: Vec<u64> = acks.iter().map(|a| a.3).collect();
    all.push(first.token);
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a token was handed out twice");
    let max_before = before.iter().max().copied().unwrap_or(0);
    assert!(after.iter().all(|a| a.3 > max_before));

    // No acknowledged grant is lost: each is live on the new leader with its token.
    let survivor = (leader + 1) % 3;
    let live = list(&c.urls[survivor], "load/").await;
    for (_, _, resource, token) in &acks {
        assert_eq!(live.get(resource), Some(token), "{resource} lost");
    }
    assert_eq!(
        list(&c.urls[survivor], "via/").await.get("via/follower"),
        Some(&first.token)
    );
    // The new leader applied the same entries: the same history.
    assert_eq!(history(&c.urls[survivor]).await, shown);

    // The killed node rejoins and catches up.
    let last = status(&c.urls[survivor])
        .await
        .expect("status")
        .last_log_index;
    c.spawn(leader);
    converged(&c.urls, &[0, 1, 2], last, Duration::from_secs(10)).await;
    let back = status(&c.urls[leader]).await.expect("status");
    assert!(
        back.leader_id != 0 && back.leader_id != (leader + 1) as u64,
        "{back:?}"
    );
}

/// SIGSTOP the leader past the election timeout while a lease is held
/// through it: new grants come from the new leader; the held lease is
/// granted again only after its TTL has run (mutual exclusion) and within
/// TTL + election time of the pause (the liveness bound); after SIGCONT the
/// old leader renews nothing and grants nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_contradicts_nothing_after_it_resumes() {
    let _one = one_cluster_at_a_time().await;
    let flags = [
        "--election-timeout",
        "300ms",
        "--heartbeat",
        "50ms",
        "--commit-timeout",
        "1s",
        "--http",
        "127.0.0.1:0",
    ];
    let mut c = Cluster::start(3, &flags).await;
    let old = c.leader(Duration::from_secs(5)).await;
    let mut direct = lease_client(&c.urls[old]);
    let ttl = Duration::from_millis(2000);
    let sent = Instant::now();
    let held = grant(
        &mut direct,
        acquire_req("paused/r", "old", ttl.as_millis() as u64),
    )
    .await;

    c.node(old).signal("STOP");
    let stopped = Instant::now();
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = c.leader_among(&others, Duration::from_secs(5)).await;
    let elected = Instant::now();
    eprintln!("new leader serving {:?} after the pause", elected - stopped);
    let third = others.iter().copied().find(|&i| i != new).expect("third");
    let mut via = lease_client(&c.urls[third]);
    let fresh = grant(&mut via, acquire_req("paused/other", "new", 60_000)).await;
    assert!(fresh.token > held.token);

    // The held lease: held by "old" until its TTL has run on the new leader.
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        match try_acquire(&mut via, acquire_req("paused/r", "new", 60_000)).await {
            Ok(Outcome::Lease(l)) => break (Instant::now(), l),
            Ok(Outcome::Held(h)) => {
                assert_eq!((h.holder.as_str(), h.token), ("old", held.token));
            }
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        }
        assert!(Instant::now() < deadline, "paused/r never came free");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (granted_at, taken) = taken;
    assert!(
        granted_at >= sent + ttl,
        "granted {:?} after the first grant was asked",
        granted_at - sent
    );
    // The bound: the lease ends at most its TTL after the election that
    // followed the holder's last renewal (here: after the new leader was
    // seen serving; 300 ms of slack for polling and the expiry's commit).
    assert!(
        granted_at <= elected + ttl + Duration::from_millis(300),
        "the lease outlived TTL after the election by {:?}",
        granted_at - elected - ttl
    );
    assert!(taken.token > fresh.token);

    // The old leader resumes: it renews nothing, grants nothing, and shows
    // nothing older than the new leader's state.
    c.node(old).signal("CONT");
    let mut direct = lease_client(&c.urls[old]);
    let until = Instant::now() + Duration::from_secs(2);
    let mut answered = 0;
    while Instant::now() < until {
        let renewed = crate::support::renew(&mut direct, &held).await;
        assert!(renewed.is_err(), "the old lease was renewed: {renewed:?}");
        match try_acquire(&mut direct, acquire_req("paused/r", "third", 60_000)).await {
            Ok(Outcome::Held(h)) => {
                assert_eq!(h.token, taken.token);
                answered += 1;
            }
            Ok(Outcome::Lease(l)) => panic!("the old leader granted {l:?}"),
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered > 0,
        "the resumed node never answered (it should forward)"
    );
}

/// A directed link between two nodes that the test can cut.
struct Link {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Link {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes
                }
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mut cut_rx = cut2.subscribe();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Link { addr, up, cut }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// The leader is cut off from both others (every node-to-node link goes
/// through an in-test proxy): the majority elects a new leader and keeps
/// granting; the old leader grants nothing; after the links heal, every
/// node holds the same log and nothing the cut-off leader attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_grants_nothing_and_rejoins_without_divergence() {
    let _one = one_cluster_at_a_time().await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    // links[i][j]: node i's way to node j.
    let mut links: Vec<Vec<Option<Link>>> = Vec::new();
    let mut peers = Vec::new();
    for i in 0..3 {
        let mut row = Vec::new();
        let mut list = Vec::new();
        for j in 0..3 {
            if i == j {
                row.push(None);
                list.push(format!("{}={}", j + 1, urls[j]));
            } else {
                let target: SocketAddr = format!("127.0.0.1:{}", ports[j]).parse().expect("addr");
                let link = Link::start(target).await;
                list.push(format!("{}=http://{}", j + 1, link.addr));
                row.push(Some(link));
            }
        }
        links.push(row);
        peers.push(list.join(","));
    }
    let flags = [
        "--election-timeout",
        "300ms",
        "--heartbeat",
        "50ms",
        "--commit-timeout",
        "1s",
    ];
    let c = Cluster::start_with(urls.clone(), peers, &flags);
    let old = c.leader(Duration::from_secs(5)).await;
    let mut direct = lease_client(&urls[old]);
    let before = grant(&mut direct, acquire_req("part/before", "a", 60_000)).await;
    // A Session stream served by the leader itself, opened before the cut.
    let (session_tx, session_rx) = tokio::sync::mpsc::channel(4);
    let mut session = direct
        .session(tokio_stream::wrappers::ReceiverStream::new(session_rx))
        .await
        .expect("session")
        .into_inner();

    let cut = |up: bool| {
        for (i, row) in links.iter().enumerate() {
            for (j, link) in row.iter().enumerate() {
                if let Some(link) = link {
                    if i == old || j == old {
                        link.set(up);
                    }
                }
            }
        }
    };
    cut(false);
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = c.leader_among(&others, Duration::from_secs(5)).await;
    let mut majority = lease_client(&urls[new]);
    let after = grant(&mut majority, acquire_req("part/after", "b", 60_000)).await;
    assert!(after.token > before.token);

    // The cut-off leader cannot commit: it grants nothing.
    for k in 0..3 {
        let resource = format!("part/minority/{k}");
        let r = try_acquire(&mut direct, acquire_req(&resource, "c", 60_000)).await;
        assert!(r.is_err(), "the cut-off leader granted {resource}: {r:?}");
    }

    // The session's next call cannot commit either: the stream ends with
    // UNAVAILABLE (so a client opens a new one, which reaches the new
    // leader) rather than answering call after call with an error.
    session_tx
        .send(proto::SessionRequest {
            call: Some(proto::session_request::Call::Acquire(acquire_req(
                "part/minority/session",
                "c",
                60_000,
            ))),
        })
        .await
        .expect("send on the session");
    let ended = tokio::time::timeout(Duration::from_secs(10), session.message())
        .await
        .expect("the session answered within 10 s");
    match ended {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        Ok(other) => panic!("the cut-off leader's session went on: {other:?}"),
    }

    cut(true);
    let last = status(&urls[new]).await.expect("status").last_log_index;
    converged(&urls, &[0, 1, 2], last, Duration::from_secs(10)).await;
    let live = list(&urls[old], "part/").await;
    assert_eq!(live.get("part/before"), Some(&before.token));
    assert_eq!(live.get("part/after"), Some(&after.token));
    assert!(
        live.keys().all(|r| !r.starts_with("part/minority")),
        "a grant the cut-off leader attempted took effect: {live:?}"
    );
    let back = status(&urls[old]).await.expect("status");
    assert_eq!(back.leader_id, (new + 1) as u64);
}

/// A fourth node is added (learner, then voter) and removed with the CLI
/// while grants keep succeeding; a node down during many grants catches up
/// from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_and_catch_up_keep_the_cluster_serving() {
    let _one = one_cluster_at_a_time().await;
    let mut c = Cluster::start(3, &["--snapshot-every", "100"]).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let url = c.urls[leader].clone();

    // Grants keep succeeding throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), url.clone());
        tokio::spawn(async move {
            let mut client = lease_client(&url);
            let mut n = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                let l = grant(&mut client, acquire_req(&format!("m/{n}"), "m", 60_000)).await;
                assert!(l.token > 0);
                n += 1;
            }
            n
        })
    };

    let port4 = free_port();
    let url4 = format!("http://127.0.0.1:{port4}");
    let dir4 = c.dir.path().join("n4");
    let _node4 = ServerProcess::spawn_program(
        &binary(),
        &[
            "serve",
            "--node-id",
            "4",
            "--join",
            "--listen",
            &format!("127.0.0.1:{port4}"),
            "--data-dir",
            dir4.to_str().expect("utf-8"),
        ],
    );
    let add = run_cli(
        &[
            "cluster",
            "add",
            &format!("4={url4}"),
            "--server",
            &c.urls[(leader + 1) % 3],
        ],
        &[],
    )
    .await;
    assert_eq!(add.code, 0, "{}", add.stderr);
    assert!(add.stdout.contains("voters [1, 2, 3, 4]"), "{}", add.stdout);
    let shown = run_cli(&["cluster", "status", "--json", "--server", &url], &[]).await;
    let json: serde_json::Value = serde_json::from_str(&shown.stdout).expect("json");
    assert_eq!(json["members"].as_array().map(Vec::len), Some(4), "{json}");
    // The new member answers (forwarding to the leader).
    let mut via4 = lease_client(&url4);
    grant(&mut via4, acquire_req("m/through-4", "m", 60_000)).await;

    let remove = run_cli(&["cluster", "remove", "4", "--server", &url], &[]).await;
    assert_eq!(remove.code, 0, "{}", remove.stderr);
    assert!(
        remove.stdout.contains("voters [1, 2, 3]"),
        "{}",
        remove.stdout
    );

    stop.store(true, Ordering::SeqCst);
    let granted = load
        .await
        .expect("every grant succeeded during the membership changes");
    assert!(granted > 0);

    // A follower down while the log grows past several snapshots (and is
    // compacted) catches up from a snapshot.
    let down = (leader + 1) % 3;
    c.node(down).kill9();
    let mut client = lease_client(&url);
    for n in 0..300 {
        grant(&mut client, acquire_req(&format!("c/{n}"), "c", 60_000)).await;
    }
    let leader_status = status(&url).await.expect("status");
    assert!(leader_status.snapshot_index > 0, "{leader_status:?}");
    c.spawn(down);
    converged(
        &c.urls,
        &[0, 1, 2],
        leader_status.last_log_index,
        Duration::from_secs(15),
    )
    .await;
    let back = status(&c.urls[down]).await.expect("status");
    assert!(back.snapshot_index > 0, "{back:?}");
}

/// Bad input keeps today's answer through a follower; with two of three
/// nodes gone, the survivor answers UNAVAILABLE within a bound instead of
/// hanging, and SERVING turns into NOT_SERVING on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_and_a_lost_majority_keep_todays_answers() {
    let _one = one_cluster_at_a_time().await;
    let flags = [
        "--election-timeout",
        "300ms",
        "--heartbeat",
        "50ms",
        "--commit-timeout",
        "1s",
        "--http",
        "127.0.0.1:0",
    ];
    let mut c = Cluster::start(3, &flags).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let follower = (leader + 1) % 3;
    cluster_metrics_tell_leader_from_follower(&mut c, leader, follower).await;
    let mut via = lease_client(&c.urls[follower]);
    let cases = [
        (acquire_req("", "h", 1000), tonic::Code::InvalidArgument),
        (acquire_req("r", "h", 0), tonic::Code::InvalidArgument),
        (acquire_req("r", "", 1000), tonic::Code::InvalidArgument),
    ];
    for (req, want) in cases {
        let got = try_acquire(&mut via, req.clone())
            .await
            .expect_err("refused");
        assert_eq!(got.code(), want, "{req:?}: {got:?}");
    }

    // Two nodes gone: no majority. The third goes by SIGTERM, gracefully:
    // the leader's `Replicate` stream into it must not hold the shutdown
    // open.
    let third = (leader + 2) % 3;
    c.node(third).signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let exited = loop {
        if let Some(status) = c.node(third).child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a follower still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "SIGTERM should exit 0, got {exited}");
    c.node(leader).kill9();
    let asked = Instant::now();
    let got = try_acquire(&mut via, acquire_req("nomajority", "h", 1000)).await;
    let took = asked.elapsed();
    let status = got.expect_err("no majority, no grant");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(lazy(&c.urls[follower]));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let check = tonic_health::pb::HealthCheckRequest {
            service: "leasehold.v1.LeaseService".into(),
        };
        let now = health
            .check(check)
            .await
            .expect("health")
            .into_inner()
            .status;
        if now == 2 {
            break; // NOT_SERVING
        }
        assert!(Instant::now() < deadline, "still {now} with no majority");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/metrics` of a cluster node (`serve --http`) carries the cluster's
/// series, read from the Raft node: the leader says it leads, knows every
/// peer's lag and has seen a leader; a follower says it follows.
async fn cluster_metrics_tell_leader_from_follower(
    c: &mut Cluster,
    leader: usize,
    follower: usize,
) {
    use crate::observe_support::{request, strict_parse, Samples};
    let mut http_addr = |i: usize| -> std::net::SocketAddr {
        let line = c.node(i).read_line();
        line.strip_prefix("http on ")
            .unwrap_or_else(|| panic!("expected `http on ADDR`, got {line:?}"))
            .parse()
            .expect("address")
    };
    let (leader_http, follower_http) = (http_addr(leader), http_addr(follower));
    let scrape = |addr| async move {
        let answer = request(addr, "GET", "/metrics", None, None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        strict_parse(&answer.body)
    };
    // A follower learns of the leader from its first heartbeat or append,
    // which may come after the leader already serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let on_follower: Samples = loop {
        let now = scrape(follower_http).await;
        if now.get(r#"leasehold_cluster_role{role="follower"}"#) == 1.0
            && now.get("leasehold_cluster_applied_index") >= 1.0
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never reported itself a caught-up follower: {:?}",
            follower + 1,
            now.values
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // One grant: the leader records its entry's size and commit time.
    let mut client = lease_client(&c.urls[leader]);
    grant(&mut client, acquire_req("metrics/one", "m", 60_000)).await;
    let on_leader = scrape(leader_http).await;
    assert_eq!(
        on_leader.get(r#"leasehold_cluster_role{role="leader"}"#),
        1.0
    );
    assert!(on_leader.get("leasehold_commit_batch_size_count") >= 1.0);
    assert!(on_leader.get("leasehold_commit_batch_size_sum") >= 1.0);
    assert!(on_leader.get("leasehold_commit_duration_seconds_count") >= 1.0);
    // Every node times its Raft log's appends (the follower's at least the
    // entries it had applied when scraped).
    assert!(on_leader.get("leasehold_wal_write_duration_seconds_count") >= 1.0);
    assert!(on_follower.get("leasehold_wal_write_duration_seconds_count") >= 1.0);
    assert_eq!(
        on_leader.get(r#"leasehold_cluster_role{role="follower"}"#),
        0.0
    );
    assert_eq!(
        on_follower.get(r#"leasehold_cluster_role{role="leader"}"#),
        0.0
    );
    assert!(on_leader.get("leasehold_cluster_term") >= 1.0);
    assert!(on_leader.get("leasehold_cluster_leader_changes_total") >= 1.0);
    assert!(on_follower.get("leasehold_cluster_leader_changes_total") >= 1.0);
    assert!(on_leader.get("leasehold_cluster_applied_index") >= 1.0);
    assert!(
        on_leader.get("leasehold_cluster_commit_index")
            >= on_leader.get("leasehold_cluster_applied_index")
    );
    for peer in (0..3).filter(|&i| i != leader) {
        let series = format!(
            r#"leasehold_cluster_replication_lag_entries{{peer="{}"}}"#,
            peer + 1
        );
        assert!(
            on_leader.values.contains_key(&series),
            "{series} missing on the leader"
        );
    }
    // Only the leader knows its followers' lag.
    assert!(!on_follower
        .values
        .keys()
        .any(|k| k.starts_with("leasehold_cluster_replication_lag_entries")));
}

/// With mutual TLS, the nodes reach each other over TLS with their own
/// certificates (the Raft RPCs share the port and its settings): the
/// cluster forms and serves a client with credentials through a follower,
/// and a caller without a client certificate cannot reach RaftService.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_under_mutual_tls_forms_and_refuses_strangers() {
    let _one = one_cluster_at_a_time().await;
    let pki = crate::tls::Pki::new();
    let path = |n: &str| pki.path(n).to_str().expect("utf-8").to_owned();
    let urls: Vec<String> = (0..3)
        .map(|_| format!("https://127.0.0.1:{}", free_port()))
        .collect();
    let all = peers_arg(&urls);
    let (cert, key, ca) = (path("server.pem"), path("server-key.pem"), path("ca.pem"));
    let flags = ["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca];
    let mut c = Cluster {
        dir: tempfile::tempdir().expect("temp dir"),
        nodes: urls.iter().map(|_| None).collect(),
        urls: urls
            .iter()
            .map(|u| u.replace("https://", "http://"))
            .collect(),
        peers: vec![all; 3],
        extra: flags.iter().map(|s| s.to_string()).collect(),
    };
    for i in 0..3 {
        c.spawn(i);
    }
    let (client_cert, client_key) = (path("client.pem"), path("client-key.pem"));
    let creds = |server: &str| {
        vec![
            "--server".to_owned(),
            server.to_owned(),
            "--ca-cert".to_owned(),
            ca.clone(),
            "--client-cert".to_owned(),
            client_cert.clone(),
            "--client-key".to_owned(),
            client_key.clone(),
        ]
    };
    // Formed: some node serves (asked with the CLI, over mTLS).
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = 'found: loop {
        for (i, url) in urls.iter().enumerate() {
            let mut args = vec![
                "cluster".to_owned(),
                "status".to_owned(),
                "--json".to_owned(),
            ];
            args.extend(creds(url));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_cli(&args, &[]).await;
            if out.code == 0 && out.stdout.contains("\"serving\":true") {
                break 'found i;
            }
        }
        assert!(Instant::now() < deadline, "no leader over mTLS within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = (leader + 1) % 3;
    let mut args = vec![
        "acquire".to_owned(),
        "tls/r".to_owned(),
        "--json".to_owned(),
    ];
    args.extend(creds(&urls[follower]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"token\":1"), "{}", out.stdout);

    // No client certificate: the handshake is refused before any Raft message.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&ca).expect("ca"),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(urls[leader].clone())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut raft = leasehold::proto::raft_service_client::RaftServiceClient::new(channel);
    let refused = raft
        .vote(proto::RaftMessage {
            data: b"{}".to_vec(),
            blob: Vec::new(),
        })
        .await
        .expect_err("a stranger reached RaftService");
    assert_ne!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}

/// A single node that has run without `--peers` becomes the first member
/// of a cluster: its leases and token sequence carry over, the members
/// added later get them (in a snapshot), and they survive the first node's
/// death. Its data directory is then refused without `--peers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_node_grows_into_a_cluster_keeping_its_leases() {
    let _one = one_cluster_at_a_time().await;
    let urls: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let n1 = dir.path().join("n1");
    let n1s = n1.to_str().expect("utf-8").to_owned();
    let listen = |i: usize| urls[i].trim_start_matches("http://").to_owned();

    // A single node grants a lease.
    let single = ServerProcess::spawn_program(
        &binary(),
        &["serve", "--listen", &listen(0), "--data-dir", &n1s],
    );
    let mut client = lease_client(&urls[0]);
    let old = grant(&mut client, acquire_req("grown/r", "w", 120_000)).await;
    drop(single); // killed

    // The same directory, as node 1 of a one-node cluster.
    let own = format!("1={}", urls[0]);
    let _node1 = ServerProcess::spawn_program(
        &binary(),
        &[
            "serve",
            "--node-id",
            "1",
            "--listen",
            &listen(0),
            "--data-dir",
            &n1s,
            "--peers",
            &own,
        ],
    );
    let mut others = Vec::new();
    for i in 1..3 {
        let d = dir.path().join(format!("n{}", i + 1));
        let id = (i + 1).to_string();
        others.push(ServerProcess::spawn_program(
            &binary(),
            &[
                "serve",
                "--node-id",
                &id,
                "--join",
                "--listen",
                &listen(i),
                "--data-dir",
                d.to_str().expect("utf-8"),
            ],
        ));
    }
    let mut client = lease_client(&urls[0]);
    let held = match try_acquire_retrying(&mut client, acquire_req("grown/r", "x", 1000)).await {
        Outcome::Held(h) => h,
        Outcome::Lease(l) => panic!("the imported lease was lost: granted {l:?}"),
    };
    assert_eq!(held.token, old.token);
    let fresh = grant(&mut client, acquire_req("grown/new", "w", 120_000)).await;
    assert!(fresh.token > old.token);
    for i in 1..3 {
        let member = format!("{}={}", i + 1, urls[i]);
        let out = run_cli(&["cluster", "add", &member, "--server", &urls[0]], &[]).await;
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let last = status(&urls[0]).await.expect("status").last_log_index;
    converged(&urls, &[0, 1, 2], last, Duration::from_secs(10)).await;

    // Node 1 dies: the others elect a leader that has the imported lease.
    drop(_node1);
    let c = Cluster {
        dir,
        urls: urls.clone(),
        peers: Vec::new(),
        nodes: vec![None, None, None],
        extra: Vec::new(),
    };
    let leader = c.leader_among(&[1, 2], Duration::from_secs(5)).await;
    let mut client = lease_client(&urls[leader]);
    match try_acquire_retrying(&mut client, acquire_req("grown/r", "x", 1000)).await {
        Outcome::Held(h) => assert_eq!(h.token, old.token),
        Outcome::Lease(l) => panic!("the imported lease was lost after failover: {l:?}"),
    }
    let later = grant(&mut client, acquire_req("grown/later", "w", 120_000)).await;
    assert!(later.token > fresh.token);

    // Without --peers, node 1's directory is refused (its store is stale).
    let out = tokio::process::Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", &n1s])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to a cluster node"));
}

async fn try_acquire_retrying(
    c: &mut LeaseServiceClient<Channel>,
    req: proto::AcquireRequest,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_acquire(c, req.clone()).await {
            Ok(o) => return o,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("acquire of {} failed: {s:?}", req.resource),
        }
    }
}

/// Every node's PublicKeys answer (each answers from its own copy of the
/// cluster's key set once it has one), or `None` for a node that does not
/// answer within 500 ms.
async fn public_keys(url: &str) -> Option<Vec<proto::PublicKey>> {
    let mut client = lease_client(url);
    let call = client.public_keys(proto::PublicKeysRequest {});
    match tokio::time::timeout(Duration::from_millis(500), call).await {
        Ok(Ok(r)) => Some(r.into_inner().keys),
        _ => None,
    }
}

/// The id of the key that signs in `keys`.
fn signing_id(keys: &[proto::PublicKey]) -> String {
    let signing: Vec<&proto::PublicKey> = keys
        .iter()
        .filter(|k| k.status == proto::KeyStatus::Signing as i32)
        .collect();
    assert_eq!(signing.len(), 1, "{keys:?}");
    signing[0].key_id.clone()
}

/// Waits until every node in `among` answers PublicKeys with the same set
/// whose signing key satisfies `signing`, and returns that set.
async fn same_keys(
    urls: &[String],
    among: &[usize],
    signing: impl Fn(&str) -> bool,
    within: Duration,
) -> Vec<proto::PublicKey> {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = Vec::new();
        for &i in among {
            seen.push(public_keys(&urls[i]).await);
        }
        if let Some(Some(first)) = seen.first() {
            let agreed = seen.iter().all(|s| s.as_ref() == Some(first));
            if agreed && signing(&signing_id(first)) {
                return first.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "nodes {among:?} did not agree on the key set within {within:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The signing key's id in node `i`'s key file (what a restart loads).
fn signing_in_file(c: &Cluster, i: usize) -> String {
    let path = c
        .dir
        .path()
        .join(format!("n{}", i + 1))
        .join(leasehold::keys::KEY_FILE);
    let text = std::fs::read_to_string(&path).expect("key file");
    let set = leasehold::keys::KeySet::decode(&text).expect("a key set");
    set.signer().id().to_string()
}

/// Waits until the key file of every node in `among` has `id` signing.
async fn files_sign_with(c: &Cluster, among: &[usize], id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let files: Vec<String> = among.iter().map(|&i| signing_in_file(c, i)).collect();
        if files.iter().all(|f| f == id) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the key files of {among:?} sign with {files:?}, not {id}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 17 in a cluster: the key set is replicated state. Every node
/// answers PublicKeys with the same set; fences granted before and after
/// kill -9 of the leader verify with the set fetched before, under the same
/// key id; `keys rotate` through a follower reaches every node (and its key
/// file) within seconds, the new leader signs with the new key, and a
/// node restarted afterwards, or down during the rotation, or restarted
/// with its key file lost, has it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_signs_with_one_replicated_key_set() {
    let _one = one_cluster_at_a_time().await;
    let flags = ["--election-timeout", "300ms", "--heartbeat", "50ms"];
    let mut c = Cluster::start(3, &flags).await;
    let all = [0, 1, 2];
    let leader = c.leader(Duration::from_secs(5)).await;
    let keys = same_keys(&c.urls, &all, |_| true, Duration::from_secs(5)).await;
    let first_id = signing_id(&keys);
    let verifier = leasehold::cli::keys::verifier(&keys).expect("valid keys");
    // The followers took on the first leader's keys, in memory and on disk.
    files_sign_with(&c, &all, &first_id, Duration::from_secs(3)).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let log = c.dir.path().join("n1/raft/raft-log");
        let mode = std::fs::metadata(log).expect("log").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the Raft log holds the secret");
    }

    let mut direct = lease_client(&c.urls[leader]);
    let before = grant(&mut direct, acquire_req("keys/before", "w", 60_000)).await;
    c.node(leader).kill9();
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let new = c.leader_among(&others, Duration::from_secs(5)).await;
    let follower = others.iter().copied().find(|&i| i != new).expect("third");
    let after = grant(
        &mut lease_client(&c.urls[follower]),
        acquire_req("keys/after", "w", 60_000),
    )
    .await;
    for (lease, resource) in [(&before, "keys/before"), (&after, "keys/after")] {
        let verified = verifier
            .verify(&lease.signed_fence, resource)
            .unwrap_or_else(|e| panic!("{resource}: {e}"));
        assert_eq!(verified.key_id.to_string(), first_id, "{resource}");
        assert_eq!(verified.token, lease.token, "{resource}");
    }

    // `keys rotate` through a follower: committed, then on every live node.
    let out = run_cli(&["keys", "rotate", "--server", &c.urls[follower]], &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rotated = same_keys(
        &c.urls,
        &others,
        |id| id != first_id,
        Duration::from_secs(3),
    )
    .await;
    let new_id = signing_id(&rotated);
    assert!(out.stdout.contains(&new_id), "{}", out.stdout);
    files_sign_with(&c, &others, &new_id, Duration::from_secs(3)).await;
    let signed = grant(
        &mut lease_client(&c.urls[new]),
        acquire_req("keys/rotated", "w", 60_000),
    )
    .await;
    let new_verifier = leasehold::cli::keys::verifier(&rotated).expect("valid keys");
    let verified = new_verifier
        .verify(&signed.signed_fence, "keys/rotated")
        .expect("signed with the rotated key");
    assert_eq!(verified.key_id.to_string(), new_id);
    // The old key still verifies (active, not retired).
    assert!(new_verifier
        .verify(&after.signed_fence, "keys/after")
        .is_ok());

    // A follower restarted afterwards still has it; the node that was down
    // during the rotation catches up to it.
    c.node(follower).kill9();
    c.spawn(follower);
    c.spawn(leader);
    let back = same_keys(&c.urls, &all, |id| id == new_id, Duration::from_secs(5)).await;
    assert_eq!(back, rotated);
    files_sign_with(&c, &all, &new_id, Duration::from_secs(5)).await;

    // A follower whose key file is lost restarts without any flag and
    // rebuilds the file from its own Raft data.
    let leading = c.leader(Duration::from_secs(5)).await;
    let lost = all
        .iter()
        .copied()
        .find(|&i| i != leading)
        .expect("a follower");
    c.node(lost).kill9();
    let key_file = c
        .dir
        .path()
        .join(format!("n{}", lost + 1))
        .join(leasehold::keys::KEY_FILE);
    std::fs::remove_file(&key_file).expect("remove the key file");
    c.spawn(lost);
    files_sign_with(&c, &[lost], &new_id, Duration::from_secs(5)).await;
    let back = same_keys(&c.urls, &all, |id| id == new_id, Duration::from_secs(5)).await;
    assert_eq!(back, rotated);
}

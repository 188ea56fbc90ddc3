//! Test harness: an in-process server on an ephemeral port, a temp data dir,
//! and restart(); plus a spawned-binary server for crash tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use leasehold::auth::{AdminToken, BearerAuth};
use leasehold::cli::common::AdminClient;
use leasehold::coordinator::Config;
use leasehold::proto::admin_service_client::AdminServiceClient;
use leasehold::proto::lease_service_client::LeaseServiceClient;
use leasehold::proto::{self, acquire_response::Outcome};
use leasehold::server::{self, ServerConfig};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub type Client = LeaseServiceClient<Channel>;

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: Arc<TempDir>,
    pub config: Config,
    /// Server options besides the coordinator's (TLS, admin token, limits).
    pub options: ServerConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Lets `d` pass at once on Tokio's clock: pause, advance, resume. The
/// in-process server's coordinator reads this clock (`leasehold::clock`), so
/// its expiry timer fires and its leases age exactly by `d`, with no real
/// sleep and no race with a slow machine. Current-thread tests only.
pub async fn pass_time(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(dir, config).await
    }

    /// A server with these options (their `data_dir` and `coordinator` are
    /// replaced by a temp dir and `config`).
    pub async fn start_with_options(config: Config, options: ServerConfig) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in_with(dir, config, options, "127.0.0.1:0".parse().expect("addr")).await
    }

    async fn start_in(dir: Arc<TempDir>, config: Config) -> Self {
        Self::start_in_with(
            dir,
            config,
            ServerConfig::default(),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
    }

    async fn start_in_with(
        dir: Arc<TempDir>,
        config: Config,
        options: ServerConfig,
        addr: SocketAddr,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server_config = ServerConfig {
            data_dir: dir.path().to_owned(),
            coordinator: config.clone(),
            ..options.clone()
        };
        let task = tokio::spawn(async move {
            server::run(listener, server_config, async {
                let _ = stopped.await;
            })
            .await
            .expect("server failed");
        });
        TestServer {
            addr,
            dir,
            config,
            options,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// An admin client without a token (fine on loopback without one).
    pub async fn admin(&self) -> AdminClient {
        admin_client(&self.url(), None).await
    }

    /// An admin client that sends `token`.
    pub async fn admin_with(&self, token: &str) -> AdminClient {
        admin_client(&self.url(), Some(token)).await
    }

    /// Graceful stop: waits for the server to finish and flush.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server did not stop within 10 s")
                .expect("server task panicked");
        }
    }

    /// Stops and starts again on the same data directory (new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let next = Self::start_in_with(
            self.dir.clone(),
            self.config.clone(),
            self.options.clone(),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await;
        *self = next;
    }
}

impl TestServer {
    /// Stops and starts again on the same data directory and the same port,
    /// so clients reconnect to it by themselves.
    pub async fn restart_same_port(&mut self) {
        self.stop().await;
        let next = Self::start_in_with(
            self.dir.clone(),
            self.config.clone(),
            self.options.clone(),
            self.addr,
        )
        .await;
        *self = next;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn connect(url: &str) -> Client {
    for _ in 0..100 {
        if let Ok(c) = LeaseServiceClient::connect(url.to_owned()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not connect to {url}");
}

/// A channel to `url`, retried briefly while the server starts.
pub async fn channel(url: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(c) = Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not connect to {url}");
}

/// An admin client over `channel`, sending `token` if given.
pub fn admin_over(channel: Channel, token: Option<&str>) -> AdminClient {
    let token = token.map(|t| AdminToken::new(t, "test").expect("valid token"));
    AdminServiceClient::with_interceptor(channel, BearerAuth::new(token.as_ref()))
}

pub async fn admin_client(url: &str, token: Option<&str>) -> AdminClient {
    admin_over(channel(url).await, token)
}

pub fn acquire_req(resource: &str, holder: &str, ttl_ms: u64) -> proto::AcquireRequest {
    proto::AcquireRequest {
        resource: resource.into(),
        holder: holder.into(),
        ttl_ms,
        request_id: String::new(),
        wait_ms: 0,
    }
}

/// Acquire that must be granted.
pub async fn grant(c: &mut Client, req: proto::AcquireRequest) -> proto::Lease {
    match c
        .acquire(req)
        .await
        .expect("acquire failed")
        .into_inner()
        .outcome
    {
        Some(Outcome::Lease(l)) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// Acquire that must find the resource held.
pub async fn held(c: &mut Client, req: proto::AcquireRequest) -> proto::Held {
    match c
        .acquire(req)
        .await
        .expect("acquire failed")
        .into_inner()
        .outcome
    {
        Some(Outcome::Held(h)) => h,
        other => panic!("expected held, got {other:?}"),
    }
}

/// Renew `lease`, keeping its TTL.
pub async fn renew(
    c: &mut Client,
    lease: &proto::Lease,
) -> Result<proto::RenewResponse, tonic::Status> {
    c.renew(proto::RenewRequest {
        lease_id: lease.lease_id.clone(),
        token: lease.token,
        ttl_ms: 0,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Release `lease`; `Ok(released)`.
pub async fn release(c: &mut Client, lease: &proto::Lease) -> Result<bool, tonic::Status> {
    c.release(proto::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
        token: lease.token,
    })
    .await
    .map(|r| r.into_inner().released)
}

/// Waits (at most 5 s) until `resource` has exactly `n` waiters in line.
pub async fn wait_for_waiters(c: &mut Client, resource: &str, n: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while describe(c, resource).await.waiters != n {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw {n} waiters on {resource}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn describe(c: &mut Client, resource: &str) -> proto::DescribeResponse {
    c.describe(proto::DescribeRequest {
        resource: resource.into(),
    })
    .await
    .expect("describe failed")
    .into_inner()
}

/// The built `leasehold` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leasehold"))
}

/// An example binary (`examples/NAME`), built by `cargo test` (or `cargo
/// build --examples`) next to the crate's own binary.
pub fn example(name: &str) -> PathBuf {
    let path = binary()
        .parent()
        .expect("the binary's directory")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples` first (plain `cargo test` builds it, \
         `cargo test --test it` does not)",
        path.display()
    );
    path
}

/// A `leasehold serve` child process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Kept open: a server that prints more (`http on ADDR`) must not meet
    /// a closed pipe.
    stdout: BufReader<std::process::ChildStdout>,
}

impl ServerProcess {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        let dir = data_dir.to_str().expect("utf-8 temp dir");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        Self::spawn_program(&binary(), &args)
    }

    /// Spawns any program that prints `listening on ADDR` as its first line.
    pub fn spawn_program(program: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the server process");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        ServerProcess {
            child,
            addr,
            stdout,
        }
    }

    /// The next line the process prints (blocking).
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read a line");
        line.trim_end().to_owned()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP proxy that can lose replies: for testing retries.
pub struct Proxy {
    pub addr: SocketAddr,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let swallow = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (sw, conns, cut_tx) = (swallow.clone(), connections.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let sw = sw.clone();
                let mut cut_rx = cut_tx.subscribe();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw_half) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw_half);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = sr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !sw.load(Ordering::SeqCst) {
                                cw.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            swallow,
            cut,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on the server's bytes are dropped; after `after`, every
    /// open connection is cut and the proxy forwards normally again.
    pub fn lose_replies_then_cut(&self, after: Duration) {
        use std::sync::atomic::Ordering;
        self.swallow.store(true, Ordering::SeqCst);
        let (swallow, cut) = (self.swallow.clone(), self.cut.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            swallow.store(false, Ordering::SeqCst);
            cut.send_modify(|g| *g += 1);
        });
    }
}

/// What a `leasehold` CLI run printed and returned.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The `leasehold` binary with `args`, no stdin, and none of the caller's
/// `LEASEHOLD_*` variables except `envs`; killed after 10 s.
pub fn cli_command(args: &[&str], envs: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in [
        "LEASEHOLD_SERVER",
        "LEASEHOLD_ADMIN_TOKEN",
        "LEASEHOLD_ADMIN_TOKEN_FILE",
        "LEASEHOLD_CA_CERT",
        "LEASEHOLD_CLIENT_CERT",
        "LEASEHOLD_CLIENT_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(envs.iter().copied());
    cmd
}

/// Runs the CLI to completion (see [`cli_command`]).
pub async fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    let out = tokio::time::timeout(Duration::from_secs(10), cli_command(args, envs).output())
        .await
        .unwrap_or_else(|_| panic!("leasehold {args:?} took more than 10 s"))
        .expect("run leasehold");
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

//! A loopback TCP proxy the harness can break: it cuts every open link,
//! swallows replies for a while, or partitions its target (new links
//! refused, or every byte in both directions dropped until it heals).
//!
//! The harness puts one in front of each coordinator node for the workers,
//! and, in cluster mode, one on every directed node-to-node link (node `i`
//! reaches node `j` only through its own proxy to `j`), so one node can be
//! cut off from the others while the workers still reach it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forwards both ways.
    Up = 0,
    /// Closes every new link at once (the target's port looks closed).
    Refuse = 1,
    /// Accepts links and drops every byte both ways (packets lost in a
    /// partition: the sender's calls hang until their deadline).
    Blackhole = 2,
}

/// A proxy to one target address.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bumped to close every open link.
    cut: watch::Sender<u64>,
    /// Drop the target's replies (the client's requests still arrive).
    swallow: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let swallow = Arc::new(AtomicBool::new(false));
        let mode = Arc::new(AtomicU8::new(Mode::Up as u8));
        let (cut_tx, sw, md) = (cut.clone(), swallow.clone(), mode.clone());
        let task = tokio::spawn(async move {
            // Bounded: 100,000 links is far more than any run opens.
            for _ in 0..100_000 {
                let Ok((client, _)) = listener.accept().await else {
                    break;
                };
                // Subscribe before connecting, so a cut cannot be missed.
                let cut_rx = cut_tx.subscribe();
                tokio::spawn(link(client, target, cut_rx, sw.clone(), md.clone()));
            }
        });
        Ok(Proxy {
            addr,
            cut,
            swallow,
            mode,
            task,
        })
    }

    /// Sets what the proxy does from now on.
    pub fn set(&self, mode: Mode) {
        let old = self.mode.swap(mode as u8, Ordering::SeqCst);
        // Refusing closes what is open; healing closes the blackholed
        // links, so their clients reconnect through a working one.
        if old != mode as u8 && mode != Mode::Blackhole {
            self.cut.send_modify(|g| *g += 1);
        }
    }

    fn mode(mode: &AtomicU8) -> Mode {
        match mode.load(Ordering::SeqCst) {
            1 => Mode::Refuse,
            2 => Mode::Blackhole,
            _ => Mode::Up,
        }
    }
}

/// Cuts every open link of every proxy at once (after swallowing their
/// replies for `swallow_for`).
pub async fn cut_all(proxies: &[Proxy], swallow_for: Option<Duration>) {
    if let Some(d) = swallow_for {
        for p in proxies {
            p.swallow.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(d).await;
    }
    for p in proxies {
        p.cut.send_modify(|g| *g += 1);
        p.swallow.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut.send_modify(|g| *g += 1);
        self.task.abort();
    }
}

/// One client's link: forwards until either side closes, the proxy cuts,
/// or (blackholed) drops everything until the proxy heals.
async fn link(
    client: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<u64>,
    swallow: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
) {
    match Proxy::mode(&mode) {
        Mode::Refuse => return, // dropped: the client sees the link close
        Mode::Blackhole => {
            let (mut cr, _cw) = client.into_split();
            tokio::select! {
                _ = drain(&mut cr) => {}
                _ = cut.changed() => {}
            }
            return;
        }
        Mode::Up => {}
    }
    let Ok(Ok(server)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)).await
    else {
        return; // the target is down: drop the client's link
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    tokio::select! {
        _ = pump(&mut cr, &mut sw, &mode, None) => {}
        _ = pump(&mut sr, &mut cw, &mode, Some(&swallow)) => {}
        _ = cut.changed() => {}
    }
}

/// Reads and drops bytes until EOF or an error.
async fn drain(from: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Copies bytes until EOF or an error; drops them while blackholed or
/// while `swallow` is set.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mode: &AtomicU8,
    swallow: Option<&AtomicBool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let dropped = Proxy::mode(mode) == Mode::Blackhole
            || swallow.is_some_and(|s| s.load(Ordering::SeqCst));
        if !dropped {
            to.write_all(&buf[..n]).await?;
        }
    }
}

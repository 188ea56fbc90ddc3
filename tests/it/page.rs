//! The lease page in a real browser: Debian's headless Chromium, driven over
//! the DevTools protocol (chromiumoxide). A lease a worker takes appears
//! with its token within a second; a released one disappears within a
//! second; an operator who entered the admin token revokes a worker's lease
//! from the page (after confirming), and the worker learns it is gone.
//!
//! Needs `chromium` (`apt-get install -y chromium`; `.ci/run` installs it):
//! without it the test fails and says so. Set `LEASEHOLD_PAGE_SCREENSHOT`
//! to a path to keep the screenshot (the README's `docs/lease-page.png`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, Page};
use futures_util::StreamExt;
use leasehold::auth::AdminToken;
use leasehold::server::ServerConfig;
use leasehold_client::{Client, LostReason};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::observe_support::Observed;

const TOKEN: &str = "page-test-admin-token";

/// Debian's Chromium, or a clear failure saying how to install it.
fn chromium() -> PathBuf {
    let candidates = [
        std::env::var_os("CHROMIUM").map(PathBuf::from),
        Some(PathBuf::from("/usr/bin/chromium")),
        Some(PathBuf::from("/usr/bin/chromium-browser")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the lease page test needs Chromium and it is not installed: run \
             `apt-get install -y chromium` (Debian's package; .ci/run installs it), \
             or point CHROMIUM at a chromium binary"
            )
        })
}

/// A headless Chromium of our own (fresh profile, no network but loopback
/// traffic of ours), killed when dropped.
struct Chromium {
    browser: Browser,
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn start() -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-dev-shm-usage",
                "--window-size=1100,860",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // It prints `DevTools listening on ws://…` once it is ready.
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("chromium's stderr") {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited before it listened for DevTools");
        })
        .await
        .expect("chromium listens for DevTools within 30 s");
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (browser, mut handler) = Browser::connect(ws).await.expect("connect over DevTools");
        tokio::spawn(async move { while handler.next().await.is_some() {} });
        Chromium {
            browser,
            _child: child,
            _profile: profile,
        }
    }
}

/// Evaluates `js` until it returns true, at most `within`; returns how long it took.
async fn wait_for(page: &Page, js: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let ok = page
            .evaluate(js)
            .await
            .ok()
            .and_then(|v| v.into_value::<bool>().ok())
            .unwrap_or(false);
        if ok {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}: {js}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn row_with_token(resource: &str, token: u64) -> String {
    format!(
        "(() => {{ const r = document.querySelector('tr[data-resource=\"{resource}\"]'); \
         return !!r && r.querySelector('.token').textContent === '{token}'; }})()"
    )
}

fn no_row(resource: &str) -> String {
    format!("document.querySelector('tr[data-resource=\"{resource}\"]') === null")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_leases_live_and_revokes_with_the_admin_token() {
    let token = AdminToken::new(TOKEN, "test").unwrap();
    let mut server = Observed::start(ServerConfig {
        admin_token: Some(token),
        ..ServerConfig::default()
    })
    .await;
    let chromium = Chromium::start().await;
    let page = chromium
        .browser
        .new_page("about:blank")
        .await
        .expect("a tab");
    page.execute(SetDeviceMetricsOverrideParams::new(1100, 860, 1.0, false))
        .await
        .expect("viewport");
    page.goto(server.page_url()).await.expect("load the page");

    // The server has a token: the page asks for it, and shows nothing yet.
    wait_for(
        &page,
        "!document.querySelector('#auth').hidden",
        Duration::from_secs(10),
    )
    .await;
    let field = page.find_element("#token").await.expect("token field");
    field.click().await.unwrap();
    field.type_str(TOKEN).await.unwrap();
    field.press_key("Enter").await.unwrap();
    wait_for(
        &page,
        "document.body.classList.contains('can-revoke') && document.querySelector('#conn').dataset.state === 'live'",
        Duration::from_secs(10),
    )
    .await;

    // A worker acquires: the lease appears with its token within a second.
    let client = Client::connect(server.url()).unwrap();
    let lease = client
        .acquire("jobs/nightly")
        .holder("worker-7@host-a")
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    let shown = wait_for(
        &page,
        &row_with_token("jobs/nightly", lease.token()),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        shown <= Duration::from_secs(1),
        "the lease appeared after {shown:?}"
    );

    // Released: gone within a second.
    lease.release().await.unwrap();
    let gone = wait_for(&page, &no_row("jobs/nightly"), Duration::from_secs(5)).await;
    assert!(
        gone <= Duration::from_secs(1),
        "the lease disappeared after {gone:?}"
    );

    // A few leases to look at, then the screenshot.
    let mut keep = Vec::new();
    for (resource, holder, ttl) in [
        ("reports/daily", "reporter-3@host-b", 20),
        ("invoices/eu", "billing-1@host-c", 12),
        ("jobs/reindex", "indexer@host-d", 60),
    ] {
        keep.push(
            client
                .acquire(resource)
                .holder(holder)
                .ttl(Duration::from_secs(ttl))
                .await
                .unwrap(),
        );
    }
    // The worker whose lease the operator will revoke (short TTL: its
    // keepalive learns of the revoke within a second or so).
    let worker = client
        .acquire("orders/shard-3")
        .holder("worker-2@host-b")
        .ttl(Duration::from_secs(3))
        .await
        .unwrap();
    let worker_handle = worker.handle();
    wait_for(
        &page,
        &row_with_token("orders/shard-3", worker.token()),
        Duration::from_secs(5),
    )
    .await;
    // Someone waits in line for a held resource: the waiters column says
    // so at the next snapshot (at most 5 s; waiters are not in the events).
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .acquire("jobs/reindex")
                .holder("indexer-2@host-e")
                .wait(Duration::from_secs(60))
                .await
        })
    };
    // Some churn for the grants/s chart: short lock cycles, bounded.
    let churn = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..120u64 {
                let taken = client
                    .acquire(format!("batch/{}", i % 4))
                    .holder("batcher@host-f")
                    .ttl(Duration::from_secs(2))
                    .await;
                if let Ok(l) = taken {
                    let _ = l.release().await;
                }
                tokio::time::sleep(Duration::from_millis(10 + (i % 10) * 8)).await;
            }
        })
    };
    wait_for(
        &page,
        "(() => { const r = document.querySelector('tr[data-resource=\"jobs/reindex\"]'); \
         return !!r && r.querySelector('.waiters').textContent === '1'; })()",
        Duration::from_secs(8),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), churn)
        .await
        .expect("the churn ends")
        .unwrap();
    page.find_element("tr[data-resource=\"reports/daily\"] td.resource a")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &page,
        "document.querySelectorAll('#history-table tbody tr').length === 1",
        Duration::from_secs(5),
    )
    .await;
    let shot = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .expect("screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    let path = std::env::var_os("LEASEHOLD_PAGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("leasehold-lease-page.png"));
    std::fs::write(&path, &shot).expect("write the screenshot");
    eprintln!("screenshot: {}", path.display());
    // The same page on a phone-sized screen.
    page.execute(SetDeviceMetricsOverrideParams::new(390, 844, 2.0, true))
        .await
        .expect("phone viewport");
    let phone = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .expect("screenshot");
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("lease-page");
    let phone_path = path.with_file_name(format!("{stem}-phone.png"));
    std::fs::write(&phone_path, &phone).expect("write the phone screenshot");
    eprintln!("phone screenshot: {}", phone_path.display());
    page.execute(SetDeviceMetricsOverrideParams::new(1100, 860, 1.0, false))
        .await
        .expect("viewport");
    waiting.abort();

    // Revoke from the page: the button asks first; confirming revokes.
    page.find_element("tr[data-resource=\"orders/shard-3\"] button.revoke")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &page,
        "document.querySelector('#confirm').open",
        Duration::from_secs(5),
    )
    .await;
    let text: String = page
        .evaluate("document.querySelector('#confirm-text').textContent")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert!(
        text.contains("orders/shard-3") && text.contains(&worker.token().to_string()),
        "{text}"
    );
    page.find_element("#confirm-yes")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&page, &no_row("orders/shard-3"), Duration::from_secs(5)).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), worker_handle.lost())
        .await
        .expect("the worker learns within 5 s that its lease is gone");
    assert_eq!(reason, LostReason::Gone);
    let after = client.describe("orders/shard-3").await.unwrap();
    assert!(!after.held, "revoked: nobody holds it");
    // The other leases are untouched.
    for l in &keep {
        assert!(client.describe(l.resource()).await.unwrap().held);
    }
    drop(worker);
    for l in keep {
        l.release().await.unwrap();
    }
    server.stop().await;
}

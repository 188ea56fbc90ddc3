//! The operator CLI (`leasehold leases …`, `leasehold status`), run as the
//! built binary against a real server.

use std::time::Duration;

use leasehold::auth::AdminToken;
use leasehold::coordinator::Config;
use leasehold::server::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

use crate::support::*;

fn json_lines(out: &CliOutput) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn admin_cli_list_as_table_and_json() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("jobs/a", "alice", 90_000)).await;
    grant(&mut c, acquire_req("jobs/b", "bob", 5000)).await;
    grant(&mut c, acquire_req("other", "carol", 5000)).await;

    let out = run_cli(&["leases", "list", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    let header: Vec<&str> = lines[0].split("  ").filter(|s| !s.is_empty()).collect();
    assert_eq!(
        header,
        [
            "RESOURCE",
            "HOLDER",
            "TOKEN",
            "TTL",
            "EXPIRES IN",
            "WAITERS"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["jobs/a", "alice", &a.token.to_string(), "1m30s"]
    );
    assert!(!out.stdout.contains(&a.lease_id));

    // --prefix, --json, and the server from LEASEHOLD_SERVER; a page size of
    // one makes the CLI follow the pages.
    let out = run_cli(
        &[
            "leases",
            "list",
            "--prefix",
            "jobs/",
            "--json",
            "--page-size",
            "1",
        ],
        &[("LEASEHOLD_SERVER", &url)],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let leases = json_lines(&out);
    assert_eq!(leases.len(), 2);
    let l = &leases[0];
    assert_eq!(l["resource"], "jobs/a");
    assert_eq!(l["holder"], "alice");
    assert_eq!(l["token"], a.token);
    assert_eq!(l["ttl_ms"], 90_000);
    assert!(l["expires_in_ms"].as_u64().unwrap() <= 90_000);
    assert!(l["acquired_at_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(l["acquired_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(l["renew_count"], 0);
    assert_eq!(l["waiters"], 0);
    assert!(l.get("lease_id").is_none());

    let out = run_cli(
        &["leases", "list", "--prefix", "none/", "--server", &url],
        &[],
    )
    .await;
    assert_eq!(
        (out.code, out.stdout.trim()),
        (0, "no live leases under prefix \"none/\"")
    );
}

#[tokio::test]
async fn admin_cli_get_shows_one_lease_or_exits_3() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("jobs/a", "alice", 5000)).await;
    // A longer name under it must not be mistaken for it.
    grant(&mut c, acquire_req("jobs/a/b", "bob", 5000)).await;
    let out = run_cli(&["leases", "get", "jobs/a", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("holder       alice"), "{out:?}");
    assert!(
        out.stdout.contains(&format!("token        {}", a.token)),
        "{out:?}"
    );
    assert!(out.stdout.contains("ttl          5s"), "{out:?}");
    let out = run_cli(
        &["leases", "get", "jobs/a", "--json", "--server", &url],
        &[],
    )
    .await;
    assert_eq!(json_lines(&out)[0]["holder"], "alice");
    let out = run_cli(&["leases", "get", "jobs", "--server", &url], &[]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("jobs is not held"), "{out:?}");
}

#[tokio::test]
async fn admin_cli_revoke_needs_confirmation_then_frees_the_resource() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "alice", 10_000)).await;
    // stdin is not a terminal: no --yes, no revoke.
    let out = run_cli(&["leases", "revoke", "r", "--server", &url], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("pass --yes"), "{out:?}");
    assert!(describe(&mut c, "r").await.held);
    // A token guard that does not match: exit 3, nothing revoked.
    let wrong = (a.token + 1).to_string();
    let out = run_cli(
        &[
            "leases", "revoke", "r", "--yes", "--token", &wrong, "--server", &url,
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(describe(&mut c, "r").await.held);
    let token = a.token.to_string();
    let out = run_cli(
        &[
            "leases", "revoke", "r", "--yes", "--token", &token, "--server", &url,
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        format!("revoked r (holder alice, token {})", a.token)
    );
    let err = renew(&mut c, &a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let out = run_cli(&["leases", "revoke", "r", "-y", "--server", &url], &[]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("nothing to revoke"), "{out:?}");
}

#[tokio::test]
async fn admin_cli_history_and_status() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("h", "alice", 10_000)).await;
    release(&mut c, &a).await.unwrap();
    let b = grant(&mut c, acquire_req("h", "bob", 10_000)).await;
    let out = run_cli(&["leases", "history", "h", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(
        lines[0].starts_with("TOKEN  HOLDER  ACQUIRED AT"),
        "{out:?}"
    );
    assert!(
        lines[1].starts_with(&format!("{}      bob", b.token)),
        "{out:?}"
    );
    assert!(lines[1].contains(" live "), "{out:?}");
    assert!(lines[2].contains(" released "), "{out:?}");
    let out = run_cli(&["leases", "history", "h", "--json", "--server", &url], &[]).await;
    let grants = json_lines(&out);
    assert_eq!(grants[0]["ended"], "live");
    assert!(grants[0]["ended_at"].is_null());
    assert_eq!(grants[1]["holder"], "alice");
    assert_eq!(grants[1]["ended"], "released");
    assert!(
        grants[1]["ended_at_unix_ms"].as_u64().unwrap()
            >= grants[1]["acquired_at_unix_ms"].as_u64().unwrap()
    );

    let out = run_cli(&["status", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("live leases       1"), "{out:?}");
    assert!(out.stdout.contains("grants            2"), "{out:?}");
    let out = run_cli(&["status", "--json", "--server", &url], &[]).await;
    let s = &json_lines(&out)[0];
    assert_eq!(
        (s["live_leases"].as_u64(), s["releases"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["token_high_water"], b.token);
}

#[tokio::test]
async fn admin_cli_watch_prints_events_as_they_happen() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let mut child = cli_command(
        &[
            "leases", "watch", "--prefix", "w/", "--json", "--server", &url,
        ],
        &[],
    )
    .spawn()
    .expect("spawn watch");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(5), stderr.next_line())
        .await
        .expect("watch did not start")
        .unwrap()
        .unwrap();
    assert!(
        line.starts_with("watching leases under prefix \"w/\""),
        "{line}"
    );
    grant(&mut c, acquire_req("elsewhere", "x", 10_000)).await;
    let a = grant(&mut c, acquire_req("w/a", "alice", 100)).await;
    let mut events = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(2), stdout.next_line())
            .await
            .expect("no event within 2 s")
            .unwrap()
            .unwrap();
        events.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(events[0]["kind"], "acquired");
    assert_eq!(events[0]["lease"]["resource"], "w/a");
    assert_eq!(events[0]["lease"]["token"], a.token);
    assert_eq!(events[1]["kind"], "expired");
    assert!(events[1]["sequence"].as_u64() > events[0]["sequence"].as_u64());
    child.kill().await.unwrap();
}

#[tokio::test]
async fn admin_cli_reports_an_unreachable_server() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    for args in [
        vec!["status"],
        vec!["leases", "list"],
        vec!["leases", "get", "r"],
        vec!["leases", "revoke", "r", "--yes"],
        vec!["leases", "watch"],
        vec!["leases", "history", "r"],
    ] {
        let out = run_cli(&args, &[("LEASEHOLD_SERVER", &url)]).await;
        assert_eq!(out.code, 69, "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("cannot reach the coordinator at {url}"))
                && out
                    .stderr
                    .contains("is it running? (--server / LEASEHOLD_SERVER)"),
            "{args:?}: {out:?}"
        );
    }
}

#[tokio::test]
async fn admin_cli_sends_the_admin_token_from_a_file_or_the_environment() {
    let options = ServerConfig {
        admin_token: Some(AdminToken::new("sesame", "test").unwrap()),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with_options(Config::default(), options).await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "sesame\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "open-up\n").unwrap();
    let good = good.to_str().unwrap();
    let bad = bad.to_str().unwrap();

    let refused = "the server refused the admin token (UNAUTHENTICATED): check --admin-token-file / LEASEHOLD_ADMIN_TOKEN";
    // (arguments, environment, expected exit code)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32);
    let cases: Vec<Case> = vec![
        (vec!["status"], vec![], 5),
        (vec!["status", "--admin-token-file", bad], vec![], 5),
        (vec!["status"], vec![("LEASEHOLD_ADMIN_TOKEN", "wrong")], 5),
        (vec!["leases", "list", "--admin-token-file", bad], vec![], 5),
        (vec!["status", "--admin-token-file", good], vec![], 0),
        (vec!["status"], vec![("LEASEHOLD_ADMIN_TOKEN", "sesame")], 0),
        (
            vec!["leases", "list"],
            vec![("LEASEHOLD_ADMIN_TOKEN_FILE", good)],
            0,
        ),
    ];
    for (mut args, envs, code) in cases {
        args.extend(["--server", &url]);
        let out = run_cli(&args, &envs).await;
        assert_eq!(out.code, code, "{args:?} {envs:?}: {out:?}");
        if code == 5 {
            assert!(out.stderr.contains(refused), "{out:?}");
        }
    }
    let missing = dir.path().join("missing");
    let out = run_cli(
        &[
            "status",
            "--server",
            &url,
            "--admin-token-file",
            missing.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("cannot read the admin token file"),
        "{out:?}"
    );
}

/// Runs `leasehold args…` on a pseudo-terminal (util-linux `script`), typing `input`.
async fn run_on_terminal(args: &[&str], input: &str) -> CliOutput {
    use tokio::io::AsyncWriteExt;
    let command = std::iter::once(binary().display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("RUST_LOG", "warn")
        .env_remove("LEASEHOLD_ADMIN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("util-linux `script` runs the CLI on a terminal");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the CLI on a terminal took more than 10 s")
        .unwrap();
    drop(stdin);
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn admin_cli_revoke_asks_on_a_terminal() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "alice", 10_000)).await;
    let args = ["leases", "revoke", "r", "--server", &url];
    let out = run_on_terminal(&args, "n\n").await;
    let question = format!("revoke lease on r held by alice (token {})? [y/N]", a.token);
    assert!(out.stdout.contains(&question), "{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(describe(&mut c, "r").await.held);
    let out = run_on_terminal(&args, "y\n").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("revoked r (holder alice"), "{out:?}");
    assert!(!describe(&mut c, "r").await.held);
}

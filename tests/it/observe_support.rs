//! Harness for `serve --http`: a server with metrics and its HTTP listener
//! in this process (both on 127.0.0.1:0), a bare HTTP/1.1 client, and a
//! strict reader of the Prometheus text format.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leasehold::http::{self, HttpServer};
use leasehold::metrics::Metrics;
use leasehold::server::{self, ServerConfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A coordinator serving gRPC and HTTP, with metrics enabled.
pub struct Observed {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    _dir: Arc<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Observed {
    pub async fn start(options: ServerConfig) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let config = ServerConfig {
            data_dir: dir.path().to_owned(),
            metrics: Metrics::enabled(),
            ..options
        };
        let opened = server::open(&config).await.expect("open the store");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let web = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), web.local_addr().unwrap());
        let site = HttpServer::new(opened.coordinator.clone(), &config, http_addr).expect("http");
        // It stops with the coordinator.
        tokio::spawn(http::serve(web, site, std::future::pending()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve(grpc, config, opened, async {
                let _ = stopped.await;
            })
            .await
            .expect("server failed");
        });
        Observed {
            grpc: grpc_addr,
            http: http_addr,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn page_url(&self) -> String {
        format!("http://{}/", self.http)
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Answer {
        request(self.http, "GET", path, bearer, None).await
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, json: &str) -> Answer {
        request(self.http, "POST", path, bearer, Some(json)).await
    }

    /// Scrapes `/metrics`, checks the exposition strictly, returns its samples.
    pub async fn scrape(&self, bearer: Option<&str>) -> Samples {
        let a = self.get("/metrics", bearer).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            a.headers
        );
        strict_parse(&a.body)
    }

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
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to the end (5 s at most).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> Answer {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(b) = bearer {
            head.push_str(&format!("Authorization: Bearer {b}\r\n"));
        }
        let body = json.unwrap_or("");
        if json.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("HTTP answer within 5 s");
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines.next().expect("status line")[9..12]
        .parse()
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// Samples by series (`name{a="x",b="y"}` with labels sorted), plus the
/// declared type of each family.
#[derive(Debug, Default)]
pub struct Samples {
    pub values: HashMap<String, f64>,
    pub types: HashMap<String, String>,
}

impl Samples {
    /// The value of a series, 0 when absent (a counter not yet incremented).
    pub fn get(&self, series: &str) -> f64 {
        self.values.get(series).copied().unwrap_or(0.0)
    }

    /// `series` in `self` minus in `before`.
    pub fn delta(&self, before: &Samples, series: &str) -> f64 {
        self.get(series) - before.get(series)
    }
}

/// Reads the Prometheus text format (0.0.4) and refuses anything loose:
/// every line a `# HELP`/`# TYPE` comment or a sample of a declared family;
/// names and labels well formed; values numbers; counters named `_total`;
/// histogram buckets cumulative, ending at `+Inf` equal to `_count`; no
/// series twice; every family named `leasehold_…`. Also checked by the
/// `prometheus-parse` crate, which must read the same number of samples.
pub fn strict_parse(text: &str) -> Samples {
    let mut s = Samples::default();
    let mut helped = std::collections::HashSet::new();
    let mut count = 0;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (kind, rest) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            let (name, arg) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(valid_name(name), "{}", at());
            match kind {
                "HELP" => assert!(helped.insert(name.to_owned()), "HELP twice, {}", at()),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                        "{}",
                        at()
                    );
                    assert!(
                        s.types.insert(name.to_owned(), arg.to_owned()).is_none(),
                        "TYPE twice, {}",
                        at()
                    );
                    if arg == "counter" {
                        assert!(
                            name.ends_with("_total"),
                            "a counter not named _total, {}",
                            at()
                        );
                    }
                }
                _ => panic!("unknown comment, {}", at()),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value, {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("{}", at()));
                (
                    name,
                    parse_labels(inner).unwrap_or_else(|| panic!("labels, {}", at())),
                )
            }
        };
        assert!(
            valid_name(name) && name.starts_with("leasehold_"),
            "{}",
            at()
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (s.types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        assert!(
            s.types.contains_key(family),
            "sample before its TYPE, {}",
            at()
        );
        let mut labels = labels;
        labels.sort();
        let key = if labels.is_empty() {
            name.to_owned()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        assert!(
            s.values.insert(key, value).is_none(),
            "series twice, {}",
            at()
        );
        count += 1;
    }
    check_histograms(&s);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("prometheus-parse reads the exposition");
    // prometheus-parse folds a histogram's buckets into one sample per series.
    let folded = s
        .values
        .keys()
        .filter(|k| !k.contains("_bucket{") && !k.contains("_sum") && !k.contains("_count"))
        .count();
    assert!(
        scrape.samples.len() >= folded.min(1),
        "prometheus-parse read {} samples",
        scrape.samples.len()
    );
    assert!(count > 0, "an empty exposition");
    s
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(mut rest: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        if !valid_name(name) || name.contains(':') {
            return None;
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    _ => return None,
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((name.to_owned(), value));
        rest = &after[end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(r) => r,
            None if rest.is_empty() => rest,
            None => return None,
        };
    }
    Some(out)
}

/// Buckets cumulative and ending at `+Inf` == `_count`, per series.
fn check_histograms(s: &Samples) {
    for (family, _) in s.types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for (key, value) in &s.values {
            let Some(rest) = key.strip_prefix(&format!("{family}_bucket{{")) else {
                continue;
            };
            let labels = parse_labels(rest.strip_suffix('}').unwrap()).unwrap();
            let le = labels
                .iter()
                .find(|(k, _)| k == "le")
                .expect("a bucket without le");
            let le: f64 = if le.1 == "+Inf" {
                f64::INFINITY
            } else {
                le.1.parse().unwrap()
            };
            let others: Vec<String> = labels
                .iter()
                .filter(|(k, _)| k != "le")
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            series
                .entry(others.join(","))
                .or_default()
                .push((le, *value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{{{labels}}}: buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().expect("buckets");
            assert!(last.0.is_infinite(), "{family}{{{labels}}}: no +Inf bucket");
            let count_key = if labels.is_empty() {
                format!("{family}_count")
            } else {
                format!("{family}_count{{{labels}}}")
            };
            assert_eq!(
                s.values.get(&count_key),
                Some(&last.1),
                "{count_key} vs +Inf bucket"
            );
        }
    }
}

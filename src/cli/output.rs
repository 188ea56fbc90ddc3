//! What the operator commands print, in one place: the one duration format,
//! times, tables, the `--json` shapes, and errors with their exit codes.
//! The exit codes are in [`super::exit`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tonic::{Code, Status};

use crate::proto;

use super::exit::{AUTH as EXIT_AUTH, FAILED as EXIT_FAILED, UNREACHABLE as EXIT_UNREACHABLE};

/// An error the CLI reports with its own exit code (see the module docs).
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: i32,
    /// What to print.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// The coordinator cannot be reached.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(EXIT_UNREACHABLE, message)
    }

    /// A failed call, explained for an operator.
    pub fn from_status(status: &Status, server: &str) -> Self {
        match status.code() {
            Code::Unauthenticated => Failure::new(
                EXIT_AUTH,
                format!(
                    "the server refused the admin token (UNAUTHENTICATED): check --admin-token-file / LEASEHOLD_ADMIN_TOKEN ({})",
                    status.message()
                ),
            ),
            Code::PermissionDenied => Failure::new(
                EXIT_AUTH,
                format!("the server refused (PERMISSION_DENIED): {}", status.message()),
            ),
            Code::Unavailable => Failure::unreachable(format!(
                "cannot reach the coordinator at {server}: {}; is it running? (--server / LEASEHOLD_SERVER)",
                status.message()
            )),
            Code::Unimplemented => Failure::new(
                EXIT_FAILED,
                format!("the server at {server} does not offer this call (is it a leasehold coordinator of this version?): {}", status.message()),
            ),
            code => Failure::new(
                EXIT_FAILED,
                format!("the server answered {code:?}: {}", status.message()),
            ),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// An error and its causes on one line (`a: b: c`), without repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The one duration format: `850ms`, `4.2s`, `1m30s`, `2h5m`, `3d4h`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let tenths = (ms + 50) / 100;
    if tenths < 600 {
        return match tenths % 10 {
            0 => format!("{}s", tenths / 10),
            t => format!("{}.{t}s", tenths / 10),
        };
    }
    let secs = ((ms + 500) / 1000) as u64;
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| match small {
        0 => format!("{big}{big_unit}"),
        s => format!("{big}{big_unit}{s}{small_unit}"),
    };
    match secs {
        s if s < 3600 => two(s / 60, "m", s % 60, "s"),
        s if s < 86_400 => two(s / 3600, "h", s % 3600 / 60, "m"),
        s => two(s / 86_400, "d", s % 86_400 / 3600, "h"),
    }
}

/// Milliseconds as the duration format.
pub fn duration_ms(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

/// Unix milliseconds as RFC 3339 with milliseconds (UTC).
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Milliseconds from `unix_ms` until now (zero if it lies ahead).
pub fn elapsed_ms(unix_ms: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(unix_ms)
}

/// How long ago `unix_ms` was, in the duration format (`3m ago`).
pub fn ago(unix_ms: u64) -> String {
    format!("{} ago", duration_ms(elapsed_ms(unix_ms)))
}

/// Bytes for people: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A plain-text table: a header row, columns two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `--json` form of a live lease. Field names are stable (README, "For operators").
#[derive(Debug, Serialize)]
pub struct LeaseJson {
    /// The resource.
    pub resource: String,
    /// Who holds it.
    pub holder: String,
    /// The fencing token.
    pub token: u64,
    /// The lease's TTL.
    pub ttl_ms: u64,
    /// Time left when the server answered.
    pub expires_in_ms: u64,
    /// When it was granted, RFC 3339 (UTC, milliseconds).
    pub acquired_at: String,
    /// When it was granted, Unix milliseconds.
    pub acquired_at_unix_ms: u64,
    /// Renewals since the grant (or since the server restarted).
    pub renew_count: u64,
    /// Acquires waiting in line for it.
    pub waiters: u32,
}

impl From<&proto::LeaseInfo> for LeaseJson {
    fn from(l: &proto::LeaseInfo) -> Self {
        LeaseJson {
            resource: l.resource.clone(),
            holder: l.holder.clone(),
            token: l.token,
            ttl_ms: l.ttl_ms,
            expires_in_ms: l.expires_in_ms,
            acquired_at: rfc3339(l.acquired_at_unix_ms),
            acquired_at_unix_ms: l.acquired_at_unix_ms,
            renew_count: l.renew_count,
            waiters: l.waiters,
        }
    }
}

/// The table columns of a lease.
pub const LEASE_HEADERS: [&str; 6] = [
    "RESOURCE",
    "HOLDER",
    "TOKEN",
    "TTL",
    "EXPIRES IN",
    "WAITERS",
];

/// A lease as a table row (see [`LEASE_HEADERS`]).
pub fn lease_row(l: &proto::LeaseInfo) -> Vec<String> {
    vec![
        l.resource.clone(),
        l.holder.clone(),
        l.token.to_string(),
        duration_ms(l.ttl_ms),
        duration_ms(l.expires_in_ms),
        l.waiters.to_string(),
    ]
}

/// Prints one value as a line of JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_table() {
        let cases = [
            (0, "0ms"),
            (850, "850ms"),
            (999, "999ms"),
            (1000, "1s"),
            (4200, "4.2s"),
            (4249, "4.2s"),
            (59_940, "59.9s"),
            (59_960, "1m"),
            (60_000, "1m"),
            (90_000, "1m30s"),
            (3_600_000, "1h"),
            (3_900_000, "1h5m"),
            (86_400_000, "1d"),
            (97_200_000, "1d3h"),
        ];
        for (ms, want) in cases {
            assert_eq!(duration_ms(ms), want, "{ms} ms");
        }
    }

    #[test]
    fn table_aligns_and_trims() {
        let t = table(
            &["A", "BB"],
            &[vec!["long".into(), "x".into()], vec!["s".into(), "".into()]],
        );
        assert_eq!(t, "A     BB\nlong  x\ns\n");
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}

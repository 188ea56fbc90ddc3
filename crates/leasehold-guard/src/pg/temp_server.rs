//! [`TempPostgres`]: a throwaway PostgreSQL server for tests and benchmarks,
//! the one place every PostgreSQL test of the workspace gets its server.
//!
//! `initdb` into a temporary directory, then `pg_ctl start` on a free
//! loopback port (127.0.0.1 only; the Unix socket goes into the same
//! directory), and `pg_ctl stop -m immediate` when the value is dropped,
//! also when the test panics. PostgreSQL refuses to run as root, so when
//! this process is root, the server runs as the `postgres` user (through
//! `runuser`) and the directory is handed to that user. The server keeps
//! PostgreSQL's default durability (`fsync`, `synchronous_commit`), so
//! benchmarks against it measure real commits.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};

/// How to get the server binaries, for every error that lacks them.
const INSTALL: &str = "install PostgreSQL's server with `apt-get install -y postgresql` \
                       (Debian/Ubuntu), or set LEASEHOLD_PG_BIN to the directory holding \
                       initdb, pg_ctl and postgres";

/// Why a throwaway server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TempPostgresError {
    /// `initdb`, `pg_ctl` or `postgres` is missing.
    #[error("PostgreSQL server binaries not found ({looked}); {INSTALL}")]
    NotInstalled {
        /// Where they were looked for.
        looked: String,
    },
    /// This process is root and there is no `postgres` user to run the
    /// server as.
    #[error(
        "running as root, and there is no `postgres` user to run the server as (PostgreSQL \
         refuses root); {INSTALL}, which creates it"
    )]
    NoPostgresUser,
    /// A file-system step failed.
    #[error("cannot prepare the server's directory: {0}")]
    Io(#[from] std::io::Error),
    /// A command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr and stdout, or the server's log.
        output: String,
    },
}

/// A PostgreSQL server of its own in a temporary directory, on a free
/// loopback port, stopped and deleted when dropped. Connect with
/// [`TempPostgres::url`] (user `postgres`, trust authentication, database
/// `postgres`), or make a database per test with
/// [`TempPostgres::create_database`].
///
/// Binaries come from `LEASEHOLD_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else `pg_config
/// --bindir`. Without them, [`TempPostgres::start`] fails with a message
/// saying how to install them: a test that needs PostgreSQL fails, it does
/// not pass silently.
#[derive(Debug)]
pub struct TempPostgres {
    bin: PathBuf,
    /// Holds `data/` and the socket; deleted after the server stops.
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    /// Extra `-c name=value` options for `postgres`.
    settings: String,
}

impl TempPostgres {
    /// `initdb` and start a server with PostgreSQL's default settings
    /// (every commit waits for its WAL flush); about 1.5 s.
    pub fn start() -> Result<Self, TempPostgresError> {
        Self::start_with(&[])
    }

    /// [`TempPostgres::start`] with server settings (`-c name=value`), e.g.
    /// `[("synchronous_commit", "off")]`.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self, TempPostgresError> {
        let bin = find_bin()?;
        let as_postgres = running_as_root()?;
        let mut builder = tempfile::Builder::new();
        builder.prefix("leasehold-pg-");
        // The `postgres` user must reach the directory: under root's own
        // TMPDIR (say /root/tmp) it could not, under /tmp it can.
        let dir = if as_postgres {
            builder.tempdir_in("/tmp")?
        } else {
            builder.tempdir()?
        };
        if as_postgres {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let mut server = TempPostgres {
            bin,
            dir,
            port: 0,
            as_postgres,
            settings: settings
                .iter()
                .map(|(k, v)| format!(" -c {k}={v}"))
                .collect(),
        };
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        // The port is free when chosen and taken a moment later; if another
        // process took it meanwhile, the start fails and we try another.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// A server shared by every caller that holds it at the same time: the
    /// first caller starts it, the last one to drop its `Arc` stops it. For
    /// test binaries whose tests run in parallel, each with its own
    /// database ([`TempPostgres::create_database`]).
    ///
    /// It runs with `synchronous_commit = off`: a commit returns before its
    /// WAL is flushed (this disk's flush took ~5 ms under build load), which
    /// changes nothing the tests can see (commits stay atomic, locks and
    /// visibility are the same) and only loses commits in a machine crash,
    /// which no test makes. Benchmarks use [`TempPostgres::start`].
    pub fn shared() -> Result<Arc<Self>, TempPostgresError> {
        static SHARED: Mutex<Weak<TempPostgres>> = Mutex::new(Weak::new());
        // A test that panicked while holding the lock poisons it; the Weak
        // inside is still fine.
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = shared.upgrade() {
            return Ok(server);
        }
        let server = Arc::new(Self::start_with(&[("synchronous_commit", "off")])?);
        *shared = Arc::downgrade(&server);
        Ok(server)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` (a plain identifier) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let created = client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await;
        drop(client);
        // The connection ends when the client is dropped.
        let _ = connection.await;
        created.map(|()| self.url_of(name))
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl_start(&self) -> Result<(), TempPostgresError> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}{}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let (data, log) = (self.data_dir(), self.log_file());
        self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        )
        .map_err(|e| match e {
            TempPostgresError::Command {
                command, status, ..
            } => TempPostgresError::Command {
                command,
                status,
                output: self.log(),
            },
            other => other,
        })
        .map(drop)
    }

    /// Runs one of the server's binaries, as `postgres` when we are root,
    /// from the temporary directory (the `postgres` user may not be able to
    /// read the current one).
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, TempPostgresError> {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        let output = command.output()?;
        if output.status.success() {
            return Ok(output);
        }
        Err(TempPostgresError::Command {
            command: format!("{} {}", path.display(), join(args)),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ),
        })
    }
}

impl Drop for TempPostgres {
    /// `pg_ctl stop -m immediate`: the server is thrown away, so there is
    /// nothing to shut down cleanly. Then the directory goes.
    fn drop(&mut self) {
        let data = self.data_dir();
        if self.port != 0 {
            let stopped = self.run(
                "pg_ctl",
                &[
                    "stop".as_ref(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "30".as_ref(),
                    "-D".as_ref(),
                    data.as_os_str(),
                ],
            );
            if let Err(e) = stopped {
                eprintln!(
                    "could not stop the throwaway PostgreSQL on port {}: {e}",
                    self.port
                );
            }
        }
    }
}

fn join(args: &[&std::ffi::OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where `initdb`, `pg_ctl` and `postgres` are.
fn find_bin() -> Result<PathBuf, TempPostgresError> {
    find_bin_in(
        std::env::var_os("LEASEHOLD_PG_BIN"),
        Path::new("/usr/lib/postgresql"),
        true,
    )
}

/// [`find_bin`] with its places to look as arguments.
fn find_bin_in(
    env: Option<std::ffi::OsString>,
    debian_root: &Path,
    try_pg_config: bool,
) -> Result<PathBuf, TempPostgresError> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let mut looked = Vec::new();
    if let Some(dir) = env {
        let dir = PathBuf::from(dir);
        if complete(&dir) {
            return Ok(dir);
        }
        looked.push(format!("LEASEHOLD_PG_BIN={}", dir.display()));
    }
    // Debian's layout: /usr/lib/postgresql/<major>/bin; the newest wins.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(debian_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| complete(d)) {
        return Ok(dir);
    }
    looked.push(format!("{}/*/bin", debian_root.display()));
    if try_pg_config {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && complete(&dir) {
                return Ok(dir);
            }
        }
        looked.push("`pg_config --bindir`".into());
    }
    Err(TempPostgresError::NotInstalled {
        looked: looked.join(", "),
    })
}

/// Whether this process runs as root (its `/proc/self` belongs to uid 0).
fn running_as_root() -> Result<bool, TempPostgresError> {
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), TempPostgresError> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .ok_or(TempPostgresError::NoPostgresUser)
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, TempPostgresError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_fail_saying_how_to_install_them() {
        let err = find_bin_in(
            Some("/nonexistent/bin".into()),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, TempPostgresError::NotInstalled { .. }),
            "{err:?}"
        );
        for part in [
            "apt-get install -y postgresql",
            "LEASEHOLD_PG_BIN=/nonexistent/bin",
            "/nonexistent/*/bin",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }
}

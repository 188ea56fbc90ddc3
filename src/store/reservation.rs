//! The token reservation: a small file, `fdatasync`ed, that every token
//! handed out is at or below (see the module docs of [`super`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{StoreError, RESERVATION_CHECK};

/// The token reservation file.
#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) reserved: u64,
}

impl Reservation {
    pub(super) fn open(path: PathBuf, db_existed: bool) -> Result<Self, StoreError> {
        let io = |what| {
            let path = path.clone();
            move |source| StoreError::Io { what, path, source }
        };
        let existed = path.exists();
        if !existed && db_existed {
            return Err(StoreError::Corrupt {
                path,
                what: "the token reservation file is missing but the database exists".into(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening"))?;
        let mut buf = [0u8; 16];
        let len = file.metadata().map_err(io("reading"))?.len();
        // An empty file with no database is a first start that stopped
        // before its first write: nothing was ever handed out.
        let fresh = len == 0 && !db_existed;
        let reserved = if fresh {
            0
        } else if len < 16 {
            return Err(StoreError::Corrupt {
                path,
                what: format!("the token reservation file is {len} bytes, expected 16"),
            });
        } else {
            file.read_exact_at(&mut buf, 0).map_err(io("reading"))?;
            let value = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
            let check = u64::from_le_bytes(buf[8..].try_into().unwrap_or_default());
            if value ^ RESERVATION_CHECK != check {
                return Err(StoreError::Corrupt {
                    path,
                    what: "the token reservation file fails its check".into(),
                });
            }
            value
        };
        let mut r = Reservation {
            file,
            path,
            reserved,
        };
        if fresh {
            r.write(0)?;
            if let Some(dir) = r.path.parent() {
                sync_dir(dir)?;
            }
        }
        Ok(r)
    }

    /// Raises the reservation to `upto` and waits for the device.
    pub(super) fn write(&mut self, upto: u64) -> Result<(), StoreError> {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&upto.to_le_bytes());
        buf[8..].copy_from_slice(&(upto ^ RESERVATION_CHECK).to_le_bytes());
        let io = |what| {
            let path = self.path.clone();
            move |source| StoreError::Io { what, path, source }
        };
        self.file.write_all_at(&buf, 0).map_err(io("writing"))?;
        self.file.sync_data().map_err(io("syncing"))?;
        self.reserved = upto;
        Ok(())
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::wal::sync_dir(dir).map_err(|source| StoreError::Io {
        what: "syncing directory",
        path: dir.to_owned(),
        source,
    })
}

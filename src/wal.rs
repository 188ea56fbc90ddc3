//! The write-ahead log: what makes a batch durable, with one `fdatasync`.
//!
//! The store writes each batch of changes as one *record* of key/value
//! operations ([`Op`]) appended to the current *segment* and synced with
//! `fdatasync` before anything in the batch is answered. Only then does it
//! apply the same operations to sled, which serves as the checkpointed table
//! (the one that is read at start-up, by the history API, and by history
//! trimming). sled's own `flush()` does not reach the device and costs a
//! thread pool's worth of wake-ups (see shared FACTS); one append plus one
//! `fdatasync` does reach it, and costs one system call pair per batch.
//!
//! # On disk
//!
//! `DATA_DIR/wal/` holds segments named by a 16-digit hexadecimal sequence
//! number, replayed in that order. A record is
//!
//! ```text
//! [payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]
//! payload = op*,  op = 0x01 [key len: u32 LE][key][value len: u32 LE][value]   (put)
//!                    | 0x02 [key len: u32 LE][key]                             (delete)
//! ```
//!
//! # Recovery
//!
//! A segment is read up to its first record that is short, zero-length or
//! fails its CRC: that is the tail of an append cut by a crash, which was
//! never acknowledged. Nothing is ever appended after such a tail: the log
//! always starts a new segment when it opens, and after any write error.
//!
//! Replaying the operations over sled is idempotent: sled holds the last
//! checkpoint plus some prefix of the operations logged since (sled recovers
//! a prefix of its own log), so applying all of them again, in order, gives
//! every key the value of its last operation, exactly as before the crash.
//!
//! # Checkpoints
//!
//! Once the current segment passes its size limit the store starts a new
//! one ([`Wal::rotate`]) and *checkpoints* in the background: it writes the
//! operations logged so far into sled, calls sled's `flush()` plus an
//! `fdatasync` of sled's log file, and then deletes the segments the
//! checkpoint covers ([`Wal::remove_retired_before`]). A start-up replays
//! whatever segments are left and checkpoints at once, so replay time is
//! bounded by about two segments.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One operation on the store's key space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` (absent is fine).
    Delete(Vec<u8>),
}

const PUT: u8 = 1;
const DELETE: u8 = 2;
const HEADER: usize = 8;
/// A record larger than this is taken for a damaged length, not read.
const MAX_RECORD: usize = 1 << 30;

/// A write-ahead log opened for appending. Only one thread appends.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// The segment being appended to.
    seq: u64,
    file: File,
    /// Bytes of whole records in the current segment.
    len: u64,
    /// Older segments, deleted by [`Wal::remove_retired_before`] once a
    /// checkpoint holds everything in them.
    retired: Vec<u64>,
    /// Set by a failed append: the current segment may end in a partial
    /// record, so the next append starts a new one.
    broken: bool,
    buf: Vec<u8>,
}

impl Wal {
    /// Opens the log in `dir` (created if missing): returns the batches it
    /// holds, in order, and a log appending to a new, empty segment. The
    /// segments read stay until [`Wal::remove_retired_before`].
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Vec<Vec<Op>>)> {
        std::fs::create_dir_all(dir)?;
        let retired = segments(dir)?;
        let mut batches = Vec::new();
        for &seq in &retired {
            read_segment(&segment_path(dir, seq), &mut batches)?;
        }
        let seq = retired.last().map_or(1, |s| s + 1);
        let file = create_segment(dir, seq)?;
        Ok((
            Wal {
                dir: dir.to_owned(),
                seq,
                file,
                len: 0,
                retired,
                broken: false,
                buf: Vec::new(),
            },
            batches,
        ))
    }

    /// Every batch in the log now, in order (retired segments included).
    pub fn read_all(&self) -> std::io::Result<Vec<Vec<Op>>> {
        let mut batches = Vec::new();
        for &seq in self.retired.iter().chain(std::iter::once(&self.seq)) {
            read_segment(&segment_path(&self.dir, seq), &mut batches)?;
        }
        Ok(batches)
    }

    /// Appends one batch as one record and waits for the device. After an
    /// error the batch may or may not be in the log (like a timeout); the
    /// next append starts a new segment, so it never follows a torn record.
    pub fn append(&mut self, ops: &[Op]) -> std::io::Result<()> {
        if self.broken {
            self.rotate()?;
        }
        encode(ops, &mut self.buf);
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Bytes appended to the current segment.
    pub fn segment_len(&self) -> u64 {
        self.len
    }

    /// Starts a new segment; the current one joins the retired.
    pub fn rotate(&mut self) -> std::io::Result<()> {
        let file = create_segment(&self.dir, self.seq + 1)?;
        self.retired.push(self.seq);
        self.seq += 1;
        self.file = file;
        self.len = 0;
        self.broken = false;
        Ok(())
    }

    /// The sequence number of the segment being appended to.
    pub fn segment(&self) -> u64 {
        self.seq
    }

    /// Deletes the retired segments numbered below `seq`. Call only once a
    /// checkpoint has made everything in them durable elsewhere.
    pub fn remove_retired_before(&mut self, seq: u64) -> std::io::Result<()> {
        let (old, keep): (Vec<u64>, Vec<u64>) = self.retired.iter().partition(|&&s| s < seq);
        if old.is_empty() {
            return Ok(());
        }
        for &s in &old {
            match std::fs::remove_file(segment_path(&self.dir, s)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.retired = keep;
        // A deletion lost in a crash would only replay old operations again
        // (harmless); syncing keeps the directory from growing all the same.
        sync_dir(&self.dir)
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.log"))
}

/// The sequence numbers of the segments in `dir`, in order. Other files are
/// ignored.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let seq = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .filter(|n| n.len() == 16)
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        seqs.extend(seq);
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn create_segment(dir: &Path, seq: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, seq))?;
    // The segment's name must survive a power cut before any record in it
    // is acknowledged.
    sync_dir(dir)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn encode(ops: &[Op], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; HEADER]);
    for op in ops {
        match op {
            Op::Put(k, v) => {
                buf.push(PUT);
                put_bytes(buf, k);
                put_bytes(buf, v);
            }
            Op::Delete(k) => {
                buf.push(DELETE);
                put_bytes(buf, k);
            }
        }
    }
    let payload_len = (buf.len() - HEADER) as u32;
    let crc = crc32fast::hash(&buf[HEADER..]);
    buf[..4].copy_from_slice(&payload_len.to_le_bytes());
    buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are store records: far below 4 GiB.
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// Appends the segment's whole records to `out`, stopping at the first one
/// that is incomplete or damaged (the unacknowledged tail of a crash).
fn read_segment(path: &Path, out: &mut Vec<Vec<Op>>) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    let mut rest = &data[..];
    while let Some(ops) = next_record(&mut rest) {
        out.push(ops);
    }
    if !rest.is_empty() {
        tracing::info!(
            segment = %path.display(),
            ignored_bytes = rest.len(),
            "the log ends in a partial record (an append cut by a crash, never acknowledged)"
        );
    }
    Ok(())
}

fn next_record(rest: &mut &[u8]) -> Option<Vec<Op>> {
    let header = rest.get(..HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = rest.get(HEADER..HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let ops = decode(payload)?;
    *rest = &rest[HEADER + len..];
    Some(ops)
}

fn decode(mut p: &[u8]) -> Option<Vec<Op>> {
    fn bytes(p: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
        let b = p.get(4..4 + len)?.to_vec();
        *p = &p[4 + len..];
        Some(b)
    }
    let mut ops = Vec::new();
    while let Some((&tag, tail)) = p.split_first() {
        p = tail;
        ops.push(match tag {
            PUT => Op::Put(bytes(&mut p)?, bytes(&mut p)?),
            DELETE => Op::Delete(bytes(&mut p)?),
            _ => return None,
        });
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let seqs = segments(dir).unwrap();
        segment_path(dir, *seqs.last().unwrap())
    }

    #[test]
    fn batches_come_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let one = vec![put("a", "1"), Op::Delete(b"b".to_vec())];
        let two = vec![put("c", ""), put("a", "2")];
        {
            let (mut wal, none) = Wal::open(dir.path()).unwrap();
            assert!(none.is_empty());
            wal.append(&one).unwrap();
            wal.rotate().unwrap();
            wal.append(&two).unwrap();
            assert_eq!(wal.read_all().unwrap(), vec![one.clone(), two.clone()]);
        }
        let (wal, batches) = Wal::open(dir.path()).unwrap();
        assert_eq!(batches, vec![one, two]);
        // Reopening starts a fresh segment; the old ones stay until removed.
        assert_eq!(wal.segment_len(), 0);
        assert_eq!(segments(dir.path()).unwrap().len(), 3);
    }

    #[test]
    fn a_torn_or_damaged_tail_is_ignored_and_never_appended_after() {
        for damage in ["cut", "flip", "zeros"] {
            let dir = tempfile::tempdir().unwrap();
            let whole = vec![put("k", "whole")];
            {
                let (mut wal, _) = Wal::open(dir.path()).unwrap();
                wal.append(&whole).unwrap();
                wal.append(&[put("k", "torn")]).unwrap();
            }
            let path = only_segment(dir.path());
            let mut data = std::fs::read(&path).unwrap();
            match damage {
                "cut" => data.truncate(data.len() - 3),
                "flip" => *data.last_mut().unwrap() ^= 0xff,
                _ => data.extend_from_slice(&[0; 64]),
            }
            std::fs::write(&path, &data).unwrap();
            if damage == "zeros" {
                // Zeros after whole records (a preallocated tail) end the log.
                let (_, batches) = Wal::open(dir.path()).unwrap();
                assert_eq!(batches.len(), 2, "{damage}");
                continue;
            }
            let (mut wal, batches) = Wal::open(dir.path()).unwrap();
            assert_eq!(batches, vec![whole.clone()], "{damage}");
            // New records go to a new segment, so they are read back even
            // though the old one ends in garbage.
            wal.append(&[put("k", "after")]).unwrap();
            drop(wal);
            let (_, batches) = Wal::open(dir.path()).unwrap();
            assert_eq!(batches, vec![whole, vec![put("k", "after")]], "{damage}");
        }
    }

    #[test]
    fn remove_retired_before_deletes_only_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.append(&[put("a", "1")]).unwrap();
        wal.rotate().unwrap();
        let upto = wal.segment();
        wal.append(&[put("b", "2")]).unwrap();
        wal.rotate().unwrap();
        // Only what the checkpoint covers goes.
        wal.remove_retired_before(upto).unwrap();
        assert_eq!(wal.read_all().unwrap(), vec![vec![put("b", "2")]]);
        wal.remove_retired_before(wal.segment()).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert!(wal.read_all().unwrap().is_empty());
        drop(wal);
        let (_, batches) = Wal::open(dir.path()).unwrap();
        assert!(batches.is_empty());
    }

    #[test]
    fn unrelated_files_in_the_directory_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("12.log"), "x").unwrap();
        let (mut wal, batches) = Wal::open(dir.path()).unwrap();
        assert!(batches.is_empty());
        wal.append(&[put("a", "1")]).unwrap();
        assert_eq!(wal.read_all().unwrap().len(), 1);
    }
}

//! The write-ahead log: what makes a batch durable, with one synchronous write.
//!
//! The store writes each batch of changes as one *record* of key/value
//! operations ([`Op`]) to the current *segment*, and answers nothing in the
//! batch before that write has reached the device. Only then are the
//! operations applied to the store's in-memory overlay, and later, by a
//! checkpoint, to sled (see [`crate::store`]).
//!
//! # Why it is fast
//!
//! Measured here (shared FACTS and `../bench` notes): appending to a file and
//! calling `fdatasync` costs ≈ 210 µs, because every append changes the
//! file's size and the sync must commit that metadata too. Overwriting blocks
//! that already exist, written with `O_DIRECT | O_DSYNC`, costs ≈ 115 µs: no
//! metadata, no page cache, one device write. So:
//!
//! - segments are **preallocated**: a spare segment is filled with zeros (or
//!   recycled from a segment a checkpoint has made obsolete) in the
//!   background, and the log switches to it when the current one is full;
//! - the spare is **named ahead**: it already carries the next segment's
//!   name, and that name is synced to the directory off the write path
//!   (see [`Named`]), so switching segments costs the writer an `open` and
//!   no directory `fsync` (measured: 0.3–3.7 ms, every switch, while every
//!   commit waited);
//! - every record starts on a 4 KiB boundary and is padded to one, so a
//!   write never touches a block that holds an earlier, acknowledged record
//!   (a torn write can only damage the record being written);
//! - the file is opened with `O_DIRECT | O_DSYNC` (plain `O_DSYNC` where the
//!   file system refuses `O_DIRECT`, as tmpfs does).
//!
//! A new segment that is not preallocated (no spare yet, or a disk too full
//! to make one) still works: its writes extend the file and cost more.
//!
//! # On disk
//!
//! `DATA_DIR/wal/` holds segments named by a 16-digit hexadecimal sequence
//! number, replayed in that order; the last may be the spare named ahead,
//! which holds no record of its own number (zeros, or a recycled segment's
//! old records). A record is
//!
//! ```text
//! [payload length: u32 LE][CRC-32 of (segment number, payload): u32 LE][segment number: u64 LE][payload]
//! payload = op*,  op = 0x01 [key len: u32 LE][key][value len: u32 LE][value]   (put)
//!                    | 0x02 [key len: u32 LE][key]                             (delete)
//! ```
//!
//! then zeros up to the next 4 KiB boundary, where the next record starts.
//!
//! # Recovery
//!
//! A segment is read up to its first record that is incomplete, fails its
//! CRC, or carries another segment's number: the tail of a write cut by a
//! crash (never acknowledged), the zeros of preallocation, or the old
//! contents of a recycled file. Nothing is ever written after such a
//! record: the log starts a new segment when it opens and after any failed
//! write.
//!
//! A spare named ahead is never written after a restart: the log starts
//! past the last segment it finds, and the unused spare is deleted or
//! recycled by the next checkpoint like any other old segment. (Reusing it
//! would be safe only if no write had ever been torn in it, which cannot be
//! told from its contents.)
//!
//! Replaying the operations is idempotent: the store's table holds the last
//! checkpoint plus some prefix of the operations logged since, so applying
//! all of them again, in order, gives every key the value of its last
//! operation, exactly as before the crash.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

// `open(2)` flags and the error a refused `O_DIRECT` write gives, as the
// `i32`s `OpenOptionsExt::custom_flags` and `raw_os_error` use.
const O_DIRECT: i32 = OFlags::DIRECT.bits() as i32;
const O_DSYNC: i32 = OFlags::DSYNC.bits() as i32;
const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();

/// One operation on the store's key space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Set `key`, which has never existed, to `value`. Logged (and replayed)
    /// as a [`Op::Put`]; the store may cancel it against a later delete.
    Insert(Vec<u8>, Vec<u8>),
    /// Remove `key` (absent is fine).
    Delete(Vec<u8>),
}

const PUT: u8 = 1;
const DELETE: u8 = 2;
/// Records start on, and are padded to, this boundary (and `O_DIRECT`
/// needs buffers, offsets and lengths aligned to it).
const BLOCK: usize = 4096;
const HEADER: usize = 16;
/// A record larger than this is taken for a damaged length, not read.
const MAX_RECORD: usize = 1 << 30;
/// Where [`Wal::prepare_spare`] fills a spare before it is named.
const SPARE_TMP: &str = "spare.tmp";
/// Where spares waited, unnamed, before they were named ahead; removed at
/// open.
const OLD_SPARE: &str = "spare";

/// A write-ahead log opened for appending. One thread appends; another may
/// prepare spares ([`Wal::prepare_spare`]).
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// The segment being written.
    seq: u64,
    file: File,
    /// Where the next record goes (a multiple of [`BLOCK`]).
    len: u64,
    /// Whether the current segment was preallocated to `segment_bytes`.
    preallocated: bool,
    /// Bytes written over the log's lifetime (all segments).
    written: u64,
    /// Older segments, deleted (or recycled) by
    /// [`Wal::remove_retired_before`] once a checkpoint holds them.
    retired: Vec<u64>,
    /// The next segment (`seq + 1`) when it already exists, preallocated,
    /// and its name is durable: switching to it touches no directory entry.
    ready: Option<u64>,
    /// The next segment when it exists but its name is not synced yet (a
    /// [`Named`] is out); switching to it must sync the directory itself.
    staged: Option<u64>,
    /// Set by a failed write: the current segment may end in a partial
    /// record, so the next append starts a new one.
    broken: bool,
    /// Open segments with `O_DIRECT`; cleared if a write is refused with
    /// EINVAL (a device whose blocks are larger than [`BLOCK`]).
    direct: bool,
    payload: Vec<u8>,
    aligned: Vec<u8>,
}

impl Wal {
    /// Opens the log in `dir` (created if missing): returns the batches it
    /// holds, in order, and a log writing to a new segment. The segments
    /// read stay until [`Wal::remove_retired_before`]. Segments are
    /// preallocated to `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> std::io::Result<(Wal, Vec<Vec<Op>>)> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join(SPARE_TMP));
        let _ = std::fs::remove_file(dir.join(OLD_SPARE));
        let retired = segments(dir)?;
        let mut batches = Vec::new();
        for &seq in &retired {
            read_segment(dir, seq, &mut batches)?;
        }
        let seq = retired.last().map_or(1, |s| s + 1);
        let mut wal = Wal {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(BLOCK as u64),
            seq: seq - 1,
            // Replaced by `rotate` below.
            file: File::open(dir)?,
            len: 0,
            preallocated: false,
            written: 0,
            retired: Vec::new(),
            ready: None,
            staged: None,
            broken: false,
            direct: true,
            payload: Vec::new(),
            aligned: Vec::new(),
        };
        wal.rotate()?;
        wal.retired = retired;
        Ok((wal, batches))
    }

    /// Every batch in the log now, in order (retired segments included).
    #[cfg(test)]
    fn read_all(&self) -> std::io::Result<Vec<Vec<Op>>> {
        let mut batches = Vec::new();
        for &seq in self.retired.iter().chain(std::iter::once(&self.seq)) {
            read_segment(&self.dir, seq, &mut batches)?;
        }
        Ok(batches)
    }

    /// Writes one batch as one record and waits for the device. After an
    /// error the batch may or may not be in the log (like a timeout); the
    /// next append starts a new segment, so it never follows a torn record.
    pub fn append(&mut self, ops: &[Op]) -> std::io::Result<()> {
        let size = self.encode(ops);
        let full = if self.preallocated {
            self.len + size as u64 > self.segment_bytes
        } else {
            self.len >= self.segment_bytes
        };
        if self.broken || (full && self.len > 0) {
            self.rotate()?;
            // The record carries the segment number: encode again.
            self.encode(ops);
        }
        let mut result = self.write_record(size);
        if self.direct && matches!(&result, Err(e) if e.raw_os_error() == Some(EINVAL)) {
            // O_DIRECT refused this write: continue without it.
            tracing::warn!(dir = %self.dir.display(), "O_DIRECT writes are refused here; the log falls back to O_DSYNC");
            self.direct = false;
            self.rotate()?;
            self.encode(ops);
            result = self.write_record(size);
        }
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn write_record(&mut self, size: usize) -> std::io::Result<()> {
        let block = aligned_mut(&mut self.aligned, size);
        self.file.write_all_at(block, self.len)?;
        self.len += size as u64;
        self.written += size as u64;
        Ok(())
    }

    /// Encodes `ops` as a record of the current segment into the aligned
    /// buffer; returns its padded size.
    fn encode(&mut self, ops: &[Op]) -> usize {
        let p = &mut self.payload;
        p.clear();
        p.extend_from_slice(&self.seq.to_le_bytes());
        for op in ops {
            match op {
                Op::Put(k, v) | Op::Insert(k, v) => {
                    p.push(PUT);
                    put_bytes(p, k);
                    put_bytes(p, v);
                }
                Op::Delete(k) => {
                    p.push(DELETE);
                    put_bytes(p, k);
                }
            }
        }
        // The CRC covers the segment number (the payload's first 8 bytes),
        // so a recycled file's old records never pass as new ones.
        let crc = crc32fast::hash(p);
        let payload_len = (p.len() - 8) as u32;
        let size = (HEADER + p.len() - 8).next_multiple_of(BLOCK);
        let block = aligned_mut(&mut self.aligned, size);
        block[..4].copy_from_slice(&payload_len.to_le_bytes());
        block[4..8].copy_from_slice(&crc.to_le_bytes());
        block[8..8 + p.len()].copy_from_slice(p);
        block[8 + p.len()..].fill(0);
        size
    }

    /// Bytes written over the log's lifetime, padding included.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes written to the current segment.
    pub fn segment_len(&self) -> u64 {
        self.len
    }

    /// The sequence number of the segment being written.
    pub fn segment(&self) -> u64 {
        self.seq
    }

    /// Whether the current segment is preallocated (fast writes).
    #[cfg(test)]
    fn preallocated(&self) -> bool {
        self.preallocated
    }

    /// Starts the next segment: the spare named ahead if there is one (no
    /// directory sync), else a new file; the current one joins the retired.
    pub fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.seq + 1;
        let path = segment_path(&self.dir, next);
        let named_ahead = self.ready.take() == Some(next);
        self.staged = None;
        let file = open_segment(&path, !named_ahead, self.direct)?;
        if !named_ahead {
            // The segment's name must survive a power cut before any record
            // in it is acknowledged.
            sync_dir(&self.dir)?;
        }
        let preallocated = file.metadata()?.len() >= self.segment_bytes;
        if self.seq > 0 && segment_path(&self.dir, self.seq).exists() {
            self.retired.push(self.seq);
        }
        self.seq = next;
        self.file = file;
        self.len = 0;
        self.preallocated = preallocated;
        self.broken = false;
        Ok(())
    }

    /// Deletes the retired segments numbered below `seq`, oldest first,
    /// recycling one as the next segment if none is named ahead. Call only
    /// once a checkpoint has made everything in them durable elsewhere, and
    /// finish with [`Named::sync`] (without the log's lock) and
    /// [`Wal::named`].
    pub fn remove_retired_before(&mut self, seq: u64) -> std::io::Result<Named> {
        let (old, keep): (Vec<u64>, Vec<u64>) = self.retired.iter().partition(|&&s| s < seq);
        let mut named = self.named_later(None);
        named.changed = !old.is_empty();
        for &s in &old {
            let path = segment_path(&self.dir, s);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let result = if self.wants_next() && size >= self.segment_bytes {
                // Recycled: its old records carry an old segment number.
                let next = self.seq + 1;
                std::fs::rename(&path, segment_path(&self.dir, next)).map(|()| {
                    self.staged = Some(next);
                    named.next = Some(next);
                })
            } else {
                std::fs::remove_file(&path)
            };
            match result {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.retired = keep;
        Ok(named)
    }

    /// Whether a spare should be prepared now: none is named ahead, and
    /// either the current segment is not preallocated or it is half full.
    /// (A checkpoint usually recycles a segment first, and a server that
    /// logs little never writes a second 16 MiB of zeros.)
    pub fn wants_spare(&self) -> bool {
        self.wants_next() && (!self.preallocated || self.len >= self.segment_bytes / 2)
    }

    /// Whether no file is named (or being named) as the next segment.
    fn wants_next(&self) -> bool {
        self.ready.is_none() && self.staged.is_none()
    }

    fn named_later(&self, next: Option<u64>) -> Named {
        Named {
            dir: self.dir.clone(),
            next,
            changed: true,
        }
    }

    /// Takes the result of [`Named::sync`]: the segment named there, if it
    /// is still the next one, is ready, and the log switches to it at once
    /// if the current segment is not preallocated.
    pub fn named(&mut self, next: Option<u64>) -> std::io::Result<()> {
        let Some(next) = next.filter(|&n| n == self.seq + 1) else {
            // The writer switched to it first (and synced the directory).
            return Ok(());
        };
        self.ready = Some(next);
        self.staged = None;
        if !self.preallocated {
            self.rotate()?;
        }
        Ok(())
    }

    /// Fills a spare segment with zeros and syncs it, without the log's
    /// lock (call [`Wal::install_spare`] with the lock afterwards). Skipped
    /// when the file system has less than four segments' worth of room
    /// left: a nearly full disk keeps its space for the data.
    pub fn prepare_spare(dir: &Path, segment_bytes: u64) -> std::io::Result<bool> {
        let stat = rustix::fs::statvfs(dir)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < 4 * segment_bytes {
            return Ok(false);
        }
        let tmp = dir.join(SPARE_TMP);
        let result = (|| {
            let file = File::create(&tmp)?;
            write_zeros(&file, 0, segment_bytes)?;
            file.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(true)
    }

    /// Names a spare prepared by [`Wal::prepare_spare`] as the next segment;
    /// finish with [`Named::sync`] (without the log's lock) and
    /// [`Wal::named`].
    pub fn install_spare(&mut self) -> std::io::Result<Named> {
        let next = self.seq + 1;
        std::fs::rename(self.dir.join(SPARE_TMP), segment_path(&self.dir, next))?;
        self.staged = Some(next);
        Ok(self.named_later(Some(next)))
    }
}

/// Names given (or files removed) in the log's directory under the log's
/// lock, not yet synced. Syncing a directory takes milliseconds on a busy
/// disk; done here, without the lock, it never holds up a commit. Until
/// [`Wal::named`] hears of it, a switch to the staged segment syncs the
/// directory itself, so no record is ever acknowledged in a file whose name
/// could vanish in a power cut.
#[must_use = "sync it, then pass the result to Wal::named"]
#[derive(Debug)]
pub struct Named {
    dir: PathBuf,
    next: Option<u64>,
    changed: bool,
}

impl Named {
    /// Syncs the directory; returns the segment to pass to [`Wal::named`].
    /// A removal lost in a crash before this would only replay operations a
    /// checkpoint already holds: harmless, as replay is idempotent and the
    /// segments go oldest first.
    pub fn sync(self) -> std::io::Result<Option<u64>> {
        if self.changed {
            sync_dir(&self.dir)?;
        }
        Ok(self.next)
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.log"))
}

/// Opens a segment for writing: `O_DIRECT | O_DSYNC` (if `direct`), or only
/// `O_DSYNC` where `O_DIRECT` is refused. With `create`, a missing file is
/// created (a staged spare may already be there).
fn open_segment(path: &Path, create: bool, direct: bool) -> std::io::Result<File> {
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .read(true)
            .create(create)
            .custom_flags(flags)
            .open(path)
    };
    if !direct {
        return open(O_DSYNC);
    }
    match open(O_DIRECT | O_DSYNC) {
        Err(e) if e.raw_os_error() == Some(EINVAL) => open(O_DSYNC),
        other => other,
    }
}

/// A `size`-byte window of `buf` aligned to [`BLOCK`], as `O_DIRECT` needs.
fn aligned_mut(buf: &mut Vec<u8>, size: usize) -> &mut [u8] {
    if buf.len() < size + BLOCK {
        *buf = vec![0; size + BLOCK];
    }
    let offset = buf.as_ptr().align_offset(BLOCK);
    &mut buf[offset..offset + size]
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

/// Makes the names in `dir` (new, renamed, removed) survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are store records: far below 4 GiB.
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// Appends segment `seq`'s records to `out`, stopping at the first one that
/// is incomplete, damaged or not of this segment.
fn read_segment(dir: &Path, seq: u64, out: &mut Vec<Vec<Op>>) -> std::io::Result<()> {
    let data = std::fs::read(segment_path(dir, seq))?;
    let mut at = 0;
    while let Some((ops, size)) = data.get(at..).and_then(|rest| record(rest, seq)) {
        out.push(ops);
        at += size;
    }
    Ok(())
}

/// The record at the start of `rest` if it is whole and of segment `seq`,
/// with its padded size.
fn record(rest: &[u8], seq: u64) -> Option<(Vec<Op>, usize)> {
    let header = rest.get(..HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len == 0 || len > MAX_RECORD || header[8..16] != seq.to_le_bytes() {
        return None;
    }
    let covered = rest.get(8..HEADER + len)?;
    if crc32fast::hash(covered) != crc {
        return None;
    }
    let ops = decode(&covered[8..])?;
    Some((ops, (HEADER + len).next_multiple_of(BLOCK)))
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

/// Writes `len` zeros into `file` from offset `at`, a MiB at a time:
/// preallocation, for this log's spare segments and the Raft log.
pub(crate) fn write_zeros(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = 64 * 1024;

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    /// Names a prepared spare the way the store does.
    fn install(wal: &mut Wal) {
        assert!(Wal::prepare_spare(&wal.dir.clone(), SEGMENT).unwrap());
        let next = wal.install_spare().unwrap().sync().unwrap();
        wal.named(next).unwrap();
    }

    /// Removes covered segments the way the store does.
    fn remove_before(wal: &mut Wal, seq: u64) {
        let next = wal.remove_retired_before(seq).unwrap().sync().unwrap();
        wal.named(next).unwrap();
    }

    /// Removes every retired segment, as a checkpoint up to now would.
    fn remove_retired(wal: &mut Wal) {
        remove_before(wal, wal.segment());
    }

    fn inode(dir: &Path, seq: u64) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(segment_path(dir, seq)).unwrap().ino()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let seqs = segments(dir).unwrap();
        segment_path(dir, *seqs.last().unwrap())
    }

    /// The open flags of `file`, from `/proc/self/fdinfo`.
    fn open_flags(file: &File) -> i32 {
        use std::os::fd::AsRawFd;
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        i32::from_str_radix(flags, 8).unwrap()
    }

    /// What makes a record durable when `append` returns: every segment,
    /// new or spare, is written synchronously (`O_DSYNC`), and past the page
    /// cache (`O_DIRECT`) where the file system allows it.
    #[test]
    fn segments_are_written_synchronously() {
        let dir = tempfile::tempdir().unwrap();
        let direct_allowed = OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(O_DIRECT)
            .open(dir.path().join("probe"))
            .is_ok();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        let check = |wal: &Wal| {
            let flags = open_flags(&wal.file);
            assert_eq!(flags & O_DSYNC, O_DSYNC, "flags {flags:o}");
            if direct_allowed {
                assert_eq!(flags & O_DIRECT, O_DIRECT, "flags {flags:o}");
            }
        };
        check(&wal);
        install(&mut wal);
        assert!(wal.preallocated());
        check(&wal);
    }

    #[test]
    fn batches_come_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let one = vec![put("a", "1"), Op::Delete(b"b".to_vec())];
        let two = vec![put("c", ""), put("a", "2")];
        {
            let (mut wal, none) = Wal::open(dir.path(), SEGMENT).unwrap();
            assert!(none.is_empty());
            wal.append(&one).unwrap();
            wal.rotate().unwrap();
            wal.append(&two).unwrap();
            assert_eq!(wal.read_all().unwrap(), vec![one.clone(), two.clone()]);
        }
        let (wal, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert_eq!(batches, vec![one, two]);
        // Reopening starts a fresh segment; the old ones stay until removed.
        assert_eq!(wal.len, 0);
        assert_eq!(segments(dir.path()).unwrap().len(), 3);
    }

    #[test]
    fn records_are_block_aligned_and_large_ones_span_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        let big = vec![put("k", &"v".repeat(3 * BLOCK))];
        wal.append(&[put("a", "1")]).unwrap();
        assert_eq!(wal.len, BLOCK as u64);
        wal.append(&big).unwrap();
        assert_eq!(wal.len, 5 * BLOCK as u64);
        wal.append(&[put("b", "2")]).unwrap();
        assert_eq!(
            wal.read_all().unwrap(),
            vec![vec![put("a", "1")], big, vec![put("b", "2")]]
        );
    }

    #[test]
    fn a_torn_or_damaged_tail_is_ignored_and_never_written_after() {
        for damage in ["cut", "flip", "zeros"] {
            let dir = tempfile::tempdir().unwrap();
            let whole = vec![put("k", "whole")];
            {
                let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
                wal.append(&whole).unwrap();
                wal.append(&[put("k", "torn")]).unwrap();
            }
            let path = last_segment(dir.path());
            let mut data = std::fs::read(&path).unwrap();
            match damage {
                "cut" => data.truncate(BLOCK + 20),
                "flip" => data[BLOCK + HEADER + 3] ^= 0xff,
                _ => data.extend_from_slice(&[0; BLOCK]),
            }
            std::fs::write(&path, &data).unwrap();
            let (mut wal, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
            if damage == "zeros" {
                // Zeros after whole records (preallocation) end the log.
                assert_eq!(batches.len(), 2, "{damage}");
                continue;
            }
            assert_eq!(batches, vec![whole.clone()], "{damage}");
            // New records go to a new segment, so they are read back even
            // though the old one ends in garbage.
            wal.append(&[put("k", "after")]).unwrap();
            drop(wal);
            let (_, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
            assert_eq!(batches, vec![whole, vec![put("k", "after")]], "{damage}");
        }
    }

    #[test]
    fn spares_are_used_and_recycled_segments_never_replay_their_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert!(!wal.preallocated() && wal.wants_spare());
        install(&mut wal);
        assert!(wal.preallocated(), "installing a spare switches to it");
        // Fill the preallocated segment: the log moves on by itself.
        let first = wal.segment();
        for i in 0..(SEGMENT as usize / BLOCK + 1) {
            wal.append(&[put("old", &i.to_string())]).unwrap();
        }
        assert_eq!(wal.segment(), first + 1);
        // A checkpoint covers the full segment: it becomes the next one, and
        // the log switches to it at once (the current one is not
        // preallocated)...
        remove_retired(&mut wal);
        assert_eq!(wal.segment(), first + 2);
        assert!(wal.preallocated());
        // ...and its old records (another segment number) are not read.
        remove_retired(&mut wal);
        wal.append(&[put("new", "1")]).unwrap();
        drop(wal);
        let (_, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert_eq!(batches, vec![vec![put("new", "1")]]);
    }

    /// The spare carries the next segment's name before the writer needs
    /// it, and the writer switches to that very file.
    #[test]
    fn the_next_segment_is_named_ahead_and_switched_to_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        install(&mut wal);
        let first = wal.segment();
        let mut written = Vec::new();
        while !wal.wants_spare() {
            written.push(vec![put("k", &written.len().to_string())]);
            wal.append(written.last().unwrap()).unwrap();
        }
        install(&mut wal);
        assert_eq!(wal.ready, Some(first + 1));
        let named_ahead = inode(dir.path(), first + 1);
        while wal.segment() == first {
            written.push(vec![put("k", &written.len().to_string())]);
            wal.append(written.last().unwrap()).unwrap();
        }
        assert_eq!(inode(dir.path(), first + 1), named_ahead);
        assert!(wal.preallocated() && wal.ready.is_none());
        drop(wal);
        let (_, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert_eq!(batches, written);
    }

    /// A spare whose name is not synced yet is still used if the writer
    /// gets there first (it syncs the name itself); the late sync then
    /// changes nothing.
    #[test]
    fn a_staged_spare_the_writer_reaches_first_is_used_and_its_late_name_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        let current = wal.segment();
        assert!(Wal::prepare_spare(dir.path(), SEGMENT).unwrap());
        let named = wal.install_spare().unwrap();
        assert!(!wal.wants_spare(), "a staged spare is not asked for twice");
        wal.rotate().unwrap();
        assert_eq!(wal.segment(), current + 1);
        assert!(wal.preallocated());
        wal.named(named.sync().unwrap()).unwrap();
        assert_eq!((wal.segment(), wal.ready), (current + 1, None));
        wal.append(&[put("a", "1")]).unwrap();
        drop(wal);
        assert_eq!(
            Wal::open(dir.path(), SEGMENT).unwrap().1,
            vec![vec![put("a", "1")]]
        );
    }

    /// After a restart the log starts past a spare named ahead (which may
    /// be recycled, full of another segment's records) and never writes
    /// into it; the next checkpoint disposes of it.
    #[test]
    fn a_spare_named_ahead_is_never_written_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        install(&mut wal);
        for i in 0..(SEGMENT as usize / BLOCK + 1) {
            wal.append(&[put("old", &i.to_string())]).unwrap();
        }
        // A zeroed spare for the segment after the full one...
        install(&mut wal);
        assert!(wal.preallocated());
        // ...and the full one recycled as the next, named ahead.
        remove_retired(&mut wal);
        let spare = wal.ready.unwrap();
        wal.append(&[put("kept", "1")]).unwrap();
        drop(wal);
        let (mut wal, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert_eq!(batches, vec![vec![put("kept", "1")]]);
        assert_eq!(wal.segment(), spare + 1);
        wal.append(&[put("after", "1")]).unwrap();
        remove_retired(&mut wal);
        assert!(segments(dir.path()).unwrap().iter().all(|&s| s > spare));
        drop(wal);
        assert_eq!(
            Wal::open(dir.path(), SEGMENT).unwrap().1,
            vec![vec![put("after", "1")]]
        );
    }

    #[test]
    fn remove_retired_before_deletes_only_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT).unwrap();
        wal.append(&[put("a", "1")]).unwrap();
        wal.rotate().unwrap();
        let upto = wal.segment();
        wal.append(&[put("b", "2")]).unwrap();
        wal.rotate().unwrap();
        // Only what the checkpoint covers goes.
        remove_before(&mut wal, upto);
        assert_eq!(wal.read_all().unwrap(), vec![vec![put("b", "2")]]);
        remove_retired(&mut wal);
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert!(wal.read_all().unwrap().is_empty());
        drop(wal);
        let (_, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert!(batches.is_empty());
    }

    #[test]
    fn unrelated_files_in_the_directory_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("12.log"), "x").unwrap();
        let (mut wal, batches) = Wal::open(dir.path(), SEGMENT).unwrap();
        assert!(batches.is_empty());
        wal.append(&[put("a", "1")]).unwrap();
        assert_eq!(wal.read_all().unwrap().len(), 1);
    }
}

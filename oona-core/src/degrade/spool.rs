//! The durable local spool: an append-only log of envelopes on disk that
//! holds what a publisher could not hand to the broker, in order, until
//! the broker takes it.
//!
//! # Format (version 1)
//!
//! A spool is a directory of segment files `seg-<20-digit number>.log`,
//! read in number order, and a `cursor` file. A segment starts with the
//! eight bytes `OONASPL1`, followed by records:
//!
//! | bytes | what |
//! |---|---|
//! | 4 | payload length, u32 little-endian |
//! | 4 | CRC-32 (IEEE, as Python's `zlib.crc32`) of the payload, u32 little-endian |
//! | n | payload: the envelope's canonical JSON document ([`crate::wire::json`]) |
//!
//! `cursor` holds `<segment number> <byte offset>\n`: the first record not
//! yet on the broker. It is rewritten (write, fsync, rename) after each
//! batch the broker took; a crash between a batch and its cursor makes
//! that batch go again (at least once, never lost).
//!
//! # Durability
//!
//! With [`SpoolSync::Always`] (the default) `append` returns once the
//! record is fsynced: a publish that returned `Ok` survives a crash of the
//! process and of the machine. Concurrent appends share one fsync (group
//! commit). [`SpoolSync::Never`] leaves the writing back to the OS: the
//! records survive the process (SIGKILL included), not a power cut.
//!
//! # Damage
//!
//! A record cut short at the end of the newest segment (a crash mid-write,
//! never acknowledged under `Always`) is cut off on open and its bytes kept
//! in `damaged-cut-<segment file>-<offset>.bin`; a new process appends to a
//! new segment, never after what an earlier one wrote. Bytes that do not
//! verify anywhere else (checksum, length or JSON) are never dropped
//! silently: they go to `damaged-<segment>-<offset>.bin` beside the spool,
//! counted and logged at error level, and reading goes on from the next
//! record that verifies. A failed write is cut back and the writer goes on
//! in a new segment.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync::lock;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::wire::json;

const MAGIC: &[u8; 8] = b"OONASPL1";
const HEADER: u64 = 8;
const RECORD_HEAD: u64 = 8;

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpoolSync {
    /// fsync before `append` returns (group commit): survives a machine
    /// crash.
    #[default]
    Always,
    /// The OS writes back when it likes: survives the process, not a
    /// power cut.
    Never,
}

/// What `append` does when the spool holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Fail at once with [`ErrorKind::SpoolFull`].
    Fail,
    /// Wait up to this long for the broker to take records, then fail.
    Wait(Duration),
}

/// Settings of a spool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The directory (created if missing). One publisher process per
    /// directory.
    pub dir: PathBuf,
    /// Most bytes the spool holds (records and their heads): 1 GiB.
    pub max_bytes: u64,
    /// A new segment is started past this size: 64 MiB.
    pub segment_bytes: u64,
    /// When records reach the disk: [`SpoolSync::Always`].
    pub sync: SpoolSync,
    /// What a full spool does: wait up to 5 s.
    pub when_full: WhenFull,
}

impl SpoolConfig {
    /// The largest record: one may fill a segment of its own.
    fn record_limit(&self) -> u64 {
        self.max_bytes.max(self.segment_bytes)
    }

    /// The defaults, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            sync: SpoolSync::Always,
            when_full: WhenFull::Wait(Duration::from_secs(5)),
        }
    }

    /// Set [`SpoolConfig::max_bytes`].
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Set [`SpoolConfig::segment_bytes`].
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(HEADER + RECORD_HEAD + 1);
        self
    }

    /// Set [`SpoolConfig::sync`].
    pub fn sync(mut self, sync: SpoolSync) -> Self {
        self.sync = sync;
        self
    }

    /// Set [`SpoolConfig::when_full`].
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }
}

/// Where a record starts: segment number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpoolPosition {
    /// The segment's number.
    pub segment: u64,
    /// The record's byte offset in it.
    pub offset: u64,
}

/// What a spool holds and has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolStats {
    /// Records waiting for the broker.
    pub records: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Records appended since open.
    pub appended: u64,
    /// Records the broker took since open.
    pub flushed: u64,
    /// Bytes moved aside as damaged since open.
    pub damaged_bytes: u64,
}

/// The durable local spool (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<Write1>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.config.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Write1 {
    record: Vec<u8>,
    done: oneshot::Sender<Result<SpoolPosition>>,
}

struct Shared {
    config: SpoolConfig,
    state: Mutex<State>,
    /// Woken when records are appended (the reader) or taken (a waiting
    /// appender).
    appended: Notify,
    taken: Notify,
}

struct State {
    /// First record not yet taken by the broker.
    cursor: SpoolPosition,
    /// End of the durable (written and, with `Always`, synced) records.
    end: SpoolPosition,
    stats: SpoolStats,
    /// Bytes of appends admitted but not written yet (so concurrent
    /// appends cannot overshoot `max_bytes` together).
    reserved: u64,
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Internal, format!("spool: {what}: {e}"))
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:020}.log"))
}

/// The segment numbers in `dir`, in order.
fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir.display(), e))?;
    for entry in entries {
        let name = entry.map_err(|e| io_err(dir.display(), e))?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// One record read from a segment.
enum Read1 {
    Record {
        envelope: Box<Envelope>,
        next: u64,
    },
    /// End of the segment's complete records.
    End,
    /// Bytes from here on do not verify.
    Damaged(String),
}

/// A little-endian u32 from the first four bytes of `b`.
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Walk the record heads of `f` from `start` while whole records fit
/// below `stop`: where the walk ended (a record boundary) and how many
/// records it passed. No checksums are read (see [`read_record`]).
fn walk_records(
    f: &mut File,
    path: &Path,
    start: u64,
    stop: u64,
    limit: u64,
) -> Result<(u64, u64)> {
    let (mut at, mut records) = (start, 0);
    let mut head = [0u8; RECORD_HEAD as usize];
    while at + RECORD_HEAD <= stop {
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut head))
            .map_err(|e| io_err(path.display(), e))?;
        let len = u64::from(le_u32(&head));
        if len == 0 || len > limit || at + RECORD_HEAD + len > stop {
            break;
        }
        at += RECORD_HEAD + len;
        records += 1;
    }
    Ok((at, records))
}

/// The record at `offset` of a segment `file_len` bytes long. Only the
/// end of the file at a record boundary is `End`; a record cut short is
/// damage (the writer never leaves one behind in a segment it moved past).
fn read_record(file: &mut File, offset: u64, file_len: u64, len_limit: u64) -> Result<Read1> {
    if offset >= file_len {
        return Ok(Read1::End);
    }
    if offset + RECORD_HEAD > file_len {
        return Ok(Read1::Damaged("a record head cut short".into()));
    }
    let mut head = [0u8; RECORD_HEAD as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut head))
        .map_err(|e| io_err("read", e))?;
    let len = u64::from(le_u32(&head));
    let crc = le_u32(&head[4..]);
    if len == 0 || len > len_limit {
        return Ok(Read1::Damaged(format!("record length {len}")));
    }
    if offset + RECORD_HEAD + len > file_len {
        return Ok(Read1::Damaged("a record cut short".into()));
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact(&mut body).map_err(|e| io_err("read", e))?;
    if crc32fast::hash(&body) != crc {
        return Ok(Read1::Damaged("checksum mismatch".into()));
    }
    match json::decode(&body) {
        Ok(envelope) => Ok(Read1::Record {
            envelope: Box::new(envelope),
            next: offset + RECORD_HEAD + len,
        }),
        Err(e) => Ok(Read1::Damaged(format!("envelope: {}", e.message()))),
    }
}

impl Spool {
    /// Open (or create) the spool in `config.dir`: finds the cursor, cuts
    /// off a torn last record, and counts what waits. Must run inside a
    /// tokio runtime (the writer is a task).
    pub fn open(config: SpoolConfig) -> Result<Spool> {
        fs::create_dir_all(&config.dir).map_err(|e| io_err(config.dir.display(), e))?;
        let state = recover(&config)?;
        let (writes, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            appended: Notify::new(),
            taken: Notify::new(),
        });
        let writer = Writer::open(Arc::clone(&shared))?;
        tokio::spawn(writer.run(rx));
        Ok(Spool { shared, writes })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.config.dir
    }

    /// What the spool holds and has seen.
    pub fn stats(&self) -> SpoolStats {
        self.state().stats
    }

    /// Whether every record was taken by the broker.
    pub fn is_empty(&self) -> bool {
        let s = self.state();
        s.cursor >= s.end
    }

    /// Append `envelope`; returns once it is durable (see [`SpoolSync`]).
    /// A full spool waits or fails as [`SpoolConfig::when_full`] says,
    /// with [`ErrorKind::SpoolFull`].
    pub async fn append(&self, envelope: &Envelope) -> Result<SpoolPosition> {
        let mut at = self.append_all(std::slice::from_ref(envelope)).await?;
        at.pop()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "spool: no position for an append"))
    }

    /// Append `envelopes` in order, sharing the writes and fsyncs; returns
    /// once all are durable, or the first error.
    pub async fn append_all(&self, envelopes: &[Envelope]) -> Result<Vec<SpoolPosition>> {
        let mut records = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let body = json::encode(envelope)?;
            let size = RECORD_HEAD + body.len() as u64;
            if size + HEADER > self.shared.config.record_limit() {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!("spool: a record of {size} bytes does not fit the spool"),
                ));
            }
            let mut record = Vec::with_capacity(size as usize);
            record.extend_from_slice(&(body.len() as u32).to_le_bytes());
            record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            record.extend_from_slice(&body);
            records.push(record);
        }
        self.wait_for_room(records.iter().map(|r| r.len() as u64).sum())
            .await?;
        let stopped = || Error::new(ErrorKind::Closed, "spool: the writer stopped");
        // All sent first: the writer takes them together, in order.
        let mut answers = Vec::with_capacity(records.len());
        for record in records {
            let (done, rx) = oneshot::channel();
            self.writes
                .send(Write1 { record, done })
                .map_err(|_| stopped())?;
            answers.push(rx);
        }
        let mut positions = Vec::with_capacity(answers.len());
        for rx in answers {
            positions.push(rx.await.map_err(|_| stopped())??);
        }
        Ok(positions)
    }

    async fn wait_for_room(&self, size: u64) -> Result<()> {
        let max = self.shared.config.max_bytes;
        let deadline = match self.shared.config.when_full {
            WhenFull::Fail => None,
            WhenFull::Wait(d) => Some(tokio::time::Instant::now() + d),
        };
        loop {
            let taken = self.shared.taken.notified();
            {
                let mut s = self.state();
                if s.stats.bytes + s.reserved + size <= max {
                    s.reserved += size;
                    return Ok(());
                }
            }
            let full = || {
                Error::new(
                    ErrorKind::SpoolFull,
                    format!(
                        "spool {} holds {max} bytes, its limit: the broker has not taken them",
                        self.shared.config.dir.display()
                    ),
                )
            };
            match deadline {
                None => return Err(full()),
                Some(at) => {
                    if tokio::time::timeout_at(at, taken).await.is_err() {
                        return Err(full());
                    }
                }
            }
        }
    }

    /// Up to `max` records from the cursor on, in order. Waits until
    /// there is at least one.
    pub async fn next_batch(&self, max: usize) -> Result<Vec<SpooledRecord>> {
        loop {
            let appended = self.shared.appended.notified();
            if !self.is_empty() {
                let this = self.clone();
                return tokio::task::spawn_blocking(move || this.read_batch(max))
                    .await
                    .map_err(|e| Error::new(ErrorKind::Internal, format!("spool read: {e}")))?;
            }
            appended.await;
        }
    }

    fn read_batch(&self, max: usize) -> Result<Vec<SpooledRecord>> {
        let (from, end) = {
            let s = self.state();
            (s.cursor, s.end)
        };
        let dir = &self.shared.config.dir;
        let limit_bytes = self.shared.config.record_limit();
        let mut at = from;
        let mut out: Vec<SpooledRecord> = Vec::new();
        while out.len() < max && at < end {
            let next_segment = SpoolPosition {
                segment: at.segment + 1,
                offset: HEADER,
            };
            let path = segment_path(dir, at.segment);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                // Segments taken already are gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    at = next_segment;
                    continue;
                }
                Err(e) => return Err(io_err(path.display(), e)),
            };
            // Only the durable part of the segment being written is read.
            let file_len = file
                .metadata()
                .map_err(|e| io_err(path.display(), e))?
                .len();
            let file_len = if at.segment == end.segment {
                file_len.min(end.offset)
            } else {
                file_len
            };
            while out.len() < max && at.offset < file_len {
                match read_record(&mut file, at.offset, file_len, limit_bytes)? {
                    Read1::Record { envelope, next } => {
                        let size = next - at.offset;
                        at.offset = next;
                        out.push(SpooledRecord {
                            envelope: *envelope,
                            next: at,
                            size,
                        });
                    }
                    Read1::End => break,
                    Read1::Damaged(why) => {
                        // Set the bad bytes aside and read on from the
                        // next record that verifies.
                        let next = resync(&mut file, at.offset, file_len, limit_bytes)?;
                        self.set_aside(&mut file, at, next, &why)?;
                        at.offset = next;
                    }
                }
            }
            if at.offset < file_len || at.segment == end.segment {
                break; // the batch is full, or reading caught up
            }
            // This segment is done: the next record starts the next one.
            match out.last_mut() {
                Some(last) if last.next == at => last.next = next_segment,
                _ => {}
            }
            at = next_segment;
        }
        if out.is_empty() && at > from {
            // Nothing to hand out before `at` (segments gone, damage set
            // aside): the cursor moves on by itself.
            self.advance_to(at.min(end), 0, 0)?;
        }
        Ok(out)
    }

    /// Move the bytes of a segment from `at` to `upto` aside (never
    /// dropped silently).
    fn set_aside(&self, file: &mut File, at: SpoolPosition, upto: u64, why: &str) -> Result<()> {
        let dir = &self.shared.config.dir;
        let path = dir.join(format!("damaged-{:020}-{}.bin", at.segment, at.offset));
        if path.exists() {
            return Ok(()); // set aside on an earlier read
        }
        let mut rest = vec![0u8; upto.saturating_sub(at.offset) as usize];
        file.seek(SeekFrom::Start(at.offset))
            .and_then(|_| file.read_exact(&mut rest))
            .map_err(|e| io_err("read damaged records", e))?;
        keep_aside(&path, &rest)?;
        tracing::error!(
            spool = %dir.display(),
            segment = at.segment,
            offset = at.offset,
            bytes = rest.len(),
            reason = why,
            moved_to = %path.display(),
            "spool: records that do not verify were moved aside"
        );
        let mut s = self.state();
        s.stats.damaged_bytes += rest.len() as u64;
        s.stats.bytes = s.stats.bytes.saturating_sub(rest.len() as u64);
        Ok(())
    }

    /// The broker took `records` (in order, from the cursor on): persist
    /// the cursor past them and delete the segments wholly behind it.
    pub async fn advance(&self, records: &[SpooledRecord]) -> Result<()> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        let (to, n) = (last.next, records.len() as u64);
        let bytes = records.iter().map(|r| r.size).sum();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.advance_to(to, n, bytes))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("spool advance: {e}")))?
    }

    fn advance_to(&self, to: SpoolPosition, records: u64, bytes: u64) -> Result<()> {
        let dir = &self.shared.config.dir;
        // A cursor that cannot be saved (a full disk) must not stop the
        // flush: the records are on the broker; after a restart they go
        // again from the saved cursor (segments gone are skipped).
        if let Err(e) = write_cursor(dir, to) {
            tracing::error!(error = %e, "spool: the cursor could not be saved");
        }
        let writing = self.state().end.segment;
        for n in segments(dir)? {
            if n < to.segment && n < writing {
                let _ = fs::remove_file(segment_path(dir, n));
            }
        }
        {
            let mut s = self.state();
            s.cursor = s.cursor.max(to);
            s.stats.records = s.stats.records.saturating_sub(records);
            s.stats.bytes = s.stats.bytes.saturating_sub(bytes);
            s.stats.flushed += records;
        }
        self.shared.taken.notify_waiters();
        Ok(())
    }
}

/// A record read from the spool.
#[derive(Debug, Clone)]
pub struct SpooledRecord {
    /// The envelope.
    pub envelope: Envelope,
    /// Where the next record starts.
    pub next: SpoolPosition,
    /// Its bytes on disk.
    pub size: u64,
}

/// The offset of the first record after `from` whose length fits and
/// whose checksum verifies (a false match is a 1 in 2^32 chance), or
/// `file_len` when none does.
fn resync(file: &mut File, from: u64, file_len: u64, len_limit: u64) -> Result<u64> {
    let start = from + 1;
    let mut rest = vec![0u8; file_len.saturating_sub(start) as usize];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut rest))
        .map_err(|e| io_err("read past damaged records", e))?;
    let head = RECORD_HEAD as usize;
    for i in 0..rest.len().saturating_sub(head) {
        let len = le_u32(&rest[i..]) as usize;
        if len == 0 || len as u64 > len_limit || i + head + len > rest.len() {
            continue;
        }
        let crc = le_u32(&rest[i + 4..]);
        if crc32fast::hash(&rest[i + head..i + head + len]) == crc {
            return Ok(start + i as u64);
        }
    }
    Ok(file_len)
}

/// Write damaged or cut bytes beside the spool.
fn keep_aside(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| io_err(path.display(), e))
}

fn write_cursor(dir: &Path, at: SpoolPosition) -> Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp).map_err(|e| io_err(tmp.display(), e))?;
    writeln!(f, "{} {}", at.segment, at.offset).map_err(|e| io_err(tmp.display(), e))?;
    f.sync_all().map_err(|e| io_err(tmp.display(), e))?;
    fs::rename(&tmp, dir.join("cursor")).map_err(|e| io_err("rename cursor", e))
}

fn read_cursor(dir: &Path) -> Result<Option<SpoolPosition>> {
    let text = match fs::read_to_string(dir.join("cursor")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cursor", e)),
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Ok(Some(SpoolPosition { segment, offset })),
        _ => Err(Error::new(
            ErrorKind::Internal,
            format!(
                "spool: {}: the cursor file does not read `<segment> <offset>`",
                dir.join("cursor").display()
            ),
        )),
    }
}

/// The state of the spool on disk: cursor, end (a torn last record cut
/// off) and what waits.
fn recover(config: &SpoolConfig) -> Result<State> {
    let dir = &config.dir;
    let segs = segments(dir)?;
    let last = segs.last().copied();
    let cursor = read_cursor(dir)?.unwrap_or(SpoolPosition {
        segment: segs.first().copied().unwrap_or(0),
        offset: HEADER,
    });
    let end = match last {
        None => SpoolPosition {
            segment: cursor.segment,
            offset: HEADER,
        },
        Some(n) => SpoolPosition {
            segment: n,
            offset: complete_length(&segment_path(dir, n), config.record_limit())?,
        },
    };
    let cursor = cursor.min(end);
    let stats = count(dir, cursor, end, SpoolStats::default())?;
    Ok(State {
        cursor,
        end,
        stats,
        reserved: 0,
    })
}

/// The length of a segment's complete records (a torn tail is cut off).
fn complete_length(path: &Path, record_limit: u64) -> Result<u64> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path.display(), e))?;
    let len = f.metadata().map_err(|e| io_err(path.display(), e))?.len();
    let mut magic = [0u8; HEADER as usize];
    if len >= HEADER {
        f.read_exact(&mut magic)
            .map_err(|e| io_err(path.display(), e))?;
        if &magic != MAGIC {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "spool: {} is not a spool segment (version 1)",
                    path.display()
                ),
            ));
        }
    }
    let (at, _) = walk_records(&mut f, path, HEADER, len, record_limit)?;
    if at < len {
        // A crash mid-write, or damage: the bytes are kept, not dropped.
        let mut cut = vec![0u8; (len - at) as usize];
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut cut))
            .map_err(|e| io_err(path.display(), e))?;
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let aside = path.with_file_name(format!("damaged-cut-{name}-{at}.bin"));
        keep_aside(&aside, &cut)?;
        tracing::warn!(segment = %path.display(), at, len, kept_in = %aside.display(), "spool: an unfinished last record was cut off");
        f.set_len(at.max(HEADER))
            .map_err(|e| io_err(path.display(), e))?;
    }
    Ok(at.max(HEADER))
}

/// `stats` with `records` and `bytes` counted between `from` and `to`.
fn count(
    dir: &Path,
    from: SpoolPosition,
    to: SpoolPosition,
    stats: SpoolStats,
) -> Result<SpoolStats> {
    let mut records = 0;
    let mut bytes = 0;
    for n in segments(dir)?
        .into_iter()
        .filter(|n| *n >= from.segment && *n <= to.segment)
    {
        let path = segment_path(dir, n);
        let mut f = File::open(&path).map_err(|e| io_err(path.display(), e))?;
        let start = if n == from.segment {
            from.offset
        } else {
            HEADER
        };
        let stop = if n == to.segment {
            to.offset
        } else {
            f.metadata().map_err(|e| io_err(path.display(), e))?.len()
        };
        let (at, passed) = walk_records(&mut f, &path, start, stop, u64::MAX)?;
        records += passed;
        bytes += at.saturating_sub(start);
    }
    Ok(SpoolStats {
        records,
        bytes,
        ..stats
    })
}

/// The one task that writes segments: appends that arrive together share
/// a write and an fsync.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    segment: u64,
    len: u64,
}

impl Writer {
    /// Appends go to a new segment when the last one holds records: what
    /// a previous process wrote is only read, never written after (its
    /// tail may hide damage that recovery cannot see).
    fn open(shared: Arc<Shared>) -> Result<Writer> {
        let mut end = lock(&shared.state).end;
        if end.offset > HEADER {
            end = SpoolPosition {
                segment: end.segment + 1,
                offset: HEADER,
            };
        }
        let (file, len) = open_segment(&shared.config.dir, end.segment)?;
        lock(&shared.state).end = SpoolPosition {
            segment: end.segment,
            offset: len,
        };
        Ok(Writer {
            shared,
            file,
            segment: end.segment,
            len,
        })
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Write1>) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 256).await > 0 {
            let writes = std::mem::take(&mut batch);
            let joined = tokio::task::spawn_blocking(move || {
                let result = self.write(&writes);
                (self, writes, result)
            })
            .await;
            // A panic in the blocking write: the appends see `Closed`.
            let Ok((writer, writes, result)) = joined else {
                return;
            };
            self = writer;
            match result {
                Ok(positions) => {
                    for (w, at) in writes.into_iter().zip(positions) {
                        let _ = w.done.send(Ok(at));
                    }
                }
                Err(e) => {
                    let msg = e.message().to_string();
                    for w in writes {
                        let _ = w.done.send(Err(Error::new(e.kind(), msg.clone())));
                    }
                }
            }
            self.shared.appended.notify_waiters();
        }
    }

    /// Write `writes` in order (a new segment when one is full), sync as
    /// configured, and move the durable end. Returns each record's start.
    fn write(&mut self, writes: &[Write1]) -> Result<Vec<SpoolPosition>> {
        let r = self.write_all(writes);
        let mut s = lock(&self.shared.state);
        let admitted: u64 = writes.iter().map(|w| w.record.len() as u64).sum();
        s.reserved = s.reserved.saturating_sub(admitted);
        if r.is_err() {
            // What did reach the disk is readable up to the durable end.
            s.end = s.end.max(SpoolPosition {
                segment: self.segment,
                offset: self.len,
            });
        }
        r
    }

    fn write_all(&mut self, writes: &[Write1]) -> Result<Vec<SpoolPosition>> {
        let segment_bytes = self.shared.config.segment_bytes;
        let mut positions = Vec::with_capacity(writes.len());
        let mut buf = Vec::new();
        for w in writes {
            if self.len + buf.len() as u64 + w.record.len() as u64 > segment_bytes
                && self.len + buf.len() as u64 > HEADER
            {
                self.flush_buf(&mut buf)?;
                self.next_segment()?;
            }
            positions.push(SpoolPosition {
                segment: self.segment,
                offset: self.len + buf.len() as u64,
            });
            buf.extend_from_slice(&w.record);
        }
        self.flush_buf(&mut buf)?;
        let mut s = lock(&self.shared.state);
        s.end = SpoolPosition {
            segment: self.segment,
            offset: self.len,
        };
        s.stats.records += writes.len() as u64;
        s.stats.bytes += writes.iter().map(|w| w.record.len() as u64).sum::<u64>();
        s.stats.appended += writes.len() as u64;
        Ok(positions)
    }

    fn flush_buf(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut written = self.file.write_all(buf).map_err(|e| io_err("append", e));
        if written.is_ok() && self.shared.config.sync == SpoolSync::Always {
            written = self.file.sync_data().map_err(|e| io_err("fsync", e));
        }
        if let Err(e) = written {
            // Those appends fail. Their bytes must not stay where the next
            // records go: cut them, and write on in a new segment (after a
            // failed fsync nothing written to this file is sure).
            let _ = self.file.set_len(self.len);
            buf.clear();
            if let Err(rotate) = self.next_segment() {
                tracing::error!(error = %rotate, "spool: no new segment after a failed write");
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        buf.clear();
        Ok(())
    }

    fn next_segment(&mut self) -> Result<()> {
        let (file, len) = open_segment(&self.shared.config.dir, self.segment + 1)?;
        self.file = file;
        self.segment += 1;
        self.len = len;
        Ok(())
    }
}

/// Open segment `n` for appending, writing its magic if it is new; its
/// length.
fn open_segment(dir: &Path, n: u64) -> Result<(File, u64)> {
    let path = segment_path(dir, n);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(|e| io_err(path.display(), e))?;
    let len = f.metadata().map_err(|e| io_err(path.display(), e))?.len();
    if len == 0 {
        f.write_all(MAGIC)
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err(path.display(), e))?;
        // The new file's name must survive a crash too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        return Ok((f, HEADER));
    }
    Ok((f, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    fn envelope(i: usize) -> Envelope {
        let topic = Topic::new("telemetry.spool.test").unwrap();
        Envelope::builder(topic, format!("{{\"i\":{i}}}"))
            .sender_id("spool-test")
            .key(format!("k{}", i % 3))
            .build()
    }

    fn payloads(records: &[SpooledRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.envelope.payload).into_owned())
            .collect()
    }

    /// Open, run `f`, and let the writer task end (as a process would).
    async fn session<T>(cfg: &SpoolConfig, f: impl AsyncFnOnce(&Spool) -> T) -> T {
        let spool = Spool::open(cfg.clone()).unwrap();
        let out = f(&spool).await;
        drop(spool);
        tokio::task::yield_now().await;
        out
    }

    #[tokio::test]
    async fn records_survive_a_reopen_in_order_and_the_cursor_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig::new(dir.path()).segment_bytes(600);
        let sent: Vec<Envelope> = (0..10).map(envelope).collect();
        session(&cfg, async |s| {
            for e in &sent {
                s.append(e).await.unwrap();
            }
            assert_eq!(s.stats().records, 10);
        })
        .await;
        assert!(segments(dir.path()).unwrap().len() > 1, "several segments");
        let first = session(&cfg, async |s| {
            assert_eq!(s.stats().records, 10);
            let batch = s.next_batch(4).await.unwrap();
            s.advance(&batch).await.unwrap();
            batch
        })
        .await;
        assert_eq!(first.len(), 4);
        let rest = session(&cfg, async |s| {
            assert_eq!(s.stats().records, 6);
            let rest = s.next_batch(100).await.unwrap();
            s.advance(&rest).await.unwrap();
            assert!(s.is_empty());
            assert_eq!(s.stats().bytes, 0);
            rest
        })
        .await;
        let got: Vec<_> = first
            .iter()
            .chain(&rest)
            .map(|r| r.envelope.clone())
            .collect();
        assert_eq!(got, sent, "every record, in order, exactly");
        // Segments wholly taken are deleted; the one being written stays.
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig::new(dir.path());
        session(&cfg, async |s| {
            s.append(&envelope(1)).await.unwrap();
            s.append(&envelope(2)).await.unwrap();
        })
        .await;
        let seg = segment_path(dir.path(), segments(dir.path()).unwrap()[0]);
        let whole = fs::metadata(&seg).unwrap().len();
        // A crash mid-write: a head announcing 500 bytes, 3 of them there.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&500u32.to_le_bytes()).unwrap();
        f.write_all(&[0, 0, 0, 0, b'{', b'"', b'x']).unwrap();
        drop(f);
        let got = session(&cfg, async |s| {
            assert_eq!(s.stats().records, 2);
            let b = s.next_batch(10).await.unwrap();
            // Appending goes on, in a new segment.
            s.append(&envelope(3)).await.unwrap();
            b
        })
        .await;
        assert_eq!(payloads(&got), ["{\"i\":1}", "{\"i\":2}"]);
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            whole,
            "cut back to the whole records"
        );
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            2,
            "appended in a new segment"
        );
        let kept = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("damaged-cut-"));
        assert!(kept, "the cut bytes are kept");
        let again = session(&cfg, async |s| s.next_batch(10).await.unwrap()).await;
        assert_eq!(payloads(&again), ["{\"i\":1}", "{\"i\":2}", "{\"i\":3}"]);
    }

    #[tokio::test]
    async fn a_damaged_record_is_moved_aside_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        // One record per segment.
        let cfg = SpoolConfig::new(dir.path()).segment_bytes(100);
        session(&cfg, async |s| {
            for i in 0..3 {
                s.append(&envelope(i)).await.unwrap();
            }
        })
        .await;
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 3);
        let middle = segment_path(dir.path(), segs[1]);
        let mut bytes = fs::read(&middle).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x55; // a flipped bit in the payload
        fs::write(&middle, &bytes).unwrap();
        session(&cfg, async |s| {
            let mut got = Vec::new();
            while got.len() < 2 {
                let b = s.next_batch(10).await.unwrap();
                s.advance(&b).await.unwrap();
                got.extend(b);
            }
            assert_eq!(payloads(&got), ["{\"i\":0}", "{\"i\":2}"]);
            assert!(s.stats().damaged_bytes > 0);
        })
        .await;
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged bytes are kept");
        assert_eq!(
            fs::read(aside[0].path()).unwrap(),
            bytes[HEADER as usize..],
            "all of them"
        );
    }

    #[tokio::test]
    async fn damage_in_the_segment_being_written_costs_only_the_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(SpoolConfig::new(dir.path())).unwrap();
        let mut ends = Vec::new();
        for i in 0..3 {
            s.append(&envelope(i)).await.unwrap();
            ends.push(s.state().end.offset);
        }
        // A flipped bit in the second record, while the spool is open.
        let seg = segment_path(dir.path(), segments(dir.path()).unwrap()[0]);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[ends[1] as usize - 2] ^= 0x55;
        fs::write(&seg, &bytes).unwrap();
        for i in 3..5 {
            s.append(&envelope(i)).await.unwrap();
        }
        let mut got = Vec::new();
        while !s.is_empty() {
            let b = s.next_batch(10).await.unwrap();
            s.advance(&b).await.unwrap();
            got.extend(b);
        }
        assert_eq!(
            payloads(&got),
            ["{\"i\":0}", "{\"i\":2}", "{\"i\":3}", "{\"i\":4}"],
            "reading goes on after the damage, in the same segment"
        );
        assert_eq!(s.stats().damaged_bytes, ends[1] - ends[0]);
    }

    #[tokio::test]
    async fn a_full_spool_fails_or_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two records (their timestamps' lengths vary a little),
        // not three.
        let one = RECORD_HEAD + json::encode(&envelope(0)).unwrap().len() as u64;
        let cfg = SpoolConfig::new(dir.path())
            .max_bytes(2 * one + 32)
            .when_full(WhenFull::Fail);
        let s = Spool::open(cfg.clone()).unwrap();
        s.append(&envelope(0)).await.unwrap();
        s.append(&envelope(1)).await.unwrap();
        let e = s.append(&envelope(2)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SpoolFull, "{e}");
        assert!(e.is_temporary());
        drop(s);
        tokio::task::yield_now().await;

        let s = Spool::open(cfg.when_full(WhenFull::Wait(Duration::from_secs(10)))).unwrap();
        let taker = {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let b = s.next_batch(1).await.unwrap();
                s.advance(&b).await.unwrap();
            })
        };
        s.append(&envelope(2))
            .await
            .expect("room once one was taken");
        taker.await.unwrap();
        assert_eq!(s.stats().records, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_do_not_overshoot_the_limit_together() {
        let dir = tempfile::tempdir().unwrap();
        let one = RECORD_HEAD + json::encode(&envelope(0)).unwrap().len() as u64;
        let max = 3 * one + 32;
        let cfg = SpoolConfig::new(dir.path())
            .max_bytes(max)
            .when_full(WhenFull::Fail);
        let s = Spool::open(cfg).unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.append(&envelope(i)).await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 3, "room for three");
        assert!(s.stats().bytes <= max, "{:?}", s.stats());
    }

    #[tokio::test]
    async fn a_file_that_is_no_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(segment_path(dir.path(), 0), b"not a spool at all").unwrap();
        let e = Spool::open(SpoolConfig::new(dir.path())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    }
}

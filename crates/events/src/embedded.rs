//! The embedded back-end of the event log: Kafka's semantics on segment files, in one process.
//!
//! - Layout 4 (since 2026-12-07): the directory `log/` of the data directory holds segment files
//!   of checksummed frames (`files`). One writer thread appends, in groups: every request that
//!   arrives while a write is running goes into the next frame, which is written with one
//!   `write` and made durable with one `fdatasync`; a record is acknowledged only after that, so
//!   neither a SIGKILL nor a power cut loses an acknowledged event. A frame is a commit: a crash
//!   in the middle of one leaves a torn frame, cut off at the next open (nothing of it was
//!   acknowledged).
//! - The writer assigns offsets (per topic partition, from 0, no gaps). Appends and a consumer's
//!   committed offset can share a frame ([`Committer`]): the fan-out's outputs are exactly once.
//! - Partitions by key with Kafka's own partitioner (murmur2, seed 0x9747b28c, positive modulo),
//!   so a key lands in the same partition number here and in Kafka.
//! - Consumer groups: members of a group in this process share the partitions (round-robin over
//!   sorted partitions; reassigned when a member joins or leaves); each member reads from its
//!   group's committed offset, scanning frames in append order from the mark (kept in memory,
//!   every 64th offset of a partition) at or before it; stored offsets are committed every
//!   500 ms and on `commit`, as entries of the next frame.
//! - A failed write or sync (a full disk) fails its frame's requests with `unavailable`: the file
//!   is cut back to where the frame began and the writer's state put back, so nothing of it is
//!   kept, and the next frame is written there; `ping` fails until a write goes through again
//!   (it writes a tiny frame to find out). If the file cannot even be cut back, the writer stops
//!   for good, and a restart reads the files again.
//! - The SQLite layouts of earlier releases (`log.db`) are converted at open (`legacy`).

mod files;
mod legacy;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, warn};

use self::files::{Cursor, Entry, Segment, State, Tp};
use crate::log::{Committer, EventLog, LogConsumer, LogError, LogReader, PartitionLag, Position, Record, TopicSpec};

pub use crate::sqlite::open_sqlite;

/// Kafka's default partitioner for keyed records.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let h = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (h % partitions.max(1) as u32) as i32
}

/// Jobs (appends, commits) one frame holds at most.
const JOBS_PER_COMMIT: usize = 1024;
/// A frame is closed once it holds this many bytes; the jobs left go into the next one.
const FRAME_BYTES: usize = 64 << 20;
/// Bytes of frames one scan examines at most (records of other partitions, or before a
/// position, are passed over).
const SCAN_BYTES: u64 = 8 << 20;
/// A consumer this far behind the tail reads on a blocking thread (the frames may not be in
/// the page cache any more).
const FAR_BEHIND: u64 = 1 << 20;

type Records = Vec<(String, String, Vec<u8>)>;
type Appended = Vec<Result<Position, LogError>>;

/// Work for the writer thread.
enum Job {
    Append { records: Records, ts_ms: i64, reply: oneshot::Sender<Appended> },
    /// Appends with a group's offset, if `current` still holds (the member's assignment).
    AppendCommitting {
        records: Records,
        ts_ms: i64,
        group: String,
        offset: (String, i32, i64),
        current: Box<dyn Fn() -> bool + Send>,
        reply: oneshot::Sender<Option<Appended>>,
    },
    Commit { group: String, offsets: Vec<(String, i32, i64)>, reply: Option<oneshot::Sender<Result<(), LogError>>> },
    /// A group's committed offset, answered once the frame being built is durable.
    Committed { group: String, topic: String, partition: i32, reply: oneshot::Sender<Result<i64, LogError>> },
    Topics { specs: Vec<(String, i32)>, reply: oneshot::Sender<Result<(), LogError>> },
    DeleteGroup { group: String, reply: oneshot::Sender<Result<(), LogError>> },
    /// A write as large as the one that failed, to find out whether writes go through again.
    Probe { pad: u32, reply: oneshot::Sender<Result<(), LogError>> },
    /// Write the checkpoint once the frame being built is durable.
    Checkpoint { reply: oneshot::Sender<Result<(), LogError>> },
}

/// An answer sent once the frame is durable (or failed with the write).
enum Reply {
    Append(oneshot::Sender<Appended>, Appended),
    AppendCommitting(oneshot::Sender<Option<Appended>>, Option<Appended>),
    Done(oneshot::Sender<Result<(), LogError>>, Result<(), LogError>),
    Committed(oneshot::Sender<Result<i64, LogError>>, i64),
    /// Nobody waits (a closed consumer's commit).
    Nothing,
    Checkpoint(oneshot::Sender<Result<(), LogError>>),
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Append(tx, v) => drop(tx.send(v)),
            Reply::AppendCommitting(tx, v) => drop(tx.send(v)),
            Reply::Done(tx, v) => drop(tx.send(v)),
            Reply::Committed(tx, v) => drop(tx.send(Ok(v))),
            Reply::Nothing => {}
            Reply::Checkpoint(tx) => drop(tx.send(Ok(()))),
        }
    }

    fn fail(self, e: &LogError) {
        match self {
            Reply::Append(tx, v) => drop(tx.send(v.iter().map(|_| Err(clone_err(e))).collect())),
            Reply::AppendCommitting(tx, v) => drop(tx.send(v.map(|v| v.iter().map(|_| Err(clone_err(e))).collect()))),
            Reply::Done(tx, _) => drop(tx.send(Err(clone_err(e)))),
            Reply::Committed(tx, _) => drop(tx.send(Err(clone_err(e)))),
            Reply::Nothing => {}
            Reply::Checkpoint(tx) => drop(tx.send(Err(clone_err(e)))),
        }
    }
}

/// Topic names and ids (changed only when a topic is created).
#[derive(Default)]
struct Catalog {
    names: Vec<String>,
    topics: HashMap<String, (u32, i32)>,
}

/// The ends of the partitions and the position after the last durable frame, as of one write
/// (published together, so that a partition at its end has no record before `end` past it).
#[derive(Clone, Default)]
struct Tail {
    ends: HashMap<(String, i32), i64>,
    end: u64,
}

/// What the writer publishes after each durable write, for readers.
struct Shared {
    catalog: Mutex<Arc<Catalog>>,
    tail: Mutex<Arc<Tail>>,
    /// The sparse index: (offset, frame) of every partition's marks, in offset order.
    marks: RwLock<HashMap<Tp, Vec<(i64, u64)>>>,
    /// Committed offsets by group.
    committed: Mutex<HashMap<String, HashMap<Tp, i64>>>,
    segments: Mutex<Arc<Vec<Segment>>>,
    /// Bumped after every durable write; consumers wait on it.
    appended: watch::Sender<u64>,
    /// Why the last write failed, while writes fail.
    failed: Mutex<Option<String>>,
    /// The size of the last write that failed.
    failed_bytes: AtomicU64,
}

#[derive(Default)]
struct GroupState {
    generation: u64,
    members: Vec<u64>,
}

struct Inner {
    path: PathBuf,
    /// To the writer thread, which holds the lock on `log.lock` until it ends: one writer per
    /// data directory (its offsets live in its memory, so a second writer would corrupt them).
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    groups: Mutex<HashMap<String, GroupState>>,
    next_member: Mutex<u64>,
}

/// The embedded event log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

fn fatal(e: impl std::fmt::Display) -> LogError {
    LogError::Fatal(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stopped() -> LogError {
    LogError::Unavailable("the event log's writer stopped".into())
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/log/`, converting a `dir/log.db` of an earlier release.
    /// `queue` bounds the requests waiting for the writer; beyond it `append` fails with
    /// [`LogError::QueueFull`].
    pub fn open(dir: &Path, queue: usize) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| fatal(format!("data directory {}: {e}", dir.display())))?;
        let lock_path = dir.join("log.lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| fatal(format!("{}: {e}", lock_path.display())))?;
        // The lock is the writer thread's, released when it has written its last frame and
        // checkpoint: a log closed in this process a moment ago may still hold it briefly.
        let waited = Instant::now();
        while lock_file.try_lock().is_err() {
            if waited.elapsed() >= Duration::from_secs(2) {
                return Err(fatal(format!("data directory {} is in use by another chat process (stop it first)", dir.display())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = dir.join("log");
        convert_legacy(dir, &path)?;
        if !path.exists() {
            std::fs::create_dir_all(&path).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
            files::sync_dir(dir).map_err(|e| fatal(format!("{}: {e}", dir.display())))?;
        }
        let began = Instant::now();
        let opened = files::open_segments(&path, true).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
        tracing::info!(bytes = opened.state.end, segments = opened.segs.len(), seconds = began.elapsed().as_secs_f64(), "event log read");
        let writer = match opened.segs.last() {
            Some(last) => files::Writer::resume(&path, last.clone(), opened.last_len),
            None => files::Writer::create(&path, 0).map_err(|e| fatal(format!("{}: {e}", path.display())))?,
        };
        let mut segs = opened.segs;
        if segs.is_empty() {
            segs.push(writer.segment());
        }
        let state = opened.state;
        let shared = Arc::new(Shared {
            catalog: Mutex::new(Arc::new(Catalog { names: state.names.clone(), topics: state.topics.clone() })),
            tail: Mutex::new(Arc::new(tail_of(&state))),
            marks: RwLock::new(opened.marks),
            committed: Mutex::new(state.groups.clone()),
            segments: Mutex::new(Arc::new(segs)),
            appended: watch::channel(0).0,
            failed: Mutex::new(None),
            failed_bytes: AtomicU64::new(0),
        });
        let (jobs, rx) = mpsc::channel(queue.max(1));
        let published = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                write_loop(rx, writer, state, published);
                drop(lock_file);
            })
            .map_err(|e| fatal(format!("starting the log's writer: {e}")))?;
        let inner = Arc::new(Inner {
            path,
            jobs,
            shared,
            groups: Mutex::new(HashMap::new()),
            next_member: Mutex::new(1),
        });
        Ok(EmbeddedLog { inner })
    }

    /// The log's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Converts a `log.db` of an earlier release into segment files, once: written into
/// `log.converting/` and synced; then `log.db` is renamed to `log.db.converted` (kept: remove it
/// once the new release is trusted); then `log.converting/` is renamed to `log/`. A crash before
/// the first rename converts again at the next open; after it, the next open does the second.
fn convert_legacy(dir: &Path, path: &Path) -> Result<(), LogError> {
    let (db, tmp, kept) = (dir.join("log.db"), dir.join("log.converting"), dir.join("log.db.converted"));
    let converted = !files::list_segments(path).map_err(fatal)?.is_empty();
    if db.exists() {
        if converted {
            return Err(fatal(format!(
                "{} and {} both exist: an earlier release wrote `log.db` after this data directory was converted to segment files, and its appends are not in `log/`; keep one of them (move the other away) and start again",
                db.display(),
                path.display()
            )));
        }
        tracing::info!("converting the event log to layout 4 (segment files; once)");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| fatal(format!("{}: {e}", tmp.display())))?;
        }
        legacy::convert(&db, &tmp).map_err(|e| fatal(format!("{}: converting to layout 4: {e}", db.display())))?;
        for leftover in ["log.db-wal", "log.db-shm"] {
            let _ = std::fs::remove_file(dir.join(leftover));
        }
        std::fs::rename(&db, &kept).map_err(|e| fatal(format!("{}: {e}", db.display())))?;
        files::sync_dir(dir).map_err(fatal)?;
    }
    if tmp.exists() && !converted {
        if path.exists() {
            std::fs::remove_dir(path).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
        files::sync_dir(dir).map_err(fatal)?;
    }
    Ok(())
}

fn tail_of(state: &State) -> Tail {
    let ends = state.ends.iter().map(|((t, p), e)| ((state.names[*t as usize].clone(), *p), *e)).collect();
    Tail { ends, end: state.end }
}

/// Counters of the writer, logged every 10 s at debug level.
#[derive(Default)]
struct Counters {
    writes: u64,
    jobs: u64,
    bytes: u64,
    longest: Duration,
    since: Option<Instant>,
}

/// The writer thread: takes every job waiting (up to [`JOBS_PER_COMMIT`]), builds one frame of
/// them, writes and syncs it, publishes what changed, then answers.
fn write_loop(mut rx: mpsc::Receiver<Job>, mut writer: files::Writer, mut state: State, shared: Arc<Shared>) {
    let (mut buf, mut undone) = (Vec::new(), Vec::new());
    let mut counters = Counters { since: Some(Instant::now()), ..Counters::default() };
    let mut pending: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    loop {
        if pending.is_empty() {
            let Some(first) = rx.blocking_recv() else { break };
            pending.push_back(first);
            while pending.len() < JOBS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(j) => pending.push_back(j),
                    Err(_) => break,
                }
            }
        }
        let began = Instant::now();
        files::begin_frame(&mut buf);
        undone.clear();
        let frame = state.end;
        let mut batch = Batch { state: &mut state, buf: &mut buf, undo: &mut undone, frame, marks: Vec::new(), topics_changed: false, groups_changed: false };
        // One frame per group commit, up to FRAME_BYTES: the jobs left go into the next one.
        let mut replies = Vec::new();
        while let Some(job) = pending.pop_front() {
            replies.push(batch.job(job));
            if batch.buf.len() >= FRAME_BYTES {
                break;
            }
        }
        let n = replies.len();
        let asked = replies.iter().any(|r| matches!(r, Reply::Checkpoint(_)));
        let (marks, topics_changed, groups_changed) = (batch.marks, batch.topics_changed, batch.groups_changed);
        let before = writer.end();
        let wrote = writer.write_frame(&mut buf, true);
        // The frame as written (compressed), or as it would have been.
        let written = buf.len() as u64;
        match wrote {
            Ok(new_segment) => {
                if writer.end() != before || new_segment.is_some() {
                    state.end = frame + written;
                    let rolled = new_segment.is_some();
                    publish(&shared, &state, marks, topics_changed, groups_changed, new_segment);
                    if rolled && !asked {
                        checkpoint(&writer, &state, &shared);
                    }
                    // Only a write that went through says writes go through again.
                    if lock(&shared.failed).take().is_some() {
                        tracing::info!("the event log's writes go through again");
                    }
                }
                if asked {
                    checkpoint(&writer, &state, &shared);
                }
                replies.into_iter().for_each(Reply::send);
            }
            Err(e) => {
                // Nothing of the frame is in the file (cut back) and nothing of it in the state.
                undo(&mut state, &mut undone);
                let mut failed = lock(&shared.failed);
                if failed.is_none() || writer.broken {
                    if writer.broken {
                        error!(error = %e, "writing the event log failed and the file could not be put back; its writer stops (appends fail until the process is restarted, which reads the files again)");
                    } else {
                        error!(error = %e, "writing the event log failed; appends fail until a write goes through (nothing of the failed write is kept)");
                    }
                }
                *failed = Some(e.to_string());
                drop(failed);
                shared.failed_bytes.store(written, Ordering::Relaxed);
                let e = LogError::Unavailable(format!("writing the event log failed: {e}"));
                replies.into_iter().for_each(|r| r.fail(&e));
                continue;
            }
        }
        let took = began.elapsed();
        counters.writes += 1;
        counters.jobs += n as u64;
        counters.bytes += written;
        counters.longest = counters.longest.max(took);
        if counters.since.is_some_and(|s| s.elapsed() >= Duration::from_secs(10)) {
            debug!(
                writes = counters.writes,
                jobs_per_write = counters.jobs as f64 / counters.writes.max(1) as f64,
                bytes_per_write = counters.bytes / counters.writes.max(1),
                longest_write_ms = counters.longest.as_secs_f64() * 1e3,
                "log writer"
            );
            counters = Counters { since: Some(Instant::now()), ..Counters::default() };
        }
    }
    // Closed: the next open reads from here.
    if lock(&shared.failed).is_none() && !writer.broken {
        checkpoint(&writer, &state, &shared);
    }
}

/// Writes the checkpoint of everything durable so far (after a segment is full, and when the
/// log closes): the next open reads only the frames after it. A failure only costs that open
/// a longer read.
fn checkpoint(writer: &files::Writer, state: &State, shared: &Shared) {
    let began = Instant::now();
    let marks = shared.marks.read().unwrap_or_else(|p| p.into_inner());
    match files::write_checkpoint(writer.dir(), state, &marks) {
        Ok(()) => debug!(at = state.end, seconds = began.elapsed().as_secs_f64(), "event log checkpoint written"),
        Err(e) => warn!(error = %e, "writing the event log's checkpoint failed (the next start reads more of the log)"),
    }
}

/// Makes what a durable frame changed visible to readers, then wakes the consumers.
fn publish(shared: &Shared, state: &State, marks: Vec<files::Mark>, topics_changed: bool, groups_changed: bool, new_segment: Option<Segment>) {
    if topics_changed {
        *lock(&shared.catalog) = Arc::new(Catalog { names: state.names.clone(), topics: state.topics.clone() });
    }
    if !marks.is_empty() {
        let mut index = shared.marks.write().unwrap_or_else(|p| p.into_inner());
        for (tp, offset, frame) in marks {
            index.entry(tp).or_default().push((offset, frame));
        }
    }
    if groups_changed {
        *lock(&shared.committed) = state.groups.clone();
    }
    if let Some(seg) = new_segment {
        let mut segs = lock(&shared.segments);
        let mut next = (**segs).clone();
        next.push(seg);
        *segs = Arc::new(next);
    }
    *lock(&shared.tail) = Arc::new(tail_of(state));
    shared.appended.send_modify(|v| *v += 1);
}

/// One frame being built from jobs.
struct Batch<'a> {
    state: &'a mut State,
    buf: &'a mut Vec<u8>,
    /// How to put the state back if the frame is not written.
    undo: &'a mut Vec<Undo>,
    frame: u64,
    marks: Vec<files::Mark>,
    topics_changed: bool,
    groups_changed: bool,
}

/// One change of the writer's state by an entry, to be undone if its frame is not written.
enum Undo {
    Topic(String),
    End(Tp, Option<u64>),
    Commit(String, Tp, Option<i64>),
    Group(String, Option<HashMap<Tp, i64>>),
}

/// Puts the state back as it was before the changes in `undo` (undone last first).
fn undo(state: &mut State, undo: &mut Vec<Undo>) {
    while let Some(u) = undo.pop() {
        match u {
            Undo::Topic(name) => {
                state.names.pop();
                if let Some((id, n)) = state.topics.remove(&name) {
                    for p in 0..n {
                        state.ends.remove(&(id, p));
                        state.last_mark.remove(&(id, p));
                    }
                }
            }
            Undo::End(tp, mark) => {
                if let Some(end) = state.ends.get_mut(&tp) {
                    *end -= 1;
                }
                match mark {
                    Some(m) => state.last_mark.insert(tp, m),
                    None => state.last_mark.remove(&tp),
                };
            }
            Undo::Commit(group, tp, before) => {
                let g = state.groups.entry(group).or_default();
                match before {
                    Some(v) => g.insert(tp, v),
                    None => g.remove(&tp),
                };
            }
            Undo::Group(group, before) => {
                if let Some(g) = before {
                    state.groups.insert(group, g);
                }
            }
        }
    }
}

impl Batch<'_> {
    fn put(&mut self, e: &Entry<'_>) -> Result<(), String> {
        let undo = match *e {
            Entry::Topic { name, .. } => Some(Undo::Topic(name.to_owned())),
            Entry::Record { topic, partition, .. } => Some(Undo::End((topic, partition), self.state.last_mark.get(&(topic, partition)).copied())),
            Entry::Commit { group, topic, partition, .. } => {
                Some(Undo::Commit(group.to_owned(), (topic, partition), self.state.groups.get(group).and_then(|g| g.get(&(topic, partition))).copied()))
            }
            Entry::DeleteGroup { group } => Some(Undo::Group(group.to_owned(), self.state.groups.get(group).cloned())),
            Entry::Probe { .. } | Entry::Position { .. } | Entry::End { .. } | Entry::Mark { .. } => None,
        };
        if let Some(m) = self.state.apply(e, self.frame)? {
            self.marks.push(m);
        }
        self.undo.extend(undo);
        files::put_entry(self.buf, e);
        Ok(())
    }

    fn append(&mut self, records: Records, ts_ms: i64) -> Appended {
        let mut out = Vec::with_capacity(records.len());
        for (topic, key, payload) in records {
            let Some((id, n)) = self.state.topics.get(&topic).copied() else {
                out.push(Err(LogError::Fatal(format!("unknown topic {topic}"))));
                continue;
            };
            let partition = partition_for(key.as_bytes(), n);
            let offset = self.state.ends.get(&(id, partition)).copied().unwrap_or(0);
            let e = Entry::Record { topic: id, partition, offset, ts_ms, key: Some(key.as_bytes()), payload: &payload };
            out.push(self.put(&e).map(|()| Position { topic, partition, offset }).map_err(LogError::Fatal));
        }
        out
    }

    /// Commits a group's offsets: all of them, or none if a topic is unknown.
    fn commit(&mut self, group: &str, offsets: &[(String, i32, i64)]) -> Result<(), LogError> {
        if let Some((topic, _, _)) = offsets.iter().find(|(topic, _, _)| !self.state.topics.contains_key(topic)) {
            return Err(LogError::Fatal(format!("unknown topic {topic}")));
        }
        for (topic, partition, next) in offsets {
            let id = self.state.topics.get(topic).map(|(id, _)| *id).unwrap_or_default();
            self.put(&Entry::Commit { group, topic: id, partition: *partition, next: *next }).map_err(LogError::Fatal)?;
            self.groups_changed = true;
        }
        Ok(())
    }

    fn job(&mut self, job: Job) -> Reply {
        match job {
            Job::Append { records, ts_ms, reply } => Reply::Append(reply, self.append(records, ts_ms)),
            Job::AppendCommitting { records, ts_ms, group, offset, current, reply } => {
                // Checked on the writer, where a new assignment also reads the committed offsets
                // (`Job::Committed`): a member that joined since bumped the generation before
                // that read, so either this commit is seen by it or this member is refused here.
                if !current() {
                    return Reply::AppendCommitting(reply, None);
                }
                // All or nothing: a record that cannot be appended (its topic is unknown, the
                // only failure of one record) fails them all, before any is appended. Appends
                // committed without the offset would be appended again by the retry, and marked
                // exactly once they would reach their readers twice.
                let unknown = records.iter().map(|(topic, _, _)| topic).chain([&offset.0]).find(|topic| !self.state.topics.contains_key(*topic));
                if let Some(topic) = unknown {
                    let e = LogError::Fatal(format!("unknown topic {topic}"));
                    return Reply::AppendCommitting(reply, Some(records.iter().map(|_| Err(clone_err(&e))).collect()));
                }
                let out = self.append(records, ts_ms);
                if out.iter().all(Result::is_ok) {
                    if let Err(e) = self.commit(&group, &[offset]) {
                        return Reply::AppendCommitting(reply, Some(out.iter().map(|_| Err(clone_err(&e))).collect()));
                    }
                }
                Reply::AppendCommitting(reply, Some(out))
            }
            Job::Commit { group, offsets, reply } => {
                let r = self.commit(&group, &offsets);
                match reply {
                    Some(tx) => Reply::Done(tx, r),
                    None => {
                        if let Err(e) = r {
                            warn!(error = %e, "committing offsets of a closed consumer failed");
                        }
                        Reply::Nothing
                    }
                }
            }
            Job::Committed { group, topic, partition, reply } => {
                let v = self.state.topics.get(&topic).map(|(id, _)| self.state.committed(&group, (*id, partition))).unwrap_or(0);
                Reply::Committed(reply, v)
            }
            Job::Topics { specs, reply } => {
                let mut r = Ok(());
                for (name, partitions) in specs {
                    if self.state.topics.contains_key(&name) {
                        continue;
                    }
                    if partitions < 1 {
                        r = Err(LogError::Fatal(format!("topic {name}: {partitions} partitions")));
                        break;
                    }
                    let id = self.state.names.len() as u32;
                    if let Err(e) = self.put(&Entry::Topic { id, partitions, name: &name }) {
                        r = Err(LogError::Fatal(e));
                        break;
                    }
                    self.topics_changed = true;
                }
                Reply::Done(reply, r)
            }
            Job::DeleteGroup { group, reply } => {
                let r = self.put(&Entry::DeleteGroup { group: &group }).map_err(LogError::Fatal);
                self.groups_changed = true;
                Reply::Done(reply, r)
            }
            Job::Checkpoint { reply } => Reply::Checkpoint(reply),
            Job::Probe { pad, reply } => {
                let r = self.put(&Entry::Probe { at_ms: chrono::Utc::now().timestamp_millis(), pad }).map_err(LogError::Fatal);
                Reply::Done(reply, r)
            }
        }
    }
}

impl Inner {
    fn failed(&self) -> Option<LogError> {
        lock(&self.shared.failed).as_ref().map(|why| LogError::Unavailable(format!("the event log's writer stopped: {why}")))
    }

    /// Sends a job that waits for room in the queue.
    async fn send(&self, job: Job) -> Result<(), LogError> {
        self.jobs.send(job).await.map_err(|_| stopped())
    }

    /// A group's committed offset of a partition, as last made durable (for lags).
    fn committed(&self, group: &str, topic: &str, partition: i32) -> i64 {
        let Some((id, _)) = lock(&self.shared.catalog).topics.get(topic).copied() else { return 0 };
        lock(&self.shared.committed).get(group).and_then(|g| g.get(&(id, partition))).copied().unwrap_or(0)
    }

    /// The same, for a new assignment: read on the writer (answered once the frame it is
    /// building is durable), so that an offset a departing member committed with its appends
    /// ([`EmbeddedCommitter`]) in a frame still being written is seen, or this read fails with it.
    async fn committed_for_assignment(&self, group: &str, topic: &str, partition: i32) -> Result<i64, LogError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Committed { group: group.to_owned(), topic: topic.to_owned(), partition, reply: tx }).await?;
        rx.await.map_err(|_| stopped())?
    }

    fn segments(&self) -> Arc<Vec<Segment>> {
        lock(&self.shared.segments).clone()
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<Position, LogError> {
        let mut out = self.append_batch(vec![(topic.to_owned(), key.to_owned(), payload)]).await;
        out.pop().unwrap_or_else(|| Err(LogError::Fatal("empty append result".into())))
    }

    async fn append_batch(&self, records: Vec<(String, String, Vec<u8>)>) -> Vec<Result<Position, LogError>> {
        let n = records.len();
        let fail = |e: LogError| (0..n).map(|_| Err(clone_err(&e))).collect();
        let (tx, rx) = oneshot::channel();
        let ts_ms = chrono::Utc::now().timestamp_millis();
        // Appends shed load when the writer is behind (the gateway answers `overloaded`).
        match self.inner.jobs.try_send(Job::Append { records, ts_ms, reply: tx }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return fail(LogError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => return fail(stopped()),
        }
        rx.await.unwrap_or_else(|_| fail(stopped()))
    }

    async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), LogError> {
        let specs: Vec<(String, i32)> = specs.iter().map(|s| (s.name.clone(), s.partitions)).collect();
        let (tx, rx) = oneshot::channel();
        self.inner.send(Job::Topics { specs, reply: tx }).await?;
        rx.await.map_err(|_| stopped())?
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn LogConsumer>, LogError> {
        let member = {
            let mut n = lock(&self.inner.next_member);
            *n += 1;
            *n
        };
        {
            let mut groups = lock(&self.inner.groups);
            let g = groups.entry(group.to_owned()).or_default();
            g.members.push(member);
            g.generation += 1;
        }
        Ok(Box::new(EmbeddedConsumer {
            log: self.inner.clone(),
            group: group.to_owned(),
            member,
            topics: topics.to_vec(),
            generation: 0,
            shared_generation: Arc::new(AtomicU64::new(0)),
            positions: BTreeMap::new(),
            stored: BTreeMap::new(),
            committed: BTreeMap::new(),
            last_commit: Instant::now(),
            appended: self.inner.shared.appended.subscribe(),
            scanned: 0,
            cursor: Some(Cursor::new(self.inner.segments())),
        }))
    }

    async fn partition_lags(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError> {
        let ends = lock(&self.inner.shared.tail).ends.clone();
        let mut lags = Vec::new();
        for ((topic, partition), end) in ends {
            if topics.contains(&topic) {
                let committed = self.inner.committed(group, &topic, partition);
                lags.push(PartitionLag { topic, partition, end, committed });
            }
        }
        Ok(lags)
    }

    async fn read_all(&self, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        let catalog = lock(&self.inner.shared.catalog).clone();
        let tail = lock(&self.inner.shared.tail).clone();
        Ok(Box::new(SnapshotReader::new(self.inner.segments(), &catalog.names, &catalog.topics, &tail, topics)))
    }

    /// Appends are going through: the last write succeeded, or (after a failure) a write as
    /// large as the one that failed goes through now. Without the probe an idle log would stay failed after the disk has room
    /// again (nothing would be written), and a node that is not ready gets no traffic.
    async fn ping(&self) -> bool {
        if self.inner.failed().is_none() {
            return !self.inner.jobs.is_closed();
        }
        let (tx, rx) = oneshot::channel();
        let pad = self.inner.shared.failed_bytes.load(Ordering::Relaxed).clamp(4 << 10, 1 << 20) as u32;
        if self.inner.send(Job::Probe { pad, reply: tx }).await.is_err() {
            return false;
        }
        matches!(rx.await, Ok(Ok(()))) && self.inner.failed().is_none()
    }

    async fn close(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        self.inner.send(Job::Checkpoint { reply: tx }).await?;
        rx.await.map_err(|_| stopped())?
    }

    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        if lock(&self.inner.groups).get(group).is_some_and(|g| !g.members.is_empty()) {
            return Err(LogError::Fatal(format!("group {group} has live members")));
        }
        let (tx, rx) = oneshot::channel();
        self.inner.send(Job::DeleteGroup { group: group.to_owned(), reply: tx }).await?;
        rx.await.map_err(|_| stopped())?
    }
}

fn clone_err(e: &LogError) -> LogError {
    match e {
        LogError::Unavailable(s) => LogError::Unavailable(s.clone()),
        LogError::QueueFull => LogError::QueueFull,
        LogError::Fatal(s) => LogError::Fatal(s.clone()),
    }
}

/// A member's appends with its offset committed in the same frame.
struct EmbeddedCommitter {
    log: Arc<Inner>,
    group: String,
    /// The group generation the member's partitions were assigned at.
    generation: Arc<AtomicU64>,
}

#[async_trait]
impl Committer for EmbeddedCommitter {
    async fn append_committing(
        &self,
        records: Vec<(String, String, Vec<u8>)>,
        topic: &str,
        partition: i32,
        next: i64,
    ) -> Option<Vec<Result<Position, LogError>>> {
        let n = records.len();
        let fail = |e: LogError| Some((0..n).map(|_| Err(clone_err(&e))).collect());
        let (inner, group, mine) = (self.log.clone(), self.group.clone(), self.generation.load(Ordering::SeqCst));
        let current = Box::new(move || lock(&inner.groups).get(&group).map(|g| g.generation) == Some(mine));
        let (tx, rx) = oneshot::channel();
        let job = Job::AppendCommitting {
            records,
            ts_ms: chrono::Utc::now().timestamp_millis(),
            group: self.group.clone(),
            offset: (topic.to_owned(), partition, next),
            current,
            reply: tx,
        };
        match self.log.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return fail(LogError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => return fail(stopped()),
        }
        rx.await.unwrap_or_else(|_| fail(stopped()))
    }

    async fn read(&self, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> Result<Vec<Record>, LogError> {
        let catalog = lock(&self.log.shared.catalog).clone();
        let Some((id, _)) = catalog.topics.get(topic).copied() else { return Ok(Vec::new()) };
        let tail = lock(&self.log.shared.tail).clone();
        let mut after = files::mark_before(&self.log.shared.marks.read().unwrap_or_else(|p| p.into_inner()), (id, partition), from);
        let mut cursor = Cursor::new(self.log.segments());
        let mut parts = [((id, partition), from)];
        let mut out = Vec::new();
        while out.len() < max && parts[0].1 < end {
            let scan = files::scan(&mut cursor, &catalog.names, after, tail.end, &mut parts, max - out.len(), SCAN_BYTES).map_err(fatal)?;
            after = scan.next;
            for r in scan.records {
                if r.offset >= end {
                    return Ok(out);
                }
                out.push(r);
            }
            if scan.at_end {
                break;
            }
        }
        Ok(out)
    }
}

struct EmbeddedConsumer {
    log: Arc<Inner>,
    group: String,
    member: u64,
    topics: Vec<String>,
    generation: u64,
    /// The same, for this member's [`EmbeddedCommitter`].
    shared_generation: Arc<AtomicU64>,
    /// Next offset to read, per assigned partition.
    positions: BTreeMap<(String, i32), i64>,
    /// Next offset to commit (stored by the worker after its writes).
    stored: BTreeMap<(String, i32), i64>,
    committed: BTreeMap<(String, i32), i64>,
    last_commit: Instant,
    appended: watch::Receiver<u64>,
    /// Every record of an assigned partition at or past its position is in a frame at or after
    /// this position: the next scan starts here.
    scanned: u64,
    /// The member's reading buffer (moved to a blocking thread and back when far behind).
    cursor: Option<Cursor>,
}

impl EmbeddedConsumer {
    /// Recomputes this member's partitions after the group changed.
    async fn rebalance(&mut self) -> Result<(), LogError> {
        let (generation, members) = {
            let groups = lock(&self.log.groups);
            let g = groups.get(&self.group).ok_or_else(|| LogError::Fatal("group vanished".into()))?;
            (g.generation, g.members.clone())
        };
        if generation == self.generation {
            return Ok(());
        }
        // Give up what we had: commit what was stored for it first, like Kafka's
        // commit-on-revoke.
        self.commit_stored().await?;
        let catalog = lock(&self.log.shared.catalog).clone();
        let mut all: Vec<(String, i32)> = Vec::new();
        for t in &self.topics {
            for p in 0..catalog.topics.get(t).map(|(_, n)| *n).unwrap_or(0) {
                all.push((t.clone(), p));
            }
        }
        all.sort();
        let mut sorted = members.clone();
        sorted.sort_unstable();
        let me = sorted.iter().position(|m| *m == self.member).unwrap_or(0);
        let mine: Vec<(String, i32)> = all.into_iter().enumerate().filter(|(i, _)| i % sorted.len().max(1) == me).map(|(_, tp)| tp).collect();
        // The tail before the committed offsets: a partition whose committed offset is at or
        // past this tail's end has no record to read before this tail's position.
        let tail = lock(&self.log.shared.tail).clone();
        let mut positions = BTreeMap::new();
        let mut from = tail.end;
        for (t, p) in mine {
            let at = self.log.committed_for_assignment(&self.group, &t, p).await?;
            if at < tail.ends.get(&(t.clone(), p)).copied().unwrap_or(0) {
                // A partition behind its end is read from the mark at or before its position.
                let id = catalog.topics.get(&t).map(|(id, _)| *id).unwrap_or(0);
                from = from.min(files::mark_before(&self.log.shared.marks.read().unwrap_or_else(|p| p.into_inner()), (id, p), at));
            }
            positions.insert((t, p), at);
        }
        self.scanned = from;
        self.positions = positions;
        self.stored.clear();
        self.committed.clear();
        self.generation = generation;
        self.shared_generation.store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// Stored offsets not committed yet.
    fn uncommitted(&self) -> Vec<(String, i32, i64)> {
        self.stored.iter().filter(|(k, v)| self.committed.get(*k) != Some(*v)).map(|((t, p), o)| (t.clone(), *p, *o)).collect()
    }

    async fn commit_stored(&mut self) -> Result<(), LogError> {
        let offsets = self.uncommitted();
        self.last_commit = Instant::now();
        if offsets.is_empty() {
            return Ok(());
        }
        // Commits wait for room in the queue rather than fail: they are small and rare.
        let (tx, rx) = oneshot::channel();
        self.log.send(Job::Commit { group: self.group.clone(), offsets: offsets.clone(), reply: Some(tx) }).await?;
        rx.await.map_err(|_| stopped())??;
        for (t, p, o) in offsets {
            self.committed.insert((t, p), o);
        }
        Ok(())
    }

    /// The tail, if an assigned partition has records past its position; when none has, the
    /// scan can start at the tail's end.
    fn readable(&mut self) -> Option<Arc<Tail>> {
        let tail = lock(&self.log.shared.tail).clone();
        let readable = self.positions.iter().any(|(k, pos)| tail.ends.get(k).copied().unwrap_or(0) > *pos);
        if !readable {
            self.scanned = self.scanned.max(tail.end);
            return None;
        }
        Some(tail)
    }

    /// One scan from where the last one stopped, up to the tail's end.
    async fn scan(&mut self, tail: &Tail, max: usize) -> Result<files::Scan, LogError> {
        let catalog = lock(&self.log.shared.catalog).clone();
        let mut parts: Vec<(Tp, i64)> = self
            .positions
            .iter()
            .filter_map(|((t, p), o)| catalog.topics.get(t).map(|(id, _)| ((*id, *p), *o)))
            .collect();
        let mut cursor = self.cursor.take().unwrap_or_else(|| Cursor::new(self.log.segments()));
        cursor.set_segments(self.log.segments());
        let (after, until) = (self.scanned, tail.end);
        let (cursor, scan) = if until - after.min(until) > FAR_BEHIND {
            tokio::task::spawn_blocking(move || {
                let scan = files::scan(&mut cursor, &catalog.names, after, until, &mut parts, max, SCAN_BYTES);
                (cursor, scan)
            })
            .await
            .map_err(fatal)?
        } else {
            let scan = files::scan(&mut cursor, &catalog.names, after, until, &mut parts, max, SCAN_BYTES);
            (cursor, scan)
        };
        self.cursor = Some(cursor);
        let scan = scan.map_err(|e| {
            error!(error = %e, "reading the event log failed");
            fatal(e)
        })?;
        self.scanned = scan.next;
        for r in &scan.records {
            if let Some(pos) = self.positions.get_mut(&(r.topic.clone(), r.partition)) {
                *pos = (*pos).max(r.offset + 1);
            }
        }
        Ok(scan)
    }
}

#[async_trait]
impl LogConsumer for EmbeddedConsumer {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.rebalance().await?;
            if self.last_commit.elapsed() >= Duration::from_millis(500) {
                if let Err(e) = self.commit_stored().await {
                    warn!(error = %e, "offset auto-commit failed");
                }
            }
            self.appended.borrow_and_update();
            if let Some(tail) = self.readable() {
                let scan = self.scan(&tail, max.max(1)).await?;
                if !scan.records.is_empty() {
                    return Ok(scan.records);
                }
                if !scan.at_end {
                    // Frames of other partitions passed over; go on scanning, within the wait.
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Vec::new());
                    }
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            // Wake on the next append (or a group change, checked on the next turn).
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), self.appended.changed()).await;
        }
    }

    fn store(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), LogError> {
        let key = (topic.to_owned(), partition);
        if !self.positions.contains_key(&key) {
            return Err(LogError::Unavailable(format!("{topic}/{partition} is not assigned to this member")));
        }
        self.stored.insert(key, offset + 1);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), LogError> {
        self.commit_stored().await
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        Some(Arc::new(EmbeddedCommitter { log: self.log.clone(), group: self.group.clone(), generation: self.shared_generation.clone() }))
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        // Like Kafka's consumer close: commit what was stored (best effort, not awaited).
        let offsets = self.uncommitted();
        if !offsets.is_empty() {
            let job = Job::Commit { group: self.group.clone(), offsets, reply: None };
            let jobs = self.log.jobs.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if jobs.send(job).await.is_err() {
                        warn!("committing offsets of a closed consumer failed: the log's writer stopped");
                    }
                });
            }
        }
        let mut groups = lock(&self.log.groups);
        if let Some(g) = groups.get_mut(&self.group) {
            g.members.retain(|m| *m != self.member);
            g.generation += 1;
        }
    }
}

/// Reads topics in one pass in append order, up to the log's end when it was made.
struct SnapshotReader {
    cursor: Option<Cursor>,
    names: Arc<Vec<String>>,
    /// Every partition of the topics, and the next offset to read.
    parts: Vec<(Tp, i64)>,
    after: u64,
    until: u64,
    total: i64,
    read: i64,
}

impl SnapshotReader {
    fn new(segs: Arc<Vec<Segment>>, names: &[String], ids: &HashMap<String, (u32, i32)>, tail: &Tail, topics: &[String]) -> Self {
        let mut parts = Vec::new();
        for t in topics {
            if let Some((id, n)) = ids.get(t) {
                for p in 0..*n {
                    parts.push(((*id, p), 0));
                }
            }
        }
        let total = tail.ends.iter().filter(|((t, _), _)| topics.contains(t)).map(|(_, e)| *e).sum();
        let after = segs.first().map_or(0, |s| s.start);
        SnapshotReader { cursor: Some(Cursor::new(segs)), names: Arc::new(names.to_vec()), parts, after, until: tail.end, total, read: 0 }
    }
}

#[async_trait]
impl LogReader for SnapshotReader {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        if self.after >= self.until {
            return Ok(Vec::new());
        }
        let (mut cursor, names, mut parts, mut after, until, max) =
            (self.cursor.take().ok_or_else(|| fatal("reader failed before"))?, self.names.clone(), std::mem::take(&mut self.parts), self.after, self.until, max.max(1));
        let (cursor, parts, page, after) = tokio::task::spawn_blocking(move || {
            let mut page = Vec::new();
            let mut result = Ok(());
            while page.len() < max && after < until {
                match files::scan(&mut cursor, &names, after, until, &mut parts, max - page.len(), SCAN_BYTES) {
                    Ok(scan) => {
                        after = if scan.at_end { until } else { scan.next };
                        page.extend(scan.records);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            (cursor, parts, result.map(|()| page), after)
        })
        .await
        .map_err(fatal)?;
        self.cursor = Some(cursor);
        self.parts = parts;
        self.after = after;
        let page = page.map_err(fatal)?;
        self.read += page.len() as i64;
        Ok(page)
    }

    fn progress(&self) -> (i64, i64) {
        (self.read, self.total)
    }
}

/// Read-only views of a data directory, usable while another process owns it (tests, tools):
/// the frames are read up to the last whole one.
pub mod inspect {
    use super::*;

    fn open(dir: &Path) -> Result<files::Opened, LogError> {
        let path = dir.join("log");
        if files::list_segments(&path).map_err(fatal)?.is_empty() && dir.join("log.converting").exists() {
            return Err(LogError::Fatal(format!("{}: the event log is being converted by `chat run`; run the command again", dir.display())));
        }
        if files::list_segments(&path).map_err(fatal)?.is_empty() && dir.join("log.db").exists() {
            return Err(LogError::Fatal(format!(
                "{}: the event log is in an earlier layout; start `chat run` on this data directory once to convert it",
                dir.join("log.db").display()
            )));
        }
        files::open_segments(&path, false).map_err(|e| fatal(format!("{}: {e}", path.display())))
    }

    /// Records still to be consumed by a group on some topics (end − committed, summed).
    pub fn group_lag(dir: &Path, group: &str, topics: &[String]) -> Result<i64, LogError> {
        let o = open(dir)?;
        let mut lag = 0;
        for (name, (id, n)) in &o.state.topics {
            if topics.contains(name) {
                for p in 0..*n {
                    let end = o.state.ends.get(&(*id, p)).copied().unwrap_or(0);
                    lag += (end - o.state.committed(group, (*id, p))).max(0);
                }
            }
        }
        Ok(lag)
    }

    /// A one-pass reader over a snapshot of topics, in append order.
    pub fn reader(dir: &Path, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        let o = open(dir)?;
        let tail = tail_of(&o.state);
        Ok(Box::new(SnapshotReader::new(Arc::new(o.segs), &o.state.names, &o.state.topics, &tail, topics)))
    }

    /// Every record payload of a topic, in (partition, offset) order.
    pub fn records(dir: &Path, topic: &str) -> Result<Vec<Vec<u8>>, LogError> {
        let o = open(dir)?;
        let Some((id, n)) = o.state.topics.get(topic).copied() else { return Ok(Vec::new()) };
        let mut parts: Vec<(Tp, i64)> = (0..n).map(|p| ((id, p), 0)).collect();
        let start = o.segs.first().map_or(0, |s| s.start);
        let mut cursor = Cursor::new(Arc::new(o.segs));
        let mut out = Vec::new();
        let mut after = start;
        loop {
            let scan = files::scan(&mut cursor, &o.state.names, after, o.state.end, &mut parts, usize::MAX, u64::MAX).map_err(fatal)?;
            out.extend(scan.records);
            if scan.at_end {
                break;
            }
            after = scan.next;
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        Ok(out.into_iter().map(|r| r.payload).collect())
    }
}

#[cfg(test)]
mod tests;

//! The embedded back-end of every table trait: SQLite (bundled), the same tables and the same
//! idempotence rules as the Cassandra back-end, in two files of the data directory:
//! `commands.db` (the gateway's gates) and `tables.db` (projections and the fan-out's state).
//!
//! - Each file has one writer thread that runs every write; writes that arrive while a commit is
//!   running are committed together. A write is answered only after its transaction committed:
//!   on disk for `commands.db` (`synchronous=FULL`), in the WAL for `tables.db`
//!   (`synchronous=NORMAL`; [`Durable::sync`] makes everything before it durable, and workers
//!   call it before they store offsets).
//! - Reads run on a small pool of read-only connections per file (WAL lets them run beside the
//!   writer).
//! - Cassandra's write-time rules become conditional upserts: receipts keep the earliest time,
//!   a removed pending delivery stays removed, last seen keeps the latest change, group rows
//!   keep the highest position, a closed membership interval stays closed, a profile keeps its
//!   latest update. Analytics sets are `INSERT OR IGNORE`; days are `YYYY-MM-DD` text, which
//!   sorts like the dates.
//! - Lightweight transactions (unique usernames, send reservations) are plain inserts: the single
//!   writer makes them atomic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use async_trait::async_trait;
use chat_events::{ConversationId, EventId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, NaiveDate, Utc};
use chat_events::embedded::open_sqlite;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error};
use uuid::Uuid;

use crate::insights::{check_message_stat, profile_views_from, sort_message_counts, sort_receipts_of_user, sort_topic_counts};
use crate::*;

/// `execute` and `query_row` through the connection's statement cache.
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize>;
    fn row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(&self, sql: &str, p: P, f: F) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(p)
    }

    fn row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(&self, sql: &str, p: P, f: F) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(p, f)
    }
}

type Job = Box<dyn FnOnce(&Transaction<'_>) -> Outcome + Send>;

/// What a job leaves for after its transaction.
enum Outcome {
    /// Called with whether the transaction committed.
    Answer(Box<dyn FnOnce(bool) + Send>),
    /// Nothing: its caller already has its answer.
    Answered,
    /// A pipelined write failed: the whole transaction must roll back.
    Poison,
}

/// One database file: its writer thread and its pool of read connections.
struct Db {
    path: PathBuf,
    writer: std_mpsc::SyncSender<(Lane, Job)>,
    progress: Arc<Progress>,
    /// Pipelined writes queued and not yet run (see [`Db::put`]).
    queued: Arc<tokio::sync::Semaphore>,
    readers: Mutex<Vec<Connection>>,
    /// Reads running at once (and read connections kept open), at most [`READERS`]: a burst of
    /// reads waits for a pooled connection instead of opening (and parsing the schema of) one
    /// connection per read.
    read_slots: Arc<tokio::sync::Semaphore>,
}

/// Where the writer thread is: transactions are numbered from 1 in the order they begin.
struct Progress {
    /// The number of the last transaction begun.
    begun: AtomicU64,
    /// The number of the last transaction that finished (committed or failed).
    settled: watch::Sender<u64>,
    /// The number of the last transaction whose commit failed (0: none).
    last_failed: AtomicU64,
}

/// When the caller of a write gets its answer.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// After the transaction holding it committed.
    Committed,
    /// Right after it ran, inside a transaction not yet committed ([`SqliteStore::pipelined`]).
    Ran,
}

/// Every table on SQLite, in two files with a writer each:
///
/// - `commands.db` (the gateway's gates: accounts, send reservations, owner rows, media):
///   `synchronous=FULL`, every commit on disk before it is answered, because an acknowledged
///   send depends on its reservation surviving a power cut. Small transactions, never behind a
///   projection write.
/// - `tables.db` (projections and the fan-out's state): `synchronous=NORMAL`. A commit survives
///   a killed process but a power cut may take the last ones back (the database stays
///   consistent). That is safe because these rows are derived from the log and a worker stores
///   an offset only after [`Durable::sync`] made the writes before it durable: after a power cut
///   the worker replays from its last committed offset and writes the same rows again.
///
/// A projection worker writes through a [`SqliteStore::pipelined`] handle: its writes and reads
/// run in the writer's transaction, in the order they were issued, and are answered before the
/// commit; [`Durable::settle`] waits for the commit once per slice of records.
#[derive(Clone)]
pub struct SqliteStore {
    commands: Arc<Db>,
    tables: Arc<Db>,
    pipelined: bool,
}

/// The command side's tables (`commands.db`): the gates the gateway checks before it appends.
/// `WITHOUT ROWID`: each row lives in its primary key's B-tree only, so a reservation or an
/// owner row is one B-tree insertion instead of two (table and key index).
const COMMAND_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts_by_name (username TEXT PRIMARY KEY, user_id TEXT NOT NULL, password_hash TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts_by_id (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS send_dedup (sender TEXT NOT NULL, client_msg_id TEXT NOT NULL, message_id TEXT NOT NULL, conversation_id TEXT NOT NULL, sent_at INTEGER NOT NULL, body_sha256 TEXT NOT NULL, committed INTEGER NOT NULL, PRIMARY KEY (sender, client_msg_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_owners (message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, sender TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_objects (media_id TEXT PRIMARY KEY, uploader TEXT NOT NULL, kind TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, public INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_shares (media_id TEXT NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (media_id, conversation_id)) WITHOUT ROWID;
";

/// The projections and the fan-out's state (`tables.db`): everything the workers write. Every
/// table is `WITHOUT ROWID` (one B-tree per table; directories created before keep their layout,
/// which reads and writes the same rows).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, registered_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (conversation_id TEXT NOT NULL, bucket INTEGER NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL, client_msg_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, sent_at INTEGER NOT NULL, position INTEGER NOT NULL, media TEXT, PRIMARY KEY (conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversation_buckets (conversation_id TEXT NOT NULL, bucket INTEGER NOT NULL, PRIMARY KEY (conversation_id, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_index (message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, sender TEXT NOT NULL, sent_at INTEGER NOT NULL, position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, peer_id TEXT, last_message_id TEXT NOT NULL, last_sender TEXT NOT NULL, last_kind TEXT NOT NULL, last_body TEXT NOT NULL, last_at INTEGER NOT NULL, unread INTEGER NOT NULL, applied_offset INTEGER NOT NULL, PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_markers (conversation_id TEXT NOT NULL, reader TEXT NOT NULL, up_to TEXT NOT NULL, applied_offset INTEGER NOT NULL, PRIMARY KEY (conversation_id, reader)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_stream (user_id TEXT NOT NULL, seq INTEGER NOT NULL, item_id TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (user_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_stream_ids (user_id TEXT NOT NULL, item_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (user_id, item_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_deliveries (user_id TEXT NOT NULL, message_id TEXT NOT NULL, conversation_id TEXT, removed INTEGER NOT NULL, PRIMARY KEY (user_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (message_id TEXT NOT NULL, recipient TEXT NOT NULL, status TEXT NOT NULL, device_id TEXT NOT NULL, at INTEGER NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (message_id, recipient, status, device_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_seen (user_id TEXT PRIMARY KEY, status TEXT NOT NULL, changed_at INTEGER NOT NULL, last_seen INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_groups (conversation_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL, membership_version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_members (conversation_id TEXT NOT NULL, member TEXT NOT NULL, since INTEGER NOT NULL, until INTEGER, role TEXT NOT NULL, PRIMARY KEY (conversation_id, member, since)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_messages (conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL, position INTEGER NOT NULL, recipients INTEGER NOT NULL, PRIMARY KEY (conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_acks (message_id TEXT NOT NULL, status TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (message_id, status, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_read_markers (conversation_id TEXT NOT NULL, reader TEXT NOT NULL, up_to TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (conversation_id, reader)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (conversation_id TEXT PRIMARY KEY, name TEXT NOT NULL, name_position INTEGER NOT NULL, creator TEXT, created_at INTEGER, position INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (conversation_id TEXT NOT NULL, member TEXT NOT NULL, role TEXT NOT NULL, active INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (conversation_id, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_groups (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, role TEXT NOT NULL, active INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_group_intervals (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, since INTEGER NOT NULL, until INTEGER, PRIMARY KEY (user_id, conversation_id, since)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_roles (user_id TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (user_id, role)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (user_id TEXT PRIMARY KEY, display_name TEXT NOT NULL, avatar_media_id TEXT, updated_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_messages (day TEXT NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (day, kind, scope, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_active_users (day TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (day, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_profile_views (viewed TEXT NOT NULL, day TEXT NOT NULL, viewer TEXT NOT NULL, view_id TEXT NOT NULL, PRIMARY KEY (viewed, day, viewer, view_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_topics (day TEXT NOT NULL, topic TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (day, topic, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts_by_user (recipient TEXT NOT NULL, message_id TEXT NOT NULL, status TEXT NOT NULL, device_id TEXT NOT NULL, at INTEGER NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (recipient, message_id, status, device_id)) WITHOUT ROWID;
DROP INDEX IF EXISTS receipts_by_user_at;
CREATE TABLE IF NOT EXISTS sync_marks (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn data(e: impl std::fmt::Display) -> StoreError {
    StoreError::Data(e.to_string())
}

fn ms(t: &DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The first whole millisecond at or after `t`: rows keep whole milliseconds, so for a stored
/// `at`, `at >= t` exactly when `ms(at) >= ceil_ms(t)` (and `at < t` when `ms(at) < ceil_ms(t)`).
fn ceil_ms(t: &DateTime<Utc>) -> i64 {
    ms(t) + i64::from(!t.timestamp_subsec_nanos().is_multiple_of(1_000_000))
}

fn day_text(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn day_at(r: &Row<'_>, i: usize) -> rusqlite::Result<NaiveDate> {
    NaiveDate::parse_from_str(&r.get::<_, String>(i)?, "%Y-%m-%d").map_err(conversion)
}

fn count_at(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

fn status_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ReceiptStatus> {
    let s: String = r.get(i)?;
    ReceiptStatus::parse(&s).ok_or_else(|| rusqlite::Error::InvalidColumnName(format!("bad receipt status {s:?}")))
}

fn time(v: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v).ok_or_else(|| rusqlite::Error::IntegralValueOutOfRange(0, v))
}

fn conversion(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn uuid_at(r: &Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(&r.get::<_, String>(i)?).map_err(conversion)
}

fn conv_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ConversationId> {
    r.get::<_, String>(i)?.parse().map_err(conversion)
}

fn role_at(r: &Row<'_>, i: usize) -> rusqlite::Result<GroupRole> {
    let s: String = r.get(i)?;
    GroupRole::parse(&s).ok_or_else(|| rusqlite::Error::InvalidColumnName(format!("bad group role {s:?}")))
}

/// The `until` of an interval after a write, as Cassandra resolves it (the open never writes
/// `until`; of two closes the one with the higher write time, i.e. the higher `until`, wins).
const UNTIL_MERGE: &str = "CASE WHEN excluded.until IS NULL THEN {t}.until
                               WHEN {t}.until IS NULL THEN excluded.until
                               ELSE MAX({t}.until, excluded.until) END";

/// Read connections of a database file (reads running at once).
const READERS: usize = 16;

/// Jobs per transaction, at most.
const JOBS_PER_COMMIT: usize = 512;

/// How long a relaxed writer keeps a transaction open while jobs keep coming, and how many jobs
/// it takes at most.
const TXN_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);
const JOBS_PER_TXN: usize = 8192;

/// Pipelined writes that may wait for the writer at once.
const PIPELINED_QUEUED: usize = 1024;

/// Command tables that older versions kept in `tables.db`; [`SqliteStore::open`] moves them.
const COMMAND_TABLES: &[&str] = &["accounts_by_name", "accounts_by_id", "send_dedup", "message_owners", "media_objects", "media_shares"];

/// A database's single writer: every job that is waiting when a transaction starts goes into it
/// (group commit: one commit for all of them), urgent jobs (a user waits for them) ahead of the
/// others. With `relaxed` (`tables.db`), commits are not synced (`synchronous=NORMAL`) except
/// those of a transaction that begins with a [`Lane::Sync`] job: that one is synced, and with it
/// the whole WAL, i.e. every commit before it. A relaxed transaction also stays open while jobs
/// keep coming (up to [`TXN_WINDOW`] or [`JOBS_PER_TXN`]): a pipelined worker's next statement,
/// issued when the previous one was answered, joins the same transaction instead of waiting for
/// its commit.
fn writer_loop(mut conn: Connection, rx: std_mpsc::Receiver<(Lane, Job)>, name: &'static str, relaxed: bool, progress: Arc<Progress>) {
    let mut queue = WriterQueue::default();
    let (mut commits, mut jobs_done, mut since) = (0u64, 0u64, std::time::Instant::now());
    let (mut in_jobs, mut in_commit) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    loop {
        if since.elapsed() >= std::time::Duration::from_secs(10) {
            debug!(db = name, commits, jobs = jobs_done, per_commit = jobs_done as f64 / commits.max(1) as f64, jobs_ms = in_jobs.as_millis() as u64, commit_ms = in_commit.as_millis() as u64, "writer in the last 10 s");
            (commits, jobs_done, since) = (0, 0, std::time::Instant::now());
            (in_jobs, in_commit) = Default::default();
        }
        if queue.is_empty() {
            match rx.recv() {
                Ok((lane, job)) => queue.push(lane, job),
                Err(_) => return,
            }
        }
        queue.fill(&rx);
        let sync = relaxed && queue.sync_first();
        let jobs = queue.next_jobs(JOBS_PER_COMMIT, true);
        if sync {
            if let Err(e) = conn.pragma_update(None, "synchronous", "FULL") {
                error!(db = name, error = %e, "cannot switch to synchronous commits");
                continue;
            }
        }
        let tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                error!(db = name, error = %e, "cannot begin a transaction");
                // Dropping the jobs drops their reply channels: callers get "unavailable".
                continue;
            }
        };
        commits += 1;
        let number = progress.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let began = std::time::Instant::now();
        let mut ran = jobs.len();
        let mut answers: Vec<Outcome> = Vec::with_capacity(ran);
        let mut poison = run_jobs(&tx, jobs, &mut answers);
        while relaxed && !sync && !poison && ran < JOBS_PER_TXN && began.elapsed() < TXN_WINDOW {
            queue.fill(&rx);
            // A sync job begins a transaction of its own (it must be synced with all before it).
            let more = queue.next_jobs(JOBS_PER_COMMIT.min(JOBS_PER_TXN - ran), false);
            if more.is_empty() {
                break;
            }
            ran += more.len();
            poison |= run_jobs(&tx, more, &mut answers);
        }
        jobs_done += ran as u64;
        in_jobs += began.elapsed();
        let committing = std::time::Instant::now();
        let ok = if poison {
            // The failing write logged why (once, as an error); its callers learn it from `settle`.
            debug!(db = name, transaction = number, "rolling back after a failed pipelined write");
            drop(tx);
            false
        } else {
            match tx.commit() {
                Ok(()) => true,
                Err(e) => {
                    error!(db = name, error = %e, "commit failed");
                    false
                }
            }
        };
        if !ok {
            progress.last_failed.store(number, Ordering::SeqCst);
        }
        in_commit += committing.elapsed();
        progress.settled.send_replace(number);
        if sync {
            if let Err(e) = conn.pragma_update(None, "synchronous", "NORMAL") {
                error!(db = name, error = %e, "cannot switch back to unsynced commits");
            }
        }
        for a in answers {
            if let Outcome::Answer(a) = a {
                a(ok);
            }
        }
    }
}

/// Runs jobs in `tx`, keeping what is left to do after it; true if one of them poisoned it.
fn run_jobs(tx: &Transaction<'_>, jobs: Vec<Job>, outcomes: &mut Vec<Outcome>) -> bool {
    let mut poison = false;
    for job in jobs {
        let o = job(tx);
        poison |= matches!(o, Outcome::Poison);
        outcomes.push(o);
    }
    poison
}

/// The jobs a writer has taken off its channel: urgent ones, then the others in order (with
/// whether each is a sync job).
#[derive(Default)]
struct WriterQueue {
    urgent: Vec<Job>,
    background: std::collections::VecDeque<(bool, Job)>,
}

impl WriterQueue {
    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.background.is_empty()
    }

    fn push(&mut self, lane: Lane, job: Job) {
        match lane {
            Lane::Urgent => self.urgent.push(job),
            Lane::Background => self.background.push_back((false, job)),
            Lane::Sync => self.background.push_back((true, job)),
        }
    }

    /// Takes what waits on the channel, up to a bound.
    fn fill(&mut self, rx: &std_mpsc::Receiver<(Lane, Job)>) {
        while self.urgent.len() + self.background.len() < 4 * JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok((lane, job)) => self.push(lane, job),
                Err(_) => break,
            }
        }
    }

    /// Whether the next transaction holds a sync job (no urgent job goes ahead of it).
    fn sync_first(&self) -> bool {
        let take = self.background.len().min(JOBS_PER_COMMIT.saturating_sub(self.urgent.len()));
        self.background.iter().take(take).any(|(s, _)| *s)
    }

    /// The next jobs, at most `max`: every urgent one, then background ones in order (stopping
    /// before a sync job unless `sync_ok`).
    fn next_jobs(&mut self, max: usize, sync_ok: bool) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.urgent.drain(..).collect();
        while jobs.len() < max {
            match self.background.front() {
                Some((true, _)) if !sync_ok => break,
                Some(_) => jobs.push(self.background.pop_front().expect("a front job").1),
                None => break,
            }
        }
        jobs
    }
}

/// Which queue of the writer a job goes to.
#[derive(Clone, Copy)]
enum Lane {
    /// A user waits for it (commands of the gateway).
    Urgent,
    /// Projection writes: throughput matters, not the latency of one.
    Background,
    /// A background job whose transaction must be on disk (with every one before it) when it
    /// is answered.
    Sync,
}

/// Opens a database file's writer connection and creates its tables.
fn open_db(path: &Path, schema: &str, relaxed: bool) -> StoreResult<Connection> {
    let conn = open_sqlite(path, true).map_err(|e| data(format!("{}: {e}", path.display())))?;
    if relaxed {
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(data)?;
        // 64 MiB of page cache (the default is 2 MiB): projection writes land all over the
        // file (per user, per conversation), and hot index pages stay in memory instead of
        // being read again through the kernel on every write. Readers and the small command
        // file keep the default (WAL empties a reader's cache whenever the file changed).
        conn.pragma_update(None, "cache_size", -65_536).map_err(data)?;
    }
    conn.execute_batch(schema).map_err(data)?;
    Ok(conn)
}

impl Db {
    /// Starts the writer thread on `conn`.
    fn start(path: PathBuf, conn: Connection, name: &'static str, relaxed: bool) -> StoreResult<Arc<Self>> {
        let (tx, rx) = std_mpsc::sync_channel::<(Lane, Job)>(10_000);
        let progress = Arc::new(Progress { begun: AtomicU64::new(0), settled: watch::Sender::new(0), last_failed: AtomicU64::new(0) });
        let p = progress.clone();
        std::thread::Builder::new().name(format!("chat-{name}-writer")).spawn(move || writer_loop(conn, rx, name, relaxed, p)).map_err(data)?;
        Ok(Arc::new(Db {
            path,
            writer: tx,
            progress,
            queued: Arc::new(tokio::sync::Semaphore::new(PIPELINED_QUEUED)),
            readers: Mutex::new(Vec::new()),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
        }))
    }

    /// Runs `f` in one of the writer's next transactions; answers after it committed.
    async fn write<R: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        self.run(lane, Answer::Committed, true, f).await
    }

    /// Runs `f` in the writer's transaction after every job submitted before it; with
    /// `savepoint`, a failing `f` leaves nothing behind (and takes no other job down).
    async fn run<R: Send + 'static>(
        &self,
        lane: Lane,
        answer: Answer,
        savepoint: bool,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        let (tx, rx) = oneshot::channel::<StoreResult<R>>();
        let job: Job = Box::new(move |t: &Transaction<'_>| {
            // Each write in its own savepoint: a failing job does not take the others down.
            // (Both statements come from the statement cache: parsing them for every job cost
            // as much as the job's own statement.)
            let result = if !savepoint {
                f(t)
            } else {
                (|| {
                    t.exec("SAVEPOINT job", [])?;
                    match f(t) {
                        Ok(r) => {
                            t.exec("RELEASE job", [])?;
                            Ok(r)
                        }
                        Err(e) => {
                            let _ = t.execute_batch("ROLLBACK TO job; RELEASE job");
                            Err(e)
                        }
                    }
                })()
            };
            if answer == Answer::Ran {
                let _ = tx.send(result.map_err(data));
                return Outcome::Answered;
            }
            Outcome::Answer(Box::new(move |committed: bool| {
                let out = match (result, committed) {
                    (Ok(r), true) => Ok(r),
                    (Ok(_), false) => Err(StoreError::Unavailable("transaction did not commit".into())),
                    (Err(e), _) => Err(data(e)),
                };
                let _ = tx.send(out);
            }))
        });
        self.submit(lane, job).await?;
        rx.await.map_err(|_| unavailable("transaction failed"))?
    }

    /// Queues a pipelined write and returns: it runs after every job queued before it, and if it
    /// fails, its whole transaction rolls back (the error is logged here and reported by
    /// [`Durable::settle`] to every caller with writes in that transaction).
    ///
    /// At most [`PIPELINED_QUEUED`] such writes wait for the writer at once: beyond that `put`
    /// waits too, so that a burst (a 1,024-member group's deliveries) cannot queue thousands of
    /// jobs ahead of everyone else's.
    async fn put(&self, name: &'static str, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()> + Send + 'static) -> StoreResult<()> {
        let permit = self.queued.clone().acquire_owned().await.map_err(unavailable)?;
        let job: Job = Box::new(move |t: &Transaction<'_>| {
            drop(permit);
            match f(t) {
                Ok(()) => Outcome::Answered,
                Err(e) => {
                    error!(write = name, error = %e, "pipelined write failed; its transaction is rolled back and redone by its callers");
                    Outcome::Poison
                }
            }
        });
        self.submit(Lane::Background, job).await
    }

    /// Hands a job to the writer (waiting for room if its channel is full).
    async fn submit(&self, lane: Lane, job: Job) -> StoreResult<()> {
        let writer = self.writer.clone();
        match writer.try_send((lane, job)) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || writer.send(job)).await.map_err(unavailable)?.map_err(|_| unavailable("writer stopped"))?
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => return Err(unavailable("writer stopped")),
        }
        Ok(())
    }

    /// Runs `f` on a read connection.
    async fn read<R: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> StoreResult<R> {
        let db = self.clone();
        let slot = db.read_slots.clone().acquire_owned().await.map_err(unavailable)?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let pooled = db.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_sqlite(&db.path, false).map_err(unavailable)?,
            };
            let out = f(&conn).map_err(data);
            let mut pool = db.readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < READERS {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(unavailable)?
    }
}

impl SqliteStore {
    /// Opens (or creates) `dir/commands.db` and `dir/tables.db`. A directory written by a
    /// version that kept the command tables in `tables.db` has them moved to `commands.db`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| data(format!("data directory {}: {e}", dir.display())))?;
        let (cmd_path, tables_path) = (dir.join("commands.db"), dir.join("tables.db"));
        let mut cmd_conn = open_db(&cmd_path, COMMAND_SCHEMA, false)?;
        let tables_conn = open_db(&tables_path, SCHEMA, true)?;
        move_command_tables(&mut cmd_conn, &tables_conn, &tables_path)?;
        Ok(SqliteStore {
            commands: Db::start(cmd_path, cmd_conn, "commands", false)?,
            tables: Db::start(tables_path, tables_conn, "tables", true)?,
            pipelined: false,
        })
    }

    /// A handle on the same files for a projection worker: its `tables.db` writes return once
    /// queued to the writer, and its `tables.db` reads run in the writer's open transaction after
    /// everything queued before them (so they see those writes). A record costs one round trip
    /// to the writer per read instead of one commit per write; the worker calls
    /// [`Durable::settle`] before it counts a slice of records as done, and a failed write rolls
    /// its whole transaction back. Not for the gateway: its reads would see writes that may
    /// still be rolled back.
    pub fn pipelined(&self) -> SqliteStore {
        SqliteStore { pipelined: true, ..self.clone() }
    }

    /// A projection write (tables.db), answered once committed (not necessarily synced); on a
    /// pipelined handle, once queued (see [`Db::put`]).
    async fn write(&self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()> + Send + 'static) -> StoreResult<()> {
        if self.pipelined {
            return self.tables.put("projection", f).await;
        }
        self.tables.write(Lane::Background, f).await
    }

    /// A read of tables.db (in the writer's transaction if this handle is pipelined).
    async fn read<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> StoreResult<R> {
        if self.pipelined {
            return self.tables.run(Lane::Background, Answer::Ran, false, move |t| f(t)).await;
        }
        self.tables.read(f).await
    }

    /// A command write (commands.db), answered once on disk.
    async fn command<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        self.commands.write(Lane::Urgent, f).await
    }

    /// A read of commands.db.
    async fn command_read<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> StoreResult<R> {
        self.commands.read(f).await
    }
}

/// Moves the command tables of an older `tables.db` into `commands.db`: copies their rows
/// (committed and synced), then drops them from `tables.db`. Safe to repeat after a crash in
/// between (the copy ignores rows already there).
fn move_command_tables(cmd: &mut Connection, tables: &Connection, tables_path: &Path) -> StoreResult<()> {
    let present: Vec<&str> = COMMAND_TABLES
        .iter()
        .copied()
        .filter(|t| tables.row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [t], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0)
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    cmd.execute("ATTACH DATABASE ?1 AS old", [tables_path.to_string_lossy()]).map_err(data)?;
    let copied = (|| {
        let tx = cmd.transaction()?;
        for t in &present {
            tx.execute(&format!("INSERT OR IGNORE INTO main.{t} SELECT * FROM old.{t}"), [])?;
        }
        tx.commit()
    })();
    let detached = cmd.execute("DETACH DATABASE old", []);
    copied.map_err(|e| data(format!("moving the command tables to commands.db: {e}")))?;
    detached.map_err(data)?;
    for t in &present {
        tables.execute(&format!("DROP TABLE {t}"), []).map_err(data)?;
    }
    Ok(())
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        conversation_id: conv_at(r, 0)?,
        message_id: MessageId(uuid_at(r, 1)?),
        sender: UserId(uuid_at(r, 2)?),
        sender_device: r.get(3)?,
        client_msg_id: r.get(4)?,
        kind: r.get(5)?,
        body: r.get(6)?,
        sent_at: time(r.get(7)?)?,
        position: r.get(8)?,
        media: match r.get::<_, Option<String>>(9)? {
            Some(j) => Some(serde_json::from_str(&j).map_err(conversion)?),
            None => None,
        },
    })
}

const MESSAGE_COLS: &str = "conversation_id, message_id, sender, sender_device, client_msg_id, kind, body, sent_at, position, media";
const INBOX_COLS: &str = "user_id, conversation_id, peer_id, last_message_id, last_sender, last_kind, last_body, last_at, unread, applied_offset";

fn inbox_row(r: &Row<'_>) -> rusqlite::Result<InboxRow> {
    Ok(InboxRow {
        user_id: UserId(uuid_at(r, 0)?),
        conversation_id: conv_at(r, 1)?,
        peer_id: match r.get::<_, Option<String>>(2)? {
            Some(p) => Some(UserId(Uuid::parse_str(&p).map_err(conversion)?)),
            None => None,
        },
        last_message_id: MessageId(uuid_at(r, 3)?),
        last_sender: UserId(uuid_at(r, 4)?),
        last_kind: r.get(5)?,
        last_body: r.get(6)?,
        last_at: time(r.get(7)?)?,
        unread: r.get(8)?,
        applied_offset: r.get(9)?,
    })
}

#[async_trait]
impl CommandStore for SqliteStore {
    async fn create_account(&self, a: &Account) -> StoreResult<bool> {
        let a = a.clone();
        self.command(move |t| {
            let n = t.exec(
                "INSERT OR IGNORE INTO accounts_by_name (username, user_id, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![a.username, a.user_id.to_string(), a.password_hash, ms(&a.created_at)],
            )?;
            if n == 1 {
                t.exec(
                    "INSERT OR REPLACE INTO accounts_by_id (user_id, username, created_at) VALUES (?1, ?2, ?3)",
                    params![a.user_id.to_string(), a.username, ms(&a.created_at)],
                )?;
            }
            Ok(n == 1)
        })
        .await
    }

    async fn remove_account(&self, a: &Account) -> StoreResult<()> {
        let a = a.clone();
        self.command(move |t| {
            t.exec("DELETE FROM accounts_by_id WHERE user_id = ?1", params![a.user_id.to_string()])?;
            t.exec("DELETE FROM accounts_by_name WHERE username = ?1 AND user_id = ?2", params![a.username, a.user_id.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn account_by_name(&self, username: &str) -> StoreResult<Option<Account>> {
        let username = username.to_owned();
        self.command_read(move |c| {
            c.row(
                "SELECT user_id, username, password_hash, created_at FROM accounts_by_name WHERE username = ?1",
                params![username],
                |r| Ok(Account { user_id: UserId(uuid_at(r, 0)?), username: r.get(1)?, password_hash: r.get(2)?, created_at: time(r.get(3)?)? }),
            )
            .optional()
        })
        .await
    }

    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<String>> {
        self.command_read(move |c| {
            c.row("SELECT username FROM accounts_by_id WHERE user_id = ?1", params![user.to_string()], |r| r.get(0)).optional()
        })
        .await
    }

    async fn reserve_send(&self, res: &SendReservation) -> StoreResult<Option<SendReservation>> {
        let res = res.clone();
        let inserted = self
            .command(move |t| {
                let n = t.exec(
                    "INSERT OR IGNORE INTO send_dedup (sender, client_msg_id, message_id, conversation_id, sent_at, body_sha256, committed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
                    params![res.sender.to_string(), res.client_msg_id, res.message_id.to_string(), res.conversation_id.as_str(), ms(&res.sent_at), res.body_sha256],
                )?;
                Ok((n == 1, res))
            })
            .await?;
        match inserted {
            (true, _) => Ok(None),
            (false, res) => match self.get_send(res.sender, &res.client_msg_id).await? {
                Some(existing) => Ok(Some(existing)),
                None => Err(StoreError::Data("send reservation vanished".into())),
            },
        }
    }

    async fn commit_send(&self, sender: UserId, client_msg_id: &str) -> StoreResult<()> {
        let cmid = client_msg_id.to_owned();
        self.command(move |t| {
            t.exec("UPDATE send_dedup SET committed = 1 WHERE sender = ?1 AND client_msg_id = ?2", params![sender.to_string(), cmid])?;
            Ok(())
        })
        .await
    }

    async fn get_send(&self, sender: UserId, client_msg_id: &str) -> StoreResult<Option<SendReservation>> {
        let cmid = client_msg_id.to_owned();
        self.command_read(move |c| {
            c.row(
                "SELECT message_id, conversation_id, sent_at, body_sha256, committed FROM send_dedup WHERE sender = ?1 AND client_msg_id = ?2",
                params![sender.to_string(), cmid],
                |r| {
                    Ok(SendReservation {
                        sender,
                        client_msg_id: cmid.clone(),
                        message_id: MessageId(uuid_at(r, 0)?),
                        conversation_id: conv_at(r, 1)?,
                        sent_at: time(r.get(2)?)?,
                        body_sha256: r.get(3)?,
                        committed: r.get::<_, i64>(4)? != 0,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn put_message_owner(&self, message: MessageId, c: &ConversationId, sender: UserId) -> StoreResult<()> {
        let c = c.clone();
        self.command(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO message_owners (message_id, conversation_id, sender) VALUES (?1, ?2, ?3)")?
                .execute(params![message.to_string(), c.as_str(), sender.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn message_owner(&self, message: MessageId) -> StoreResult<Option<(ConversationId, UserId)>> {
        self.command_read(move |c| {
            c.row("SELECT conversation_id, sender FROM message_owners WHERE message_id = ?1", params![message.to_string()], |r| {
                Ok((conv_at(r, 0)?, UserId(uuid_at(r, 1)?)))
            })
            .optional()
        })
        .await
    }

    async fn put_media(&self, m: &MediaObject) -> StoreResult<()> {
        let m = m.clone();
        self.command(move |t| {
            t.exec(
                "INSERT OR REPLACE INTO media_objects (media_id, uploader, kind, content_type, size, sha256, created_at, public) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![m.media_id.to_string(), m.uploader.to_string(), m.kind, m.content_type, m.size, m.sha256, ms(&m.created_at), m.public],
            )?;
            Ok(())
        })
        .await
    }

    async fn media(&self, id: Uuid) -> StoreResult<Option<MediaObject>> {
        self.command_read(move |c| {
            c.row(
                "SELECT uploader, kind, content_type, size, sha256, created_at, public FROM media_objects WHERE media_id = ?1",
                params![id.to_string()],
                |r| {
                    Ok(MediaObject {
                        media_id: id,
                        uploader: UserId(uuid_at(r, 0)?),
                        kind: r.get(1)?,
                        content_type: r.get(2)?,
                        size: r.get(3)?,
                        sha256: r.get(4)?,
                        created_at: time(r.get(5)?)?,
                        public: r.get::<_, i64>(6)? != 0,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn set_media_public(&self, id: Uuid) -> StoreResult<()> {
        self.command(move |t| {
            t.exec("UPDATE media_objects SET public = 1 WHERE media_id = ?1", params![id.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn share_media(&self, id: Uuid, c: &ConversationId) -> StoreResult<()> {
        let c = c.clone();
        self.command(move |t| {
            t.exec("INSERT OR IGNORE INTO media_shares (media_id, conversation_id) VALUES (?1, ?2)", params![id.to_string(), c.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn media_shares(&self, id: Uuid) -> StoreResult<Vec<ConversationId>> {
        self.command_read(move |c| {
            let mut st = c.prepare_cached("SELECT conversation_id FROM media_shares WHERE media_id = ?1 ORDER BY conversation_id")?;
            let rows = st.query_map(params![id.to_string()], |r| conv_at(r, 0))?;
            rows.collect()
        })
        .await
    }
}

#[async_trait]
impl ProjectionStore for SqliteStore {
    async fn put_user(&self, user: UserId, username: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let username = username.to_owned();
        self.write(move |t| {
            t.exec(
                "INSERT OR REPLACE INTO users (user_id, username, registered_at) VALUES (?1, ?2, ?3)",
                params![user.to_string(), username, ms(&at)],
            )?;
            Ok(())
        })
        .await
    }

    async fn put_message(&self, m: &MessageRow) -> StoreResult<()> {
        let m = m.clone();
        self.write(move |t| {
            let bucket = bucket_of(m.message_id);
            t.prepare_cached(&format!("INSERT OR REPLACE INTO messages (bucket, {MESSAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"))?
                .execute(params![
                    bucket,
                    m.conversation_id.as_str(),
                    m.message_id.to_string(),
                    m.sender.to_string(),
                    m.sender_device,
                    m.client_msg_id,
                    m.kind,
                    m.body,
                    ms(&m.sent_at),
                    m.position,
                    m.media.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default())
                ])?;
            t.prepare_cached("INSERT OR IGNORE INTO conversation_buckets (conversation_id, bucket) VALUES (?1, ?2)")?
                .execute(params![m.conversation_id.as_str(), bucket])?;
            t.prepare_cached("INSERT OR REPLACE INTO message_index (message_id, conversation_id, sender, sent_at, position) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![m.message_id.to_string(), m.conversation_id.as_str(), m.sender.to_string(), ms(&m.sent_at), m.position])?;
            Ok(())
        })
        .await
    }

    async fn message_meta(&self, id: MessageId) -> StoreResult<Option<MessageMeta>> {
        self.find_message(id).await
    }

    async fn inbox_row(&self, user: UserId, c: &ConversationId) -> StoreResult<Option<InboxRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                &format!("SELECT {INBOX_COLS} FROM inbox WHERE user_id = ?1 AND conversation_id = ?2"),
                params![user.to_string(), c.as_str()],
                inbox_row,
            )
            .optional()
        })
        .await
    }

    async fn put_inbox_row(&self, r: &InboxRow) -> StoreResult<()> {
        let r = r.clone();
        self.write(move |t| {
            t.prepare_cached(&format!("INSERT OR REPLACE INTO inbox ({INBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"))?
                .execute(params![
                    r.user_id.to_string(),
                    r.conversation_id.as_str(),
                    r.peer_id.map(|p| p.to_string()),
                    r.last_message_id.to_string(),
                    r.last_sender.to_string(),
                    r.last_kind,
                    r.last_body,
                    ms(&r.last_at),
                    r.unread,
                    r.applied_offset
                ])?;
            Ok(())
        })
        .await
    }

    async fn read_marker(&self, c: &ConversationId, reader: UserId) -> StoreResult<Option<ReadMarker>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT up_to, applied_offset FROM read_markers WHERE conversation_id = ?1 AND reader = ?2",
                params![c.as_str(), reader.to_string()],
                |r| Ok(ReadMarker { conversation_id: c.clone(), reader, up_to: MessageId(uuid_at(r, 0)?), applied_offset: r.get(1)? }),
            )
            .optional()
        })
        .await
    }

    async fn put_read_marker(&self, m: &ReadMarker) -> StoreResult<()> {
        let m = m.clone();
        self.write(move |t| {
            t.exec(
                "INSERT OR REPLACE INTO read_markers (conversation_id, reader, up_to, applied_offset) VALUES (?1, ?2, ?3, ?4)",
                params![m.conversation_id.as_str(), m.reader.to_string(), m.up_to.to_string(), m.applied_offset],
            )?;
            Ok(())
        })
        .await
    }

    async fn messages_between(&self, c: &ConversationId, after: Option<MessageId>, up_to: MessageId) -> StoreResult<Vec<MessageRow>> {
        let c = c.clone();
        self.read(move |conn| {
            // Canonical UUID text sorts like the UUID's bytes, so text comparison is id order.
            let after = after.map(|a| a.to_string()).unwrap_or_default();
            let mut st = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ?1 AND message_id > ?2 AND message_id <= ?3 ORDER BY message_id ASC"
            ))?;
            let rows = st.query_map(params![c.as_str(), after, up_to.to_string()], message_row)?;
            rows.collect()
        })
        .await
    }

    async fn put_receipts(&self, rows: &[ReceiptRow]) -> StoreResult<()> {
        let rows = rows.to_vec();
        self.write(move |t| {
            let mut st = t.prepare_cached(
                "INSERT INTO receipts (message_id, recipient, status, device_id, at, conversation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (message_id, recipient, status, device_id) DO UPDATE SET at = excluded.at, conversation_id = excluded.conversation_id
                 WHERE excluded.at < receipts.at",
            )?;
            // The same rows by recipient, with the same rule (the audit of one user).
            let mut by_user = t.prepare_cached(
                "INSERT INTO receipts_by_user (recipient, message_id, status, device_id, at, conversation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (recipient, message_id, status, device_id) DO UPDATE SET at = excluded.at, conversation_id = excluded.conversation_id
                 WHERE excluded.at < receipts_by_user.at",
            )?;
            for r in rows {
                let (message, recipient) = (r.message_id.to_string(), r.recipient.to_string());
                st.execute(params![message, recipient, r.status.as_str(), r.device_id, ms(&r.at), r.conversation_id.as_str()])?;
                by_user.execute(params![recipient, message, r.status.as_str(), r.device_id, ms(&r.at), r.conversation_id.as_str()])?;
            }
            Ok(())
        })
        .await
    }

    async fn stream_seq_of(&self, user: UserId, item_id: Uuid) -> StoreResult<Option<i64>> {
        self.read(move |c| {
            c.row(
                "SELECT seq FROM user_stream_ids WHERE user_id = ?1 AND item_id = ?2",
                params![user.to_string(), item_id.to_string()],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn put_stream_item(&self, user: UserId, row: &StreamRow) -> StoreResult<()> {
        let row = row.clone();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO user_stream (user_id, seq, item_id, item) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![user.to_string(), row.seq, row.item_id.to_string(), row.item])?;
            t.prepare_cached("INSERT OR REPLACE INTO user_stream_ids (user_id, item_id, seq) VALUES (?1, ?2, ?3)")?
                .execute(params![user.to_string(), row.item_id.to_string(), row.seq])?;
            Ok(())
        })
        .await
    }

    async fn add_pending(&self, user: UserId, message: MessageId, c: &ConversationId) -> StoreResult<()> {
        let c = c.clone();
        self.write(move |t| {
            // A removed row stays removed: insert only if no row (live or removed) exists.
            t.prepare_cached("INSERT OR IGNORE INTO pending_deliveries (user_id, message_id, conversation_id, removed) VALUES (?1, ?2, ?3, 0)")?
                .execute(params![user.to_string(), message.to_string(), c.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn remove_pending(&self, user: UserId, message: MessageId) -> StoreResult<()> {
        self.write(move |t| {
            t.prepare_cached(
                "INSERT INTO pending_deliveries (user_id, message_id, conversation_id, removed) VALUES (?1, ?2, NULL, 1)
                 ON CONFLICT (user_id, message_id) DO UPDATE SET removed = 1",
            )?
            .execute(params![user.to_string(), message.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn put_presence(&self, user: UserId, online: bool, at: DateTime<Utc>) -> StoreResult<()> {
        // Cassandra's rule, so that a replay in any order gives the same row: the later change
        // wins, and of two changes at the same instant the greater value ('online') does, as
        // Cassandra resolves two cells with one write time.
        self.write(move |t| {
            let status = if online { "online" } else { "offline" };
            let last_seen: Option<i64> = if online { None } else { Some(ms(&at)) };
            t.exec(
                "INSERT INTO last_seen (user_id, status, changed_at, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id) DO UPDATE SET
                   status = CASE WHEN excluded.changed_at > last_seen.changed_at THEN excluded.status
                                 WHEN excluded.changed_at < last_seen.changed_at THEN last_seen.status
                                 ELSE MAX(last_seen.status, excluded.status) END,
                   changed_at = MAX(last_seen.changed_at, excluded.changed_at),
                   last_seen = CASE WHEN excluded.last_seen IS NULL THEN last_seen.last_seen
                                    WHEN last_seen.last_seen IS NULL THEN excluded.last_seen
                                    ELSE MAX(last_seen.last_seen, excluded.last_seen) END",
                params![user.to_string(), status, ms(&at), last_seen],
            )?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl ReadStore for SqliteStore {
    async fn history_page(&self, c: &ConversationId, before: Option<MessageId>, limit: usize) -> StoreResult<Vec<MessageRow>> {
        let c = c.clone();
        self.read(move |conn| {
            // 'g' sorts after every hex digit and '-': no canonical id is >= it.
            let before = before.map(|b| b.to_string()).unwrap_or_else(|| "g".into());
            let mut st = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ?1 AND message_id < ?2 ORDER BY message_id DESC LIMIT ?3"
            ))?;
            let rows = st.query_map(params![c.as_str(), before, limit as i64], message_row)?;
            rows.collect()
        })
        .await
    }

    async fn inbox(&self, user: UserId, limit: usize) -> StoreResult<Vec<InboxRow>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(&format!("SELECT {INBOX_COLS} FROM inbox WHERE user_id = ?1 LIMIT ?2"))?;
            let rows = st.query_map(params![user.to_string(), limit as i64], inbox_row)?;
            rows.collect()
        })
        .await
    }

    async fn find_message(&self, id: MessageId) -> StoreResult<Option<MessageMeta>> {
        self.read(move |c| {
            c.row(
                "SELECT conversation_id, sender, sent_at, position FROM message_index WHERE message_id = ?1",
                params![id.to_string()],
                |r| {
                    Ok(MessageMeta {
                        message_id: id,
                        conversation_id: conv_at(r, 0)?,
                        sender: UserId(uuid_at(r, 1)?),
                        sent_at: time(r.get(2)?)?,
                        position: r.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn receipts(&self, message: MessageId) -> StoreResult<Vec<ReceiptRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT message_id, recipient, status, device_id, at, conversation_id FROM receipts WHERE message_id = ?1 ORDER BY recipient, status, device_id",
            )?;
            let rows = st.query_map(params![message.to_string()], |r| {
                let status: String = r.get(2)?;
                Ok(ReceiptRow {
                    message_id: MessageId(uuid_at(r, 0)?),
                    recipient: UserId(uuid_at(r, 1)?),
                    status: ReceiptStatus::parse(&status).ok_or_else(|| rusqlite::Error::InvalidColumnName(status.clone()))?,
                    device_id: r.get(3)?,
                    at: time(r.get(4)?)?,
                    conversation_id: conv_at(r, 5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn stream_after(&self, user: UserId, after: i64, limit: usize) -> StoreResult<Vec<StreamRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT seq, item_id, item FROM user_stream WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
            let rows = st.query_map(params![user.to_string(), after, limit.min(10_000) as i64], |r| {
                Ok(StreamRow { seq: r.get(0)?, item_id: uuid_at(r, 1)?, item: r.get(2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn pending_count(&self, user: UserId, cap: usize) -> StoreResult<usize> {
        self.read(move |c| {
            c.row(
                "SELECT COUNT(*) FROM (SELECT 1 FROM pending_deliveries WHERE user_id = ?1 AND removed = 0 LIMIT ?2)",
                params![user.to_string(), cap as i64],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as usize)
    }

    async fn last_seen(&self, user: UserId) -> StoreResult<Option<LastSeenRow>> {
        self.read(move |c| {
            c.row("SELECT status, changed_at, last_seen FROM last_seen WHERE user_id = ?1", params![user.to_string()], |r| {
                Ok(LastSeenRow {
                    user_id: user,
                    status: r.get(0)?,
                    changed_at: time(r.get(1)?)?,
                    last_seen: match r.get::<_, Option<i64>>(2)? {
                        Some(v) => Some(time(v)?),
                        None => None,
                    },
                })
            })
            .optional()
        })
        .await
    }

    async fn in_inbox(&self, user: UserId, c: &ConversationId) -> StoreResult<bool> {
        Ok(ProjectionStore::inbox_row(self, user, c).await?.is_some())
    }
}

const FANOUT_MESSAGE_COLS: &str = "conversation_id, message_id, sender, position, recipients";

fn fanout_message_row(r: &Row<'_>) -> rusqlite::Result<FanoutMessage> {
    Ok(FanoutMessage {
        conversation_id: conv_at(r, 0)?,
        message_id: MessageId(uuid_at(r, 1)?),
        sender: UserId(uuid_at(r, 2)?),
        position: r.get(3)?,
        recipients: r.get(4)?,
    })
}

#[async_trait]
impl FanoutStore for SqliteStore {
    async fn fanout_group(&self, c: &ConversationId) -> StoreResult<Option<FanoutGroup>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT name, created_at, membership_version FROM fanout_groups WHERE conversation_id = ?1",
                params![c.as_str()],
                |r| Ok(FanoutGroup { conversation_id: c.clone(), name: r.get(0)?, created_at: r.get(1)?, membership_version: r.get(2)? }),
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_group(&self, g: &FanoutGroup) -> StoreResult<()> {
        let g = g.clone();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO fanout_groups (conversation_id, name, created_at, membership_version) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![g.conversation_id.as_str(), g.name, g.created_at, g.membership_version])?;
            Ok(())
        })
        .await
    }

    async fn fanout_members(&self, c: &ConversationId) -> StoreResult<Vec<MemberInterval>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT member, since, until, role FROM fanout_members WHERE conversation_id = ?1 ORDER BY member, since",
            )?;
            let rows = st.query_map(params![c.as_str()], |r| {
                Ok(MemberInterval { member: UserId(uuid_at(r, 0)?), since: r.get(1)?, until: r.get(2)?, role: role_at(r, 3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn put_fanout_member(&self, c: &ConversationId, m: &MemberInterval) -> StoreResult<()> {
        let (c, m) = (c.clone(), m.clone());
        self.write(move |t| {
            // Cassandra's rule (write time `until` for a close, `since` for an open): the close
            // keeps its `until` whatever the order, and the write at the higher position decides
            // the role (equal write times: the greater value, as Cassandra breaks ties).
            let until = UNTIL_MERGE.replace("{t}", "fanout_members");
            t.prepare_cached(&format!(
                "INSERT INTO fanout_members (conversation_id, member, since, until, role) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id, member, since) DO UPDATE SET
                   until = {until},
                   role = CASE WHEN COALESCE(excluded.until, excluded.since) > COALESCE(fanout_members.until, fanout_members.since) THEN excluded.role
                               WHEN COALESCE(excluded.until, excluded.since) < COALESCE(fanout_members.until, fanout_members.since) THEN fanout_members.role
                               ELSE MAX(fanout_members.role, excluded.role) END"
            ))?
            .execute(params![c.as_str(), m.member.to_string(), m.since, m.until, m.role.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn fanout_message(&self, c: &ConversationId, message: MessageId) -> StoreResult<Option<FanoutMessage>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                &format!("SELECT {FANOUT_MESSAGE_COLS} FROM fanout_messages WHERE conversation_id = ?1 AND message_id = ?2"),
                params![c.as_str(), message.to_string()],
                fanout_message_row,
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_message(&self, m: &FanoutMessage) -> StoreResult<()> {
        let m = m.clone();
        self.write(move |t| {
            t.prepare_cached(&format!("INSERT OR REPLACE INTO fanout_messages ({FANOUT_MESSAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"))?
                .execute(params![m.conversation_id.as_str(), m.message_id.to_string(), m.sender.to_string(), m.position, m.recipients])?;
            Ok(())
        })
        .await
    }

    async fn fanout_messages_between(
        &self,
        c: &ConversationId,
        after: Option<MessageId>,
        up_to: MessageId,
    ) -> StoreResult<Vec<FanoutMessage>> {
        let c = c.clone();
        self.read(move |conn| {
            // As in messages_between: canonical UUID text sorts like the ids (UUIDv7: by time),
            // and '' sorts before every id.
            let after = after.map(|a| a.to_string()).unwrap_or_default();
            let mut st = conn.prepare_cached(&format!(
                "SELECT {FANOUT_MESSAGE_COLS} FROM fanout_messages WHERE conversation_id = ?1 AND message_id > ?2 AND message_id <= ?3 ORDER BY message_id ASC"
            ))?;
            let rows = st.query_map(params![c.as_str(), after, up_to.to_string()], fanout_message_row)?;
            rows.collect()
        })
        .await
    }

    async fn add_fanout_ack(&self, message: MessageId, status: ReceiptStatus, member: UserId) -> StoreResult<()> {
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO fanout_acks (message_id, status, member) VALUES (?1, ?2, ?3)")?
                .execute(params![message.to_string(), status.as_str(), member.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn fanout_ack_count(&self, message: MessageId, status: ReceiptStatus) -> StoreResult<usize> {
        self.read(move |c| {
            c.row(
                "SELECT COUNT(*) FROM fanout_acks WHERE message_id = ?1 AND status = ?2",
                params![message.to_string(), status.as_str()],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n.max(0) as usize)
    }

    async fn fanout_read_marker(&self, c: &ConversationId, reader: UserId) -> StoreResult<Option<(MessageId, i64)>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT up_to, position FROM fanout_read_markers WHERE conversation_id = ?1 AND reader = ?2",
                params![c.as_str(), reader.to_string()],
                |r| Ok((MessageId(uuid_at(r, 0)?), r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_read_marker(&self, c: &ConversationId, reader: UserId, up_to: MessageId, position: i64) -> StoreResult<()> {
        let c = c.clone();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO fanout_read_markers (conversation_id, reader, up_to, position) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![c.as_str(), reader.to_string(), up_to.to_string(), position])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl GroupStore for SqliteStore {
    // Cassandra writes these rows with write time = position; here a conditional upsert keeps
    // the row with the highest position (equal positions carry identical content).
    async fn put_group(&self, g: &GroupRow) -> StoreResult<()> {
        let g = g.clone();
        self.write(move |t| {
            // The name has its own position (Cassandra: its own cell write time), so a rename
            // projected before the creation keeps its name.
            t.prepare_cached(
                "INSERT INTO groups (conversation_id, name, name_position, creator, created_at, position) VALUES (?1, ?2, ?5, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id) DO UPDATE SET
                   creator = CASE WHEN groups.position IS NULL OR excluded.position >= groups.position THEN excluded.creator ELSE groups.creator END,
                   created_at = CASE WHEN groups.position IS NULL OR excluded.position >= groups.position THEN excluded.created_at ELSE groups.created_at END,
                   position = MAX(COALESCE(groups.position, excluded.position), excluded.position),
                   name = CASE WHEN excluded.name_position >= groups.name_position THEN excluded.name ELSE groups.name END,
                   name_position = MAX(groups.name_position, excluded.name_position)",
            )?
            .execute(params![g.conversation_id.as_str(), g.name, g.creator.to_string(), ms(&g.created_at), g.position])?;
            Ok(())
        })
        .await
    }

    async fn put_group_name(&self, c: &ConversationId, name: &str, position: i64) -> StoreResult<()> {
        let (c, name) = (c.clone(), name.to_owned());
        self.write(move |t| {
            t.prepare_cached(
                "INSERT INTO groups (conversation_id, name, name_position) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation_id) DO UPDATE SET name = excluded.name, name_position = excluded.name_position
                 WHERE excluded.name_position >= groups.name_position",
            )?
            .execute(params![c.as_str(), name, position])?;
            Ok(())
        })
        .await
    }

    async fn put_group_member(&self, m: &GroupMemberRow) -> StoreResult<()> {
        let m = m.clone();
        self.write(move |t| {
            t.prepare_cached(
                "INSERT INTO group_members (conversation_id, member, role, active, position) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id, member) DO UPDATE SET
                   role = excluded.role, active = excluded.active, position = excluded.position
                 WHERE excluded.position >= group_members.position",
            )?
            .execute(params![m.conversation_id.as_str(), m.member.to_string(), m.role.as_str(), m.active, m.position])?;
            Ok(())
        })
        .await
    }

    async fn put_user_group(&self, g: &UserGroupRow) -> StoreResult<()> {
        let g = g.clone();
        self.write(move |t| {
            t.prepare_cached(
                "INSERT INTO user_groups (user_id, conversation_id, role, active, position) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, conversation_id) DO UPDATE SET
                   role = excluded.role, active = excluded.active, position = excluded.position
                 WHERE excluded.position >= user_groups.position",
            )?
            .execute(params![g.user_id.to_string(), g.conversation_id.as_str(), g.role.as_str(), g.active, g.position])?;
            Ok(())
        })
        .await
    }

    async fn put_user_group_interval(&self, user: UserId, c: &ConversationId, since: i64, until: Option<i64>) -> StoreResult<()> {
        let c = c.clone();
        self.write(move |t| {
            let merged = UNTIL_MERGE.replace("{t}", "user_group_intervals");
            t.prepare_cached(&format!(
                "INSERT INTO user_group_intervals (user_id, conversation_id, since, until) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, conversation_id, since) DO UPDATE SET until = {merged}"
            ))?
            .execute(params![user.to_string(), c.as_str(), since, until])?;
            Ok(())
        })
        .await
    }

    async fn group(&self, c: &ConversationId) -> StoreResult<Option<GroupRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT name, creator, created_at, position FROM groups WHERE conversation_id = ?1 AND creator IS NOT NULL",
                params![c.as_str()],
                |r| {
                    Ok(GroupRow {
                        conversation_id: c.clone(),
                        name: r.get(0)?,
                        creator: UserId(uuid_at(r, 1)?),
                        created_at: time(r.get(2)?)?,
                        position: r.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn group_members(&self, c: &ConversationId) -> StoreResult<Vec<GroupMemberRow>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT member, role, active, position FROM group_members WHERE conversation_id = ?1 ORDER BY member",
            )?;
            let rows = st.query_map(params![c.as_str()], |r| {
                Ok(GroupMemberRow {
                    conversation_id: c.clone(),
                    member: UserId(uuid_at(r, 0)?),
                    role: role_at(r, 1)?,
                    active: r.get(2)?,
                    position: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn group_member(&self, c: &ConversationId, user: UserId) -> StoreResult<Option<GroupMemberRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT role, active, position FROM group_members WHERE conversation_id = ?1 AND member = ?2",
                params![c.as_str(), user.to_string()],
                |r| Ok(GroupMemberRow { conversation_id: c.clone(), member: user, role: role_at(r, 0)?, active: r.get(1)?, position: r.get(2)? }),
            )
            .optional()
        })
        .await
    }

    async fn user_groups(&self, user: UserId) -> StoreResult<Vec<UserGroupRow>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT conversation_id, role, active, position FROM user_groups WHERE user_id = ?1 ORDER BY conversation_id",
            )?;
            let rows = st.query_map(params![user.to_string()], |r| {
                Ok(UserGroupRow { user_id: user, conversation_id: conv_at(r, 0)?, role: role_at(r, 1)?, active: r.get(2)?, position: r.get(3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn user_group_intervals(&self, user: UserId, c: &ConversationId) -> StoreResult<Vec<(i64, Option<i64>)>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT since, until FROM user_group_intervals WHERE user_id = ?1 AND conversation_id = ?2 ORDER BY since",
            )?;
            let rows = st.query_map(params![user.to_string(), c.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }
}

#[async_trait]
impl InsightStore for SqliteStore {
    async fn set_role(&self, user: UserId, role: &str, granted: bool) -> StoreResult<()> {
        let role = role.to_owned();
        self.write(move |t| {
            let sql = if granted {
                "INSERT OR IGNORE INTO user_roles (user_id, role) VALUES (?1, ?2)"
            } else {
                "DELETE FROM user_roles WHERE user_id = ?1 AND role = ?2"
            };
            t.prepare_cached(sql)?.execute(params![user.to_string(), role])?;
            Ok(())
        })
        .await
    }

    async fn roles(&self, user: UserId) -> StoreResult<Vec<String>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
            let rows = st.query_map(params![user.to_string()], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn put_profile(&self, p: &ProfileRow) -> StoreResult<()> {
        let p = p.clone();
        self.write(move |t| {
            // Cassandra's rule (write time = updated_at): the later update wins; of two with one
            // updated_at, each cell resolves alone, the greater value winning and a null (no
            // avatar, written as a tombstone) winning over a value.
            t.prepare_cached(
                "INSERT INTO profiles (user_id, display_name, avatar_media_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id) DO UPDATE SET
                   display_name = CASE WHEN excluded.updated_at > profiles.updated_at THEN excluded.display_name
                                       WHEN excluded.updated_at < profiles.updated_at THEN profiles.display_name
                                       ELSE MAX(profiles.display_name, excluded.display_name) END,
                   avatar_media_id = CASE WHEN excluded.updated_at > profiles.updated_at THEN excluded.avatar_media_id
                                          WHEN excluded.updated_at < profiles.updated_at THEN profiles.avatar_media_id
                                          WHEN excluded.avatar_media_id IS NULL OR profiles.avatar_media_id IS NULL THEN NULL
                                          ELSE MAX(profiles.avatar_media_id, excluded.avatar_media_id) END,
                   updated_at = MAX(profiles.updated_at, excluded.updated_at)",
            )?
            .execute(params![p.user_id.to_string(), p.display_name, p.avatar_media_id.map(|a| a.to_string()), ms(&p.updated_at)])?;
            Ok(())
        })
        .await
    }

    async fn profile(&self, user: UserId) -> StoreResult<Option<ProfileRow>> {
        self.read(move |c| {
            c.row(
                "SELECT display_name, avatar_media_id, updated_at FROM profiles WHERE user_id = ?1",
                params![user.to_string()],
                |r| {
                    Ok(ProfileRow {
                        user_id: user,
                        display_name: r.get(0)?,
                        avatar_media_id: match r.get::<_, Option<String>>(1)? {
                            Some(a) => Some(Uuid::parse_str(&a).map_err(conversion)?),
                            None => None,
                        },
                        updated_at: time(r.get(2)?)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn add_message_stat(&self, day: NaiveDate, kind: &str, scope: &str, message: MessageId) -> StoreResult<()> {
        check_message_stat(kind, scope)?;
        let (kind, scope) = (kind.to_owned(), scope.to_owned());
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO analytics_messages (day, kind, scope, message_id) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![day_text(day), kind, scope, message.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn add_active_user(&self, day: NaiveDate, user: UserId) -> StoreResult<()> {
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO analytics_active_users (day, user_id) VALUES (?1, ?2)")?
                .execute(params![day_text(day), user.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn add_profile_view(&self, viewed: UserId, day: NaiveDate, viewer: UserId, view: EventId) -> StoreResult<()> {
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO analytics_profile_views (viewed, day, viewer, view_id) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![viewed.to_string(), day_text(day), viewer.to_string(), view.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn add_topic(&self, day: NaiveDate, topic: &str, message: MessageId) -> StoreResult<()> {
        let topic = topic.to_owned();
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO analytics_topics (day, topic, message_id) VALUES (?1, ?2, ?3)")?
                .execute(params![day_text(day), topic, message.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<MessageCount>> {
        let mut rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, kind, scope, COUNT(*) FROM analytics_messages WHERE day >= ?1 AND day <= ?2 GROUP BY day, kind, scope",
                )?;
                let rows = st.query_map(params![day_text(from), day_text(to)], |r| {
                    Ok(MessageCount { day: day_at(r, 0)?, kind: r.get(1)?, scope: r.get(2)?, messages: count_at(r, 3)? })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_message_counts(&mut rows);
        Ok(rows)
    }

    async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<(NaiveDate, u64)>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT day, COUNT(*) FROM analytics_active_users WHERE day >= ?1 AND day <= ?2 GROUP BY day ORDER BY day",
            )?;
            let rows = st.query_map(params![day_text(from), day_text(to)], |r| Ok((day_at(r, 0)?, count_at(r, 1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn profile_views(&self, viewed: UserId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<ProfileViews>> {
        let rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, viewer, COUNT(*) FROM analytics_profile_views WHERE viewed = ?1 AND day >= ?2 AND day <= ?3 GROUP BY day, viewer",
                )?;
                let rows = st.query_map(params![viewed.to_string(), day_text(from), day_text(to)], |r| {
                    Ok((day_at(r, 0)?, UserId(uuid_at(r, 1)?), count_at(r, 2)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(profile_views_from(rows))
    }

    async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<TopicCount>> {
        let mut rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, topic, COUNT(*) FROM analytics_topics WHERE day >= ?1 AND day <= ?2 GROUP BY day, topic",
                )?;
                let rows = st.query_map(params![day_text(from), day_text(to)], |r| {
                    Ok(TopicCount { day: day_at(r, 0)?, topic: r.get(1)?, messages: count_at(r, 2)? })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_topic_counts(&mut rows);
        Ok(rows)
    }

    async fn receipts_of_user(&self, user: UserId, from: DateTime<Utc>, to: DateTime<Utc>) -> StoreResult<Vec<ReceiptRow>> {
        let mut rows = self
            .read(move |c| {
                // As on Cassandra: a receipt is never earlier than its message, so the key's
                // message-id order bounds the scan and `at` is a filter. No index on `at`: it
                // cost every receipt a second B-tree page (two per message), for a read only
                // auditors make.
                let mut st = c.prepare_cached(
                    "SELECT message_id, status, device_id, at, conversation_id FROM receipts_by_user
                     WHERE recipient = ?1 AND message_id <= ?2 AND at >= ?3 AND at < ?4",
                )?;
                let upto = crate::max_v7(to.timestamp_millis()).to_string();
                let rows = st.query_map(params![user.to_string(), upto, ceil_ms(&from), ceil_ms(&to)], |r| {
                    Ok(ReceiptRow {
                        message_id: MessageId(uuid_at(r, 0)?),
                        recipient: user,
                        status: status_at(r, 1)?,
                        device_id: r.get(2)?,
                        at: time(r.get(3)?)?,
                        conversation_id: conv_at(r, 4)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_receipts_of_user(&mut rows);
        Ok(rows)
    }
}

#[async_trait]
impl TableAdmin for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        self.command(|t| t.execute_batch(COMMAND_SCHEMA)).await?;
        self.tables.write(Lane::Background, |t| t.execute_batch(SCHEMA)).await
    }

    async fn truncate_projections(&self) -> StoreResult<()> {
        self.tables.write(Lane::Background, |t| {
            for table in PROJECTION_TABLES {
                t.execute(&format!("DELETE FROM {table}"), [])?;
            }
            Ok(())
        })
        .await
    }

    async fn checksums(&self) -> StoreResult<BTreeMap<String, TableChecksum>> {
        self.read(|c| {
            let mut out = BTreeMap::new();
            for table in PROJECTION_TABLES {
                let filter = if *table == "pending_deliveries" { " WHERE removed = 0" } else { "" };
                let mut st = c.prepare(&format!("SELECT * FROM {table}{filter}"))?;
                let n = st.column_count();
                let mut rows: Vec<String> = st
                    .query_map([], |r| {
                        let mut vals = Vec::with_capacity(n);
                        for i in 0..n {
                            vals.push(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                                rusqlite::types::ValueRef::Integer(v) => serde_json::json!(v),
                                rusqlite::types::ValueRef::Real(v) => serde_json::json!(v),
                                rusqlite::types::ValueRef::Text(t) => serde_json::json!(String::from_utf8_lossy(t)),
                                rusqlite::types::ValueRef::Blob(b) => serde_json::json!(hex::encode(b)),
                            });
                        }
                        Ok(serde_json::Value::Array(vals).to_string())
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                rows.sort_unstable();
                let mut h = Sha256::new();
                for r in &rows {
                    h.update(r.as_bytes());
                    h.update(b"\n");
                }
                out.insert((*table).to_owned(), TableChecksum { rows: rows.len() as u64, sha256: hex::encode(h.finalize()) });
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> bool {
        self.read(|c| c.row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok()
            && self.command_read(|c| c.row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok()
    }
}

#[async_trait]
impl Durable for SqliteStore {
    async fn sync(&self) -> StoreResult<()> {
        // A synced commit of one small row: syncing the WAL syncs every commit before it.
        self.tables
            .write(Lane::Sync, |t| {
                t.exec("INSERT INTO sync_marks (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1", [])?;
                Ok(())
            })
            .await
    }

    fn write_mark(&self) -> u64 {
        if self.pipelined { self.tables.progress.begun.load(Ordering::SeqCst) } else { 0 }
    }

    async fn settle(&self, mark: u64) -> StoreResult<()> {
        if !self.pipelined {
            return Ok(());
        }
        let p = self.tables.progress.clone();
        // A barrier behind every write queued so far: the transaction it runs in holds the last
        // of them (or a later one does not matter: it is the last to wait for).
        let progress = p.clone();
        let last = self.tables.run(Lane::Background, Answer::Ran, false, move |_| Ok(progress.begun.load(Ordering::SeqCst))).await?;
        p.settled.subscribe().wait_for(|s| *s >= last).await.map_err(|_| unavailable("writer stopped"))?;
        match p.last_failed.load(Ordering::SeqCst) {
            f if f != 0 && f >= mark => Err(unavailable(format!("transaction {f} did not commit; its writes are redone"))),
            _ => Ok(()),
        }
    }
}

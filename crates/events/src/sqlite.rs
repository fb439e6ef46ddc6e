//! The one SQLite engine of the embedded mode: a database file with a single writer thread that
//! group-commits, and a pool of read connections. The embedded tables (`commands.db`,
//! `tables.db`) run on it (the event log did too until its layout 4, segment files of its own:
//! `crate::embedded`), with one failure rule:
//!
//! - A job runs inside the writer's current transaction, in its own savepoint. If the job fails,
//!   its savepoint is rolled back (nothing of it stays, and the writer state it changed is put
//!   back) and its caller gets [`EngineError::Refused`]; the other jobs of the transaction go on.
//! - If the commit fails, the whole transaction is rolled back, the writer state is put back to
//!   what it was before the transaction, and every job of it gets [`EngineError::NotCommitted`]
//!   (nothing of it is durable; retrying is safe).
//! - A job is answered only after the transaction holding it committed: on disk with
//!   [`Durability::Full`]; in the WAL with [`Durability::Relaxed`], where a [`Lane::Sync`] job's
//!   transaction is synced, and with it every commit before it.
//!
//! Group commit: every job waiting when a transaction begins goes into it (urgent ones first), up
//! to [`Options::jobs_per_commit`]; with [`Options::window`], a transaction also stays open while
//! more jobs keep arriving, up to that long.
//!
//! The writer owns a state `S` that jobs may change (the log's offset counters): it is cloned
//! before each job and before each transaction, so that a refused job or a failed commit leaves
//! it as it was. `on_commit` sees it after every successful commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Transaction};
use tokio::sync::oneshot;
use tracing::{debug, error};

/// Why a job did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The job's own statements failed (a constraint, a bad value): nothing of it was written.
    /// Retrying the same job fails the same way.
    #[error("refused: {0}")]
    Refused(String),
    /// The transaction holding the job did not commit: nothing of it is durable. Retryable.
    #[error("not committed: {0}")]
    NotCommitted(String),
    /// The writer's queue is full (see [`Engine::try_write`]): shed load.
    #[error("writer queue full")]
    QueueFull,
    /// The writer thread is gone.
    #[error("writer stopped")]
    Stopped,
    /// A commit failed after its jobs were answered ([`Answer::Ran`]): writes its callers were
    /// told about are gone. Permanent for this engine: its users must be restarted, and handle
    /// again what those writes came from (a worker stops; the process exits and its workers
    /// resume from their stored offsets, as after a crash).
    #[error("writes lost: {0}")]
    Lost(String),
}

/// When a job's caller gets its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Once the transaction holding it committed (every job; [`Lane::Sync`] jobs always).
    Committed,
    /// As soon as it ran inside the open transaction, before the commit: for writers that make
    /// their writes durable with a [`Lane::Sync`] job before they count on them (projection
    /// workers). Readers of a [`Options::shared_cache`] engine see the writes at once.
    Ran,
}

/// How durable a committed transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is on disk before its jobs are answered.
    Full,
    /// `synchronous=NORMAL`: a commit survives a killed process; a power cut may take the last
    /// ones back (the file stays consistent). [`Lane::Sync`] jobs make everything durable.
    Relaxed,
}

/// Which queue of the writer a job goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Someone waits for it (a gateway command): ahead of the others.
    Urgent,
    /// Throughput matters, not the latency of one.
    Background,
    /// A background job whose transaction must be on disk, with every one before it, when it is
    /// answered (on [`Durability::Full`] every job is).
    Sync,
}

/// Settings of one engine.
#[derive(Clone, Debug)]
pub struct Options {
    /// The writer thread's name (`chat-<name>-writer`) and the name in logs.
    pub name: &'static str,
    pub durability: Durability,
    /// Page cache of the writer connection, in KiB (SQLite's default is 2,048).
    pub cache_kib: u32,
    /// Jobs waiting for the writer, at most (beyond, [`Engine::write`] waits and
    /// [`Engine::try_write`] fails).
    pub queue: usize,
    /// Jobs taken into a transaction at once.
    pub jobs_per_commit: usize,
    /// How long a transaction stays open while jobs keep arriving (none: commit at once).
    pub window: Option<Duration>,
    /// Read connections kept and reads running at once, at most.
    pub readers: usize,
    /// When background jobs are answered (urgent and sync jobs always after their commit).
    pub answer: Answer,
    /// The writer and the readers share one page cache, and readers read uncommitted rows
    /// (`read_uncommitted`): they see a job's writes as soon as it ran, however long the
    /// transaction stays open, and never re-read pages from the file after a commit.
    pub shared_cache: bool,
    /// WAL pages after which a commit checkpoints (SQLite's default is 1,000): a page written by
    /// many commits is written to the database file once per checkpoint.
    pub checkpoint_pages: u32,
}

impl Options {
    pub fn new(name: &'static str, durability: Durability) -> Self {
        Options {
            name,
            durability,
            cache_kib: 2_048,
            queue: 10_000,
            jobs_per_commit: 512,
            window: None,
            readers: 8,
            answer: Answer::Committed,
            shared_cache: false,
            checkpoint_pages: 1_000,
        }
    }
}

/// Opens a SQLite database the way every embedded back-end does: a writer in WAL mode
/// (`synchronous=FULL` unless told otherwise), or a read-only connection; both wait up to 10 s for
/// a lock instead of failing, and cache 256 prepared statements (the writers run more than
/// rusqlite's default 16, and re-parsing SQL cost a third of a writer's CPU).
pub fn open_sqlite(path: &Path, write: bool) -> rusqlite::Result<Connection> {
    open_with(path, write, false)
}

fn open_with(path: &Path, write: bool, shared: bool) -> rusqlite::Result<Connection> {
    let mut flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    if shared {
        flags |= OpenFlags::SQLITE_OPEN_SHARED_CACHE;
    }
    let c = Connection::open_with_flags(path, flags)?;
    if shared && !write {
        c.pragma_update(None, "read_uncommitted", true)?;
    }
    c.busy_timeout(Duration::from_secs(10))?;
    c.set_prepared_statement_cache_capacity(256);
    if write {
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        // Statement journals (a savepoint per job keeps one) in memory: on disk they were a
        // deleted temp file that took as many bytes as the WAL itself; a crash needs none of
        // them (an open transaction is rolled back from the WAL).
        c.pragma_update(None, "temp_store", "MEMORY")?;
    }
    Ok(c)
}

type Reply = Box<dyn FnOnce(Result<(), EngineError>) + Send>;

/// Whether an engine's writes are going through, shared by the writer and the engine's users
/// (readiness: a node whose writes fail is not ready).
#[derive(Default)]
struct Health {
    /// The last transaction failed to commit. Cleared by the next commit.
    failing: AtomicBool,
    /// The writer lost writes it had answered ([`EngineError::Lost`]): set until [`Engine::recover`].
    lost: AtomicBool,
    /// [`Engine::recover`] asked the writer to take jobs again.
    recover: AtomicBool,
}

/// Whether a statement failed because of the machine (disk full, I/O, locks, memory) rather than
/// because of what it writes: such a job is retryable ([`EngineError::NotCommitted`]), never
/// refused for good (a worker dead-letters what the store refuses).
fn transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DiskFull | SystemIoFailure | DatabaseBusy | DatabaseLocked | OutOfMemory | CannotOpen | FileLockingProtocolFailed | ReadOnly)
    )
}

/// What a caller hears when its job was dropped without running (no transaction could begin, or
/// the writer stopped): it did not commit, and retrying is safe.
const NOT_RUN: EngineError = EngineError::Stopped;
/// A job: run in the open transaction (`Ok`), or refused because the engine lost writes (`Err`).
/// It answers its caller itself, at once or through the `Answer` it leaves for after the commit.
type Job<S> = Box<dyn FnOnce(Result<(&Transaction<'_>, &mut S), &str>) -> Option<Reply> + Send>;

/// A database file with its writer thread and read connections.
pub struct Engine<S> {
    path: PathBuf,
    writer: std_mpsc::SyncSender<(Lane, Job<S>)>,
    readers: Mutex<Vec<Connection>>,
    read_slots: Arc<tokio::sync::Semaphore>,
    max_readers: usize,
    shared_cache: bool,
    /// Background jobs are answered as soon as they ran ([`Answer::Ran`]).
    early_background: bool,
    health: Arc<Health>,
}

impl<S: Clone + Send + 'static> Engine<S> {
    /// Starts the writer thread on `conn` (opened with [`open_sqlite`], schema in place).
    pub fn start(
        path: PathBuf,
        conn: Connection,
        state: S,
        options: Options,
        on_commit: impl FnMut(&S) + Send + 'static,
    ) -> rusqlite::Result<Arc<Self>> {
        if options.durability == Durability::Relaxed {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        conn.pragma_update(None, "cache_size", -i64::from(options.cache_kib))?;
        conn.pragma_update(None, "wal_autocheckpoint", options.checkpoint_pages)?;
        // The shared cache is the writer's: it has to be opened with it (readers open theirs
        // against the same file, in this process).
        let conn = if options.shared_cache {
            drop(conn);
            let c = open_with(&path, true, true)?;
            if options.durability == Durability::Relaxed {
                c.pragma_update(None, "synchronous", "NORMAL")?;
            }
            c.pragma_update(None, "cache_size", -i64::from(options.cache_kib))?;
            c.pragma_update(None, "wal_autocheckpoint", options.checkpoint_pages)?;
            c
        } else {
            conn
        };
        let (tx, rx) = std_mpsc::sync_channel::<(Lane, Job<S>)>(options.queue.max(1));
        let (readers, name, shared_cache, early_background) = (options.readers.max(1), options.name, options.shared_cache, options.answer == Answer::Ran);
        let health = Arc::new(Health::default());
        let writer_health = health.clone();
        std::thread::Builder::new()
            .name(format!("chat-{name}-writer"))
            .spawn(move || Writer { conn, state, options, on_commit, queue: Queue::default(), lost: None, health: writer_health }.run(rx))
            .map_err(|e| rusqlite::Error::InvalidParameterName(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(Engine {
            path,
            writer: tx,
            readers: Mutex::new(Vec::new()),
            read_slots: Arc::new(tokio::sync::Semaphore::new(readers)),
            max_readers: readers,
            shared_cache,
            early_background,
            health,
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are going through: the last transaction committed and no answered write
    /// was lost since the last [`Engine::recover`].
    pub fn healthy(&self) -> bool {
        !self.health.failing.load(Ordering::Relaxed) && !self.health.lost.load(Ordering::Relaxed)
    }

    /// [`Engine::healthy`], and when it is not, whether a write goes through now: a tiny write
    /// (one row of `engine_probe`) through the urgent lane, which clears the failure when it
    /// commits. Without it an idle engine would stay unhealthy after the disk has room again
    /// (nothing would commit), and a node that is not ready gets no traffic to commit.
    pub async fn probe(&self) -> bool {
        if self.healthy() {
            return true;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let wrote = self
            .write(Lane::Urgent, move |t, _| {
                t.execute_batch("CREATE TABLE IF NOT EXISTS engine_probe (id INTEGER PRIMARY KEY, at INTEGER NOT NULL)")?;
                t.prepare_cached("INSERT OR REPLACE INTO engine_probe (id, at) VALUES (1, ?1)")?.execute([now])?;
                Ok(())
            })
            .await;
        wrote.is_ok() && self.healthy()
    }

    /// Whether the engine lost answered writes and refuses every job until [`Engine::recover`].
    pub fn lost(&self) -> bool {
        self.health.lost.load(Ordering::Relaxed)
    }

    /// Takes jobs again after lost writes. Call it only once every writer that counted on the
    /// lost writes has gone back to what is durable (a worker rewound to its stored offsets), as
    /// a restart would.
    pub fn recover(&self) {
        self.health.recover.store(true, Ordering::Relaxed);
    }

    /// Whether a job of this lane is answered as soon as it ran.
    fn early(&self, lane: Lane) -> bool {
        self.early_background && lane == Lane::Background
    }

    fn job<R: Send + 'static>(
        early: bool,
        f: impl FnOnce(&Transaction<'_>, &mut S) -> rusqlite::Result<R> + Send + 'static,
    ) -> (Job<S>, oneshot::Receiver<Result<R, EngineError>>) {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |run: Result<(&Transaction<'_>, &mut S), &str>| {
            let (t, state) = match run {
                Ok(ts) => ts,
                Err(lost) => {
                    let _ = tx.send(Err(EngineError::Lost(lost.to_owned())));
                    return None;
                }
            };
            // A job that failed can have taken the whole transaction with it (SQLite rolls it
            // all back on some I/O, full-disk or out-of-memory errors). The jobs after it must not
            // run outside it: each `SAVEPOINT` would begin a transaction of its own, which its
            // `RELEASE` commits, while the writer then fails the batch and puts its state back
            // (the log would hand out the same offsets again).
            if t.is_autocommit() {
                let _ = tx.send(Err(EngineError::NotCommitted("the transaction was rolled back by an earlier failure".into())));
                return None;
            }
            // A savepoint per job: a failing job leaves nothing behind and takes no other job
            // down. (Both statements come from the statement cache.)
            let before = state.clone();
            let result = (|| {
                t.prepare_cached("SAVEPOINT job")?.execute([])?;
                match f(t, state) {
                    Ok(r) => {
                        t.prepare_cached("RELEASE job")?.execute([])?;
                        Ok(r)
                    }
                    Err(e) => {
                        let _rolled_back = t.execute_batch("ROLLBACK TO job; RELEASE job");
                        Err(e)
                    }
                }
            })();
            match result {
                Ok(r) if early => {
                    let _ = tx.send(Ok(r));
                    None
                }
                Ok(r) => Some(Box::new(move |committed: Result<(), EngineError>| {
                    let _ = tx.send(committed.map(|()| r));
                }) as Reply),
                Err(e) => {
                    *state = before;
                    let err = if transient(&e) { EngineError::NotCommitted(e.to_string()) } else { EngineError::Refused(e.to_string()) };
                    let _ = tx.send(Err(err));
                    None
                }
            }
        });
        (job, rx)
    }

    /// Runs `f` in one of the writer's next transactions (with the writer's state); answers once
    /// that transaction committed. Waits for room in the writer's queue.
    pub async fn write<R: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce(&Transaction<'_>, &mut S) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, EngineError> {
        let (job, rx) = Self::job(self.early(lane), f);
        match self.writer.try_send((lane, job)) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(item)) => {
                let writer = self.writer.clone();
                tokio::task::spawn_blocking(move || writer.send(item))
                    .await
                    .map_err(|_| EngineError::Stopped)?
                    .map_err(|_| EngineError::Stopped)?;
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => return Err(EngineError::Stopped),
        }
        rx.await.map_err(|_| NOT_RUN)?
    }

    /// As [`Engine::write`], but fails at once with [`EngineError::QueueFull`] when the writer's
    /// queue is full (callers that shed load instead of waiting).
    pub async fn try_write<R: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce(&Transaction<'_>, &mut S) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, EngineError> {
        let (job, rx) = Self::job(self.early(lane), f);
        self.writer.try_send((lane, job)).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => EngineError::QueueFull,
            std_mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
        rx.await.map_err(|_| NOT_RUN)?
    }

    /// Runs `f` on a read connection of the pool (on the blocking pool: reads do I/O).
    pub async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, EngineError> {
        let engine = self.clone();
        let slot = engine.read_slots.clone().acquire_owned().await.map_err(|_| EngineError::Stopped)?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let pooled = engine.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_with(&engine.path, false, engine.shared_cache).map_err(|e| EngineError::NotCommitted(format!("opening a reader: {e}")))?,
            };
            let out = f(&conn).map_err(|e| EngineError::Refused(e.to_string()));
            let mut pool = engine.readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < engine.max_readers {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|_| EngineError::Stopped)?
    }
}

/// The jobs the writer took off its channel: urgent ones, then the others in order (with whether
/// each is a sync job).
struct Queue<S> {
    urgent: Vec<Job<S>>,
    background: std::collections::VecDeque<(bool, Job<S>)>,
}

impl<S> Default for Queue<S> {
    fn default() -> Self {
        Queue { urgent: Vec::new(), background: std::collections::VecDeque::new() }
    }
}

impl<S> Queue<S> {
    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.background.is_empty()
    }

    fn push(&mut self, lane: Lane, job: Job<S>) {
        match lane {
            Lane::Urgent => self.urgent.push(job),
            Lane::Background => self.background.push_back((false, job)),
            Lane::Sync => self.background.push_back((true, job)),
        }
    }

    /// Takes what waits on the channel, up to a bound.
    fn fill(&mut self, rx: &std_mpsc::Receiver<(Lane, Job<S>)>, bound: usize) {
        while self.urgent.len() + self.background.len() < bound {
            match rx.try_recv() {
                Ok((lane, job)) => self.push(lane, job),
                Err(_) => break,
            }
        }
    }

    /// Whether the next transaction holds a sync job (no urgent job goes ahead of it).
    fn sync_first(&self, max: usize) -> bool {
        let take = self.background.len().min(max.saturating_sub(self.urgent.len()));
        self.background.iter().take(take).any(|(s, _)| *s)
    }

    /// The next jobs, at most `max`: every urgent one, then background ones in order (stopping
    /// before a sync job unless `sync_ok`).
    fn next(&mut self, max: usize, sync_ok: bool) -> Vec<Job<S>> {
        let mut jobs: Vec<Job<S>> = self.urgent.drain(..).collect();
        while jobs.len() < max {
            match self.background.front() {
                Some((true, _)) if !sync_ok => break,
                Some(_) => {
                    if let Some((_, job)) = self.background.pop_front() {
                        jobs.push(job);
                    }
                }
                None => break,
            }
        }
        jobs
    }
}

struct Writer<S, F> {
    conn: Connection,
    state: S,
    options: Options,
    on_commit: F,
    queue: Queue<S>,
    /// Set when a commit failed after its jobs were answered ([`Answer::Ran`]): every later job
    /// fails with [`EngineError::Lost`].
    lost: Option<String>,
    health: Arc<Health>,
}

impl<S: Clone, F: FnMut(&S)> Writer<S, F> {
    fn run(mut self, rx: std_mpsc::Receiver<(Lane, Job<S>)>) {
        let name = self.options.name;
        let max = self.options.jobs_per_commit.max(1);
        let (mut commits, mut jobs_done, mut since) = (0u64, 0u64, Instant::now());
        let (mut in_jobs, mut in_commit, mut longest) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        loop {
            if since.elapsed() >= Duration::from_secs(10) {
                debug!(db = name, commits, jobs = jobs_done, per_commit = jobs_done as f64 / commits.max(1) as f64, jobs_ms = in_jobs.as_millis() as u64, commit_ms = in_commit.as_millis() as u64, longest_commit_ms = longest.as_millis() as u64, "writer in the last 10 s");
                (commits, jobs_done, since) = (0, 0, Instant::now());
                (in_jobs, in_commit, longest) = Default::default();
            }
            if self.queue.is_empty() {
                match rx.recv() {
                    Ok((lane, job)) => self.queue.push(lane, job),
                    Err(_) => return,
                }
            }
            self.queue.fill(&rx, 4 * max);
            let relaxed = self.options.durability == Durability::Relaxed;
            let sync = relaxed && self.queue.sync_first(max);
            let jobs = self.queue.next(max, true);
            if sync {
                if let Err(e) = self.conn.pragma_update(None, "synchronous", "FULL") {
                    error!(db = name, error = %e, "cannot switch to synchronous commits");
                    // Dropped jobs answer their callers "not committed" (their channel closes).
                    drop(jobs);
                    continue;
                }
            }
            let before = self.state.clone();
            let began = Instant::now();
            let tx = match self.conn.transaction() {
                Ok(tx) => tx,
                Err(e) => {
                    error!(db = name, error = %e, "cannot begin a transaction");
                    drop(jobs);
                    continue;
                }
            };
            commits += 1;
            let mut answers: Vec<Reply> = Vec::with_capacity(jobs.len());
            let mut ran = jobs.len();
            if self.lost.is_some() && self.health.recover.swap(false, Ordering::Relaxed) {
                tracing::warn!(db = name, "taking jobs again after lost writes (their writers went back to what is durable)");
                self.lost = None;
                self.health.lost.store(false, Ordering::Relaxed);
            }
            if let Some(lost) = &self.lost {
                for job in jobs {
                    job(Err(lost));
                }
                continue;
            }
            answers.extend(jobs.into_iter().filter_map(|job| job(Ok((&tx, &mut self.state)))));
            if let Some(window) = self.options.window.filter(|_| !sync) {
                // Answered as they run, background jobs wait for no commit: the transaction stays
                // open through idle moments too, until the window ends or someone waits for the
                // commit (an urgent job, or a sync job next in line).
                let idle_wait = self.options.answer == Answer::Ran;
                while ran < 16 * max && (!idle_wait || answers.is_empty()) {
                    let Some(left) = window.checked_sub(began.elapsed()).filter(|l| !l.is_zero()) else { break };
                    self.queue.fill(&rx, 4 * max);
                    if idle_wait && self.queue.is_empty() {
                        match rx.recv_timeout(left) {
                            Ok((lane, job)) => self.queue.push(lane, job),
                            Err(_) => break,
                        }
                    }
                    // A sync job begins a transaction of its own (it is synced with all before it).
                    let more = self.queue.next(max, false);
                    if more.is_empty() {
                        break;
                    }
                    ran += more.len();
                    answers.extend(more.into_iter().filter_map(|job| job(Ok((&tx, &mut self.state)))));
                }
            }
            jobs_done += ran as u64;
            in_jobs += began.elapsed();
            let committing = Instant::now();
            let committed = tx.commit();
            in_commit += committing.elapsed();
            longest = longest.max(committing.elapsed());
            if sync {
                if let Err(e) = self.conn.pragma_update(None, "synchronous", "NORMAL") {
                    error!(db = name, error = %e, "cannot switch back to unsynced commits");
                }
            }
            match committed {
                Ok(()) => {
                    self.health.failing.store(false, Ordering::Relaxed);
                    (self.on_commit)(&self.state);
                    for a in answers {
                        a(Ok(()));
                    }
                }
                Err(e) => {
                    error!(db = name, error = %e, jobs = answers.len(), "commit failed; the transaction is rolled back and its jobs fail");
                    self.health.failing.store(true, Ordering::Relaxed);
                    self.state = before;
                    if self.options.answer == Answer::Ran {
                        // Jobs answered before the commit are gone with it: nothing this engine
                        // writes from now on can be trusted to build on them.
                        error!(db = name, "writes answered before this commit are lost: refusing every further job until their writers went back to what is durable");
                        self.lost = Some(e.to_string());
                        self.health.lost.store(true, Ordering::Relaxed);
                    }
                    fail(answers, &e.to_string());
                }
            }
        }
    }
}

fn fail(answers: Vec<Reply>, reason: &str) {
    for a in answers {
        a(Err(EngineError::NotCommitted(reason.to_owned())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(dir: &Path) -> Arc<Engine<u64>> {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("t.db");
        let conn = open_sqlite(&path, true).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").unwrap();
        Engine::start(path, conn, 0u64, Options::new("test", Durability::Full), |_| {}).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_job_leaves_nothing_and_takes_no_other_job_down() {
        let dir = std::env::temp_dir().join(format!("chat-engine-{}", uuid::Uuid::new_v4()));
        let e = engine(&dir);
        let (a, b, c) = tokio::join!(
            e.write(Lane::Background, |t, n| {
                *n += 1;
                t.execute("INSERT INTO t (k, v) VALUES (1, 'a')", [])
            }),
            e.write(Lane::Background, |t, n| {
                *n += 10;
                t.execute("INSERT INTO t (k, v) VALUES (2, 'b')", [])?;
                // NOT NULL: this job fails after a first insert and a state change.
                t.execute("INSERT INTO t (k, v) VALUES (3, NULL)", [])
            }),
            e.write(Lane::Urgent, |t, n| {
                *n += 100;
                t.execute("INSERT INTO t (k, v) VALUES (4, 'd')", [])
            }),
        );
        assert!(a.is_ok() && c.is_ok());
        assert!(matches!(b, Err(EngineError::Refused(_))), "{b:?}");
        let keys: Vec<i64> = e
            .read(|c| c.prepare("SELECT k FROM t ORDER BY k")?.query_map([], |r| r.get(0))?.collect())
            .await
            .unwrap();
        assert_eq!(keys, vec![1, 4], "the refused job's first insert was rolled back with it");
        let state = e.write(Lane::Background, |_, n| Ok(*n)).await.unwrap();
        assert_eq!(state, 101, "the refused job's state change was put back");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job whose failure rolled back the whole transaction (here it runs `ROLLBACK` itself,
    /// as SQLite does on some I/O errors) fails its batch: the jobs after it do not run on their
    /// own, so no job is answered "failed" with its writes on disk, and the state is put back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_rolled_back_under_its_jobs_fails_them_all() {
        let dir = std::env::temp_dir().join(format!("chat-engine-{}", uuid::Uuid::new_v4()));
        let e = engine(&dir);
        // Hold the writer so that the three jobs below are queued and taken in one transaction.
        let busy = {
            let e = e.clone();
            tokio::spawn(async move {
                e.write(Lane::Urgent, |_, _| {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (a, b, c) = tokio::join!(
            e.write(Lane::Urgent, |t, n| {
                *n += 1;
                t.execute("INSERT INTO t (k, v) VALUES (1, 'a')", [])
            }),
            e.write(Lane::Urgent, |t, _| {
                t.execute_batch("ROLLBACK")?;
                Err::<(), _>(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR), Some("disk I/O error".into())))
            }),
            e.write(Lane::Urgent, |t, n| {
                *n += 100;
                t.execute("INSERT INTO t (k, v) VALUES (3, 'c')", [])
            }),
        );
        busy.await.unwrap().unwrap();
        let keys: Vec<i64> = e
            .read(|c| c.prepare("SELECT k FROM t ORDER BY k")?.query_map([], |r| r.get(0))?.collect())
            .await
            .unwrap();
        assert!(b.is_err());
        assert_eq!((a.is_ok(), c.is_ok()), (keys.contains(&1), keys.contains(&3)), "answers {a:?} {c:?} against rows {keys:?}");
        assert!(keys.is_empty(), "the three jobs shared one transaction: {keys:?}");
        let state = e.write(Lane::Background, |_, n| Ok(*n)).await.unwrap();
        assert_eq!(state, 0, "the batch's state changes were put back");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A full disk (SQLite's `max_page_count` stands in for it) is not the job's fault: the
    /// job is retryable, never refused for good (a worker would dead-letter a refused record).
    /// Failed commits and recovery are tested end to end (`disk_full_recovers`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_is_retryable_not_refused() {
        let dir = std::env::temp_dir().join(format!("chat-engine-{}", uuid::Uuid::new_v4()));
        let e = engine(&dir);
        assert!(e.probe().await);
        let pages: i64 = e.write(Lane::Urgent, |t, _| t.query_row("PRAGMA page_count", [], |r| r.get(0))).await.unwrap();
        let full = e
            .write(Lane::Urgent, move |t, _| {
                t.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
                t.execute("INSERT INTO t (k, v) VALUES (1, ?1)", [&"x".repeat(100_000)])
            })
            .await;
        assert!(matches!(full, Err(EngineError::NotCommitted(_))), "{full:?}");
        // Room again: the next write commits.
        e.write(Lane::Urgent, |t, _| t.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))).await.unwrap();
        assert!(e.probe().await && e.healthy());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answered_when_ran_readers_see_it_before_the_commit_and_sync_commits_it() {
        let dir = std::env::temp_dir().join(format!("chat-engine-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let conn = open_sqlite(&path, true).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").unwrap();
        let mut o = Options::new("test", Durability::Relaxed);
        // A transaction stays open for a minute unless a sync job ends it.
        (o.answer, o.shared_cache, o.window) = (Answer::Ran, true, Some(Duration::from_secs(60)));
        let e: Arc<Engine<()>> = Engine::start(path.clone(), conn, (), o, |_| {}).unwrap();
        let count = |c: &Connection| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0));
        let answered = tokio::time::timeout(Duration::from_secs(5), e.write(Lane::Background, |t, _| t.execute("INSERT INTO t (k, v) VALUES (1, 'a')", [])))
            .await
            .expect("a background job is answered when it ran, not after the window");
        assert!(answered.is_ok(), "{answered:?}");
        assert_eq!(e.read(count).await.unwrap(), 1, "the engine's readers see the row at once");
        // Another process (a connection outside the shared cache) sees only what committed.
        let outside = open_sqlite(&path, false).unwrap();
        assert_eq!(count(&outside).unwrap(), 0, "not committed yet");
        tokio::time::timeout(Duration::from_secs(5), e.write(Lane::Sync, |_, _| Ok(()))).await.expect("sync ends the window").unwrap();
        assert_eq!(count(&outside).unwrap(), 1, "committed by the sync job");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_try_write_at_once() {
        let dir = std::env::temp_dir().join(format!("chat-engine-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let conn = open_sqlite(&path, true).unwrap();
        let mut o = Options::new("test", Durability::Full);
        o.queue = 1;
        let e: Arc<Engine<()>> = Engine::start(path, conn, (), o, |_| {}).unwrap();
        // Hold the writer busy, then fill its one slot.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let e = e.clone();
            async move {
                e.write(Lane::Background, move |_, _| {
                    let _ = wait.recv_timeout(Duration::from_secs(5));
                    Ok(())
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let queued = tokio::spawn({
            let e = e.clone();
            async move { e.try_write(Lane::Background, |_, _| Ok(())).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(e.try_write(Lane::Background, |_, _| Ok(())).await, Err(EngineError::QueueFull)));
        go.send(()).unwrap();
        assert!(busy.await.unwrap().is_ok() && queued.await.unwrap().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

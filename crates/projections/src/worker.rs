//! The consume loop shared by every stage: poll a batch, split it by partition, handle the
//! partitions concurrently (each strictly in order), retry what failed with back-off, and store
//! each partition's offset once its records are done and their writes durable ([`Handler::sync`],
//! at most every [`Handler::sync_every`], so that a store with unsynced commits syncs once for many
//! batches). Never stores an offset past a failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_events::{EventLog, LogConsumer, Record, Topics};
use tokio::sync::watch;
use tracing::{debug, warn};

/// What a handler did with a slice: every record is done, but these (index in the slice, reason)
/// failed for good (undecodable, refused by the store): the worker puts them on the dead-letter
/// topic, counts them, and moves on.
#[derive(Debug, Default)]
pub struct Handled {
    pub dead: Vec<(usize, String)>,
}

/// A failure that a later retry may fix (store or log unavailable): the worker backs off and
/// hands the records from `done` on to the handler again, without storing an offset past them.
/// A `fatal` one (writes answered earlier are gone) stops the worker: its process exits, and
/// whoever handles the partitions next starts again from the stored offsets.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct HandlerError {
    /// How many leading records of the slice were fully handled before the failure.
    pub done: usize,
    pub reason: String,
    /// Records before `done` that failed for good (dead-lettered before `done` counts).
    pub dead: Vec<(usize, String)>,
    pub fatal: bool,
}

impl HandlerError {
    /// Retry from record `done`.
    pub fn retry(done: usize, reason: impl std::fmt::Display) -> Self {
        HandlerError { done, reason: reason.to_string(), dead: Vec::new(), fatal: false }
    }

    /// Stop the worker.
    pub fn fatal(reason: impl std::fmt::Display) -> Self {
        HandlerError { done: 0, reason: reason.to_string(), dead: Vec::new(), fatal: true }
    }

    /// Retryable from `done`, or fatal, as the store error says.
    pub fn of_store(done: usize, e: chat_store::StoreError) -> Self {
        match e {
            chat_store::StoreError::Lost(_) => Self::fatal(e),
            _ => Self::retry(done, e),
        }
    }

    /// With the records before `done` that failed for good.
    pub fn with_dead(mut self, dead: Vec<(usize, String)>) -> Self {
        self.dead.extend(dead.into_iter().filter(|(i, _)| *i < self.done));
        self
    }
}

/// What a stage does with the records of one partition.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Handles records of one partition in offset order.
    async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError>;

    /// Makes every write of the records handled so far durable (see `chat_store::Durable`).
    async fn sync(&self) -> Result<(), HandlerError>;

    /// How often, at most, to sync and then store offsets (see `chat_store::Durable::sync_every`).
    fn sync_every(&self) -> Duration {
        SYNC_EVERY
    }
}

/// Where records that failed for good go: the dead-letter topic, with the reason.
#[derive(Clone)]
pub struct DeadLetters {
    pub log: Arc<dyn EventLog>,
    pub topics: Topics,
}

/// A stage's name and counters.
pub type Stage = (String, Arc<WorkerStats>);

/// Counters a worker exposes.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
    /// Records that failed for good and went to the dead-letter topic.
    pub dead_letters: AtomicU64,
}

impl WorkerStats {
    /// The counters of some stages in Prometheus' text format, labelled by stage.
    pub fn render(stages: &[Stage]) -> String {
        let mut out = String::new();
        type Field = fn(&WorkerStats) -> &AtomicU64;
        let metrics: [(&str, &str, Field); 4] = [
            ("records_total", "records handled", |s| &s.records),
            ("batches_total", "batches polled", |s| &s.batches),
            ("retries_total", "slices handled again after a retryable failure", |s| &s.retries),
            ("dead_letters_total", "records that failed for good and were dead-lettered", |s| &s.dead_letters),
        ];
        for (name, help, field) in metrics {
            out.push_str(&format!("# HELP chat_worker_{name} {help}\n# TYPE chat_worker_{name} counter\n"));
            for (stage, stats) in stages {
                out.push_str(&format!("chat_worker_{name}{{stage=\"{stage}\"}} {}\n", field(stats).load(Ordering::Relaxed)));
            }
        }
        out
    }
}

const MAX_BATCH: usize = 1000;

/// How often, at most, handled records' writes are synced and their offsets stored, unless the
/// handler says otherwise ([`Handler::sync_every`]).
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// Offsets of handled records whose writes are not known to be durable yet.
struct Unsynced {
    offsets: BTreeMap<(String, i32), i64>,
    last_sync: Instant,
}

impl Unsynced {
    /// Syncs the handler's writes, then stores the offsets; on failure keeps them for the
    /// next attempt (nothing is stored past writes that may not be durable).
    async fn store(&mut self, name: &str, consumer: &mut dyn LogConsumer, handler: &dyn Handler) -> Result<(), String> {
        self.last_sync = Instant::now();
        if self.offsets.is_empty() {
            return Ok(());
        }
        if let Err(e) = handler.sync().await {
            if e.fatal {
                return Err(e.reason);
            }
            warn!(stage = name, error = %e, "syncing the writes failed; offsets not stored yet");
            return Ok(());
        }
        for ((topic, partition), last) in std::mem::take(&mut self.offsets) {
            if let Err(e) = consumer.store(&topic, partition, last) {
                debug!(stage = name, topic, partition, error = %e, "offset not stored (partition revoked?)");
            }
        }
        Ok(())
    }
}

/// What a worker did over a while (logged at debug level every 10 s).
struct Window {
    since: Instant,
    batches: u64,
    records: u64,
    busy: Duration,
    max: Duration,
}

impl Window {
    fn new() -> Self {
        Window { since: Instant::now(), batches: 0, records: 0, busy: Duration::ZERO, max: Duration::ZERO }
    }

    fn add(&mut self, records: usize, took: Duration) {
        self.batches += 1;
        self.records += records as u64;
        self.busy += took;
        self.max = self.max.max(took);
    }
}

/// Runs a stage until `shutdown` becomes true, then commits what was stored and returns; or
/// until a handler fails for good (writes it was told about are gone), then returns the reason
/// without storing or committing anything more (the caller stops the process, and the
/// partitions are handled again from their stored offsets).
pub async fn run(
    name: &str,
    mut consumer: Box<dyn LogConsumer>,
    handler: Arc<dyn Handler>,
    dead_letters: DeadLetters,
    stats: Arc<WorkerStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut unsynced = Unsynced { offsets: BTreeMap::new(), last_sync: Instant::now() };
    let mut window = Window::new();
    let sync_every = handler.sync_every();
    while !*shutdown.borrow() {
        if unsynced.last_sync.elapsed() >= sync_every {
            unsynced.store(name, consumer.as_mut(), handler.as_ref()).await?;
        }
        let wait = if unsynced.offsets.is_empty() {
            Duration::from_millis(200)
        } else {
            sync_every.saturating_sub(unsynced.last_sync.elapsed()).max(Duration::from_millis(1))
        };
        let batch = tokio::select! {
            b = consumer.poll_batch(MAX_BATCH, wait) => b,
            _ = shutdown.changed() => break,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                warn!(stage = name, error = %e, "poll failed, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let handling = Instant::now();
        let size = batch.len();
        let mut parts: BTreeMap<(String, i32), Vec<Record>> = BTreeMap::new();
        for r in batch {
            parts.entry((r.topic.clone(), r.partition)).or_default().push(r);
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let results = futures::future::join_all(parts.values().map(|recs| handler.handle(recs))).await;
            let mut failed = BTreeMap::new();
            for (((topic, partition), recs), res) in std::mem::take(&mut parts).into_iter().zip(results) {
                let (done, dead, mut err) = match res {
                    Ok(h) => (recs.len(), h.dead, None),
                    Err(e) if e.fatal => return Err(e.reason),
                    Err(e) => (e.done.min(recs.len()), e.dead, Some(e.reason)),
                };
                // Records that failed for good go to the dead-letter topic before their offset
                // counts as done; if that append fails, the slice is retried from there.
                let mut done = done;
                for (i, reason) in dead.into_iter().filter(|(i, _)| *i < done) {
                    match dead_letter(dead_letters.log.as_ref(), &dead_letters.topics, &recs[i], &reason).await {
                        Ok(()) => {
                            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            done = i;
                            err = Some(format!("dead-lettering failed: {e}"));
                            break;
                        }
                    }
                }
                if done > 0 {
                    // These records' writes succeeded: their offset is stored after the next sync.
                    unsynced.offsets.insert((topic.clone(), partition), recs[done - 1].offset);
                    stats.records.fetch_add(done as u64, Ordering::Relaxed);
                }
                if let Some(reason) = err {
                    warn!(stage = name, topic, partition, offset = recs[done].offset, error = %reason, "handling failed, will retry");
                    failed.insert((topic, partition), recs[done..].to_vec());
                }
            }
            if failed.is_empty() {
                break;
            }
            parts = failed;
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                // Abandon the failed records: their offsets were not stored, so whoever owns
                // the partitions next starts from them again.
                break;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        window.add(size, handling.elapsed());
        if window.since.elapsed() >= Duration::from_secs(10) {
            debug!(stage = name, batches = window.batches, records = window.records, handling_ms = window.busy.as_millis() as u64, max_ms = window.max.as_millis() as u64, "worker in the last 10 s");
            window = Window::new();
        }
    }
    unsynced.store(name, consumer.as_mut(), handler.as_ref()).await?;
    if let Err(e) = consumer.commit().await {
        warn!(stage = name, error = %e, "final offset commit failed; the next owner replays from the last commit");
    }
    Ok(())
}

/// Puts an undecodable record on the dead-letter topic with its reason. An error here is
/// retryable: the record must not be skipped silently.
pub async fn dead_letter(
    log: &dyn chat_events::EventLog,
    topics: &chat_events::Topics,
    record: &Record,
    reason: &str,
) -> Result<(), chat_events::LogError> {
    warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason, "dead-lettering record");
    let body = serde_json::json!({
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "payload": String::from_utf8_lossy(&record.payload),
    });
    let key = format!("{}/{}", record.topic, record.partition);
    log.append(&topics.dead_letters(), &key, body.to_string().into_bytes()).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use chat_events::LogError;

    use super::*;

    /// What the loop did, in order.
    type Trace = Arc<Mutex<Vec<String>>>;

    struct Consumer {
        batches: Vec<Vec<Record>>,
        trace: Trace,
    }

    #[async_trait]
    impl LogConsumer for Consumer {
        async fn poll_batch(&mut self, _max: usize, wait: Duration) -> Result<Vec<Record>, LogError> {
            if self.batches.is_empty() {
                tokio::time::sleep(wait).await;
                return Ok(Vec::new());
            }
            Ok(self.batches.remove(0))
        }

        fn store(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), LogError> {
            self.trace.lock().unwrap().push(format!("store {topic}/{partition}@{offset}"));
            Ok(())
        }

        async fn commit(&mut self) -> Result<(), LogError> {
            self.trace.lock().unwrap().push("commit".into());
            Ok(())
        }
    }

    struct Recorder {
        trace: Trace,
        /// Whether the next sync fails (then it succeeds).
        fail_sync: AtomicBool,
    }

    #[async_trait]
    impl Handler for Recorder {
        async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError> {
            let offsets: Vec<String> = records.iter().map(|r| r.offset.to_string()).collect();
            self.trace.lock().unwrap().push(format!("handle {}", offsets.join(",")));
            Ok(Handled::default())
        }

        async fn sync(&self) -> Result<(), HandlerError> {
            if self.fail_sync.swap(false, Ordering::SeqCst) {
                self.trace.lock().unwrap().push("sync failed".into());
                return Err(HandlerError::retry(0, "disk on fire"));
            }
            self.trace.lock().unwrap().push("sync".into());
            Ok(())
        }
    }

    /// A dead-letter topic on an embedded log in a fresh directory.
    fn dead_letters() -> (DeadLetters, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("chat-worker-{}", uuid::Uuid::new_v4()));
        let log = chat_events::embedded::EmbeddedLog::open(&dir, 100).expect("log");
        let topics = Topics::new("t.");
        let rt = tokio::runtime::Handle::current();
        let spec = chat_events::TopicSpec { name: topics.dead_letters(), partitions: 1, replication: 1 };
        tokio::task::block_in_place(|| rt.block_on(log.ensure_topics(&[spec]))).expect("topic");
        (DeadLetters { log: Arc::new(log), topics }, dir)
    }

    /// Fails record 1 of every slice for good.
    struct RefusesOne;

    #[async_trait]
    impl Handler for RefusesOne {
        async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError> {
            Ok(Handled { dead: records.iter().enumerate().filter(|(_, r)| r.offset == 1).map(|(i, _)| (i, "not an event".into())).collect() })
        }

        async fn sync(&self) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_that_fails_for_good_is_dead_lettered_and_the_partition_moves_on() {
        let trace: Trace = Arc::default();
        let consumer = Consumer { batches: vec![vec![record(0), record(1), record(2)]], trace: trace.clone() };
        let (dead, dir) = dead_letters();
        let log = dead.log.clone();
        let stats = Arc::new(WorkerStats::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run("test", Box::new(consumer), Arc::new(RefusesOne), dead, stats.clone(), stopped));
        tokio::time::sleep(SYNC_EVERY * 4).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 1);
        assert!(trace.lock().unwrap().iter().any(|t| t == "store t/0@2"), "the offset moved past the dead record: {trace:?}");
        drop(log);
        let letters = chat_events::embedded::inspect::records(&dir, "t.dead-letters").expect("dead letters");
        assert_eq!(letters.len(), 1);
        let letter: serde_json::Value = serde_json::from_slice(&letters[0]).unwrap();
        assert_eq!((letter["offset"].as_i64(), letter["reason"].as_str()), (Some(1), Some("not an event")));
        let text = WorkerStats::render(&[("projections".into(), stats.clone())]);
        assert!(text.contains("chat_worker_dead_letters_total{stage=\"projections\"} 1"), "{text}");
    }

    fn record(offset: i64) -> Record {
        Record { topic: "t".into(), partition: 0, offset, key: None, payload: Vec::new(), timestamp: None }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offsets_are_stored_only_after_a_successful_sync() {
        let trace: Trace = Arc::default();
        let consumer = Consumer { batches: vec![vec![record(0), record(1)], vec![record(2)]], trace: trace.clone() };
        let handler = Arc::new(Recorder { trace: trace.clone(), fail_sync: AtomicBool::new(true) });
        let (stop, stopped) = watch::channel(false);
        let (dead, _dir) = dead_letters();
        let task = tokio::spawn(run("test", Box::new(consumer), handler, dead, Arc::default(), stopped));
        tokio::time::sleep(SYNC_EVERY * 8).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let trace = trace.lock().unwrap().clone();
        let first_store = trace.iter().position(|t| t.starts_with("store")).expect("an offset was stored");
        // The first sync failed: nothing was stored before the next, successful one.
        let failed = trace.iter().position(|t| t == "sync failed").expect("the failing sync ran");
        let synced = trace.iter().position(|t| t == "sync").expect("a sync succeeded");
        assert!(failed < synced && synced < first_store, "{trace:?}");
        assert!(!trace[..first_store].iter().any(|t| t.starts_with("store")));
        // Everything handled is stored in the end, then committed; never an offset before its sync.
        assert_eq!(trace.iter().rfind(|t| t.starts_with("store")).map(String::as_str), Some("store t/0@2"), "{trace:?}");
        assert_eq!(trace.last().map(String::as_str), Some("commit"));
        for (i, t) in trace.iter().enumerate() {
            if t.starts_with("store") {
                assert!(trace[i - 1] == "sync" || trace[i - 1].starts_with("store"), "a store not right after a sync: {trace:?}");
            }
        }
    }
}

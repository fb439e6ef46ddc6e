//! The consume loop shared by every stage: poll a batch, split it by partition, handle the
//! partitions concurrently (each strictly in order), retry what failed with back-off, and store
//! each partition's offset once its records are done and their writes durable ([`Handler::sync`],
//! at most every [`SYNC_EVERY`], so that a store with unsynced commits syncs once for many
//! batches). Never stores an offset past a failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_events::{LogConsumer, Record};
use tokio::sync::watch;
use tracing::{debug, warn};

/// A failure that a later retry may fix (store or log unavailable). Permanent failures
/// (undecodable records) are dead-lettered by the handler itself and are not errors here.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct HandlerError {
    /// How many leading records of the slice were fully handled before the failure.
    pub done: usize,
    pub reason: String,
}

/// What a stage does with the records of one partition.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Handles records of one partition in offset order.
    async fn handle(&self, records: &[Record]) -> Result<(), HandlerError>;

    /// Makes every write of the records handled so far durable (see `chat_store::Durable`).
    async fn sync(&self) -> Result<(), String>;
}

/// Counters a worker exposes.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
}

const MAX_BATCH: usize = 1000;

/// How often, at most, handled records' writes are synced and their offsets stored.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// Offsets of handled records whose writes are not known to be durable yet.
struct Unsynced {
    offsets: BTreeMap<(String, i32), i64>,
    last_sync: Instant,
}

impl Unsynced {
    /// Syncs the handler's writes, then stores the offsets; on failure keeps them for the
    /// next attempt (nothing is stored past writes that may not be durable).
    async fn store(&mut self, name: &str, consumer: &mut dyn LogConsumer, handler: &dyn Handler) {
        self.last_sync = Instant::now();
        if self.offsets.is_empty() {
            return;
        }
        if let Err(e) = handler.sync().await {
            warn!(stage = name, error = %e, "syncing the writes failed; offsets not stored yet");
            return;
        }
        for ((topic, partition), last) in std::mem::take(&mut self.offsets) {
            if let Err(e) = consumer.store(&topic, partition, last) {
                debug!(stage = name, topic, partition, error = %e, "offset not stored (partition revoked?)");
            }
        }
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

/// Runs a stage until `shutdown` becomes true, then commits what was stored and returns.
pub async fn run(
    name: &str,
    mut consumer: Box<dyn LogConsumer>,
    handler: Arc<dyn Handler>,
    stats: Arc<WorkerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut unsynced = Unsynced { offsets: BTreeMap::new(), last_sync: Instant::now() };
    let mut window = Window::new();
    while !*shutdown.borrow() {
        if unsynced.last_sync.elapsed() >= SYNC_EVERY {
            unsynced.store(name, consumer.as_mut(), handler.as_ref()).await;
        }
        let wait = if unsynced.offsets.is_empty() { Duration::from_millis(200) } else { SYNC_EVERY };
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
                let (done, err) = match res {
                    Ok(()) => (recs.len(), None),
                    Err(e) => (e.done.min(recs.len()), Some(e.reason)),
                };
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
    unsynced.store(name, consumer.as_mut(), handler.as_ref()).await;
    if let Err(e) = consumer.commit().await {
        warn!(stage = name, error = %e, "final offset commit failed; the next owner replays from the last commit");
    }
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
        async fn handle(&self, records: &[Record]) -> Result<(), HandlerError> {
            let offsets: Vec<String> = records.iter().map(|r| r.offset.to_string()).collect();
            self.trace.lock().unwrap().push(format!("handle {}", offsets.join(",")));
            Ok(())
        }

        async fn sync(&self) -> Result<(), String> {
            if self.fail_sync.swap(false, Ordering::SeqCst) {
                self.trace.lock().unwrap().push("sync failed".into());
                return Err("disk on fire".into());
            }
            self.trace.lock().unwrap().push("sync".into());
            Ok(())
        }
    }

    fn record(offset: i64) -> Record {
        Record { topic: "t".into(), partition: 0, offset, key: None, payload: Vec::new(), timestamp: None }
    }

    #[tokio::test]
    async fn offsets_are_stored_only_after_a_successful_sync() {
        let trace: Trace = Arc::default();
        let consumer = Consumer { batches: vec![vec![record(0), record(1)], vec![record(2)]], trace: trace.clone() };
        let handler = Arc::new(Recorder { trace: trace.clone(), fail_sync: AtomicBool::new(true) });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run("test", Box::new(consumer), handler, Arc::default(), stopped));
        tokio::time::sleep(SYNC_EVERY * 8).await;
        stop.send(true).unwrap();
        task.await.unwrap();
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

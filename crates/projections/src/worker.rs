//! The consume loop shared by every stage: poll a batch, split it by partition, handle the
//! partitions concurrently (each strictly in order), store each partition's offset after its
//! records are done, retry what failed with back-off. Never stores an offset past a failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
}

/// Counters a worker exposes.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
}

const MAX_BATCH: usize = 1000;

/// Runs a stage until `shutdown` becomes true, then commits what was stored and returns.
pub async fn run(
    name: &str,
    mut consumer: Box<dyn LogConsumer>,
    handler: Arc<dyn Handler>,
    stats: Arc<WorkerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    while !*shutdown.borrow() {
        let batch = tokio::select! {
            b = consumer.poll_batch(MAX_BATCH, Duration::from_millis(200)) => b,
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
                    // Only now are the writes for these records durable: store the offset.
                    let last = recs[done - 1].offset;
                    if let Err(e) = consumer.store(&topic, partition, last) {
                        debug!(stage = name, topic, partition, error = %e, "offset not stored (partition revoked?)");
                    }
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
    }
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

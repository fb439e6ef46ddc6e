//! The event-log boundary: Kafka's semantics (topics, partitions by key, offsets, consumer groups
//! with stored offsets) behind a trait, so that the Kafka back-end and an embedded one fit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::Envelope;
use crate::topics::Topics;

/// Where an append landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One record read from the log.
#[derive(Clone, Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The broker's (or log's) timestamp of the append.
    pub timestamp: Option<DateTime<Utc>>,
}

/// How far a consumer group is behind on one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The offset the next append will get.
    pub end: i64,
    /// The group's committed offset (the next record it will read); 0 when it never committed.
    pub committed: i64,
}

impl PartitionLag {
    /// Records appended and not committed by the group.
    pub fn lag(&self) -> i64 {
        (self.end - self.committed).max(0)
    }
}

/// A topic to create at start-up.
#[derive(Clone, Debug)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
}

/// Event-log failures, sorted by what the caller does with them.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is unreachable or timed out: retry later; nothing was acknowledged.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The local producer queue is full: shed load (the client gets `overloaded`).
    #[error("producer queue full")]
    QueueFull,
    /// A configuration or programming error that a retry will not fix.
    #[error("event log error: {0}")]
    Fatal(String),
}

/// Appending to and creating topics in the log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends one record and returns only once the log has made it durable (for Kafka: the
    /// broker acknowledged it with acks=all).
    async fn append(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<Position, LogError>;

    /// Appends several records, keeping their order within each partition, and waits for all.
    /// Returns one result per record.
    async fn append_batch(&self, records: Vec<(String, String, Vec<u8>)>) -> Vec<Result<Position, LogError>> {
        let mut out = Vec::with_capacity(records.len());
        for (topic, key, payload) in records {
            out.push(self.append(&topic, &key, payload).await);
        }
        out
    }

    /// Creates the topics that do not exist yet.
    async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), LogError>;

    /// Joins a consumer group on some topics. A new group starts at the beginning of each topic.
    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn LogConsumer>, LogError>;

    /// (end offset, committed offset) of a group on every partition of some topics.
    async fn partition_lags(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError>;

    /// The sum over partitions of (end offset - committed offset) for a group: its lag.
    async fn group_lag(&self, group: &str, topics: &[String]) -> Result<i64, LogError> {
        Ok(self.partition_lags(group, topics).await?.iter().map(PartitionLag::lag).sum())
    }

    /// Reads topics from their beginning up to their ends as of this call, partition by
    /// partition in offset order, outside any consumer group (for `replay`: nothing is
    /// committed, nothing is held in memory beyond one batch).
    async fn read_all(&self, topics: &[String]) -> Result<Box<dyn LogReader>, LogError>;

    /// Whether the log answers (for readiness checks).
    async fn ping(&self) -> bool;

    /// Puts down what the log keeps in memory before the process exits (the embedded log writes
    /// its checkpoint, so the next start reads no frame again); appends may still follow.
    async fn close(&self) -> Result<(), LogError> {
        Ok(())
    }

    /// Forgets a group's committed offsets, so that it starts again from the beginning.
    /// The group must have no live members.
    async fn delete_group(&self, group: &str) -> Result<(), LogError>;
}

/// A member of a consumer group.
#[async_trait]
pub trait LogConsumer: Send {
    /// Waits up to `wait` for records, then returns what is ready, at most `max`.
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, LogError>;

    /// Marks everything up to and including `offset` of a partition as done. Call only after
    /// every write those records cause has succeeded.
    fn store(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), LogError>;

    /// Commits what was stored (synchronously; used on shutdown).
    async fn commit(&mut self) -> Result<(), LogError>;

    /// A handle that appends records and commits this member's offset of a partition in one
    /// atomic step, where the log can (the embedded log: one transaction); `None` where it
    /// cannot (Kafka).
    fn committer(&self) -> Option<Arc<dyn Committer>> {
        None
    }
}

/// Appends with this member's offset committed in the same atomic step: a stage whose outputs
/// are appended this way never appends them again (after a crash it resumes after the records
/// they came from), so its outputs are exactly once.
#[async_trait]
pub trait Committer: Send + Sync {
    /// Appends `records` (as [`EventLog::append_batch`]) and commits `next` as the next offset
    /// of `partition` of `topic` for this member's group, atomically. `None` when the member no
    /// longer owns its partitions as it did at its last poll (another member joined): nothing
    /// was appended, and the caller appends the ordinary way.
    async fn append_committing(
        &self,
        records: Vec<(String, String, Vec<u8>)>,
        topic: &str,
        partition: i32,
        next: i64,
    ) -> Option<Vec<Result<Position, LogError>>>;

    /// Records `from <= offset < end` of a partition, at most `max`, in offset order (for a
    /// stage that rebuilds state its offset already moved past: see the fan-out's watermark).
    async fn read(&self, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> Result<Vec<Record>, LogError>;
}

/// A one-pass reader over a snapshot of some topics.
#[async_trait]
pub trait LogReader: Send {
    /// The next records, at most `max`; empty once everything up to the snapshot was read.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError>;
    /// (records read, records in the snapshot).
    fn progress(&self) -> (i64, i64);
}

/// Appends an event to its topic.
pub async fn append_event(log: &dyn EventLog, topics: &Topics, env: &Envelope) -> Result<Position, LogError> {
    let topic = topics.name(env.event.topic_kind());
    log.append(&topic, &env.key(), env.encode()).await
}

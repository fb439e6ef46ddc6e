//! The Kafka back-end of the event log (rdkafka / librdkafka).
//!
//! - Producer: idempotent (`enable.idempotence=true`, which implies `acks=all`), so a broker
//!   retry never duplicates or reorders a partition; the queue is bounded, and a full queue is
//!   reported as [`LogError::QueueFull`] at once instead of waiting.
//! - Partitioner `murmur2_random`: the same key-to-partition mapping as the Java client, so that
//!   tools written in other languages agree on where a conversation lives.
//! - A producer that librdkafka declares broken for good (a fatal error, or an idempotence state
//!   the broker refuses: out-of-order sequence, unknown producer id, fenced epoch; seen after a
//!   broker that hung and came back) is replaced by a new one, so the process recovers without a
//!   restart. Appends already waiting on the old one finish (or fail, and are retried) on it.
//!   So is a producer that is stalled: its deliveries time out and none has succeeded for two
//!   append timeouts. (Seen in CI: after a broker was stopped for 30 s and resumed, the broker
//!   was healthy, the gateway's producer recovered, but the worker's producer timed out every
//!   append to one partition for the next five minutes, its cached leader of that partition
//!   stuck at -1; librdkafka has open reports of producers stuck after a broker restart until
//!   they are recreated.)
//! - Consumer: `enable.auto.offset.store=false`; the worker stores an offset only after the writes
//!   it covers succeeded, and librdkafka's auto-commit commits what was stored.
//! - A consumer whose group membership is stuck is replaced the same way: librdkafka's statistics
//!   (every [`STATS_INTERVAL_MS`]) tell the group's state and its coordinator connection's, and a
//!   consumer that has not been a steady member with a connected coordinator for
//!   [`KafkaConfig::consumer_stall`] is closed and subscribed anew (it resumes from the last
//!   committed offsets; the writes are idempotent). (Seen in CI: after the broker was stopped for
//!   30 s and resumed, a worker's consumer kept 11 requests queued to its group coordinator,
//!   timing out every minute for as long as the test ran, so the fan-out never resumed; librdkafka
//!   has open reports of consumers stuck after their coordinator went away.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, warn};

use crate::log::{EventLog, LogConsumer, LogError, LogReader, PartitionLag, Position, Record, TopicSpec};

/// Settings of the Kafka back-end.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// Upper bound of messages waiting in the producer's queue (backpressure beyond it).
    pub producer_queue_max: usize,
    /// How long librdkafka waits to fill a batch; small, since a user waits for the ack.
    pub linger_ms: u32,
    /// How long an append may take, including broker retries, before it fails.
    pub append_timeout: Duration,
    /// Consumer session timeout: how long a dead worker holds its partitions.
    pub session_timeout_ms: u32,
    /// How long a consumer may go without being a steady group member with a connected
    /// coordinator before it is replaced (a broker that is down for longer makes it be replaced
    /// again each time: harmless). Keep it well above the session timeout: a new member waits
    /// up to that long for the group to drop the one it replaced.
    pub consumer_stall: Duration,
}

/// How often librdkafka reports a consumer's statistics (its group state among them).
pub const STATS_INTERVAL_MS: u32 = 2_000;

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            producer_queue_max: 100_000,
            linger_ms: 1,
            append_timeout: Duration::from_secs(15),
            session_timeout_ms: 6_000,
            consumer_stall: Duration::from_secs(30),
        }
    }
}

/// Kafka as the event log.
pub struct KafkaLog {
    config: KafkaConfig,
    /// The current producer (cloned per append: a clone shares it); replaced when broken.
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
    /// When the log was made; [`KafkaLog::last_ok_ms`] counts from it.
    started: Instant,
    /// When a delivery last succeeded (or the producer was made), in ms since `started`.
    last_ok_ms: AtomicU64,
}

/// Whether a producer whose delivery timed out is stalled: none of its deliveries succeeded for
/// two append timeouts (one timeout alone may be a broker that is slow or away for a moment).
fn stalled(since_ok: Duration, append_timeout: Duration) -> bool {
    since_ok >= append_timeout * 2
}

fn unavailable(e: KafkaError) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// Delivery errors after which an idempotent producer does not recover by itself: its sequence
/// or epoch state disagrees with the broker's, or librdkafka raised a fatal error.
fn breaks_the_producer(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Inconsistent
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::ProducerFenced
    )
}

impl KafkaLog {
    /// Connects lazily (librdkafka connects in the background); fails only on bad configuration.
    pub fn new(config: KafkaConfig) -> Result<Self, LogError> {
        let producer = Self::new_producer(&config)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| LogError::Fatal(format!("admin client: {e}")))?;
        Ok(KafkaLog { config, producer: RwLock::new(producer), admin, started: Instant::now(), last_ok_ms: AtomicU64::new(0) })
    }

    fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, LogError> {
        ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", config.linger_ms.to_string())
            .set("queue.buffering.max.messages", config.producer_queue_max.to_string())
            .set("message.timeout.ms", config.append_timeout.as_millis().to_string())
            .set("compression.type", "lz4")
            .create()
            .map_err(|e| LogError::Fatal(format!("producer: {e}")))
    }

    /// The current producer.
    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A delivery succeeded.
    fn delivered(&self) {
        self.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn since_ok(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last_ok_ms.load(Ordering::Relaxed)))
    }

    /// After a failed delivery on `used`: if that producer is broken for good, replaces it (once:
    /// a later failure of the same broken producer finds it replaced already). Returns the error
    /// to report.
    fn after_failure(&self, used: &FutureProducer, e: KafkaError) -> LogError {
        let fatal = used.client().fatal_error();
        let code = e.rdkafka_error_code();
        let stall = code == Some(RDKafkaErrorCode::MessageTimedOut) && stalled(self.since_ok(), self.config.append_timeout);
        let broken = fatal.is_some() || code.is_some_and(breaks_the_producer) || stall;
        if broken {
            let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
            if std::ptr::eq(current.client().native_ptr(), used.client().native_ptr()) {
                match Self::new_producer(&self.config) {
                    Ok(fresh) => {
                        let since_ok = self.since_ok();
                        error!(error = %e, fatal = ?fatal, stalled = stall, ?since_ok, "the Kafka producer is broken; replaced by a new one");
                        let old = std::mem::replace(&mut *current, fresh);
                        // The new one gets its own two timeouts before it counts as stalled.
                        self.delivered();
                        // Dropping the last handle of a producer purges and flushes it (up to
                        // half a second): not on this thread if it can be helped.
                        if let Ok(rt) = tokio::runtime::Handle::try_current() {
                            rt.spawn_blocking(move || drop(old));
                        }
                    }
                    Err(err) => error!(error = %e, replacement = %err, "the Kafka producer is broken and could not be replaced"),
                }
            }
        }
        unavailable(e)
    }

    fn base_consumer(&self, group: &str) -> Result<BaseConsumer, LogError> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| LogError::Fatal(format!("consumer: {e}")))
    }

    /// Flushes what is queued (on shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer().flush(timeout) {
            warn!(error = %e, "producer flush on shutdown failed");
        }
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<Position, LogError> {
        let producer = self.producer();
        let record = FutureRecord::to(topic).key(key).payload(&payload);
        let delivery = match producer.send_result(record) {
            Ok(d) => d,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => return Err(LogError::QueueFull),
            Err((e, _)) => return Err(self.after_failure(&producer, e)),
        };
        match delivery.await {
            Ok(Ok(d)) => {
                self.delivered();
                Ok(Position { topic: topic.to_owned(), partition: d.partition, offset: d.offset })
            }
            Ok(Err((e, _))) => Err(self.after_failure(&producer, e)),
            Err(_) => Err(LogError::Unavailable("producer dropped the delivery".into())),
        }
    }

    async fn append_batch(&self, records: Vec<(String, String, Vec<u8>)>) -> Vec<Result<Position, LogError>> {
        // Enqueue everything first (librdkafka keeps the enqueue order per partition, and the
        // idempotent producer keeps it through retries), then wait for every acknowledgement.
        let producer = self.producer();
        let mut pending = Vec::with_capacity(records.len());
        for (topic, key, payload) in &records {
            let record = FutureRecord::to(topic).key(key).payload(payload);
            pending.push(match producer.send_result(record) {
                Ok(d) => Ok((topic.clone(), d)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(LogError::QueueFull),
                Err((e, _)) => Err(self.after_failure(&producer, e)),
            });
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Err(e) => Err(e),
                Ok((topic, d)) => match d.await {
                    Ok(Ok(d)) => {
                        self.delivered();
                        Ok(Position { topic, partition: d.partition, offset: d.offset })
                    }
                    Ok(Err((e, _))) => Err(self.after_failure(&producer, e)),
                    Err(_) => Err(LogError::Unavailable("producer dropped the delivery".into())),
                },
            });
        }
        out
    }

    async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), LogError> {
        let new: Vec<NewTopic<'_>> = specs
            .iter()
            .map(|s| {
                NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(s.replication))
                    // Events are the source of truth: never expire them by time or size.
                    .set("retention.ms", "-1")
                    .set("retention.bytes", "-1")
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self.admin.create_topics(new.iter(), &opts).await.map_err(unavailable)?;
        for r in results {
            match r {
                Ok(name) => debug!(topic = %name, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(LogError::Unavailable(format!("create topic {name}: {code}"))),
            }
        }
        // A topic is usable once its metadata shows leaders for every partition.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for s in specs {
            loop {
                let producer = self.producer();
                let name = s.name.clone();
                let ready = tokio::task::spawn_blocking(move || {
                    producer
                        .client()
                        .fetch_metadata(Some(&name), Duration::from_secs(5))
                        .ok()
                        .and_then(|m| m.topics().first().map(|t| t.error().is_none() && t.partitions().iter().all(|p| p.leader() >= 0) && !t.partitions().is_empty()))
                        .unwrap_or(false)
                })
                .await
                .unwrap_or(false);
                if ready {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(LogError::Unavailable(format!("topic {} has no leader", s.name)));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn LogConsumer>, LogError> {
        let (consumer, health) = group_consumer(&self.config, group, topics)?;
        Ok(Box::new(KafkaConsumer {
            consumer,
            health,
            config: self.config.clone(),
            group: group.to_owned(),
            topics: topics.to_vec(),
        }))
    }

    async fn partition_lags(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError> {
        let consumer = self.base_consumer(group)?;
        let topics = topics.to_vec();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let mut tpl = TopicPartitionList::new();
            let mut ends = HashMap::new();
            for t in &topics {
                let md = consumer.fetch_metadata(Some(t), timeout).map_err(unavailable)?;
                for mt in md.topics() {
                    for p in mt.partitions() {
                        let (_, high) = consumer.fetch_watermarks(t, p.id(), timeout).map_err(unavailable)?;
                        ends.insert((t.clone(), p.id()), high);
                        tpl.add_partition(t, p.id());
                    }
                }
            }
            let committed = consumer.committed_offsets(tpl, timeout).map_err(unavailable)?;
            let mut lags = Vec::new();
            for e in committed.elements() {
                let end = ends.get(&(e.topic().to_owned(), e.partition())).copied().unwrap_or(0);
                let done = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                lags.push(PartitionLag { topic: e.topic().to_owned(), partition: e.partition(), end, committed: done });
            }
            Ok(lags)
        })
        .await
        .map_err(|e| LogError::Fatal(e.to_string()))?
    }

    async fn read_all(&self, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            // A throw-away id: partitions are assigned by hand, nothing is ever committed.
            .set("group.id", format!("chat-replay-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(|e| LogError::Fatal(format!("consumer: {e}")))?;
        let topics = topics.to_vec();
        let (consumer, ends, total) = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let mut tpl = TopicPartitionList::new();
            let mut ends = HashMap::new();
            let mut total = 0i64;
            for t in &topics {
                let md = consumer.fetch_metadata(Some(t), timeout).map_err(unavailable)?;
                for mt in md.topics() {
                    for p in mt.partitions() {
                        let (low, high) = consumer.fetch_watermarks(t, p.id(), timeout).map_err(unavailable)?;
                        if high > low {
                            tpl.add_partition_offset(t, p.id(), Offset::Offset(low)).map_err(unavailable)?;
                            ends.insert((t.clone(), p.id()), high);
                            total += high - low;
                        }
                    }
                }
            }
            if tpl.count() > 0 {
                consumer.assign(&tpl).map_err(unavailable)?;
            }
            Ok::<_, LogError>((consumer, ends, total))
        })
        .await
        .map_err(|e| LogError::Fatal(e.to_string()))??;
        Ok(Box::new(KafkaReader { consumer, ends, total, read: 0 }))
    }

    async fn ping(&self) -> bool {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, Duration::from_secs(2)).is_ok())
            .await
            .unwrap_or(false)
    }

    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self.admin.delete_groups(&[group], &opts).await.map_err(unavailable)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((g, code)) => return Err(LogError::Unavailable(format!("delete group {g}: {code}"))),
            }
        }
        Ok(())
    }
}

struct KafkaReader {
    consumer: StreamConsumer,
    /// Partitions not yet read to their end, and that end.
    ends: HashMap<(String, i32), i64>,
    total: i64,
    read: i64,
}

#[async_trait]
impl LogReader for KafkaReader {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        let mut out = Vec::new();
        while out.len() < max && !self.ends.is_empty() {
            let m = match tokio::time::timeout(Duration::from_secs(30), self.consumer.recv()).await {
                Err(_) => return Err(LogError::Unavailable("no record within 30 s".into())),
                Ok(Err(e)) => return Err(unavailable(e)),
                Ok(Ok(m)) => m,
            };
            let key = (m.topic().to_owned(), m.partition());
            let Some(end) = self.ends.get(&key).copied() else { continue };
            if m.offset() < end {
                out.push(to_record(&m));
                self.read += 1;
            }
            if m.offset() + 1 >= end {
                self.ends.remove(&key);
            }
        }
        Ok(out)
    }

    fn progress(&self) -> (i64, i64) {
        (self.read, self.total)
    }
}

/// A group member subscribed to `topics`, with the health its statistics report.
fn group_consumer(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<(StreamConsumer<Watched>, Arc<GroupHealth>), LogError> {
    let health = Arc::new(GroupHealth::default());
    let consumer: StreamConsumer<Watched> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (config.session_timeout_ms / 3).to_string())
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("fetch.wait.max.ms", "20")
        .set("statistics.interval.ms", STATS_INTERVAL_MS.to_string())
        .create_with_context(Watched { health: health.clone() })
        .map_err(|e| LogError::Fatal(format!("consumer: {e}")))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(unavailable)?;
    Ok((consumer, health))
}

/// Since when a consumer's statistics have said that it is not a working group member.
#[derive(Default)]
struct GroupHealth {
    unwell_since: Mutex<Option<(Instant, String)>>,
}

impl GroupHealth {
    fn report(&self, trouble: Option<String>) {
        let mut since = self.unwell_since.lock().unwrap_or_else(|p| p.into_inner());
        match trouble {
            None => *since = None,
            Some(t) => match since.as_mut() {
                Some((_, last)) => *last = t,
                None => *since = Some((Instant::now(), t)),
            },
        }
    }

    /// How long it has been unwell, and the last reason.
    fn unwell(&self) -> Option<(Duration, String)> {
        let since = self.unwell_since.lock().unwrap_or_else(|p| p.into_inner());
        since.as_ref().map(|(t, why)| (t.elapsed(), why.clone()))
    }
}

/// What is wrong with a group member, per its statistics: `None` when it is a steady member whose
/// coordinator connection is up.
fn group_trouble(stats: &Statistics) -> Option<String> {
    let Some(cgrp) = &stats.cgrp else { return Some("no consumer group state".into()) };
    if cgrp.state != "up" || cgrp.join_state != "steady" {
        return Some(format!("group state {}, join state {}", cgrp.state, cgrp.join_state));
    }
    let coordinator = stats.brokers.values().find(|b| b.source == "logical" && b.name.starts_with("GroupCoordinator"));
    match coordinator {
        Some(b) if b.state != "UP" => Some(format!("coordinator connection {} ({} requests waiting)", b.state, b.outbuf_cnt)),
        _ => None,
    }
}

/// The consumers' context: librdkafka's statistics go to the member's [`GroupHealth`].
struct Watched {
    health: Arc<GroupHealth>,
}

impl ClientContext for Watched {
    fn stats(&self, statistics: Statistics) {
        self.health.report(group_trouble(&statistics));
    }
}

impl ConsumerContext for Watched {}

struct KafkaConsumer {
    consumer: StreamConsumer<Watched>,
    health: Arc<GroupHealth>,
    config: KafkaConfig,
    group: String,
    topics: Vec<String>,
}

impl KafkaConsumer {
    /// Replaces a consumer that has been unwell for [`KafkaConfig::consumer_stall`].
    fn replace_if_stuck(&mut self) -> Result<(), LogError> {
        let Some((unwell, why)) = self.health.unwell() else { return Ok(()) };
        if unwell < self.config.consumer_stall {
            return Ok(());
        }
        let (fresh, health) = group_consumer(&self.config, &self.group, &self.topics)?;
        error!(group = %self.group, reason = %why, ?unwell, "the Kafka consumer is stuck; replaced by a new one (it resumes from the committed offsets)");
        let old = std::mem::replace(&mut self.consumer, fresh);
        self.health = health;
        // Closing waits for the group coordinator (the stuck part): not on this thread.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || drop(old));
        }
        Ok(())
    }
}

fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        timestamp: m.timestamp().to_millis().and_then(DateTime::<Utc>::from_timestamp_millis),
    }
}

#[async_trait]
impl LogConsumer for KafkaConsumer {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, LogError> {
        self.replace_if_stuck()?;
        let mut out = Vec::new();
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(out),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(m)) => out.push(to_record(&m)),
        }
        // Take whatever else is already fetched, without waiting.
        while out.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => out.push(to_record(&m)),
                Some(Err(e)) => {
                    warn!(error = %e, "consumer error while draining a batch");
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }

    fn store(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), LogError> {
        // librdkafka's legacy offset store commits `offset + 1`: the next record to read.
        self.consumer.store_offset(topic, partition, offset).map_err(|e| match e {
            // The partition was revoked by a rebalance: its new owner replays from the last
            // committed offset, and the writes are idempotent.
            KafkaError::StoreOffset(RDKafkaErrorCode::State) => LogError::Unavailable(e.to_string()),
            other => unavailable(other),
        })
    }

    async fn commit(&mut self) -> Result<(), LogError> {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => Ok(()),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    /// A producer whose idempotence state the broker refuses (librdkafka's mock cluster answers a
    /// produce with out-of-order sequence) is replaced at the failure, once, and the next append
    /// goes through the new one.
    #[tokio::test]
    async fn a_broken_producer_is_replaced() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let mut config = KafkaConfig::new(cluster.bootstrap_servers());
        config.append_timeout = Duration::from_secs(5);
        let log = KafkaLog::new(config).expect("a log");
        log.append("t", "k", b"first".to_vec()).await.expect("appended");
        let broken = log.producer();
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 3]);
        let err = log.append("t", "k", b"refused".to_vec()).await.expect_err("the broker refuses the sequence");
        assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
        assert!(broken.client().fatal_error().is_some(), "librdkafka gave the old producer up: only a new one recovers");
        let fresh = log.producer();
        assert!(!std::ptr::eq(fresh.client().native_ptr(), broken.client().native_ptr()), "replaced after {err}");
        // A late failure of the old producer does not replace the new one.
        let _ = log.after_failure(&broken, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal));
        assert!(std::ptr::eq(log.producer().client().native_ptr(), fresh.client().native_ptr()), "replaced once");
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        log.append("t", "k", b"again".to_vec()).await.expect("the new producer appends");
        assert!(std::ptr::eq(log.producer().client().native_ptr(), fresh.client().native_ptr()));
    }

    #[test]
    fn a_producer_is_stalled_after_two_append_timeouts_without_a_delivery() {
        let t = Duration::from_secs(15);
        assert!(!stalled(Duration::from_secs(15), t), "one timeout: a broker away for a moment");
        assert!(stalled(Duration::from_secs(30), t));
    }

    /// A producer whose appends time out with no delivery for two append timeouts is replaced,
    /// and the next append goes through the new one. (When the first timeout is reported is up
    /// to librdkafka, seconds late here; the rule itself is the test above.)
    #[tokio::test]
    async fn a_stalled_producer_is_replaced() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let mut config = KafkaConfig::new(cluster.bootstrap_servers());
        config.append_timeout = Duration::from_secs(1);
        let log = KafkaLog::new(config).expect("a log");
        // The first append connects first: on a busy machine that can take longer than 1 s.
        let t = Instant::now();
        while let Err(e) = log.append("t", "k", b"first".to_vec()).await {
            assert!(t.elapsed() < Duration::from_secs(30), "never appended: {e:?}");
        }
        let first = log.producer();
        cluster.broker_down(1).expect("broker down");
        let t0 = Instant::now();
        while std::ptr::eq(log.producer().client().native_ptr(), first.client().native_ptr()) {
            assert!(t0.elapsed() < Duration::from_secs(30), "never replaced");
            let err = log.append("t", "k", b"timed out".to_vec()).await.expect_err("the broker is down");
            assert!(matches!(&err, LogError::Unavailable(m) if m.contains("MessageTimedOut")), "{err:?}");
        }
        assert!(t0.elapsed() >= Duration::from_secs(2), "replaced after two timeouts, not before: {:?}", t0.elapsed());
        cluster.broker_up(1).expect("broker up");
        // As the worker does: retry until the broker answers (the new producer connects anew).
        let t1 = Instant::now();
        while let Err(e) = log.append("t", "k", b"again".to_vec()).await {
            assert!(t1.elapsed() < Duration::from_secs(30), "the new producer never appended: {e:?}");
        }
    }

    fn stats(state: &str, join: &str, coordinator: Option<&str>) -> Statistics {
        let mut s = Statistics {
            cgrp: Some(rdkafka::statistics::ConsumerGroup { state: state.into(), join_state: join.into(), ..Default::default() }),
            ..Default::default()
        };
        if let Some(c) = coordinator {
            let b = rdkafka::statistics::Broker { name: "GroupCoordinator".into(), source: "logical".into(), state: c.into(), ..Default::default() };
            s.brokers.insert(b.name.clone(), b);
        }
        s
    }

    #[test]
    fn a_member_is_well_when_steady_with_its_coordinator_up() {
        assert_eq!(group_trouble(&stats("up", "steady", Some("UP"))), None);
        assert_eq!(group_trouble(&stats("up", "steady", None)), None);
        assert!(group_trouble(&stats("up", "steady", Some("APIVERSION_QUERY"))).is_some_and(|t| t.contains("APIVERSION_QUERY")));
        assert!(group_trouble(&stats("wait-broker-transport", "init", Some("DOWN"))).is_some());
        assert!(group_trouble(&stats("up", "wait-join", Some("UP"))).is_some());
        assert!(group_trouble(&Statistics::default()).is_some());
    }

    /// A consumer whose group coordinator is away for longer than `consumer_stall` is replaced,
    /// and the new one consumes what is appended once the broker is back.
    #[tokio::test]
    async fn a_stuck_consumer_is_replaced() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let mut config = KafkaConfig::new(cluster.bootstrap_servers());
        config.append_timeout = Duration::from_secs(5);
        // Longer than a session: a replaced member joins while the group still holds the old
        // one (it could not leave with the broker down), which takes up to a session timeout;
        // a shorter stall would replace the new member again while it waits (as 30 s against 6 s
        // does not).
        config.session_timeout_ms = 3_000;
        config.consumer_stall = Duration::from_secs(8);
        let log = KafkaLog::new(config.clone()).expect("a log");
        log.append("t", "k", b"first".to_vec()).await.expect("appended");
        let (consumer, health) = group_consumer(&config, "g", &["t".to_owned()]).expect("consumer");
        let mut c = KafkaConsumer { consumer, health, config, group: "g".into(), topics: vec!["t".into()] };
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "the first record never came");
            if c.poll_batch(10, Duration::from_millis(200)).await.is_ok_and(|b| !b.is_empty()) {
                break;
            }
        }
        // Its statistics have said so (they come every two seconds).
        while c.health.unwell().is_some() {
            assert!(t0.elapsed() < Duration::from_secs(30), "never a steady member: {:?}", c.health.unwell());
            let _ = c.poll_batch(10, Duration::from_millis(200)).await;
        }
        let first = c.consumer.client().native_ptr() as usize;
        cluster.broker_down(1).expect("broker down");
        let t1 = Instant::now();
        while c.consumer.client().native_ptr() as usize == first {
            assert!(t1.elapsed() < Duration::from_secs(40), "never replaced");
            let _ = c.poll_batch(10, Duration::from_millis(200)).await;
        }
        assert!(t1.elapsed() >= Duration::from_secs(8), "replaced before the stall: {:?}", t1.elapsed());
        cluster.broker_up(1).expect("broker up");
        let t2 = Instant::now();
        while log.append("t", "k", b"again".to_vec()).await.is_err() {
            assert!(t2.elapsed() < Duration::from_secs(30), "never appended again");
        }
        loop {
            assert!(t2.elapsed() < Duration::from_secs(60), "the new consumer never read the new record");
            if let Ok(batch) = c.poll_batch(10, Duration::from_millis(200)).await {
                if batch.iter().any(|r| r.payload == b"again") {
                    break;
                }
            }
        }
    }
}

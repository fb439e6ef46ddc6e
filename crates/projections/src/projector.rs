//! The projection stage: a slice of records in, one list of table writes out.
//!
//! For each slice of one partition: decode every record (an undecodable one, or one on the wrong
//! topic, is a permanent failure: dead-lettered by the worker), fetch the rows the records need
//! in one round of concurrent reads, fold every record in order ([`views::fold`], pure: the rows
//! plus the slice's own earlier writes in, writes out; a record that needs a row not fetched yet
//! says so and is folded again once it is there), and apply the slice's writes in one call
//! ([`chat_store::WriteStore::apply`]: one transaction on SQLite, concurrent statements on
//! Cassandra). A write the store refuses for good ([`StoreError::Data`]) is found by applying
//! the records one by one; that record is dead-lettered and the others applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chat_events::{Envelope, Record, TopicKind, Topics};
use chat_store::{coalesce, MessageCountKey, StoreError, Tables, Write};
use futures::StreamExt;

use crate::views::{self, Fetched, Input, Key, Missing, Rows, Settings};
use crate::worker::{Handled, Handler, HandlerError};

/// Reads of one slice running at once, at most.
const READS_IN_FLIGHT: usize = 64;

/// The projection stage.
pub struct Projector {
    store: Arc<dyn Tables>,
    topics: Topics,
    settings: Settings,
    /// Rows written per table since start (for `/metrics` and the benchmarks' rows per message).
    written: Mutex<BTreeMap<&'static str, u64>>,
    /// Set rows this projector already applied (a conversation's day bucket, a user active on a
    /// day): written once, not once per message.
    applied_sets: Mutex<Bounded<SetRow>>,
    /// Items of version 1 `delivery.queued` records (which have no source) applied recently, by
    /// (user, item id): a repeat within the window is dropped (see [`V1_WINDOW`]).
    v1_items: Mutex<Bounded<(chat_events::UserId, uuid::Uuid)>>,
    /// Point rows (inbox rows, stream heads) as the last slice of each partition left them.
    cache: Mutex<RowCache>,
    /// Stream heads and message count rows of applied slices not written yet: written by the
    /// next [`Handler::sync`], before the offsets they cover are stored (see
    /// [`Projector::flush_deferred`]).
    deferred: Mutex<Deferred>,
    /// Sees every list of writes the store applied (the engine benchmark records them).
    tap: Option<WriteTap>,
}

/// A callback given every list of writes after the store applied it.
pub type WriteTap = Arc<dyn Fn(&[Write]) + Send + Sync>;

/// Point rows per partition, carried from one slice to the next.
///
/// A user's rows are written only by the owner of the user's deliveries partition, so while this
/// projector keeps handling a partition slice after slice, what it wrote is what the store holds.
/// A slice that does not start where the last one ended (a rebalance moved the partition away and
/// back, another owner handled some of it, a failed slice is handled again) forgets the
/// partition's rows.
#[derive(Default)]
struct RowCache {
    partitions: HashMap<(String, i32), (i64, Rows)>,
}

/// Point rows kept per partition, at most (beyond, the partition's rows are read again).
const CACHED_ROWS: usize = 50_000;

impl RowCache {
    /// The rows of a partition for a slice starting at `first` (none unless it starts where
    /// the last one ended).
    fn take(&mut self, partition: &(String, i32), first: i64) -> Rows {
        match self.partitions.remove(partition) {
            Some((next, rows)) if next == first => rows,
            _ => Rows::default(),
        }
    }

    /// Keeps the point rows of a slice that was applied, up to `next`.
    fn keep(&mut self, partition: (String, i32), next: i64, rows: Rows) {
        let kept = rows.into_points();
        if kept.len() <= CACHED_ROWS {
            self.partitions.insert(partition, (next, kept));
        }
    }
}

/// Set rows remembered as applied, at most.
const APPLIED_SETS: usize = 100_000;

/// Version 1 items remembered, at most. A fan-out of those versions appended its last
/// uncommitted outputs again after a restart; the repeats follow the originals closely, within
/// far fewer records than this.
pub const V1_WINDOW: usize = 1_000_000;

/// A set that forgets its oldest members beyond a size.
struct Bounded<T> {
    set: HashSet<T>,
    order: std::collections::VecDeque<T>,
    max: usize,
}

impl<T: std::hash::Hash + Eq + Clone> Bounded<T> {
    fn new(max: usize) -> Self {
        Bounded { set: HashSet::new(), order: std::collections::VecDeque::new(), max }
    }

    fn contains(&self, t: &T) -> bool {
        self.set.contains(t)
    }

    /// Adds `t`; false if it was there.
    fn insert(&mut self, t: T) -> bool {
        if !self.set.insert(t.clone()) {
            return false;
        }
        self.order.push_back(t);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Projector {
    pub fn new(store: Arc<dyn Tables>, topics: Topics, keywords: Vec<String>) -> Self {
        Projector {
            store,
            topics,
            settings: Settings { keywords },
            written: Mutex::new(BTreeMap::new()),
            applied_sets: Mutex::new(Bounded::new(APPLIED_SETS)),
            v1_items: Mutex::new(Bounded::new(V1_WINDOW)),
            cache: Mutex::new(RowCache::default()),
            deferred: Mutex::new(Deferred::default()),
            tap: None,
        }
    }

    /// Calls `tap` with every list of writes once the store applied it, in the order applied
    /// (`chat-enginebench` records a projection run this way and replays it on other engines).
    pub fn with_tap(mut self, tap: WriteTap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Rows written per table since start.
    pub fn written(&self) -> BTreeMap<&'static str, u64> {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`Projector::written`] in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::from("# HELP chat_projection_rows_written_total projection writes applied, by table\n# TYPE chat_projection_rows_written_total counter\n");
        for (table, n) in self.written() {
            out.push_str(&format!("chat_projection_rows_written_total{{table=\"{table}\"}} {n}\n"));
        }
        out
    }

    async fn fetch_one(&self, key: &Key) -> Result<Fetched, StoreError> {
        let s = &self.store;
        Ok(match key {
            Key::Inbox(u, c) => Fetched::Inbox(s.inbox_row(*u, c).await?),
            Key::Head(u, p) => {
                let pending = self.deferred.lock().unwrap_or_else(|p| p.into_inner()).heads.get(&(*u, *p)).copied();
                match pending {
                    Some(head) => Fetched::Head(Some(head)),
                    None => Fetched::Head(s.stream_head(*u, *p).await?),
                }
            }
            Key::StreamAfter(u, after) => Fetched::Stream(s.stream_after(*u, *after, views::rows::STREAM_SCAN).await?),
            Key::Intervals(u, c) => Fetched::Intervals(s.user_group_intervals(*u, c).await?),
            Key::StreamMessages(u, m) => Fetched::Seqs(s.stream_messages(*u, *m).await?),
            Key::MessageCount(k) => {
                let pending = self.deferred.lock().unwrap_or_else(|p| p.into_inner()).counts.get(k).copied();
                match pending {
                    Some(row) => Fetched::Count(Some(row)),
                    None => Fetched::Count(s.message_count_row(k).await?),
                }
            }
        })
    }

    /// Loads the keys not loaded yet: point rows in one batched read per kind, ranges one by one
    /// (concurrently).
    async fn fetch(&self, rows: &mut Rows, keys: Vec<Key>) -> Result<(), StoreError> {
        let keys: HashSet<Key> = keys.into_iter().filter(|k| !rows.has(k)).collect();
        let (mut inboxes, mut heads, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
        for k in keys {
            match k {
                Key::Inbox(u, c) => inboxes.push((u, c)),
                Key::Head(u, p) => heads.push((u, p)),
                other => ranges.push(other),
            }
        }
        let reads: Vec<_> = ranges.into_iter().map(|k| Box::pin(async move { let v = self.fetch_one(&k).await; (k, v) })).collect();
        let (inbox_rows, head_rows, results) = futures::join!(
            async { if inboxes.is_empty() { Ok(Vec::new()) } else { self.store.inbox_rows(&inboxes).await } },
            async { if heads.is_empty() { Ok(Vec::new()) } else { self.store.stream_heads(&heads).await } },
            futures::stream::iter(reads).buffer_unordered(READS_IN_FLIGHT).collect::<Vec<(Key, Result<Fetched, StoreError>)>>(),
        );
        for ((u, c), r) in inboxes.into_iter().zip(inbox_rows?) {
            rows.insert(Key::Inbox(u, c), Fetched::Inbox(r));
        }
        let deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        for ((u, p), r) in heads.into_iter().zip(head_rows?) {
            // A deferred head is newer than the stored one (heads only grow).
            let r = deferred.heads.get(&(u, p)).copied().or(r);
            rows.insert(Key::Head(u, p), Fetched::Head(r));
        }
        drop(deferred);
        for (k, v) in results {
            rows.insert(k, v?);
        }
        Ok(())
    }

    /// Folds every input in order; returns each record's writes and the rows as they are after
    /// them.
    async fn fold_all(&self, partition: i32, inputs: &[(usize, Envelope, i64)], mut rows: Rows) -> Result<(Vec<(usize, Vec<Write>)>, Rows), StoreError> {
        let mut keys = Vec::new();
        for (_, env, offset) in inputs {
            views::prefetch(Input { env, partition, offset: *offset }, &mut keys);
        }
        self.fetch(&mut rows, keys).await?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut k = 0;
        while k < inputs.len() {
            let (i, env, offset) = &inputs[k];
            match views::fold(Input { env, partition, offset: *offset }, &rows, &self.settings) {
                Ok(writes) => {
                    for w in &writes {
                        rows.note(w);
                    }
                    out.push((*i, writes));
                    k += 1;
                }
                Err(Missing(key)) => {
                    // Look ahead for what the later records will miss too, so that one round
                    // of reads serves them all (a guess: their folds see the rows as they are
                    // now; the real fold comes after).
                    let mut more = vec![key];
                    for (_, env, offset) in &inputs[k + 1..] {
                        if let Err(Missing(key)) = views::fold(Input { env, partition, offset: *offset }, &rows, &self.settings) {
                            more.push(key);
                        }
                    }
                    self.fetch(&mut rows, more).await?;
                }
            }
        }
        Ok((out, rows))
    }

    fn count(&self, writes: &[Write]) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        for x in writes {
            *w.entry(x.table()).or_default() += 1;
        }
        drop(w);
        if let Some(tap) = &self.tap {
            tap(writes);
        }
    }

    /// Keeps the deferred rows of writes the store applied, for the next sync.
    fn defer(&self, writes: Vec<Write>) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        for w in writes {
            match w {
                Write::MessageCount { key, messages, applied_offset } => {
                    let e = d.counts.entry(key).or_insert((messages, applied_offset));
                    if applied_offset > e.1 {
                        *e = (messages, applied_offset);
                    }
                }
                Write::StreamHead { user, source_partition, position } => {
                    let e = d.heads.entry((user, source_partition)).or_insert(position);
                    *e = (*e).max(position);
                }
                _ => {}
            }
        }
    }

    /// Writes the rows deferred since the last sync, one write per row.
    ///
    /// Stream heads (the guards that say a source's items were applied) and message count rows
    /// are written at sync time instead of with their slice. The worker stores a partition's
    /// offsets only after a sync succeeded, so a crash before it loses the deferred rows together
    /// with the offsets that covered them: the records come again, no head says they were
    /// applied, and every other write of theirs is idempotent (rows by key, the inbox guarded by
    /// its offset), so they are applied and counted again from the stored rows. A head is never
    /// durable before the count of an item it covers (the count would be lost for good: a repeat
    /// at or below the head writes nothing). Until the sync, folds read these rows from here
    /// ([`Projector::fetch_one`], [`Projector::fetch`]), so a slice handled again, or one whose
    /// cached rows were dropped, goes on from them. The rows cost one write per row and sync
    /// instead of one per item.
    async fn flush_deferred(&self) -> Result<(), StoreError> {
        let (counts, heads) = {
            let d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            (d.counts.clone(), d.heads.clone())
        };
        if counts.is_empty() && heads.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<Write> =
            counts.iter().map(|(key, (messages, applied_offset))| Write::MessageCount { key: key.clone(), messages: *messages, applied_offset: *applied_offset }).collect();
        // The guards last (a back-end that applies a list concurrently writes them after the rest).
        writes.extend(heads.iter().map(|(&(user, source_partition), &position)| Write::StreamHead { user, source_partition, position }));
        self.store.apply(writes.clone()).await?;
        self.count(&writes);
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        for (key, row) in counts {
            if d.counts.get(&key) == Some(&row) {
                d.counts.remove(&key);
            }
        }
        for (key, position) in heads {
            if d.heads.get(&key) == Some(&position) {
                d.heads.remove(&key);
            }
        }
        Ok(())
    }

    /// Applies the slice's writes; if the store refuses one for good, applies the records one by
    /// one and returns the ones refused (to be dead-lettered). Stream heads and message count
    /// rows are deferred to the next sync ([`Projector::flush_deferred`]).
    async fn apply(&self, per_record: Vec<(usize, Vec<Write>)>) -> Result<Vec<(usize, String)>, HandlerError> {
        // Each record's deferred rows apart from its other writes (a count the store would refuse
        // stays with its record, which is then refused and dead-lettered like any other).
        let mut deferred: Vec<Vec<Write>> = Vec::with_capacity(per_record.len());
        let per_record: Vec<(usize, Vec<Write>)> = per_record
            .into_iter()
            .map(|(i, writes)| {
                let (d, mut w): (Vec<Write>, Vec<Write>) = writes.into_iter().partition(is_deferred);
                if chat_store::writes::validate(&d).is_ok() {
                    deferred.push(d);
                } else {
                    w.extend(d);
                    deferred.push(Vec::new());
                }
                (i, w)
            })
            .collect();
        let all: Vec<Write> = {
            let known = self.applied_sets.lock().unwrap_or_else(|p| p.into_inner());
            coalesce(per_record.iter().flat_map(|(_, w)| w.iter().cloned()).filter(|w| set_row(w).is_none_or(|k| !known.contains(&k))).collect())
        };
        let n = all.len();
        match self.store.apply(all.clone()).await {
            Ok(()) => {
                self.defer(deferred.into_iter().flatten().collect());
                self.count(&all);
                let mut known = self.applied_sets.lock().unwrap_or_else(|p| p.into_inner());
                for k in all.iter().filter_map(set_row) {
                    known.insert(k);
                }
                Ok(Vec::new())
            }
            Err(e @ StoreError::Lost(_)) => Err(HandlerError::fatal(e)),
            Err(StoreError::Unavailable(e)) => Err(HandlerError::retry(0, e)),
            Err(StoreError::Data(e)) => {
                tracing::warn!(writes = n, error = %e, "the store refused a slice's writes; applying its records one by one");
                let mut refused = Vec::new();
                for ((i, writes), deferred) in per_record.into_iter().zip(deferred) {
                    match self.store.apply(writes.clone()).await {
                        Ok(()) => {
                            self.count(&writes);
                            self.defer(deferred);
                        }
                        Err(StoreError::Data(e)) => refused.push((i, e)),
                        Err(e @ StoreError::Lost(_)) => return Err(HandlerError::fatal(e)),
                        Err(StoreError::Unavailable(e)) => return Err(HandlerError::retry(i, e).with_dead(refused)),
                    }
                }
                Ok(refused)
            }
        }
    }
}

#[async_trait]
impl Handler for Projector {
    async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError> {
        let mut dead = Vec::new();
        let mut inputs = Vec::with_capacity(records.len());
        for (i, rec) in records.iter().enumerate() {
            match Envelope::decode(&rec.payload) {
                Err(e) => dead.push((i, e.to_string())),
                // An event on a topic it does not belong to would break the single-writer rules.
                Ok(env) if self.topics.kind_of(&rec.topic) != Some(env.event.topic_kind()) => {
                    dead.push((i, format!("{} found on topic {}", env.event.type_name(), rec.topic)));
                }
                Ok(env) => inputs.push((i, env, rec.offset)),
            }
        }
        // Version 1 items (no source) repeated within the window, or within this slice: dropped
        // before the fold. Remembered only once applied (a slice that fails is handled again).
        let mut v1 = HashSet::new();
        {
            let seen = self.v1_items.lock().unwrap_or_else(|p| p.into_inner());
            inputs.retain(|(_, env, _)| match &env.event {
                chat_events::Event::DeliveryQueued(q) if q.source.is_none() => {
                    let k = (q.recipient, env.event_id.0);
                    !seen.contains(&k) && v1.insert(k)
                }
                _ => true,
            });
        }
        // The rows this projector wrote in earlier slices of this partition (it is their only
        // writer while it owns the partition), so a slice reads only what it never saw.
        let (partition, first, next) = match (records.first(), records.last()) {
            (Some(a), Some(b)) => ((a.topic.clone(), a.partition), a.offset, b.offset + 1),
            _ => return Ok(Handled { dead }),
        };
        let rows = self.cache.lock().unwrap_or_else(|p| p.into_inner()).take(&partition, first);
        let (per_record, rows) = match self.fold_all(partition.1, &inputs, rows).await {
            Ok(r) => r,
            Err(e) => return Err(HandlerError::of_store(0, e).with_dead(dead)),
        };
        let refused = self.apply(per_record).await.map_err(|e| e.with_dead(dead.clone()))?;
        if refused.is_empty() {
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).keep(partition, next, rows);
        }
        let mut seen = self.v1_items.lock().unwrap_or_else(|p| p.into_inner());
        for k in v1 {
            seen.insert(k);
        }
        drop(seen);
        dead.extend(refused);
        dead.sort_by_key(|(i, _)| *i);
        Ok(Handled { dead })
    }

    async fn sync(&self) -> Result<(), HandlerError> {
        self.flush_deferred().await.map_err(|e| HandlerError::of_store(0, e))?;
        self.store.sync().await.map_err(|e| HandlerError::of_store(0, e))
    }

    fn sync_every(&self) -> std::time::Duration {
        self.store.sync_every()
    }
}

/// Rows written at sync instead of with their slice ([`Projector::flush_deferred`]).
#[derive(Default)]
struct Deferred {
    counts: BTreeMap<MessageCountKey, (i64, i64)>,
    heads: HashMap<(chat_events::UserId, i32), i64>,
}

fn is_deferred(w: &Write) -> bool {
    matches!(w, Write::MessageCount { .. } | Write::StreamHead { .. })
}

/// A row that only ever inserts the same values (a day bucket, a user active on a day): applied
/// once by this projector, it need not be written again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SetRow {
    Bucket(chat_events::ConversationId, i32),
    Active(chrono::NaiveDate, chat_events::UserId),
}

fn set_row(w: &Write) -> Option<SetRow> {
    match w {
        Write::Bucket { conversation, bucket } => Some(SetRow::Bucket(conversation.clone(), *bucket)),
        Write::ActiveUser { day, user } => Some(SetRow::Active(*day, *user)),
        _ => None,
    }
}

/// Which topics the projection stage reads.
pub fn projection_topics(topics: &Topics) -> Vec<String> {
    vec![
        topics.name(TopicKind::Conversations),
        topics.name(TopicKind::Users),
        topics.name(TopicKind::Deliveries),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use chat_events::{DeliveryQueued, Event, EventId, Source, TopicKind};

    /// The sender's own copy of message `n` from source offset `n`, at `offset` of deliveries
    /// partition 0.
    fn own_copy(topics: &Topics, n: i64, offset: i64, exactly_once: bool) -> Record {
        let (a, _, c) = users();
        let item = message_item(&c, a, msg_id(n as u64 + 1), Some("phone"));
        let source = Some(Source { partition: 0, offset: n, index: 0, exactly_once });
        let env = Envelope::new(EventId(uuid::Uuid::from_u128(0x100 + n as u128)), Some(a), Event::DeliveryQueued(DeliveryQueued { recipient: a, item, source }));
        Record { topic: topics.name(TopicKind::Deliveries), partition: 0, offset, key: None, payload: env.encode(), timestamp: None }
    }

    /// The sender's own copies of `n` messages at offsets `0..n` of deliveries partition 0.
    fn own_copies(topics: &Topics, n: i64) -> Vec<Record> {
        (0..n).map(|i| own_copy(topics, i, i, true)).collect()
    }

    /// Outputs of a fan-out that appends at least once (Kafka): each item's head is deferred
    /// with its count, so a crash before the sync loses both and the redelivered items are
    /// applied and counted again; a repeat of an item (same source, later offset) is dropped.
    #[tokio::test]
    async fn a_guarded_items_head_is_written_with_its_count() {
        let dir = std::env::temp_dir().join(format!("chat-projector-{}", uuid::Uuid::new_v4()));
        let store: Arc<dyn Tables> = Arc::new(chat_store::FjallStore::open(&dir).expect("store"));
        let topics = Topics::new("t.");
        let records: Vec<Record> = (0..2).map(|i| own_copy(&topics, i, i, false)).collect();
        let p = Projector::new(store.clone(), topics.clone(), Vec::new());
        p.handle(&records).await.expect("handle");
        let (a, _, _) = users();
        assert_eq!(store.stream_head(a, 0).await.expect("head"), None, "the head waits for the sync");
        // Crash before the sync: the same records again, on a new projector.
        let q = Projector::new(store.clone(), topics.clone(), Vec::new());
        q.handle(&records).await.expect("handle");
        // A repeat of the second item (the fan-out routed its source again), at offset 2.
        q.handle(&[own_copy(&topics, 1, 2, false)]).await.expect("handle");
        q.sync().await.expect("sync");
        assert_eq!(counted(&store).await, 2, "each message counted once");
        assert_eq!(store.stream_head(a, 0).await.expect("head"), Some(Source { partition: 0, offset: 1, index: 0, exactly_once: false }.packed()));
        assert_eq!(q.written().get("stream_heads"), Some(&1), "one head written for three items");
        drop((p, q, store));
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn counted(store: &Arc<dyn Tables>) -> u64 {
        let day = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap_or_default().date_naive();
        store.message_counts(day, day).await.expect("message_counts").iter().map(|c| c.messages).sum()
    }

    /// Message counts are written at sync, once per row, and count each record once: across a
    /// redelivery that overlaps what was handled, and across a projector that lost its deferred
    /// rows (a crash before the sync, whose offsets were therefore not stored either).
    #[tokio::test]
    async fn message_counts_are_written_at_sync_and_count_each_record_once() {
        let dir = std::env::temp_dir().join(format!("chat-projector-{}", uuid::Uuid::new_v4()));
        let store: Arc<dyn Tables> = Arc::new(chat_store::FjallStore::open(&dir).expect("store"));
        let topics = Topics::new("t.");
        let records = own_copies(&topics, 3);
        let p = Projector::new(store.clone(), topics.clone(), Vec::new());
        p.handle(&records[..2]).await.expect("handle");
        assert_eq!(counted(&store).await, 0, "deferred until the sync");
        // Deferred rows lost with their offsets (a new projector, as after a crash): the records
        // come again and are counted from the stored row.
        let q = Projector::new(store.clone(), topics.clone(), Vec::new());
        q.handle(&records[..2]).await.expect("handle");
        q.sync().await.expect("sync");
        assert_eq!(counted(&store).await, 2);
        assert_eq!(q.written().get("analytics_message_counts"), Some(&1), "one row written for two messages");
        // Redelivered from offset 1 (the slice does not follow the last one: cached rows dropped).
        q.handle(&records[1..]).await.expect("handle");
        q.sync().await.expect("sync");
        assert_eq!(counted(&store).await, 3);
        // A slice that does not follow the last one (its cached rows dropped, as when a failed
        // slice is retried from where it failed) while the row is deferred: counted on from the
        // deferred row, not from the stored one.
        let r = Projector::new(store.clone(), topics.clone(), Vec::new());
        let more = own_copies(&topics, 6);
        r.handle(&more[3..4]).await.expect("handle");
        r.handle(&more[5..]).await.expect("handle");
        r.sync().await.expect("sync");
        assert_eq!(counted(&store).await, 5);
        // A sync with nothing deferred writes nothing.
        let before = r.written().get("analytics_message_counts").copied();
        r.sync().await.expect("sync");
        assert_eq!(r.written().get("analytics_message_counts").copied(), before);
        drop((p, q, r, store));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

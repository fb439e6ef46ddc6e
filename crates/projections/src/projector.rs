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
use chat_store::{coalesce, StoreError, Tables, Write};
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
            Key::Head(u, p) => Fetched::Head(s.stream_head(*u, *p).await?),
            Key::StreamAfter(u, after) => Fetched::Stream(s.stream_after(*u, *after, views::rows::STREAM_SCAN).await?),
            Key::Intervals(u, c) => Fetched::Intervals(s.user_group_intervals(*u, c).await?),
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
        for ((u, p), r) in heads.into_iter().zip(head_rows?) {
            rows.insert(Key::Head(u, p), Fetched::Head(r));
        }
        for (k, v) in results {
            rows.insert(k, v?);
        }
        Ok(())
    }

    /// Folds every input in order; returns each record's writes and the rows as they are after
    /// them.
    async fn fold_all(&self, inputs: &[(usize, Envelope, i64)], mut rows: Rows) -> Result<(Vec<(usize, Vec<Write>)>, Rows), StoreError> {
        let mut keys = Vec::new();
        for (_, env, offset) in inputs {
            views::prefetch(Input { env, offset: *offset }, &mut keys);
        }
        self.fetch(&mut rows, keys).await?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut k = 0;
        while k < inputs.len() {
            let (i, env, offset) = &inputs[k];
            match views::fold(Input { env, offset: *offset }, &rows, &self.settings) {
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
                        if let Err(Missing(key)) = views::fold(Input { env, offset: *offset }, &rows, &self.settings) {
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

    /// Applies the slice's writes; if the store refuses one for good, applies the records one by
    /// one and returns the ones refused (to be dead-lettered).
    async fn apply(&self, per_record: Vec<(usize, Vec<Write>)>) -> Result<Vec<(usize, String)>, HandlerError> {
        let all: Vec<Write> = {
            let known = self.applied_sets.lock().unwrap_or_else(|p| p.into_inner());
            coalesce(per_record.iter().flat_map(|(_, w)| w.iter().cloned()).filter(|w| set_row(w).is_none_or(|k| !known.contains(&k))).collect())
        };
        let n = all.len();
        match self.store.apply(all.clone()).await {
            Ok(()) => {
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
                for (i, writes) in per_record {
                    match self.store.apply(writes.clone()).await {
                        Ok(()) => self.count(&writes),
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
        let (per_record, rows) = match self.fold_all(&inputs, rows).await {
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
        self.store.sync().await.map_err(|e| HandlerError::of_store(0, e))
    }

    fn sync_every(&self) -> std::time::Duration {
        self.store.sync_every()
    }
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

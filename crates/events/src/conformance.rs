//! The conformance suite of the event-log boundary: what every [`EventLog`] back-end must do,
//! run against Kafka (`kafka::KafkaLog`, in `tests/e2e/conformance.rs`) and the embedded
//! log ([`crate::embedded::EmbeddedLog`], in `crates/events/tests/conformance.rs`), so the two
//! cannot drift. Cargo feature `conformance`.
//!
//! Every case takes a log and a topic/group prefix that nobody else uses, and panics with a
//! message naming the broken rule. [`run_all`] runs them in order. Waits are polls with a
//! deadline ([`WAIT`]): Kafka's first group join and every rebalance take seconds.
//!
//! The rules:
//! - `ensure_topics` is idempotent and never changes an existing topic;
//! - a key always lands in one partition, the one Kafka's Java client picks
//!   ([`crate::embedded::partition_for`], murmur2);
//! - appends get increasing offsets per partition, from 0, with no gaps, also when concurrent;
//!   `append_batch` keeps the input order within each partition;
//! - a new group reads everything from offset 0, in order per partition;
//! - a group member that stored and committed offsets is followed by one that continues right
//!   after them and never skips an unstored record; records not stored are read again;
//! - `group_lag` counts exactly what is not committed, and is 0 when everything is; `partition_lags`
//!   gives each partition's end and committed offsets;
//! - `delete_group` is refused while the group has a live member, and afterwards the group
//!   starts from the beginning;
//! - a member's `committer`, where the log has one, appends and commits the member's offset in
//!   one step; a committed offset never goes back (a late commit of an older stored offset
//!   leaves it); after another member joined, the committer refuses and appends nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::embedded::partition_for;
use crate::log::{EventLog, LogConsumer, LogError, Position, Record, TopicSpec};

/// How long a case waits for records or for a group to settle before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// A topic partition.
type Tp = (String, i32);

/// What a case appended: per partition, in offset order, (offset, key, payload).
type Appended = BTreeMap<Tp, Vec<(i64, String, Vec<u8>)>>;

/// Runs every case, in order.
pub async fn run_all(log: Arc<dyn EventLog>, prefix: &str) {
    let log = &*log;
    ping_answers(log).await;
    append_assigns_partitions_and_offsets(log, prefix).await;
    ensure_topics_is_idempotent(log, prefix).await;
    append_batch_keeps_order(log, prefix).await;
    consumer_groups(log, prefix).await;
    committed_appends(log, prefix).await;
}

/// `ping` is true for a working log.
pub async fn ping_answers(log: &dyn EventLog) {
    assert!(log.ping().await, "ping: a working log must answer true");
}

fn spec(name: &str, partitions: i32) -> TopicSpec {
    TopicSpec { name: name.to_owned(), partitions, replication: 1 }
}

async fn ensure(log: &dyn EventLog, topics: &[String], partitions: i32) {
    let specs: Vec<TopicSpec> = topics.iter().map(|t| spec(t, partitions)).collect();
    log.ensure_topics(&specs).await.unwrap_or_else(|e| panic!("ensure_topics {topics:?}: {e}"));
}

/// Keys chosen so that every partition of `partitions` gets `per` of them (by Kafka's rule).
fn keys_covering(partitions: i32, per: usize) -> Vec<String> {
    let mut by_partition: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let mut i = 0u32;
    while by_partition.len() < partitions as usize || by_partition.values().any(|k| k.len() < per) {
        let key = format!("key-{i}");
        let p = partition_for(key.as_bytes(), partitions);
        let slot = by_partition.entry(p).or_default();
        if slot.len() < per {
            slot.push(key);
        }
        i += 1;
    }
    // Interleave partitions, so consecutive appends go to different partitions.
    let mut out = Vec::new();
    for j in 0..per {
        for keys in by_partition.values() {
            out.push(keys[j].clone());
        }
    }
    out
}

fn payload(key: &str, i: usize) -> Vec<u8> {
    format!("{key}#{i}").into_bytes()
}

/// Checks a position against Kafka's partitioner and the expected next offset of its partition.
fn check_position(what: &str, pos: &Position, topic: &str, key: &str, partitions: i32, next: &mut BTreeMap<Tp, i64>) {
    assert_eq!(pos.topic, topic, "{what}: the position names topic {:?}, the record went to {topic:?}", pos.topic);
    let want = partition_for(key.as_bytes(), partitions);
    assert_eq!(
        pos.partition, want,
        "{what}: key {key:?} landed in partition {} of {partitions}; Kafka's Java client (murmur2) puts it in {want}",
        pos.partition
    );
    let expected = next.entry((topic.to_owned(), pos.partition)).or_insert(0);
    assert_eq!(
        pos.offset, *expected,
        "{what}: {topic}/{} got offset {}, expected {} (offsets of a partition start at 0 and have no gaps)",
        pos.partition, pos.offset, *expected
    );
    *expected += 1;
}

/// `ensure_topics` twice is fine, and a second call with another partition count does not
/// change the existing topic.
pub async fn ensure_topics_is_idempotent(log: &dyn EventLog, prefix: &str) {
    let topic = format!("{prefix}ensure");
    ensure(log, std::slice::from_ref(&topic), 4).await;
    ensure(log, std::slice::from_ref(&topic), 4).await;
    log.ensure_topics(&[spec(&topic, 2)]).await.unwrap_or_else(|e| {
        panic!("ensure_topics of an existing topic with another partition count must succeed (and change nothing): {e}")
    });
    // Keys of partitions 2 and 3 prove that the topic still has 4 partitions.
    let mut next = BTreeMap::new();
    for key in keys_covering(4, 1) {
        let pos = log.append(&topic, &key, payload(&key, 0)).await.unwrap_or_else(|e| panic!("append to {topic}: {e}"));
        check_position("ensure_topics never changes an existing topic", &pos, &topic, &key, 4, &mut next);
    }
}

/// Single appends: Kafka's partition for each key, offsets 0, 1, 2, ... per partition, also
/// under concurrent appends to one partition.
pub async fn append_assigns_partitions_and_offsets(log: &dyn EventLog, prefix: &str) {
    let topic = format!("{prefix}append");
    ensure(log, std::slice::from_ref(&topic), 4).await;
    let keys = keys_covering(4, 3);
    let mut next = BTreeMap::new();
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for round in 0..3 {
        for key in &keys {
            let pos = log.append(&topic, key, payload(key, round)).await.unwrap_or_else(|e| panic!("append to {topic}: {e}"));
            check_position("append", &pos, &topic, key, 4, &mut next);
            let first = *partition_of.entry(key.clone()).or_insert(pos.partition);
            assert_eq!(first, pos.partition, "append: key {key:?} went to partition {first}, then to {}", pos.partition);
        }
    }

    // Concurrent appends of one key: one partition, distinct offsets, no gap.
    let key = &keys[0];
    let start = next[&(topic.clone(), partition_of[key])];
    let results = futures::future::join_all((0..16).map(|i| log.append(&topic, key, payload(key, 100 + i)))).await;
    let mut offsets: Vec<i64> = results
        .into_iter()
        .map(|r| {
            let pos = r.unwrap_or_else(|e| panic!("concurrent append to {topic}: {e}"));
            assert_eq!(pos.partition, partition_of[key], "concurrent appends of key {key:?} changed partition");
            pos.offset
        })
        .collect();
    offsets.sort_unstable();
    let want: Vec<i64> = (start..start + 16).collect();
    assert_eq!(offsets, want, "16 concurrent appends to one partition must get 16 distinct offsets with no gap");

    assert!(log.append_batch(Vec::new()).await.is_empty(), "append_batch of nothing returns no results");
}

/// Builds `n` records over `topics` (alternating) and keys covering every partition.
fn records(topics: &[String], partitions: i32, n: usize, tag: &str) -> Vec<(String, String, Vec<u8>)> {
    let keys = keys_covering(partitions, 2);
    (0..n)
        .map(|i| {
            let topic = topics[i % topics.len()].clone();
            let key = keys[(i / topics.len()) % keys.len()].clone();
            let payload = format!("{tag}:{key}#{i}").into_bytes();
            (topic, key, payload)
        })
        .collect()
}

/// Appends `recs` (with `append_batch` when `batch`), checks every position, and adds them to
/// `appended`.
async fn append_checked(log: &dyn EventLog, recs: Vec<(String, String, Vec<u8>)>, partitions: i32, batch: bool, appended: &mut Appended) {
    let what = if batch { "append_batch" } else { "append" };
    let mut next: BTreeMap<Tp, i64> = appended.iter().map(|(tp, v)| (tp.clone(), v.last().map_or(0, |(o, _, _)| o + 1))).collect();
    let results: Vec<Result<Position, LogError>> = if batch {
        let out = log.append_batch(recs.clone()).await;
        assert_eq!(out.len(), recs.len(), "append_batch must return one result per record");
        out
    } else {
        let mut out = Vec::new();
        for (t, k, p) in &recs {
            out.push(log.append(t, k, p.clone()).await);
        }
        out
    };
    for ((topic, key, payload), res) in recs.into_iter().zip(results) {
        let pos = res.unwrap_or_else(|e| panic!("{what} to {topic}: {e}"));
        check_position(what, &pos, &topic, &key, partitions, &mut next);
        appended.entry((topic, pos.partition)).or_default().push((pos.offset, key, payload));
    }
}

/// `append_batch` returns one position per record, in input order, and keeps the input order
/// within each partition ([`consumer_groups`] also reads a batch back and checks its order).
pub async fn append_batch_keeps_order(log: &dyn EventLog, prefix: &str) {
    let topics = [format!("{prefix}batch-a"), format!("{prefix}batch-b")];
    ensure(log, &topics, 3).await;
    let mut appended = Appended::new();
    append_checked(log, records(&topics, 3, 30, "b1"), 3, true, &mut appended).await;
    append_checked(log, records(&topics, 3, 12, "b2"), 3, true, &mut appended).await;
    append_checked(log, records(&topics, 3, 6, "single"), 3, false, &mut appended).await;
}

fn ends(appended: &Appended) -> BTreeMap<Tp, i64> {
    appended.iter().map(|(tp, v)| (tp.clone(), v.len() as i64)).collect()
}

fn total(appended: &Appended) -> i64 {
    appended.values().map(|v| v.len() as i64).sum()
}

/// Polls until every partition of `to` was read up to its end, from the offsets in `from`, then
/// checks that exactly the records `from..to` of each partition arrived, in order, intact.
async fn read_range(
    consumer: &mut dyn LogConsumer,
    appended: &Appended,
    from: &BTreeMap<Tp, i64>,
    to: &BTreeMap<Tp, i64>,
    what: &str,
) -> BTreeMap<Tp, Vec<Record>> {
    let deadline = Instant::now() + WAIT;
    let mut got: BTreeMap<Tp, Vec<Record>> = BTreeMap::new();
    let done = |got: &BTreeMap<Tp, Vec<Record>>| {
        to.iter().all(|(tp, end)| match got.get(tp).and_then(|v| v.last()) {
            Some(r) => r.offset + 1 >= *end,
            None => from.get(tp).copied().unwrap_or(0) >= *end,
        })
    };
    while !done(&got) {
        if Instant::now() > deadline {
            let have: BTreeMap<&Tp, Vec<i64>> = got.iter().map(|(tp, v)| (tp, v.iter().map(|r| r.offset).collect())).collect();
            panic!("{what}: timed out after {WAIT:?}; read offsets {have:?}, expected each partition from {from:?} to {to:?}");
        }
        match consumer.poll_batch(200, Duration::from_millis(500)).await {
            Ok(batch) => {
                for r in batch {
                    got.entry((r.topic.clone(), r.partition)).or_default().push(r);
                }
            }
            // A broker hiccup (coordinator moving, leader election): poll again.
            Err(LogError::Unavailable(e)) => eprintln!("{what}: poll_batch unavailable ({e}), polling again"),
            Err(e) => panic!("{what}: poll_batch failed: {e}"),
        }
    }
    for (tp, recs) in &got {
        let Some(end) = to.get(tp) else {
            panic!("{what}: read records of {tp:?}, a partition that was not appended to in this case");
        };
        let start = from.get(tp).copied().unwrap_or(0);
        let offsets: Vec<i64> = recs.iter().map(|r| r.offset).collect();
        let want: Vec<i64> = (start..*end).collect();
        assert_eq!(
            offsets, want,
            "{what}: {}/{} must deliver offsets {start}..{end} in order, each once, without skipping any",
            tp.0, tp.1
        );
        for r in recs {
            let (o, key, payload) = &appended[tp][r.offset as usize];
            assert_eq!(*o, r.offset);
            assert_eq!(r.key.as_deref(), Some(key.as_bytes()), "{what}: {}/{}@{} has the wrong key", tp.0, tp.1, r.offset);
            assert_eq!(&r.payload, payload, "{what}: {}/{}@{} has the wrong payload", tp.0, tp.1, r.offset);
        }
    }
    for (tp, end) in to {
        let start = from.get(tp).copied().unwrap_or(0);
        assert!(start >= *end || got.contains_key(tp), "{what}: nothing read from {}/{} (expected {start}..{end})", tp.0, tp.1);
    }
    got
}

/// At-least-once after a member stored offsets (`stored`, next to read) and left without
/// committing: each partition is read again from some offset between its last commit
/// (`committed`) and its stored offset, up to its end, in order, and nothing in between is skipped.
async fn read_at_least(
    consumer: &mut dyn LogConsumer,
    appended: &Appended,
    committed: &BTreeMap<Tp, i64>,
    stored: &BTreeMap<Tp, i64>,
    to: &BTreeMap<Tp, i64>,
    what: &str,
) {
    let deadline = Instant::now() + WAIT;
    let mut got: BTreeMap<Tp, Vec<i64>> = BTreeMap::new();
    // Every partition has records past its stored offset, so every partition must deliver.
    let done = |got: &BTreeMap<Tp, Vec<i64>>| to.iter().all(|(tp, end)| got.get(tp).and_then(|v| v.last()).is_some_and(|o| o + 1 >= *end));
    while !done(&got) {
        if Instant::now() > deadline {
            panic!(
                "{what}: timed out after {WAIT:?}; read offsets {got:?}, expected every partition up to {to:?}, from at most {stored:?}"
            );
        }
        match consumer.poll_batch(200, Duration::from_millis(500)).await {
            Ok(batch) => {
                for r in batch {
                    let tp = (r.topic.clone(), r.partition);
                    let Some(recs) = appended.get(&tp) else { panic!("{what}: read records of {tp:?}, a partition not appended to") };
                    assert_eq!(r.payload, recs[r.offset as usize].2, "{what}: {}/{}@{} has the wrong payload", tp.0, tp.1, r.offset);
                    got.entry(tp).or_default().push(r.offset);
                }
            }
            Err(LogError::Unavailable(e)) => eprintln!("{what}: poll_batch unavailable ({e}), polling again"),
            Err(e) => panic!("{what}: poll_batch failed: {e}"),
        }
    }
    for (tp, offsets) in &got {
        let (lo, hi) = (committed.get(tp).copied().unwrap_or(0), stored.get(tp).copied().unwrap_or(0));
        let first = offsets[0];
        assert!(
            first >= lo && first <= hi.max(lo),
            "{what}: {}/{} resumed at offset {first}; it must resume between the last commit ({lo}) and the stored offset ({hi}), never after it",
            tp.0,
            tp.1
        );
        let want: Vec<i64> = (first..to[tp]).collect();
        assert_eq!(offsets, &want, "{what}: {}/{} must deliver every offset from {first} to the end, in order, once", tp.0, tp.1);
    }
}

async fn lag(log: &dyn EventLog, group: &str, topics: &[String]) -> i64 {
    log.group_lag(group, topics).await.unwrap_or_else(|e| panic!("group_lag of {group}: {e}"))
}

async fn subscribe(log: &dyn EventLog, group: &str, topics: &[String]) -> Box<dyn LogConsumer> {
    log.subscribe(group, topics).await.unwrap_or_else(|e| panic!("subscribe {group} to {topics:?}: {e}"))
}

fn store(consumer: &mut dyn LogConsumer, tp: &Tp, offset: i64, what: &str) {
    consumer.store(&tp.0, tp.1, offset).unwrap_or_else(|e| panic!("{what}: store {}/{}@{offset}: {e}", tp.0, tp.1));
}

async fn commit(consumer: &mut dyn LogConsumer, what: &str) {
    consumer.commit().await.unwrap_or_else(|e| panic!("{what}: commit: {e}"));
}

/// Deletes a group, retrying while the log still sees a leaving member (Kafka needs a moment
/// after a consumer closed).
async fn delete_group(log: &dyn EventLog, group: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        match log.delete_group(group).await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("delete_group {group} of a group with no live member: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Consumer groups: reading from 0, stored and committed offsets, redelivery of what was not
/// stored, lag, and deleting a group.
pub async fn consumer_groups(log: &dyn EventLog, prefix: &str) {
    let topics = [format!("{prefix}group-a"), format!("{prefix}group-b")];
    ensure(log, &topics, 3).await;
    let mut appended = Appended::new();
    // Half in one batch, half one by one: reading them back checks the batch's order too.
    append_checked(log, records(&topics, 3, 24, "batch"), 3, true, &mut appended).await;
    append_checked(log, records(&topics, 3, 12, "single"), 3, false, &mut appended).await;
    let all = total(&appended);
    let zero: BTreeMap<Tp, i64> = BTreeMap::new();
    let group = format!("{prefix}group-1");
    let other = format!("{prefix}group-2");

    assert_eq!(lag(log, &group, &topics).await, all, "group_lag of a group that never committed counts every record");

    // 1. A new group reads everything from offset 0, in order per partition.
    let mut c = subscribe(log, &group, &topics).await;
    read_range(&mut *c, &appended, &zero, &ends(&appended), "a new group reads every partition from offset 0").await;
    assert!(
        log.delete_group(&group).await.is_err(),
        "delete_group must refuse a group that has a live member (it would lose the member's commits)"
    );

    // 2. Store part of each partition (nothing at all of the first one), commit, leave.
    let mut stored: BTreeMap<Tp, i64> = BTreeMap::new();
    for (i, (tp, recs)) in appended.iter().enumerate() {
        let next = if i == 0 { 0 } else { (recs.len() as i64 / 2).max(1) };
        if next > 0 {
            store(&mut *c, tp, next - 1, "partial store");
        }
        stored.insert(tp.clone(), next);
    }
    commit(&mut *c, "partial store").await;
    let left: i64 = appended.iter().map(|(tp, v)| v.len() as i64 - stored[tp]).sum();
    assert_eq!(lag(log, &group, &topics).await, left, "group_lag after a partial commit counts exactly the records not stored");
    let per_partition: BTreeMap<Tp, (i64, i64)> = log
        .partition_lags(&group, &topics)
        .await
        .unwrap_or_else(|e| panic!("partition_lags of {group}: {e}"))
        .into_iter()
        .map(|l| ((l.topic, l.partition), (l.end, l.committed)))
        .collect();
    for (tp, recs) in &appended {
        assert_eq!(
            per_partition.get(tp),
            Some(&(recs.len() as i64, stored[tp])),
            "partition_lags gives {}/{}'s end offset and the group's committed offset",
            tp.0,
            tp.1
        );
    }
    drop(c);

    // 3. The next member continues right after the stored offsets; what was not stored comes again.
    let mut c = subscribe(log, &group, &topics).await;
    read_range(
        &mut *c,
        &appended,
        &stored,
        &ends(&appended),
        "a member of a group continues right after the committed offsets and redelivers every record not stored",
    )
    .await;
    for (tp, recs) in &appended {
        store(&mut *c, tp, recs.len() as i64 - 1, "store everything");
    }
    commit(&mut *c, "store everything").await;
    assert_eq!(lag(log, &group, &topics).await, 0, "group_lag is 0 once every record is stored and committed");
    assert_eq!(lag(log, &other, &topics).await, all, "one group's commits do not change another group's lag");

    // 4. New records: the live member gets them, the lag counts them until they are committed.
    let before = ends(&appended);
    append_checked(log, records(&topics, 3, 24, "tail"), 3, true, &mut appended).await;
    for (tp, end) in &before {
        assert!(appended[tp].len() as i64 >= end + 2, "fixture: every partition gets at least two tail records");
    }
    let added = total(&appended) - all;
    assert_eq!(lag(log, &group, &topics).await, added, "group_lag counts records appended after the last commit");
    read_range(&mut *c, &appended, &before, &ends(&appended), "a live member receives new records").await;
    drop(c);

    // 5. The tail was never stored: the next member reads it again.
    let mut c = subscribe(log, &group, &topics).await;
    read_range(&mut *c, &appended, &before, &ends(&appended), "records read but never stored are delivered again to the next member").await;
    // Store the first record of the tail of each partition, but leave without `commit`: a back-end
    // may or may not commit on leaving (Kafka does), but the next member must not skip anything
    // after the last commit that covers it.
    let mut stored_only = BTreeMap::new();
    for (tp, end) in &before {
        store(&mut *c, tp, *end, "store without commit");
        stored_only.insert(tp.clone(), *end + 1);
    }
    drop(c);
    let mut c = subscribe(log, &group, &topics).await;
    read_at_least(&mut *c, &appended, &before, &stored_only, &ends(&appended), "a member that stored but left without commit").await;
    for (tp, recs) in &appended {
        store(&mut *c, tp, recs.len() as i64 - 1, "store the tail");
    }
    commit(&mut *c, "store the tail").await;
    assert_eq!(lag(log, &group, &topics).await, 0, "group_lag is 0 once every record is stored and committed");
    drop(c);

    // 6. Deleting the group forgets its offsets: it starts from the beginning.
    delete_group(log, &group).await;
    let all = total(&appended);
    assert_eq!(lag(log, &group, &topics).await, all, "after delete_group the group's lag counts every record again");
    let mut c = subscribe(log, &group, &topics).await;
    read_range(&mut *c, &appended, &zero, &ends(&appended), "after delete_group the group reads again from offset 0").await;
    drop(c);
}

/// Appends committed with the member's offset (logs that can: the embedded one).
pub async fn committed_appends(log: &dyn EventLog, prefix: &str) {
    let (input, output) = (format!("{prefix}commit-in"), format!("{prefix}commit-out"));
    ensure(log, &[input.clone(), output.clone()], 1).await;
    let group = format!("{prefix}committer");
    let inputs: Vec<(String, String, Vec<u8>)> = (0..3).map(|i| (input.clone(), "k".to_owned(), format!("in{i}").into_bytes())).collect();
    let mut appended = Appended::new();
    append_checked(log, inputs, 1, true, &mut appended).await;
    let tp: Tp = (input.clone(), 0);
    let mut member = subscribe(log, &group, std::slice::from_ref(&input)).await;
    read_range(member.as_mut(), &appended, &BTreeMap::new(), &BTreeMap::from([(tp.clone(), 3)]), "committed_appends: first read").await;
    let Some(committer) = member.committer() else { return };
    let outs = |n: usize| (0..n).map(|i| (output.clone(), "k".to_owned(), format!("out{i}").into_bytes())).collect::<Vec<_>>();
    let done = committer.append_committing(outs(2), &input, 0, 3).await.expect("committed_appends: the owner of the partition is not refused");
    assert!(done.iter().all(Result::is_ok), "committed_appends: append_committing failed: {:?}", done.iter().filter_map(|r| r.as_ref().err()).collect::<Vec<_>>());
    let committed = || {
        let (group, input) = (group.clone(), input.clone());
        async move { log.partition_lags(&group, &[input]).await.expect("partition_lags")[0].committed }
    };
    assert_eq!(committed().await, 3, "committed_appends: the offset is committed with the appends");
    // All or nothing: one record that cannot be appended fails them all, and moves no offset.
    let mut torn = outs(1);
    torn.push((format!("{prefix}no-such-topic"), "k".to_owned(), b"x".to_vec()));
    let failed = committer.append_committing(torn, &input, 0, 3).await.expect("committed_appends: the owner is not refused");
    assert!(failed.iter().all(Result::is_err), "committed_appends: a batch with an unappendable record must fail as a whole: {failed:?}");
    let end = log.partition_lags(&group, std::slice::from_ref(&output)).await.expect("partition_lags")[0].end;
    assert_eq!(end, 2, "committed_appends: a failed batch appended part of itself");
    // The committer reads a partition's range back (for a stage catching its state up).
    let range = committer.read(&input, 0, 1, 3, 10).await.expect("committed_appends: read");
    let got: Vec<(i64, Vec<u8>)> = range.into_iter().map(|r| (r.offset, r.payload)).collect();
    assert_eq!(got, vec![(1, b"in1".to_vec()), (2, b"in2".to_vec())], "committed_appends: read returns [from, end) in order");
    assert_eq!(committer.read(&input, 0, 0, 3, 1).await.expect("committed_appends: read").len(), 1, "committed_appends: read returns at most max");
    // A late commit of an older stored offset (a closed member's) leaves it.
    store(member.as_mut(), &tp, 0, "committed_appends");
    commit(member.as_mut(), "committed_appends").await;
    assert_eq!(committed().await, 3, "committed_appends: a committed offset never goes back");
    // Another member joins: the first one's committer refuses, appending nothing.
    let mut other = subscribe(log, &group, std::slice::from_ref(&input)).await;
    assert!(committer.append_committing(outs(1), &input, 0, 3).await.is_none(), "committed_appends: a committer must refuse once another member joined");
    let end = log.partition_lags(&group, std::slice::from_ref(&output)).await.expect("partition_lags")[0].end;
    assert_eq!(end, 2, "committed_appends: a refused committer appended something");
    // Whoever owns the partition now continues after the committed offset.
    drop(member);
    append_checked(log, vec![(input.clone(), "k".to_owned(), b"in3".to_vec())], 1, false, &mut appended).await;
    read_range(other.as_mut(), &appended, &BTreeMap::from([(tp.clone(), 3)]), &BTreeMap::from([(tp, 4)]), "committed_appends: after the commit").await;
}

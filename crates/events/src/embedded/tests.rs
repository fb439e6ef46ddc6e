//! Tests of the embedded log.

use super::*;
use rusqlite::{params, Connection};
use std::io::Write;

#[test]
fn partitions_match_kafkas_murmur2() {
    // Values computed by Kafka's own Utils.murmur2 (toPositive(murmur2(key)) % n), as
    // published in its test suite: murmur2("21") = -973932308.
    let h = murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32;
    assert_eq!(h, -973932308);
    assert_eq!(partition_for(b"21", 1), 0);
}

/// A log written with layout 1 (records without a rowid, ordered by position) opens with
/// every record, offset, end and group offset as before, in segment files, and
/// appends continue each partition's offsets.
#[tokio::test]
async fn a_layout_1_log_is_converted_at_open() {
    let dir = std::env::temp_dir().join(format!("chat-log-layout1-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    {
        let c = Connection::open(dir.join("log.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
             CREATE TABLE records (topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL, PRIMARY KEY (topic, partition, offset)) WITHOUT ROWID;
             CREATE TABLE group_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;
             INSERT INTO topics VALUES ('t', 2);
             INSERT INTO group_offsets VALUES ('g', 't', 1, 2);",
        )
        .unwrap();
        // Partition 1's records were appended over time, interleaved with partition 0's.
        for (p, o, ts) in [(1, 0, 10), (0, 0, 11), (1, 1, 12), (1, 2, 12), (0, 1, 13)] {
            c.execute("INSERT INTO records VALUES ('t', ?1, ?2, ?3, ?4, ?5)", params![p, o, b"k".to_vec(), format!("{p}/{o}").into_bytes(), ts])
                .unwrap();
        }
    }
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    assert!(dir.join("log.db.converted").exists() && !dir.join("log.db").exists());
    let consumer = log.subscribe("g", &["t".to_owned()]).await.unwrap();
    let committer = consumer.committer().unwrap();
    let read = |p: i32| {
        let committer = committer.clone();
        async move {
            committer.read("t", p, 0, 10, 10).await.unwrap().into_iter().map(|r| (r.offset, String::from_utf8(r.payload).unwrap())).collect::<Vec<_>>()
        }
    };
    assert_eq!(read(0).await, vec![(0, "0/0".to_owned()), (1, "0/1".to_owned())]);
    assert_eq!(read(1).await, vec![(0, "1/0".to_owned()), (1, "1/1".to_owned()), (2, "1/2".to_owned())]);
    let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
    let p1 = lags.iter().find(|l| l.partition == 1).unwrap();
    assert_eq!((p1.end, p1.committed), (3, 2));
    // "k" goes to one partition; its next append continues that partition's offsets.
    let at = log.append("t", "k", b"new".to_vec()).await.unwrap();
    assert_eq!(at.offset, if at.partition == 0 { 2 } else { 3 });
    drop(committer);
    drop(consumer);
    drop(log);
    // A crash between the two renames (the old file kept, the new log still under its temporary
    // name): the next open finishes the conversion.
    std::fs::rename(dir.join("log"), dir.join("log.converting")).unwrap();
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
    assert_eq!(lags.iter().map(|l| l.end).sum::<i64>(), 6);
    drop(log);
    // An earlier release started on the converted directory writes a new `log.db`: the open
    // refuses rather than hide either log.
    std::fs::copy(dir.join("log.db.converted"), dir.join("log.db")).unwrap();
    let err = EmbeddedLog::open(&dir, 16).err().expect("refused");
    assert!(err.to_string().contains("both exist"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A log written with layout 2 (append order, a full index), converted from layout 1 by an
/// earlier release in append-time order that two racing appends inverted, opens converted:
/// each partition's offsets in order, every record read.
#[tokio::test]
async fn a_layout_2_log_is_converted_at_open_and_offsets_put_in_order() {
    let dir = std::env::temp_dir().join(format!("chat-log-layout2-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    {
        let c = Connection::open(dir.join("log.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
             CREATE TABLE records (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);
             CREATE UNIQUE INDEX records_position ON records (topic, partition, offset);
             CREATE TABLE group_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;
             INSERT INTO topics VALUES ('t', 2);",
        )
        .unwrap();
        // Partition 0's offsets 1 and 2 are in the wrong order.
        for (p, o) in [(0, 0), (1, 0), (0, 2), (0, 1), (1, 1)] {
            c.execute("INSERT INTO records (topic, partition, offset, key, payload, ts_ms) VALUES ('t', ?1, ?2, NULL, ?3, 1)", params![p, o, format!("{p}/{o}").into_bytes()])
                .unwrap();
        }
    }
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    {
        // The old file is kept, in layout 3 (converted in place first).
        let c = Connection::open(dir.join("log.db.converted")).unwrap();
        let index: i64 = c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'records_position'", [], |r| r.get(0)).unwrap();
        assert_eq!(index, 0);
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, legacy::LAYOUT);
    }
    let mut consumer = log.subscribe("g", &["t".to_owned()]).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let batch = consumer.poll_batch(10, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "read {got:?}");
        got.extend(batch.into_iter().map(|r| String::from_utf8(r.payload).unwrap()));
    }
    let p0: Vec<&String> = got.iter().filter(|s| s.starts_with("0/")).collect();
    assert_eq!(p0, ["0/0", "0/1", "0/2"]);
    let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
    assert_eq!(lags.iter().map(|l| l.end).sum::<i64>(), 5);
    drop(consumer);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A partition written rarely, between thousands of another partition's records: its end
/// after a reopen, a read of a range of it and a consumer starting behind on it find its
/// records (the gap marks bound each scan), and a group reads every record once, in order.
#[tokio::test]
async fn a_rarely_written_partition_is_found_after_a_reopen() {
    let dir = std::env::temp_dir().join(format!("chat-log-quiet-{}", uuid::Uuid::new_v4()));
    let topic = "t".to_owned();
    let topics = std::slice::from_ref(&topic);
    let key_of = |p: i32| (0..).map(|i| format!("k{i}")).find(|k| partition_for(k.as_bytes(), 2) == p).unwrap();
    let (busy, quiet) = (key_of(0), key_of(1));
    // 1 KB records: the busy partition's 14 MB put the quiet one's records more than
    // `MARK_GAP` apart, and over several segments.
    let batch = |key: &str, n: usize, tag: &str| -> Vec<(String, String, Vec<u8>)> {
        (0..n).map(|i| (topic.clone(), key.to_owned(), noise(tag, i, 1000))).collect()
    };
    {
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 2, replication: 1 }]).await.unwrap();
        log.append_batch(batch(&quiet, 3, "q")).await.into_iter().for_each(|r| assert!(r.is_ok()));
        for _ in 0..9 {
            log.append_batch(batch(&busy, 1_000, "b")).await.into_iter().for_each(|r| assert!(r.is_ok()));
        }
        log.append_batch(batch(&quiet, 2, "r")).await.into_iter().for_each(|r| assert!(r.is_ok()));
        for _ in 0..5 {
            log.append_batch(batch(&busy, 1_000, "c")).await.into_iter().for_each(|r| assert!(r.is_ok()));
        }
        let mut g = log.subscribe("half", topics).await.unwrap();
        let _ = g.poll_batch(1, Duration::from_secs(5)).await.unwrap();
        g.store(&topic, 1, 3).unwrap();
        g.store(&topic, 0, 13_990).unwrap();
        g.commit().await.unwrap();
    }
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    let lags = log.partition_lags("half", topics).await.unwrap();
    let end = |p: i32| lags.iter().find(|l| l.partition == p).unwrap().end;
    assert_eq!((end(0), end(1)), (14_000, 5));
    let mut g = log.subscribe("half", topics).await.unwrap();
    let committer = g.committer().unwrap();
    let range: Vec<i64> = committer.read(&topic, 1, 2, 5, 10).await.unwrap().iter().map(|r| r.offset).collect();
    assert_eq!(range, [2, 3, 4]);
    let mut rest = Vec::new();
    while rest.len() < 10 {
        let b = g.poll_batch(100, Duration::from_secs(5)).await.unwrap();
        assert!(!b.is_empty(), "read {rest:?}");
        rest.extend(b.into_iter().map(|r| (r.partition, r.offset)));
    }
    let quiet_read: Vec<i64> = rest.iter().filter(|(p, _)| *p == 1).map(|(_, o)| *o).collect();
    assert_eq!(quiet_read, [4]);
    assert_eq!(rest.len(), 10);
    let mut all = log.subscribe("all", topics).await.unwrap();
    let mut seen: HashMap<i32, i64> = HashMap::new();
    let mut n = 0;
    while n < 14_005 {
        let b = all.poll_batch(1_000, Duration::from_secs(5)).await.unwrap();
        assert!(!b.is_empty(), "read {n}");
        for r in b {
            let next = seen.entry(r.partition).or_insert(0);
            assert_eq!(r.offset, *next, "partition {}", r.partition);
            *next += 1;
            n += 1;
        }
    }
    let mut snapshot = log.read_all(topics).await.unwrap();
    let mut read = 0;
    loop {
        let b = snapshot.next_batch(4_000).await.unwrap();
        if b.is_empty() {
            break;
        }
        read += b.len();
    }
    assert_eq!((read, snapshot.progress()), (14_005, (14_005, 14_005)));
    drop((g, all, committer, log));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `n` bytes that do not compress (frames are LZ4-compressed), after `tag`.
fn noise(tag: &str, i: usize, n: usize) -> Vec<u8> {
    let mut out = tag.as_bytes().to_vec();
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("chat-log-{name}-{}", uuid::Uuid::new_v4()))
}

fn topic(name: &str, partitions: i32) -> TopicSpec {
    TopicSpec { name: name.to_owned(), partitions, replication: 1 }
}

/// Waits until the writer thread of a dropped log has ended (written its checkpoint and
/// released the directory's lock).
fn wait_closed(dir: &Path) {
    let f = std::fs::File::open(dir.join("log.lock")).unwrap();
    let began = Instant::now();
    while f.try_lock().is_err() {
        assert!(began.elapsed() < Duration::from_secs(5), "the log's writer did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last segment file of a log directory.
fn last_segment(dir: &Path) -> PathBuf {
    files::list_segments(&dir.join("log")).unwrap().pop().unwrap().1
}

/// A crash in the middle of a write leaves a torn frame: the next open cuts it off (it was
/// never acknowledged), and appends go on from the last whole frame.
#[tokio::test]
async fn a_torn_last_frame_is_cut_off_at_open() {
    let dir = temp("torn");
    {
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        log.ensure_topics(&[topic("t", 1)]).await.unwrap();
        for i in 0..3 {
            log.append("t", "k", format!("r{i}").into_bytes()).await.unwrap();
        }
        let mut g = log.subscribe("g", &["t".to_owned()]).await.unwrap();
        let _ = g.poll_batch(10, Duration::from_secs(5)).await.unwrap();
        g.store("t", 0, 1).unwrap();
        g.commit().await.unwrap();
    }
    let seg = last_segment(&dir);
    let whole = std::fs::metadata(&seg).unwrap().len();
    {
        // Half a frame: a header promising 100 bytes, and 10 of them.
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&[7; 14]).unwrap();
    }
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole, "the torn frame is cut off");
    let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
    assert_eq!((lags[0].end, lags[0].committed), (3, 2));
    assert_eq!(log.append("t", "k", b"r3".to_vec()).await.unwrap().offset, 3);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Topics, records over several segments, committed offsets and a deleted group are what
/// they were after a reopen; damage in a segment before the last one stops the open.
#[tokio::test]
async fn everything_is_read_back_after_a_reopen_over_several_segments() {
    let dir = temp("reopen");
    let big = |i: usize| noise("", i, 4000);
    {
        let log = EmbeddedLog::open(&dir, 64).unwrap();
        log.ensure_topics(&[topic("a", 3), topic("b", 2)]).await.unwrap();
        for chunk in 0..10 {
            let records = (0..100).map(|i| (if i % 2 == 0 { "a" } else { "b" }.to_owned(), format!("k{i}"), big(chunk * 100 + i))).collect();
            assert!(log.append_batch(records).await.iter().all(Result::is_ok));
        }
        let mut g = log.subscribe("g", &["a".to_owned()]).await.unwrap();
        let _ = g.poll_batch(1, Duration::from_secs(5)).await.unwrap();
        for p in 0..3 {
            g.store("a", p, 4).unwrap();
        }
        g.commit().await.unwrap();
        drop(g);
        let mut h = log.subscribe("h", &["b".to_owned()]).await.unwrap();
        let _ = h.poll_batch(1, Duration::from_secs(5)).await.unwrap();
        h.store("b", 0, 0).unwrap();
        h.commit().await.unwrap();
        drop(h);
        log.delete_group("h").await.unwrap();
    }
    assert!(files::list_segments(&dir.join("log")).unwrap().len() >= 3, "4 MB of records over 1 MiB segments");
    // Closed: a checkpoint at the end, so the next open reads no frame.
    assert!(dir.join("log/checkpoint").exists());
    let log = EmbeddedLog::open(&dir, 64).unwrap();
    let a = log.partition_lags("g", &["a".to_owned()]).await.unwrap();
    assert_eq!(a.iter().map(|l| l.end).sum::<i64>(), 500);
    assert!(a.iter().all(|l| l.committed == 5), "{a:?}");
    let b = log.partition_lags("h", &["b".to_owned()]).await.unwrap();
    assert_eq!((b.iter().map(|l| l.end).sum::<i64>(), b.iter().map(|l| l.committed).sum::<i64>()), (500, 0));
    // Everything, once, in offset order per partition, from a fresh group and a snapshot.
    let mut all = log.subscribe("all", &["a".to_owned(), "b".to_owned()]).await.unwrap();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut n = 0;
    while n < 1_000 {
        let batch = all.poll_batch(300, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "read {n}");
        for r in batch {
            let at = next.entry((r.topic.clone(), r.partition)).or_insert(0);
            assert_eq!(r.offset, *at);
            *at += 1;
            n += 1;
        }
    }
    let mut snap = log.read_all(&["b".to_owned()]).await.unwrap();
    let mut read = 0;
    while !snap.next_batch(64).await.unwrap().is_empty() {
        read += 1;
    }
    assert_eq!(snap.progress(), (500, 500));
    assert!(read >= 8);
    drop((all, snap, log));
    // The same from another process's point of view (read-only).
    assert_eq!(inspect::group_lag(&dir, "g", &["a".to_owned()]).unwrap(), 485);
    assert_eq!(inspect::records(&dir, "b").unwrap().len(), 500);
    // A damaged checkpoint is passed over: everything is read from the frames.
    std::fs::write(dir.join("log/checkpoint"), b"not a checkpoint").unwrap();
    let log = EmbeddedLog::open(&dir, 64).unwrap();
    let a = log.partition_lags("g", &["a".to_owned()]).await.unwrap();
    assert_eq!((a.iter().map(|l| l.end).sum::<i64>(), a.iter().map(|l| l.committed).sum::<i64>()), (500, 15));
    drop(log);
    // Damage before the last segment, read without a checkpoint, stops the open.
    wait_closed(&dir);
    std::fs::remove_file(dir.join("log/checkpoint")).unwrap();
    let first = files::list_segments(&dir.join("log")).unwrap()[0].1.clone();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&first).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 4], 4096).unwrap();
    }
    let err = EmbeddedLog::open(&dir, 64).err().expect("a damaged segment before the last one stops the open");
    assert!(err.to_string().contains("damaged"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a kill -9 the last checkpoint is the one written when a segment filled up: the open
/// reads it and then the frames after it (records, offsets, a new topic, a deleted group).
#[tokio::test]
async fn an_older_checkpoint_and_the_frames_after_it_give_the_same_log() {
    let dir = temp("checkpoint");
    let big = |i: usize| noise("", i, 4000);
    let (a, b) = ("a".to_owned(), "b".to_owned());
    {
        let log = EmbeddedLog::open(&dir, 64).unwrap();
        log.ensure_topics(&[topic("a", 2)]).await.unwrap();
        let records = (0..300).map(|i| (a.clone(), format!("k{i}"), big(i))).collect();
        assert!(log.append_batch(records).await.iter().all(Result::is_ok));
        let mut g = log.subscribe("g", std::slice::from_ref(&a)).await.unwrap();
        let _ = g.poll_batch(1, Duration::from_secs(5)).await.unwrap();
        g.store(&a, 0, 9).unwrap();
        g.commit().await.unwrap();
        drop(g);
    }
    wait_closed(&dir);
    // The checkpoint written at close: keep it, and put it back after more frames, as if the
    // process were killed before it wrote another one.
    let kept = std::fs::read(dir.join("log/checkpoint")).unwrap();
    {
        let log = EmbeddedLog::open(&dir, 64).unwrap();
        log.ensure_topics(&[topic("b", 1)]).await.unwrap();
        let records = (0..50).map(|i| (if i % 2 == 0 { &a } else { &b }.clone(), format!("k{i}"), big(i))).collect();
        assert!(log.append_batch(records).await.iter().all(Result::is_ok));
        let mut h = log.subscribe("h", std::slice::from_ref(&b)).await.unwrap();
        let _ = h.poll_batch(1, Duration::from_secs(5)).await.unwrap();
        h.store(&b, 0, 4).unwrap();
        h.commit().await.unwrap();
        drop(h);
        log.delete_group("g").await.unwrap();
    }
    wait_closed(&dir);
    std::fs::write(dir.join("log/checkpoint"), kept).unwrap();
    let log = EmbeddedLog::open(&dir, 64).unwrap();
    let la = log.partition_lags("g", std::slice::from_ref(&a)).await.unwrap();
    assert_eq!((la.iter().map(|l| l.end).sum::<i64>(), la.iter().map(|l| l.committed).sum::<i64>()), (325, 0));
    let lb = log.partition_lags("h", std::slice::from_ref(&b)).await.unwrap();
    assert_eq!((lb[0].end, lb[0].committed), (25, 5));
    // Reads from the marks of both the checkpoint and the frames after it.
    let mut all = log.subscribe("all", &[a.clone(), b.clone()]).await.unwrap();
    let mut n = 0;
    while n < 350 {
        let batch = all.poll_batch(100, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "read {n}");
        n += batch.len();
    }
    assert_eq!(n, 350);
    let c = all.committer().unwrap();
    let got: Vec<i64> = c.read(&a, 1, 140, 150, 100).await.unwrap().iter().map(|r| r.offset).collect();
    assert_eq!(got, (140..150).collect::<Vec<_>>());
    drop((c, all, log));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The frame boundaries of a segment file.
fn frames_of(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let (mut pos, mut out) = (0usize, Vec::new());
    while pos + 8 <= bytes.len() {
        out.push(pos as u64);
        pos += 8 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
    }
    out
}

/// A damaged frame with whole frames after it is damage, not a torn write: the open refuses
/// rather than cut off acknowledged frames. An empty segment file left by a failed roll is
/// dropped.
#[tokio::test]
async fn damage_in_the_last_segment_is_refused_and_a_leftover_empty_segment_dropped() {
    let dir = temp("damage");
    {
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        log.ensure_topics(&[topic("t", 1)]).await.unwrap();
        for i in 0..400 {
            log.append("t", "k", noise("", i, 4000)).await.unwrap();
        }
    }
    wait_closed(&dir);
    let segs = files::list_segments(&dir.join("log")).unwrap();
    assert!(segs.len() >= 2, "1.6 MB over 1 MiB segments");
    // A leftover empty segment between the two (a roll that failed, then one that worked).
    let leftover = files::segment_path(&dir.join("log"), segs[1].0 - 100);
    std::fs::File::create(&leftover).unwrap();
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    assert!(!leftover.exists());
    assert_eq!(log.partition_lags("g", &["t".to_owned()]).await.unwrap()[0].end, 400);
    drop(log);
    wait_closed(&dir);
    std::fs::remove_file(dir.join("log/checkpoint")).unwrap();
    let last = files::list_segments(&dir.join("log")).unwrap().pop().unwrap().1;
    let frames = frames_of(&last);
    assert!(frames.len() > 3);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB], frames[1] + 20).unwrap();
    }
    let err = EmbeddedLog::open(&dir, 16).err().expect("refused");
    assert!(err.to_string().contains("whole frames after it"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `close` writes the checkpoint at once (a process exits right after it, without waiting for
/// the writer thread to end).
#[tokio::test]
async fn close_writes_the_checkpoint() {
    let dir = temp("close");
    let log = EmbeddedLog::open(&dir, 16).unwrap();
    log.ensure_topics(&[topic("t", 1)]).await.unwrap();
    log.append("t", "k", b"x".to_vec()).await.unwrap();
    assert!(!dir.join("log/checkpoint").exists());
    log.close().await.unwrap();
    let (state, _) = files::read_checkpoint(&dir.join("log")).unwrap().unwrap();
    assert_eq!(state.end, lock(&log.inner.shared.tail).end);
    assert_eq!(state.ends.get(&(0, 0)), Some(&1));
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

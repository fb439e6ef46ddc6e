//! The SQLite layouts of the embedded log (1 to 3, `log.db`, releases before 2026-12-07), read
//! once to convert a data directory to the segment files of layout 4 ([`convert`]). Earlier
//! layouts are first brought to layout 3 in place ([`migrate`]), as the release before did.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::files::{self, Entry, State};
use crate::sqlite::open_sqlite;

/// Layout 3 marked every 64th offset of a partition ...
const MARK_EVERY: i64 = 64;
/// ... and a record this many rows after its partition's last mark.
const MARK_GAP: i64 = 4_096;
/// `PRAGMA user_version` of a log in layout 3 (records in append order, sparse marks).
pub(super) const LAYOUT: i64 = 3;

/// Layout 3. The records are a rowid table in append order (`seq`): a commit's records fill the
/// table's last pages one after the other, whatever partitions they go to. There is no index of
/// every record's position: a full index (layout 2) had one entry per record in a B-tree ordered
/// by (topic, partition, offset), so each commit rewrote one index page per partition it touched,
/// most of the bytes the log wrote (docs/benchmarks.md). Instead `record_marks` holds the row of a
/// partition's offset every [`MARK_EVERY`] offsets (and after a gap of [`MARK_GAP`] rows), a
/// page written once per 64 records of a partition; a read from an offset starts at the mark
/// before it and scans in append order, and a consumer scans once for all its partitions, from
/// where it stopped ([`scan_records`]). Offsets of a partition rise with `seq` (one writer), which
/// every scan relies on. Layouts 1 and 2 are converted at open ([`migrate`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (
    topic      TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY,
    topic     TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    key       BLOB,
    payload   BLOB NOT NULL,
    ts_ms     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS record_marks (
    topic     TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    grp         TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
";

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

fn read_topics(conn: &Connection) -> rusqlite::Result<HashMap<String, i32>> {
    let mut st = conn.prepare("SELECT topic, partitions FROM topics")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?)))?;
    rows.collect()
}

/// Brings a log of any earlier layout to layout 3, in one transaction (nothing to do on a log in
/// layout 3; a new log gets its tables). Layout 1 (records without a rowid, ordered by position)
/// is copied partition after partition; layout 2 (append order with a full index) loses the
/// index. Both get their marks from one pass over the records in `seq` order, which also checks
/// that each partition's offsets rise with `seq` (a layout-2 log converted from layout 1 by an
/// earlier release was copied by append time, which two racing appends can invert: such a log is
/// copied again, partition after partition). Returns whether there was anything to convert.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<bool> {
    let version = user_version(conn)?;
    // An earlier release that opened a log of layout 3 put its index back and appended without
    // marks (it leaves the version as it found it): its marks are written again.
    let index: bool = conn.query_row("SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'records_position'", [], |r| r.get(0))?;
    if version >= LAYOUT && !index {
        return Ok(false);
    }
    let began = Instant::now();
    let t = conn.transaction()?;
    let sql: Option<String> = t
        .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'records'", [], |r| r.get(0))
        .optional()?;
    let existed = sql.is_some();
    if existed {
        tracing::info!("converting the event log to layout {LAYOUT} (once; records in append order, sparse marks instead of an index)");
    }
    if sql.is_some_and(|s| s.contains("WITHOUT ROWID")) {
        recopy_by_position(&t, "records")?;
    }
    t.execute_batch("DROP INDEX IF EXISTS records_position;")?;
    t.execute_batch(SCHEMA)?;
    if !write_marks(&t)? {
        tracing::warn!("the event log's records were not in offset order within a partition; copying them again by position");
        t.execute_batch("ALTER TABLE records RENAME TO records_unordered;")?;
        recopy_by_position(&t, "records_unordered")?;
        if !write_marks(&t)? {
            return Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT), Some("the event log's offsets are not consecutive within a partition".into())));
        }
    }
    let records: i64 = t.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))?;
    t.pragma_update(None, "user_version", LAYOUT)?;
    t.commit()?;
    if existed {
        tracing::info!(records, seconds = began.elapsed().as_secs_f64(), "event log converted to layout {LAYOUT}");
    }
    Ok(existed)
}

/// Replaces `records` with a copy of `from` (then dropped) in (topic, partition, offset) order.
fn recopy_by_position(t: &Transaction<'_>, from: &str) -> rusqlite::Result<()> {
    let moved = if from == "records" {
        t.execute_batch("ALTER TABLE records RENAME TO records_old;")?;
        "records_old"
    } else {
        from
    };
    t.execute_batch(&format!(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);
         INSERT INTO records (topic, partition, offset, key, payload, ts_ms)
             SELECT topic, partition, offset, key, payload, ts_ms FROM {moved} ORDER BY topic, partition, offset;
         DROP TABLE {moved};"
    ))
}

/// Writes the marks of every record, in one pass in `seq` order. Returns false (and writes
/// nothing) when a partition's offsets do not rise by one from 0 in that order.
fn write_marks(t: &Transaction<'_>) -> rusqlite::Result<bool> {
    t.execute("DELETE FROM record_marks", [])?;
    let mut marks: Vec<(String, i32, i64, i64)> = Vec::new();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut last_mark: HashMap<(String, i32), i64> = HashMap::new();
    {
        let mut st = t.prepare("SELECT seq, topic, partition, offset FROM records ORDER BY seq")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (seq, topic, partition, offset): (i64, String, i32, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let key = (topic, partition);
            let expected = next.entry(key.clone()).or_insert(0);
            if offset != *expected {
                return Ok(false);
            }
            *expected += 1;
            if is_mark(offset, seq, last_mark.get(&key).copied()) {
                last_mark.insert(key.clone(), seq);
                marks.push((key.0, key.1, offset, seq));
            }
        }
    }
    let mut st = t.prepare("INSERT INTO record_marks (topic, partition, offset, seq) VALUES (?1, ?2, ?3, ?4)")?;
    for (topic, partition, offset, seq) in marks {
        st.execute(params![topic, partition, offset, seq])?;
    }
    Ok(true)
}

/// Whether the record at `offset`, row `seq`, is marked, given its partition's last mark.
fn is_mark(offset: i64, seq: i64, last_mark: Option<i64>) -> bool {
    offset % MARK_EVERY == 0 || last_mark.is_none_or(|m| seq - m >= MARK_GAP)
}


/// Copies a `log.db` of layout 1, 2 or 3 into segment files in `out` (a new directory): the
/// topics, every record in append order (offsets rising by one in each partition, checked) and
/// the committed offsets of every group, synced. Returns the number of records.
pub(super) fn convert(db: &Path, out: &Path) -> Result<u64, String> {
    let began = Instant::now();
    let mut conn = open_sqlite(db, true).map_err(|e| format!("{}: {e}", db.display()))?;
    migrate(&mut conn).map_err(|e| format!("{}: converting the records to layout {LAYOUT}: {e}", db.display()))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let topics = read_topics(&conn).map_err(|e| e.to_string())?;
    let mut names: Vec<(String, i32)> = topics.into_iter().collect();
    names.sort();
    let mut w = files::Writer::create(out, 0).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut state = State::default();
    let mut buf = Vec::new();
    files::begin_frame(&mut buf);
    for (i, (name, partitions)) in names.iter().enumerate() {
        let e = Entry::Topic { id: i as u32, partitions: *partitions, name };
        state.apply(&e, 0)?;
        files::put_entry(&mut buf, &e);
    }
    let mut records = 0u64;
    {
        let mut st = conn.prepare("SELECT topic, partition, offset, key, payload, ts_ms FROM records ORDER BY seq").map_err(|e| e.to_string())?;
        let mut rows = st.query([]).map_err(|e| e.to_string())?;
        while let Some(r) = rows.next().map_err(|e| e.to_string())? {
            let topic: String = r.get(0).map_err(|e| e.to_string())?;
            let id = state.topics.get(&topic).map(|(id, _)| *id).ok_or_else(|| format!("a record of topic {topic}, which is not in `topics`"))?;
            let key: Option<Vec<u8>> = r.get(3).map_err(|e| e.to_string())?;
            let payload: Vec<u8> = r.get(4).map_err(|e| e.to_string())?;
            let e = Entry::Record {
                topic: id,
                partition: r.get(1).map_err(|e| e.to_string())?,
                offset: r.get(2).map_err(|e| e.to_string())?,
                ts_ms: r.get(5).map_err(|e| e.to_string())?,
                key: key.as_deref(),
                payload: &payload,
            };
            state.apply(&e, w.end()).map_err(|e| format!("{}: {e}", db.display()))?;
            files::put_entry(&mut buf, &e);
            records += 1;
            if buf.len() >= 1 << 20 {
                w.write_frame(&mut buf, false).map_err(|e| e.to_string())?;
                files::begin_frame(&mut buf);
            }
        }
    }
    {
        let mut st = conn.prepare("SELECT grp, topic, partition, next_offset FROM group_offsets").map_err(|e| e.to_string())?;
        let mut rows = st.query([]).map_err(|e| e.to_string())?;
        while let Some(r) = rows.next().map_err(|e| e.to_string())? {
            let (group, topic): (String, String) = (r.get(0).map_err(|e| e.to_string())?, r.get(1).map_err(|e| e.to_string())?);
            let Some((id, _)) = state.topics.get(&topic).copied() else { continue };
            let e = Entry::Commit { group: &group, topic: id, partition: r.get(2).map_err(|e| e.to_string())?, next: r.get(3).map_err(|e| e.to_string())? };
            files::put_entry(&mut buf, &e);
        }
    }
    w.write_frame(&mut buf, true).map_err(|e| e.to_string())?;
    // Synced even when the last frame was empty (the frames before it were written unsynced).
    w.sync().map_err(|e| e.to_string())?;
    files::sync_dir(out).map_err(|e| e.to_string())?;
    // Everything of the old file in the file itself (its WAL emptied), so that it can be kept
    // as it was, beside the new log.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).map_err(|e| e.to_string())?;
    drop(conn);
    tracing::info!(records, seconds = began.elapsed().as_secs_f64(), "event log converted to layout 4 (segment files)");
    Ok(records)
}

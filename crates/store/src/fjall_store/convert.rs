//! A data directory whose tables are in SQLite (`tables.db`, every release before the tables
//! moved to fjall) gets them in fjall (`tables/`) at open:
//!
//! 1. `tables.db` is opened as the SQLite store once, which runs that store's own migrations
//!    (command tables of older releases move to `commands.db`, old send gates become accepted
//!    sends).
//! 2. The state that is not derived from the projection topics is copied into a new database in
//!    `tables.converting/`: the fan-out's accepted sends, groups, membership intervals, messages,
//!    acknowledgements, read markers and watermarks, and the roles.
//! 3. The projection tables are not copied: the new database records projection layout 0, so
//!    the server rebuilds them from the log at start (the same path as any change of layout:
//!    the projection group starts again at offset zero).
//! 4. `tables.converting/` becomes `tables/` (a rename), then `tables.db` (and its `-wal` and
//!    `-shm`) becomes `tables.db.migrated`, kept for the operator to delete.
//!
//! A crash at any point leaves either no `tables/` (the conversion runs again from the start) or
//! a complete one (the leftover `tables.db` is renamed).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::*;

/// What a conversion moved.
#[derive(Debug, Default)]
pub struct Converted {
    /// Rows copied per state table.
    pub rows: BTreeMap<&'static str, u64>,
}

const SQLITE_FILES: &[&str] = &["tables.db", "tables.db-wal", "tables.db-shm"];

/// Converts `dir/tables.db` to `dir/tables/` if the directory has the one and not the other
/// (see the module doc). `None` when there was nothing to convert.
pub fn from_sqlite(dir: &Path) -> StoreResult<Option<Converted>> {
    let (db, target) = (dir.join("tables.db"), dir.join(TABLES_DIR));
    if target.exists() {
        if db.exists() {
            set_aside(dir)?;
        }
        return Ok(None);
    }
    if !db.is_file() {
        return Ok(None);
    }
    // The SQLite store's own migrations; closed again before the copy.
    drop(crate::SqliteStore::open(dir)?);
    let converting = dir.join("tables.converting");
    if converting.exists() {
        std::fs::remove_dir_all(&converting).map_err(|e| data(format!("{}: {e}", converting.display())))?;
    }
    let src = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| data(format!("{}: {e}", db.display())))?;
    let converted = {
        let inner = open_inner(&converting)?;
        let converted = copy_state(&src, &inner).map_err(|e| data(format!("converting {}: {e}", db.display())))?;
        inner.db.persist(PersistMode::SyncAll).map_err(unavailable)?;
        converted
    };
    drop(src);
    std::fs::rename(&converting, &target).map_err(|e| data(format!("{} → {}: {e}", converting.display(), target.display())))?;
    sync_dir(dir)?;
    set_aside(dir)?;
    tracing::info!(rows = ?converted.rows, "tables moved from SQLite (tables.db) to fjall (tables/); the projections are rebuilt from the log");
    Ok(Some(converted))
}

/// Renames the SQLite files of the tables to `*.migrated`.
fn set_aside(dir: &Path) -> StoreResult<()> {
    for name in SQLITE_FILES {
        let from = dir.join(name);
        if from.exists() {
            let to = dir.join(name.replacen("tables.db", "tables.db.migrated", 1));
            std::fs::rename(&from, &to).map_err(|e| data(format!("{} → {}: {e}", from.display(), to.display())))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| data(format!("{}: {e}", dir.display())))
}

fn has_table(src: &Connection, name: &str) -> bool {
    src.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0
}

fn uuid_of(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(data)
}

fn conv_id(s: &str) -> StoreResult<ConversationId> {
    s.parse().map_err(|e| data(format!("conversation id {s:?}: {e}")))
}

/// Calls `f` with every row of `sql`.
fn each_row(src: &Connection, sql: &str, mut f: impl FnMut(&rusqlite::Row<'_>) -> StoreResult<()>) -> StoreResult<u64> {
    let mut st = src.prepare(sql).map_err(data)?;
    let mut rows = st.query([]).map_err(data)?;
    let mut n = 0;
    while let Some(r) = rows.next().map_err(data)? {
        f(r)?;
        n += 1;
    }
    Ok(n)
}

fn text(r: &rusqlite::Row<'_>, i: usize) -> StoreResult<String> {
    r.get::<_, String>(i).map_err(data)
}

fn int(r: &rusqlite::Row<'_>, i: usize) -> StoreResult<i64> {
    r.get::<_, i64>(i).map_err(data)
}

fn copy_state<'a>(src: &Connection, inner: &'a Inner) -> StoreResult<Converted> {
    let mut out = Converted::default();
    let mut tx = Tx { inner, batch: inner.db.batch(), pending: HashMap::new() };
    // Projection layout 0: rebuilt from the log at start.
    tx.put("meta", Key::new().s("projections").done(), Val::new().i(0).done())?;
    let flush = |tx: &mut Tx<'a>| -> StoreResult<()> {
        if tx.pending.len() >= 10_000 {
            let full = std::mem::replace(tx, Tx { inner, batch: inner.db.batch(), pending: HashMap::new() });
            full.batch.commit().map_err(unavailable)?;
        }
        Ok(())
    };
    type Copy = fn(&mut Tx<'_>, &rusqlite::Row<'_>) -> StoreResult<()>;
    let tables: &[(&'static str, &str, Copy)] = &[
        ("sends", "SELECT sender, client_msg_id, conversation_id, message_id, sent_at, content_sha256, position FROM sends", |tx, r| {
            put_send(
                tx,
                &SendRecord {
                    sender: UserId(uuid_of(&text(r, 0)?)?),
                    client_msg_id: text(r, 1)?,
                    conversation_id: conv_id(&text(r, 2)?)?,
                    message_id: MessageId(uuid_of(&text(r, 3)?)?),
                    sent_at: time(int(r, 4)?)?,
                    content_sha256: text(r, 5)?,
                    position: int(r, 6)?,
                },
            )
        }),
        ("fanout_groups", "SELECT conversation_id, name, created_at, membership_version FROM fanout_groups", |tx, r| {
            tx.put("fanout_groups", Key::new().conv(&conv_id(&text(r, 0)?)?).done(), Val::new().s(&text(r, 1)?).i(int(r, 2)?).i(int(r, 3)?).done())
        }),
        ("fanout_members", "SELECT conversation_id, member, since, until, role FROM fanout_members", |tx, r| {
            let m = MemberInterval {
                member: UserId(uuid_of(&text(r, 1)?)?),
                since: int(r, 2)?,
                until: r.get::<_, Option<i64>>(3).map_err(data)?,
                role: role(&text(r, 4)?)?,
            };
            put_member(tx, &conv_id(&text(r, 0)?)?, &m)
        }),
        ("fanout_messages", "SELECT conversation_id, message_id, sender, position, recipients FROM fanout_messages", |tx, r| {
            tx.put(
                "fanout_messages",
                fanout_message_key(&conv_id(&text(r, 0)?)?, MessageId(uuid_of(&text(r, 1)?)?)),
                Val::new().u(uuid_of(&text(r, 2)?)?).i(int(r, 3)?).i(int(r, 4)?).done(),
            )
        }),
        ("fanout_acks", "SELECT message_id, status, member FROM fanout_acks", |tx, r| {
            let key = Key::new().u(uuid_of(&text(r, 0)?)?).s(status(&text(r, 1)?)?.as_str()).u(uuid_of(&text(r, 2)?)?).done();
            tx.put("fanout_acks", key, Vec::new())
        }),
        ("fanout_read_markers", "SELECT conversation_id, reader, up_to, position FROM fanout_read_markers", |tx, r| {
            let key = Key::new().conv(&conv_id(&text(r, 0)?)?).u(uuid_of(&text(r, 1)?)?).done();
            tx.put("fanout_read_markers", key, Val::new().u(uuid_of(&text(r, 2)?)?).i(int(r, 3)?).done())
        }),
        ("fanout_watermarks", "SELECT topic, partition, next FROM fanout_watermarks", |tx, r| {
            tx.put("fanout_watermarks", Key::new().s(&text(r, 0)?).i(int(r, 1)?).done(), Val::new().i(int(r, 2)?).done())
        }),
        ("user_roles", "SELECT user_id, role FROM user_roles", |tx, r| {
            tx.put("user_roles", Key::new().u(uuid_of(&text(r, 0)?)?).s(&text(r, 1)?).done(), Vec::new())
        }),
    ];
    for (table, sql, copy) in tables {
        if !has_table(src, table) {
            continue;
        }
        let n = each_row(src, sql, |r| {
            copy(&mut tx, r)?;
            flush(&mut tx)
        })?;
        out.rows.insert(table, n);
    }
    tx.batch.commit().map_err(unavailable)?;
    Ok(out)
}

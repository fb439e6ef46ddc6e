//! `chat-enginebench`: what the projection tables would cost on another storage engine.
//!
//! 1. **Record.** Reads every record of the projection topics from the log of a stopped
//!    `chat run` (a data directory a load-generator run left), hands them to the real
//!    [`Projector`] slice by slice (round robin over the partitions, as concurrent workers
//!    would), into a fresh SQLite store, and records each list of writes the store applied.
//!    This phase is itself measured: it is the product's projection stage without the gateway.
//! 2. **Replay.** Applies the recorded lists, in order, to each engine in a fresh directory,
//!    with the durability contract of the product's tables: each list one atomic commit that
//!    is not synced, and a synced commit at most every `--sync-every` seconds (a worker stores
//!    its offsets only after one). Optionally paced at `--rate` messages per second.
//!
//! The engines: `sqlite` (the product's `SqliteStore::apply`, its writer, transactions and
//! pragmas as configured), `fjall` (an LSM tree, one keyspace per table, one write batch per
//! list, journal synced with `persist`), `redb` (a copy-on-write B-tree, one write
//! transaction per list with `Durability::None`, an `Immediate` commit per sync), `memory`
//! (ordered maps in memory, persisted as one snapshot file at the end: the cost of a snapshot
//! of the state, for the "projections in memory plus snapshots and the log" design).
//!
//! The key-value engines get the same columns as SQLite's tables (ids as text, integers as
//! eight bytes) and the same merge rules: a set row is written blindly, a row whose highest
//! (lowest) version wins is read first. Per engine the program prints CPU time (user + system
//! of the whole process, background threads included), bytes written (`write_bytes` of
//! `/proc/self/io`), wall time and disk space, per message and in total, as JSON lines.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chat_events::embedded::EmbeddedLog;
use chat_events::{EventLog, Record, Topics};
use chat_projections::projector::projection_topics;
use chat_projections::{Handler, Projector};
use chat_store::{Durable, SqliteStore, Tables, Write, WriteStore};
use clap::{Parser, ValueEnum};
use redb::ReadableTable;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Projection tables on SQLite, fjall, redb and in memory: CPU, bytes written and time per message for the writes the real projector makes")]
struct Args {
    /// Data directory of a stopped `chat run` (its `log/` holds the events to project).
    #[arg(long)]
    log: PathBuf,
    /// The topic prefix the server used.
    #[arg(long, default_value = "chat.")]
    topic_prefix: String,
    /// Where the engines write (a fresh subdirectory each; removed afterwards unless --keep).
    #[arg(long)]
    work: PathBuf,
    /// Engines to replay on, in order.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,fjall,redb,memory")]
    engines: Vec<EngineKind>,
    /// Messages per second the replay is paced at (0: as fast as the engine goes).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Records per slice handed to the projector while recording.
    #[arg(long, default_value_t = 256)]
    slice: usize,
    /// Seconds between synced commits.
    #[arg(long, default_value_t = 1.0)]
    sync_every: f64,
    /// Analytics keywords (as `chat run`'s `analytics_keywords`).
    #[arg(long, value_delimiter = ',')]
    keywords: Vec<String>,
    /// Keep the engines' directories.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum EngineKind {
    Sqlite,
    Fjall,
    Redb,
    Memory,
}

/// CPU seconds, bytes written and time of this process, for differences.
struct Usage {
    cpu: f64,
    written: u64,
    at: Instant,
}

impl Usage {
    fn now() -> Result<Usage> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("/proc/self/stat"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        let io = std::fs::read_to_string("/proc/self/io")?;
        let written = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("/proc/self/io has no write_bytes"))?;
        // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
        Ok(Usage { cpu: ticks / 100.0, written, at: Instant::now() })
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Prints one phase's figures; `counts` is (messages, writes).
fn report(engine: &str, phase: &str, counts: (u64, u64), before: &Usage, after: &Usage, disk: u64, extra: serde_json::Value) {
    let (messages, writes) = counts;
    let wall = after.at.duration_since(before.at).as_secs_f64();
    let cpu = after.cpu - before.cpu;
    let bytes = after.written.saturating_sub(before.written);
    let per = |x: f64| if messages == 0 { 0.0 } else { x / messages as f64 };
    let mut line = json!({
        "engine": engine,
        "phase": phase,
        "messages": messages,
        "writes": writes,
        "wall_s": (wall * 1000.0).round() / 1000.0,
        "messages_per_s": if wall > 0.0 { (messages as f64 / wall).round() } else { 0.0 },
        "cpu_s": (cpu * 100.0).round() / 100.0,
        "cpu_us_per_message": per(cpu * 1e6).round(),
        "bytes_written": bytes,
        "kb_written_per_message": (per(bytes as f64) / 102.4).round() / 10.0,
        "disk_bytes": disk,
    });
    if let (Some(l), Some(e)) = (line.as_object_mut(), extra.as_object()) {
        l.extend(e.clone());
    }
    println!("{line}");
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let slices = record(&args).await?;
    let messages: u64 = slices.iter().map(|s| messages_in(s)).sum();
    let writes: u64 = slices.iter().map(|s| s.len() as u64).sum();
    let mut tables: BTreeMap<&str, u64> = BTreeMap::new();
    for w in slices.iter().flatten() {
        *tables.entry(w.table()).or_default() += 1;
    }
    eprintln!("recorded {} lists, {writes} writes, {messages} messages; writes by table: {tables:?}", slices.len());
    for kind in &args.engines {
        let dir = args.work.join(format!("{kind:?}").to_lowercase());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        replay(&args, *kind, &dir, &slices, messages, writes).await.with_context(|| format!("{kind:?}"))?;
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

fn messages_in(writes: &[Write]) -> u64 {
    writes.iter().filter(|w| matches!(w, Write::Message(_))).count() as u64
}

/// Projects the log with the real projector into a fresh SQLite store; returns the lists of
/// writes it applied, in order.
async fn record(args: &Args) -> Result<Vec<Vec<Write>>> {
    let log = EmbeddedLog::open(&args.log, 1024).map_err(|e| anyhow!("{e}"))?;
    let topics = Topics::new(args.topic_prefix.clone());
    let mut reader = log.read_all(&projection_topics(&topics)).await.map_err(|e| anyhow!("{e}"))?;
    let mut parts: BTreeMap<(String, i32), VecDeque<Record>> = BTreeMap::new();
    loop {
        let batch = reader.next_batch(10_000).await.map_err(|e| anyhow!("{e}"))?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            parts.entry((r.topic.clone(), r.partition)).or_default().push_back(r);
        }
    }
    let records: usize = parts.values().map(|q| q.len()).sum();
    if records == 0 {
        bail!("no records in the projection topics of {} (prefix {:?})", args.log.display(), args.topic_prefix);
    }
    eprintln!("read {records} records from {} partitions", parts.len());
    let dir = args.work.join("record");
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(SqliteStore::open(&dir)?);
    let recorded: Arc<Mutex<Vec<Vec<Write>>>> = Arc::default();
    let sink = recorded.clone();
    let tables: Arc<dyn Tables> = store.clone();
    let projector = Projector::new(tables, topics, args.keywords.clone())
        .with_tap(Arc::new(move |w: &[Write]| sink.lock().unwrap_or_else(|p| p.into_inner()).push(w.to_vec())));
    let before = Usage::now()?;
    let mut last_sync = Instant::now();
    while parts.values().any(|q| !q.is_empty()) {
        for q in parts.values_mut() {
            if q.is_empty() {
                continue;
            }
            let n = args.slice.min(q.len());
            let slice: Vec<Record> = q.drain(..n).collect();
            let handled = projector.handle(&slice).await.map_err(|e| anyhow!("projecting: {e}"))?;
            if !handled.dead.is_empty() {
                eprintln!("{} records refused (dead letters): {:?}", handled.dead.len(), handled.dead.first());
            }
        }
        if last_sync.elapsed().as_secs_f64() >= args.sync_every {
            projector.sync().await.map_err(|e| anyhow!("{e}"))?;
            last_sync = Instant::now();
        }
    }
    projector.sync().await.map_err(|e| anyhow!("{e}"))?;
    drop(projector);
    drop(store);
    let after = Usage::now()?;
    let slices = std::mem::take(&mut *recorded.lock().unwrap_or_else(|p| p.into_inner()));
    let messages = slices.iter().map(|s| messages_in(s)).sum();
    let writes = slices.iter().map(|s| s.len() as u64).sum();
    report("sqlite", "project (real projector, reads included)", (messages, writes), &before, &after, dir_size(&dir), json!({"records": records}));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(slices)
}

async fn replay(args: &Args, kind: EngineKind, dir: &Path, slices: &[Vec<Write>], messages: u64, writes: u64) -> Result<()> {
    let before = Usage::now()?;
    let mut engine = Engine::open(kind, dir)?;
    let start = Instant::now();
    let mut last_sync = Instant::now();
    let mut sent = 0u64;
    let mut syncs = 0u64;
    for s in slices {
        if args.rate > 0 {
            let due = start + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        engine.apply(s).await?;
        sent += messages_in(s);
        if last_sync.elapsed().as_secs_f64() >= args.sync_every {
            engine.sync().await?;
            syncs += 1;
            last_sync = Instant::now();
        }
    }
    engine.sync().await?;
    syncs += 1;
    let state = engine.finish(dir)?;
    let after = Usage::now()?;
    let name = format!("{kind:?}").to_lowercase();
    let phase = if args.rate > 0 { format!("replay at {}/s", args.rate) } else { "replay, unpaced".to_owned() };
    report(&name, &phase, (messages, writes), &before, &after, dir_size(dir), json!({"synced_commits": syncs, "state_bytes": state}));
    Ok(())
}

/// A row as a key-value engine stores it.
struct Row {
    table: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
    rule: Rule,
}

#[derive(Clone, Copy)]
enum Rule {
    /// Written blindly (a set row, or the whole row from its single writer).
    Put,
    /// The highest version wins (the version is the value's first eight bytes).
    Max,
    /// The lowest version wins.
    Min,
}

/// Columns encoded as SQLite holds them: text as its bytes, integers as eight bytes.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn t(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn i(mut self, n: i64) -> Self {
        self.0.extend_from_slice(&((n as u64) ^ (1 << 63)).to_be_bytes());
        self
    }
    fn ot(self, s: Option<String>) -> Self {
        match s {
            Some(s) => self.t(&s),
            None => self.t(""),
        }
    }
    fn oi(self, n: Option<i64>) -> Self {
        self.i(n.unwrap_or(i64::MIN))
    }
}

fn ms(t: &chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

fn row(table: &'static str, key: Enc, value: Enc, rule: Rule) -> Row {
    Row { table, key: key.0, value: value.0, rule }
}

/// The rows a write puts, with SQLite's columns and merge rules.
fn rows(w: &Write) -> Vec<Row> {
    use Rule::*;
    let e = Enc::default;
    match w {
        Write::User { user, username, at } => vec![row("users", e().t(&user.to_string()), e().t(username).i(ms(at)), Put)],
        Write::Message(m) => {
            let (c, id) = (m.conversation_id.as_str(), m.message_id.to_string());
            let media = m.media.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default());
            vec![
                row(
                    "messages",
                    e().t(c).i(chat_store::bucket_of(m.message_id).into()).t(&id),
                    e().t(&m.sender.to_string()).t(&m.sender_device).t(&m.client_msg_id).t(&m.kind).t(&m.body).i(ms(&m.sent_at)).i(m.position).ot(media),
                    Put,
                ),
                row("message_index", e().t(&id), e().t(c).t(&m.sender.to_string()).i(ms(&m.sent_at)).i(m.position), Put),
            ]
        }
        Write::Bucket { conversation, bucket } => vec![row("conversation_buckets", e().t(conversation.as_str()).i((*bucket).into()), e(), Put)],
        Write::Inbox(r) => vec![row(
            "inbox",
            e().t(&r.user_id.to_string()).t(r.conversation_id.as_str()),
            e().ot(r.peer_id.map(|p| p.to_string()))
                .t(&r.last_message_id.to_string())
                .t(&r.last_sender.to_string())
                .t(&r.last_kind)
                .t(&r.last_body)
                .i(ms(&r.last_at))
                .i(r.unread.into())
                .oi(r.first_unread_seq)
                .ot(r.read_up_to.map(|m| m.to_string()))
                .i(r.applied_offset)
                .i(r.wrote.into()),
            Put,
        )],
        Write::StreamMessage { user, message, seq, mark } => {
            vec![row("stream_messages", e().t(&user.to_string()).t(&message.to_string()).i(*seq), e().i(mark.code().into()), Put)]
        }
        // Edits, deletes and reactions are rare next to sends: not part of the write mix measured here.
        Write::MessageEdited { .. }
        | Write::MessageDeleted { .. }
        | Write::TopicRemoved { .. }
        | Write::HiddenMessage { .. }
        | Write::MessageVersion { .. }
        | Write::Reaction { .. }
        | Write::Privacy(_)
        | Write::Block(_) => Vec::new(),
        Write::Stream { user, row: s } => vec![row("user_stream", e().t(&user.to_string()).i(s.seq), e().t(&s.item_id.to_string()).t(&s.item), Put)],
        Write::StreamHead { user, source_partition, position } => {
            vec![row("stream_heads", e().t(&user.to_string()).i((*source_partition).into()), e().i(*position), Max)]
        }
        Write::Receipt(r) => {
            let (m, to, from) = (r.message_id.to_string(), r.recipient.to_string(), r.sender.to_string());
            let mut out = vec![row(
                "receipts",
                e().t(&m).i(ms(&r.at)).t(&to).t(r.status.as_str()).t(&r.device_id),
                e().t(&from).t(r.conversation_id.as_str()),
                Put,
            )];
            if r.in_user_audit() {
                out.push(row(
                    "receipts_by_user",
                    e().t(&to).t(&m).t(r.status.as_str()).t(&r.device_id),
                    e().i(ms(&r.at)).t(&from).t(r.conversation_id.as_str()),
                    Min,
                ));
            }
            out
        }
        Write::Presence { user, online, at } => {
            vec![row("last_seen", e().t(&user.to_string()), e().i(ms(at)).t(if *online { "online" } else { "offline" }).i(ms(at)), Max)]
        }
        Write::Group(g) => vec![row(
            "groups",
            e().t(g.conversation_id.as_str()),
            e().i(g.position).t(&g.name).t(&g.creator.to_string()).i(ms(&g.created_at)),
            Max,
        )],
        Write::GroupName { conversation, name, position } => vec![row("groups_name", e().t(conversation.as_str()), e().i(*position).t(name), Max)],
        Write::GroupMember(m) => vec![row(
            "group_members",
            e().t(m.conversation_id.as_str()).t(&m.member.to_string()),
            e().i(m.position).t(m.role.as_str()).i(m.active.into()),
            Max,
        )],
        Write::UserGroup(g) => vec![row(
            "user_groups",
            e().t(&g.user_id.to_string()).t(g.conversation_id.as_str()),
            e().i(g.position).t(g.role.as_str()).i(g.active.into()),
            Max,
        )],
        Write::UserGroupInterval { user, conversation, since, until } => {
            // A close stays: the closed version (any `until`) beats the open one.
            vec![row("user_group_intervals", e().t(&user.to_string()).t(conversation.as_str()).i(*since), e().i(until.map_or(0, |_| 1)).oi(*until), Max)]
        }
        Write::Profile(p) => vec![row(
            "profiles",
            e().t(&p.user_id.to_string()),
            e().i(ms(&p.updated_at)).t(&p.display_name).ot(p.avatar_media_id.map(|a| a.to_string())),
            Max,
        )],
        Write::MessageCount { key, messages, applied_offset } => vec![row(
            "analytics_message_counts",
            e().t(&key.day.to_string()).t(&key.kind).t(&key.scope).i(i64::from(key.partition)),
            e().i(*applied_offset).i(*messages),
            Max,
        )],
        Write::ActiveUser { day, user } => vec![row("analytics_active_users", e().t(&day.to_string()).t(&user.to_string()), e(), Put)],
        Write::ProfileView { viewed, day, viewer, view } => vec![row(
            "analytics_profile_views",
            e().t(&viewed.to_string()).t(&day.to_string()).t(&viewer.to_string()).t(&view.to_string()),
            e(),
            Put,
        )],
        Write::Topic { day, topic, message, sender } => {
            vec![row("analytics_topics", e().t(&day.to_string()).t(topic).t(&message.to_string()), e().t(&sender.to_string()), Put)]
        }
        Write::MediaMessage { media, conversation, message, position } => vec![row(
            "media_messages",
            e().t(&media.to_string()).t(conversation.as_str()).t(&message.to_string()),
            e().i(*position),
            Put,
        )],
    }
}

/// Whether `new` replaces `old` under the rule.
fn wins(rule: Rule, old: Option<&[u8]>, new: &[u8]) -> bool {
    let version = |v: &[u8]| v.get(..8).map(|b| b.to_vec()).unwrap_or_default();
    match (rule, old) {
        (Rule::Put, _) | (_, None) => true,
        (Rule::Max, Some(o)) => version(new) > version(o),
        (Rule::Min, Some(o)) => version(new) < version(o),
    }
}

enum Engine {
    Sqlite(Arc<SqliteStore>),
    Fjall { db: fjall::Database, spaces: HashMap<&'static str, fjall::Keyspace> },
    Redb(redb::Database),
    Memory(HashMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>),
}

impl Engine {
    fn open(kind: EngineKind, dir: &Path) -> Result<Engine> {
        Ok(match kind {
            EngineKind::Sqlite => Engine::Sqlite(Arc::new(SqliteStore::open(dir)?)),
            // Journal writes go to the OS with each batch (the default); `persist` syncs them.
            EngineKind::Fjall => Engine::Fjall { db: fjall::Database::builder(dir.join("fjall")).open()?, spaces: HashMap::new() },
            EngineKind::Redb => Engine::Redb(redb::Database::create(dir.join("tables.redb"))?),
            EngineKind::Memory => Engine::Memory(HashMap::new()),
        })
    }

    async fn apply(&mut self, writes: &[Write]) -> Result<()> {
        match self {
            Engine::Sqlite(s) => s.apply(writes.to_vec()).await?,
            Engine::Fjall { db, spaces } => {
                let mut batch = db.batch();
                // Rows this list already wrote (a read must see them; the batch is not readable).
                let mut pending: HashMap<(&'static str, Vec<u8>), Vec<u8>> = HashMap::new();
                for r in writes.iter().flat_map(rows) {
                    if !spaces.contains_key(r.table) {
                        let ks = db.keyspace(r.table, fjall::KeyspaceCreateOptions::default)?;
                        spaces.insert(r.table, ks);
                    }
                    let ks = &spaces[r.table];
                    if !matches!(r.rule, Rule::Put) {
                        let old = match pending.get(&(r.table, r.key.clone())) {
                            Some(v) => Some(v.clone()),
                            None => ks.get(&r.key)?.map(|v| v.to_vec()),
                        };
                        if !wins(r.rule, old.as_deref(), &r.value) {
                            continue;
                        }
                        pending.insert((r.table, r.key.clone()), r.value.clone());
                    }
                    batch.insert(ks, r.key, r.value);
                }
                batch.commit()?;
            }
            Engine::Redb(db) => {
                let mut tx = db.begin_write()?;
                tx.set_durability(redb::Durability::None)?;
                for r in writes.iter().flat_map(rows) {
                    let mut t = tx.open_table(redb::TableDefinition::<&[u8], &[u8]>::new(r.table))?;
                    if !matches!(r.rule, Rule::Put) {
                        let old = t.get(r.key.as_slice())?.map(|v| v.value().to_vec());
                        if !wins(r.rule, old.as_deref(), &r.value) {
                            continue;
                        }
                    }
                    t.insert(r.key.as_slice(), r.value.as_slice())?;
                }
                tx.commit()?;
            }
            Engine::Memory(maps) => {
                for r in writes.iter().flat_map(rows) {
                    let m = maps.entry(r.table).or_default();
                    if wins(r.rule, m.get(&r.key).map(|v| v.as_slice()), &r.value) {
                        m.insert(r.key, r.value);
                    }
                }
            }
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<()> {
        match self {
            Engine::Sqlite(s) => s.sync().await?,
            Engine::Fjall { db, .. } => db.persist(fjall::PersistMode::SyncAll)?,
            Engine::Redb(db) => {
                // An immediate commit makes every non-durable commit before it durable.
                let mut tx = db.begin_write()?;
                tx.set_durability(redb::Durability::Immediate)?;
                tx.commit()?;
            }
            // The in-memory design's durability is the log's; its snapshot is taken at the end.
            Engine::Memory(_) => {}
        }
        Ok(())
    }

    /// Waits for the engine's background work, closes it; returns the bytes of live rows
    /// (keys and values; for the in-memory design, the size of its snapshot).
    fn finish(self, dir: &Path) -> Result<u64> {
        Ok(match self {
            Engine::Sqlite(s) => {
                drop(s);
                0
            }
            Engine::Fjall { db, spaces } => {
                // Memtables still in memory are only in the journal; flushing them is part of
                // the cost of the writes.
                for ks in spaces.values() {
                    ks.rotate_memtable_and_wait()?;
                }
                let deadline = Instant::now() + Duration::from_secs(120);
                while (db.outstanding_flushes() > 0 || db.active_compactions() > 0) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                db.persist(fjall::PersistMode::SyncAll)?;
                drop(spaces);
                drop(db);
                0
            }
            Engine::Redb(db) => {
                drop(db);
                0
            }
            Engine::Memory(maps) => {
                use std::io::Write as _;
                let path = dir.join("snapshot");
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                let mut n = 0u64;
                for (table, m) in &maps {
                    for (k, v) in m {
                        f.write_all(table.as_bytes())?;
                        f.write_all(&(k.len() as u32).to_le_bytes())?;
                        f.write_all(k)?;
                        f.write_all(&(v.len() as u32).to_le_bytes())?;
                        f.write_all(v)?;
                        n += (table.len() + 8 + k.len() + v.len()) as u64;
                    }
                }
                f.into_inner().map_err(|e| anyhow!("{e}"))?.sync_all()?;
                n
            }
        })
    }
}

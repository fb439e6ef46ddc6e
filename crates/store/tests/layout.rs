//! The embedded store's two files: a data directory from a version that kept the command tables
//! in `tables.db` has them moved to `commands.db` on open, rows intact, and the send gates of
//! versions before the delivery pipeline v2 become the fan-out's accepted sends; `sync` answers.

use std::sync::Arc;

use chat_events::{ConversationId, MessageId, UserId};
use chat_store::{CommandStore, Durable, FanoutStore, ReadStore, SqliteStore};
use rusqlite::Connection;

fn fresh_dir(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("chat-layout").join(format!("{what}-{}", uuid::Uuid::new_v4().simple()))
}

fn table_names(path: &std::path::Path) -> Vec<String> {
    let c = Connection::open(path).expect("open");
    let mut st = c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").expect("prepare");
    st.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_tables_move_out_of_an_old_tables_db() {
    let dir = fresh_dir("old");
    std::fs::create_dir_all(&dir).expect("dir");
    let user = UserId::random();
    let message = MessageId::new_v7();
    let conv = ConversationId::direct(user, UserId::random());
    {
        // The old layout: the command tables in tables.db, next to a projection table.
        let c = Connection::open(dir.join("tables.db")).expect("old tables.db");
        c.execute_batch(
            "CREATE TABLE accounts_by_name (username TEXT PRIMARY KEY, user_id TEXT NOT NULL, password_hash TEXT NOT NULL, created_at INTEGER NOT NULL);
             CREATE TABLE accounts_by_id (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, created_at INTEGER NOT NULL);
             CREATE TABLE send_dedup (sender TEXT NOT NULL, client_msg_id TEXT NOT NULL, message_id TEXT NOT NULL, conversation_id TEXT NOT NULL, sent_at INTEGER NOT NULL, body_sha256 TEXT NOT NULL, committed INTEGER NOT NULL, PRIMARY KEY (sender, client_msg_id));
             CREATE TABLE message_owners (message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, sender TEXT NOT NULL);
             CREATE TABLE media_objects (media_id TEXT PRIMARY KEY, uploader TEXT NOT NULL, kind TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, public INTEGER NOT NULL);
             CREATE TABLE media_shares (media_id TEXT NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (media_id, conversation_id)) WITHOUT ROWID;
             CREATE TABLE users (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, registered_at INTEGER NOT NULL);",
        )
        .expect("old schema");
        c.execute(
            "INSERT INTO accounts_by_name VALUES ('alice', ?1, 'hash', 1000)",
            [user.to_string()],
        )
        .expect("account");
        c.execute("INSERT INTO accounts_by_id VALUES (?1, 'alice', 1000)", [user.to_string()]).expect("account id");
        c.execute(
            "INSERT INTO send_dedup VALUES (?1, 'c1', ?2, ?3, 2000, 'sha', 1)",
            [user.to_string(), message.to_string(), conv.as_str().to_owned()],
        )
        .expect("reservation");
        c.execute("INSERT INTO message_owners VALUES (?1, ?2, ?3)", [message.to_string(), conv.as_str().to_owned(), user.to_string()])
            .expect("owner");
        c.execute("INSERT INTO users VALUES (?1, 'alice', 1000)", [user.to_string()]).expect("user");
    }

    for round in 0..2 {
        // Opening twice: the second open finds nothing left to move and changes nothing.
        let store = Arc::new(SqliteStore::open(&dir).expect("open"));
        let account = store.account_by_name("alice").await.expect("read").expect("account moved");
        assert_eq!(account.user_id, user, "round {round}");
        assert_eq!(store.account_by_id(user).await.expect("read").as_deref(), Some("alice"));
        // The reservation is now the fan-out's accepted send (position unknown: -1).
        let res = store.send_record(&conv, user, "c1").await.expect("read").expect("reservation moved");
        assert_eq!((res.message_id, res.content_sha256.as_str(), res.position, res.sent_at.timestamp_millis()), (message, "sha", -1, 2000));
        // The projection table stayed where it was.
        assert!(store.in_inbox(user, &conv).await.is_ok());
        drop(store);
        let tables = table_names(&dir.join("tables.db"));
        assert!(tables.contains(&"users".to_owned()), "{tables:?}");
        for gone in ["accounts_by_name", "accounts_by_id", "media_objects", "media_shares"] {
            assert!(!tables.contains(&gone.to_owned()), "{gone} still in tables.db: {tables:?}");
            assert!(table_names(&dir.join("commands.db")).contains(&gone.to_owned()), "{gone} not in commands.db");
        }
        for gone in ["send_dedup", "message_owners"] {
            assert!(!tables.contains(&gone.to_owned()) && !table_names(&dir.join("commands.db")).contains(&gone.to_owned()), "{gone} is left");
        }
        assert!(tables.contains(&"sends".to_owned()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_directory_has_command_tables_only_in_commands_db() {
    let dir = fresh_dir("new");
    let store = Arc::new(SqliteStore::open(&dir).expect("open"));
    store.sync().await.expect("sync answers");
    store.sync().await.expect("sync answers again");
    drop(store);
    assert!(table_names(&dir.join("tables.db")).contains(&"sends".to_owned()));
    assert!(table_names(&dir.join("commands.db")).contains(&"accounts_by_name".to_owned()));
    assert!(!table_names(&dir.join("commands.db")).contains(&"send_dedup".to_owned()));
    let marks: i64 = Connection::open(dir.join("tables.db"))
        .expect("open")
        .query_row("SELECT n FROM sync_marks WHERE id = 1", [], |r| r.get(0))
        .expect("a synced commit wrote its mark");
    assert_eq!(marks, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

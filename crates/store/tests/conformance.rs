//! The table-store conformance suite (`chat_store::conformance`) on SQLite, through the
//! gateway's handle and through a worker's pipelined one. The same suite runs against Cassandra
//! in `tests/e2e/conformance.rs`.

use std::sync::Arc;

use chat_store::{conformance, SqliteStore, Tables};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = std::env::temp_dir().join("chat-conformance").join(format!("store-{}", uuid::Uuid::new_v4().simple()));
    let tables: Arc<dyn Tables> = Arc::new(SqliteStore::open(&dir).expect("open the SQLite store"));
    conformance::run_all(tables).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sqlite_store_conforms() {
    let dir = std::env::temp_dir().join("chat-conformance").join(format!("pipelined-{}", uuid::Uuid::new_v4().simple()));
    let store = SqliteStore::open(&dir).expect("open the SQLite store");
    let tables: Arc<dyn Tables> = Arc::new(store.pipelined());
    let mark = tables.write_mark();
    conformance::run_all(tables.clone()).await;
    tables.settle(mark).await.expect("every write of the suite committed");
    let _ = std::fs::remove_dir_all(&dir);
}

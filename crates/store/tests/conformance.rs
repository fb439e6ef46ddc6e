//! The table-store conformance suite (`chat_store::conformance`) on SQLite. The same suite runs
//! against Cassandra in `tests/e2e/conformance.rs`.

use std::sync::Arc;

use chat_store::{conformance, SqliteStore, Tables};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = std::env::temp_dir().join("chat-conformance").join(format!("store-{}", uuid::Uuid::new_v4().simple()));
    let tables: Arc<dyn Tables> = Arc::new(SqliteStore::open(&dir).expect("open the SQLite store"));
    conformance::run_all(tables).await;
    let _ = std::fs::remove_dir_all(&dir);
}

//! The table-store conformance suite (`chat_store::conformance`) on the embedded back-ends:
//! SQLite, and the tables on fjall with the command side on SQLite. The same suite runs against
//! Cassandra in `tests/e2e/conformance.rs`.

use std::sync::Arc;

use chat_store::{conformance, FjallStore, SqliteStore, Tables};

fn scratch(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("chat-conformance").join(format!("{tag}-{}", uuid::Uuid::new_v4().simple()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = scratch("sqlite");
    let tables: Arc<dyn Tables> = Arc::new(SqliteStore::open(&dir).expect("open the SQLite store"));
    conformance::run_all(tables).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_store_conforms() {
    let dir = scratch("fjall");
    let tables: Arc<dyn Tables> = Arc::new(FjallStore::open(&dir).expect("open the fjall store"));
    conformance::run_all(tables).await;
    let _ = std::fs::remove_dir_all(&dir);
}

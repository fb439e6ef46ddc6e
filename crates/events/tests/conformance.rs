//! The event-log conformance suite (`chat_events::conformance`) on the embedded log. The same
//! suite runs against Kafka in `tests/e2e/conformance.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use chat_events::embedded::EmbeddedLog;
use chat_events::{conformance, EventLog};

/// A fresh data directory of its own under the system's temp dir.
fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join("chat-conformance").join(format!("{name}-{}", uuid::Uuid::new_v4().simple()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_conforms() {
    let dir = temp_dir("events");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir, 1024).expect("open the embedded log"));
    conformance::run_all(log, "conf.").await;
    let _ = std::fs::remove_dir_all(&dir);
}

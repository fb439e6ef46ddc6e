//! A projection worker's pipelined handle on the embedded store: reads see the writes issued
//! before them without waiting for a commit, `settle` reports when they are committed, and a
//! failed write rolls its whole transaction back and makes `settle` fail (so the worker redoes
//! the slice instead of counting lost writes as done).

use chat_events::{ConversationId, MessageId, ReceiptStatus, UserId};
use chat_store::{Durable, ProjectionStore, ReadStore, ReceiptRow, SqliteStore};

fn fresh_dir(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("chat-pipelined").join(format!("{what}-{}", uuid::Uuid::new_v4().simple()))
}

fn receipt(message: MessageId, recipient: UserId, conv: &ConversationId, device: &str) -> ReceiptRow {
    ReceiptRow {
        message_id: message,
        recipient,
        status: ReceiptStatus::Delivered,
        device_id: device.into(),
        at: chrono::Utc::now(),
        conversation_id: conv.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_earlier_writes_and_settle_makes_them_visible_to_everyone() {
    let dir = fresh_dir("visible");
    let store = SqliteStore::open(&dir).expect("open");
    let worker = store.pipelined();
    let (a, b) = (UserId::random(), UserId::random());
    let conv = ConversationId::direct(a, b);
    let mut ids = Vec::new();
    let mark = worker.write_mark();
    for _ in 0..200 {
        let m = MessageId::new_v7();
        ids.push(m);
        worker.put_receipts(&[receipt(m, b, &conv, "d1")]).await.expect("queued");
        // The worker's own read runs after its write, in the same open transaction.
        assert_eq!(worker.receipts(m).await.expect("read").len(), 1, "a pipelined read misses the write before it");
    }
    worker.settle(mark).await.expect("settle");
    // Committed: the gateway's handle (its own read connections) sees every row.
    for m in ids {
        assert_eq!(store.receipts(m).await.expect("read").len(), 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_rolls_its_transaction_back_and_settle_reports_it() {
    let dir = fresh_dir("failed");
    let store = SqliteStore::open(&dir).expect("open");
    // A trigger that rejects one device id stands in for a write the database refuses.
    rusqlite::Connection::open(dir.join("tables.db"))
        .expect("open tables.db")
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON receipts WHEN NEW.device_id = 'refused'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .expect("trigger");
    let worker = store.pipelined();
    let (a, b) = (UserId::random(), UserId::random());
    let conv = ConversationId::direct(a, b);
    let (good, bad) = (MessageId::new_v7(), MessageId::new_v7());

    let mark = worker.write_mark();
    // One write of two rows: the first inserted, the second refused. The write itself only
    // queues; the failure surfaces at settle, and nothing of its transaction stays.
    worker.put_receipts(&[receipt(good, b, &conv, "d1"), receipt(bad, b, &conv, "refused")]).await.expect("queued");
    let err = worker.settle(mark).await.expect_err("settle must report the rolled-back transaction");
    assert!(err.to_string().contains("did not commit"), "{err}");
    assert!(store.receipts(good).await.expect("read").is_empty(), "a row of the rolled-back transaction is visible");
    assert!(worker.receipts(good).await.expect("read").is_empty());

    // The retry (a new slice, a new mark) without the refused row commits.
    let mark = worker.write_mark();
    worker.put_receipts(&[receipt(good, b, &conv, "d1")]).await.expect("queued");
    worker.settle(mark).await.expect("settle after the retry");
    assert_eq!(store.receipts(good).await.expect("read").len(), 1);
    worker.sync().await.expect("sync");
    let _ = std::fs::remove_dir_all(&dir);
}

//! End-to-end scenarios of the messaging core, against real Kafka, Cassandra and Redis and the
//! real `chat` binary (run with `bash scripts/test.sh`). The letters follow the acceptance
//! list of the core issue.

mod abuse;
mod conformance;
mod edits;
mod faults;
mod groups;
mod harness;
mod privacy;
mod product;
mod reactions;
mod search;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chat_events::TopicKind;
use abuse::*;
use edits::*;
use faults::*;
use groups::*;
use harness::*;
use privacy::*;
use product::*;
use reactions::*;
use search::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn is_type(t: &'static str) -> impl Fn(&Value) -> bool {
    move |f| f["type"] == t
}

/// a. Two nodes: send on node 1, receive on node 2, delivered and seen receipts back, and the
/// receipt timeline in order.
async fn a_two_nodes_send_deliver_read_receipts(mode: Mode) {
    let s = Scope::new("a", mode).await;
    let gw1 = s.gateway("n1").await;
    // Embedded mode has one process: both users on it.
    let second = match mode {
        Mode::Cluster => Some(s.gateway("n2").await),
        Mode::Embedded => None,
    };
    let gw2 = second.as_ref().unwrap_or(&gw1);
    let _worker = s.worker().await;
    let alice = gw1.register("alice").await;
    let bob = gw2.register("bob").await;
    let mut a = gw1.connect(&alice, "phone").await;
    let mut b = gw2.connect(&bob, "phone").await;

    let sent = a.send_text(&bob.id, "m-1", "hello bob").await;
    let mid = sent["message_id"].as_str().unwrap().to_owned();
    assert!(sent["sent_at"].as_str().unwrap().ends_with('Z'));

    let msg = b.expect("message", T, |f| f["type"] == "message" && f["message_id"] == json!(mid)).await;
    assert_eq!(msg["body"], "hello bob");
    assert_eq!(msg["sender"], json!(alice.id));
    let conv = msg["conversation_id"].as_str().unwrap().to_owned();

    let ack = b.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let r = a.expect("delivered receipt", T, |f| f["type"] == "receipt" && f["status"] == "delivered").await;
    assert_eq!(r["message_id"], json!(mid));
    assert_eq!(r["by"], json!(bob.id));

    // Only real messages of the conversation, sent by the other member, can be acknowledged.
    let bogus = b.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [uuid::Uuid::now_v7().to_string()]})).await;
    assert_eq!(bogus["code"], "not_found", "{bogus}");
    let own = a.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]})).await;
    assert_eq!(own["code"], "not_found", "{own}");
    let bogus = b.request(json!({"type": "read", "conversation_id": conv, "up_to": uuid::Uuid::now_v7().to_string()})).await;
    assert_eq!(bogus["code"], "not_found", "{bogus}");

    let ack = b.request(json!({"type": "read", "conversation_id": conv, "up_to": mid})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let r = a.expect("seen receipt", T, |f| f["type"] == "receipt" && f["status"] == "seen").await;
    assert_eq!(r["message_id"], json!(mid));

    let receipts = wait_for("three receipts", T, || async {
        let (_, body) = gw1.get(&alice.token, &format!("/v1/messages/{mid}/receipts")).await;
        let list = body["receipts"].as_array().cloned().unwrap_or_default();
        (list.len() == 3).then_some(list)
    })
    .await;
    let statuses: Vec<&str> = receipts.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["sent", "delivered", "seen"]);
    let times: Vec<&str> = receipts.iter().map(|r| r["at"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "timestamps must not decrease: {times:?}");
    assert!(receipts.iter().all(|r| r["recipient"] == json!(bob.id)));
    // Bob (a recipient) may read them too.
    let (status, _) = gw2.get(&bob.token, &format!("/v1/messages/{mid}/receipts")).await;
    assert_eq!(status, 200);

    // History pages newest first, by time-ordered id, across pages.
    for i in 2..=5 {
        a.send_text(&bob.id, &format!("m-{i}"), &format!("n{i}")).await;
    }
    let page = wait_for("history of 5", T, || async {
        let (_, body) = gw2.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=3")).await;
        let msgs = body["messages"].as_array().cloned().unwrap_or_default();
        (msgs.len() == 3 && msgs[0]["body"] == "n5").then_some(body)
    })
    .await;
    let bodies: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, vec!["n5", "n4", "n3"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, next) = gw2.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=3&before={cursor}")).await;
    let bodies: Vec<&str> = next["messages"].as_array().unwrap().iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, vec!["n2", "hello bob"]);
    assert!(next.get("next_cursor").is_none());

    // The conversation list of both sides.
    let (_, list) = gw1.get(&alice.token, "/v1/conversations").await;
    let c = &list["conversations"][0];
    assert_eq!(c["conversation_id"], json!(conv));
    assert_eq!(c["peer_id"], json!(bob.id));
    let (_, list) = gw2.get(&bob.token, "/v1/conversations").await;
    assert_eq!(list["conversations"][0]["unread"], json!(4), "{list}");
}

/// b. Offline delivery: 200 messages while bob is away, then sync on two devices.
async fn b_offline_sync_is_complete_ordered_and_unique(mode: Mode) {
    let s = Scope::new("b", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;

    // Bob's phone syncs once (nothing yet) and goes away with its cursor.
    let mut phone = gw.connect(&bob, "phone").await;
    let (items, cursor) = phone.sync_until(None, 0, T).await;
    assert!(items.is_empty());
    phone.close().await;

    let mut a = gw.connect(&alice, "laptop").await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let f = a.send_text(&bob.id, &format!("c-{i:03}"), &format!("message {i}")).await;
        ids.push(f["message_id"].as_str().unwrap().to_owned());
    }

    let mut phone = gw.connect(&bob, "phone").await;
    let (items, _) = phone.sync_until(cursor, 200, Duration::from_secs(120)).await;
    check_200(&items, &ids);

    // A device that connects later gets all of them from the beginning too.
    let mut tablet = gw.connect(&bob, "tablet").await;
    let (items, _) = tablet.sync_until(None, 200, T).await;
    check_200(&items, &ids);
}

fn check_200(items: &[Value], ids: &[String]) {
    assert_eq!(items.len(), 200, "exactly 200 items");
    let got: Vec<&str> = items.iter().map(|i| i["message_id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(unique.len(), 200, "no duplicates");
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "in send order");
    let cursors: Vec<i64> = items.iter().map(|i| i["cursor"].as_str().unwrap().parse().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "cursors strictly increase");
    assert!(items.iter().all(|i| i["kind"] == "message"));
}

/// c. The same client_msg_id three times, once across a reconnect: one id, one event, one row.
async fn c_retried_send_is_one_message(mode: Mode) {
    let s = Scope::new("c", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;

    let mut a = gw.connect(&alice, "phone").await;
    let first = a.send_text(&bob.id, "same-id", "only once").await;
    let second = a.send_text(&bob.id, "same-id", "only once").await;
    a.close().await;
    let mut a = gw.connect(&alice, "phone").await;
    let third = a.send_text(&bob.id, "same-id", "only once").await;
    let mid = first["message_id"].clone();
    assert_eq!(second["message_id"], mid);
    assert_eq!(third["message_id"], mid);
    assert_eq!(second["sent_at"], first["sent_at"]);
    // The same id with another body is a reuse, refused.
    let reuse = a.request(json!({"type": "send", "client_msg_id": "same-id", "to": bob.id, "body": "something else"})).await;
    assert_eq!(reuse["code"], "client_msg_id_reused", "{reuse}");
    // A different id is a different message.
    let other = a.send_text(&bob.id, "other-id", "another").await;
    assert_ne!(other["message_id"], mid);

    s.wait_settled(T).await;
    let events: Vec<Value> = s
        .read_topic(TopicKind::Conversations)
        .into_iter()
        .filter(|e| e["type"] == "message.sent" && e["data"]["client_msg_id"] == "same-id")
        .collect();
    assert_eq!(events.len(), 1, "one event in the topic");
    assert_eq!(events[0]["data"]["message_id"], mid);

    let conv = events[0]["data"]["conversation_id"].as_str().unwrap().to_owned();
    let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages")).await;
    let rows = page["messages"].as_array().unwrap().iter().filter(|m| m["client_msg_id"] == "same-id").count();
    assert_eq!(rows, 1, "one history row");
    let mut b = gw.connect(&bob, "phone").await;
    assert_eq!(b.welcome["pending"], 2, "two unread messages: {}", b.welcome);
    let (items, _) = b.sync_until(None, 2, T).await;
    assert_eq!(items.iter().filter(|i| i["message_id"] == mid).count(), 1, "one stream item");
    let (_, r) = gw.get(&alice.token, &format!("/v1/messages/{}/receipts", mid.as_str().unwrap())).await;
    assert_eq!(r["receipts"].as_array().unwrap().len(), 1, "one sent receipt: {r}");
    let sums = s.checksums().await;
    assert_eq!(sums["messages"].rows, 2);
    assert_eq!(sums["message_index"].rows, 2);
    assert_eq!(sums["inbox"].rows, 2, "one conversation row each");
    // Read up to the first: the welcome's count of unread messages drops to the other one.
    let ack = b.request(json!({"type": "read", "conversation_id": conv, "up_to": mid})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    wait_for("welcome.pending 1", T, || async { (gw.connect(&bob, "laptop").await.welcome["pending"] == 1).then_some(()) }).await;
}

/// The `message.sent` events of one `client_msg_id` in the conversations topic.
fn sends_of(s: &Scope, cmid: &str) -> Vec<Value> {
    s.read_topic(TopicKind::Conversations).into_iter().filter(|e| e["type"] == "message.sent" && e["data"]["client_msg_id"] == cmid).collect()
}

/// c2. A gateway appended a send and died before the client got `sent`: the client re-sends
/// (`retry`) to a gateway that never saw the first attempt and gets the first attempt's message
/// id and time; the recipient gets one message.
async fn c2_retry_after_a_crash_between_append_and_ack(mode: Mode) {
    let s = Scope::new("c2", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let (a_id, b_id): (chat_events::UserId, chat_events::UserId) = (alice.id.parse().unwrap(), bob.id.parse().unwrap());
    let conv = chat_events::ConversationId::direct(a_id, b_id);
    // What the dead gateway appended: a message.sent that no client heard of.
    let first = chat_events::Envelope::new(
        chat_events::derive_id::message_sent(a_id, "lost-ack"),
        Some(a_id),
        chat_events::Event::MessageSent(chat_events::MessageSent {
            message_id: chat_events::MessageId::new_v7(),
            conversation_id: conv.clone(),
            sender: a_id,
            sender_device: "phone".parse().unwrap(),
            client_msg_id: "lost-ack".into(),
            kind: chat_events::MessageKind::Text,
            body: "did it arrive?".into(),
            media: None,
            reply_to: None,
            mentions: Vec::new(),
            withheld: false,
        }),
    );
    let chat_events::Event::MessageSent(m) = &first.event else { unreachable!() };
    let first_id = m.message_id.to_string();
    let gw = match mode {
        Mode::Cluster => {
            chat_events::append_event(&s.log(), &s.topics(), &first).await.expect("append");
            gw
        }
        Mode::Embedded => {
            // The one process stops; the append lands in its data directory; a new one starts.
            gw.proc.terminate().await;
            let log = chat_events::embedded::EmbeddedLog::open(&s.data_dir, 10).expect("open the log");
            chat_events::append_event(&log, &s.topics(), &first).await.expect("append");
            drop(log);
            s.gateway("n1b").await
        }
    };
    let mut a = gw.connect(&alice, "phone").await;
    let again = a.try_send_text_as(&bob.id, "lost-ack", "did it arrive?", true).await.expect("the re-send is answered");
    assert_eq!(again["message_id"], json!(first_id), "the first attempt's id: {again}");
    assert_eq!(again["sent_at"], json!(chat_events::format_time(&first.occurred_at)), "and its time");
    // Once more, on a fresh connection: the same answer.
    a.close().await;
    let mut a = gw.connect(&alice, "laptop").await;
    let third = a.try_send_text_as(&bob.id, "lost-ack", "did it arrive?", true).await.expect("answered");
    assert_eq!(third["message_id"], json!(first_id));
    // Other content under the same id is a reuse.
    let reuse = a.request(json!({"type": "send", "client_msg_id": "lost-ack", "to": bob.id, "body": "something else", "retry": true})).await;
    assert_eq!(reuse["code"], "client_msg_id_reused", "{reuse}");

    s.wait_settled(T).await;
    let mut b = gw.connect(&bob, "phone").await;
    let (items, _) = b.sync_until(None, 1, T).await;
    let got: Vec<&Value> = items.iter().filter(|i| i["client_msg_id"] == "lost-ack").collect();
    assert_eq!(got.len(), 1, "one message: {items:?}");
    assert_eq!(got[0]["message_id"], json!(first_id));
    let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages")).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "one history row: {page}");
}

/// c3. Two attempts of one send at once on two nodes, one of them a re-send: the log may get two
/// appends; the fan-out keeps the first and drops the other. The re-send is answered with the
/// message the fan-out kept; the recipient gets one message; the id of a dropped append (named
/// only in the answer of the attempt that was not marked as a re-send) is never delivered.
async fn c3_concurrent_attempts_on_two_nodes(mode: Mode) {
    let s = Scope::new("c3", mode).await;
    let n1 = s.gateway("n1").await;
    let n2 = s.gateway("n2").await;
    let _worker = s.worker().await;
    let alice = n1.register("alice").await;
    let bob = n1.register("bob").await;
    let mut delivered = Vec::new();
    for round in 0..5 {
        let cmid = format!("race-{round}");
        let mut a1 = n1.connect(&alice, "phone").await;
        let mut a2 = n2.connect(&alice, "phone").await;
        let (plain, retried) = tokio::join!(
            a1.try_send_text_as(&bob.id, &cmid, "once", false),
            a2.try_send_text_as(&bob.id, &cmid, "once", true),
        );
        let (plain, retried) = (plain.expect("answered"), retried.expect("answered"));
        // A third attempt, marked, on the first node: the same answer as the marked one.
        let third = a1.try_send_text_as(&bob.id, &cmid, "once", true).await.expect("answered");
        assert_eq!(third["message_id"], retried["message_id"], "round {round}");
        delivered.push((cmid, plain["message_id"].clone(), retried["message_id"].clone()));
    }
    s.wait_settled(T).await;
    let mut b = n1.connect(&bob, "phone").await;
    let (items, _) = b.sync_until(None, delivered.len(), T).await;
    for (cmid, plain, retried) in &delivered {
        let got: Vec<&Value> = items.iter().filter(|i| i["client_msg_id"] == json!(cmid)).collect();
        assert_eq!(got.len(), 1, "{cmid}: one message: {items:?}");
        assert_eq!(&got[0]["message_id"], retried, "{cmid}: the re-send names the message kept");
        if plain != retried {
            assert!(!items.iter().any(|i| &i["message_id"] == plain), "{cmid}: the dropped append is never delivered");
        }
        assert!(sends_of(&s, cmid).len() <= 2, "{cmid}: at most one append per attempt");
    }
}

/// A data directory written by the release before the delivery pipeline v2 (send reservations and
/// owner rows in `commands.db`, projections in layout 1; `tests/fixtures/v1-data`, made by
/// `tests/fixtures/make_v1_data.py`) is migrated when `chat run` opens it: accounts stay, the
/// projections are rebuilt from the log (same messages, receipts and cursors), a re-send of an
/// old `client_msg_id` gets its old message, an old message can still be acknowledged, new
/// messages flow, and a rebuild equals the live tables.
async fn migrates_a_v1_data_directory(mode: Mode) {
    let mut s = Scope::new("v1", mode).await;
    // The fixture was written with the default names.
    s.topic_prefix = "chat.".into();
    s.groups = Some(("chat-projections".into(), "chat-fanout".into()));
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-data");
    std::fs::create_dir_all(&s.data_dir).expect("data dir");
    for f in ["log.db", "commands.db", "tables.db", "token-secret"] {
        std::fs::copy(fixture.join(f), s.data_dir.join(f)).expect("copy the fixture");
    }
    let ids: Value = serde_json::from_slice(&std::fs::read(fixture.join("ids.json")).expect("ids.json")).expect("ids");
    let gw = s.gateway("n1").await;
    // The tables moved from SQLite to fjall; the old file is set aside, not deleted.
    assert!(s.data_dir.join("tables").is_dir(), "tables/ created");
    assert!(s.data_dir.join("tables.db.migrated").is_file() && !s.data_dir.join("tables.db").exists(), "tables.db set aside");
    let login = |name: &str| {
        let gw = &gw;
        let name = name.to_owned();
        let id = ids["users"][&name].as_str().unwrap().to_owned();
        async move { User { token: gw.login(&name).await, id, name } }
    };
    let (alice, bob) = (login("alice").await, login("bob").await);
    let direct = ids["direct"].as_str().unwrap();

    // The projections are rebuilt from the log: bob's whole stream, history and receipts.
    let mut b = gw.connect(&bob, "phone").await;
    let (items, _) = b.sync_until(None, 6, T).await;
    let bodies: Vec<&str> = items.iter().filter(|i| i["kind"] == "message").filter_map(|i| i["body"].as_str()).collect();
    assert_eq!(bodies, ["v1 one", "v1 two", "v1 three", "v1 four", "v1 group"], "{items:?}");
    let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{direct}/messages")).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 4, "{page}");
    let one = ids["v1 one"].as_str().unwrap();
    let (st, r) = gw.get(&alice.token, &format!("/v1/messages/{one}/receipts")).await;
    assert_eq!(st, 200, "{r}");
    let statuses: Vec<&str> = r["receipts"].as_array().unwrap().iter().map(|x| x["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["sent", "delivered", "seen"], "{r}");
    let (_, convs) = gw.get(&bob.token, "/v1/conversations").await;
    let row = convs["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == json!(direct)).cloned().unwrap_or_default();
    assert_eq!(row["unread"], 2, "v1 two and three are unread: {convs}");

    // A re-send of an old client_msg_id gets the old message (its reservation moved to sends).
    let mut a = gw.connect(&alice, "phone").await;
    let again = a.try_send_text_as(&bob.id, "v1-three", "v1 three", true).await.expect("answered");
    assert_eq!(again["message_id"], ids["v1 three"], "{again}");
    // An old message (an id minted before tags) can still be acknowledged and read.
    let three = ids["v1 three"].as_str().unwrap();
    assert_eq!(b.request(json!({"type": "delivered", "conversation_id": direct, "message_ids": [three]})).await["type"], "ack");
    assert_eq!(b.request(json!({"type": "read", "conversation_id": direct, "up_to": three})).await["type"], "ack");
    // New messages flow.
    let new = a.send_text(&bob.id, "v2-one", "after the upgrade").await;
    b.expect("the new message", T, |f| f["type"] == "message" && f["message_id"] == new["message_id"]).await;
    s.wait_settled(T).await;
    let (items, _) = b.sync_until(None, 7, T).await;
    assert_eq!(items.iter().filter(|i| i["kind"] == "message").count(), 6, "one new message, nothing doubled: {items:?}");
    let (_, convs) = gw.get(&bob.token, "/v1/conversations").await;
    let row = convs["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == json!(direct)).cloned().unwrap_or_default();
    assert_eq!(row["unread"], 1, "read up to three; the new one is unread: {convs}");

    gw.proc.terminate().await;
    let out = s.chat(&["rebuild"]).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "rebuild differs: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Sends `n` messages from each of several pairs, concurrently. A sender whose connection
/// fails (server killed) reconnects and re-sends the same `client_msg_id` (marked as a re-send)
/// until it is acked.
async fn traffic(ws_url: String, pairs: Vec<(User, User)>, n: usize, tag: &str) {
    traffic_over(Arc::new(std::sync::Mutex::new(vec![ws_url])), pairs, n, tag).await
}

/// [`traffic`] over the gateways whose WebSocket URLs `urls` holds at the moment of each
/// (re)connection (a test replaces a killed node's URL with its successor's).
async fn traffic_over(urls: Arc<std::sync::Mutex<Vec<String>>>, pairs: Vec<(User, User)>, n: usize, tag: &str) {
    let mut tasks = Vec::new();
    for (k, (from, to)) in pairs.iter().enumerate() {
        let (urls, from, to, tag) = (urls.clone(), from.clone(), to.id.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut ws: Option<Ws> = None;
            let mut connects = k;
            for i in 0..n {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let mut attempt = 0;
                loop {
                    assert!(tokio::time::Instant::now() < deadline, "message {i} of {} never acked", from.name);
                    let Some(conn) = ws.as_mut() else {
                        let url = {
                            let urls = urls.lock().unwrap();
                            urls[connects % urls.len()].clone()
                        };
                        connects += 1;
                        ws = Ws::try_connect(&url, &from.token, "load").await.ok();
                        if ws.is_none() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        continue;
                    };
                    attempt += 1;
                    match conn.try_send_text_as(&to, &format!("{tag}-{i}"), &format!("{tag} #{i}"), attempt > 1).await {
                        Some(_) => break,
                        None => ws = None,
                    }
                }
            }
            if let Some(ws) = ws {
                ws.close().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// Runs `chat rebuild` (projects the whole log into fresh tables) and checks it matches.
async fn assert_rebuild_matches(s: &Scope, messages: u64) {
    let out = s.chat(&["rebuild"]).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "rebuild differs: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["equal"], true);
    assert_eq!(report["tables"]["messages"]["rebuilt"]["rows"], json!(messages));
    // The compared copy is not left behind (a directory, or a keyspace in Cassandra).
    assert_eq!(report["rebuilt_copy_removed"], true, "{report:#}");
    if s.mode == Mode::Embedded {
        let place = report["rebuilt_into"].as_str().expect("rebuilt_into");
        assert!(!std::path::Path::new(place).exists(), "{place} left behind");
    }
}

/// e3. (embedded) `chat rebuild --swap` beside the running server: projection tables emptied
/// behind the server's back are replaced by a rebuild from the log while a client keeps sending;
/// every message sent before, during and after the swap is in the history exactly once, and the
/// live tables then equal a clean rebuild.
async fn rebuild_swaps_online(mode: Mode) {
    let s = Scope::new("swap", mode).await;
    let gw = s.gateway("n1").await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut conv = String::new();
    for i in 0..20 {
        conv = a.send_text(&bob.id, &format!("before-{i}"), &format!("before {i}")).await["conversation_id"].as_str().expect("conversation").to_owned();
    }
    s.wait_settled(T).await;
    // The projections are lost while the server is down (the tables belong to one process at a
    // time); it starts with them empty and its offsets past every record.
    a.close().await;
    gw.proc.terminate().await;
    {
        let store = s.store(&s.keyspace).await;
        store.truncate_projections().await.expect("truncate");
        assert_eq!(checksums(&store).await["messages"].rows, 0);
    }
    let gw = s.gateway("n1b").await;
    let mut a = gw.connect(&alice, "phone").await;

    // alice keeps sending until the swap is over.
    let (to, done) = (bob.id.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let sender = tokio::spawn({
        let done = done.clone();
        async move {
            let mut sent = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || sent < 10 {
                a.send_text(&to, &format!("during-{sent}"), &format!("during {sent}")).await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (a, sent)
        }
    });
    let out = s.chat(&["rebuild", "--swap"]).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "rebuild --swap: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["swapped"], true, "{report:#}");
    assert_eq!(report["equal"], false, "the live tables were emptied: {report:#}");
    assert_eq!(report["rebuilt_copy_removed"], true);
    let (mut a, during) = sender.await.expect("sender");
    for i in 0..10 {
        a.send_text(&bob.id, &format!("after-{i}"), &format!("after {i}")).await;
    }
    let want: Vec<String> = (0..20)
        .map(|i| format!("before {i}"))
        .chain((0..during).map(|i| format!("during {i}")))
        .chain((0..10).map(|i| format!("after {i}")))
        .collect();
    wait_for("every message in bob's history once, in order", T, || async {
        let mut bodies: Vec<String> = Vec::new();
        let mut before = String::new();
        loop {
            let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=200{before}")).await;
            bodies.extend(page["messages"].as_array()?.iter().filter_map(|m| m["body"].as_str().map(str::to_owned)));
            match page["next_cursor"].as_str() {
                Some(cursor) => before = format!("&before={cursor}"),
                None => break,
            }
        }
        bodies.reverse();
        (bodies == want).then_some(())
    })
    .await;
    a.close().await;
    s.wait_settled(T).await;
    assert_rebuild_matches(&s, want.len() as u64).await;
}

async fn four_pairs(gw: &Gateway) -> Vec<(User, User)> {
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(gw.register(&format!("user{i}")).await);
    }
    (0..4).map(|i| (users[2 * i].clone(), users[2 * i + 1].clone())).collect()
}

/// d. SIGKILL while 2,000 messages flow (the worker in cluster mode; the one process in
/// embedded mode); after restart and catch-up every table equals a clean projection of the log.
async fn d_sigkill_loses_and_duplicates_nothing(mode: Mode) {
    let s = Scope::new("d", mode).await;
    let gw = s.gateway("n1").await;
    let worker = s.worker().await;
    let pairs = four_pairs(&gw).await;
    let sender = tokio::spawn(traffic(gw.ws_url(), pairs, 500, "d"));
    // Kill mid-stream, once projections have made progress.
    wait_for("some messages projected", T, || async {
        let n = s.checksums().await["messages"].rows;
        (n > 200).then_some(())
    })
    .await;
    let _gateway = match worker {
        Some(w) => {
            w.kill9().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _worker = s.worker().await;
            sender.await.expect("traffic");
            s.wait_settled(Duration::from_secs(180)).await;
            gw
        }
        None => {
            gw.proc.kill9().await;
            let gw = s.gateway("n1b").await;
            sender.await.expect("traffic");
            s.wait_settled(Duration::from_secs(180)).await;
            // `chat rebuild` needs the data directory to itself.
            gw.proc.terminate().await;
            assert_eq!(s.checksums().await["messages"].rows, 2000);
            return assert_rebuild_matches(&s, 2000).await;
        }
    };
    assert_eq!(s.checksums().await["messages"].rows, 2000);
    assert_rebuild_matches(&s, 2000).await;
}

/// e. Rebuild: truncate the projections, reset the group, replay: identical checksums.
async fn e_rebuild_gives_identical_tables(mode: Mode) {
    let s = Scope::new("e", mode).await;
    let gw = s.gateway("n1").await;
    let worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut b = gw.connect(&bob, "phone").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(a.send_text(&bob.id, &format!("e-{i}"), &format!("hi {i} #rebuild")).await["message_id"].as_str().unwrap().to_owned());
    }
    let last = ids[29].clone();
    let conv = b.expect("message", T, is_type("message")).await["conversation_id"].as_str().unwrap().to_owned();
    // Edits and deletes (the last message's too, which the inbox shows) are rebuilt alike.
    for (n, f) in [(3, json!({"type": "edit", "body": "hi 3, edited"})), (5, json!({"type": "delete"})), (3, json!({"type": "delete"})), (29, json!({"type": "delete"}))] {
        let mut f = f;
        f["conversation_id"] = json!(conv);
        f["message_id"] = json!(ids[n]);
        let answer = a.request(f).await;
        assert_eq!(answer["type"], "ack", "{answer}");
    }
    let hid = b.request(json!({"type": "delete", "scope": "me", "conversation_id": conv, "message_id": ids[7]})).await;
    assert_eq!(hid["type"], "ack", "{hid}");
    // Reactions (changed, and one taken back) and a reply are rebuilt alike.
    for (bobs, n, emoji) in [(true, 2, json!("👍")), (true, 2, json!("❤️")), (false, 2, json!("👍")), (false, 4, json!("😂")), (false, 4, json!(null))] {
        let ws = if bobs { &mut b } else { &mut a };
        let answer = ws.request(json!({"type": "react", "conversation_id": conv, "message_id": ids[n], "emoji": emoji})).await;
        assert_eq!(answer["type"], "ack", "{answer}");
    }
    b.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [last]})).await;
    b.request(json!({"type": "read", "conversation_id": conv, "up_to": last})).await;
    let replied = b.request(json!({"type": "send", "client_msg_id": "reply", "to": alice.id, "body": "hello back", "reply_to": ids[1]})).await;
    assert_eq!(replied["type"], "sent", "{replied}");
    // Privacy settings, a block with a withheld message and its edit, an unblock, a read without
    // a receipt: rebuilt alike.
    let (st, _) = gw.call(reqwest::Method::PUT, &alice.token, "/v1/privacy", Some(json!({"last_seen": "nobody", "read_receipts": "nobody"}))).await;
    assert_eq!(st, 200);
    let (st, _) = gw.call(reqwest::Method::PUT, &alice.token, &format!("/v1/blocks/{}", bob.id), None).await;
    assert_eq!(st, 204);
    let withheld = b.request(json!({"type": "send", "client_msg_id": "withheld", "to": alice.id, "body": "never delivered"})).await;
    assert_eq!(withheld["type"], "sent", "{withheld}");
    let edited = b.request(json!({"type": "edit", "conversation_id": conv, "message_id": withheld["message_id"], "body": "never delivered, edited"})).await;
    assert_eq!(edited["type"], "ack", "{edited}");
    let (st, _) = gw.call(reqwest::Method::DELETE, &alice.token, &format!("/v1/blocks/{}", bob.id), None).await;
    assert_eq!(st, 204);
    let (st, _) = gw.call(reqwest::Method::PUT, &bob.token, &format!("/v1/blocks/{}", alice.id), None).await;
    assert_eq!(st, 204);
    let read = a.request(json!({"type": "read", "conversation_id": conv, "up_to": replied["message_id"]})).await;
    assert_eq!(read["type"], "ack", "{read}");
    // Everyone offline, so stopping a process appends nothing more.
    b.close().await;
    a.close().await;
    s.wait_settled(T).await;
    let before = s.checksums().await;
    assert!(before["receipts"].rows > 30);
    assert_eq!(before["reactions"].rows, 3, "bob's and alice's on one message, alice's taken back on another");
    assert_eq!((before["privacy_settings"].rows, before["blocks"].rows), (1, 2), "alice's settings; alice's unblock and bob's block");
    assert!(before["last_seen"].rows >= 1);

    // Stop whoever writes projections, empty them, forget the group's offsets, start again.
    let gw = match worker {
        Some(w) => {
            w.terminate().await;
            Some(gw)
        }
        None => {
            gw.proc.terminate().await;
            None
        }
    };
    {
        let store = s.store(&s.keyspace).await;
        store.truncate_projections().await.expect("truncate");
        assert_eq!(checksums(&store).await["messages"].rows, 0);
    }
    let out = s.chat(&["reset-group", "--group", &s.projection_group()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _running = match gw {
        Some(gw) => (gw, s.worker().await),
        None => (s.gateway("n1b").await, None),
    };
    s.wait_settled(T).await;
    let after = wait_for("rebuild complete", T, || async {
        let c = s.checksums().await;
        (c["messages"].rows == before["messages"].rows && c["user_stream"].rows == before["user_stream"].rows).then_some(c)
    })
    .await;
    assert_eq!(before, after);
}

/// Embedded: 1,000 acked messages, SIGKILL, restart: a client syncing from zero gets all of
/// them once each, and the projections are complete.
async fn sigkill_keeps_every_acked_message(mode: Mode) {
    let s = Scope::new("k", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(a.send_text(&bob.id, &format!("k-{i}"), &format!("kept {i}")).await["message_id"].as_str().unwrap().to_owned());
    }
    gw.proc.kill9().await;
    let gw = s.gateway("n1b").await;
    let mut b = gw.connect(&bob, "phone").await;
    let (items, _) = b.sync_until(None, 1000, Duration::from_secs(180)).await;
    let got: Vec<&str> = items.iter().map(|i| i["message_id"].as_str().unwrap()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "all 1,000, once each, in order");
    s.wait_settled(Duration::from_secs(180)).await;
    let sums = s.checksums().await;
    assert_eq!(sums["messages"].rows, 1000);
    assert_eq!(sums["user_stream"].rows, 2000, "bob's 1,000 and alice's own 1,000");
    assert_eq!(sums["inbox"].rows, 2);
}

/// Kill -9 at random points of a 20,000-message run (20 senders, 1,000 messages each, every
/// send retried with `retry: true` until acked): embedded, the one process, four times; cluster,
/// the worker and a gateway node, twice each. Afterwards every receiver's stream holds each of
/// its sender's messages exactly once, in order; the tables hold 20,000 messages and equal a
/// rebuild from the log. The kill times are printed (and can be fixed with CHAT_TEST_KILLS_MS,
/// comma-separated delays) to replay a failure.
async fn k2_kill9_at_random_points_of_20000_messages(mode: Mode) {
    const PAIRS: usize = 20;
    const EACH: usize = 1000;
    let s = Scope::new("k2", mode).await;
    let mut gateways = vec![s.gateway("n1").await];
    if mode == Mode::Cluster {
        gateways.push(s.gateway("n2").await);
    }
    let mut worker = s.worker().await;
    let mut users = Vec::new();
    for i in 0..2 * PAIRS {
        users.push(gateways[0].register(&format!("user{i}")).await);
    }
    let pairs: Vec<(User, User)> = (0..PAIRS).map(|i| (users[2 * i].clone(), users[2 * i + 1].clone())).collect();
    let urls = Arc::new(std::sync::Mutex::new(gateways.iter().map(Gateway::ws_url).collect::<Vec<_>>()));
    let sender = tokio::spawn(traffic_over(urls.clone(), pairs.clone(), EACH, "k2"));
    let delays: Vec<u64> = match std::env::var("CHAT_TEST_KILLS_MS") {
        Ok(v) => v.split(',').filter_map(|d| d.trim().parse().ok()).collect(),
        Err(_) => (0..4).map(|_| 500 + (uuid::Uuid::new_v4().as_u128() % 3500) as u64).collect(),
    };
    eprintln!("k2 ({mode:?}): kills after {delays:?} ms (CHAT_TEST_KILLS_MS to repeat)");
    for (k, delay) in delays.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        if sender.is_finished() {
            eprintln!("k2: traffic finished before kill {k}");
            break;
        }
        match (mode, k % 2) {
            (Mode::Cluster, 0) => {
                if let Some(w) = worker.take() {
                    w.kill9().await;
                }
                worker = s.worker().await;
            }
            _ => {
                // The first gateway (embedded: the one process) dies; its successor takes its place.
                let dead = gateways.remove(0);
                let dead_url = dead.ws_url();
                dead.proc.kill9().await;
                let next = s.gateway(&format!("n{}", k + 3)).await;
                {
                    let mut urls = urls.lock().unwrap();
                    urls.retain(|u| *u != dead_url);
                    urls.push(next.ws_url());
                }
                gateways.push(next);
            }
        }
    }
    sender.await.expect("traffic: every message acked");
    eprintln!("k2: traffic done; waiting for the workers to catch up");
    s.wait_settled(Duration::from_secs(300)).await;
    let gw = &gateways[gateways.len() - 1];
    for (from, to) in &pairs {
        let mut ws = gw.connect(to, "check").await;
        let (items, _) = ws.sync_until(None, EACH, Duration::from_secs(180)).await;
        let bodies: Vec<String> = items.iter().filter(|i| i["sender"] == json!(from.id)).map(|i| i["body"].as_str().unwrap_or_default().to_owned()).collect();
        let want: Vec<String> = (0..EACH).map(|i| format!("k2 #{i}")).collect();
        assert_eq!(bodies.len(), EACH, "{}'s stream: {} items from {}, want {EACH} exactly once", to.name, bodies.len(), from.name);
        assert_eq!(bodies, want, "{}'s stream holds {}'s messages once each, in order", to.name, from.name);
        ws.close().await;
    }
    assert_eq!(s.checksums().await["messages"].rows, (PAIRS * EACH) as u64);
    if mode == Mode::Embedded {
        // `chat rebuild` needs the data directory to itself.
        for g in gateways {
            g.proc.terminate().await;
        }
    }
    assert_rebuild_matches(&s, (PAIRS * EACH) as u64).await;
}

/// alice and bob with a projected conversation (presence goes to the people one has
/// conversations with), alice connected.
/// alice and bob as contacts (both wrote in their conversation, projected), bob offline, and
/// alice's connection with bob's last presence frame consumed.
async fn acquainted(gw: &Gateway) -> (User, User, Ws) {
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let mut a = gw.connect(&alice, "phone").await;
    a.send_text(&bob.id, "hi", "hi bob").await;
    let mut b = gw.connect(&bob, "setup").await;
    b.send_text(&alice.id, "hi", "hi alice").await;
    let last_sender_is_bob = |u: &User| {
        let token = u.token.clone();
        let bob_id = bob.id.clone();
        async move {
            let (_, l) = gw.get(&token, "/v1/conversations").await;
            (l["conversations"][0]["last_sender"] == json!(bob_id)).then_some(())
        }
    };
    wait_for("bob's reply projected for bob", T, || last_sender_is_bob(&bob)).await;
    wait_for("bob's reply projected for alice", T, || last_sender_is_bob(&alice)).await;
    b.close().await;
    a.expect("bob offline", T, |f| f["type"] == "presence" && f["user_id"] == json!(bob.id) && f["status"] == "offline").await;
    (alice, bob, a)
}

/// f. Presence: online on the first device, offline (with last seen) after the last.
async fn f_presence_follows_the_last_device(mode: Mode) {
    let s = Scope::new("f", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, mut a) = acquainted(&gw).await;

    let b1 = gw.connect(&bob, "phone").await;
    let p = a.expect("online", T, |f| f["type"] == "presence" && f["user_id"] == json!(bob.id)).await;
    assert_eq!(p["status"], "online");
    let b2 = gw.connect(&bob, "laptop").await;
    b1.close().await;
    assert!(
        !a.arrives_within(Duration::from_secs(2), |f| f["type"] == "presence" && f["status"] == "offline").await,
        "bob is still online on his laptop"
    );
    let (_, seen) = gw.get(&alice.token, &format!("/v1/users/{}/last-seen", bob.id)).await;
    assert_eq!(seen["online"], true);
    b2.close().await;
    let p = a.expect("offline", T, |f| f["type"] == "presence" && f["status"] == "offline").await;
    let last_seen = p["last_seen"].as_str().expect("last_seen").to_owned();
    // The table may still hold the previous last seen (the "setup" device's) until the worker
    // projects this one; what must come is exactly the time the frame announced.
    wait_for("last seen projected", T, || async {
        let (_, v) = gw.get(&alice.token, &format!("/v1/users/{}/last-seen", bob.id)).await;
        (v["online"] == false && v["last_seen"] == json!(last_seen)).then_some(v)
    })
    .await;
}

/// f. (continued, cluster only) A node that dies without closing its sockets: its users go offline after the
/// presence TTL, declared by a surviving node.
async fn f_crashed_node_users_go_offline(mode: Mode) {
    let s = Scope::new("f2", mode).await;
    let ttl = [("CHAT_PRESENCE_TTL_SECS", "3")];
    let gw1 = s.gateway_with("n1", &ttl).await;
    let gw2 = s.gateway_with("n2", &ttl).await;
    let _worker = s.worker().await;
    let (alice, bob, mut a) = acquainted(&gw1).await;
    let _b = gw2.connect(&bob, "phone").await;
    a.expect("online", T, |f| f["type"] == "presence" && f["status"] == "online").await;
    gw2.proc.kill9().await;
    let p = a.expect("offline after the crash", Duration::from_secs(20), |f| f["type"] == "presence" && f["status"] == "offline").await;
    assert_eq!(p["user_id"], json!(bob.id));
    wait_for("last seen projected", T, || async {
        let (_, v) = gw1.get(&alice.token, &format!("/v1/users/{}/last-seen", bob.id)).await;
        (v["online"] == false && v["last_seen"].is_string()).then_some(())
    })
    .await;
}

/// g. Bad input appends nothing and leaves the server healthy.
async fn g_bad_input_is_refused_cleanly(mode: Mode) {
    let s = Scope::new("g", mode).await;
    let gw = s.gateway("n1").await;
    let alice = gw.register("alice").await;
    let _bob = gw.register("bob").await;

    let mut a = gw.connect(&alice, "phone").await;
    a.send_raw(tokio_tungstenite::tungstenite::Message::Text("{not json".into())).await;
    let e = a.expect("error", T, is_type("error")).await;
    assert_eq!(e["code"], "bad_json");
    let e = a.request(json!({"type": "warp"})).await;
    assert_eq!(e["code"], "invalid_frame");
    let e = a.request(json!({"type": "send", "client_msg_id": "x", "to": uuid::Uuid::new_v4().to_string(), "body": "hi"})).await;
    assert_eq!(e["code"], "unknown_recipient");
    let e = a.request(json!({"type": "send", "client_msg_id": "x", "to": "not-a-uuid", "body": "hi"})).await;
    assert_eq!(e["code"], "unknown_recipient");
    let e = a.request(json!({"type": "send", "client_msg_id": "", "to": alice.id, "body": "hi"})).await;
    assert_eq!(e["type"], "error");
    let e = a.request(json!({"type": "sync", "after": "banana"})).await;
    assert_eq!(e["code"], "invalid_cursor");
    // Still usable.
    let p = a.request(json!({"type": "ping"})).await;
    assert_eq!(p["type"], "pong");

    // Over the frame limit: closed with 1009.
    let big = "x".repeat(70 * 1024);
    a.send(json!({"type": "send", "client_msg_id": "big", "to": alice.id, "body": big})).await;
    let mut closed = None;
    for _ in 0..50 {
        if a.arrives_within(Duration::from_millis(200), |_| false).await {
            continue;
        }
        if a.closed.is_some() {
            closed = a.closed;
            break;
        }
    }
    assert_eq!(closed, Some(1009));

    // Upgrade without a valid token: 401, never 101.
    for auth in [None, Some("Bearer nonsense")] {
        let mut req = gw
            .http
            .get(format!("{}/v1/ws", gw.url))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(h) = auth {
            req = req.header("Authorization", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // HTTP bad input gets JSON errors.
    let r = gw.http.post(format!("{}/v1/accounts", gw.url)).header("content-type", "application/json").body("{").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "invalid_json");
    let r = gw.http.post(format!("{}/v1/accounts", gw.url)).json(&json!({"username": "alice", "password": "correct horse battery"})).send().await.unwrap();
    assert_eq!(r.status(), 409);

    let r = gw.http.delete(format!("{}/v1/conversations", gw.url)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "method_not_allowed");

    // Nothing was appended to the conversations topic, and the node is healthy.
    assert!(s.read_topic(TopicKind::Conversations).is_empty());
    assert_eq!(gw.http.get(format!("{}/healthz", gw.url)).send().await.unwrap().status(), 200);
    assert_eq!(gw.http.get(format!("{}/readyz", gw.url)).send().await.unwrap().status(), 200);
    let mut a = gw.connect(&alice, "phone").await;
    assert_eq!(a.request(json!({"type": "ping"})).await["type"], "pong");
}

/// An open socket is closed when its token expires (1008), so a revoked session ends.
async fn token_expiry_closes_the_socket(mode: Mode) {
    let s = Scope::new("ttl", mode).await;
    let gw = s.gateway_with("n1", &[("CHAT_TOKEN_TTL_SECS", "3")]).await;
    let alice = gw.register("alice").await;
    let mut a = gw.connect(&alice, "phone").await;
    assert!(!a.arrives_within(Duration::from_secs(8), |_| false).await);
    assert_eq!(a.closed, Some(1008));
}

/// Two registrations of one name at the same time: exactly one wins.
async fn concurrent_registrations_of_one_name(mode: Mode) {
    let s = Scope::new("reg", mode).await;
    let gw = s.gateway("n1").await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let http = gw.http.clone();
        let url = format!("{}/v1/accounts", gw.url);
        tasks.push(tokio::spawn(async move {
            http.post(url).json(&json!({"username": "zoe", "password": "correct horse battery"})).send().await.unwrap().status().as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(codes, vec![201, 409, 409, 409]);
    gw.login("zoe").await;
}

/// h. carol sees nothing of alice and bob, and the refusals look like "does not exist".
async fn h_outsiders_see_nothing(mode: Mode) {
    let s = Scope::new("h", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let carol = gw.register("carol").await;
    let mut a = gw.connect(&alice, "phone").await;
    let sent = a.send_text(&bob.id, "secret", "for bob only").await;
    let mid = sent["message_id"].as_str().unwrap().to_owned();
    let conv = sent["conversation_id"].as_str().unwrap().to_owned();
    wait_for("projected", T, || async {
        let (st, _) = gw.get(&alice.token, &format!("/v1/messages/{mid}/receipts")).await;
        (st == 200).then_some(())
    })
    .await;

    let nobody = format!("d.{}.{}", "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002");
    let expected_missing = gw.get(&carol.token, &format!("/v1/conversations/{nobody}/messages")).await;
    assert_eq!(expected_missing.0, 404);
    assert_eq!(gw.get(&carol.token, &format!("/v1/conversations/{conv}/messages")).await, expected_missing);
    assert_eq!(gw.get(&carol.token, "/v1/conversations/garbage/messages").await, expected_missing);
    let missing_receipts = gw.get(&carol.token, &format!("/v1/messages/{}/receipts", uuid::Uuid::now_v7())).await;
    assert_eq!(missing_receipts, expected_missing);
    assert_eq!(gw.get(&carol.token, &format!("/v1/messages/{mid}/receipts")).await, expected_missing);
    assert_eq!(gw.get(&carol.token, &format!("/v1/users/{}/last-seen", alice.id)).await, expected_missing);
    let (_, list) = gw.get(&carol.token, "/v1/conversations").await;
    assert_eq!(list["conversations"], json!([]));
    // Without a token at all: 401.
    let r = gw.http.get(format!("{}/v1/conversations/{conv}/messages", gw.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let mut c = gw.connect(&carol, "phone").await;
    for frame in [
        json!({"type": "read", "conversation_id": conv, "up_to": mid}),
        json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]}),
        json!({"type": "typing", "conversation_id": conv}),
        json!({"type": "send", "client_msg_id": "x", "conversation_id": conv, "body": "let me in"}),
    ] {
        let mine = c.request(frame.clone()).await;
        let mut other = frame.clone();
        other["conversation_id"] = json!(nobody);
        let missing = c.request(other).await;
        assert_eq!(mine["code"], "not_found", "{frame}: {mine}");
        assert_eq!(mine["message"], missing["message"]);
    }
    let (items, _) = c.sync_until(None, 0, T).await;
    assert!(items.is_empty());
    assert!(!c.arrives_within(Duration::from_millis(500), |f| f["type"] == "message").await);
}

/// i. A gateway restarted between send and delivery: everything acked before is delivered.
async fn i_gateway_restart_loses_no_acked_message(mode: Mode) {
    let s = Scope::new("i", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let alice = gw.register("alice").await;
    let bob = gw.register("bob").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(a.send_text(&bob.id, &format!("i-{i}"), "before the crash").await["message_id"].as_str().unwrap().to_owned());
    }
    gw.proc.kill9().await;
    let gw = s.gateway("n1b").await;
    let mut b = gw.connect(&bob, "phone").await;
    let (items, _) = b.sync_until(None, 25, T).await;
    let got: Vec<&str> = items.iter().map(|i| i["message_id"].as_str().unwrap()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

macro_rules! scenarios {
    ($mode:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if $mode == Mode::Cluster && !cluster_available(concat!("cluster::", stringify!($name))) {
                    return;
                }
                super::$name($mode).await
            }
        )*
    };
}

/// The scenarios of `abuse.rs` that run in both modes.
macro_rules! abuse_scenarios {
    ($mode:expr) => {
        scenarios!($mode;
            slow_consumer_is_dropped,
            unknown_group_answers_at_once,
            presence_only_between_contacts,
            malformed_input_is_refused,
            group_media_follow_the_history_rule,
            analytics_are_aggregates_only,
            cli_output_into_a_closed_pipe,
            sessions_end_everywhere,
            metrics_cover_stages_and_the_process,
            edits_and_deletes_for_everyone,
            group_edits_and_admin_deletes,
            replies_and_reactions,
            group_mentions_replies_and_reactions,
            search_own_conversations,
            blocking_withholds_and_hides,
            privacy_settings_matrix,
            reads_follow_on_other_devices,
            bans_end_sessions_everywhere,
        );
    };
}

/// Gateways and workers as separate processes on Kafka, Cassandra and Redis.
mod cluster {
    use super::*;
    abuse_scenarios!(Mode::Cluster);
    scenarios!(Mode::Cluster;
        a_two_nodes_send_deliver_read_receipts,
        b_offline_sync_is_complete_ordered_and_unique,
        c_retried_send_is_one_message,
        c2_retry_after_a_crash_between_append_and_ack,
        c3_concurrent_attempts_on_two_nodes,
        d_sigkill_loses_and_duplicates_nothing,
        k2_kill9_at_random_points_of_20000_messages,
        e_rebuild_gives_identical_tables,
        f_presence_follows_the_last_device,
        f_crashed_node_users_go_offline,
        g_bad_input_is_refused_cleanly,
        h_outsiders_see_nothing,
        i_gateway_restart_loses_no_acked_message,
        token_expiry_closes_the_socket,
        concurrent_registrations_of_one_name,
        kafka_broker_killed_under_load,
        redis_restarted_empty,
        cassandra_stopped_for_a_minute,
        kafka_unreachable_for_30s,
    );
    scenarios!(Mode::Cluster;
        groups_membership_as_of_each_message,
        group_receipts_per_member_and_for_all,
        group_removal_races_with_sends,
        group_of_1024_members,
        replay_streams_filtered_json_lines,
        media_round_trip_with_ranges,
        profiles_analytics_and_audit,
        migrates_a_layout_3_keyspace,
    );
}

/// One `chat run` process on its embedded log and tables.
mod embedded {
    use super::*;
    abuse_scenarios!(Mode::Embedded);
    scenarios!(Mode::Embedded;
        a_two_nodes_send_deliver_read_receipts,
        b_offline_sync_is_complete_ordered_and_unique,
        c_retried_send_is_one_message,
        c2_retry_after_a_crash_between_append_and_ack,
        d_sigkill_loses_and_duplicates_nothing,
        e_rebuild_gives_identical_tables,
        f_presence_follows_the_last_device,
        g_bad_input_is_refused_cleanly,
        h_outsiders_see_nothing,
        i_gateway_restart_loses_no_acked_message,
        token_expiry_closes_the_socket,
        concurrent_registrations_of_one_name,
        sigkill_keeps_every_acked_message,
        k2_kill9_at_random_points_of_20000_messages,
        migrates_a_v1_data_directory,
        slow_headers_are_cut,
        idle_connections_are_closed,
        readme_by_hand_runs_as_written,
        login_and_registration_are_limited,
        weak_passwords_are_refused,
        per_user_limits,
        protocol_violations_close_with_their_codes,
        websocket_conformance,
        rebuild_swaps_online,
        disk_full_recovers,
    );
    scenarios!(Mode::Embedded;
        groups_membership_as_of_each_message,
        group_receipts_per_member_and_for_all,
        group_removal_races_with_sends,
        group_of_1024_members,
        replay_streams_filtered_json_lines,
        media_round_trip_with_ranges,
        profiles_analytics_and_audit,
    );
}

//! Media, profiles, analytics, audit and rebuild scenarios (both modes).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::*;

const T: Duration = Duration::from_secs(60);

/// A PNG's signature and header chunk, padded to `len` bytes (content detection reads the start).
pub fn png(len: usize) -> Vec<u8> {
    let mut b = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D, b'I', b'H', b'D', b'R'];
    b.extend((0..len.saturating_sub(b.len())).map(|i| (i * 31 % 251) as u8));
    b
}

/// An MP4 (ISO base media) file start, padded.
fn mp4(len: usize) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 0x18, b'f', b't', b'y', b'p', b'i', b's', b'o', b'm', 0, 0, 2, 0, b'i', b's', b'o', b'm', b'i', b's', b'o', b'2'];
    b.extend((0..len.saturating_sub(b.len())).map(|i| (i * 7 % 253) as u8));
    b
}

/// Upload, send, receive, download whole and by ranges; outsiders see nothing; refusals.
pub async fn media_round_trip_with_ranges(mode: Mode) {
    let s = Scope::new("media", mode).await;
    let gw = s.gateway_with("n1", &[("CHAT_MAX_IMAGE_BYTES", "2000000")]).await;
    let _worker = s.worker().await;
    let (alice, bob, carol) = (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await);
    let mut a = gw.connect(&alice, "p").await;
    let mut b = gw.connect(&bob, "p").await;

    // An image bigger than one multipart part (5 MiB parts: use 6 MiB video below for that).
    let image = png(300_000);
    let (st, up) = gw.upload(&alice.token, "image", image.clone()).await;
    assert_eq!(st, 201, "{up}");
    assert_eq!(up["content_type"], "image/png");
    assert_eq!(up["size"], json!(image.len()));
    assert_eq!(up["sha256"], json!(hex::encode(Sha256::digest(&image))));
    let media_id = up["media_id"].as_str().unwrap().to_owned();

    let sent = a
        .request(json!({"type": "send", "client_msg_id": "pic", "to": bob.id, "kind": "image", "media_id": media_id,
                        "body": "the crag", "metadata": {"width": 640, "height": 480}}))
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let m = b.expect("image message", T, |f| f["type"] == "message" && f["kind"] == "image").await;
    assert_eq!(m["media"]["media_id"], json!(media_id));
    assert_eq!(m["media"]["width"], 640);
    assert_eq!(m["body"], "the crag");

    let path = format!("/v1/media/{media_id}");
    let r = gw.fetch(&bob.token, &path, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    // Served as data: no sniffing, nothing runs, a file name.
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("sandbox"));
    assert!(r.headers()["content-disposition"].to_str().unwrap().ends_with(".png\""), "{:?}", r.headers()["content-disposition"]);
    assert_eq!(r.bytes().await.unwrap().to_vec(), image, "the recipient downloads the same bytes");
    let r = gw.fetch(&bob.token, &path, Some("bytes=10-19")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 10-19/{}", image.len()).as_str());
    assert_eq!(r.bytes().await.unwrap().to_vec(), image[10..20].to_vec());
    let r = gw.fetch(&alice.token, &path, Some("bytes=-7")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), image[image.len() - 7..].to_vec());
    assert_eq!(gw.fetch(&bob.token, &path, Some(&format!("bytes={}-", image.len()))).await.status(), 416);

    // carol: the same 404 as for an id that does not exist.
    let r = gw.fetch(&carol.token, &path, None).await;
    let missing = gw.fetch(&carol.token, &format!("/v1/media/{}", uuid::Uuid::new_v4()), None).await;
    assert_eq!((r.status(), missing.status()), (reqwest::StatusCode::NOT_FOUND, reqwest::StatusCode::NOT_FOUND));
    assert_eq!(r.text().await.unwrap(), missing.text().await.unwrap());
    // ...and cannot forward what she cannot read.
    let mut c = gw.connect(&carol, "p").await;
    let no = c.request(json!({"type": "send", "client_msg_id": "steal", "to": bob.id, "kind": "image", "media_id": media_id})).await;
    assert_eq!(no["code"], "unknown_media");

    // A video larger than one 5 MiB part, with a seek into its middle.
    let video = mp4(6 << 20);
    let (st, up) = gw.upload(&alice.token, "video", video.clone()).await;
    assert_eq!(st, 201, "{up}");
    assert_eq!(up["content_type"], "video/mp4");
    let vid = up["media_id"].as_str().unwrap().to_owned();
    let sent = a.request(json!({"type": "send", "client_msg_id": "vid", "to": bob.id, "kind": "video", "media_id": vid, "metadata": {"duration_ms": 12000}})).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let seek = 5_500_000usize;
    let r = gw.fetch(&bob.token, &format!("/v1/media/{vid}"), Some(&format!("bytes={seek}-{}", seek + 99_999))).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), video[seek..seek + 100_000].to_vec());

    // Refusals: bytes that are not the declared kind, too large, unknown kind, kind mismatch.
    let (st, e) = gw.upload(&alice.token, "image", b"this is plainly text, not an image at all".to_vec()).await;
    assert_eq!((st, e["error"]["code"].clone()), (415, json!("unsupported_media")));
    let (st, e) = gw.upload(&alice.token, "image", png(2_500_000)).await;
    assert_eq!((st, e["error"]["code"].clone()), (413, json!("media_too_large")));
    let (st, e) = gw.upload(&alice.token, "document", png(100)).await;
    assert_eq!((st, e["error"]["code"].clone()), (400, json!("invalid_kind")));
    let no = a.request(json!({"type": "send", "client_msg_id": "mismatch", "to": bob.id, "kind": "video", "media_id": media_id})).await;
    assert_eq!(no["code"], "media_kind_mismatch");
    let no = a.request(json!({"type": "send", "client_msg_id": "nomedia", "to": bob.id, "kind": "image"})).await;
    assert_eq!(no["code"], "invalid_frame");

    // History keeps the attachment.
    s.wait_settled(T).await;
    let conv = sent["conversation_id"].as_str().unwrap();
    let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages")).await;
    let kinds: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["video", "image"]);
    assert_eq!(page["messages"][1]["media"]["media_id"], json!(media_id));
}

/// Grants a role with the CLI (embedded: beside the running server, through its admin socket),
/// and waits until the user's old sessions are ended (the change takes effect at their next
/// log-in).
pub async fn grant(s: &Scope, gw: Gateway, username: &str, role: &str) -> Gateway {
    let out = s.chat(&["role", "grant", "--username", username, "--role", role]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("granted {role} for {username}")), "{out:?}");
    gw
}

/// Registers `name`, grants it the auditor role, logs it in again: (the gateway, the auditor).
pub async fn with_auditor(s: &Scope, gw: Gateway, name: &str) -> (Gateway, User) {
    let _ = gw.register(name).await;
    let gw = grant(s, gw, name, "auditor").await;
    let auditor = relog(&gw, User { id: String::new(), name: name.into(), token: String::new() }).await;
    (gw, auditor)
}

/// Profiles and who views them; analytics for analysts; audit for auditors (recorded, read-only);
/// a rebuild gives the same numbers.
pub async fn profiles_analytics_and_audit(mode: Mode) {
    let s = Scope::new("insight", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, carol) = (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await);
    let _ = (gw.register("dana").await, gw.register("erin").await);
    let gw = grant(&s, gw, "dana", "analyst").await;
    let gw = grant(&s, gw, "erin", "auditor").await;
    let (alice, bob, carol) = (relog(&gw, alice).await, relog(&gw, bob).await, relog(&gw, carol).await);
    let dana = relog(&gw, User { id: String::new(), name: "dana".into(), token: String::new() }).await;
    let erin = relog(&gw, User { id: String::new(), name: "erin".into(), token: String::new() }).await;

    // Profile with an avatar, shown to everyone (by default, to contacts only: docs/protocol.md
    // §16.1); anyone may fetch the avatar.
    let (st, body) = gw.call(Method::PUT, &alice.token, "/v1/privacy", Some(json!({"photo": "everyone"}))).await;
    assert_eq!(st, 200, "{body}");
    let (_, up) = gw.upload(&alice.token, "image", png(5_000)).await;
    let avatar = up["media_id"].as_str().unwrap().to_owned();
    let (st, body) = gw.call(Method::PUT, &alice.token, "/v1/profile", Some(json!({"display_name": "Alice A.", "avatar_media_id": avatar}))).await;
    assert_eq!(st, 202, "{body}");
    // Every look is a view: count them (the profile may take a few looks to be projected).
    let looks = std::sync::atomic::AtomicU64::new(0);
    let p = wait_for("profile projected", T, || async {
        let (_, p) = gw.get(&bob.token, &format!("/v1/users/{}/profile", alice.id)).await;
        looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (p["display_name"] == "Alice A.").then_some(p)
    })
    .await;
    let looks = looks.into_inner();
    assert_eq!(p["avatar_media_id"], json!(avatar));
    assert_eq!(gw.fetch(&carol.token, &format!("/v1/media/{avatar}"), None).await.status(), 200);
    // More views: bob has viewed alice `looks` times above; two more, and carol once.
    for _ in 0..2 {
        gw.get(&bob.token, &format!("/v1/users/{}/profile", alice.id)).await;
    }
    gw.get(&carol.token, &format!("/v1/users/{}/profile", alice.id)).await;
    let (_, own) = gw.get(&alice.token, &format!("/v1/users/{}/profile", alice.id)).await;
    assert_eq!(own["username"], "alice", "one's own view is not counted");

    // Messages with topics.
    let mut a = gw.connect(&alice, "p").await;
    let mut b = gw.connect(&bob, "p").await;
    let mid = a.send_text(&bob.id, "t1", "off to #Climb, no rain today").await["message_id"].as_str().unwrap().to_owned();
    a.send_text(&bob.id, "t2", "#climb again #rope").await;
    b.send_text(&alice.id, "t3", "sun!").await;
    let conv = b.expect("msg", T, |f| f["type"] == "message" && f["message_id"] == json!(mid)).await["conversation_id"].as_str().unwrap().to_owned();
    b.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]})).await;
    b.request(json!({"type": "read", "conversation_id": conv, "up_to": mid})).await;
    s.wait_settled(T).await;

    // Analytics: analysts only.
    assert_eq!(gw.get(&bob.token, "/v1/analytics/messages").await.0, 403);
    let (st, views) = gw.get(&dana.token, &format!("/v1/analytics/profile-views?user={}", alice.id)).await;
    assert_eq!(st, 200, "{views}");
    let day = &views["days"][0];
    assert_eq!(day["views"], looks + 3, "{views}");
    assert_eq!(day["viewers"], 2, "distinct viewers, not who they were: {views}");
    let (_, topics) = gw.get(&dana.token, "/v1/analytics/topics").await;
    let counted: Vec<(String, u64)> =
        topics["topics"].as_array().unwrap().iter().map(|t| (t["topic"].as_str().unwrap().to_owned(), t["messages"].as_u64().unwrap())).collect();
    assert_eq!(counted, vec![("#climb".to_owned(), 2), ("#rope".to_owned(), 1), ("rain".to_owned(), 1), ("sun".to_owned(), 1)], "{topics}");
    let (_, msgs) = gw.get(&dana.token, "/v1/analytics/messages").await;
    let count = |kind: &str, scope: &str| -> u64 {
        msgs["days"].as_array().unwrap().iter().filter(|d| d["kind"] == kind && d["scope"] == scope).map(|d| d["messages"].as_u64().unwrap()).sum()
    };
    assert_eq!(count("text", "direct"), 3, "{msgs}");
    let (_, active) = gw.get(&dana.token, "/v1/analytics/active-users").await;
    assert!(active["days"][0]["users"].as_u64().unwrap() >= 2, "{active}");

    // A group message, delivered and read by both members, for the auditor below.
    let (st, g) = gw.call(Method::POST, &alice.token, "/v1/groups", Some(json!({"name": "audited", "members": [bob.id, carol.id]}))).await;
    assert_eq!(st, 201, "{g}");
    let gconv = g["conversation_id"].as_str().unwrap().to_owned();
    // Connected before the send: pushes go to the connections that exist at the time.
    let mut c = gw.connect(&carol, "p").await;
    let gf = a.request(json!({"type": "send", "client_msg_id": "g1", "conversation_id": gconv, "body": "to the group"})).await;
    assert_eq!(gf["type"], "sent", "{gf}");
    let gmid = gf["message_id"].as_str().unwrap().to_owned();
    for ws in [&mut b, &mut c] {
        ws.expect("group message", T, |f| f["message_id"] == json!(gmid) && f["type"] == "message").await;
        ws.request(json!({"type": "delivered", "conversation_id": gconv, "message_ids": [gmid]})).await;
        ws.request(json!({"type": "read", "conversation_id": gconv, "up_to": gmid})).await;
    }
    a.expect("seen by all", T, |f| f["type"] == "receipt" && f["status"] == "seen" && f["all"] == true).await;
    s.wait_settled(T).await;

    // Audit: auditors only, every read recorded, auditors cannot write.
    let (st, gtl) = gw.get(&erin.token, &format!("/v1/audit/messages/{gmid}/receipts")).await;
    assert_eq!(st, 200, "{gtl}");
    assert_eq!(gtl["receipts"].as_array().unwrap().len(), 6, "every member, every transition: {gtl}");
    assert_eq!(gtl["summary"]["recipients"], 2);
    assert!(gtl["summary"]["seen_by_all_at"].is_string(), "{gtl}");
    assert_eq!(gw.get(&dana.token, &format!("/v1/audit/messages/{mid}/receipts")).await.0, 403);
    let (st, tl) = gw.get(&erin.token, &format!("/v1/audit/messages/{mid}/receipts")).await;
    assert_eq!(st, 200, "{tl}");
    let statuses: Vec<&str> = tl["receipts"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["sent", "delivered", "seen"]);
    let (st, ur) = gw.get(&erin.token, &format!("/v1/audit/users/{}/receipts", bob.id)).await;
    assert_eq!(st, 200, "{ur}");
    assert!(ur["receipts"].as_array().unwrap().len() >= 3, "{ur}");
    assert_eq!(gw.get(&erin.token, "/v1/audit/metrics/daily").await.0, 200);
    let mut e = gw.connect(&erin, "p").await;
    assert_eq!(e.request(json!({"type": "send", "client_msg_id": "x", "to": bob.id, "body": "hi"})).await["code"], "forbidden");
    assert_eq!(gw.call(Method::POST, &erin.token, "/v1/groups", Some(json!({"name": "g"}))).await.0, 403);
    s.wait_settled(T).await;
    let out = s.chat(&["replay", "--type", "audit.accessed"]).await;
    let records: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 4, "one record per audit read");
    assert!(records.iter().all(|r| r["data"]["auditor"] == json!(erin.id)));

    // A rebuild gives the same analytics (and every other table), run beside the live server
    // (embedded: through its admin socket), as the commands below.
    let out = s.chat(&["rebuild"]).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "rebuild differs: {report:#}");
    for t in ["analytics_message_counts", "analytics_topics", "analytics_profile_views", "analytics_active_users", "profiles", "receipts_by_user"] {
        assert_eq!(report["tables"][t]["equal"], true, "{t}");
    }
    // Its last progress line says the whole log was projected, not how much was still to go (the
    // CLI's log in a cluster; the server's, which ran it, embedded).
    let done = "rebuild: every record up to the log's end projected";
    let mut logs = vec![String::from_utf8_lossy(&out.stderr).into_owned()];
    for entry in std::fs::read_dir(&s.log_dir).expect("log dir").flatten() {
        logs.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    let progress = |log: &String| log.lines().rfind(|l| l.contains("to_go=") || l.contains(done)).map(str::to_owned);
    let lasts: Vec<String> = logs.iter().filter_map(progress).collect();
    assert!(!lasts.is_empty() && lasts.iter().all(|l| l.contains(done)), "the last rebuild progress line of each log: {lasts:?}");

    // The same queries from the command line (JSON out); an operator's audit read is recorded too.
    let json_of = |out: std::process::Output| -> Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON output")
    };
    let topics = json_of(s.chat(&["analytics", "topics"]).await);
    assert_eq!(topics[0]["topic"], "#climb", "{topics}");
    let views = json_of(s.chat(&["analytics", "profile-views", "--user", &alice.id]).await);
    assert_eq!(views[0]["views"], looks + 3, "{views}");
    let timeline = json_of(s.chat(&["audit", "receipts", "--message", &mid]).await);
    assert_eq!(timeline["receipts"].as_array().unwrap().len(), 3, "{timeline}");
    // The same timeline as over HTTP: `sent_at`, and the transitions in time order (sent,
    // delivered, seen).
    assert!(timeline["sent_at"].as_str().is_some_and(|t| !t.is_empty()), "{timeline}");
    let statuses: Vec<&str> = timeline["receipts"].as_array().unwrap().iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(statuses, ["sent", "delivered", "seen"], "{timeline}");
    let ats: Vec<&str> = timeline["receipts"].as_array().unwrap().iter().filter_map(|r| r["at"].as_str()).collect();
    assert!(ats.windows(2).all(|w| w[0] <= w[1]), "time order: {timeline}");
    let (st, http) = gw.get(&erin.token, &format!("/v1/audit/messages/{mid}/receipts")).await;
    assert_eq!(st, 200);
    assert_eq!(http["receipts"], timeline["receipts"], "one code path for the CLI and HTTP");
    if s.mode == Mode::Cluster {
        auditor_cql_timeline(&s, &mid, &alice.id, &bob.id, 3).await;
        auditor_cql_timeline(&s, &gmid, &alice.id, &bob.id, 6).await;
    }
    // Refused input is not an audit read (as over HTTP): no record.
    for bad in [vec!["audit", "receipts", "--message", "nope"], vec!["audit", "user-receipts", "--user", "nope"], vec!["audit", "daily", "--from", "yesterday"]] {
        let out = s.chat(&bad).await;
        assert!(!out.status.success(), "{bad:?} refused");
    }
    let out = s.chat(&["replay", "--type", "audit.accessed"]).await;
    let records: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.iter().filter(|r| r["data"]["via"] == "cli").count(), 1, "the CLI read is on the record");
}

pub async fn relog(gw: &Gateway, mut u: User) -> User {
    u.token = gw.login(&u.name).await;
    if u.id.is_empty() {
        let (_, me) = gw.get(&u.token, &format!("/v1/users/by-username/{}", u.name)).await;
        u.id = me["user_id"].as_str().unwrap().to_owned();
    }
    u
}

/// The README's "by hand" block, run as written (bash, curl, the `websockets` command-line
/// client in a venv) against a fresh embedded server: alice's send is answered `sent`, and bob's
/// device syncs the message. The README cannot drift from the product without this failing.
pub async fn readme_by_hand_runs_as_written(mode: Mode) {
    let s = Scope::new("readme", mode).await;
    let gw = s.gateway("n1").await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let start = readme.find("<!-- by-hand: tests/e2e/product.rs").expect("the by-hand block's start marker");
    let end = readme[start..].find("<!-- by-hand: end -->").expect("the by-hand block's end marker") + start;
    let block = &readme[start..end];
    let script: String = block.lines().skip_while(|l| !l.starts_with("```sh")).skip(1).take_while(|l| !l.starts_with("```")).map(|l| format!("{l}\n")).collect();
    assert!(script.contains("websockets"), "the block: {block}");
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("CHAT", &gw.url)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("bash");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the README's block failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(r#"{"type":"sent","ref":1,"client_msg_id":"c1""#), "alice's send answered: {stdout}");
    assert!(stdout.contains(r#""body":"hi bob""#), "bob's sync has the message: {stdout}");
}

/// The receipt timeline query docs/operations.md gives auditors (cqlsh or any CQL client).
const AUDITOR_CQL: &str = "SELECT at, sender, recipient, status, device_id FROM receipts WHERE message_id = ?";

/// An auditor's one plain CQL query answers who sent a message and when each recipient got it
/// and read it, in time order: `rows` rows, every one naming the sender, `sent` before
/// `delivered` before `seen` for `recipient`.
async fn auditor_cql_timeline(s: &Scope, message: &str, sender: &str, recipient: &str, rows: usize) {
    use scylla::client::session_builder::SessionBuilder;
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).expect("docs/operations.md");
    assert!(docs.contains(&AUDITOR_CQL.replace('?', "<message id>")), "docs/operations.md gives the auditor's query as tested");
    let session = SessionBuilder::new().known_node(&s.svc().cassandra).use_keyspace(&s.keyspace, false).build().await.expect("connect to Cassandra");
    let message: uuid::Uuid = message.parse().unwrap();
    let got: Vec<(chrono::DateTime<chrono::Utc>, uuid::Uuid, uuid::Uuid, String, String)> = session
        .query_unpaged(AUDITOR_CQL, (message,))
        .await
        .expect("the auditor's query")
        .into_rows_result()
        .expect("rows")
        .rows()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("rows of the documented columns");
    assert_eq!(got.len(), rows, "{got:?}");
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "time order: {got:?}");
    assert!(got.iter().all(|r| r.1.to_string() == sender), "every row names the sender: {got:?}");
    let of_recipient: Vec<&str> = got.iter().filter(|r| r.2.to_string() == recipient).map(|r| r.3.as_str()).collect();
    assert_eq!(of_recipient, ["sent", "delivered", "seen"], "{got:?}");
}

/// A keyspace of projection layout 3 (`receipts` keyed by recipient and status, no sender
/// columns) is upgraded by `chat migrate`: the columns this version writes are added (so that its
/// statements prepare and the command can connect at all), the projections are dropped, created
/// in the current layout and rebuilt from the log: the auditor's timeline query answers for a message sent
/// before the upgrade. Cluster only (embedded data directories are upgraded by `chat run`,
/// `migrates_a_v1_data_directory`).
pub async fn migrates_a_layout_3_keyspace(mode: Mode) {
    use scylla::client::session_builder::SessionBuilder;
    let s = Scope::new("layout3", mode).await;
    let gw = s.gateway("n1").await;
    let worker = s.worker().await;
    let (alice, bob) = (gw.register("alice").await, gw.register("bob").await);
    let mut a = gw.connect(&alice, "p").await;
    let mut b = gw.connect(&bob, "p").await;
    let sent = a.send_text(&bob.id, "m1", "before the upgrade").await;
    let (mid, conv) = (sent["message_id"].as_str().unwrap().to_owned(), sent["conversation_id"].as_str().unwrap().to_owned());
    b.expect("the message", T, |f| f["type"] == "message" && f["message_id"] == json!(mid)).await;
    b.request(json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]})).await;
    b.request(json!({"type": "read", "conversation_id": conv, "up_to": mid})).await;
    a.expect("seen", T, |f| f["type"] == "receipt" && f["status"] == "seen").await;
    s.wait_settled(T).await;
    a.close().await;
    b.close().await;
    gw.proc.terminate().await;
    if let Some(w) = worker {
        w.terminate().await;
    }

    // The receipt tables as layout 3 made them.
    let session = SessionBuilder::new().known_node(&s.svc().cassandra).use_keyspace(&s.keyspace, false).build().await.expect("connect to Cassandra");
    for ddl in [
        "DROP TABLE receipts",
        "CREATE TABLE receipts (message_id uuid, recipient uuid, status text, device_id text, at timestamp, conversation_id text, PRIMARY KEY (message_id, recipient, status, device_id))",
        "DROP TABLE receipts_by_user",
        "CREATE TABLE receipts_by_user (recipient uuid, message_id uuid, status text, device_id text, at timestamp, conversation_id text, PRIMARY KEY ((recipient), message_id, status, device_id))",
        "INSERT INTO layout (name, version) VALUES ('projections', 3)",
    ] {
        session.query_unpaged(ddl, ()).await.unwrap_or_else(|e| panic!("{ddl}: {e}"));
    }
    session.await_schema_agreement().await.expect("schema agreement");

    let out = s.chat(&["migrate"]).await;
    assert!(out.status.success(), "chat migrate of a layout 3 keyspace: {}", String::from_utf8_lossy(&out.stderr));
    let kind: Vec<(String,)> = session
        .query_unpaged(
            "SELECT kind FROM system_schema.columns WHERE keyspace_name = ? AND table_name = 'receipts' AND column_name = 'at'",
            (s.keyspace.as_str(),),
        )
        .await
        .expect("schema")
        .into_rows_result()
        .expect("rows")
        .rows::<(String,)>()
        .expect("typed")
        .collect::<Result<_, _>>()
        .expect("kind");
    assert_eq!(kind, [("clustering".to_owned(),)], "receipts created anew, clustered by time");
    let _worker = s.worker().await;
    s.wait_settled(T).await;
    auditor_cql_timeline(&s, &mid, &alice.id, &bob.id, 3).await;
}

//! Faults of the real services under load (issue 14): a private Kafka broker or Redis server
//! per test (the shared ones serve the other tests running beside it), killed and restarted
//! while clients send.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command as StdCommand;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_events::EventLog;
use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(120);

/// A free port for a private service, below the kernel's ephemeral range (32768–60999 on Linux):
/// a port the kernel handed out (`bind(0)`) can be taken as the source port of any outgoing
/// connection while the service is down, and the restart then fails with "address already in
/// use" (seen in CI: a private Cassandra stopped for a minute could not bind its port again).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes running beside each other start at different places of the range.
    let start = std::process::id() % 12_000;
    for _ in 0..12_000 {
        let port = 20_000 + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999")
}

/// One service of `scripts/services.sh`, run privately: its own home (the jars of the shared
/// one linked in) and ports. Stopped and deleted when dropped.
struct Private {
    name: &'static str,
    home: PathBuf,
    env: Vec<(String, String)>,
}

impl Private {
    fn start(name: &'static str, ports: &[(&str, u16)]) -> Private {
        let home = std::env::temp_dir().join(format!("chat-fault-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        std::fs::create_dir_all(home.join(name)).expect("private home");
        let shared = std::env::var("CHAT_SERVICES_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/chat-services"));
        if shared.join(name).join("lib").exists() {
            std::os::unix::fs::symlink(shared.join(name).join("lib"), home.join(name).join("lib")).expect("link jars");
        }
        // Never wipe on `up` (CI sets CHAT_SERVICES_FRESH=1 for the shared services): a restart
        // after a kill must find the data it had.
        let mut env = vec![
            ("CHAT_SERVICES_HOME".to_owned(), home.display().to_string()),
            ("CHAT_SERVICES_ONLY".to_owned(), name.to_owned()),
            ("CHAT_SERVICES_FRESH".to_owned(), "0".to_owned()),
        ];
        env.extend(ports.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())));
        // A second Cassandra beside the shared one: a smaller heap.
        env.push(("CHAT_CASSANDRA_HEAP".to_owned(), "1g".to_owned()));
        let p = Private { name, home, env };
        p.up();
        p
    }

    fn script(&self, args: &[&str]) -> bool {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        StdCommand::new("bash")
            .arg(root.join("scripts/services.sh"))
            .args(args)
            .envs(self.env.iter().cloned())
            .stdin(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts it (again) and waits until it answers.
    fn up(&self) {
        assert!(self.script(&["up"]), "private {} did not start (logs under {})", self.name, self.home.display());
    }

    /// kill -9 of the process.
    fn kill9(&self) {
        let pidfile = self.home.join(self.name).join(format!("{}.pid", self.name));
        let pid = std::fs::read_to_string(&pidfile).expect("pid file");
        let st = StdCommand::new("kill").args(["-9", pid.trim()]).status().expect("kill");
        assert!(st.success(), "kill -9 {}", pid.trim());
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
        // A failed test keeps the service's own logs (what the broker or node did meanwhile).
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join("chat-e2e").join(format!("private-{}-{}", self.name, std::process::id()));
            let logs = self.home.join(self.name).join("logs");
            if std::fs::create_dir_all(&keep).is_ok() {
                for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                    let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
                }
                eprintln!("the private {}'s logs are kept in {}", self.name, keep.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// What the senders saw.
#[derive(Default)]
struct Outcomes {
    /// (sender index, message number) → message id of its `sent`.
    acked: BTreeMap<(usize, usize), String>,
    /// Error codes answered to sends (each followed by a re-send of the same client_msg_id).
    errors: BTreeMap<String, u64>,
    reconnects: u64,
}

/// `users[k]` sends `each` messages to `users[(k + 1) % n]`, one at a time, each until it is
/// acknowledged: an error frame or a lost connection is followed by a re-send of the same
/// `client_msg_id` (marked as a re-send), on a new connection if needed. Panics on an error
/// code a client could not retry.
async fn send_all(url: String, users: Vec<User>, each: usize, tag: &'static str, out: Arc<Mutex<Outcomes>>) {
    let n = users.len();
    let mut tasks = Vec::new();
    for k in 0..n {
        let (url, from, to, out) = (url.clone(), users[k].clone(), users[(k + 1) % n].id.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws: Option<Ws> = None;
            for i in 0..each {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                let mut attempt = 0;
                loop {
                    assert!(tokio::time::Instant::now() < deadline, "message {i} of {} never acknowledged", from.name);
                    let Some(conn) = ws.as_mut() else {
                        ws = Ws::try_connect(&url, &from.token, "load").await.ok();
                        if ws.is_none() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        continue;
                    };
                    attempt += 1;
                    let frame = json!({"type": "send", "client_msg_id": format!("{tag}{i}"), "to": to, "body": format!("#{i}"), "retry": attempt > 1});
                    match conn.try_request(frame, Duration::from_secs(60)).await {
                        Some(f) if f["type"] == "sent" => {
                            out.lock().unwrap().acked.insert((k, i), f["message_id"].as_str().expect("message_id").to_owned());
                            break;
                        }
                        Some(f) => {
                            let code = f["code"].as_str().unwrap_or_default().to_owned();
                            assert!(["unavailable", "overloaded"].contains(&code.as_str()), "a send got a non-retryable error: {f}");
                            *out.lock().unwrap().errors.entry(code).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        None => {
                            ws = None;
                            out.lock().unwrap().reconnects += 1;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// Every acknowledged message is in the log, and in its recipient's stream exactly once.
async fn check_delivery(s: &Scope, gw: &Gateway, users: &[User], out: &Outcomes) {
    let logged: BTreeSet<String> = s
        .read_topic(chat_events::TopicKind::Conversations)
        .into_iter()
        .filter(|e| e["type"] == json!("message.sent"))
        .filter_map(|e| e["data"]["message_id"].as_str().map(str::to_owned))
        .collect();
    let false_acks: Vec<&String> = out.acked.values().filter(|m| !logged.contains(*m)).collect();
    assert!(false_acks.is_empty(), "acknowledged but not in the log: {false_acks:?}");
    s.wait_settled(T).await;
    let n = users.len();
    for (k, user) in users.iter().enumerate() {
        let from = (k + n - 1) % n;
        // What they received, and their own copies of what they sent.
        let want: BTreeSet<&String> = out.acked.iter().filter(|((s, _), _)| *s == from || *s == k).map(|(_, m)| m).collect();
        let mut ws = gw.connect(user, "check").await;
        let (items, _) = ws.sync_until(None, 0, T).await;
        let got: Vec<String> = items.iter().filter(|i| i["kind"] == "message").filter_map(|i| i["message_id"].as_str().map(str::to_owned)).collect();
        let unique: BTreeSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "{}: a message twice in the stream", user.name);
        let missing: Vec<&&String> = want.difference(&unique).collect();
        let extra: Vec<&&String> = unique.difference(&want).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{}: acknowledged but not in the stream {missing:?}; in the stream but never acknowledged {extra:?}", user.name);
        ws.close().await;
    }
}

/// Kafka broker kill -9 and restart, 3×, while 50 clients send 10,000 messages: every
/// acknowledged message in the log and delivered exactly once; unacknowledged sends got a
/// retryable error (or lost their connection) and were acknowledged on a re-send; no false
/// `sent`.
pub async fn kafka_broker_killed_under_load(mode: Mode) {
    assert_eq!(mode, Mode::Cluster);
    const CLIENTS: usize = 50;
    const EACH: usize = 200;
    let mut s = Scope::new("kafkill", mode).await;
    let (port, controller) = (free_port(), free_port());
    let kafka = Private::start("kafka", &[("CHAT_KAFKA_PORT", port), ("CHAT_KAFKA_CONTROLLER_PORT", controller)]);
    s.svc.as_mut().expect("cluster").kafka = format!("127.0.0.1:{port}");
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let mut users = Vec::new();
    for k in 0..CLIENTS {
        users.push(gw.register(&format!("user{k}")).await);
    }
    let out = Arc::new(Mutex::new(Outcomes::default()));
    let senders = tokio::spawn(send_all(gw.ws_url(), users.clone(), EACH, "m", out.clone()));
    for round in 0..3 {
        // Let traffic flow, then kill the broker in the middle of it.
        let before = out.lock().unwrap().acked.len();
        wait_for("traffic flowing", T, || async { (out.lock().unwrap().acked.len() >= before + 500).then_some(()) }).await;
        kafka.kill9();
        eprintln!("round {round}: broker killed after {} acknowledged", out.lock().unwrap().acked.len());
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking({
            let kafka_up = kafka.env.clone();
            move || {
                let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                StdCommand::new("bash").arg(root.join("scripts/services.sh")).arg("up").envs(kafka_up).stdin(std::process::Stdio::null()).status()
            }
        })
        .await
        .expect("restart")
        .expect("services.sh");
    }
    senders.await.expect("senders");
    let out = Arc::try_unwrap(out).ok().expect("senders done").into_inner().unwrap();
    eprintln!("acknowledged {}, errors {:?}, reconnects {}", out.acked.len(), out.errors, out.reconnects);
    assert_eq!(out.acked.len(), CLIENTS * EACH);
    check_delivery(&s, &gw, &users, &out).await;
    drop(kafka);
}

/// Redis restarted empty with 200 users connected over two nodes: routing and presence are
/// rebuilt from the nodes' heartbeats within twice the presence TTL, a message sent meanwhile is
/// delivered, and pushes across nodes work again.
pub async fn redis_restarted_empty(mode: Mode) {
    assert_eq!(mode, Mode::Cluster);
    const PAIRS: usize = 100;
    const TTL: u64 = 6;
    let mut s = Scope::new("redisrst", mode).await;
    let port = free_port();
    let redis = Private::start("redis", &[("CHAT_REDIS_PORT", port)]);
    s.svc.as_mut().expect("cluster").redis = format!("redis://127.0.0.1:{port}/");
    let env = [("CHAT_PRESENCE_TTL_SECS", "6")];
    let (n1, n2) = (s.gateway_with("n1", &env).await, s.gateway_with("n2", &env).await);
    let _worker = s.worker().await;
    // Pairs of contacts: a on n1, b on n2, a message each way.
    let mut pairs = Vec::new();
    for k in 0..PAIRS {
        let (a, b) = (n1.register(&format!("alice{k}")).await, n1.register(&format!("bob{k}")).await);
        let (mut wa, mut wb) = (n1.connect(&a, "phone").await, n2.connect(&b, "phone").await);
        wa.send_text(&b.id, "hello", "hello").await;
        wb.send_text(&a.id, "hi", "hi").await;
        pairs.push((a, b, wa, wb));
    }
    s.wait_settled(T).await;
    let online = |gw: &Gateway, token: String, peer: String| {
        let (http, url) = (gw.http.clone(), format!("{}/v1/users/{peer}/last-seen", gw.url));
        async move {
            let r = http.get(url).bearer_auth(token).send().await.ok()?;
            r.json::<serde_json::Value>().await.ok().map(|v| v["online"] == json!(true))
        }
    };
    for (a, b, _, _) in &pairs {
        assert_eq!(online(&n1, a.token.clone(), b.id.clone()).await, Some(true), "before the restart");
    }

    redis.kill9();
    redis.up();
    let restarted = tokio::time::Instant::now();
    // Sent right after the restart, before the routing is rebuilt.
    let mut during = Vec::new();
    for (_, b, wa, _) in pairs.iter_mut() {
        let f = wa.try_request(json!({"type": "send", "client_msg_id": "during", "to": b.id, "body": "during"}), T).await.expect("answer");
        assert_eq!(f["type"], json!("sent"), "a send needs no Redis: {f}");
        during.push(f["message_id"].as_str().unwrap().to_owned());
    }
    wait_for("presence rebuilt", T, || async {
        for (a, b, _, _) in &pairs {
            if online(&n1, a.token.clone(), b.id.clone()).await != Some(true) {
                return None;
            }
        }
        Some(())
    })
    .await;
    let took = restarted.elapsed();
    eprintln!("routing and presence of {} users rebuilt {took:?} after the restart (TTL {TTL} s)", 2 * PAIRS);
    assert!(took <= Duration::from_secs(2 * TTL + 2), "rebuilt after {took:?}, more than twice the presence TTL");
    // What was sent meanwhile is delivered (pushed, or in the stream).
    for ((_, _, _, wb), id) in pairs.iter_mut().zip(&during) {
        let (items, _) = wb.sync_until(None, 0, T).await;
        assert!(items.iter().any(|i| i["message_id"] == json!(id)), "a message sent during the restart is in the stream");
    }
    // Pushes across nodes work again.
    for (_, b, wa, wb) in pairs.iter_mut().take(10) {
        let f = wa.send_text(&b.id, "after", "after").await;
        let id = f["message_id"].clone();
        wb.expect("a push across nodes after the restart", Duration::from_secs(10), |m| m["type"] == "message" && m["message_id"] == id).await;
    }
    drop(redis);
}

/// Cassandra stopped for 60 s while clients send: sends keep being acknowledged (a send needs
/// the log, not the tables, once its users are known to the node), reads answer 503
/// `unavailable`, the workers store no offset past writes that failed, and after the restart
/// the lag is back to zero within 60 s, every acknowledged message is in its recipient's stream
/// exactly once and the messages table has one row per message.
pub async fn cassandra_stopped_for_a_minute(mode: Mode) {
    assert_eq!(mode, Mode::Cluster);
    const CLIENTS: usize = 20;
    let mut s = Scope::new("cassstop", mode).await;
    let (port, storage) = (free_port(), free_port());
    let cassandra = Private::start("cassandra", &[("CHAT_CASSANDRA_PORT", port), ("CHAT_CASSANDRA_STORAGE_PORT", storage)]);
    s.svc.as_mut().expect("cluster").cassandra = format!("127.0.0.1:{port}");
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let mut users = Vec::new();
    for k in 0..CLIENTS {
        users.push(gw.register(&format!("user{k}")).await);
    }
    // Every user sends once before the stop, so that the node knows them all.
    let out = Arc::new(Mutex::new(Outcomes::default()));
    send_all(gw.ws_url(), users.clone(), 5, "m", out.clone()).await;
    s.wait_settled(T).await;

    let stopped = std::time::Instant::now();
    assert!(cassandra.script(&["down"]), "stopping cassandra");
    // Sends go on while the tables are down.
    let mut conns = Vec::new();
    for u in &users {
        conns.push(gw.connect(u, "down").await);
    }
    let mut i = 0;
    while stopped.elapsed() < Duration::from_secs(60) {
        for (k, ws) in conns.iter_mut().enumerate() {
            let to = users[(k + 1) % CLIENTS].id.clone();
            let f = ws.try_request(json!({"type": "send", "client_msg_id": format!("down{i}"), "to": to, "body": "while the tables are down"}), T).await.expect("answer");
            assert_eq!(f["type"], json!("sent"), "a send while Cassandra is down: {f}");
            out.lock().unwrap().acked.insert((k, 1_000 + i), f["message_id"].as_str().unwrap().to_owned());
        }
        i += 1;
        // Reads answer 503 with a code, never partial data.
        let (st, body) = gw.get(&users[0].token, "/v1/conversations").await;
        assert_eq!((st, body["error"]["code"].clone()), (503, json!("unavailable")), "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // No offset past the writes that failed: the workers' groups still lag.
    let lag = s.log().group_lag(&s.fanout_group(), &[s.topics().name(chat_events::TopicKind::Conversations)]).await.expect("lag");
    assert!(lag > 0, "the fan-out stored offsets past writes that could not happen");
    eprintln!("{i} rounds of sends while Cassandra was down; fan-out lag {lag}");

    cassandra.up();
    let restarted = std::time::Instant::now();
    s.wait_settled(Duration::from_secs(60)).await;
    eprintln!("lag back to zero {:?} after Cassandra answered again", restarted.elapsed());
    let out = Arc::try_unwrap(out).ok().expect("senders done").into_inner().unwrap();
    check_delivery(&s, &gw, &users, &out).await;
    assert_eq!(s.checksums().await["messages"].rows, out.acked.len() as u64, "one row per message, no duplicates");
    for ws in conns {
        ws.close().await;
    }
    drop(cassandra);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Kafka unreachable for 30 s (the broker stopped with SIGSTOP: connections hang, nothing is
/// refused) while clients send, one of them flooding: no send is acknowledged unless it is in the
/// log, every send is answered (`sent`, or a retryable error), the gateway's memory stays
/// bounded, and sends succeed again after the broker returns, without a restart.
pub async fn kafka_unreachable_for_30s(mode: Mode) {
    assert_eq!(mode, Mode::Cluster);
    const CLIENTS: usize = 10;
    const FLOOD: usize = 3_000;
    let mut s = Scope::new("kafkastop", mode).await;
    let (port, controller) = (free_port(), free_port());
    let kafka = Private::start("kafka", &[("CHAT_KAFKA_PORT", port), ("CHAT_KAFKA_CONTROLLER_PORT", controller)]);
    s.svc.as_mut().expect("cluster").kafka = format!("127.0.0.1:{port}");
    let gw = s.gateway("n1").await;
    let pid = gw.proc.child.id().expect("gateway pid");
    let _worker = s.worker().await;
    let mut users = Vec::new();
    for k in 0..CLIENTS {
        users.push(gw.register(&format!("user{k}")).await);
    }
    let out = Arc::new(Mutex::new(Outcomes::default()));
    send_all(gw.ws_url(), users.clone(), 5, "m", out.clone()).await;
    let rss_before = rss_kib(pid);

    let broker = std::fs::read_to_string(kafka.home.join("kafka/kafka.pid")).expect("pid").trim().to_owned();
    assert!(StdCommand::new("kill").args(["-STOP", &broker]).status().expect("kill").success());
    let stopped = std::time::Instant::now();
    // The flood: frames written without waiting for answers, then every answer read.
    let mut flood = gw.connect(&users[0], "flood").await;
    // A client that connects meanwhile can read at once (its online announcement waits for the
    // log beside it, not in front of it).
    let synced = tokio::time::timeout(Duration::from_secs(5), flood.request(json!({"type": "sync", "limit": 10}))).await;
    assert!(synced.is_ok_and(|f| f["type"] == "sync"), "sync while the log is unreachable");
    let to = users[1].id.clone();
    for i in 0..FLOOD {
        flood.send(json!({"type": "send", "ref": 1_000_000 + i, "client_msg_id": format!("flood{i}"), "to": to, "body": "flood"})).await;
    }
    // Meanwhile the others send one at a time, each until acknowledged.
    let senders = tokio::spawn(send_all(gw.ws_url(), users[1..].to_vec(), 3, "hung", out.clone()));
    let mut rss_peak = 0;
    while stopped.elapsed() < Duration::from_secs(30) {
        rss_peak = rss_peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(StdCommand::new("kill").args(["-CONT", &broker]).status().expect("kill").success());
    let (mut flood_acked, mut flood_errors) = (Vec::new(), BTreeMap::<String, u64>::new());
    let mut answered = 0;
    while answered < FLOOD {
        let f = flood.expect("an answer to every flooded send", T, |f| f["ref"].as_u64().is_some_and(|r| r >= 1_000_000)).await;
        answered += 1;
        if f["type"] == "sent" {
            flood_acked.push(f["message_id"].as_str().unwrap().to_owned());
        } else {
            let code = f["code"].as_str().unwrap_or_default().to_owned();
            assert!(["unavailable", "overloaded"].contains(&code.as_str()), "a retryable error: {f}");
            *flood_errors.entry(code).or_default() += 1;
        }
    }
    senders.await.expect("senders");
    eprintln!(
        "flood: {} acknowledged, errors {flood_errors:?}; other senders' errors {:?}; RSS {rss_before} KiB before, {rss_peak} KiB at most while the broker hung",
        flood_acked.len(),
        out.lock().unwrap().errors
    );
    assert!(rss_peak < rss_before + 200 * 1024, "memory grew by {} KiB while the broker hung", rss_peak.saturating_sub(rss_before));
    // Sends succeed again, same process.
    let mut ws = gw.connect(&users[2], "after").await;
    ws.send_text(&users[3].id, "after", "the broker is back").await;
    // No false ack: every acknowledged send is in the log.
    let logged: BTreeSet<String> = s
        .read_topic(chat_events::TopicKind::Conversations)
        .into_iter()
        .filter(|e| e["type"] == json!("message.sent"))
        .filter_map(|e| e["data"]["message_id"].as_str().map(str::to_owned))
        .collect();
    let acked = out.lock().unwrap().acked.values().cloned().chain(flood_acked).collect::<Vec<_>>();
    let false_acks: Vec<&String> = acked.iter().filter(|m| !logged.contains(*m)).collect();
    assert!(false_acks.is_empty(), "acknowledged but not in the log: {false_acks:?}");
    drop(kafka);
}

//! A first, rough benchmark of the embedded mode: start-up time to ready, and send → deliver
//! throughput and latency with a few closed-loop senders. Not a test; the numbers go to
//! `docs/benchmarks.md` with the command that produced them:
//!
//!     cargo build --release --bin chat
//!     cargo run --release --example embedded_bench -- [CHAT_BINARY] [PAIRS] [MESSAGES_PER_PAIR]
//!
//! The full load generator (open-loop rates, HDR histograms, many connections) is separate work.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Sent = Arc<Mutex<HashMap<String, Instant>>>;

async fn account(http: &reqwest::Client, base: &str, name: &str) -> (String, String) {
    let creds = json!({"username": name, "password": "correct horse battery"});
    let r: Value = http.post(format!("{base}/v1/accounts")).json(&creds).send().await.unwrap().json().await.unwrap();
    let id = r["user_id"].as_str().expect("registered").to_owned();
    let s: Value = http.post(format!("{base}/v1/sessions")).json(&creds).send().await.unwrap().json().await.unwrap();
    (id, s["token"].as_str().unwrap().to_owned())
}

async fn connect(
    base: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("{}/v1/ws", base.replacen("http", "ws", 1)).into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args.get(1).cloned().unwrap_or_else(|| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{target}/release/chat")
    });
    let pairs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let per_pair: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let dir = std::env::temp_dir().join(format!("chat-bench-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");

    let started = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .env("CHAT_DATA_DIR", &dir)
        .env("CHAT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHAT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not ready after 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = started.elapsed();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _banner = lines.next_line().await;

    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(pairs * per_pair)));
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for p in 0..pairs {
        let (_, a_token) = account(&http, &base, &format!("bench_a{p}")).await;
        let (b_id, b_token) = account(&http, &base, &format!("bench_b{p}")).await;
        let mut b = connect(&base, &b_token).await;
        let (sent_r, lat) = (sent.clone(), latencies.clone());
        receivers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < per_pair {
                let Some(Ok(Message::Text(t))) = b.next().await else { panic!("receiver closed") };
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                if f["type"] == "message" {
                    let key = f["client_msg_id"].as_str().unwrap().to_owned();
                    let at = Instant::now();
                    if let Some(t0) = sent_r.lock().unwrap().remove(&key) {
                        lat.lock().unwrap().push(at - t0);
                    }
                    got += 1;
                }
            }
        }));
        let mut a = connect(&base, &a_token).await;
        let sent_s = sent.clone();
        senders.push(async move {
            for i in 0..per_pair {
                let key = format!("p{p}-{i}");
                sent_s.lock().unwrap().insert(key.clone(), Instant::now());
                let frame = json!({"type": "send", "client_msg_id": key, "to": b_id, "body": "benchmark message body"});
                a.send(Message::Text(frame.to_string().into())).await.unwrap();
                loop {
                    let Some(Ok(Message::Text(t))) = a.next().await else { panic!("sender closed") };
                    let f: Value = serde_json::from_str(t.as_str()).unwrap();
                    if f["type"] == "sent" {
                        break;
                    }
                    assert_ne!(f["type"], "error", "{f}");
                }
            }
        });
    }
    let t0 = Instant::now();
    futures::future::join_all(senders).await;
    for r in receivers {
        r.await.unwrap();
    }
    let elapsed = t0.elapsed();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let total = pairs * per_pair;
    println!(
        "{}",
        json!({
            "startup_to_ready_ms": ready.as_millis(),
            "pairs": pairs,
            "messages": total,
            "seconds": elapsed.as_secs_f64(),
            "delivered_per_second": (total as f64 / elapsed.as_secs_f64()).round(),
            "send_to_deliver_ms": {
                "p50": pct(&lat, 0.5).as_secs_f64() * 1e3,
                "p99": pct(&lat, 0.99).as_secs_f64() * 1e3,
                "max": lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            },
        })
    );
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}

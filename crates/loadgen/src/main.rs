//! `chat-loadgen`: drives a running chat server (embedded or cluster) with real WebSocket
//! clients and measures what users feel. A program, not a test: it prints a JSON result and a
//! one-line summary, and `scripts/bench.sh` runs the whole set into `docs/benchmarks.md`.
//!
//! - Clients connect from several local addresses (`--sources 127.0.0.2,127.0.0.3,...`), so
//!   the ephemeral ports of one address are no limit.
//! - Senders send at an **offered, open-loop rate**: each sender's frames leave on a fixed
//!   schedule whether or not earlier ones were acknowledged (a slow server builds a queue and
//!   its latency shows it, instead of the load quietly dropping).
//! - Every message body carries its send time; the receiving client records send → deliver
//!   latency in an HDR histogram, counts deliveries, and spots duplicates (a message id seen twice
//!   by one client) and losses (acknowledged messages that never arrived).
//! - The server's CPU time and RSS come from `/proc/<pid>` (`--server-pid`); the generator's own
//!   CPU time is reported beside it.
//! - `--inject-loss K` / `--inject-dup K` make the receivers drop / double-count K deliveries,
//!   to show that the counters catch both.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Local ports the clients bind, per source address (each child process gets its own slice).
const PORT_FIRST: u16 = 10_000;
const PORT_SPAN: usize = 50_000;

#[derive(Parser)]
#[command(name = "chat-loadgen", about = "Load generator for the chat platform")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's process id, for its CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Local addresses to open connections from, round robin.
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Write the JSON result here too.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Registrations and log-ins in flight at once.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Where this process starts in the (source address, local port) slots (child processes get
    /// disjoint ranges).
    #[arg(long, default_value_t = 0, hide = true)]
    first_slot: u64,
    /// After the senders stop, how long to wait for the deliveries still under way (what has
    /// not arrived then is counted lost).
    #[arg(long, default_value = "60s", value_parser = humantime)]
    drain: Duration,
    /// Other processes whose CPU time to report (Kafka, Cassandra, Redis), comma-separated.
    #[arg(long, value_delimiter = ',')]
    service_pids: Vec<u32>,
    /// Receivers ignore this many deliveries (shows that losses are detected).
    #[arg(long, default_value_t = 0)]
    inject_loss: u64,
    /// Receivers count this many deliveries twice (shows that duplicates are detected).
    #[arg(long, default_value_t = 0)]
    inject_dup: u64,
    /// Receivers acknowledge every message they get (`delivered`) and read it (`read` up to it),
    /// as a chat client with the conversation open does: each message then has its delivered and
    /// seen receipts.
    #[arg(long)]
    receipts: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Idle connections: memory per connection and connections accepted per second.
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Devices per user (connections share users to keep the set-up short).
        #[arg(long, default_value_t = 10)]
        devices_per_user: usize,
        /// How long to hold the connections before the memory sample.
        #[arg(long, default_value = "5s", value_parser = humantime)]
        hold: Duration,
        /// Child processes that hold the connections (a process may hold 20,000 descriptors).
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// Connections closed and reopened after the sample, to measure accepts while the rest are held.
        #[arg(long, default_value_t = 0)]
        churn: usize,
        /// Connections each process closes and reopens at a time during the churn.
        #[arg(long, default_value_t = 250)]
        batch: usize,
    },
    /// One shard of `idle --processes P` (used by the parent process).
    #[command(hide = true)]
    IdleChild {
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        devices_per_user: usize,
        #[arg(long)]
        churn: usize,
        #[arg(long)]
        batch: usize,
    },
    /// One-to-one messages at a fixed offered rate.
    Direct {
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Messages per second offered, over all senders.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value = "30s", value_parser = humantime)]
        duration: Duration,
        /// Also probe how long an acknowledged message takes to reach the projections.
        #[arg(long)]
        probe_projections: bool,
    },
    /// Group messages (each fanned out to every other member).
    Group {
        #[arg(long, default_value_t = 1)]
        groups: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Messages per second offered, over all groups.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value = "30s", value_parser = humantime)]
        duration: Duration,
    },
}

fn humantime(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Bytes a process caused to be written to storage (`write_bytes` of `/proc/<pid>/io`: what its
/// writes and their page-cache writeback cost the disk).
fn proc_write_bytes(pid: Option<u32>) -> Option<u64> {
    let path = pid.map(|p| p.to_string()).unwrap_or_else(|| "self".into());
    let io = std::fs::read_to_string(format!("/proc/{path}/io")).ok()?;
    io.lines().find(|l| l.starts_with("write_bytes:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) and RSS in KiB of a process.
fn proc_sample(pid: Option<u32>) -> Option<(f64, u64)> {
    let path = pid.map(|p| p.to_string()).unwrap_or_else(|| "self".into());
    let stat = std::fs::read_to_string(format!("/proc/{path}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{path}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every supported platform.
    Some((ticks / 100.0, rss))
}

struct Client {
    http: reqwest::Client,
    base: String,
    server: SocketAddr,
    sources: Vec<IpAddr>,
    next_source: AtomicU64,
}

#[derive(Clone, Debug)]
struct User {
    id: String,
    token: String,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

impl Client {
    fn new(c: &Common) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&c.url).context("--url")?;
        let host = url.host_str().context("--url has no host")?;
        let port = url.port_or_known_default().unwrap_or(80);
        let server = format!("{host}:{port}").parse::<SocketAddr>().or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?.next().context("cannot resolve --url")
        })?;
        Ok(Client {
            http: reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?,
            base: c.url.trim_end_matches('/').to_owned(),
            server,
            sources: c.sources.clone(),
            next_source: AtomicU64::new(c.first_slot),
        })
    }

    async fn account(&self, name: &str) -> anyhow::Result<User> {
        let creds = json!({"username": name, "password": "load generator password"});
        let r = self.http.post(format!("{}/v1/accounts", self.base)).json(&creds).send().await?;
        if !r.status().is_success() {
            bail!("register {name}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        let v: Value = r.json().await?;
        let id = v["user_id"].as_str().context("user_id")?.to_owned();
        let s: Value = self.http.post(format!("{}/v1/sessions", self.base)).json(&creds).send().await?.json().await?;
        Ok(User { id, token: s["token"].as_str().context("token")?.to_owned() })
    }

    async fn accounts(&self, prefix: &str, n: usize, concurrency: usize) -> anyhow::Result<Vec<User>> {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        futures::stream::iter(names.iter().map(|n| self.account(n))).buffered(concurrency.max(1)).collect::<Vec<_>>().await.into_iter().collect()
    }

    /// A socket bound to the next source address and an explicit local port. Binding to port 0
    /// makes the kernel search the whole ephemeral range for a port that is free on that address,
    /// which gets slow once tens of thousands of ports are taken (the churn measured the
    /// generator instead of the server); explicit ports, skipping the ones still in use, avoid it.
    fn bound_socket(&self) -> anyhow::Result<TcpSocket> {
        for _ in 0..64 {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) as usize;
            let src = self.sources[i % self.sources.len()];
            let port = (PORT_FIRST as usize + (i / self.sources.len()) % PORT_SPAN) as u16;
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            if sock.bind(SocketAddr::new(src, port)).is_ok() {
                return Ok(sock);
            }
        }
        bail!("no free local port on {:?}", self.sources)
    }

    /// A WebSocket connection from the next source address; the `welcome` frame is consumed.
    async fn connect(&self, token: &str, device: &str) -> anyhow::Result<Ws> {
        let stream = self.bound_socket()?.connect(self.server).await?;
        stream.set_nodelay(true)?;
        let url = format!("{}/v1/ws?device={device}", self.base.replacen("http", "ws", 1));
        let mut req = url.into_client_request()?;
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
        // Small buffers, like the server's: 20,000 clients with the default 128 KiB read buffer
        // take 2.5 GB.
        let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await?;
        match ws.next().await {
            Some(Ok(Message::Text(_))) => Ok(ws),
            other => bail!("no welcome frame: {other:?}"),
        }
    }

    async fn create_group(&self, admin: &User, members: &[User]) -> anyhow::Result<String> {
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let r = self
            .http
            .post(format!("{}/v1/groups", self.base))
            .bearer_auth(&admin.token)
            .json(&json!({"name": "load", "members": ids}))
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("create group: {status} {v}");
        }
        Ok(v["conversation_id"].as_str().context("conversation_id")?.to_owned())
    }
}

/// What the receivers saw.
struct Receipts {
    latency: Mutex<Histogram<u64>>,
    /// When the latest first-time delivery arrived (for the delivered rate).
    last_at: Mutex<Option<Instant>>,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    /// Warm-up messages received (not measured).
    warm: AtomicU64,
    /// Distinct (receiver, client_msg_id) deliveries, to compute losses.
    seen: Mutex<HashSet<(usize, String)>>,
    inject_loss: AtomicU64,
    inject_dup: AtomicU64,
}

impl Receipts {
    fn new(c: &Common) -> Arc<Self> {
        Arc::new(Receipts {
            latency: Mutex::new(histogram()),
            last_at: Mutex::new(None),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            warm: AtomicU64::new(0),
            seen: Mutex::new(HashSet::new()),
            inject_loss: AtomicU64::new(c.inject_loss),
            inject_dup: AtomicU64::new(c.inject_dup),
        })
    }

    fn take(counter: &AtomicU64) -> bool {
        counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok()
    }

    fn record(&self, receiver: usize, frame: &Value) {
        if frame["type"] != "message" {
            return;
        }
        let Some(body) = frame["body"].as_str() else { return };
        if body == WARMUP_BODY {
            self.warm.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut parts = body.split('|');
        let (Some("lg"), Some(cmid), Some(sent)) = (parts.next(), parts.next(), parts.next()) else { return };
        if Self::take(&self.inject_loss) {
            return;
        }
        let copies = if Self::take(&self.inject_dup) { 2 } else { 1 };
        for _ in 0..copies {
            let fresh = self.seen.lock().map(|mut s| s.insert((receiver, cmid.to_owned()))).unwrap_or(false);
            if !fresh {
                self.duplicated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.delivered.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.last_at.lock() {
                *last = Some(Instant::now());
            }
            if let Ok(sent) = sent.parse::<u128>() {
                let micros = now_nanos().saturating_sub(sent) / 1000;
                if let Ok(mut h) = self.latency.lock() {
                    let _ = h.record(micros.max(1) as u64);
                }
            }
        }
    }
}

/// Microseconds from 1 µs to 10 min at 3 significant digits.
fn histogram() -> Histogram<u64> {
    // Only invalid bounds make this fail, and these are constants.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Reads a receiver connection until `stop`, recording every delivery; with `ack`, answers each
/// message with `delivered` and `read` (up to it) on the same connection.
fn spawn_receiver(ws: Ws, id: usize, receipts: Arc<Receipts>, ack: bool, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stop = stop;
        let (mut sink, mut stream) = ws.split();
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                            receipts.record(id, &v);
                            if ack && v["type"] == "message" {
                                let (conv, mid) = (v["conversation_id"].clone(), v["message_id"].clone());
                                let delivered = json!({"type": "delivered", "conversation_id": conv, "message_ids": [mid]});
                                let read = json!({"type": "read", "conversation_id": conv, "up_to": mid});
                                if sink.send(Message::Text(delivered.to_string().into())).await.is_err()
                                    || sink.send(Message::Text(read.to_string().into())).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
                _ = stop.changed() => return,
            }
        }
    })
}

/// What the senders did.
#[derive(Default)]
struct Sends {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    /// The latest acknowledged message id of sender 0 and when, for projection probes (a watch,
    /// so a probe starts polling the moment an ack arrives).
    last_ack: tokio::sync::watch::Sender<Option<(String, Instant)>>,
}

/// Sends open-loop on one connection: one frame every `interval` until `until`, never waiting
/// for acks (a reader task counts them); then waits (up to `grace`) until every frame it sent
/// was answered, so that the expected deliveries count every acknowledged message.
fn spawn_sender(
    ws: Ws,
    sender: usize,
    target: Value,
    (interval, until, grace): (Duration, Instant, Duration),
    sends: Arc<Sends>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let s2 = sends.clone();
        let answered = Arc::new(AtomicU64::new(0));
        let a2 = answered.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Text(t) = m {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if matches!(v["type"].as_str(), Some("sent" | "error")) {
                            a2.fetch_add(1, Ordering::Relaxed);
                        }
                        match v["type"].as_str() {
                            Some("sent") => {
                                s2.acked.fetch_add(1, Ordering::Relaxed);
                                // Probes read the receipts of sender 0's messages with its token.
                                if let (0, Some(id)) = (sender, v["message_id"].as_str()) {
                                    s2.last_ack.send_replace(Some((id.to_owned(), Instant::now())));
                                }
                            }
                            Some("error") => {
                                s2.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        let mut tick = tokio::time::interval(interval);
        // Open loop: if we fall behind, catch up in a burst rather than lower the rate.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut seq = 0u64;
        let first = now_nanos();
        while Instant::now() < until {
            tick.tick().await;
            // Latency counts from when the message was due, not from when this task got to send
            // it: a server that pushes back (full socket buffers) delays the sends, and that delay
            // is latency the user feels (no coordinated omission).
            let due = first + seq as u128 * interval.as_nanos();
            let cmid = format!("s{sender}-{seq}");
            let mut frame = target.clone();
            frame["type"] = json!("send");
            frame["client_msg_id"] = json!(cmid);
            frame["body"] = json!(format!("lg|{cmid}|{due}"));
            if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                break;
            }
            sends.sent.fetch_add(1, Ordering::Relaxed);
            seq += 1;
        }
        // Leave the socket open while the acks of the last frames arrive.
        let deadline = Instant::now() + grace.max(Duration::from_secs(2));
        while answered.load(Ordering::Relaxed) < seq && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = sink.close().await;
        let _ = reader.await;
    })
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "samples": h.len(),
    })
}

struct Measured {
    server_start: Option<(f64, u64)>,
    server_bytes_start: Option<u64>,
    services_start: Vec<Option<(f64, u64)>>,
    self_start: Option<(f64, u64)>,
    started: Instant,
}

impl Measured {
    fn start(c: &Common) -> Self {
        Measured {
            server_start: c.server_pid.and_then(|p| proc_sample(Some(p))),
            server_bytes_start: c.server_pid.and_then(|p| proc_write_bytes(Some(p))),
            services_start: c.service_pids.iter().map(|p| proc_sample(Some(*p))).collect(),
            self_start: proc_sample(None),
            started: Instant::now(),
        }
    }

    /// CPU (cores busy on average) and RSS of the server, the services and this generator over
    /// the measured interval.
    fn finish(&self, c: &Common) -> Value {
        let secs = self.started.elapsed().as_secs_f64();
        let cpu = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
            (Some(a), Some(b)) => json!({
                "cpu_seconds": b.0 - a.0,
                "cpu_cores_busy": (b.0 - a.0) / secs,
                "rss_kib_start": a.1,
                "rss_kib_end": b.1,
            }),
            _ => Value::Null,
        };
        let services: Vec<Value> = c
            .service_pids
            .iter()
            .zip(&self.services_start)
            .map(|(p, start)| json!({"pid": p, "usage": cpu(*start, proc_sample(Some(*p)))}))
            .collect();
        let written = match (self.server_bytes_start, c.server_pid.and_then(|p| proc_write_bytes(Some(p)))) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a)),
            _ => Value::Null,
        };
        json!({
            "seconds": secs,
            "server_write_bytes": written,
            "server": cpu(self.server_start, c.server_pid.and_then(|p| proc_sample(Some(p)))),
            "services": services,
            "loadgen": cpu(self.self_start, proc_sample(None)),
        })
    }
}

async fn wait_deliveries(receipts: &Receipts, expected: u64, grace: Duration) {
    let deadline = Instant::now() + grace;
    while receipts.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One shard of idle connections, held by this process. Each connection has a reader task, so
/// the server's pings are answered and the connection stays alive as long as it is held.
struct Shard {
    held: Vec<tokio::task::JoinHandle<()>>,
    targets: Vec<(String, String)>,
}

impl Shard {
    async fn open(client: &Client, targets: &[(String, String)]) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut out = Vec::with_capacity(targets.len());
        let mut stream = futures::stream::iter(targets.iter().map(|(t, d)| client.connect(t, d))).buffer_unordered(256);
        while let Some(ws) = stream.next().await {
            let mut ws = ws?;
            out.push(tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }));
        }
        Ok(out)
    }

    /// Closes and reopens `total` connections, `batch` at a time, so that all but one batch
    /// stay held; returns the seconds spent.
    async fn churn(&mut self, client: &Client, total: usize, batch: usize) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let mut done = 0;
        while done < total {
            let n = batch.min(total - done).min(self.held.len());
            if n == 0 {
                break;
            }
            for h in self.held.drain(..n) {
                h.abort();
            }
            let at = done % self.targets.len();
            let again: Vec<(String, String)> = self.targets.iter().cycle().skip(at).take(n).cloned().collect();
            self.held.extend(Self::open(client, &again).await?);
            done += n;
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// A child process of `idle --processes P`: opens its shard, says `connected <seconds>`, then
/// obeys `churn` and `exit` lines on stdin.
async fn idle_child(c: &Common, client: &Client, connections: usize, per_user: usize, churn: usize, batch: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let per_user = per_user.max(1);
    let users = client.accounts(&format!("lgi{}_", run_tag()), connections.div_ceil(per_user), c.setup_concurrency).await?;
    let targets: Vec<(String, String)> = (0..connections).map(|i| (users[i / per_user].token.clone(), format!("d{}", i % per_user))).collect();
    // The parent samples the server's memory between `ready` and `connect`, after the
    // registrations (password hashing) and before any connection.
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    if lines.next_line().await?.as_deref() != Some("connect") {
        return Ok(());
    }
    let t0 = Instant::now();
    let held = Shard::open(client, &targets).await?;
    println!("connected {}", t0.elapsed().as_secs_f64());
    let mut shard = Shard { held, targets };
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "churn" => {
                let secs = shard.churn(client, churn, batch).await?;
                let rss = proc_sample(None).map(|s| s.1).unwrap_or(0);
                println!("churned {churn} {secs} {rss}");
            }
            _ => break,
        }
    }
    Ok(())
}

/// Reads the next `<word> ...` line of a child, failing on anything else.
async fn child_says(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>, word: &str) -> anyhow::Result<Vec<f64>> {
    let line = lines.next_line().await?.with_context(|| format!("a load-generator child exited before saying {word:?}"))?;
    let mut parts = line.split_whitespace();
    if parts.next() != Some(word) {
        bail!("a load-generator child said {line:?}, expected {word:?}");
    }
    Ok(parts.filter_map(|p| p.parse().ok()).collect())
}

/// Idle connections spread over `processes` child processes (one process may hold at most
/// 20,000 file descriptors here): server RSS per held connection, the rate at which the first
/// connections were accepted, and the accept rate of a churn (close and reopen `churn`
/// connections, a batch at a time) while the rest stay held.
#[allow(clippy::too_many_arguments)]
async fn idle(c: &Common, connections: usize, per_user: usize, hold: Duration, processes: usize, churn: usize, batch: usize) -> anyhow::Result<Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let processes = processes.max(1);
    let exe = std::env::current_exe()?;
    let sources: Vec<String> = c.sources.iter().map(|s| s.to_string()).collect();
    let mut children = Vec::new();
    for p in 0..processes {
        let n = connections / processes + usize::from(p < connections % processes);
        let mut child = tokio::process::Command::new(&exe)
            .args(["--url", &c.url, "--sources", &sources.join(","), "--setup-concurrency", &c.setup_concurrency.to_string()])
            .args(["--first-slot", &(p * PORT_SPAN / processes * c.sources.len()).to_string()])
            .args(["idle-child", "--connections", &n.to_string(), "--devices-per-user", &per_user.to_string()])
            .args(["--churn", &(churn / processes).to_string(), "--batch", &batch.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a load-generator child")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = tokio::io::BufReader::new(child.stdout.take().context("child stdout")?).lines();
        children.push((child, stdin, stdout));
    }
    for (_, _, out) in children.iter_mut() {
        child_says(out, "ready").await?;
    }
    // Let the server settle after the registrations, then sample its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = c.server_pid.and_then(|p| proc_sample(Some(p)));
    let measured = Measured::start(c);
    let t0 = Instant::now();
    for (_, stdin, _) in children.iter_mut() {
        stdin.write_all(b"connect\n").await?;
    }
    let mut slowest_connect: f64 = 0.0;
    for (_, _, out) in children.iter_mut() {
        slowest_connect = slowest_connect.max(child_says(out, "connected").await?[0]);
    }
    let ramp_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    let after = c.server_pid.and_then(|p| proc_sample(Some(p)));
    let mut churn_result = Value::Null;
    if churn > 0 {
        let t1 = Instant::now();
        let cpu0 = c.server_pid.and_then(|p| proc_sample(Some(p)));
        for (_, stdin, _) in children.iter_mut() {
            stdin.write_all(b"churn\n").await?;
        }
        let mut loadgen_rss = 0.0;
        for (_, _, out) in children.iter_mut() {
            loadgen_rss += child_says(out, "churned").await?.get(2).copied().unwrap_or(0.0);
        }
        let secs = t1.elapsed().as_secs_f64();
        let cpu1 = c.server_pid.and_then(|p| proc_sample(Some(p)));
        let total = churn / processes * processes;
        churn_result = json!({
            "reconnected": total,
            "batch_per_process": batch,
            "seconds": secs,
            "accepted_per_second": (total as f64 / secs).round(),
            "held_at_least": connections.saturating_sub(batch * processes),
            "loadgen_rss_kib": loadgen_rss,
            "server_cpu_cores_busy": match (cpu0, cpu1) {
                (Some(a), Some(b)) => json!((b.0 - a.0) / secs),
                _ => Value::Null,
            },
        });
    }
    for (mut child, mut stdin, _) in children {
        let _ = stdin.write_all(b"exit\n").await;
        drop(stdin);
        let _ = child.wait().await;
    }
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => json!(((a.1 as f64 - b.1 as f64) * 1024.0 / connections as f64).round()),
        _ => Value::Null,
    };
    Ok(json!({
        "scenario": "idle",
        "connections": connections,
        "processes": processes,
        "ramp_seconds": ramp_secs,
        "ramp_accepted_per_second": (connections as f64 / slowest_connect.max(1e-9)).round(),
        "server_rss_kib_before": before.map(|b| b.1),
        "server_rss_kib_held": after.map(|a| a.1),
        "server_rss_bytes_per_connection": per_conn,
        "churn": churn_result,
        "measured": measured.finish(c),
    }))
}

async fn direct(c: &Common, client: &Client, pairs: usize, rate: f64, duration: Duration, probe: bool) -> anyhow::Result<Value> {
    let tag = run_tag();
    let senders = client.accounts(&format!("lgs{tag}_"), pairs, c.setup_concurrency).await?;
    let receivers = client.accounts(&format!("lgr{tag}_"), pairs, c.setup_concurrency).await?;
    let receipts = Receipts::new(c);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut rx_tasks = Vec::new();
    for (i, r) in receivers.iter().enumerate() {
        rx_tasks.push(spawn_receiver(client.connect(&r.token, "rx").await?, i, receipts.clone(), c.receipts, stop.clone()));
    }
    let sends = Arc::new(Sends::default());
    let interval = Duration::from_secs_f64(pairs as f64 / rate);
    let measured = Measured::start(c);
    let until = Instant::now() + duration;
    let mut tx_tasks = Vec::new();
    for (i, (s, r)) in senders.iter().zip(&receivers).enumerate() {
        tx_tasks.push(spawn_sender(client.connect(&s.token, "tx").await?, i, json!({"to": r.id}), (interval, until, c.drain), sends.clone()));
    }
    let probes = if probe { Some(tokio::spawn(probe_projections(client.http.clone(), client.base.clone(), senders[0].token.clone(), sends.clone(), until))) } else { None };
    for t in tx_tasks {
        let _ = t.await;
    }
    let acked = sends.acked.load(Ordering::Relaxed);
    wait_deliveries(&receipts, acked, c.drain).await;
    let m = measured.finish(c);
    let _ = stop_tx.send(true);
    for t in rx_tasks {
        let _ = t.await;
    }
    let projection = match probes {
        Some(p) => p.await.unwrap_or(Value::Null),
        None => Value::Null,
    };
    Ok(summary("direct", &sends, &receipts, acked, rate, duration, measured.started, m, json!({"pairs": pairs, "projection_delay_ms": projection})))
}

/// Sender 0's acknowledged messages, one at a time: polled on the receipts endpoint (its sender
/// may read it) every 2 ms from the moment of the ack until the projections have it; the time
/// from the ack is the projection delay.
async fn probe_projections(http: reqwest::Client, base: String, token: String, sends: Arc<Sends>, until: Instant) -> Value {
    let mut h = histogram();
    let mut acks = sends.last_ack.subscribe();
    loop {
        // Only an ack that arrives while no probe runs is probed: its lag is measured from the
        // ack, and polling starts right then (an ack noticed late would add the wait to its lag).
        acks.borrow_and_update();
        let now = Instant::now();
        if now >= until || tokio::time::timeout(until - now, acks.changed()).await.map_or(true, |r| r.is_err()) {
            break;
        }
        let Some((id, acked_at)) = acks.borrow_and_update().clone() else { continue };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = http
                .get(format!("{base}/v1/messages/{id}/receipts"))
                .bearer_auth(&token)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                let _ = h.record(acked_at.elapsed().as_micros().max(1) as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    percentiles(&h)
}

async fn group(c: &Common, client: &Client, groups: usize, size: usize, rate: f64, duration: Duration) -> anyhow::Result<Value> {
    let tag = run_tag();
    let receipts = Receipts::new(c);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut rx_tasks = Vec::new();
    let mut convs = Vec::new();
    let mut admins = Vec::new();
    let mut receiver_id = 0;
    for g in 0..groups {
        let members = client.accounts(&format!("lgg{tag}_{g}_"), size, c.setup_concurrency).await?;
        let (admin, rest) = members.split_first().context("a group needs members")?;
        convs.push(client.create_group(admin, rest).await?);
        admins.push(admin.clone());
        let mut conns = futures::stream::iter(rest.iter().map(|m| client.connect(&m.token, "rx"))).buffer_unordered(128);
        while let Some(ws) = conns.next().await {
            rx_tasks.push(spawn_receiver(ws?, receiver_id, receipts.clone(), c.receipts, stop.clone()));
            receiver_id += 1;
        }
    }
    // Warm-up, not measured: one message to each group, until every connected member has it. The
    // group's creation must reach the projections first (the gateway checks membership there),
    // and the first message also loads the fan-out's member list; a fixed wait that ended before
    // that put the wait into the first measured message.
    for (admin, conv) in admins.iter().zip(&convs) {
        warm_up(client, &admin.token, conv).await?;
    }
    let warm_expected = (groups * size.saturating_sub(1)) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while receipts.warm.load(Ordering::Relaxed) < warm_expected {
        anyhow::ensure!(Instant::now() < deadline, "the warm-up message reached {} of {warm_expected} members in 60 s", receipts.warm.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sends = Arc::new(Sends::default());
    let interval = Duration::from_secs_f64(groups as f64 / rate);
    let measured = Measured::start(c);
    let until = Instant::now() + duration;
    let mut tx_tasks = Vec::new();
    for (i, (admin, conv)) in admins.iter().zip(&convs).enumerate() {
        tx_tasks.push(spawn_sender(client.connect(&admin.token, "tx").await?, i, json!({"conversation_id": conv}), (interval, until, c.drain), sends.clone()));
    }
    for t in tx_tasks {
        let _ = t.await;
    }
    let acked = sends.acked.load(Ordering::Relaxed);
    let expected = acked * (size as u64 - 1);
    wait_deliveries(&receipts, expected, c.drain).await;
    let m = measured.finish(c);
    let _ = stop_tx.send(true);
    for t in rx_tasks {
        let _ = t.await;
    }
    Ok(summary("group", &sends, &receipts, expected, rate, duration, measured.started, m, json!({"groups": groups, "size": size})))
}

/// The body of a warm-up message (receivers count it apart from the measured ones).
const WARMUP_BODY: &str = "warmup";

/// Sends one warm-up message to `conv` and waits for its `sent`; a group whose creation is not
/// projected yet answers an error, and the send is tried again (up to 30 s).
async fn warm_up(client: &Client, token: &str, conv: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ws = client.connect(token, "warmup").await?;
    for attempt in 0.. {
        let frame = json!({"type": "send", "conversation_id": conv, "client_msg_id": format!("warmup-{attempt}"), "body": WARMUP_BODY});
        ws.send(Message::Text(frame.to_string().into())).await?;
        let answer = loop {
            let m = tokio::time::timeout_at(deadline.into(), ws.next()).await.context("no answer to the warm-up message in 30 s")?;
            let Some(Ok(Message::Text(t))) = m else { anyhow::bail!("the warm-up connection closed") };
            let v: Value = serde_json::from_str(t.as_str())?;
            if matches!(v["type"].as_str(), Some("sent" | "error")) {
                break v;
            }
        };
        if answer["type"] == "sent" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the warm-up message was refused for 30 s: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = ws.close(None).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn summary(scenario: &str, sends: &Sends, r: &Receipts, expected: u64, rate: f64, duration: Duration, started: Instant, measured: Value, extra: Value) -> Value {
    let delivered = r.delivered.load(Ordering::Relaxed);
    // Deliveries per second over the time they really took: from the first send to the last
    // delivery, or the sending time if that is longer (a server that falls behind delivers
    // during the drain, and dividing by the sending time would overstate its rate).
    let last = r.last_at.lock().ok().and_then(|l| *l).map(|l| l.saturating_duration_since(started)).unwrap_or_default();
    let span = last.max(duration).as_secs_f64();
    let latency = r.latency.lock().map(|h| percentiles(&h)).unwrap_or(Value::Null);
    // What one delivered message cost the server: CPU (user + system) and bytes written.
    let per_message = if delivered > 0 {
        json!({
            "server_cpu_us": measured["server"]["cpu_seconds"].as_f64().map(|s| (s * 1e6 / delivered as f64).round()),
            "server_write_bytes": measured["server_write_bytes"].as_u64().map(|b| b / delivered),
        })
    } else {
        Value::Null
    };
    let mut v = json!({
        "scenario": scenario,
        "offered_rate": rate,
        "duration_seconds": duration.as_secs_f64(),
        "sent": sends.sent.load(Ordering::Relaxed),
        "acked": sends.acked.load(Ordering::Relaxed),
        "errors": sends.errors.load(Ordering::Relaxed),
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "duplicated": r.duplicated.load(Ordering::Relaxed),
        "delivered_per_second": (delivered as f64 / span).round(),
        "delivery_seconds": span,
        "latency_ms": latency,
        "per_message": per_message,
        "measured": measured,
    });
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    v
}

fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

fn one_line(v: &Value) -> String {
    let l = &v["latency_ms"];
    match v["scenario"].as_str() {
        Some("idle") => format!(
            "idle: {} connections, {} B/connection (server RSS), {} accepted/s ramping, {} accepted/s churning while {} held",
            v["connections"], v["server_rss_bytes_per_connection"], v["ramp_accepted_per_second"], v["churn"]["accepted_per_second"], v["churn"]["held_at_least"]
        ),
        Some(s) => format!(
            "{s}: offered {}/s, delivered {}/s, p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms, sent {}, acked {}, lost {}, duplicated {}, server CPU {} cores, per message {} µs CPU and {} bytes written, projection lag {}",
            v["offered_rate"], v["delivered_per_second"], l["p50"], l["p99"], l["p999"], l["max"], v["sent"], v["acked"], v["lost"], v["duplicated"],
            v["measured"]["server"]["cpu_cores_busy"], v["per_message"]["server_cpu_us"], v["per_message"]["server_write_bytes"], v["projection_delay_ms"]
        ),
        None => v.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.common)?;
    let result = match cli.scenario {
        Scenario::Idle { connections, devices_per_user, hold, processes, churn, batch } => {
            idle(&cli.common, connections, devices_per_user, hold, processes, churn, batch).await?
        }
        Scenario::IdleChild { connections, devices_per_user, churn, batch } => {
            return idle_child(&cli.common, &client, connections, devices_per_user, churn, batch).await;
        }
        Scenario::Direct { pairs, rate, duration, probe_projections } => {
            direct(&cli.common, &client, pairs, rate, duration, probe_projections).await?
        }
        Scenario::Group { groups, size, rate, duration } => group(&cli.common, &client, groups, size, rate, duration).await?,
    };
    let text = serde_json::to_string_pretty(&result)?;
    if let Some(p) = &cli.common.out {
        std::fs::write(p, &text).with_context(|| format!("--out {}", p.display()))?;
    }
    println!("{text}");
    eprintln!("{}", one_line(&result));
    Ok(())
}

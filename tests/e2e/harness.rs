//! Test harness: real Kafka, Cassandra and Redis (started by `scripts/test.sh`), the real `chat`
//! binary as separate processes (so tests can SIGKILL and restart them), and small HTTP and
//! WebSocket clients. Every test gets its own keyspace, topic prefix, Redis prefix and groups.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chat_events::kafka::{KafkaConfig, KafkaLog};
use chat_events::{EventLog, TopicKind, Topics};
use chat_store::{FjallStore, ScyllaConfig, ScyllaStore, TableChecksum, Tables};
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "e2e-test-secret-e2e-test-secret-0123456789";
pub const PARTITIONS: i32 = 4;

/// Where the services are. Set by `scripts/test.sh` (from `scripts/services.sh env`).
#[derive(Clone, Debug)]
pub struct Services {
    pub kafka: String,
    pub cassandra: String,
    pub redis: String,
    /// S3 endpoint, bucket, access key, secret key, region.
    pub s3: [String; 5],
}

/// Whether the real services are configured (`eval "$(bash scripts/services.sh env)"`). Without
/// them a cluster test is skipped with a message, so that a bare `cargo test --workspace` runs
/// everything else; under CI (`CI` set) a missing service is an error, never a skip.
/// The variables that point the cluster tests at the services.
const SERVICE_VARS: [&str; 8] = [
    "CHAT_TEST_KAFKA",
    "CHAT_TEST_CASSANDRA",
    "CHAT_TEST_REDIS",
    "CHAT_TEST_S3_ENDPOINT",
    "CHAT_TEST_S3_BUCKET",
    "CHAT_TEST_S3_ACCESS_KEY",
    "CHAT_TEST_S3_SECRET_KEY",
    "CHAT_TEST_S3_REGION",
];

pub fn cluster_available(test: &str) -> bool {
    let missing: Vec<&str> = SERVICE_VARS.into_iter().filter(|k| std::env::var_os(k).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test}: CI must run the cluster tests, but {} not set", missing.join(", "));
    eprintln!(
        "SKIPPED {test}: needs Kafka, Cassandra, Redis and S3 ({} not set; bash scripts/services.sh up; eval \"$(bash scripts/services.sh env)\")",
        missing.join(", ")
    );
    false
}

pub fn services() -> Services {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: end-to-end tests need the real services; run them with `bash scripts/test.sh`")
        })
    };
    Services {
        kafka: get("CHAT_TEST_KAFKA"),
        cassandra: get("CHAT_TEST_CASSANDRA"),
        redis: get("CHAT_TEST_REDIS"),
        s3: [
            get("CHAT_TEST_S3_ENDPOINT"),
            get("CHAT_TEST_S3_BUCKET"),
            get("CHAT_TEST_S3_ACCESS_KEY"),
            get("CHAT_TEST_S3_SECRET_KEY"),
            get("CHAT_TEST_S3_REGION"),
        ],
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which back-ends a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `chat gateway` / `chat worker` processes on Kafka, Cassandra and Redis.
    Cluster,
    /// One `chat run` process on its embedded log and tables, no services.
    Embedded,
}

/// One test's slice of the shared services (cluster) or its own data directory (embedded).
pub struct Scope {
    pub name: String,
    pub mode: Mode,
    pub svc: Option<Services>,
    pub keyspace: String,
    pub topic_prefix: String,
    pub redis_prefix: String,
    pub log_dir: PathBuf,
    /// Embedded: the data directory and the fixed port `chat run` listens on across restarts.
    pub data_dir: PathBuf,
    pub port: u16,
    /// The consumer groups (projections, fan-out), when not the scope's own (a data directory
    /// made elsewhere, with the default names).
    pub groups: Option<(String, String)>,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_chat")
}

/// Settings that choose back-ends: whatever the developer's shell holds, the scope decides.
const CLEARED_ENV: &[&str] = &[
    "CHAT_KAFKA_BROKERS",
    "CHAT_CASSANDRA_NODES",
    "CHAT_REDIS_URL",
    "CHAT_DATA_DIR",
    "CHAT_CONFIG",
    "CHAT_S3_ENDPOINT",
    "CHAT_S3_BUCKET",
    "CHAT_S3_ACCESS_KEY",
    "CHAT_S3_SECRET_KEY",
    "CHAT_MEDIA_DIR",
];

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl Scope {
    /// A fresh scope; in cluster mode creates its topics and tables.
    pub async fn new(name: &str, mode: Mode) -> Scope {
        let tag = format!("{}_{}_{}", name, if mode == Mode::Cluster { "c" } else { "e" }, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let log_dir = std::env::temp_dir().join("chat-e2e").join(&tag);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let scope = Scope {
            name: name.to_owned(),
            mode,
            keyspace: format!("t_{tag}"),
            topic_prefix: format!("t.{tag}."),
            redis_prefix: format!("t:{tag}:"),
            svc: (mode == Mode::Cluster).then(services),
            data_dir: log_dir.join("data"),
            port: free_port(),
            log_dir,
            groups: None,
        };
        eprintln!("[{name}] {mode:?} scope {tag}, logs in {}", scope.log_dir.display());
        if mode == Mode::Embedded {
            return scope;
        }
        // Creating a keyspace's ~40 tables can exceed the driver's 30 s request timeout on a
        // machine busy with other suites (seen in CI): `chat migrate` is idempotent, so a failed
        // attempt is retried twice, as an operator would.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let out = Command::new(bin())
                .arg("migrate")
                .envs(scope.env_for(&scope.keyspace))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .await
                .expect("run chat migrate");
            if out.status.success() {
                return scope;
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(attempts < 3, "chat migrate failed {attempts} times: {err}");
            eprintln!("[{name}] chat migrate failed (attempt {attempts}), retrying: {err}");
        }
    }

    pub fn svc(&self) -> &Services {
        self.svc.as_ref().expect("cluster mode only")
    }

    pub fn env_for(&self, keyspace: &str) -> Vec<(String, String)> {
        let mut env = match &self.svc {
            Some(svc) => vec![
                ("CHAT_KAFKA_BROKERS".to_owned(), svc.kafka.clone()),
                ("CHAT_CASSANDRA_NODES".to_owned(), svc.cassandra.clone()),
                ("CHAT_REDIS_URL".to_owned(), svc.redis.clone()),
                ("CHAT_S3_ENDPOINT".to_owned(), svc.s3[0].clone()),
                ("CHAT_S3_BUCKET".to_owned(), svc.s3[1].clone()),
                ("CHAT_S3_ACCESS_KEY".to_owned(), svc.s3[2].clone()),
                ("CHAT_S3_SECRET_KEY".to_owned(), svc.s3[3].clone()),
                ("CHAT_S3_REGION".to_owned(), svc.s3[4].clone()),
            ],
            None => vec![("CHAT_DATA_DIR".to_owned(), self.data_dir.display().to_string())],
        };
        env.extend([
            ("CHAT_KEYSPACE".into(), keyspace.to_owned()),
            ("CHAT_TOPIC_PREFIX".into(), self.topic_prefix.clone()),
            ("CHAT_REDIS_PREFIX".into(), self.redis_prefix.clone()),
            ("CHAT_PARTITIONS".into(), PARTITIONS.to_string()),
            ("CHAT_TOKEN_SECRET".into(), SECRET.into()),
            ("CHAT_PROJECTION_GROUP".into(), self.projection_group()),
            ("CHAT_FANOUT_GROUP".into(), self.fanout_group()),
            ("CHAT_LOG".into(), "info,scylla=warn,rdkafka=warn,fjall=warn,lsm_tree=warn".into()),
            ("CHAT_ANALYTICS_KEYWORDS".into(), "rain,sun".into()),
            // Tests register many users from 127.0.0.1 (a group of 1,024); the limit's own test
            // sets it.
            ("CHAT_REGISTRATIONS_PER_ADDRESS".into(), "0".into()),
            // Tests' topics have one or two senders; the threshold's own test sets it.
            ("CHAT_ANALYTICS_MIN_USERS".into(), "1".into()),
            // Load tests send as fast as the server takes them; the limit's own test sets it.
            ("CHAT_SENDS_PER_USER_PER_SEC".into(), "0".into()),
        ]);
        env
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }

    pub fn projection_group(&self) -> String {
        self.groups.as_ref().map(|g| g.0.clone()).unwrap_or_else(|| format!("{}projections", self.topic_prefix))
    }

    pub fn fanout_group(&self) -> String {
        self.groups.as_ref().map(|g| g.1.clone()).unwrap_or_else(|| format!("{}fanout", self.topic_prefix))
    }

    async fn spawn(&self, label: &str, args: &[&str], extra_env: &[(&str, String)]) -> (Child, PathBuf) {
        let log = self.log_dir.join(format!("{label}-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
        for k in CLEARED_ENV {
            cmd.env_remove(k);
        }
        cmd.args(args).envs(self.env_for(&self.keyspace)).stdout(Stdio::piped()).stderr(file).kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        (cmd.spawn().expect("spawn chat"), log)
    }

    /// Starts a gateway node and waits until it is ready.
    pub async fn gateway(&self, node: &str) -> Gateway {
        self.gateway_with(node, &[]).await
    }

    /// Starts a gateway node with extra settings (embedded: the one `chat run` process).
    pub async fn gateway_with(&self, node: &str, extra: &[(&str, &str)]) -> Gateway {
        let (listen, args) = match self.mode {
            Mode::Cluster => ("127.0.0.1:0".to_owned(), ["gateway"]),
            Mode::Embedded => (format!("127.0.0.1:{}", self.port), ["run"]),
        };
        let mut env = vec![("CHAT_LISTEN", listen), ("CHAT_NODE_ID", node.to_owned())];
        if self.mode == Mode::Cluster {
            // Each node's search index beside the test's logs (not in the user's cache).
            env.push(("CHAT_SEARCH_DIR", self.log_dir.join(format!("search-{node}")).display().to_string()));
        }
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let (mut child, log) = self.spawn(&format!("gateway-{node}"), &args, &env).await;
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(i) = line.find("http://") {
                    return line[i..].split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("gateway {node} did not start; see {}", log.display()));
        // Every request has a deadline: a server that never answers fails the test, not hangs it.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client");
        let gw = Gateway { proc: Proc { child, log }, url, http };
        let ready_url = format!("{}/readyz", gw.url);
        let http = gw.http.clone();
        wait_for("gateway ready", Duration::from_secs(30), || {
            let http = http.clone();
            let u = ready_url.clone();
            async move { http.get(&u).send().await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
        gw
    }

    /// Starts a worker with the scope's groups (or others), running the given stages.
    pub async fn worker_with(&self, keyspace: &str, projection_group: &str, stages: &str) -> Proc {
        let (child, log) = self
            .spawn(
                "worker",
                &["worker"],
                &[
                    ("CHAT_KEYSPACE", keyspace.to_owned()),
                    ("CHAT_PROJECTION_GROUP", projection_group.to_owned()),
                    ("CHAT_STAGES", stages.to_owned()),
                ],
            )
            .await;
        Proc { child, log }
    }

    /// Starts a worker running both stages on the scope's keyspace and groups, with extra
    /// settings (cluster mode).
    pub async fn worker_env(&self, extra: &[(&str, String)]) -> Proc {
        let mut env = vec![
            ("CHAT_KEYSPACE", self.keyspace.clone()),
            ("CHAT_PROJECTION_GROUP", self.projection_group()),
            ("CHAT_STAGES", "fanout,projections".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let (child, log) = self.spawn("worker", &["worker"], &env).await;
        Proc { child, log }
    }

    /// Starts a worker running both stages on the scope's keyspace and groups (cluster mode;
    /// embedded mode runs them inside `chat run`).
    pub async fn worker(&self) -> Option<Proc> {
        match self.mode {
            Mode::Cluster => Some(self.worker_with(&self.keyspace, &self.projection_group(), "fanout,projections").await),
            Mode::Embedded => None,
        }
    }

    /// Checksums of the scope's projection tables (embedded: `chat checksums`, which asks the
    /// running server when there is one, since the tables belong to one process at a time).
    pub async fn checksums(&self) -> BTreeMap<String, TableChecksum> {
        match self.mode {
            Mode::Cluster => checksums(&self.store(&self.keyspace).await).await,
            Mode::Embedded => {
                let out = self.chat(&["checksums"]).await;
                assert!(out.status.success(), "chat checksums: {}", String::from_utf8_lossy(&out.stderr));
                serde_json::from_slice(&out.stdout).expect("checksums as JSON")
            }
        }
    }

    /// The projection tables holding `needle`, with how many rows (`chat find-text`; embedded:
    /// the running server answers).
    pub async fn tables_containing(&self, needle: &str) -> BTreeMap<String, u64> {
        let out = self.chat(&["find-text", needle]).await;
        assert!(out.status.success(), "chat find-text: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("find-text as JSON")
    }

    /// The scope's tables (cluster: a keyspace; embedded: the data directory's, which only a
    /// stopped server leaves to another process).
    pub async fn store(&self, keyspace: &str) -> Arc<dyn Tables> {
        match self.mode {
            Mode::Cluster => Arc::new(
                ScyllaStore::connect(&ScyllaConfig { nodes: vec![self.svc().cassandra.clone()], keyspace: keyspace.to_owned(), replication_factor: 1 })
                    .await
                    .expect("connect store"),
            ),
            Mode::Embedded => Arc::new(FjallStore::open(&self.data_dir).expect("open tables (is the server stopped?)")),
        }
    }

    pub fn log(&self) -> KafkaLog {
        KafkaLog::new(KafkaConfig::new(&self.svc().kafka)).expect("kafka client")
    }

    /// Runs a `chat` subcommand to completion with the scope's settings.
    pub async fn chat(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin());
        for k in CLEARED_ENV {
            cmd.env_remove(k);
        }
        cmd.args(args).envs(self.env_for(&self.keyspace)).output().await.expect("run chat")
    }

    /// Runs a `chat` subcommand with extra environment variables.
    pub async fn chat_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(bin());
        for k in CLEARED_ENV {
            cmd.env_remove(k);
        }
        cmd.args(args).envs(self.env_for(&self.keyspace)).envs(env.iter().copied()).output().await.expect("run chat")
    }

    /// Runs a `chat` subcommand whose stdout reader goes away at once (as in `chat ... | head`).
    pub async fn chat_into_closed_pipe(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin());
        for k in CLEARED_ENV {
            cmd.env_remove(k);
        }
        cmd.args(args).envs(self.env_for(&self.keyspace)).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn chat");
        drop(child.stdout.take());
        child.wait_with_output().await.expect("run chat")
    }

    /// Waits until a group has consumed everything in its topics.
    pub async fn wait_lag_zero(&self, group: &str, topics: &[String], timeout: Duration) {
        if self.mode == Mode::Embedded {
            let dir = self.data_dir.clone();
            wait_for(&format!("lag 0 of {group}"), timeout, || {
                let lag = chat_events::embedded::inspect::group_lag(&dir, group, topics);
                async move { lag.ok().filter(|l| *l == 0).map(|_| ()) }
            })
            .await;
            return;
        }
        let log = Arc::new(self.log());
        wait_for(&format!("lag 0 of {group}"), timeout, || {
            let log = log.clone();
            let topics = topics.to_vec();
            let group = group.to_owned();
            async move { log.group_lag(&group, &topics).await.ok().filter(|l| *l == 0).map(|_| ()) }
        })
        .await;
    }

    /// Waits until both stages have caught up with everything appended so far.
    pub async fn wait_settled(&self, timeout: Duration) {
        let t = self.topics();
        self.wait_lag_zero(&self.fanout_group(), &[t.name(TopicKind::Conversations)], timeout).await;
        let all = vec![t.name(TopicKind::Conversations), t.name(TopicKind::Users), t.name(TopicKind::Deliveries)];
        self.wait_lag_zero(&self.projection_group(), &all, timeout).await;
    }

    /// Every record of a topic, from the beginning to its current end.
    pub fn read_topic(&self, kind: TopicKind) -> Vec<Value> {
        let topic = self.topics().name(kind);
        if self.mode == Mode::Embedded {
            return chat_events::embedded::inspect::records(&self.data_dir, &topic)
                .unwrap_or_default()
                .iter()
                .map(|p| serde_json::from_slice(p).expect("json event"))
                .collect();
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.svc().kafka)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(Some(&topic), timeout).expect("metadata");
        let mut tpl = TopicPartitionList::new();
        let mut remaining = BTreeMap::new();
        for p in md.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(&topic, p.id(), timeout).expect("watermarks");
            if high > low {
                remaining.insert(p.id(), high);
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(low)).expect("tpl");
            }
        }
        let mut out = Vec::new();
        if remaining.is_empty() {
            return out;
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !remaining.is_empty() {
            assert!(std::time::Instant::now() < deadline, "reading {topic} timed out");
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(serde_json::from_slice(m.payload().unwrap_or_default()).expect("json event"));
                if m.offset() + 1 >= remaining.get(&m.partition()).copied().unwrap_or(0) {
                    remaining.remove(&m.partition());
                }
            }
        }
        out
    }
}

impl Drop for Scope {
    /// Drops the scope's keyspaces (its own and any `chat rebuild` made beside it: every table
    /// costs Cassandra heap, and a run creates many) and deletes its topics (a run left ~80 in
    /// the developer's Kafka).
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tails(&self.log_dir);
        }
        let (Some(svc), Mode::Cluster) = (&self.svc, self.mode) else { return };
        let nodes = vec![svc.cassandra.clone()];
        let (prefix, brokers, topic_prefix) = (self.keyspace.clone(), svc.kafka.clone(), self.topic_prefix.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            let _ = rt.block_on(ScyllaStore::drop_keyspaces(&nodes, &prefix));
            rt.block_on(delete_topics(&brokers, &topic_prefix))
        })
        .join();
    }
}

/// Deletes the topics whose names start with `prefix` (a scope's own: `t.<tag>.`); gives up
/// quietly within seconds when the broker is gone (a fault test's private one).
async fn delete_topics(brokers: &str, prefix: &str) -> Option<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    if !prefix.starts_with("t.") {
        return None;
    }
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().ok()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(3)).ok()?;
    let names: Vec<String> = metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with(prefix)).collect();
    if names.is_empty() {
        return Some(());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(10)));
    admin.delete_topics(&refs, &opts).await.ok().map(|_| ())
}

/// On a failed test: the last warnings and errors of each process log of the scope, so that a
/// CI log shows them (the files stay under the scope's folder).
fn print_log_tails(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut logs: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
    logs.sort();
    for path in logs {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                // Without the terminal colours.
                let mut out = String::with_capacity(l.len());
                let mut chars = l.chars();
                while let Some(c) = chars.next() {
                    if c == '\u{1b}' {
                        chars.by_ref().find(|c| c.is_ascii_alphabetic());
                    } else {
                        out.push(c);
                    }
                }
                out
            })
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        eprintln!("---- {} ({} warnings and errors; the last 40, each cut to 400 bytes):", path.display(), lines.len());
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{}", l.chars().take(400).collect::<String>());
        }
    }
}

/// Checksums of every projection table.
pub async fn checksums(store: &Arc<dyn Tables>) -> BTreeMap<String, TableChecksum> {
    store.checksums().await.expect("checksums")
}

/// A child process of the `chat` binary.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// SIGKILL: no cleanup at all.
    pub async fn kill9(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = self.child.kill().await;
                panic!("process did not stop on SIGTERM; see {}", self.log.display());
            }
        }
    }
}

/// A gateway node.
pub struct Gateway {
    pub proc: Proc,
    pub url: String,
    pub http: reqwest::Client,
}

/// A registered, logged-in user.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub name: String,
    pub token: String,
}

impl Gateway {
    pub fn ws_url(&self) -> String {
        self.url.replacen("http://", "ws://", 1) + "/v1/ws"
    }

    /// Registers and logs in, as a client does: a 503 (Cassandra too busy to decide the name
    /// claim in time, as when a thousand register at once on a loaded machine) is retried for up
    /// to a minute, and a 409 after a 503 means the first attempt claimed the name after all.
    pub async fn register(&self, name: &str) -> User {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut unavailable = false;
        loop {
            let r = self
                .http
                .post(format!("{}/v1/accounts", self.url))
                .json(&json!({"username": name, "password": "correct horse battery"}))
                .send()
                .await
                .expect("register");
            let status = r.status().as_u16();
            if status == 503 && tokio::time::Instant::now() < deadline {
                unavailable = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if status == 409 && unavailable {
                let (token, id) = self.login_with_id(name).await;
                return User { id, name: name.to_owned(), token };
            }
            assert_eq!(status, 201, "register {name}: {}", r.text().await.unwrap_or_default());
            let v: Value = r.json().await.expect("json");
            let id = v["user_id"].as_str().expect("user_id").to_owned();
            let token = self.login(name).await;
            return User { id, name: name.to_owned(), token };
        }
    }

    pub async fn login(&self, name: &str) -> String {
        self.login_with_id(name).await.0
    }

    /// (token, user id) of a log-in.
    async fn login_with_id(&self, name: &str) -> (String, String) {
        let r = self
            .http
            .post(format!("{}/v1/sessions", self.url))
            .json(&json!({"username": name, "password": "correct horse battery"}))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        (v["token"].as_str().expect("token").to_owned(), v["user_id"].as_str().expect("user_id").to_owned())
    }

    /// GET with a bearer token: (status, JSON body).
    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{}", self.url, path)).bearer_auth(token).send().await.expect("get");
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Any method with a bearer token and an optional JSON body: (status, JSON body).
    pub async fn call(&self, method: reqwest::Method, token: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.url, path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Uploads bytes as media of a kind: (status, JSON body).
    pub async fn upload(&self, token: &str, kind: &str, bytes: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/media?kind={kind}", self.url))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .expect("upload");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A raw GET (for downloads), with an optional Range header.
    pub async fn fetch(&self, token: &str, path: &str, range: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{}", self.url, path)).bearer_auth(token);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        req.send().await.expect("get")
    }

    pub async fn connect(&self, user: &User, device: &str) -> Ws {
        Ws::connect(&self.ws_url(), &user.token, device).await
    }
}

/// A WebSocket client that keeps frames it was not waiting for.
pub struct Ws {
    sink: futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, Message>,
    stream: futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>,
    pub buffered: VecDeque<Value>,
    pub closed: Option<u16>,
    /// The `welcome` frame the connection began with.
    pub welcome: Value,
    next_ref: u64,
}

impl Ws {
    pub async fn connect(url: &str, token: &str, device: &str) -> Ws {
        Self::try_connect(url, token, device).await.expect("websocket connect")
    }

    /// Connects, or says why not (used by clients that ride out a server restart).
    pub async fn try_connect(url: &str, token: &str, device: &str) -> Result<Ws, String> {
        let mut req = format!("{url}?device={device}").into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().map_err(|_| "header")?);
        let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| e.to_string())?;
        let (sink, stream) = ws.split();
        let mut ws = Ws { sink, stream, buffered: VecDeque::new(), closed: None, welcome: Value::Null, next_ref: 1 };
        match ws.read(Duration::from_secs(10)).await {
            Some(f) if f["type"] == "welcome" => {
                ws.welcome = f;
                Ok(ws)
            }
            other => Err(format!("no welcome: {other:?}")),
        }
    }

    /// Sends a text message; `None` if the connection failed before the `sent` frame.
    pub async fn try_send_text(&mut self, to: &str, client_msg_id: &str, body: &str) -> Option<Value> {
        self.try_send_text_as(to, client_msg_id, body, false).await
    }

    /// As [`Ws::try_send_text`]; `retry` marks a re-send of a `client_msg_id` that got no `sent`.
    pub async fn try_send_text_as(&mut self, to: &str, client_msg_id: &str, body: &str, retry: bool) -> Option<Value> {
        let r = self.next_ref;
        self.next_ref += 1;
        let frame = json!({"type": "send", "ref": r, "client_msg_id": client_msg_id, "to": to, "body": body, "retry": retry});
        self.sink.send(Message::Text(frame.to_string().into())).await.ok()?;
        loop {
            let f = self.read(Duration::from_secs(30)).await?;
            if f["ref"] == json!(r) {
                return (f["type"] == "sent").then_some(f);
            }
            self.buffered.push_back(f);
        }
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.sink.send(m).await.expect("ws send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(Message::Text(v.to_string().into())).await;
    }

    /// Reads the next frame from the socket (not the buffer).
    async fn read(&mut self, timeout: Duration) -> Option<Value> {
        // One deadline for the whole read: server pings (every 30 s) must not restart it.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.stream.next()).await.ok()??;
            match m {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("server frame is JSON")),
                Ok(Message::Close(c)) => {
                    self.closed = Some(c.map(|c| u16::from(c.code)).unwrap_or(1005));
                    return None;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits for a frame matching `pred`; other frames stay buffered.
    pub async fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i).expect("buffered");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Some(f) if pred(&f) => return f,
                Some(f) => self.buffered.push_back(f),
                None => panic!("no {what} frame within {timeout:?} (closed: {:?}, buffered: {:?})", self.closed, self.buffered),
            }
        }
    }

    /// Whether a frame matching `pred` arrives within `window` (used only for negative checks).
    pub async fn arrives_within(&mut self, window: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        if self.buffered.iter().any(&pred) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.read(left).await {
                Some(f) if pred(&f) => return true,
                Some(f) => self.buffered.push_back(f),
                None => return false,
            }
        }
    }

    /// Sends a frame with a fresh `ref` and waits for the answer carrying it.
    pub async fn request(&mut self, mut v: Value) -> Value {
        let r = self.next_ref;
        self.next_ref += 1;
        v["ref"] = json!(r);
        self.send(v).await;
        self.expect("answer", Duration::from_secs(30), |f| f["ref"] == json!(r)).await
    }

    /// Sends a frame with a fresh `ref` and returns the answer carrying it; `None` when the
    /// connection closed or no answer came within `timeout` (the connection is then unusable).
    pub async fn try_request(&mut self, mut v: Value, timeout: Duration) -> Option<Value> {
        let r = self.next_ref;
        self.next_ref += 1;
        v["ref"] = json!(r);
        self.sink.send(Message::Text(v.to_string().into())).await.ok()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let f = self.read(deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
            if f["ref"] == json!(r) {
                return Some(f);
            }
            self.buffered.push_back(f);
        }
    }

    /// Sends a text message; returns the `sent` frame (panics on an error frame).
    pub async fn send_text(&mut self, to: &str, client_msg_id: &str, body: &str) -> Value {
        let f = self.request(json!({"type": "send", "client_msg_id": client_msg_id, "to": to, "body": body})).await;
        assert_eq!(f["type"], "sent", "send failed: {f}");
        f
    }

    /// Syncs from `after` until `want` items arrived (paging, polling for the projection),
    /// then keeps reading until the stream is exhausted. Returns (items, cursor).
    pub async fn sync_until(&mut self, after: Option<String>, want: usize, timeout: Duration) -> (Vec<Value>, Option<String>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut items = Vec::new();
        let mut cursor = after;
        loop {
            let mut req = json!({"type": "sync", "limit": 100});
            if let Some(c) = &cursor {
                req["after"] = json!(c);
            }
            let f = self.request(req).await;
            assert_eq!(f["type"], "sync", "sync failed: {f}");
            let page = f["items"].as_array().cloned().unwrap_or_default();
            items.extend(page.iter().cloned());
            if let Some(c) = f["cursor"].as_str() {
                cursor = Some(c.to_owned());
            }
            if f["has_more"] == json!(true) {
                continue;
            }
            if items.len() >= want {
                return (items, cursor);
            }
            assert!(tokio::time::Instant::now() < deadline, "sync got {} of {want} items in {timeout:?}", items.len());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
        // Wait for the server's close so that its disconnect handling has started.
        let _ = tokio::time::timeout(Duration::from_secs(5), async { while self.stream.next().await.is_some() {} }).await;
    }
}

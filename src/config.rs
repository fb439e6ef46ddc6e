//! One configuration for every command, loaded in layers: defaults → file (`--config`,
//! TOML) → environment (`CHAT_*`) → flags. Every key has the same name in all three places
//! (file key `partitions`, variable `CHAT_PARTITIONS`, flag `--partitions`). Validation names
//! the offending key.
//!
//! The back-end follows from what is set: no Kafka, Cassandra or Redis address → embedded
//! (one process, data in `data_dir`); all three → cluster; some but not all → an error, never a
//! silent fallback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Deserialize;

/// The settings as given (each may be absent).
#[derive(Args, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of these settings (keys as the flag names with `_`).
    #[arg(long, env = "CHAT_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Embedded mode: directory of the event log and tables [default: ./chat-data].
    #[arg(long, env = "CHAT_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Cluster mode: Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "CHAT_KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,
    /// Cluster mode: Cassandra/ScyllaDB contact points (host:port,...).
    #[arg(long, env = "CHAT_CASSANDRA_NODES", global = true)]
    pub cassandra_nodes: Option<String>,
    /// Cluster mode: Redis URL for routing and presence.
    #[arg(long, env = "CHAT_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// Keyspace of every table [default: chat].
    #[arg(long, env = "CHAT_KEYSPACE", global = true)]
    pub keyspace: Option<String>,
    /// Replication factor of the keyspace when it is created [default: 1].
    #[arg(long, env = "CHAT_CASSANDRA_RF", global = true)]
    pub cassandra_rf: Option<u32>,
    /// Prefix of every topic name [default: chat.].
    #[arg(long, env = "CHAT_TOPIC_PREFIX", global = true)]
    pub topic_prefix: Option<String>,
    /// Partitions per topic when created; never change it afterwards [default: 8].
    #[arg(long, env = "CHAT_PARTITIONS", global = true)]
    pub partitions: Option<i32>,
    /// Replication factor of topics when created [default: 1].
    #[arg(long, env = "CHAT_KAFKA_REPLICATION", global = true)]
    pub kafka_replication: Option<i32>,
    /// Address the gateway listens on [default: 127.0.0.1:8080].
    #[arg(long, env = "CHAT_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Address where `chat worker` serves `/metrics` and `/healthz` (gateways serve them on their
    /// own listener) [default: none].
    #[arg(long, env = "CHAT_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<String>,
    /// This gateway node's id in routing [default: random].
    #[arg(long, env = "CHAT_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// Prefix of every Redis key and channel [default: chat:].
    #[arg(long, env = "CHAT_REDIS_PREFIX", global = true)]
    pub redis_prefix: Option<String>,
    /// Secret that signs tokens, ≥ 32 bytes, the same on every node [embedded default: generated
    /// once into the data directory].
    #[arg(long, env = "CHAT_TOKEN_SECRET", global = true, hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Token lifetime in seconds [default: 86400].
    #[arg(long, env = "CHAT_TOKEN_TTL_SECS", global = true)]
    pub token_ttl_secs: Option<i64>,
    /// Largest WebSocket message in bytes [default: 65536].
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", global = true)]
    pub max_frame_bytes: Option<usize>,
    /// Largest message body in bytes [default: 16384].
    #[arg(long, env = "CHAT_MAX_BODY_BYTES", global = true)]
    pub max_body_bytes: Option<usize>,
    /// Outbound frames queued per connection before it is closed as too slow [default: 256].
    #[arg(long, env = "CHAT_CONN_QUEUE", global = true)]
    pub conn_queue: Option<usize>,
    /// Failed log-ins per account name in 15 minutes before further attempts are refused with
    /// `rate_limited`; 0: no limit [default: 10].
    #[arg(long, env = "CHAT_LOGIN_FAILURES_PER_ACCOUNT", global = true)]
    pub login_failures_per_account: Option<usize>,
    /// Failed log-ins per client address in 15 minutes; 0: no limit (behind a reverse proxy every
    /// client has the proxy's address) [default: 50].
    #[arg(long, env = "CHAT_LOGIN_FAILURES_PER_ADDRESS", global = true)]
    pub login_failures_per_address: Option<usize>,
    /// Distinct senders a topic needs on a day before `GET /v1/analytics/topics` shows it
    /// [default: 5].
    #[arg(long, env = "CHAT_ANALYTICS_MIN_USERS", global = true)]
    pub analytics_min_users: Option<usize>,
    /// WebSocket connections per user on one node; 0: no limit [default: 32].
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_USER", global = true)]
    pub max_connections_per_user: Option<usize>,
    /// `send` frames per user and second on one node (bursts of twice as many); 0: no limit
    /// [default: 20].
    #[arg(long, env = "CHAT_SENDS_PER_USER_PER_SEC", global = true)]
    pub sends_per_user_per_sec: Option<usize>,
    /// Registrations per client address in an hour; 0: no limit [default: 30].
    #[arg(long, env = "CHAT_REGISTRATIONS_PER_ADDRESS", global = true)]
    pub registrations_per_address: Option<usize>,
    /// Seconds without any frame from a WebSocket client (pongs included) before the server
    /// closes the connection with 1001; the server pings every third of it [default: 90; at
    /// least 3].
    #[arg(long, env = "CHAT_WS_IDLE_SECS", global = true)]
    pub ws_idle_secs: Option<u64>,
    /// Seconds a connection's routing entry lives without a heartbeat [default: 30].
    #[arg(long, env = "CHAT_PRESENCE_TTL_SECS", global = true)]
    pub presence_ttl_secs: Option<u64>,
    /// Consumer group of the projection stage [default: chat-projections].
    #[arg(long, env = "CHAT_PROJECTION_GROUP", global = true)]
    pub projection_group: Option<String>,
    /// Consumer group of the fan-out stage [default: chat-fanout].
    #[arg(long, env = "CHAT_FANOUT_GROUP", global = true)]
    pub fanout_group: Option<String>,
    /// Where this node keeps its message search index [default: embedded `<data dir>/search`;
    /// cluster `$HOME/.cache/chat/search/<keyspace>/<node id>`].
    #[arg(long, env = "CHAT_SEARCH_DIR", global = true)]
    pub search_dir: Option<String>,
    /// Consumer group of this node's search indexer [default: embedded `chat-search`; cluster
    /// `<projection group>-search-<node id>`: every gateway node keeps its own copy].
    #[arg(long, env = "CHAT_SEARCH_GROUP", global = true)]
    pub search_group: Option<String>,
    /// Members per group, the creator included [default: 1024].
    #[arg(long, env = "CHAT_MAX_GROUP_SIZE", global = true)]
    pub max_group_size: Option<usize>,
    /// How long after sending a message may be edited or deleted for everyone, in seconds (the
    /// gateway and the fan-out must agree) [default: 172800, 48 hours].
    #[arg(long, env = "CHAT_EDIT_WINDOW_SECS", global = true)]
    pub edit_window_secs: Option<u64>,
    /// Serves `/v1/ws/echo`, an unauthenticated WebSocket echo on the gateway's WebSocket stack,
    /// for conformance runs (Autobahn); never in production [default: false].
    #[arg(long, env = "CHAT_WS_ECHO", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub ws_echo: Option<bool>,
    /// Media in an S3-compatible store (cluster mode): endpoint URL, e.g. http://127.0.0.1:8333.
    #[arg(long, env = "CHAT_S3_ENDPOINT", global = true)]
    /// Set with the bucket and both keys (all four, or none).
    pub s3_endpoint: Option<String>,
    /// The bucket that holds the media objects (it must exist).
    #[arg(long, env = "CHAT_S3_BUCKET", global = true)]
    pub s3_bucket: Option<String>,
    /// The S3 access key id.
    #[arg(long, env = "CHAT_S3_ACCESS_KEY", global = true)]
    pub s3_access_key: Option<String>,
    /// The S3 secret access key (prefer the environment variable: arguments show in `ps`).
    #[arg(long, env = "CHAT_S3_SECRET_KEY", global = true, hide_env_values = true)]
    pub s3_secret_key: Option<String>,
    /// The S3 region to sign requests for [default: us-east-1].
    #[arg(long, env = "CHAT_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Media on a filesystem path instead (shared by every gateway node) [embedded default:
    /// <data_dir>/media].
    #[arg(long, env = "CHAT_MEDIA_DIR", global = true)]
    pub media_dir: Option<PathBuf>,
    /// Largest image upload in bytes [default: 16 MiB].
    #[arg(long, env = "CHAT_MAX_IMAGE_BYTES", global = true)]
    pub max_image_bytes: Option<u64>,
    /// Largest audio upload in bytes [default: 16 MiB].
    #[arg(long, env = "CHAT_MAX_AUDIO_BYTES", global = true)]
    pub max_audio_bytes: Option<u64>,
    /// Largest video upload in bytes [default: 100 MiB].
    #[arg(long, env = "CHAT_MAX_VIDEO_BYTES", global = true)]
    pub max_video_bytes: Option<u64>,
    /// Words whose mentions analytics count as topics, besides hashtags (comma-separated; a
    /// rebuild with another list counts other topics).
    #[arg(long, env = "CHAT_ANALYTICS_KEYWORDS", global = true)]
    pub analytics_keywords: Option<String>,
    /// Stages a worker runs: fanout, projections [default: fanout,projections].
    #[arg(long, env = "CHAT_STAGES", global = true)]
    pub stages: Option<String>,
}

/// Where the platform keeps its state.
#[derive(Clone, Debug)]
pub enum Backend {
    Embedded { data_dir: PathBuf },
    Cluster { kafka_brokers: String, cassandra_nodes: Vec<String>, redis_url: String },
}

/// Where media objects are stored.
#[derive(Clone, Debug)]
pub enum MediaBackend {
    S3 { endpoint: String, bucket: String, access_key: String, secret_key: String, region: String },
    Dir(PathBuf),
    /// Cluster mode with neither: gateways refuse to start (workers and tools do not need it).
    None,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub backend: Backend,
    pub keyspace: String,
    pub cassandra_rf: u32,
    pub topic_prefix: String,
    pub partitions: i32,
    pub kafka_replication: i32,
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub node_id: String,
    pub redis_prefix: String,
    pub token_secret: Option<String>,
    pub token_ttl_secs: i64,
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub conn_queue: usize,
    /// (failed log-ins per account, per address, registrations per address); 0: off.
    pub account_limits: (usize, usize, usize),
    pub analytics_min_users: usize,
    /// (connections per user, sends per user and second); 0: off.
    pub user_limits: (usize, usize),
    pub presence_ttl: Duration,
    pub ws_idle: Duration,
    pub max_group_size: usize,
    pub edit_window: Duration,
    pub ws_echo: bool,
    pub analytics_keywords: Vec<String>,
    pub media: MediaBackend,
    /// (image, audio, video) upload limits in bytes.
    pub media_limits: (u64, u64, u64),
    pub projection_group: String,
    pub fanout_group: String,
    pub stages: Vec<String>,
    /// Where this node's search index lives, and its indexer's consumer group.
    pub search_dir: PathBuf,
    pub search_group: String,
}

macro_rules! overlay {
    ($hi:expr, $lo:expr, $($f:ident),*) => {
        Settings { config: $hi.config.clone(), $($f: $hi.$f.clone().or($lo.$f.clone())),* }
    };
}

fn key(name: &str) -> String {
    format!("`{name}` (CHAT_{} / --{})", name.to_uppercase(), name.replace('_', "-"))
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl Settings {
    /// Reads the config file (if any) under the settings from environment and flags.
    pub fn layered(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            None => Settings::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<Settings>(&text).map_err(|e| anyhow!("config file {}: {e}", path.display()))?
            }
        };
        Ok(overlay!(
            self,
            file,
            data_dir,
            kafka_brokers,
            cassandra_nodes,
            redis_url,
            keyspace,
            cassandra_rf,
            topic_prefix,
            partitions,
            kafka_replication,
            listen,
            metrics_listen,
            node_id,
            redis_prefix,
            token_secret,
            token_ttl_secs,
            max_frame_bytes,
            max_body_bytes,
            conn_queue,
            login_failures_per_account,
            login_failures_per_address,
            registrations_per_address,
            analytics_min_users,
            max_connections_per_user,
            sends_per_user_per_sec,
            presence_ttl_secs,
            ws_idle_secs,
            max_group_size,
            edit_window_secs,
            ws_echo,
            analytics_keywords,
            s3_endpoint,
            s3_bucket,
            s3_access_key,
            s3_secret_key,
            s3_region,
            media_dir,
            max_image_bytes,
            max_audio_bytes,
            max_video_bytes,
            projection_group,
            fanout_group,
            search_dir,
            search_group,
            stages
        ))
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let s = self.layered()?;
        let cluster = [
            ("kafka_brokers", non_empty(s.kafka_brokers.clone())),
            ("cassandra_nodes", non_empty(s.cassandra_nodes.clone())),
            ("redis_url", non_empty(s.redis_url.clone())),
        ];
        let set: Vec<&str> = cluster.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| *k).collect();
        let backend = match set.len() {
            0 => Backend::Embedded { data_dir: s.data_dir.clone().unwrap_or_else(|| PathBuf::from("chat-data")) },
            3 => {
                if s.data_dir.is_some() {
                    bail!("{} is for the embedded mode, but a cluster is configured; remove one of them", key("data_dir"));
                }
                let nodes: Vec<String> =
                    s.cassandra_nodes.iter().flat_map(|n| n.split(',')).map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
                Backend::Cluster {
                    kafka_brokers: s.kafka_brokers.clone().unwrap_or_default(),
                    cassandra_nodes: nodes,
                    redis_url: s.redis_url.clone().unwrap_or_default(),
                }
            }
            _ => {
                let missing: Vec<String> = cluster.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| key(k)).collect();
                bail!(
                    "half-configured cluster: {} set but {} missing; set all three for cluster mode or none for the embedded mode",
                    set.join(", "),
                    missing.join(" and ")
                );
            }
        };
        let partitions = s.partitions.unwrap_or(8);
        if !(1..=1024).contains(&partitions) {
            bail!("{} must be between 1 and 1024, got {partitions}", key("partitions"));
        }
        let kafka_replication = s.kafka_replication.unwrap_or(1);
        if kafka_replication < 1 {
            bail!("{} must be at least 1, got {kafka_replication}", key("kafka_replication"));
        }
        let cassandra_rf = s.cassandra_rf.unwrap_or(1);
        if cassandra_rf < 1 {
            bail!("{} must be at least 1", key("cassandra_rf"));
        }
        let keyspace = s.keyspace.unwrap_or_else(|| "chat".into());
        if keyspace.is_empty() || keyspace.len() > 48 || !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("{} must be 1-48 characters of a-z, 0-9 and '_', got {keyspace:?}", key("keyspace"));
        }
        let topic_prefix = s.topic_prefix.unwrap_or_else(|| "chat.".into());
        if !topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            bail!("{} may hold only a-z, 0-9, '.', '_', '-', got {topic_prefix:?}", key("topic_prefix"));
        }
        let listen = s.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        if listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("{} must be an address like 127.0.0.1:8080, got {listen:?}", key("listen"));
        }
        if let Some(t) = &s.token_secret {
            if t.len() < 32 {
                bail!("{} must be at least 32 bytes", key("token_secret"));
            }
        }
        let token_ttl_secs = s.token_ttl_secs.unwrap_or(86_400);
        // Session revocations are kept a week: a token must not outlive them.
        let max_ttl = chat_store::REVOCATIONS_KEPT.num_seconds();
        if !(1..=max_ttl).contains(&token_ttl_secs) {
            bail!("{} must be between 1 and {max_ttl} (a week), got {token_ttl_secs}", key("token_ttl_secs"));
        }
        let max_frame_bytes = s.max_frame_bytes.unwrap_or(64 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&max_frame_bytes) {
            bail!("{} must be between 1 KiB and 16 MiB, got {max_frame_bytes}", key("max_frame_bytes"));
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(16 * 1024);
        if max_body_bytes < 1 || max_body_bytes >= max_frame_bytes {
            bail!("{} must be positive and below {} ({max_frame_bytes})", key("max_body_bytes"), key("max_frame_bytes"));
        }
        let conn_queue = s.conn_queue.unwrap_or(256);
        if !(8..=65_536).contains(&conn_queue) {
            bail!("{} must be between 8 and 65536, got {conn_queue}", key("conn_queue"));
        }
        let presence_ttl_secs = s.presence_ttl_secs.unwrap_or(30);
        let ws_idle_secs = s.ws_idle_secs.unwrap_or(90);
        if ws_idle_secs < 3 {
            bail!("{} must be at least 3", key("ws_idle_secs"));
        }
        if presence_ttl_secs < 3 {
            bail!("{} must be at least 3", key("presence_ttl_secs"));
        }
        let s3 = [
            ("s3_endpoint", non_empty(s.s3_endpoint.clone())),
            ("s3_bucket", non_empty(s.s3_bucket.clone())),
            ("s3_access_key", non_empty(s.s3_access_key.clone())),
            ("s3_secret_key", non_empty(s.s3_secret_key.clone())),
        ];
        let s3_set = s3.iter().filter(|(_, v)| v.is_some()).count();
        let media = if s3_set == s3.len() {
            if s.media_dir.is_some() {
                bail!("{} and the S3 settings are both set; choose one place for media", key("media_dir"));
            }
            let v = |i: usize| s3[i].1.clone().unwrap_or_default();
            MediaBackend::S3 { endpoint: v(0), bucket: v(1), access_key: v(2), secret_key: v(3), region: s.s3_region.clone().unwrap_or_else(|| "us-east-1".into()) }
        } else if s3_set > 0 {
            let missing: Vec<String> = s3.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| key(k)).collect();
            bail!("half-configured media store: {} missing", missing.join(", "));
        } else if let Some(d) = &s.media_dir {
            MediaBackend::Dir(d.clone())
        } else {
            match &backend {
                Backend::Embedded { data_dir } => MediaBackend::Dir(data_dir.join("media")),
                Backend::Cluster { .. } => MediaBackend::None,
            }
        };
        let limit = |v: Option<u64>, default: u64, name: &str| -> anyhow::Result<u64> {
            let v = v.unwrap_or(default);
            if v == 0 || v > 10 << 30 {
                bail!("{} must be between 1 byte and 10 GiB", key(name));
            }
            Ok(v)
        };
        let media_limits = (
            limit(s.max_image_bytes, 16 << 20, "max_image_bytes")?,
            limit(s.max_audio_bytes, 16 << 20, "max_audio_bytes")?,
            limit(s.max_video_bytes, 100 << 20, "max_video_bytes")?,
        );
        let max_group_size = s.max_group_size.unwrap_or(1024);
        if !(2..=100_000).contains(&max_group_size) {
            bail!("{} must be between 2 and 100000, got {max_group_size}", key("max_group_size"));
        }
        let projection_group = s.projection_group.clone().unwrap_or_else(|| "chat-projections".into());
        let node = s.node_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
        let (search_dir, search_group) = match &backend {
            Backend::Embedded { data_dir } => (data_dir.join("search"), "chat-search".to_owned()),
            Backend::Cluster { .. } => {
                let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
                (home.join(".cache/chat/search").join(&keyspace).join(&node), format!("{projection_group}-search-{node}"))
            }
        };
        let search_dir = s.search_dir.clone().map(PathBuf::from).unwrap_or(search_dir);
        let search_group = s.search_group.clone().unwrap_or(search_group);
        let edit_window_secs = s.edit_window_secs.unwrap_or(chat_events::DEFAULT_EDIT_WINDOW.as_secs());
        if !(1..=10 * 365 * 86_400).contains(&edit_window_secs) {
            bail!("{} must be between 1 second and 10 years, got {edit_window_secs}", key("edit_window_secs"));
        }
        let stages: Vec<String> =
            s.stages.unwrap_or_else(|| "fanout,projections".into()).split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect();
        if let Some(bad) = stages.iter().find(|x| *x != "fanout" && *x != "projections") {
            bail!("{} has an unknown stage {bad:?} (use fanout, projections)", key("stages"));
        }
        Ok(Config {
            backend,
            keyspace,
            cassandra_rf,
            topic_prefix,
            partitions,
            kafka_replication,
            listen,
            metrics_listen: non_empty(s.metrics_listen),
            node_id: node,
            redis_prefix: s.redis_prefix.unwrap_or_else(|| "chat:".into()),
            token_secret: s.token_secret,
            token_ttl_secs,
            max_frame_bytes,
            max_body_bytes,
            conn_queue,
            account_limits: (
                s.login_failures_per_account.unwrap_or(10),
                s.login_failures_per_address.unwrap_or(50),
                s.registrations_per_address.unwrap_or(30),
            ),
            analytics_min_users: s.analytics_min_users.unwrap_or(5).max(1),
            user_limits: (s.max_connections_per_user.unwrap_or(32), s.sends_per_user_per_sec.unwrap_or(20)),
            presence_ttl: Duration::from_secs(presence_ttl_secs),
            ws_idle: Duration::from_secs(ws_idle_secs),
            max_group_size,
            edit_window: Duration::from_secs(edit_window_secs),
            ws_echo: s.ws_echo.unwrap_or(false),
            media,
            media_limits,
            analytics_keywords: s
                .analytics_keywords
                .map(|k| k.split(',').map(|w| w.trim().to_lowercase()).filter(|w| !w.is_empty()).collect())
                .unwrap_or_default(),
            search_dir,
            search_group,
            projection_group,
            fanout_group: s.fanout_group.unwrap_or_else(|| "chat-fanout".into()),
            stages,
        })
    }
}

impl Config {
    /// Which mode and which data a command works on, in one line (tools print it on stderr, so
    /// that reading the wrong place is never silent).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Embedded { data_dir } => format!("embedded, data in {}", data_dir.display()),
            Backend::Cluster { kafka_brokers, cassandra_nodes, redis_url } => format!(
                "cluster: Kafka {kafka_brokers} (topics {}*), Cassandra {} (keyspace {}), Redis {} (keys {}*)",
                self.topic_prefix,
                cassandra_nodes.join(","),
                self.keyspace,
                redact_url(redis_url),
                self.redis_prefix
            ),
        }
    }

    pub fn data_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Embedded { data_dir } => Some(data_dir),
            Backend::Cluster { .. } => None,
        }
    }
}

/// A URL without its password (`redis://user:secret@host` → `redis://user:***@host`).
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            let user = auth.split(':').next().unwrap_or("");
            let hidden = if auth.contains(':') { format!("{user}:***") } else { user.to_owned() };
            format!("{}{}{}", &url[..scheme + 3], hidden, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_not_printed() {
        assert_eq!(redact_url("redis://user:secret@host:6379/0"), "redis://user:***@host:6379/0");
        assert_eq!(redact_url("redis://:secret@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn nothing_set_is_embedded_and_all_set_is_cluster() {
        let c = Settings::default().resolve().unwrap();
        assert!(matches!(c.backend, Backend::Embedded { .. }));
        let s = Settings {
            kafka_brokers: Some("k:9092".into()),
            cassandra_nodes: Some("c:9042, d:9042".into()),
            redis_url: Some("redis://r/".into()),
            ..Default::default()
        };
        match s.resolve().unwrap().backend {
            Backend::Cluster { cassandra_nodes, .. } => assert_eq!(cassandra_nodes, vec!["c:9042", "d:9042"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_half_configured_cluster_is_an_error_naming_what_is_missing() {
        let s = Settings { kafka_brokers: Some("k:9092".into()), ..Default::default() };
        let e = s.resolve().unwrap_err().to_string();
        assert!(e.contains("half-configured"), "{e}");
        assert!(e.contains("CHAT_CASSANDRA_NODES") && e.contains("CHAT_REDIS_URL"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Settings { partitions: Some(0), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(e.contains("CHAT_PARTITIONS"), "{e}");
        let e = Settings { listen: Some("nowhere".into()), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(e.contains("CHAT_LISTEN"), "{e}");
        let e = Settings { stages: Some("fanout,nap".into()), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(e.contains("CHAT_STAGES"), "{e}");
    }

    #[test]
    fn the_file_is_below_env_and_flags() {
        let dir = std::env::temp_dir().join(format!("chat-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.toml");
        std::fs::write(&path, "partitions = 3\nkeyspace = \"from_file\"\n").unwrap();
        let c = Settings { config: Some(path.clone()), keyspace: Some("from_flag".into()), ..Default::default() }.resolve().unwrap();
        assert_eq!(c.partitions, 3);
        assert_eq!(c.keyspace, "from_flag");
        std::fs::write(&path, "partitons = 3\n").unwrap();
        let e = Settings { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string();
        assert!(e.contains("partitons"), "unknown keys are named: {e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

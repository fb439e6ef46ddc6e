//! `chat`: the platform in one binary.
//!
//! - `chat gateway`: a gateway node (HTTP + WebSocket);
//! - `chat worker`: a projection worker (fan-out stage and projection stage);
//! - `chat migrate`: creates topics and tables, then exits;
//! - `chat reset-group`: forgets a consumer group's offsets (for a rebuild);
//! - `chat checksums`: row counts and hashes of every projection table, as JSON.
//!
//! Every flag has an environment variable (`CHAT_*`), the names `compose/` and
//! `scripts/services.sh` use.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_events::kafka::{KafkaConfig, KafkaLog};
use chat_events::{EventLog, TopicKind, TopicSpec, Topics};
use chat_gateway::{Chat, Hub, Limits, RedisRouting, Tokens};
use chat_projections::projector::projection_topics;
use chat_projections::{FanOut, Projector, WorkerStats};
use chat_store::{ScyllaConfig, ScyllaStore, TableAdmin};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "chat", version, about = "Event-sourced messaging platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node.
    Gateway(GatewayArgs),
    /// Run a projection worker (fan-out and projections).
    Worker(WorkerArgs),
    /// Create the topics and tables, then exit.
    Migrate(Common),
    /// Delete a consumer group so that it starts again from the beginning (stop its workers first).
    ResetGroup {
        #[command(flatten)]
        common: Common,
        /// The group to reset.
        #[arg(long)]
        group: String,
    },
    /// Print row counts and SHA-256 of every projection table as JSON.
    Checksums(Common),
}

/// Settings shared by every command.
#[derive(Args, Clone)]
struct Common {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CHAT_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Cassandra/ScyllaDB contact points, comma-separated host:port.
    #[arg(long, env = "CHAT_CASSANDRA_NODES", default_value = "127.0.0.1:9042", value_delimiter = ',')]
    cassandra_nodes: Vec<String>,
    /// Keyspace of every table.
    #[arg(long, env = "CHAT_KEYSPACE", default_value = "chat")]
    keyspace: String,
    /// Replication factor of the keyspace when it is created.
    #[arg(long, env = "CHAT_CASSANDRA_RF", default_value_t = 1)]
    cassandra_rf: u32,
    /// Prefix of every topic name.
    #[arg(long, env = "CHAT_TOPIC_PREFIX", default_value = "chat.")]
    topic_prefix: String,
    /// Partitions of each topic when it is created. The deliveries topic's count must never
    /// change afterwards (sync cursors are offsets within a user's partition).
    #[arg(long, env = "CHAT_PARTITIONS", default_value_t = 8)]
    partitions: i32,
    /// Replication factor of topics when they are created.
    #[arg(long, env = "CHAT_KAFKA_REPLICATION", default_value_t = 1)]
    kafka_replication: i32,
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on.
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// This node's id in routing (unique per running node; random if not given).
    #[arg(long, env = "CHAT_NODE_ID")]
    node_id: Option<String>,
    /// Redis URL for routing and presence.
    #[arg(long, env = "CHAT_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "CHAT_REDIS_PREFIX", default_value = "chat:")]
    redis_prefix: String,
    /// Secret that signs tokens; every node of a cluster needs the same one (at least 32 bytes).
    #[arg(long, env = "CHAT_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Token lifetime in seconds.
    #[arg(long, env = "CHAT_TOKEN_TTL_SECS", default_value_t = 86_400)]
    token_ttl_secs: i64,
    /// Largest WebSocket message in bytes (bigger ones close the socket with 1009).
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
    /// Largest message body in bytes.
    #[arg(long, env = "CHAT_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    max_body_bytes: usize,
    /// Outbound frames queued per connection before it is closed as too slow.
    #[arg(long, env = "CHAT_CONN_QUEUE", default_value_t = 256)]
    conn_queue: usize,
    /// Seconds a connection's routing entry lives without a heartbeat (a crashed node's users
    /// go offline after about this long).
    #[arg(long, env = "CHAT_PRESENCE_TTL_SECS", default_value_t = 30)]
    presence_ttl_secs: u64,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    common: Common,
    /// Consumer group of the projection stage.
    #[arg(long, env = "CHAT_PROJECTION_GROUP", default_value = "chat-projections")]
    projection_group: String,
    /// Consumer group of the fan-out stage.
    #[arg(long, env = "CHAT_FANOUT_GROUP", default_value = "chat-fanout")]
    fanout_group: String,
    /// Which stages to run: fanout, projections, or both.
    #[arg(long, env = "CHAT_STAGES", default_value = "fanout,projections", value_delimiter = ',')]
    stages: Vec<String>,
}

fn topics(c: &Common) -> Topics {
    Topics::new(c.topic_prefix.clone())
}

async fn open_log(c: &Common) -> anyhow::Result<Arc<KafkaLog>> {
    if c.partitions < 1 {
        bail!("CHAT_PARTITIONS must be at least 1 (got {})", c.partitions);
    }
    let log = Arc::new(KafkaLog::new(KafkaConfig::new(&c.kafka_brokers)).context("CHAT_KAFKA_BROKERS")?);
    let mut specs: Vec<TopicSpec> = topics(c)
        .all()
        .into_iter()
        .map(|name| TopicSpec { name, partitions: c.partitions, replication: c.kafka_replication })
        .collect();
    specs.push(TopicSpec { name: topics(c).dead_letters(), partitions: 1, replication: c.kafka_replication });
    log.ensure_topics(&specs).await.context("creating topics (is Kafka up at CHAT_KAFKA_BROKERS?)")?;
    Ok(log)
}

async fn open_store(c: &Common) -> anyhow::Result<Arc<ScyllaStore>> {
    let cfg = ScyllaConfig { nodes: c.cassandra_nodes.clone(), keyspace: c.keyspace.clone(), replication_factor: c.cassandra_rf };
    Ok(Arc::new(ScyllaStore::connect(&cfg).await.context("connecting to CHAT_CASSANDRA_NODES")?))
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "no SIGTERM handler");
                    let _ = ctrl_c.await;
                    let _ = tx.send(true);
                    return;
                }
            };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    let secret = match &a.token_secret {
        Some(s) if s.len() >= 32 => s.clone().into_bytes(),
        Some(_) => bail!("CHAT_TOKEN_SECRET must be at least 32 bytes"),
        None => {
            warn!("CHAT_TOKEN_SECRET not set: using a random secret; tokens will not survive a restart or work on other nodes");
            let mut b = [0u8; 32];
            for (i, x) in uuid::Uuid::new_v4().as_bytes().iter().chain(uuid::Uuid::new_v4().as_bytes()).enumerate() {
                b[i] = *x;
            }
            b.to_vec()
        }
    };
    let node = a.node_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    let log = open_log(&a.common).await?;
    let store = open_store(&a.common).await?;
    let hub = Arc::new(Hub::new());
    if a.presence_ttl_secs < 3 {
        bail!("CHAT_PRESENCE_TTL_SECS must be at least 3");
    }
    let presence_ttl = Duration::from_secs(a.presence_ttl_secs);
    let routing = RedisRouting::connect(&a.redis_url, &a.redis_prefix, &node, presence_ttl, hub.clone())
        .await
        .context("connecting to CHAT_REDIS_URL")?;
    let limits = Limits { max_frame_bytes: a.max_frame_bytes, max_body_bytes: a.max_body_bytes, conn_queue: a.conn_queue.max(8), presence_ttl, ..Limits::default() };
    let chat = Arc::new(Chat::new(
        log.clone(),
        topics(&a.common),
        store,
        Arc::new(routing),
        hub,
        Tokens::new(&secret, chrono::Duration::seconds(a.token_ttl_secs)),
        node.clone(),
        limits,
        chat_gateway::metrics::Metrics::new()?,
    ));
    let listener = TcpListener::bind(&a.listen).await.with_context(|| format!("CHAT_LISTEN={}", a.listen))?;
    let addr = listener.local_addr()?;
    // The first line on stdout says where we listen (tests and scripts read it).
    println!("chat gateway node {node} listening on http://{addr}");
    chat_gateway::serve(chat, listener, shutdown_signal()).await?;
    log.flush(Duration::from_secs(5));
    Ok(())
}

async fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    for s in &a.stages {
        if s != "fanout" && s != "projections" {
            bail!("CHAT_STAGES: unknown stage {s:?} (use fanout, projections)");
        }
    }
    let log = open_log(&a.common).await?;
    let store = open_store(&a.common).await?;
    let t = topics(&a.common);
    let shutdown = shutdown_signal();
    let mut tasks = Vec::new();
    if a.stages.iter().any(|s| s == "fanout") {
        let consumer = log.subscribe(&a.fanout_group, &[t.name(TopicKind::Conversations)]).await?;
        let handler = Arc::new(FanOut::new(log.clone(), t.clone()));
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            chat_projections::run("fanout", consumer, handler, Arc::new(WorkerStats::default()), sd).await
        }));
    }
    if a.stages.iter().any(|s| s == "projections") {
        let consumer = log.subscribe(&a.projection_group, &projection_topics(&t)).await?;
        let handler = Arc::new(Projector::new(store.clone(), log.clone(), t.clone()));
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            chat_projections::run("projections", consumer, handler, Arc::new(WorkerStats::default()), sd).await
        }));
    }
    println!("chat worker running stages {:?}", a.stages);
    for t in tasks {
        t.await?;
    }
    log.flush(Duration::from_secs(5));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHAT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Gateway(a) => gateway(a).await,
        Command::Worker(a) => worker(a).await,
        Command::Migrate(c) => {
            open_log(&c).await?;
            open_store(&c).await?;
            println!("topics and tables are in place");
            Ok(())
        }
        Command::ResetGroup { common, group } => {
            let log = Arc::new(KafkaLog::new(KafkaConfig::new(&common.kafka_brokers))?);
            log.delete_group(&group).await?;
            println!("group {group} reset");
            Ok(())
        }
        Command::Checksums(c) => {
            let store = open_store(&c).await?;
            println!("{}", serde_json::to_string_pretty(&store.checksums().await?)?);
            Ok(())
        }
    }
}

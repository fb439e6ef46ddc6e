//! `chat`: the platform in one binary.
//!
//! - `chat` / `chat run`: gateway + fan-out + projections in one process. With nothing
//!   configured it runs embedded (event log and tables in SQLite files under `./chat-data`,
//!   routing in process); with Kafka, Cassandra and Redis configured it runs the same roles on them.
//! - `chat gateway`, `chat worker`: the cluster roles, any number of each.
//! - `chat migrate`: creates topics and tables; `chat reset-group`: forgets a consumer group's
//!   offsets (for a rebuild); `chat checksums`: row counts and hashes of the projection tables; `chat find-text`: the tables
//!   holding a text.
//!
//! Configuration: see [`config`] (defaults → `--config` TOML file → `CHAT_*` → flags).

mod admin;
mod config;

/// Connections waiting to be accepted, at most (the kernel caps it at `net.core.somaxconn`). The
/// default listener had 128: a burst of reconnects overflowed it, the kernel dropped SYNs and
/// those clients waited a whole second for their retransmit (`nstat` ListenOverflows).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` (host:port) with [`LISTEN_BACKLOG`].
async fn listen(addr: &str) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("{addr} resolves to no address")))
}

/// mimalloc instead of the C library's allocator: a connection's many small, long-lived
/// allocations pack tighter and freed memory goes back to the system (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_events::embedded::EmbeddedLog;
use chat_events::kafka::{KafkaConfig, KafkaLog};
use chat_events::{EventLog, TopicKind, TopicSpec, Topics};
use chat_gateway::frames::ServerFrame;
use chat_gateway::routing::Push;
use chat_gateway::{Chat, Hub, Limits, LocalRouting, RedisRouting, Routing, Tokens};
use chat_projections::projector::projection_topics;
use chat_projections::fanout::Pusher;
use chat_projections::{DeadLetters, FanOut, Projector, WorkerStats};
use chat_store::{FjallStore, ScyllaConfig, ScyllaStore, Tables};
use chat_search::SearchIndex;
use clap::{Parser, Subcommand};
use config::{Backend, Config, Settings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "chat", version, about = "Event-sourced messaging platform (embedded by default)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Gateway, fan-out and projections in one process (the default command).
    Run,
    /// A gateway node (cluster mode).
    Gateway,
    /// A projection worker: fan-out and/or projections (cluster mode).
    Worker,
    /// Create the topics and tables, then exit.
    Migrate,
    /// Delete a consumer group's offsets so that it starts from the beginning (stop its members first).
    ResetGroup {
        /// The group to reset.
        #[arg(long)]
        group: String,
    },
    /// Print row counts and SHA-256 of every projection table as JSON.
    Checksums,
    /// Print, as JSON, the projection tables holding rows whose text contains NEEDLE, with how
    /// many (to check that a deleted message's text is gone from every table).
    FindText {
        /// The text to look for (exact, case-sensitive).
        needle: String,
    },
    /// Grant or revoke a role (analyst, auditor): the user's sessions end within seconds and
    /// their next log-in has the change. Embedded: works beside a running `chat run`.
    Role {
        #[command(subcommand)]
        action: RoleAction,
    },
    /// Ban or unban a user: a ban ends their sessions on every node within seconds and refuses
    /// their log-ins until an unban; both are recorded as events. Embedded: works beside a
    /// running `chat run`.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Analytics as JSON (reads the tables; in embedded mode it may run beside `chat run`).
    Analytics {
        #[command(subcommand)]
        query: AnalyticsQuery,
    },
    /// Audit queries as JSON; each is recorded as an `audit.accessed` event first. Embedded:
    /// works beside a running `chat run`.
    Audit {
        #[command(subcommand)]
        query: AuditQuery,
    },
    /// Stream events as JSON lines to stdout (progress on stderr), from the log's beginning up to
    /// its end when the command starts, filtered. Reads without a consumer group; in embedded
    /// mode it reads the data directory read-only, so `chat run` may keep running.
    Replay(ReplayArgs),
    /// Project the whole log again, from offset zero, into fresh tables and compare their
    /// checksums with the live tables (exit status 1 if they differ). Embedded: runs inside a
    /// running `chat run` (through its admin socket) or on the stopped data directory. Cluster:
    /// compare on a quiet system (live tables move while the rebuild runs).
    Rebuild {
        /// Where to build: a directory (embedded) or a keyspace (cluster)
        /// [default: <data_dir>/rebuild-<time> or <keyspace>_rebuild_<time>].
        #[arg(long)]
        into: Option<String>,
        /// Embedded: then replace the live projection tables with the rebuilt ones, online (the
        /// worker stages stop for the swap, reads wait for it), and delete the rebuilt copy.
        /// Exit status 0 once swapped, whether or not the tables differed.
        #[arg(long)]
        swap: bool,
        /// Keep the rebuilt copy after the comparison (one at the default place is deleted; one
        /// named with --into is always kept).
        #[arg(long, conflicts_with = "swap")]
        keep: bool,
    },
}

/// What `chat rebuild` was asked (also the body of the admin socket's `POST /rebuild`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RebuildOpts {
    pub into: Option<String>,
    #[serde(default)]
    pub swap: bool,
    #[serde(default)]
    pub keep: bool,
}

type Opened = (Arc<dyn EventLog>, Option<Arc<KafkaLog>>, Arc<dyn Tables>);

#[derive(Subcommand)]
enum RoleAction {
    Grant {
        #[arg(long)]
        username: String,
        /// analyst or auditor
        #[arg(long)]
        role: String,
    },
    Revoke {
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: String,
    },
}

#[derive(Subcommand)]
enum UserAction {
    Ban {
        #[arg(long)]
        username: String,
    },
    Unban {
        #[arg(long)]
        username: String,
    },
}

/// Days are YYYY-MM-DD (default: the last 7 days).
#[derive(Subcommand, serde::Serialize, serde::Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
enum AnalyticsQuery {
    /// Messages per day by kind and scope (direct, group).
    Messages {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Distinct active users per day.
    ActiveUsers {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Views of one user's profile per day, with the viewers.
    ProfileViews {
        #[arg(long)]
        user: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Topics (hashtags and configured keywords) per day.
    Topics {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Subcommand, serde::Serialize, serde::Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
enum AuditQuery {
    /// The receipt timeline of one message.
    Receipts {
        #[arg(long)]
        message: String,
    },
    /// The receipts of one user as a recipient; times are RFC 3339 (default: the last 7 days).
    UserReceipts {
        #[arg(long)]
        user: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Daily message metrics by kind.
    Daily {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Only these event types (repeatable), e.g. `--type message.sent`.
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Only events before this time (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    /// Only events of this conversation.
    #[arg(long)]
    conversation: Option<String>,
    /// Only events by or naming this user.
    #[arg(long)]
    user: Option<String>,
    /// Topics to read: conversations, users, deliveries (comma-separated).
    #[arg(long, default_value = "conversations,users")]
    topics: String,
}

/// The opened back-ends.
struct Platform {
    cfg: Config,
    topics: Topics,
    log: Arc<dyn EventLog>,
    kafka: Option<Arc<KafkaLog>>,
    tables: Arc<dyn Tables>,
    /// This process's connections (none in a worker) and the routing that reaches everyone's;
    /// shared by the gateway and the fan-out's pushes.
    hub: Arc<Hub>,
    routing: Arc<dyn Routing>,
    /// What this process's worker stages count, for `/metrics` (read when it is rendered).
    worker_metrics: WorkerMetrics,
    /// Stops `chat run`'s worker stages for a while (see [`StageHold`]).
    stage_hold: StageHold,
}

/// Lets the admin socket stop the worker stages of `chat run` for a while: the swap of
/// `chat rebuild --swap` replaces the projection tables while nothing projects into them.
#[derive(Clone)]
pub struct StageHold {
    /// Held by whoever needs the stages stopped; a new generation of stages waits for it.
    hold: Arc<tokio::sync::Mutex<()>>,
    /// Bumped to end the running generation.
    pause: Arc<watch::Sender<u64>>,
    /// Whether a generation of stages is running.
    running: Arc<watch::Sender<bool>>,
}

impl Default for StageHold {
    fn default() -> Self {
        StageHold { hold: Arc::default(), pause: Arc::new(watch::channel(0).0), running: Arc::new(watch::channel(false).0) }
    }
}

impl StageHold {
    /// Stops the stages (they commit their stored offsets) and keeps them stopped until the
    /// guard is dropped.
    pub async fn stop(&self) -> tokio::sync::OwnedMutexGuard<()> {
        let guard = self.hold.clone().lock_owned().await;
        self.pause.send_modify(|n| *n += 1);
        let mut running = self.running.subscribe();
        let _stopped = running.wait_for(|running| !*running).await;
        guard
    }
}

/// The counters of this process's worker stages.
#[derive(Clone, Default)]
struct WorkerMetrics {
    stages: Arc<std::sync::Mutex<Vec<chat_projections::worker::Stage>>>,
    projector: Arc<std::sync::Mutex<Option<Arc<Projector>>>>,
    /// Each stage's consumer lag per partition, as last read (every [`LAG_EVERY`]).
    lags: Arc<std::sync::Mutex<Vec<(&'static str, chat_events::PartitionLag)>>>,
}

/// How often a process with worker stages reads their consumer groups' lag for `/metrics`.
const LAG_EVERY: Duration = Duration::from_secs(10);

impl WorkerMetrics {
    fn render(&self) -> String {
        use std::fmt::Write;
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = if stages.is_empty() { String::new() } else { WorkerStats::render(&stages) };
        if let Some(p) = self.projector.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            out.push_str(&p.render());
        }
        let lags = self.lags.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !lags.is_empty() {
            out.push_str("# HELP chat_worker_lag_records records appended and not yet committed by the stage's consumer group, per partition\n");
            out.push_str("# TYPE chat_worker_lag_records gauge\n");
            for (stage, l) in lags {
                let _ = writeln!(out, "chat_worker_lag_records{{stage=\"{stage}\",topic=\"{}\",partition=\"{}\"}} {}", l.topic, l.partition, l.lag());
            }
        }
        out
    }
}

/// Pushes the fan-out's group items through routing, as the gateway's frames.
struct RoutingPusher(Arc<dyn Routing>);

#[async_trait::async_trait]
impl Pusher for RoutingPusher {
    async fn push(&self, items: Vec<(chat_events::UserId, chat_events::StreamItem)>) {
        let pushes = items
            .into_iter()
            .map(|(user, item)| {
                let sent_at_ms = match &item {
                    chat_events::StreamItem::Message { sent_at, .. } => Some(sent_at.timestamp_millis()),
                    _ => None,
                };
                Push { user, text: Arc::from(ServerFrame::from_item(&item).to_text()), except: None, sent_at_ms }
            })
            .collect();
        if let Err(e) = self.0.push(pushes).await {
            // Sync still delivers; the push is only the fast path.
            warn!(error = %e, "group push failed");
        }
    }
}

impl Platform {
    async fn open(cfg: Config) -> anyhow::Result<Platform> {
        let topics = Topics::new(cfg.topic_prefix.clone());
        let (log, kafka, tables): Opened = match &cfg.backend {
            Backend::Embedded { data_dir } => {
                let log = EmbeddedLog::open(data_dir, 100_000).context("opening the embedded event log (CHAT_DATA_DIR)")?;
                let tables = open_embedded_tables(data_dir).context("opening the embedded tables (CHAT_DATA_DIR)")?;
                (Arc::new(log), None, Arc::new(tables))
            }
            Backend::Cluster { kafka_brokers, cassandra_nodes, .. } => {
                let kafka = Arc::new(KafkaLog::new(KafkaConfig::new(kafka_brokers)).context("CHAT_KAFKA_BROKERS")?);
                let scylla = ScyllaConfig { nodes: cassandra_nodes.clone(), keyspace: cfg.keyspace.clone(), replication_factor: cfg.cassandra_rf };
                let store: Arc<dyn Tables> = Arc::new(ScyllaStore::connect(&scylla).await.context("connecting to CHAT_CASSANDRA_NODES")?);
                (kafka.clone(), Some(kafka), store)
            }
        };
        let mut specs: Vec<TopicSpec> = topics
            .all()
            .into_iter()
            .map(|name| TopicSpec { name, partitions: cfg.partitions, replication: cfg.kafka_replication })
            .collect();
        specs.push(TopicSpec { name: topics.dead_letters(), partitions: 1, replication: cfg.kafka_replication });
        log.ensure_topics(&specs).await.context("creating topics (is Kafka up at CHAT_KAFKA_BROKERS?)")?;
        let hub = Arc::new(Hub::new());
        let routing = Self::routing(&cfg, hub.clone()).await?;
        Ok(Platform { cfg, topics, log, kafka, tables, hub, routing, worker_metrics: WorkerMetrics::default(), stage_hold: StageHold::default() })
    }

    fn token_secret(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(s) = &self.cfg.token_secret {
            return Ok(s.clone().into_bytes());
        }
        match self.cfg.data_dir() {
            // Embedded: one secret per data directory, so tokens survive restarts.
            Some(dir) => read_or_create_secret(&dir.join("token-secret")),
            None => {
                warn!("CHAT_TOKEN_SECRET not set: using a random secret; tokens will not survive a restart or work on other nodes");
                Ok(random_secret().into_bytes())
            }
        }
    }

    async fn routing(cfg: &Config, hub: Arc<Hub>) -> anyhow::Result<Arc<dyn Routing>> {
        Ok(match &cfg.backend {
            Backend::Embedded { .. } => Arc::new(LocalRouting::new(hub)),
            Backend::Cluster { redis_url, .. } => Arc::new(
                RedisRouting::connect(redis_url, &cfg.redis_prefix, &cfg.node_id, cfg.presence_ttl, hub)
                    .await
                    .context("connecting to CHAT_REDIS_URL")?,
            ),
        })
    }

    /// Starts the gateway; returns its address and task.
    async fn start_gateway(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<(std::net::SocketAddr, JoinHandle<std::io::Result<()>>)> {
        let (hub, routing) = (self.hub.clone(), self.routing.clone());
        let c = &self.cfg;
        let search = Arc::new(
            SearchIndex::open(&c.search_dir).with_context(|| format!("opening the search index (CHAT_SEARCH_DIR={})", c.search_dir.display()))?,
        );
        let limits = Limits {
            max_frame_bytes: c.max_frame_bytes,
            max_body_bytes: c.max_body_bytes,
            conn_queue: c.conn_queue,
            login_failures_per_account: c.account_limits.0,
            login_failures_per_address: c.account_limits.1,
            registrations_per_address: c.account_limits.2,
            analytics_min_users: c.analytics_min_users,
            max_connections_per_user: c.user_limits.0,
            sends_per_user_per_sec: c.user_limits.1,
            presence_ttl: c.presence_ttl,
            ws_idle: c.ws_idle,
            max_group_size: c.max_group_size,
            edit_window: c.edit_window,
            ws_echo: c.ws_echo,
            ..Limits::default()
        };
        let store: Arc<dyn chat_gateway::GatewayStore> = self.tables.clone();
        let metrics = chat_gateway::metrics::Metrics::new()?;
        hub.record_push_latency(metrics.push_latency.clone());
        let workers = self.worker_metrics.clone();
        metrics.add_extra(Arc::new(move || workers.render()));
        let chat = Arc::new(
            Chat::new(
            self.log.clone(),
            self.topics.clone(),
            store,
            routing,
            hub,
            Tokens::new(&self.token_secret()?, chrono::Duration::seconds(c.token_ttl_secs)),
            c.node_id.clone(),
            limits,
            metrics,
        )
            .with_media(self.media_storage()?)
            .with_search(search.clone()),
        );
        let listener = listen(&c.listen).await.with_context(|| format!("CHAT_LISTEN={}", c.listen))?;
        let addr = listener.local_addr()?;
        let indexer = self.start_search(search, shutdown.clone()).await?;
        let serving = tokio::spawn(chat_gateway::serve(chat, listener, shutdown));
        Ok((
            addr,
            tokio::spawn(async move {
                let served = serving.await.map_err(std::io::Error::other)?;
                // The indexer stops at the same signal, after committing what it indexed.
                if let Ok(outcome) = indexer.await {
                    stop_on_loss("search", outcome);
                }
                served
            }),
        ))
    }

    /// The search stage of a gateway node: keeps the node's search index from the deliveries
    /// topic (every node its own copy, in its own consumer group; see docs/architecture.md
    /// "Search").
    async fn start_search(&self, index: Arc<SearchIndex>, shutdown: watch::Receiver<bool>) -> anyhow::Result<JoinHandle<Result<(), String>>> {
        let t = &self.topics;
        let consumer = self.log.subscribe(&self.cfg.search_group, &[t.name(TopicKind::Deliveries)]).await?;
        let handler = Arc::new(chat_projections::search::Indexer::new(index));
        let dead = DeadLetters { log: self.log.clone(), topics: t.clone() };
        let stats = self.stage_stats("search");
        Ok(tokio::spawn(async move { chat_projections::run("search", consumer, handler, dead, stats, shutdown).await }))
    }

    /// Projection tables of an older layout are rebuilt from the log: dropped and created anew,
    /// and the projection group forgets its offsets so that it starts at offset zero. Embedded
    /// (`chat run`, the only process on its data directory) does it at start; in a cluster
    /// `chat migrate` does it, with every worker stopped, and a worker refuses to project onto
    /// tables of an older layout.
    async fn upgrade_projections(&self, allowed: bool) -> anyhow::Result<()> {
        let layout = self.tables.projection_layout().await?;
        if layout >= chat_store::PROJECTION_LAYOUT {
            return Ok(());
        }
        if !allowed {
            bail!(
                "the projection tables are in layout {layout}, this version writes layout {}: stop every worker and run `chat migrate` (it rebuilds them from the log)",
                chat_store::PROJECTION_LAYOUT
            );
        }
        warn!(from = layout, to = chat_store::PROJECTION_LAYOUT, "projection tables of an older layout: rebuilding them from the log");
        self.log.delete_group(&self.cfg.projection_group).await.context("resetting the projection group")?;
        self.tables.reset_projections().await.context("recreating the projection tables")?;
        Ok(())
    }

    /// Starts the configured worker stages.
    /// Starts the worker stages; a stage that fails for good stops the process (`chat worker`:
    /// its supervisor starts it again, and it resumes from its stored offsets).
    async fn start_workers(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let stages = self.start_stages(shutdown).await?;
        Ok(stages.into_iter().map(|(stage, task)| tokio::spawn(async move { stop_on_loss(stage, task.await.unwrap_or_else(|e| Err(e.to_string()))) })).collect())
    }

    /// Runs the worker stages of `chat run` until `shutdown`. A stage that fails because the
    /// tables lost writes they had answered (a commit failed: the disk filled up) stops every
    /// stage; then, after a pause, the tables take writes again and the stages start over from
    /// their stored offsets, in this process, as a restart would do. A still failing disk fails
    /// them again, with a longer pause (up to 30 s). Any other failure for good stops the process.
    async fn supervise_workers(&self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut pause = Duration::from_secs(1);
        let hold = &self.stage_hold;
        let mut paused = hold.pause.subscribe();
        loop {
            // Held (`chat rebuild --swap`): the next generation waits.
            tokio::select! {
                free = hold.hold.lock() => drop(free),
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
            let pauses = *paused.borrow_and_update();
            let (generation, stages_stop) = watch::channel(false);
            let generation = Arc::new(generation);
            let forward = {
                let (g, mut stop, mut paused) = (generation.clone(), shutdown.clone(), paused.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.wait_for(|stop| *stop) => {}
                        _ = paused.changed() => {}
                    }
                    let _ = g.send(true);
                })
            };
            let mut set = tokio::task::JoinSet::new();
            for (stage, task) in self.start_stages(stages_stop).await? {
                set.spawn(async move { (stage, task.await.unwrap_or_else(|e| Err(e.to_string()))) });
            }
            hold.running.send_replace(true);
            // The first stage to end ends the generation.
            let mut failures: Vec<(&str, String)> = Vec::new();
            if let Some(Ok((stage, Err(reason)))) = set.join_next().await {
                failures.push((stage, reason));
            }
            let _ = generation.send(true);
            while let Some(done) = set.join_next().await {
                if let Ok((stage, Err(reason))) = done {
                    failures.push((stage, reason));
                }
            }
            forward.abort();
            hold.running.send_replace(false);
            if *shutdown.borrow() {
                return Ok(());
            }
            if failures.is_empty() && *paused.borrow() != pauses {
                info!("worker stages stopped on request; they start again from their stored offsets when released");
                continue;
            }
            if !self.tables.lost() {
                for (stage, reason) in failures {
                    stop_on_loss(stage, Err(reason));
                }
                bail!("the worker stages stopped");
            }
            warn!(failures = ?failures, pause_s = pause.as_secs(), "the tables lost answered writes (disk full?): the worker stages start again from their stored offsets after a pause");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
            self.tables.recover();
        }
    }

    /// Starts the worker stages this process runs; each task ends with its stage's outcome.
    async fn start_stages(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<Vec<(&'static str, JoinHandle<Result<(), String>>)>> {
        let mut tasks = Vec::new();
        let t = &self.topics;
        let dead = DeadLetters { log: self.log.clone(), topics: t.clone() };
        if self.cfg.stages.iter().any(|s| s == "fanout") {
            let consumer = self.log.subscribe(&self.cfg.fanout_group, &[t.name(TopicKind::Conversations)]).await?;
            let store: Arc<dyn chat_store::FanoutStore> = self.tables.clone();
            let pusher: Arc<dyn Pusher> = Arc::new(RoutingPusher(self.routing.clone()));
            let handler = Arc::new(
                FanOut::new(self.log.clone(), t.clone(), store, Some(pusher), self.cfg.max_group_size)
                    .with_edit_window(self.cfg.edit_window)
                    .with_committer(consumer.committer()),
            );
            let stats = self.stage_stats("fanout");
            let (sd, dead) = (shutdown.clone(), dead.clone());
            tasks.push(("fanout", tokio::spawn(async move { chat_projections::run("fanout", consumer, handler, dead, stats, sd).await })));
        }
        if self.cfg.stages.iter().any(|s| s == "projections") {
            let consumer = self.log.subscribe(&self.cfg.projection_group, &projection_topics(t)).await?;
            let handler = Arc::new(Projector::new(self.tables.clone(), t.clone(), self.cfg.analytics_keywords.clone()));
            *self.worker_metrics.projector.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler.clone());
            let stats = self.stage_stats("projections");
            let sd = shutdown.clone();
            tasks.push(("projections", tokio::spawn(async move { chat_projections::run("projections", consumer, handler, dead, stats, sd).await })));
        }
        Ok(tasks)
    }

    /// The consumer group and topics of each stage this process runs.
    fn stage_groups(&self) -> Vec<(&'static str, String, Vec<String>)> {
        let t = &self.topics;
        let mut groups = Vec::new();
        if self.cfg.stages.iter().any(|s| s == "fanout") {
            groups.push(("fanout", self.cfg.fanout_group.clone(), vec![t.name(TopicKind::Conversations)]));
        }
        if self.cfg.stages.iter().any(|s| s == "projections") {
            groups.push(("projections", self.cfg.projection_group.clone(), projection_topics(t)));
        }
        groups
    }

    /// Reads the stages' consumer lag per partition every [`LAG_EVERY`], for `/metrics`. A
    /// failed read keeps the last values (the log may be briefly unreachable).
    fn watch_lags(&self) -> JoinHandle<()> {
        let (log, lags, groups) = (self.log.clone(), self.worker_metrics.lags.clone(), self.stage_groups());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LAG_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let mut read = Vec::new();
                for (stage, group, topics) in &groups {
                    match log.partition_lags(group, topics).await {
                        Ok(l) => read.extend(l.into_iter().map(|l| (*stage, l))),
                        Err(e) => {
                            tracing::debug!(stage, error = %e, "consumer lag not read");
                            read.clear();
                            break;
                        }
                    }
                }
                if !read.is_empty() {
                    read.sort_by(|a, b| (a.0, &a.1.topic, a.1.partition).cmp(&(b.0, &b.1.topic, b.1.partition)));
                    *lags.lock().unwrap_or_else(|p| p.into_inner()) = read;
                }
            }
        })
    }

    /// `/metrics` (the process and the worker stages) and `/healthz` of a `chat worker` on
    /// `CHAT_METRICS_LISTEN`.
    async fn serve_worker_metrics(&self, listen: &str) -> anyhow::Result<(std::net::SocketAddr, JoinHandle<()>)> {
        use axum::routing::get;
        let process = chat_gateway::metrics::process_registry()?;
        let workers = self.worker_metrics.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let mut text = chat_gateway::metrics::render(&process);
                    text.push_str(&workers.render());
                    std::future::ready(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
                }),
            )
            .route("/healthz", get(|| std::future::ready("ok")));
        let listener = TcpListener::bind(listen).await.with_context(|| format!("CHAT_METRICS_LISTEN {listen}"))?;
        let addr = listener.local_addr()?;
        Ok((
            addr,
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(error = %e, "metrics listener stopped");
                }
            }),
        ))
    }

    /// A stage's counters, registered for `/metrics`.
    fn stage_stats(&self, stage: &str) -> Arc<WorkerStats> {
        let mut stages = self.worker_metrics.stages.lock().unwrap_or_else(|p| p.into_inner());
        // A stage started again (see `supervise_workers`) goes on counting where it was.
        if let Some((_, stats)) = stages.iter().find(|(name, _)| name == stage) {
            return stats.clone();
        }
        let stats = Arc::new(WorkerStats::default());
        stages.push((stage.to_owned(), stats.clone()));
        stats
    }

    /// The media store of a gateway: S3, a directory, or (cluster without either) an error.
    fn media_storage(&self) -> anyhow::Result<chat_gateway::media::MediaStorage> {
        use config::MediaBackend;
        use object_store::aws::AmazonS3Builder;
        use object_store::local::LocalFileSystem;
        let store: Arc<dyn object_store::ObjectStore> = match &self.cfg.media {
            MediaBackend::S3 { endpoint, bucket, access_key, secret_key, region } => Arc::new(
                AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_bucket_name(bucket)
                    .with_access_key_id(access_key)
                    .with_secret_access_key(secret_key)
                    .with_region(region)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false)
                    .build()
                    .context("CHAT_S3_* settings")?,
            ),
            MediaBackend::Dir(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("media directory {}", dir.display()))?;
                Arc::new(LocalFileSystem::new_with_prefix(dir).with_context(|| format!("media directory {}", dir.display()))?)
            }
            MediaBackend::None => bail!(
                "a gateway in cluster mode needs a media store: set CHAT_S3_ENDPOINT, CHAT_S3_BUCKET, CHAT_S3_ACCESS_KEY and CHAT_S3_SECRET_KEY (or CHAT_MEDIA_DIR on a filesystem every node shares)"
            ),
        };
        let (image, audio, video) = self.cfg.media_limits;
        Ok(chat_gateway::media::MediaStorage { store, limits: chat_gateway::media::MediaLimits { image, audio, video } })
    }

    /// Waits (up to `limit`) until this process's worker stages have consumed the whole log.
    async fn drain_workers(&self, limit: Duration) {
        let t = &self.topics;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let fanout = self.log.group_lag(&self.cfg.fanout_group, &[t.name(TopicKind::Conversations)]).await;
            let projections = self.log.group_lag(&self.cfg.projection_group, &projection_topics(t)).await;
            match (fanout, projections) {
                (Ok(0), Ok(0)) => return,
                _ if tokio::time::Instant::now() >= deadline => {
                    warn!("stopping before the workers caught up; they resume from their stored offsets");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// What the operator's commands work on.
    fn ops(&self) -> admin::Ops {
        admin::Ops { tables: self.tables.clone(), log: self.log.clone(), topics: self.topics.clone(), stages: self.stage_hold.clone() }
    }

    fn flush(&self) {
        if let Some(k) = &self.kafka {
            k.flush(Duration::from_secs(5));
        }
    }

    /// Before the process exits: the embedded log writes its checkpoint (so the next start reads
    /// no frame again), Kafka's producer sends what it holds.
    async fn close(&self) {
        if let Err(e) = self.log.close().await {
            warn!(error = %e, "closing the event log failed (the next start reads more of it)");
        }
        self.flush();
    }
}

/// A worker stage that failed for good (writes it was told about are gone) stops the process:
/// nothing written from now on could be trusted to build on what was lost, and a restart resumes
/// every stage from its stored offsets, as after a crash (PostgreSQL's answer to a failed fsync).
fn stop_on_loss(stage: &str, outcome: Result<(), String>) {
    if let Err(reason) = outcome {
        tracing::error!(stage, reason, "a worker stage failed for good; exiting so that a restart resumes from the stored offsets");
        std::process::exit(70);
    }
}

fn random_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn read_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(s) = std::fs::read_to_string(path) {
        if s.trim().len() >= 32 {
            return Ok(s.trim().as_bytes().to_vec());
        }
    }
    let secret = random_secret();
    std::fs::write(path, &secret).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret.into_bytes())
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
                }
                Err(e) => {
                    warn!(error = %e, "no SIGTERM handler");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

fn cluster_only(cfg: &Config, role: &str) -> anyhow::Result<()> {
    if let Backend::Embedded { .. } = cfg.backend {
        bail!(
            "`chat {role}` is a cluster role: set CHAT_KAFKA_BROKERS, CHAT_CASSANDRA_NODES and CHAT_REDIS_URL, or run everything in one process with `chat run`"
        );
    }
    Ok(())
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let p = Platform::open(cfg).await?;
    if p.cfg.stages.iter().any(|s| s == "projections") {
        p.upgrade_projections(p.cfg.data_dir().is_some()).await?;
    }
    let signal = shutdown_signal();
    // Workers stop after the gateway: what the gateway appends while closing (presence going
    // offline) is projected before the process exits, and offsets are stored last.
    let (stop_workers, workers_stopped) = watch::channel(false);
    let workers = p.supervise_workers(workers_stopped);
    let _lags = p.watch_lags();
    let admin = match p.cfg.data_dir() {
        // Without it the server still runs; `chat role` and `chat audit` then need it stopped.
        Some(dir) => admin::serve(dir, p.ops(), p.cfg.clone(), signal.clone())
            .await
            .inspect_err(|e| warn!(error = format!("{e:#}"), "no admin socket: `chat role` and `chat audit` need the server stopped"))
            .ok(),
        None => None,
    };
    let (addr, gateway) = p.start_gateway(signal).await?;
    match p.cfg.data_dir() {
        Some(dir) => {
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            println!("chat listening on http://{addr} (embedded, data in {})", dir.display());
        }
        None => println!("chat listening on http://{addr} (cluster, node {})", p.cfg.node_id),
    }
    let serving = async {
        let served = gateway.await;
        if let Some(admin) = admin {
            let _stopped = admin.await;
        }
        p.drain_workers(Duration::from_secs(10)).await;
        let _ = stop_workers.send(true);
        served
    };
    let (served, supervised) = tokio::join!(serving, workers);
    served??;
    supervised?;
    p.close().await;
    Ok(())
}

/// The embedded tables of a data directory: fjall (`tables/`) with the command side in SQLite
/// (`commands.db`); a directory of an earlier release has its `tables.db` converted first.
fn open_embedded_tables(dir: &std::path::Path) -> anyhow::Result<FjallStore> {
    if let Some(c) = chat_store::fjall_store::convert::from_sqlite(dir).context("moving the tables from tables.db to tables/")? {
        info!(rows = ?c.rows, "tables.db converted; the projections are rebuilt from the log");
    }
    Ok(FjallStore::open(dir)?)
}

/// Only the tables (no log), for the read-only commands. Embedded, the tables belong to one
/// process at a time: beside a running server these commands ask it instead (admin socket).
async fn open_tables(cfg: &Config) -> anyhow::Result<Arc<dyn Tables>> {
    Ok(match &cfg.backend {
        Backend::Embedded { data_dir } => Arc::new(open_embedded_tables(data_dir)?),
        Backend::Cluster { cassandra_nodes, .. } => {
            let scylla = ScyllaConfig { nodes: cassandra_nodes.clone(), keyspace: cfg.keyspace.clone(), replication_factor: cfg.cassandra_rf };
            Arc::new(ScyllaStore::connect(&scylla).await.context("connecting to CHAT_CASSANDRA_NODES")?)
        }
    })
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    print_out(&serde_json::to_string_pretty(v)?)
}

/// Writes a line to stdout. A reader that went away (`chat ... | head`) cuts the output short;
/// that is not an error (`println!` panicked on it).
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Whether an error is stdout's reader going away.
fn is_broken_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

fn cli_error(e: chat_gateway::error::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code, e.message)
}

async fn role(cfg: Config, action: RoleAction) -> anyhow::Result<()> {
    let change = match action {
        RoleAction::Grant { username, role } => admin::RoleChange { username, role, granted: true },
        RoleAction::Revoke { username, role } => admin::RoleChange { username, role, granted: false },
    };
    if change.role != "analyst" && change.role != "auditor" {
        bail!("--role must be analyst or auditor, got {:?}", change.role);
    }
    // Embedded, beside a running server: the server does it.
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/role", &change).await? {
            return print_out(answer["message"].as_str().unwrap_or_default());
        }
    }
    let p = Platform::open(cfg).await?;
    let message = change_role(&p.ops(), &change).await?;
    p.close().await;
    print_out(&message)
}

/// `chat role`, in the command's process or in the running server's (admin socket).
async fn change_role(ops: &admin::Ops, c: &admin::RoleChange) -> anyhow::Result<String> {
    if c.role != "analyst" && c.role != "auditor" {
        bail!("the role must be analyst or auditor, got {:?}", c.role);
    }
    let account = ops.tables.account_by_name(&c.username.to_ascii_lowercase()).await?.with_context(|| format!("no user {:?}", c.username))?;
    ops.tables.set_role(account.user_id, &c.role, c.granted).await?;
    // The user's tokens carry the roles they were issued with: ending them makes the change take
    // effect on every node within seconds (they log in again and get the new roles).
    ops.tables.revoke_sessions(account.user_id, chat_events::now_millis()).await?;
    let env = chat_events::Envelope::new(
        chat_events::EventId::new_v7(),
        None,
        chat_events::Event::UserRoleChanged(chat_events::UserRoleChanged { user_id: account.user_id, role: c.role.clone(), granted: c.granted }),
    );
    chat_events::append_event(ops.log.as_ref(), &ops.topics, &env).await?;
    Ok(format!(
        "{} {} for {} ({}); their sessions end within seconds and the change applies when they log in again",
        if c.granted { "granted" } else { "revoked" },
        c.role,
        c.username,
        account.user_id
    ))
}

async fn user(cfg: Config, action: UserAction) -> anyhow::Result<()> {
    let change = match action {
        UserAction::Ban { username } => admin::BanChange { username, banned: true },
        UserAction::Unban { username } => admin::BanChange { username, banned: false },
    };
    // Embedded, beside a running server: the server does it.
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/ban", &change).await? {
            return print_out(answer["message"].as_str().unwrap_or_default());
        }
    }
    let p = Platform::open(cfg).await?;
    let message = change_ban(&p.ops(), &change).await?;
    p.close().await;
    print_out(&message)
}

/// `chat user ban|unban`, in the command's process or in the running server's (admin socket):
/// the command-side mark read at log-in, then (a ban) the end of every session of the user,
/// then the event.
async fn change_ban(ops: &admin::Ops, c: &admin::BanChange) -> anyhow::Result<String> {
    let account = ops.tables.account_by_name(&c.username.to_ascii_lowercase()).await?.with_context(|| format!("no user {:?}", c.username))?;
    ops.tables.set_role(account.user_id, chat_gateway::service::BANNED, c.banned).await?;
    if c.banned {
        ops.tables.revoke_sessions(account.user_id, chat_events::now_millis()).await?;
    }
    let ban = chat_events::UserBanned { user_id: account.user_id };
    let event = if c.banned { chat_events::Event::UserBanned(ban) } else { chat_events::Event::UserUnbanned(ban) };
    let env = chat_events::Envelope::new(chat_events::EventId::new_v7(), None, event);
    chat_events::append_event(ops.log.as_ref(), &ops.topics, &env).await?;
    Ok(if c.banned {
        format!("banned {} ({}); their sessions end within seconds and their log-ins are refused", c.username, account.user_id)
    } else {
        format!("unbanned {} ({}); they may log in again", c.username, account.user_id)
    })
}

async fn analytics(cfg: Config, q: AnalyticsQuery) -> anyhow::Result<()> {
    // Embedded, beside a running server: the server answers (it holds the tables).
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/analytics", &q).await? {
            return print_json(&answer);
        }
    }
    print_json(&analytics_answer(&*open_tables(&cfg).await?, q).await?)
}

/// `chat analytics`, in the command's process or in the running server's (admin socket).
async fn analytics_answer(t: &dyn Tables, q: AnalyticsQuery) -> anyhow::Result<serde_json::Value> {
    use chat_gateway::insights::day_range;
    Ok(match q {
        AnalyticsQuery::Messages { from, to } => {
            let (from, to) = day_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            serde_json::to_value(t.message_counts(from, to).await?)?
        }
        AnalyticsQuery::ActiveUsers { from, to } => {
            let (from, to) = day_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            let rows: Vec<serde_json::Value> =
                t.active_users(from, to).await?.into_iter().map(|(day, users)| serde_json::json!({"day": day, "users": users})).collect();
            serde_json::Value::Array(rows)
        }
        AnalyticsQuery::ProfileViews { user, from, to } => {
            let (from, to) = day_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            let user: chat_events::UserId = user.parse().map_err(|_| anyhow::anyhow!("--user is not a user id"))?;
            serde_json::to_value(t.profile_views(user, from, to).await?)?
        }
        AnalyticsQuery::Topics { from, to } => {
            let (from, to) = day_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            serde_json::to_value(t.topic_counts(from, to).await?)?
        }
    })
}

/// `chat checksums`: embedded beside a running server, the server answers (it holds the tables).
async fn checksums(cfg: Config) -> anyhow::Result<()> {
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/checksums", &serde_json::json!({})).await? {
            return print_json(&answer);
        }
    }
    print_json(&open_tables(&cfg).await?.checksums().await?)
}

/// `chat find-text`: like `chat checksums`, the running server answers when there is one.
async fn find_text(cfg: Config, needle: String) -> anyhow::Result<()> {
    let q = serde_json::json!({ "needle": needle });
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/find-text", &q).await? {
            return print_json(&answer);
        }
    }
    print_json(&open_tables(&cfg).await?.tables_containing(&needle).await?)
}

async fn audit(cfg: Config, q: AuditQuery) -> anyhow::Result<()> {
    // Embedded, beside a running server: the server records and answers it.
    if let Some(dir) = cfg.data_dir() {
        if let Some(answer) = admin::call::<serde_json::Value>(dir, "/audit", &q).await? {
            return print_json(&answer);
        }
    }
    let p = Platform::open(cfg).await?;
    let answer = audit_answer(&p.ops(), q).await;
    p.close().await;
    print_json(&answer?)
}

/// `chat audit`, in the command's process or in the running server's (admin socket): the
/// `audit.accessed` record first, then the answer as JSON.
async fn audit_answer(ops: &admin::Ops, q: AuditQuery) -> anyhow::Result<serde_json::Value> {
    use chat_gateway::insights::{day_range, time_range};
    // The input is checked first: like the HTTP endpoints, a refused query reads nothing and is
    // not recorded.
    enum Checked {
        Receipts(chat_events::MessageId),
        UserReceipts(chat_events::UserId, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
        Daily(chrono::NaiveDate, chrono::NaiveDate),
    }
    let (action, target, from, to) = match &q {
        AuditQuery::Receipts { message } => ("message_receipts", Some(message.clone()), None, None),
        AuditQuery::UserReceipts { user, from, to } => ("user_receipts", Some(user.clone()), from.clone(), to.clone()),
        AuditQuery::Daily { from, to } => ("daily_metrics", None, from.clone(), to.clone()),
    };
    let checked = match &q {
        AuditQuery::Receipts { message } => Checked::Receipts(message.parse().map_err(|_| anyhow::anyhow!("--message is not a message id"))?),
        AuditQuery::UserReceipts { user, .. } => {
            let (from, to) = time_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            Checked::UserReceipts(user.parse().map_err(|_| anyhow::anyhow!("--user is not a user id"))?, from, to)
        }
        AuditQuery::Daily { .. } => {
            let (from, to) = day_range(from.as_deref(), to.as_deref()).map_err(cli_error)?;
            Checked::Daily(from, to)
        }
    };
    // The record next: no audit read without it.
    let record = chat_events::AuditAccessed { auditor: None, via: "cli".into(), action: action.into(), target, from, to };
    let env = chat_events::Envelope::new(chat_events::EventId::new_v7(), None, chat_events::Event::AuditAccessed(record));
    chat_events::append_event(ops.log.as_ref(), &ops.topics, &env).await?;
    Ok(match checked {
        Checked::Receipts(id) => {
            let meta = ops.tables.find_message(id).await?.with_context(|| format!("no message {id}"))?;
            // The same timeline as `GET /v1/audit/messages/{id}/receipts`.
            serde_json::to_value(chat_gateway::insights::AuditTimeline::of(ops.tables.as_ref(), &meta).await?)?
        }
        Checked::UserReceipts(user, from, to) => serde_json::to_value(ops.tables.receipts_of_user(user, from, to).await?)?,
        Checked::Daily(from, to) => serde_json::to_value(ops.tables.message_counts(from, to).await?)?,
    })
}

fn parse_time(flag: &str, v: &Option<String>) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    v.as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&chrono::Utc))
                .with_context(|| format!("--{flag} must be an RFC 3339 time, got {t:?}"))
        })
        .transpose()
}

async fn replay(cfg: Config, a: ReplayArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let (from, to) = (parse_time("from", &a.from)?, parse_time("to", &a.to)?);
    let conversation: Option<chat_events::ConversationId> =
        a.conversation.as_deref().map(|c| c.parse()).transpose().map_err(|_| anyhow::anyhow!("--conversation is not a conversation id"))?;
    let user: Option<chat_events::UserId> = a.user.as_deref().map(|u| u.parse()).transpose().map_err(|_| anyhow::anyhow!("--user is not a user id"))?;
    for t in &a.types {
        if !chat_events::event::EVENT_TYPES.iter().any(|(name, _)| name == t) {
            let known: Vec<&str> = chat_events::event::EVENT_TYPES.iter().map(|(name, _)| *name).collect();
            bail!("--type {t:?} is not an event type; the types are: {}", known.join(", "));
        }
    }
    let names = Topics::new(cfg.topic_prefix.clone());
    let mut topics = Vec::new();
    for t in a.topics.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let kind = match t {
            "conversations" => TopicKind::Conversations,
            "users" => TopicKind::Users,
            "deliveries" => TopicKind::Deliveries,
            other => bail!("--topics: unknown topic {other:?} (conversations, users, deliveries)"),
        };
        topics.push(names.name(kind));
    }
    let mut reader = match &cfg.backend {
        Backend::Embedded { data_dir } => chat_events::embedded::inspect::reader(data_dir, &topics)?,
        Backend::Cluster { kafka_brokers, .. } => KafkaLog::new(KafkaConfig::new(kafka_brokers))?.read_all(&topics).await?,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut written, mut undecodable) = (0u64, 0u64);
    let mut last_report = std::time::Instant::now();
    loop {
        let batch = reader.next_batch(1000).await?;
        if batch.is_empty() {
            break;
        }
        for rec in batch {
            let env = match chat_events::Envelope::decode(&rec.payload) {
                Ok(env) => env,
                Err(_) => {
                    undecodable += 1;
                    continue;
                }
            };
            let keep = (a.types.is_empty() || a.types.iter().any(|t| t == env.event.type_name()))
                && from.is_none_or(|f| env.occurred_at >= f)
                && to.is_none_or(|t| env.occurred_at < t)
                && conversation.as_ref().is_none_or(|c| env.event.conversation_id() == Some(c))
                && user.is_none_or(|u| env.actor == Some(u) || env.event.users().contains(&u));
            if keep {
                // The record as stored: plain JSON, one event per line. A reader that went away
                // (`| head`) ends the replay, successfully.
                match out.write_all(&rec.payload).and_then(|()| out.write_all(b"\n")) {
                    Err(e) if is_broken_pipe(&e) => return Ok(()),
                    r => r?,
                }
                written += 1;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let (read, total) = reader.progress();
            eprintln!("replay: {read}/{total} read, {written} written");
            last_report = std::time::Instant::now();
        }
    }
    match out.flush() {
        Err(e) if is_broken_pipe(&e) => return Ok(()),
        r => r?,
    }
    let (read, total) = reader.progress();
    eprintln!("replay: done, {read}/{total} read, {written} written, {undecodable} undecodable skipped");
    Ok(())
}

async fn rebuild(cfg: Config, opts: RebuildOpts) -> anyhow::Result<bool> {
    if opts.swap && cfg.data_dir().is_none() {
        bail!("--swap needs the embedded mode; in a cluster, compare with `chat rebuild` and rebuild the projections with `chat migrate` on stopped workers");
    }
    // Embedded, beside a running server: the server rebuilds (it holds the log).
    let report: serde_json::Value = match cfg.data_dir().map(|dir| dir.to_path_buf()) {
        Some(dir) => match admin::call::<serde_json::Value>(&dir, "/rebuild", &opts).await? {
            Some(report) => report,
            None => rebuild_locally(cfg, opts).await?,
        },
        None => rebuild_locally(cfg, opts).await?,
    };
    print_json(&report)?;
    Ok(report["equal"] == serde_json::json!(true) || report["swapped"] == serde_json::json!(true))
}

async fn rebuild_locally(cfg: Config, opts: RebuildOpts) -> anyhow::Result<serde_json::Value> {
    let live = Platform::open(cfg.clone()).await?;
    let report = rebuild_into(&live.ops(), &cfg, opts).await;
    live.flush();
    report
}

/// Projects the whole log again, from offset zero, into fresh tables (a new directory or
/// keyspace), then compares every table's checksum with the live tables' once both have
/// projected the log to its end (waiting for a quiet moment when the live system is busy).
///
/// With `swap` (embedded), the live worker stages are then stopped, the rebuild catches up with
/// the log's end once more, and the live projection tables take the rebuilt rows in one
/// transaction (reads wait meanwhile); the stages start again from their own stored offsets,
/// which are at or before the rebuild's, so they project again what the rebuilt tables already
/// hold (idempotent) and nothing in between is missed.
///
/// Without `swap`, the rebuilt copy is deleted after the comparison when it is at the default
/// place (a directory or keyspace made for this run), unless `keep`; one named with `into` stays.
async fn rebuild_into(live: &admin::Ops, cfg: &Config, opts: RebuildOpts) -> anyhow::Result<serde_json::Value> {
    let RebuildOpts { into, swap, keep } = opts;
    let named = into.is_some();
    if swap && !matches!(cfg.backend, Backend::Embedded { .. }) {
        bail!("--swap needs the embedded mode");
    }
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let (fresh, place, scylla): (Arc<dyn Tables>, String, Option<Arc<ScyllaStore>>) = match &cfg.backend {
        Backend::Embedded { data_dir } => {
            let dir = into.map(std::path::PathBuf::from).unwrap_or_else(|| data_dir.join(format!("rebuild-{stamp}")));
            (Arc::new(FjallStore::open(&dir)?), dir.display().to_string(), None)
        }
        Backend::Cluster { cassandra_nodes, .. } => {
            let keyspace = into.unwrap_or_else(|| format!("{}_rebuild_{stamp}", cfg.keyspace));
            let config = ScyllaConfig { nodes: cassandra_nodes.clone(), keyspace: keyspace.clone(), replication_factor: cfg.cassandra_rf };
            let store = Arc::new(ScyllaStore::connect(&config).await.context("creating the rebuild keyspace")?);
            (store.clone(), keyspace, Some(store))
        }
    };
    let group = format!("{}-rebuild-{stamp}", cfg.projection_group);
    let topics = projection_topics(&live.topics);
    let consumer = live.log.subscribe(&group, &topics).await?;
    let handler = Arc::new(Projector::new(fresh.clone(), live.topics.clone(), cfg.analytics_keywords.clone()));
    let stats = Arc::new(WorkerStats::default());
    let (stop, stopped) = watch::channel(false);
    let dead = DeadLetters { log: live.log.clone(), topics: live.topics.clone() };
    let counted = stats.clone();
    // A failure ends the rebuild, not the process (it may run inside `chat run`).
    let mut task = tokio::spawn(async move { chat_projections::run("rebuild", consumer, handler, dead, counted, stopped).await });
    info!(into = %place, group = %group, "rebuilding the projections");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            r = &mut task => bail!("the rebuild stopped before the end of the log: {}", match r {
                Ok(Ok(())) => "stopped".to_owned(),
                Ok(Err(reason)) => reason,
                Err(e) => e.to_string(),
            }),
        }
        let lag = live.log.group_lag(&group, &topics).await?;
        info!(projected = stats.records.load(std::sync::atomic::Ordering::Relaxed), to_go = lag, "rebuild");
        // At the log's end, or (under constant traffic, where committed offsets always trail
        // the end a little) at least as far as the live projections.
        if lag == 0 || lag <= live.log.group_lag(&cfg.projection_group, &topics).await? {
            break;
        }
    }
    // Compare at one position of the log: both groups at its end before and after the checksums
    // (a busy system is retried until such a moment, for up to a minute).
    let quiet = || async {
        Ok::<bool, anyhow::Error>(
            live.log.group_lag(&group, &topics).await? == 0 && live.log.group_lag(&cfg.projection_group, &topics).await? == 0,
        )
    };
    // (A swap does not wait long for a quiet moment: the comparison is only reported then.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(if swap { 5 } else { 60 });
    let (a, b) = loop {
        if quiet().await? {
            let sums = (live.tables.checksums().await?, fresh.checksums().await?);
            if quiet().await? || tokio::time::Instant::now() > deadline {
                break sums;
            }
        }
        if tokio::time::Instant::now() > deadline {
            break (live.tables.checksums().await?, fresh.checksums().await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let held = if swap {
        let held = live.stages.stop().await;
        info!("live worker stages stopped for the swap; the rebuild catches up with the log's end");
        loop {
            // The live stages are stopped: their committed offsets no longer move, and the
            // rebuild only has to reach them on every partition (it need not reach the log's
            // end, which traffic keeps moving).
            if caught_up(&*live.log, &group, &cfg.projection_group, &topics).await? {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                r = &mut task => bail!("the rebuild stopped before the swap: {}", match r {
                    Ok(Ok(())) => "stopped".to_owned(),
                    Ok(Err(reason)) => reason,
                    Err(e) => e.to_string(),
                }),
            }
        }
        Some(held)
    } else {
        None
    };
    let _ = stop.send(true);
    if let Err(reason) = task.await? {
        bail!("the rebuild failed: {reason}");
    }
    info!(projected = stats.records.load(std::sync::atomic::Ordering::Relaxed), "rebuild: every record up to the log's end projected");
    let mut report = serde_json::Map::new();
    for (table, live_sum) in &a {
        report.insert(table.clone(), serde_json::json!({"live": live_sum, "rebuilt": b.get(table), "equal": b.get(table) == Some(live_sum)}));
    }
    let mut out = serde_json::json!({"rebuilt_into": place, "equal": a == b, "tables": report});
    if let Some(held) = held {
        // The rebuilt tables are opened again by the live store (one instance per directory).
        drop(fresh);
        live.tables.replace_projections(&place).await.context("replacing the live projection tables")?;
        drop(held);
        let _ = live.log.delete_group(&group).await;
        let removed = std::fs::remove_dir_all(&place).is_ok();
        info!(from = %place, removed, "live projection tables replaced by the rebuilt ones; worker stages started again");
        out["swapped"] = serde_json::json!(true);
        out["rebuilt_copy_removed"] = serde_json::json!(removed);
    } else if !keep && !named {
        let _ = live.log.delete_group(&group).await;
        let removed = match scylla {
            Some(store) => store.drop_own_keyspace().await.map_err(|e| warn!(keyspace = %place, error = %e, "could not drop the rebuilt keyspace")).is_ok(),
            None => {
                drop(fresh);
                std::fs::remove_dir_all(&place).map_err(|e| warn!(dir = %place, error = %e, "could not delete the rebuilt copy")).is_ok()
            }
        };
        out["rebuilt_copy_removed"] = serde_json::json!(removed);
    }
    Ok(out)
}

/// Whether group `ahead` has committed at least as far as group `behind` on every partition.
async fn caught_up(log: &dyn EventLog, ahead: &str, behind: &str, topics: &[String]) -> anyhow::Result<bool> {
    let behind: std::collections::HashMap<(String, i32), i64> =
        log.partition_lags(behind, topics).await?.into_iter().map(|l| ((l.topic, l.partition), l.committed)).collect();
    Ok(log
        .partition_lags(ahead, topics)
        .await?
        .into_iter()
        .all(|l| l.committed >= behind.get(&(l.topic, l.partition)).copied().unwrap_or(0)))
}

/// Runs the command; an error ends the process with its message (and its causes) on stderr and
/// exit status 1, never a backtrace: a command's errors are the user's to read, not panics (a
/// `RUST_BACKTRACE` set for other programs would otherwise print anyhow's backtrace).
fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    // Colours only on a terminal (log files and pipes get plain text), and never with NO_COLOR.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHAT_LOG").unwrap_or_else(|_| "info,scylla=warn,fjall=warn,lsm_tree=warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_command()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_command() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = cli.settings.resolve()?;
    let command = cli.command.unwrap_or(Command::Run);
    // A tool says which mode and data it reads (the servers log where they run).
    if !matches!(command, Command::Run | Command::Gateway | Command::Worker) {
        eprintln!("chat: {}", cfg.describe());
    }
    match command {
        Command::Run => run(cfg).await,
        Command::Gateway => {
            cluster_only(&cfg, "gateway")?;
            let p = Platform::open(cfg).await?;
            let (addr, gateway) = p.start_gateway(shutdown_signal()).await?;
            // The first line on stdout says where we listen (tests and scripts read it).
            println!("chat gateway node {} listening on http://{addr}", p.cfg.node_id);
            gateway.await??;
            p.close().await;
            Ok(())
        }
        Command::Worker => {
            cluster_only(&cfg, "worker")?;
            let p = Platform::open(cfg).await?;
            if p.cfg.stages.iter().any(|s| s == "projections") {
                p.upgrade_projections(false).await?;
            }
            let workers = p.start_workers(shutdown_signal()).await?;
            let _lags = p.watch_lags();
            let metrics = match p.cfg.metrics_listen.clone() {
                Some(listen) => Some(p.serve_worker_metrics(&listen).await?),
                None => None,
            };
            match &metrics {
                Some((addr, _)) => println!("chat worker running stages {:?}, metrics on http://{addr}/metrics", p.cfg.stages),
                None => println!("chat worker running stages {:?}", p.cfg.stages),
            }
            for w in workers {
                w.await?;
            }
            p.close().await;
            Ok(())
        }
        Command::Migrate => {
            let p = Platform::open(cfg).await?;
            // Data of older layouts: the command side and the fan-out's state are moved (see
            // `TableAdmin::migrate`); projections of an older layout are rebuilt from the log.
            p.tables.migrate().await?;
            p.upgrade_projections(true).await?;
            print_out("topics and tables are in place")
        }
        Command::ResetGroup { group } => {
            let p = Platform::open(cfg).await?;
            p.log.delete_group(&group).await?;
            print_out(&format!("group {group} reset"))
        }
        Command::Rebuild { into, swap, keep } => {
            if !rebuild(cfg, RebuildOpts { into, swap, keep }).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Replay(a) => replay(cfg, a).await,
        Command::Role { action } => role(cfg, action).await,
        Command::User { action } => user(cfg, action).await,
        Command::Analytics { query } => analytics(cfg, query).await,
        Command::Audit { query } => audit(cfg, query).await,
        Command::Checksums => checksums(cfg).await,
        Command::FindText { needle } => find_text(cfg, needle).await,
    }
}

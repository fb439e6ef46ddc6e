//! Routing and presence across gateway nodes.
//!
//! The [`Routing`] boundary: which nodes hold a user's connections, online/offline, and pushing
//! frames to connections on any node. [`RedisRouting`] implements it on Redis:
//! - `<prefix>u:<user>`: sorted set of `<node>/<conn>` scored by expiry (ms); heartbeats push
//!   the expiry forward, so a crashed node's entries fade out after the TTL;
//! - `<prefix>n:<node>`: the pub/sub channel of a node;
//! - `<prefix>deadlines`: sorted set of users scored by their latest connection expiry, so that
//!   any node can find users whose every connection died with a crashed node and declare them
//!   offline ([`Routing::reap`]).
//!
//! Redis holds only what can be rebuilt (connections re-register on their next heartbeat); it is
//! never the only copy of a message: pushes are the fast path, `sync` is the certain one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_events::UserId;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::hub::{Hub, Outbound};

/// A connection somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub node: String,
    pub conn: u64,
}

impl ConnRef {
    fn member(&self) -> String {
        format!("{}/{}", self.node, self.conn)
    }

    fn parse(member: &str) -> Option<ConnRef> {
        let (node, conn) = member.rsplit_once('/')?;
        Some(ConnRef { node: node.to_owned(), conn: conn.parse().ok()? })
    }
}

/// A frame for every connection of a user, except one (the sender's own socket).
#[derive(Clone, Debug)]
pub struct Push {
    pub user: UserId,
    pub text: Outbound,
    pub except: Option<ConnRef>,
    /// For a message: when it was accepted (ms), for the push latency histogram.
    pub sent_at_ms: Option<i64>,
}

/// Routing failures: the caller logs them; the durable path (sync) still delivers.
#[derive(Debug, thiserror::Error)]
#[error("routing unavailable: {0}")]
pub struct RoutingError(pub String);

impl From<redis::RedisError> for RoutingError {
    fn from(e: redis::RedisError) -> Self {
        RoutingError(e.to_string())
    }
}

/// The routing and presence boundary.
#[async_trait]
pub trait Routing: Send + Sync {
    /// Registers a connection. True if the user had no live connection before (came online).
    async fn connect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError>;
    /// Removes a connection. True if it was the user's last one (went offline).
    async fn disconnect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError>;
    /// Keeps this node's connections alive.
    async fn heartbeat(&self, conns: &[(UserId, ConnRef)]) -> Result<(), RoutingError>;
    /// Whether each user has a live connection.
    async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, RoutingError>;
    /// Delivers frames to the users' connections, wherever they are.
    async fn push(&self, pushes: Vec<Push>) -> Result<(), RoutingError>;
    /// Claims users whose connections have all expired without a disconnect (their node died),
    /// at most `max`; each is claimed by exactly one caller, which declares them offline.
    async fn reap(&self, max: usize) -> Result<Vec<UserId>, RoutingError>;
    /// Receives pushes addressed to this node and hands them to the hub, until shutdown.
    async fn run_inbound(&self, shutdown: watch::Receiver<bool>);
    /// Whether the routing store answers.
    async fn ping(&self) -> bool;
}

/// Routing on Redis.
pub struct RedisRouting {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    node: String,
    ttl: Duration,
    hub: Arc<Hub>,
    connect_script: redis::Script,
    disconnect_script: redis::Script,
    reap_script: redis::Script,
}

/// On a pub/sub channel: frames for connections of this node.
#[derive(Serialize, Deserialize)]
struct NodeDelivery {
    /// user
    u: UserId,
    /// connection ids on the receiving node
    c: Vec<u64>,
    /// frame text
    f: String,
    /// a message's acceptance time (ms), for the push latency
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<i64>,
}

// KEYS: user key, deadlines. ARGV: member, now, expiry, key ttl, user id.
const CONNECT_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[5])
return before
";

// KEYS: user key, deadlines. ARGV: member, now, user id.
const DISCONNECT_LUA: &str = r"
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then redis.call('ZREM', KEYS[2], ARGV[3]) end
return {removed, left}
";

// KEYS: deadlines. ARGV: now, max, user key prefix. Returns the users whose connections all
// expired; users that still have live connections get their deadline moved forward.
const REAP_LUA: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local gone = {}
for _, user in ipairs(due) do
  local key = ARGV[3] .. user
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  if redis.call('ZCARD', key) == 0 then
    redis.call('ZREM', KEYS[1], user)
    table.insert(gone, user)
  else
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('ZADD', KEYS[1], last[2], user)
  end
end
return gone
";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RedisRouting {
    pub async fn connect(url: &str, prefix: &str, node: &str, ttl: Duration, hub: Arc<Hub>) -> Result<Self, RoutingError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_manager().await?;
        Ok(RedisRouting {
            client,
            conn,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            ttl,
            hub,
            connect_script: redis::Script::new(CONNECT_LUA),
            disconnect_script: redis::Script::new(DISCONNECT_LUA),
            reap_script: redis::Script::new(REAP_LUA),
        })
    }

    fn user_key(&self, user: UserId) -> String {
        format!("{}u:{}", self.prefix, user)
    }

    fn deadlines_key(&self) -> String {
        format!("{}deadlines", self.prefix)
    }

    fn node_channel(&self, node: &str) -> String {
        format!("{}n:{}", self.prefix, node)
    }

    fn deliver_local(&self, d: NodeDelivery) {
        let text: Outbound = Arc::from(d.f);
        self.hub.deliver(d.u, Some(&d.c), &text, d.t);
    }
}

#[async_trait]
impl Routing for RedisRouting {
    async fn connect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError> {
        let now = now_ms();
        let before: i64 = self
            .connect_script
            .key(self.user_key(user))
            .key(self.deadlines_key())
            .arg(conn.member())
            .arg(now)
            .arg(now + self.ttl.as_millis() as i64)
            .arg(self.ttl.as_millis() as i64 * 2)
            .arg(user.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(before == 0)
    }

    async fn disconnect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError> {
        let (removed, left): (i64, i64) = self
            .disconnect_script
            .key(self.user_key(user))
            .key(self.deadlines_key())
            .arg(conn.member())
            .arg(now_ms())
            .arg(user.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(removed == 1 && left == 0)
    }

    async fn heartbeat(&self, conns: &[(UserId, ConnRef)]) -> Result<(), RoutingError> {
        let expiry = now_ms() + self.ttl.as_millis() as i64;
        for chunk in conns.chunks(500) {
            let mut pipe = redis::pipe();
            for (user, c) in chunk {
                let key = self.user_key(*user);
                pipe.cmd("ZADD").arg(&key).arg(expiry).arg(c.member()).ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl.as_millis() as i64 * 2).ignore();
                pipe.cmd("ZADD").arg(self.deadlines_key()).arg("GT").arg(expiry).arg(user.to_string()).ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone()).await?;
        }
        Ok(())
    }

    async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, RoutingError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("ZCOUNT").arg(self.user_key(*u)).arg(format!("({now}")).arg("+inf");
        }
        let counts: Vec<i64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(counts.into_iter().map(|c| c > 0).collect())
    }

    async fn push(&self, pushes: Vec<Push>) -> Result<(), RoutingError> {
        if pushes.is_empty() {
            return Ok(());
        }
        // One round trip for every user's connections, whatever the number of pushes.
        let mut users: Vec<UserId> = pushes.iter().map(|p| p.user).collect();
        users.sort_unstable();
        users.dedup();
        let now = now_ms();
        let mut pipe = redis::pipe();
        for u in &users {
            pipe.cmd("ZRANGEBYSCORE").arg(self.user_key(*u)).arg(format!("({now}")).arg("+inf");
        }
        let members: Vec<Vec<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        let conns: HashMap<UserId, Vec<ConnRef>> = users
            .into_iter()
            .zip(members)
            .map(|(u, m)| (u, m.iter().filter_map(|s| ConnRef::parse(s)).collect()))
            .collect();
        let mut remote: HashMap<String, Vec<NodeDelivery>> = HashMap::new();
        for p in pushes {
            let Some(targets) = conns.get(&p.user) else { continue };
            let mut by_node: HashMap<&str, Vec<u64>> = HashMap::new();
            for t in targets {
                if p.except.as_ref() == Some(t) {
                    continue;
                }
                by_node.entry(t.node.as_str()).or_default().push(t.conn);
            }
            for (node, ids) in by_node {
                if node == self.node {
                    self.hub.deliver(p.user, Some(&ids), &p.text, p.sent_at_ms);
                } else {
                    remote.entry(node.to_owned()).or_default().push(NodeDelivery { u: p.user, c: ids, f: p.text.to_string(), t: p.sent_at_ms });
                }
            }
        }
        if !remote.is_empty() {
            let mut pipe = redis::pipe();
            for (node, deliveries) in remote {
                let payload = serde_json::to_string(&deliveries).map_err(|e| RoutingError(e.to_string()))?;
                pipe.cmd("PUBLISH").arg(self.node_channel(&node)).arg(payload).ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone()).await?;
        }
        Ok(())
    }

    async fn reap(&self, max: usize) -> Result<Vec<UserId>, RoutingError> {
        let gone: Vec<String> = self
            .reap_script
            .key(self.deadlines_key())
            .arg(now_ms())
            .arg(max)
            .arg(format!("{}u:", self.prefix))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(gone.iter().filter_map(|u| u.parse().ok()).collect())
    }

    async fn run_inbound(&self, mut shutdown: watch::Receiver<bool>) {
        let channel = self.node_channel(&self.node);
        let mut backoff = Duration::from_millis(100);
        while !*shutdown.borrow() {
            let mut pubsub = match self.client.get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "redis pub/sub connect failed, retrying");
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.changed() => {} }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = pubsub.subscribe(&channel).await {
                warn!(error = %e, "redis subscribe failed, retrying");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.changed() => {} }
                continue;
            }
            info!(channel, "subscribed to node channel");
            backoff = Duration::from_millis(100);
            let mut stream = pubsub.on_message();
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            let payload: String = match msg.get_payload() {
                                Ok(p) => p,
                                Err(e) => { warn!(error = %e, "unreadable pub/sub payload"); continue; }
                            };
                            match serde_json::from_str::<Vec<NodeDelivery>>(&payload) {
                                Ok(ds) => ds.into_iter().for_each(|d| self.deliver_local(d)),
                                Err(e) => warn!(error = %e, "malformed node delivery"),
                            }
                        }
                        None => { warn!("redis pub/sub stream ended, resubscribing"); break; }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    async fn ping(&self) -> bool {
        redis::cmd("PING").query_async::<String>(&mut self.conn.clone()).await.is_ok()
    }
}

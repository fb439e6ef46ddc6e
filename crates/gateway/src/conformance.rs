//! The conformance suite of the routing/presence boundary: what every [`Routing`] back-end must
//! do, run against Redis ([`crate::RedisRouting`], two nodes sharing one Redis, in
//! `tests/e2e/conformance.rs`) and in-process ([`crate::LocalRouting`], one node, in
//! `crates/gateway/tests/conformance.rs`), so the two cannot drift. Cargo feature `conformance`.
//!
//! The suite builds nodes through a factory (`Fn(NodeSpec) -> Future<Output = Arc<dyn Routing>>`),
//! registers connections in each node's [`Hub`] with real channels, and checks what arrives on
//! them, waiting with deadlines. A [`Flavor`] says what the back-end can do: several nodes that
//! share state, and connections that expire when not heartbeated. Every case panics with a
//! message naming the broken rule.
//!
//! Negative checks ("this connection did not get that frame") never wait a fixed time: after
//! the push under test, a marker frame goes to every connection from the same node, and the
//! connection's next frame must be the marker (pushes from one node arrive in order).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chat_events::{DeviceId, UserId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hub::{Hub, Outbound};
use crate::routing::{ConnRef, Push, Routing};

/// How long a frame may take to arrive, and how long the reaper may take to see an expiry.
pub const WAIT: Duration = Duration::from_secs(30);

/// What a factory builds a node from.
pub struct NodeSpec {
    /// The node id (unique within one suite run).
    pub node: String,
    /// The node's connections: pushes for them must end up here.
    pub hub: Arc<Hub>,
    /// How long a connection lives without a heartbeat (ignored by back-ends that never expire).
    pub ttl: Duration,
}

/// What a back-end can do.
#[derive(Clone, Copy, Debug)]
pub struct Flavor {
    /// Nodes built by one factory share their routing state (Redis): a push on one node reaches
    /// connections on another. False for in-process routing, where the suite uses one node.
    pub multi_node: bool,
    /// Connections that are neither heartbeated nor disconnected expire after the TTL and are
    /// reaped once. False for in-process routing, where nothing expires and reap finds nothing.
    pub expires: bool,
}

/// Runs every case.
pub async fn run_all<F, Fut>(flavor: Flavor, make: F)
where
    F: Fn(NodeSpec) -> Fut,
    Fut: Future<Output = Arc<dyn Routing>>,
{
    let cluster = Cluster::start(&make, flavor, "main", Duration::from_secs(60)).await;
    ping_answers(&cluster).await;
    connect_and_disconnect(&cluster).await;
    push_on_one_node(&cluster).await;
    if flavor.multi_node {
        push_across_nodes(&cluster).await;
    }
    cluster.stop().await;
    reap(&make, flavor).await;
}

/// One node: its hub, its routing, and its inbound loop.
pub struct Node {
    pub id: String,
    pub hub: Arc<Hub>,
    pub routing: Arc<dyn Routing>,
    stop: watch::Sender<bool>,
    inbound: JoinHandle<()>,
}

/// The nodes of one suite run (two when the back-end is multi-node, else one).
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Builds the nodes, starts their inbound loops, and (multi-node) waits until a push from
    /// every node reaches every other node, since a pub/sub subscription is not there at once.
    pub async fn start<F, Fut>(make: &F, flavor: Flavor, tag: &str, ttl: Duration) -> Cluster
    where
        F: Fn(NodeSpec) -> Fut,
        Fut: Future<Output = Arc<dyn Routing>>,
    {
        let count = if flavor.multi_node { 2 } else { 1 };
        let mut nodes = Vec::new();
        for i in 0..count {
            let id = format!("{tag}-{i}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            let hub = Arc::new(Hub::new());
            let routing = make(NodeSpec { node: id.clone(), hub: hub.clone(), ttl }).await;
            let (stop, stop_rx) = watch::channel(false);
            let inbound = {
                let routing = routing.clone();
                tokio::spawn(async move { routing.run_inbound(stop_rx).await })
            };
            nodes.push(Node { id, hub, routing, stop, inbound });
        }
        let cluster = Cluster { nodes };
        for from in 0..count {
            for to in 0..count {
                if from != to {
                    cluster.wait_until_linked(from, to).await;
                }
            }
        }
        cluster
    }

    async fn wait_until_linked(&self, from: usize, to: usize) {
        let user = UserId::random();
        let mut probe = Conn::open(&self.nodes[to], user).await;
        let deadline = Instant::now() + WAIT;
        loop {
            push(&self.nodes[from], vec![frame(user, "probe", None)]).await;
            if tokio::time::timeout(Duration::from_millis(200), probe.rx.recv()).await.is_ok_and(|f| f.is_some()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a push from node {} never reached a connection on node {} within {WAIT:?}",
                self.nodes[from].id,
                self.nodes[to].id
            );
        }
        probe.close(&self.nodes[to]).await;
    }

    /// Stops every inbound loop.
    pub async fn stop(self) {
        for n in self.nodes {
            n.stop.send_replace(true);
            if tokio::time::timeout(WAIT, n.inbound).await.is_err() {
                panic!("run_inbound of node {} did not return after shutdown", n.id);
            }
        }
    }

    fn last(&self) -> &Node {
        self.nodes.last().expect("a node")
    }
}

/// A connection registered in a node's hub and in routing.
struct Conn {
    user: UserId,
    at: ConnRef,
    rx: mpsc::Receiver<Outbound>,
    /// Whether `connect` said the user came online with it.
    first: bool,
}

impl Conn {
    async fn open(node: &Node, user: UserId) -> Conn {
        let (tx, rx) = mpsc::channel(64);
        let id = node.hub.register(user, DeviceId::default_device(), 0, tx, Arc::new(crate::hub::Kick::default()));
        let at = ConnRef { node: node.id.clone(), conn: id };
        let first = node.routing.connect(user, &at).await.unwrap_or_else(|e| panic!("connect: {e}"));
        Conn { user, at, rx, first }
    }

    async fn close(self, node: &Node) {
        node.routing.disconnect(self.user, &self.at).await.unwrap_or_else(|e| panic!("disconnect: {e}"));
        node.hub.unregister(self.user, self.at.conn);
    }

    /// The next frame must be `want`.
    async fn expect(&mut self, want: &str, what: &str) {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(got)) => assert_eq!(&*got, want, "{what}: connection {:?} got the wrong frame", self.at),
            Ok(None) => panic!("{what}: the channel of {:?} closed", self.at),
            Err(_) => panic!("{what}: connection {:?} got no frame within {WAIT:?} (expected {want:?})", self.at),
        }
    }
}

fn frame(user: UserId, text: &str, except: Option<&ConnRef>) -> Push {
    Push { user, text: Arc::from(text), except: except.cloned(), sent_at_ms: None }
}

async fn push(node: &Node, pushes: Vec<Push>) {
    node.routing.push(pushes).await.unwrap_or_else(|e| panic!("push from node {}: {e}", node.id));
}

async fn online(node: &Node, users: &[UserId]) -> Vec<bool> {
    node.routing.online(users).await.unwrap_or_else(|e| panic!("online on node {}: {e}", node.id))
}

/// `ping` is true for working routing.
pub async fn ping_answers(cluster: &Cluster) {
    for n in &cluster.nodes {
        assert!(n.routing.ping().await, "ping on node {}: working routing must answer true", n.id);
    }
}

/// `connect` is true only for a user's first live connection, `disconnect` only for the last;
/// `online` agrees, on every node.
pub async fn connect_and_disconnect(cluster: &Cluster) {
    let (first, last) = (&cluster.nodes[0], cluster.last());
    let (u, nobody) = (UserId::random(), UserId::random());
    let c1 = ConnRef { node: first.id.clone(), conn: 1_000_001 };
    let c2 = ConnRef { node: last.id.clone(), conn: 1_000_002 };
    let connect = |n: &Node, c: &ConnRef| {
        let (r, c) = (n.routing.clone(), c.clone());
        async move { r.connect(u, &c).await.unwrap_or_else(|e| panic!("connect: {e}")) }
    };
    let disconnect = |n: &Node, c: &ConnRef| {
        let (r, c) = (n.routing.clone(), c.clone());
        async move { r.disconnect(u, &c).await.unwrap_or_else(|e| panic!("disconnect: {e}")) }
    };

    for n in &cluster.nodes {
        assert_eq!(online(n, &[u]).await, [false], "online of a user never connected");
        assert!(online(n, &[]).await.is_empty(), "online of no users is empty");
    }
    assert!(connect(first, &c1).await, "connect of a user's first connection returns true (came online)");
    assert!(!connect(first, &c1).await, "connect of the same connection again returns false (already online)");
    assert!(!connect(last, &c2).await, "connect of a second connection (on any node) returns false");
    for n in &cluster.nodes {
        assert_eq!(online(n, &[u, nobody]).await, [true, false], "online on node {} sees the connections of every node", n.id);
    }
    assert!(!disconnect(first, &c1).await, "disconnect of a connection that is not the last returns false");
    for n in &cluster.nodes {
        assert_eq!(online(n, &[u]).await, [true], "a user with one connection left is online");
    }
    assert!(!disconnect(first, &c1).await, "disconnect of a connection already gone returns false");
    assert!(disconnect(last, &c2).await, "disconnect of the last connection returns true (went offline)");
    for n in &cluster.nodes {
        assert_eq!(online(n, &[u]).await, [false], "a user whose connections are all gone is offline");
    }
    assert!(!disconnect(last, &c2).await, "disconnect of an offline user's connection returns false");
    let stranger = first.routing.disconnect(nobody, &c1).await.unwrap_or_else(|e| panic!("disconnect: {e}"));
    assert!(!stranger, "disconnect of a user who never connected returns false");
}

/// Pushes on one node: every connection of the user, `except` skips one, several pushes keep
/// their order, pushes to users with no (or stale) connections are no-ops, a disconnected
/// connection gets nothing.
pub async fn push_on_one_node(cluster: &Cluster) {
    let n = &cluster.nodes[0];
    let u = UserId::random();
    let mut a = Conn::open(n, u).await;
    let mut b = Conn::open(n, u).await;
    assert!(a.first && !b.first, "connect: true for the first connection, false for the second");

    push(n, vec![frame(u, "p1", None)]).await;
    a.expect("p1", "a push reaches every connection of the user").await;
    b.expect("p1", "a push reaches every connection of the user").await;

    push(n, vec![frame(u, "p2", Some(&a.at))]).await;
    b.expect("p2", "a push with `except` reaches the other connections").await;
    push(n, vec![frame(u, "m1", None)]).await;
    a.expect("m1", "a push with `except` must skip that connection").await;
    b.expect("m1", "marker").await;

    push(n, vec![frame(u, "p3", None), frame(u, "p4", None)]).await;
    for c in [&mut a, &mut b] {
        c.expect("p3", "several pushes in one call arrive in order").await;
        c.expect("p4", "several pushes in one call arrive in order").await;
    }

    let (nobody, stale) = (UserId::random(), UserId::random());
    push(n, vec![frame(nobody, "x", None)]).await;
    let gone = ConnRef { node: n.id.clone(), conn: 9_999_999 };
    assert!(n.routing.connect(stale, &gone).await.unwrap_or_else(|e| panic!("connect: {e}")));
    push(n, vec![frame(stale, "x", None)]).await;
    push(n, Vec::new()).await;
    push(n, vec![frame(u, "m2", None)]).await;
    a.expect("m2", "pushes to users with no connections (or a stale one) are no-ops").await;
    b.expect("m2", "pushes to users with no connections (or a stale one) are no-ops").await;

    assert!(!n.routing.disconnect(u, &a.at).await.unwrap_or_else(|e| panic!("disconnect: {e}")), "not the last connection");
    push(n, vec![frame(u, "p5", None)]).await;
    b.expect("p5", "the remaining connection gets pushes").await;
    assert!(!n.routing.connect(u, &a.at).await.unwrap_or_else(|e| panic!("connect: {e}")), "b is still online");
    push(n, vec![frame(u, "m3", None)]).await;
    a.expect("m3", "a disconnected connection gets no pushes (even while its socket is still in the hub)").await;
    b.expect("m3", "marker").await;

    a.close(n).await;
    b.close(n).await;
}

/// Pushes across nodes: a push on one node reaches the user's connections on every node, with
/// `except` honoured wherever the skipped connection is.
pub async fn push_across_nodes(cluster: &Cluster) {
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (u, v) = (UserId::random(), UserId::random());
    let mut a = Conn::open(n0, u).await;
    let mut b = Conn::open(n1, u).await;
    let mut w = Conn::open(n1, v).await;
    assert!(a.first && !b.first, "connect on another node: false for the user's second connection");

    push(n0, vec![frame(u, "x1", None)]).await;
    a.expect("x1", "a push reaches the user's connection on the pushing node").await;
    b.expect("x1", "a push from node A reaches the user's connection on node B").await;
    push(n1, vec![frame(u, "x2", None)]).await;
    a.expect("x2", "a push from node B reaches the user's connection on node A").await;
    b.expect("x2", "a push reaches the user's connection on the pushing node").await;

    push(n0, vec![frame(u, "x3", Some(&b.at))]).await;
    a.expect("x3", "a push with `except` (a remote connection) reaches the others").await;
    push(n0, vec![frame(u, "m1", None)]).await;
    b.expect("m1", "a push with `except` must skip that connection on the other node").await;
    a.expect("m1", "marker").await;

    push(n1, vec![frame(u, "x4", Some(&a.at))]).await;
    b.expect("x4", "a push with `except` (a remote connection) reaches the others").await;
    push(n1, vec![frame(u, "m2", None)]).await;
    a.expect("m2", "a push with `except` must skip that connection on the other node").await;
    b.expect("m2", "marker").await;

    push(n0, vec![frame(v, "y1", None), frame(u, "y2", None), frame(v, "y3", None)]).await;
    w.expect("y1", "several pushes to a remote user arrive in order").await;
    w.expect("y3", "several pushes to a remote user arrive in order").await;
    a.expect("y2", "pushes to several users in one call").await;
    b.expect("y2", "pushes to several users in one call").await;

    a.close(n0).await;
    b.close(n1).await;
    w.close(n1).await;
}

/// Reaping: with expiring connections, a connection neither heartbeated nor disconnected is
/// reaped exactly once (by one node), while heartbeated ones never are; without expiry, reap
/// finds nothing.
pub async fn reap<F, Fut>(make: &F, flavor: Flavor)
where
    F: Fn(NodeSpec) -> Fut,
    Fut: Future<Output = Arc<dyn Routing>>,
{
    let ttl = Duration::from_secs(1);
    let cluster = Cluster::start(make, flavor, "reap", ttl).await;
    let (first, last) = (&cluster.nodes[0], cluster.last());
    let reap_all = || async {
        let mut out = Vec::new();
        for r in futures::future::join_all(cluster.nodes.iter().map(|n| n.routing.reap(100))).await {
            out.extend(r.unwrap_or_else(|e| panic!("reap: {e}")));
        }
        out
    };
    let (dead, alive, mixed) = (UserId::random(), UserId::random(), UserId::random());
    let dead_conn = ConnRef { node: first.id.clone(), conn: 1 };
    let alive_conn = ConnRef { node: last.id.clone(), conn: 2 };
    let mixed_dead = ConnRef { node: first.id.clone(), conn: 3 };
    let mixed_alive = ConnRef { node: last.id.clone(), conn: 4 };
    for (user, node, c) in [(dead, first, &dead_conn), (alive, last, &alive_conn), (mixed, first, &mixed_dead), (mixed, last, &mixed_alive)]
    {
        node.routing.connect(user, c).await.unwrap_or_else(|e| panic!("connect: {e}"));
    }

    if !flavor.expires {
        assert!(reap_all().await.is_empty(), "reap of a back-end whose connections never expire finds nothing");
        assert_eq!(online(first, &[dead, alive, mixed]).await, [true, true, true], "connections stay until disconnected");
        cluster.stop().await;
        return;
    }

    let heartbeat = [(alive, alive_conn.clone()), (mixed, mixed_alive.clone())];
    let deadline = Instant::now() + WAIT;
    let mut reaped = Vec::new();
    while !reaped.contains(&dead) {
        assert!(Instant::now() < deadline, "reap never returned a user whose only connection expired ({WAIT:?}, TTL {ttl:?})");
        last.routing.heartbeat(&heartbeat).await.unwrap_or_else(|e| panic!("heartbeat: {e}"));
        reaped.extend(reap_all().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last.routing.heartbeat(&heartbeat).await.unwrap_or_else(|e| panic!("heartbeat: {e}"));
    reaped.extend(reap_all().await);
    assert_eq!(
        reaped.iter().filter(|u| **u == dead).count(),
        1,
        "a user whose connections all expired is reaped exactly once, by one node (concurrent reaps on every node)"
    );
    assert!(!reaped.contains(&alive), "a heartbeated connection is never reaped");
    assert!(!reaped.contains(&mixed), "a user with one live (heartbeated) connection is not reaped, though another expired");
    assert_eq!(online(first, &[dead, alive, mixed]).await, [false, true, true], "online after the reap");
    let late = first.routing.disconnect(dead, &dead_conn).await.unwrap_or_else(|e| panic!("disconnect: {e}"));
    assert!(!late, "a late disconnect of a reaped connection must not report the user offline a second time");
    let gone = last.routing.disconnect(mixed, &mixed_alive).await.unwrap_or_else(|e| panic!("disconnect: {e}"));
    assert!(gone, "disconnect of the last live connection returns true, though an expired one was never disconnected");
    cluster.stop().await;
}

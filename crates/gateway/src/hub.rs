//! The connections of this node. Each connection has a bounded outbound queue; a client too
//! slow to drain it is disconnected (it resyncs from its cursor when it comes back) instead of
//! letting the queue grow without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chat_events::{DeviceId, UserId};
use tokio::sync::{mpsc, watch, Notify};

/// A frame on its way to one socket.
pub type Outbound = Arc<str>;

struct LocalConn {
    id: u64,
    device: DeviceId,
    tx: mpsc::Sender<Outbound>,
    /// Signalled when the queue overflows or the session ends: the socket task closes the
    /// connection.
    kick: Arc<Kick>,
    /// When the connection's token was issued (ms): a revocation at or after it closes it.
    issued_ms: i64,
}

/// Tells a connection's task to close it: 1013 when its queue overflowed (a slow consumer),
/// or the code given (1008 when its session ended).
#[derive(Default)]
pub struct Kick {
    notify: Notify,
    code: AtomicU16,
}

impl Kick {
    /// The queue overflowed.
    pub fn slow(&self) {
        self.notify.notify_one();
    }

    /// Close with `code` (a close already asked for keeps its code).
    pub fn close(&self, code: u16) {
        let _first = self.code.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Waits for a kick.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// The code asked for by [`Kick::close`]; none for a slow consumer.
    pub fn code(&self) -> Option<u16> {
        Some(self.code.load(Ordering::Relaxed)).filter(|c| *c != 0)
    }
}

/// Local connections by user.
pub struct Hub {
    conns: RwLock<HashMap<UserId, Vec<LocalConn>>>,
    next_id: AtomicU64,
    count: AtomicU64,
    /// Connection tasks not finished yet (their disconnect handling included).
    sessions: AtomicU64,
    closing: watch::Sender<bool>,
    /// Message acceptance to frame queued on a connection (set by the gateway's metrics).
    push_latency: std::sync::OnceLock<prometheus::Histogram>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Hub {
            conns: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            count: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            closing: watch::channel(false).0,
            push_latency: std::sync::OnceLock::new(),
        }
    }

    /// Becomes true when the node shuts down: every connection closes with 1001.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Asks every connection to close.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Adds a connection; returns its id on this node.
    pub fn register(&self, user: UserId, device: DeviceId, issued_ms: i64, tx: mpsc::Sender<Outbound>, kick: Arc<Kick>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut map = self.conns.write().unwrap_or_else(|p| p.into_inner());
        map.entry(user).or_default().push(LocalConn { id, device, tx, kick, issued_ms });
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// A connection task finished everything, its disconnect handling included.
    pub fn session_ended(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connection tasks still running (a shutdown waits for them).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn unregister(&self, user: UserId, id: u64) {
        let mut map = self.conns.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&user) {
            let before = list.len();
            list.retain(|c| c.id != id);
            if list.len() < before {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                map.remove(&user);
            }
        }
    }

    /// Where [`Hub::deliver`] records push latencies.
    pub fn record_push_latency(&self, histogram: prometheus::Histogram) {
        let _first = self.push_latency.set(histogram);
    }

    /// Queues a frame on the given connections of a user (all of them when `ids` is None).
    /// Returns how many connections got it. `sent_at_ms`: a message's acceptance time, for the
    /// push latency (observed once per delivery).
    pub fn deliver(&self, user: UserId, ids: Option<&[u64]>, text: &Outbound, sent_at_ms: Option<i64>) -> usize {
        let n = self.queue(user, ids, text);
        if let (true, Some(at), Some(h)) = (n > 0, sent_at_ms, self.push_latency.get()) {
            h.observe((chrono::Utc::now().timestamp_millis() - at).max(0) as f64 / 1000.0);
        }
        n
    }

    fn queue(&self, user: UserId, ids: Option<&[u64]>, text: &Outbound) -> usize {
        let map = self.conns.read().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get(&user) else { return 0 };
        let mut n = 0;
        for c in list {
            if ids.is_some_and(|ids| !ids.contains(&c.id)) {
                continue;
            }
            match c.tx.try_send(text.clone()) {
                Ok(()) => n += 1,
                Err(mpsc::error::TrySendError::Full(_)) => c.kick.slow(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        n
    }

    /// Closes the user's connections whose token was issued at or before `at_ms` with `code`;
    /// returns how many.
    pub fn end_sessions(&self, user: UserId, at_ms: i64, code: u16) -> usize {
        let map = self.conns.read().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get(&user) else { return 0 };
        list.iter().filter(|c| c.issued_ms <= at_ms).map(|c| c.kick.close(code)).count()
    }

    /// Every local connection, for the routing heartbeat.
    pub fn all(&self) -> Vec<(UserId, u64)> {
        let map = self.conns.read().unwrap_or_else(|p| p.into_inner());
        map.iter().flat_map(|(u, l)| l.iter().map(move |c| (*u, c.id))).collect()
    }

    /// The devices of a user connected here.
    pub fn devices(&self, user: UserId) -> Vec<DeviceId> {
        let map = self.conns.read().unwrap_or_else(|p| p.into_inner());
        map.get(&user).map(|l| l.iter().map(|c| c.device.clone()).collect()).unwrap_or_default()
    }

    /// Number of open connections on this node.
    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_kicks_the_connection_instead_of_growing() {
        let hub = Hub::new();
        let u = UserId::random();
        let (tx, _rx) = mpsc::channel(1);
        let kick = Arc::new(Kick::default());
        let id = hub.register(u, DeviceId::default_device(), 0, tx, kick.clone());
        let t: Outbound = Arc::from("x");
        assert_eq!(hub.deliver(u, None, &t, None), 1);
        assert_eq!(hub.deliver(u, None, &t, None), 0);
        // The kick was signalled: a waiter returns at once.
        let notified = kick.notified();
        futures::executor::block_on(notified);
        assert_eq!(kick.code(), None, "a slow consumer");
        hub.unregister(u, id);
        assert!(hub.is_empty());
    }

    #[test]
    fn except_and_targeted_delivery() {
        let hub = Hub::new();
        let u = UserId::random();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let a = hub.register(u, DeviceId::default_device(), 0, tx1, Arc::new(Kick::default()));
        let _b = hub.register(u, "phone".parse().unwrap(), 0, tx2, Arc::new(Kick::default()));
        let t: Outbound = Arc::from("x");
        assert_eq!(hub.deliver(u, Some(&[a]), &t, None), 1);
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_err());
    }

    #[test]
    fn ending_sessions_closes_the_older_connections_only() {
        let hub = Hub::new();
        let u = UserId::random();
        let (old, new) = (Arc::new(Kick::default()), Arc::new(Kick::default()));
        hub.register(u, DeviceId::default_device(), 1_000, mpsc::channel(1).0, old.clone());
        hub.register(u, "phone".parse().unwrap(), 3_000, mpsc::channel(1).0, new.clone());
        assert_eq!(hub.end_sessions(u, 2_000, 1008), 1);
        assert_eq!(old.code(), Some(1008));
        assert_eq!(new.code(), None, "a connection with a token issued after the revocation stays");
        assert_eq!(hub.end_sessions(UserId::random(), 2_000, 1008), 0);
    }
}

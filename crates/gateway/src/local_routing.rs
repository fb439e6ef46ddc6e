//! Routing and presence inside one process (the embedded mode): every connection is on this
//! node, so a push is a hub delivery and presence is a count of connections per user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chat_events::UserId;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::routing::{ConnRef, Push, Routing, RoutingError};

/// The in-process [`Routing`].
pub struct LocalRouting {
    hub: Arc<Hub>,
    conns: Mutex<HashMap<UserId, Vec<ConnRef>>>,
}

impl LocalRouting {
    pub fn new(hub: Arc<Hub>) -> Self {
        LocalRouting { hub, conns: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<ConnRef>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Routing for LocalRouting {
    async fn connect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError> {
        let mut map = self.lock();
        let list = map.entry(user).or_default();
        let first = list.is_empty();
        if !list.contains(conn) {
            list.push(conn.clone());
        }
        Ok(first)
    }

    async fn disconnect(&self, user: UserId, conn: &ConnRef) -> Result<bool, RoutingError> {
        let mut map = self.lock();
        let Some(list) = map.get_mut(&user) else { return Ok(false) };
        let before = list.len();
        list.retain(|c| c != conn);
        let removed = list.len() < before;
        let last = list.is_empty();
        if last {
            map.remove(&user);
        }
        Ok(removed && last)
    }

    async fn heartbeat(&self, _conns: &[(UserId, ConnRef)]) -> Result<(), RoutingError> {
        // Nothing expires in one process: a connection is removed when its task ends.
        Ok(())
    }

    async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, RoutingError> {
        let map = self.lock();
        Ok(users.iter().map(|u| map.get(u).is_some_and(|l| !l.is_empty())).collect())
    }

    async fn push(&self, pushes: Vec<Push>) -> Result<(), RoutingError> {
        for p in pushes {
            let ids: Vec<u64> = {
                let map = self.lock();
                map.get(&p.user)
                    .map(|l| l.iter().filter(|c| p.except.as_ref() != Some(*c)).map(|c| c.conn).collect())
                    .unwrap_or_default()
            };
            if !ids.is_empty() {
                self.hub.deliver(p.user, Some(&ids), &p.text, p.sent_at_ms);
            }
        }
        Ok(())
    }

    async fn reap(&self, _max: usize) -> Result<Vec<UserId>, RoutingError> {
        // Connections cannot outlive this process without a disconnect.
        Ok(Vec::new())
    }

    async fn run_inbound(&self, mut shutdown: watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    }

    async fn ping(&self) -> bool {
        true
    }
}

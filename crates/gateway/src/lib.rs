//! The gateway: axum HTTP + WebSocket server.
//!
//! - [`http`]: routes and thin handlers; [`ws`]: one WebSocket connection;
//! - [`service`]: [`Chat`], what every command and read does (gate → append → answer → push);
//! - [`frames`]: the wire protocol; [`auth`]: passwords and tokens; [`error`]: error codes;
//! - [`routing`]: the routing/presence boundary and its Redis back-end; [`hub`]: this node's
//!   connections; [`local_routing`]: the in-process routing of the embedded mode; [`metrics`]:
//!   Prometheus; `conformance`: the suite every routing back-end must pass (cargo feature
//!   `conformance`).
//!
//! Life of a `send` frame: `ws::serve` reads it → `ws::handle_text` parses a `ClientFrame` →
//! `Chat::send` checks the recipient, reserves (sender, client_msg_id), appends `message.sent`
//! and waits for the broker's ack → the `sent` frame goes back through the connection's queue →
//! `Routing::push` hands the `message` frame to the recipient's node(s).

pub mod auth;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod edits;
pub mod error;
pub mod frames;
pub mod groups;
pub mod http;
pub mod hub;
pub mod insights;
pub mod limits;
pub mod local_routing;
pub mod media;
pub mod message_ids;
pub mod metrics;
pub mod privacy;
pub mod reactions;
pub mod revocations;
pub mod routing;
pub mod search;
pub mod sends;
pub mod server;
pub mod service;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use auth::Tokens;
pub use hub::Hub;
pub use local_routing::LocalRouting;
pub use routing::{RedisRouting, Routing};
pub use service::{Chat, GatewayStore, Limits};

/// Serves HTTP and WebSocket on `listener` until `shutdown` becomes true; then closes every
/// connection (clients reconnect elsewhere and sync) and returns.
pub async fn serve(chat: Arc<Chat>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound = {
        let chat = chat.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move { chat.routing.run_inbound(stop).await })
    };
    let heartbeat = {
        let chat = chat.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(chat.limits.presence_ttl / 3);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let conns: Vec<_> = chat
                    .hub
                    .all()
                    .into_iter()
                    .map(|(u, id)| (u, routing::ConnRef { node: chat.node.clone(), conn: id }))
                    .collect();
                if let Err(e) = chat.routing.heartbeat(&conns).await {
                    warn!(error = %e, "routing heartbeat failed");
                }
                chat.reap_dead_connections().await;
            }
        })
    };
    // Ended sessions: read before serving (the last token lifetime), then every few seconds.
    if let Err(e) = chat.refresh_revocations().await {
        warn!(error = %e, "reading session revocations failed; retrying in the background");
    }
    let revocations = {
        let chat = chat.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(revocations::POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                match chat.refresh_revocations().await {
                    Ok(_) => failing = false,
                    // Logged once per outage, not every poll.
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "reading session revocations failed");
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let app = http::router(chat.clone());
    let hub = chat.hub.clone();
    let graceful = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        info!("shutting down: closing connections");
        hub.close_all();
    };
    let result = server::serve(listener, app, graceful).await;
    // Upgraded sockets outlive the HTTP server; give them a moment to close and go offline
    // (their presence events appended).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while chat.hub.sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _stopped = stop_tx.send(true);
    let _ = tokio::join!(inbound, heartbeat, revocations);
    result
}

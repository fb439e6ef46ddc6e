//! The HTTP server under the router: accepts connections and serves each through hyper, with a
//! deadline on every request's headers, so that a client trickling its headers byte by byte
//! (slowloris) holds a socket for at most [`HEADER_TIMEOUT`] (the body has its own idle deadline,
//! [`BODY_IDLE_TIMEOUT`], in the router); keeps HTTP/1 upgrades (WebSocket) and hands each
//! request its peer's address ([`axum::extract::ConnectInfo`]).
//!
//! HTTP/1.1 only: HTTP/2 would bring connections whose header frames have no such deadline
//! (hyper has none for HTTP/2), and the clients (WebSocket, REST) gain nothing from it here;
//! a load balancer in front may speak HTTP/2 to clients.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::{debug, warn};

/// A request's headers (the first request's, or the next one's on a kept-alive connection) must
/// arrive within this long; past it the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body with no new bytes for this long fails (408), and its connection is closed.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a shutdown waits for HTTP requests under way (upgraded sockets are closed by the hub).
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    // Connections under way, told to finish their request and close when `stopping` turns true.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
        let _nodelay = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let mut stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    if tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        debug!("requests still under way at shutdown were cut");
    }
    Ok(())
}

/// An accept error: a connection that died in the queue is skipped; anything else (out of
/// descriptors, say) is logged and waited out briefly instead of spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted) {
        return;
    }
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The peer of a request (absent in tests that call the router directly).
pub fn peer_of<B>(req: &hyper::Request<B>) -> Option<SocketAddr> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

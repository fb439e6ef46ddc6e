//! The operator's commands beside a running embedded server. `chat run` holds its data
//! directory (one writer of the log, one owner of the tables), so `chat role`, `chat user`, `chat audit`,
//! `chat rebuild`, `chat analytics` and `chat checksums` cannot open it while the server runs. Instead the server listens on a Unix socket in the data
//! directory, `admin.sock`, and those commands send their request there when it answers; the
//! server runs the very same code as the command would. Only the data directory's owner may use
//! it: the socket is created owner-only and every connection's peer credentials are checked.
//!
//! The protocol is HTTP/1.1 with JSON bodies (`POST /role`, `POST /ban`, `POST /audit`, `POST /rebuild`, `POST /analytics`,
//! `POST /checksums`, `POST /find-text`); an error is a 4xx/5xx
//! status with `{"error": "..."}`. It is an interface between two builds of this binary, not a
//! public API.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chat_events::{EventLog, Topics};
use chat_store::Tables;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// The socket's file name in the data directory.
pub const SOCKET: &str = "admin.sock";

/// What the commands work on.
#[derive(Clone)]
pub struct Ops {
    pub tables: Arc<dyn Tables>,
    pub log: Arc<dyn EventLog>,
    pub topics: Topics,
    /// Stops the process's worker stages (none run in a command's own process).
    pub stages: crate::StageHold,
}

/// The server's state: what the commands work on and its configuration.
#[derive(Clone)]
struct Admin {
    ops: Ops,
    cfg: Arc<crate::config::Config>,
}

/// A role change, as `chat role` asks for it.
#[derive(Serialize, serde::Deserialize)]
pub struct RoleChange {
    pub username: String,
    pub role: String,
    pub granted: bool,
}

/// A ban or an unban, as `chat user` asks for it.
#[derive(Serialize, serde::Deserialize)]
pub struct BanChange {
    pub username: String,
    pub banned: bool,
}

/// Accepts only connections from the data directory's owner (or root).
struct OwnerOnly {
    listener: UnixListener,
    owner: u32,
}

impl axum::serve::Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(c) if c.uid() == self.owner || c.uid() == 0 => return (stream, addr),
                    Ok(c) => warn!(uid = c.uid(), "admin socket: connection from another user refused"),
                    Err(e) => warn!(error = %e, "admin socket: peer credentials unavailable; connection refused"),
                },
                Err(e) => {
                    warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Serves the admin socket of `dir` until `shutdown`; the caller holds the directory's lock, so
/// a socket file left by a crash is stale and replaced.
pub async fn serve(dir: &Path, ops: Ops, cfg: crate::config::Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", path.display())),
        _ => {}
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(dir)?.uid();
    let app = Router::new()
        .route("/role", post(role))
        .route("/ban", post(ban))
        .route("/audit", post(audit))
        .route("/rebuild", post(rebuild))
        .route("/analytics", post(analytics))
        .route("/checksums", post(checksums))
        .route("/find-text", post(find_text))
        .with_state(Admin { ops, cfg: Arc::new(cfg) });
    info!(socket = %path.display(), "admin socket listening");
    Ok(tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(OwnerOnly { listener, owner }, app).with_graceful_shutdown(stop).await {
            warn!(error = %e, "admin socket stopped");
        }
        let _gone = std::fs::remove_file(&path);
    }))
}

fn failed(e: anyhow::Error) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "error": format!("{e:#}") }))).into_response()
}

async fn role(State(admin): State<Admin>, Json(r): Json<RoleChange>) -> Response {
    match crate::change_role(&admin.ops, &r).await {
        Ok(message) => Json(serde_json::json!({ "message": message })).into_response(),
        Err(e) => failed(e),
    }
}

async fn ban(State(admin): State<Admin>, Json(b): Json<BanChange>) -> Response {
    match crate::change_ban(&admin.ops, &b).await {
        Ok(message) => Json(serde_json::json!({ "message": message })).into_response(),
        Err(e) => failed(e),
    }
}

async fn audit(State(admin): State<Admin>, Json(q): Json<crate::AuditQuery>) -> Response {
    match crate::audit_answer(&admin.ops, q).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

async fn analytics(State(admin): State<Admin>, Json(q): Json<crate::AnalyticsQuery>) -> Response {
    match crate::analytics_answer(&*admin.ops.tables, q).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

async fn checksums(State(admin): State<Admin>) -> Response {
    match admin.ops.tables.checksums().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e.into()),
    }
}

#[derive(serde::Deserialize)]
struct FindText {
    needle: String,
}

async fn find_text(State(admin): State<Admin>, Json(q): Json<FindText>) -> Response {
    match admin.ops.tables.tables_containing(&q.needle).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e.into()),
    }
}

async fn rebuild(State(admin): State<Admin>, Json(r): Json<crate::RebuildOpts>) -> Response {
    match crate::rebuild_into(&admin.ops, &admin.cfg, r).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

/// Sends a request to the server running on `dir`, if one is: `None` when no server answers on
/// the socket (the command then opens the directory itself).
pub async fn call<R: DeserializeOwned>(dir: &Path, path: &str, body: &impl Serialize) -> anyhow::Result<Option<R>> {
    let stream = match UnixStream::connect(socket_path(dir)).await {
        Ok(s) => s,
        // No socket, or a stale one of a server that is gone.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e).context("connecting to the running server's admin socket"),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("admin socket")?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "chat-admin")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(serde_json::to_vec(body)?)))?;
    let res = sender.send_request(req).await.context("admin request")?;
    let status = res.status();
    let bytes = res.into_body().collect().await.context("admin answer")?.to_bytes();
    driver.abort();
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        anyhow::bail!("{}", v["error"].as_str().map(str::to_owned).unwrap_or_else(|| format!("the server answered {status}")));
    }
    Ok(Some(serde_json::from_slice(&bytes).context("admin answer")?))
}

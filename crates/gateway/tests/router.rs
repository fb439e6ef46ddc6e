//! In-process router tests: every route of `src/http.rs`, called with `tower::ServiceExt::oneshot`
//! on the gateway's real router over a real `Chat` — the embedded event log, the SQLite tables,
//! the in-process routing and media on a local directory, in a temporary directory, with the
//! fan-out and projection stages running as in `chat run` — and every error path each handler
//! has, asserted by status and stable error code (docs/protocol.md §1.3, §6, §7, §9, §11–§14).
//!
//! Each test builds its own platform ([`Platform::open`]); accounts are registered only where a
//! handler reads them (password hashing is deliberately slow), and tokens are minted with the
//! platform's `Tokens` where the account does not matter.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chat_events::embedded::EmbeddedLog;
use chat_events::{ConversationId, DeviceId, EventLog, GroupId, MessageId, TopicKind, TopicSpec, Topics, UserId};
use chat_gateway::frames::ServerFrame;
use chat_gateway::media::{MediaLimits, MediaStorage};
use chat_gateway::routing::ConnRef;
use chat_gateway::service::{ConnCtx, SendCommand};
use chat_gateway::{Chat, GatewayStore, Hub, Limits, LocalRouting, Tokens};
use chat_projections::projector::projection_topics;
use chat_projections::{DeadLetters, FanOut, Projector, WorkerStats};
use chat_store::{SqliteStore, TableAdmin};
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;

const SECRET: &[u8] = b"router-test-secret-router-test-secret-0123";
const PASSWORD: &str = "correct horse battery staple";
/// Limits of the media store: small, so that "too large" is cheap; the image limit is above the
/// 64 KiB JSON body limit, to show that the latter does not apply to uploads.
const MEDIA_LIMITS: (u64, u64, u64) = (100 * 1024, 1024, 1024);

// ----- the platform -----

/// A gateway on the embedded back-ends in a temporary directory, with the worker stages running.
struct Platform {
    chat: Arc<Chat>,
    app: Router,
    dir: PathBuf,
    _stop: watch::Sender<bool>,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self._stop.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Platform {
    /// As `chat run` builds it (src/main.rs `Platform::open`, `start_gateway`, `start_stages`,
    /// `media_storage`): topics ensured, tables migrated, fan-out and projections consuming.
    async fn open(limits: Limits, media: bool) -> Platform {
        let dir = std::env::temp_dir().join(format!("chat-router-test-{}", uuid::Uuid::new_v4()));
        let topics = Topics::default();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir, 100_000).expect("embedded event log"));
        let mut specs: Vec<TopicSpec> = topics.all().into_iter().map(|name| TopicSpec { name, partitions: 2, replication: 1 }).collect();
        specs.push(TopicSpec { name: topics.dead_letters(), partitions: 1, replication: 1 });
        log.ensure_topics(&specs).await.expect("topics");
        let tables = Arc::new(SqliteStore::open(&dir).expect("embedded tables"));
        tables.migrate().await.expect("migrate");

        let (stop, stopped) = watch::channel(false);
        let dead = DeadLetters { log: log.clone(), topics: topics.clone() };
        let consumer = log.subscribe("fanout", &[topics.name(TopicKind::Conversations)]).await.expect("fan-out consumer");
        let fanout = Arc::new(FanOut::new(log.clone(), topics.clone(), tables.clone(), None, limits.max_group_size).with_committer(consumer.committer()));
        let (d, s) = (dead.clone(), stopped.clone());
        tokio::spawn(async move { chat_projections::run("fanout", consumer, fanout, d, Arc::new(WorkerStats::default()), s).await });
        let consumer = log.subscribe("projections", &projection_topics(&topics)).await.expect("projection consumer");
        let projector = Arc::new(Projector::new(tables.clone(), topics.clone(), Vec::new()));
        tokio::spawn(async move { chat_projections::run("projections", consumer, projector, dead, Arc::new(WorkerStats::default()), stopped).await });

        let hub = Arc::new(Hub::new());
        let routing = Arc::new(LocalRouting::new(hub.clone()));
        let store: Arc<dyn GatewayStore> = tables;
        let metrics = chat_gateway::metrics::Metrics::new().expect("metrics");
        let tokens = Tokens::new(SECRET, chrono::Duration::hours(1));
        let mut chat = Chat::new(log, topics, store, routing, hub, tokens, "node-1".into(), limits, metrics);
        if media {
            let media_dir = dir.join("media");
            std::fs::create_dir_all(&media_dir).expect("media directory");
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&media_dir).expect("media store");
            let (image, audio, video) = MEDIA_LIMITS;
            chat = chat.with_media(MediaStorage { store: Arc::new(fs), limits: MediaLimits { image, audio, video } });
        }
        let chat = Arc::new(chat);
        // As `chat_gateway::serve` does before it serves.
        chat.refresh_revocations().await.expect("revocations");
        let app = chat_gateway::http::router(chat.clone());
        Platform { chat, app, dir, _stop: stop }
    }

    async fn with_defaults() -> Platform {
        Platform::open(Limits::default(), true).await
    }

    /// Sends one request through the router, as the server would (with the peer's address).
    async fn send(&self, c: Call) -> Resp {
        let what = format!("{} {}", c.method, c.uri);
        let mut b = Request::builder().method(c.method).uri(&c.uri);
        if let Some(t) = &c.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in &c.headers {
            b = b.header(*k, v);
        }
        let body = match c.payload {
            Payload::None => Body::empty(),
            Payload::Json(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&v).expect("json"))
            }
            Payload::Raw(ct, bytes) => {
                if let Some(ct) = ct {
                    b = b.header(header::CONTENT_TYPE, ct);
                }
                Body::from(bytes)
            }
            Payload::Stream(body) => body,
        };
        let mut req = b.body(body).expect("request");
        req.extensions_mut().insert(ConnectInfo(SocketAddr::new(c.peer, 40_000)));
        let resp = self.app.clone().oneshot(req).await.expect("the router is infallible");
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.expect("response body");
        Resp { what, status: parts.status, headers: parts.headers, body }
    }

    /// A token of `user`, as a log-in issues it (after the user's latest ended session).
    fn token(&self, user: UserId, name: &str, roles: &[&str]) -> String {
        let after = self.chat.revocations.latest(user).unwrap_or(0);
        self.chat.tokens.issue(user, name, roles.iter().map(|r| r.to_string()).collect(), after).expect("token").0
    }

    /// A token of a user who has no account (enough wherever the account is not read).
    fn stranger(&self) -> (UserId, String) {
        let u = UserId::random();
        (u, self.token(u, "stranger", &[]))
    }

    /// Registers an account through `POST /v1/accounts`; its token is minted.
    async fn register(&self, name: &str) -> User {
        let r = self.send(post("/v1/accounts").json(json!({"username": name, "password": PASSWORD}))).await;
        r.expect_status(StatusCode::CREATED);
        let id: UserId = r.json()["user_id"].as_str().expect("user_id").parse().expect("a user id");
        User { id, token: self.token(id, name, &[]) }
    }

    /// Logs in through `POST /v1/sessions` (roles come from the store).
    async fn login(&self, name: &str) -> String {
        let r = self.send(post("/v1/sessions").json(json!({"username": name, "password": PASSWORD}))).await;
        r.expect_status(StatusCode::OK);
        r.json()["token"].as_str().expect("token").to_owned()
    }

    /// A direct message, sent as the WebSocket `send` frame does, then waited for in the tables.
    async fn message(&self, from: UserId, to: UserId, body: &str) -> MessageId {
        let ctx = ConnCtx { user: from, device: DeviceId::default_device(), conn: ConnRef { node: "node-1".into(), conn: 1 }, read_only: false };
        let cmd = SendCommand {
            r#ref: None,
            client_msg_id: uuid::Uuid::new_v4().to_string(),
            to: Some(to.to_string()),
            conversation_id: None,
            kind: None,
            body: body.into(),
            media_id: None,
            metadata: None,
            retry: false,
            reply_to: None,
            mentions: None,
        };
        let id = match self.chat.send(&ctx, cmd).await {
            Ok(ServerFrame::Sent { message_id, .. }) => message_id,
            other => panic!("send: {other:?}"),
        };
        let store = self.chat.store.clone();
        eventually("the message to be projected", || {
            let store = store.clone();
            async move { store.find_message(id).await.ok().flatten().is_some() }
        })
        .await;
        id
    }

    /// Waits until `user` is an active member of `conv` in the group projection.
    async fn member_projected(&self, conv: &ConversationId, user: UserId) {
        let store = self.chat.store.clone();
        eventually("the group membership to be projected", || {
            let (store, conv) = (store.clone(), conv.clone());
            async move { store.group_member(&conv, user).await.ok().flatten().is_some_and(|m| m.active) }
        })
        .await;
    }
}

struct User {
    id: UserId,
    token: String,
}

async fn eventually<F: FnMut() -> Fut, Fut: Future<Output = bool>>(what: &str, mut ready: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----- requests and answers -----

enum Payload {
    None,
    /// With `Content-Type: application/json`.
    Json(Value),
    /// Raw bytes with an optional content type.
    Raw(Option<&'static str>, Vec<u8>),
    Stream(Body),
}

struct Call {
    method: Method,
    uri: String,
    token: Option<String>,
    headers: Vec<(&'static str, String)>,
    payload: Payload,
    peer: IpAddr,
}

fn call(method: Method, uri: impl Into<String>) -> Call {
    Call { method, uri: uri.into(), token: None, headers: Vec::new(), payload: Payload::None, peer: IpAddr::V4(Ipv4Addr::LOCALHOST) }
}

fn get(uri: impl Into<String>) -> Call {
    call(Method::GET, uri)
}

fn post(uri: impl Into<String>) -> Call {
    call(Method::POST, uri)
}

fn method(m: &str) -> Method {
    m.parse().expect("method")
}

impl Call {
    fn auth(mut self, token: &str) -> Call {
        self.token = Some(token.to_owned());
        self
    }

    fn header(mut self, k: &'static str, v: impl Into<String>) -> Call {
        self.headers.push((k, v.into()));
        self
    }

    fn json(mut self, v: Value) -> Call {
        self.payload = Payload::Json(v);
        self
    }

    fn raw(mut self, content_type: Option<&'static str>, bytes: impl Into<Vec<u8>>) -> Call {
        self.payload = Payload::Raw(content_type, bytes.into());
        self
    }

    fn stream(mut self, body: Body) -> Call {
        self.payload = Payload::Stream(body);
        self
    }

    fn peer(mut self, ip: [u8; 4]) -> Call {
        self.peer = IpAddr::from(ip);
        self
    }

    /// A table row: this call must answer `status` with the error `code`.
    fn is(self, status: u16, code: &'static str) -> Case {
        Case { call: self, status: StatusCode::from_u16(status).expect("status"), code }
    }
}

struct Case {
    call: Call,
    status: StatusCode,
    code: &'static str,
}

struct Resp {
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{}: body is not JSON ({e}): {:?}", self.what, String::from_utf8_lossy(&self.body)))
    }

    #[track_caller]
    fn expect_status(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{}: {:?}", self.what, String::from_utf8_lossy(&self.body));
    }

    /// Why this is not the error `status`/`code` in the documented format, if it is not.
    fn mismatch(&self, status: StatusCode, code: &str) -> Option<String> {
        let got = || format!("{}: expected {status} `{code}`, got {} {:?}", self.what, self.status, String::from_utf8_lossy(&self.body));
        if self.status != status {
            return Some(got());
        }
        let json_type = self.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
        let Ok(v) = serde_json::from_slice::<Value>(&self.body) else { return Some(format!("{} (not a JSON body)", got())) };
        let message_ok = v["error"]["message"].as_str().is_some_and(|m| !m.is_empty());
        if !json_type || v["error"]["code"] != code || !message_ok {
            return Some(format!("{} (JSON content type: {json_type})", got()));
        }
        if code == "rate_limited" {
            let secs = v["error"]["retry_after"].as_u64().unwrap_or(0);
            let header = self.headers.get(header::RETRY_AFTER).and_then(|h| h.to_str().ok()).and_then(|h| h.parse::<u64>().ok());
            if secs == 0 || header != Some(secs) {
                return Some(format!("{}: rate_limited without a matching retry_after ({secs}) and Retry-After ({header:?})", self.what));
            }
        }
        None
    }
}

/// Runs the cases in order and fails with every mismatch at once.
async fn check(p: &Platform, cases: Vec<Case>) {
    let mut failures = Vec::new();
    let n = cases.len();
    for c in cases {
        let r = p.send(c.call).await;
        failures.extend(r.mismatch(c.status, c.code));
    }
    assert!(failures.is_empty(), "{} of {n} cases failed:\n{}", failures.len(), failures.join("\n"));
}

// ----- the routes -----

/// Every route of src/http.rs: its path and, per method, whether it takes a bearer token.
/// `every_route_of_the_router_is_in_the_table` keeps this in step with the source.
const ROUTES: &[(&str, &[(&str, bool)])] = &[
    ("/healthz", &[("GET", false)]),
    ("/readyz", &[("GET", false)]),
    ("/metrics", &[("GET", false)]),
    ("/v1/openapi.json", &[("GET", false)]),
    ("/v1/accounts", &[("POST", false)]),
    ("/v1/sessions", &[("POST", false), ("DELETE", true)]),
    ("/v1/users/by-username/{username}", &[("GET", true)]),
    ("/v1/users/{user_id}/last-seen", &[("GET", true)]),
    ("/v1/privacy", &[("GET", true), ("PUT", true)]),
    ("/v1/blocks", &[("GET", true)]),
    ("/v1/blocks/{user_id}", &[("PUT", true), ("DELETE", true)]),
    ("/v1/conversations", &[("GET", true)]),
    ("/v1/conversations/{conversation_id}/messages", &[("GET", true)]),
    ("/v1/messages/{message_id}/receipts", &[("GET", true)]),
    ("/v1/search", &[("GET", true)]),
    ("/v1/groups", &[("POST", true), ("GET", true)]),
    ("/v1/groups/{conversation_id}", &[("GET", true), ("PATCH", true)]),
    ("/v1/groups/{conversation_id}/members", &[("POST", true)]),
    ("/v1/groups/{conversation_id}/members/{user_id}", &[("DELETE", true)]),
    ("/v1/media", &[("POST", true)]),
    ("/v1/media/{media_id}", &[("GET", true)]),
    ("/v1/profile", &[("PUT", true)]),
    ("/v1/users/{user_id}/profile", &[("GET", true)]),
    ("/v1/analytics/messages", &[("GET", true)]),
    ("/v1/analytics/active-users", &[("GET", true)]),
    ("/v1/analytics/profile-views", &[("GET", true)]),
    ("/v1/analytics/topics", &[("GET", true)]),
    ("/v1/audit/messages/{message_id}/receipts", &[("GET", true)]),
    ("/v1/audit/messages/{message_id}/edits", &[("GET", true)]),
    ("/v1/audit/users/{user_id}/receipts", &[("GET", true)]),
    ("/v1/audit/metrics/daily", &[("GET", true)]),
    ("/v1/ws", &[("GET", true)]),
    // Only with `Limits::ws_echo`.
    ("/v1/ws/echo", &[("GET", false)]),
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A concrete path for a route template (ids that name nothing).
fn concrete(template: &str) -> String {
    template
        .replace("{username}", "nobody")
        .replace("{user_id}", &UserId::random().to_string())
        .replace("{conversation_id}", &ConversationId::group(GroupId::random()).to_string())
        .replace("{message_id}", &uuid::Uuid::new_v4().to_string())
        .replace("{media_id}", &uuid::Uuid::new_v4().to_string())
}

/// Every bearer (method, path) of the router.
fn bearer_routes() -> Vec<(Method, String)> {
    ROUTES
        .iter()
        .flat_map(|(path, ms)| ms.iter().filter(|(_, bearer)| *bearer).map(move |(m, _)| (method(m), concrete(path))))
        .collect()
}

#[test]
fn every_route_of_the_router_is_in_the_table() {
    let src = include_str!("../src/http.rs");
    let mut in_source = BTreeSet::new();
    for line in src.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        let Some(at) = line.find(".route(\"") else { continue };
        let rest = &line[at + ".route(\"".len()..];
        let (path, tail) = rest.split_once('"').expect("a path literal");
        for m in METHODS {
            let needle = format!("{}(", m.to_ascii_lowercase());
            let served = tail.match_indices(&needle).any(|(i, _)| i == 0 || !tail.as_bytes()[i - 1].is_ascii_alphanumeric() && tail.as_bytes()[i - 1] != b'_');
            if served {
                in_source.insert((path.to_owned(), m.to_string()));
            }
        }
    }
    let in_table: BTreeSet<(String, String)> =
        ROUTES.iter().flat_map(|(path, ms)| ms.iter().map(move |(m, _)| (path.to_string(), m.to_string()))).collect();
    assert!(in_source.len() >= 30, "the route scan of http.rs found only {in_source:?}");
    assert_eq!(in_source, in_table, "ROUTES must list exactly the routes and methods of src/http.rs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let p = Platform::open(Limits { ws_echo: true, ..Limits::default() }, true).await;
    let (_, token) = p.stranger();
    let mut cases = Vec::new();
    for path in ["/", "/v1", "/v1/", "/v2/accounts", "/v1/nope", "/v1/accounts/", "/v1/accounts/extra", "/v1/users/by-username/", "/v1/groups/g/members/u/extra", "/healthz/x"] {
        cases.push(get(path).is(404, "not_found"));
        cases.push(post(path).auth(&token).json(json!({})).is(404, "not_found"));
    }
    for (path, served) in ROUTES {
        for m in METHODS.iter().filter(|m| !served.iter().any(|(s, _)| s == *m)) {
            // No token: the method is refused before anything else.
            cases.push(call(method(m), concrete(path)).is(405, "method_not_allowed"));
        }
    }
    check(&p, cases).await;

    // The echo route exists only when configured; without it, the path is unknown.
    let off = Platform::open(Limits::default(), false).await;
    check(&off, vec![get("/v1/ws/echo").is(404, "not_found"), post("/v1/ws/echo").is(404, "not_found")]).await;
    // With it: not an upgrade → `invalid_upgrade`.
    check(&p, vec![get("/v1/ws/echo").is(400, "invalid_upgrade")]).await;
    // The unauthenticated routes answer (their only error paths are the ones above).
    p.send(get("/readyz")).await.expect_status(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_routes_refuse_missing_invalid_expired_and_ended_tokens() {
    let p = Platform::with_defaults().await;
    let user = UserId::random();
    let valid = p.token(user, "someone", &[]);
    let expired = Tokens::new(SECRET, chrono::Duration::seconds(-60)).issue(user, "someone", Vec::new(), 0).expect("token").0;
    let foreign = Tokens::new(b"another-secret-another-secret-another-1234", chrono::Duration::hours(1)).issue(user, "someone", Vec::new(), 0).expect("token").0;
    let mut tampered = valid.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");

    let routes = bearer_routes();
    assert!(routes.len() >= 24, "{routes:?}");
    let mut cases = Vec::new();
    for (m, path) in &routes {
        let c = || call(m.clone(), path.clone());
        cases.push(c().is(401, "unauthorized"));
        cases.push(c().auth("not-a-token").is(401, "unauthorized"));
        cases.push(c().auth("").is(401, "unauthorized"));
        cases.push(c().auth(&expired).is(401, "unauthorized"));
        cases.push(c().auth(&foreign).is(401, "unauthorized"));
        cases.push(c().auth(&tampered).is(401, "unauthorized"));
        cases.push(c().header("authorization", format!("Basic {valid}")).is(401, "unauthorized"));
        cases.push(c().header("authorization", valid.clone()).is(401, "unauthorized"));
    }
    check(&p, cases).await;

    // Log-out everywhere ends the token it was called with, and every earlier one, at once.
    let earlier = valid;
    let current = p.token(user, "someone", &[]);
    p.send(get("/v1/conversations").auth(&current)).await.expect_status(StatusCode::OK);
    p.send(call(Method::DELETE, "/v1/sessions").auth(&current)).await.expect_status(StatusCode::NO_CONTENT);
    let mut cases = Vec::new();
    for (m, path) in &routes {
        cases.push(call(m.clone(), path.clone()).auth(&current).is(401, "session_ended"));
        cases.push(call(m.clone(), path.clone()).auth(&earlier).is(401, "session_ended"));
    }
    cases.push(get("/v1/ws?access_token=".to_owned() + &current).is(401, "session_ended"));
    check(&p, cases).await;
    // A log-in after the end is a new session.
    let fresh = p.token(user, "someone", &[]);
    p.send(get("/v1/conversations").auth(&fresh)).await.expect_status(StatusCode::OK);

    // A role change ends the sessions through the store (as `chat role` does), seen by every
    // node at its next read of the revocations.
    let other = UserId::random();
    let before = p.token(other, "other", &[]);
    p.send(get("/v1/groups").auth(&before)).await.expect_status(StatusCode::OK);
    p.chat.store.set_role(other, "analyst", true).await.expect("set role");
    p.chat.store.revoke_sessions(other, chrono::Utc::now()).await.expect("revoke");
    p.chat.refresh_revocations().await.expect("refresh");
    check(&p, vec![get("/v1/groups").auth(&before).is(401, "session_ended"), get("/v1/analytics/messages").auth(&before).is(401, "session_ended")]).await;
}

/// Every route with a JSON body: its path (with ids that name nothing), a body of the right
/// shape, the same fields as an array, and whether it needs a token.
fn json_routes() -> Vec<(Method, String, Value, Value, bool)> {
    let group = ConversationId::group(GroupId::random()).to_string();
    let someone = UserId::random().to_string();
    vec![
        (Method::POST, "/v1/accounts".into(), json!({"username": "zed", "password": PASSWORD}), json!(["zed", PASSWORD]), false),
        (Method::POST, "/v1/sessions".into(), json!({"username": "zed", "password": PASSWORD}), json!(["zed", PASSWORD]), false),
        (Method::POST, "/v1/groups".into(), json!({"name": "climbers", "members": []}), json!(["climbers", []]), true),
        (Method::PATCH, format!("/v1/groups/{group}"), json!({"name": "boulderers"}), json!(["boulderers"]), true),
        (Method::POST, format!("/v1/groups/{group}/members"), json!({"user_id": someone, "role": "member"}), json!([someone, "member"]), true),
        (Method::PUT, "/v1/profile".into(), json!({"display_name": "Zed"}), json!(["Zed"]), true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_checked_first() {
    let p = Platform::with_defaults().await;
    let (_, token) = p.stranger();
    let auditor = p.token(UserId::random(), "auditor", &["auditor"]);
    let mut cases = Vec::new();
    for (m, path, good, array, bearer) in json_routes() {
        let c = || {
            let c = call(m.clone(), path.clone());
            if bearer {
                c.auth(&token)
            } else {
                c
            }
        };
        let good_bytes = serde_json::to_vec(&good).expect("json");
        let mut unknown = good.clone();
        unknown["extra"] = json!(1);
        let mut wrong_type = good.clone();
        let first = good.as_object().and_then(|o| o.keys().next().cloned()).expect("a field");
        wrong_type[&first] = json!(42);
        let mut big = good.clone();
        big[&first] = json!("x".repeat(70 * 1024));
        cases.extend([
            c().raw(None, good_bytes.clone()).is(415, "unsupported_media_type"),
            c().raw(Some("text/plain"), good_bytes.clone()).is(415, "unsupported_media_type"),
            c().raw(Some("application/x-www-form-urlencoded"), "name=x").is(415, "unsupported_media_type"),
            c().raw(Some("application/json"), "{\"name\":").is(400, "invalid_json"),
            c().raw(Some("application/json"), "").is(400, "invalid_json"),
            c().raw(Some("application/json"), [&good_bytes[..], b" trailing"].concat()).is(400, "invalid_json"),
            c().json(array).is(400, "invalid_json"),
            c().json(json!("a string")).is(400, "invalid_json"),
            c().json(Value::Null).is(400, "invalid_json"),
            c().json(unknown).is(400, "invalid_json"),
            c().json(json!({})).is(400, "invalid_json"),
            c().json(wrong_type).is(400, "invalid_json"),
            // The first field given twice (with the same value): refused, as in frames.
            c().raw(Some("application/json"), [format!("{{\"{first}\":{},", good[&first]).as_bytes(), &good_bytes[1..]].concat()).is(400, "invalid_json"),
            c().json(big).is(413, "body_too_large"),
            c().raw(Some("application/json"), vec![b' '; 65 * 1024]).is(413, "body_too_large"),
        ]);
        if bearer {
            // An auditor's body errors come before the 403 of a write.
            cases.push(call(m.clone(), path.clone()).auth(&auditor).raw(Some("application/json"), "[").is(400, "invalid_json"));
            cases.push(call(m.clone(), path.clone()).auth(&auditor).raw(None, good_bytes).is(415, "unsupported_media_type"));
        }
    }
    check(&p, cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_log_in() {
    let limits = Limits { login_failures_per_account: 2, login_failures_per_address: 3, registrations_per_address: 2, ..Limits::default() };
    let p = Platform::open(limits, false).await;
    let reg = |name: &str, password: &str| post("/v1/accounts").json(json!({"username": name, "password": password}));
    let login = |name: &str, password: &str| post("/v1/sessions").json(json!({"username": name, "password": password}));

    // Refused before any hashing (and before the per-address count).
    check(
        &p,
        vec![
            reg("ab", PASSWORD).is(400, "invalid_username"),
            reg("", PASSWORD).is(400, "invalid_username"),
            reg(&"a".repeat(33), PASSWORD).is(400, "invalid_username"),
            reg("bad name", PASSWORD).is(400, "invalid_username"),
            reg("émile", PASSWORD).is(400, "invalid_username"),
            reg("semi;colon", PASSWORD).is(400, "invalid_username"),
            reg("shorty", "short").is(400, "invalid_password"),
            // Characters, not bytes: 7 characters in 14 bytes.
            reg("shorty", "ééééééé").is(400, "invalid_password"),
            reg("longer", &"x1Y".repeat(43)).is(400, "invalid_password"),
            reg("weakling", "password").is(400, "weak_password"),
            reg("weakling", "12345678").is(400, "weak_password"),
            reg("weakling", "        ").is(400, "weak_password"),
            reg("weakling", "qwertyuiop").is(400, "weak_password"),
            reg("quentin_99", "quentin_99").is(400, "weak_password"),
            // The username is checked first.
            reg("x", "password").is(400, "invalid_username"),
        ],
    )
    .await;

    // Registrations per address (2 per hour here): the second takes the slot even though the
    // name is taken (compared case-insensitively); the third is refused.
    p.send(reg("alice", PASSWORD).peer([10, 0, 1, 1])).await.expect_status(StatusCode::CREATED);
    check(
        &p,
        vec![
            reg("ALICE", PASSWORD).peer([10, 0, 1, 1]).is(409, "username_taken"),
            reg("carl", PASSWORD).peer([10, 0, 1, 1]).is(429, "rate_limited"),
            // Invalid input is still answered as such.
            reg("x", PASSWORD).peer([10, 0, 1, 1]).is(400, "invalid_username"),
        ],
    )
    .await;

    // Log-in: unknown user and wrong password look the same; 2 failures per account, then even the
    // right password is refused for that name, from any address.
    p.send(login("Alice", PASSWORD).peer([10, 0, 2, 1])).await.expect_status(StatusCode::OK);
    check(
        &p,
        vec![
            login("nobody", PASSWORD).peer([10, 0, 2, 1]).is(401, "invalid_credentials"),
            login("alice", "wrong password here").peer([10, 0, 2, 1]).is(401, "invalid_credentials"),
            login("alice", "").peer([10, 0, 2, 2]).is(401, "invalid_credentials"),
            login("alice", PASSWORD).peer([10, 0, 2, 3]).is(429, "rate_limited"),
            login("ALICE", "wrong again").peer([10, 0, 2, 4]).is(429, "rate_limited"),
        ],
    )
    .await;

    // Failures per address (3 here), whatever the names; other addresses are not limited.
    check(
        &p,
        vec![
            login("n1", "whatever pass").peer([10, 0, 3, 1]).is(401, "invalid_credentials"),
            login("n2", "whatever pass").peer([10, 0, 3, 1]).is(401, "invalid_credentials"),
            login("n3", "whatever pass").peer([10, 0, 3, 1]).is(401, "invalid_credentials"),
            login("n4", "whatever pass").peer([10, 0, 3, 1]).is(429, "rate_limited"),
            login("n4", "whatever pass").peer([10, 0, 3, 2]).is(401, "invalid_credentials"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_messages_people_and_profiles() {
    let p = Platform::with_defaults().await;
    let (alice, bob, carol) = (p.register("alice").await, p.register("bob").await, p.register("carol").await);
    let m = p.message(alice.id, bob.id, "hello bob").await;
    let ab = ConversationId::direct(alice.id, bob.id).to_string();
    let bc = ConversationId::direct(bob.id, carol.id).to_string();
    let unknown_group = ConversationId::group(GroupId::random()).to_string();
    let nobody = UserId::random();
    let unknown = uuid::Uuid::new_v4();

    // The controls: what the members see.
    p.send(get(format!("/v1/conversations/{ab}/messages")).auth(&bob.token)).await.expect_status(StatusCode::OK);
    p.send(get(format!("/v1/messages/{m}/receipts")).auth(&alice.token)).await.expect_status(StatusCode::OK);
    p.send(get(format!("/v1/users/{}/last-seen", alice.id)).auth(&alice.token)).await.expect_status(StatusCode::OK);
    p.send(get("/v1/users/by-username/ALICE").auth(&carol.token)).await.expect_status(StatusCode::OK);
    p.send(get(format!("/v1/users/{}/profile", alice.id)).auth(&carol.token)).await.expect_status(StatusCode::OK);

    let history = |conv: &str, q: &str, t: &str| get(format!("/v1/conversations/{conv}/messages{q}")).auth(t);
    check(
        &p,
        vec![
            // History: not a member, unknown or malformed ids are one answer.
            history(&ab, "", &carol.token).is(404, "not_found"),
            history(&bc, "", &alice.token).is(404, "not_found"),
            history(&unknown_group, "", &alice.token).is(404, "not_found"),
            history("garbage", "", &alice.token).is(404, "not_found"),
            history("d.x.y", "", &alice.token).is(404, "not_found"),
            history(&format!("d.{}.{}", alice.id, alice.id), "", &alice.token).is(404, "not_found"),
            history(&ab, "?limit=abc", &alice.token).is(400, "invalid_limit"),
            history(&ab, "?limit=1&limit=2", &alice.token).is(400, "invalid_query"),
            history(&ab, "?limit=%FF", &alice.token).is(400, "invalid_query"),
            history(&ab, "?limit=-1", &alice.token).is(400, "invalid_limit"),
            history(&ab, "?limit=1.5", &alice.token).is(400, "invalid_limit"),
            history(&ab, "?limit=", &alice.token).is(400, "invalid_limit"),
            history(&ab, "?before=not-a-cursor", &alice.token).is(400, "invalid_cursor"),
            history(&ab, "?before=&limit=2", &alice.token).is(400, "invalid_cursor"),
            // Receipts: a message of someone else's conversation is not found, like an unknown one.
            get(format!("/v1/messages/{m}/receipts")).auth(&carol.token).is(404, "not_found"),
            get(format!("/v1/messages/{unknown}/receipts")).auth(&alice.token).is(404, "not_found"),
            get("/v1/messages/not-a-uuid/receipts").auth(&alice.token).is(404, "not_found"),
            // Last seen: only oneself and contacts (both wrote); one way is not enough.
            get(format!("/v1/users/{}/last-seen", bob.id)).auth(&alice.token).is(404, "not_found"),
            get(format!("/v1/users/{}/last-seen", alice.id)).auth(&bob.token).is(404, "not_found"),
            get(format!("/v1/users/{}/last-seen", alice.id)).auth(&carol.token).is(404, "not_found"),
            get(format!("/v1/users/{nobody}/last-seen")).auth(&alice.token).is(404, "not_found"),
            get("/v1/users/not-a-uuid/last-seen").auth(&alice.token).is(404, "not_found"),
            // Look-up and profiles of users that do not exist.
            get("/v1/users/by-username/nobody").auth(&alice.token).is(404, "not_found"),
            get("/v1/users/by-username/bad%20name").auth(&alice.token).is(404, "not_found"),
            get(format!("/v1/users/{nobody}/profile")).auth(&alice.token).is(404, "not_found"),
            get("/v1/users/not-a-uuid/profile").auth(&alice.token).is(404, "not_found"),
        ],
    )
    .await;

    // Once both wrote, they are contacts: the 404 above was the rule, not a failure.
    p.message(bob.id, alice.id, "hi alice").await;
    let store = p.chat.store.clone();
    let (a, b) = (alice.id, bob.id);
    eventually("both inbox rows to say they wrote", || {
        let store = store.clone();
        let conv = ConversationId::direct(a, b);
        async move { store.inbox_rows(&[(a, conv.clone()), (b, conv)]).await.is_ok_and(|r| r.iter().all(|r| r.as_ref().is_some_and(|r| r.wrote))) }
    })
    .await;
    p.send(get(format!("/v1/users/{}/last-seen", bob.id)).auth(&alice.token)).await.expect_status(StatusCode::OK);
    check(&p, vec![get(format!("/v1/users/{}/last-seen", bob.id)).auth(&carol.token).is(404, "not_found")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rules() {
    let p = Platform::open(Limits { max_group_size: 3, ..Limits::default() }, false).await;
    let (alice, bob, carol, dave) = (p.register("alice").await, p.register("bob").await, p.register("carol").await, p.register("dave").await);
    let create = |t: &str, body: Value| post("/v1/groups").auth(t).json(body);

    // g1: alice (admin) and bob; g2: alice, bob and carol (full at 3).
    let r = p.send(create(&alice.token, json!({"name": "  g1  ", "members": [bob.id]}))).await;
    r.expect_status(StatusCode::CREATED);
    let g1: ConversationId = r.json()["conversation_id"].as_str().expect("id").parse().expect("conversation id");
    let r = p.send(create(&alice.token, json!({"name": "g2", "members": [bob.id, carol.id]}))).await;
    r.expect_status(StatusCode::CREATED);
    let g2: ConversationId = r.json()["conversation_id"].as_str().expect("id").parse().expect("conversation id");
    p.member_projected(&g1, bob.id).await;
    p.member_projected(&g2, carol.id).await;
    // The creator and repeated ids are dropped before the size is checked: 3 with the creator.
    p.send(create(&alice.token, json!({"name": "g3", "members": [bob.id, carol.id, alice.id, bob.id]}))).await.expect_status(StatusCode::CREATED);
    p.send(get(format!("/v1/groups/{g1}")).auth(&bob.token)).await.expect_status(StatusCode::OK);
    let store = p.chat.store.clone();
    let (conv, b) = (g1.clone(), bob.id);
    eventually("bob's membership interval to be projected", || {
        let (store, conv) = (store.clone(), conv.clone());
        async move { store.user_group_intervals(b, &conv).await.is_ok_and(|i| !i.is_empty()) }
    })
    .await;

    let unknown = ConversationId::group(GroupId::random()).to_string();
    let direct = ConversationId::direct(alice.id, bob.id).to_string();
    let nobody = UserId::random().to_string();
    let info = |g: &str, t: &str| get(format!("/v1/groups/{g}")).auth(t);
    let rename = |g: &str, t: &str, name: &str| call(Method::PATCH, format!("/v1/groups/{g}")).auth(t).json(json!({"name": name}));
    let add = |g: &str, t: &str, body: Value| post(format!("/v1/groups/{g}/members")).auth(t).json(body);
    let remove = |g: &str, u: &str, t: &str| call(Method::DELETE, format!("/v1/groups/{g}/members/{u}")).auth(t);
    let (g1, g2) = (g1.to_string(), g2.to_string());
    let (a, b, c, d) = (alice.id.to_string(), bob.id.to_string(), carol.id.to_string(), dave.id.to_string());
    check(
        &p,
        vec![
            // Create.
            create(&alice.token, json!({"name": ""})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "   "})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "x".repeat(101)})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "evil\u{202E}txt"})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "zero\u{200B}width"})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "", "members": ["nope"]})).is(400, "invalid_name"),
            create(&alice.token, json!({"name": "g", "members": ["nope"]})).is(400, "unknown_user"),
            create(&alice.token, json!({"name": "g", "members": [nobody]})).is(400, "unknown_user"),
            create(&alice.token, json!({"name": "g", "members": [b, c, d]})).is(400, "group_full"),
            // The size before the accounts.
            create(&alice.token, json!({"name": "g", "members": [UserId::random(), UserId::random(), UserId::random()]})).is(400, "group_full"),
            // Read: not a member, unknown, direct or malformed ids are one answer.
            info(&g1, &carol.token).is(404, "not_found"),
            info(&unknown, &alice.token).is(404, "not_found"),
            info(&direct, &alice.token).is(404, "not_found"),
            info("garbage", &alice.token).is(404, "not_found"),
            info("g.not-a-uuid", &alice.token).is(404, "not_found"),
            get(format!("/v1/conversations/{g1}/messages")).auth(&carol.token).is(404, "not_found"),
            get(format!("/v1/conversations/{unknown}/messages")).auth(&alice.token).is(404, "not_found"),
            get(format!("/v1/conversations/{g1}/messages?before=nope")).auth(&bob.token).is(400, "invalid_cursor"),
            // Rename: 404, then 403, then the name.
            rename(&g1, &carol.token, "x").is(404, "not_found"),
            rename(&unknown, &alice.token, "x").is(404, "not_found"),
            rename(&direct, &alice.token, "x").is(404, "not_found"),
            rename(&g1, &bob.token, "x").is(403, "forbidden"),
            rename(&g1, &bob.token, "").is(403, "forbidden"),
            rename(&g1, &alice.token, "").is(400, "invalid_name"),
            rename(&g1, &alice.token, &"y".repeat(101)).is(400, "invalid_name"),
            // Add: 404, 403, the id, the role, the account, membership, size.
            add(&g1, &carol.token, json!({"user_id": d})).is(404, "not_found"),
            add(&unknown, &alice.token, json!({"user_id": d})).is(404, "not_found"),
            add(&direct, &alice.token, json!({"user_id": d})).is(404, "not_found"),
            add(&g1, &bob.token, json!({"user_id": d})).is(403, "forbidden"),
            add(&g1, &bob.token, json!({"user_id": "nope", "role": "owner"})).is(403, "forbidden"),
            add(&g1, &alice.token, json!({"user_id": "nope"})).is(400, "unknown_user"),
            add(&g1, &alice.token, json!({"user_id": "nope", "role": "owner"})).is(400, "unknown_user"),
            add(&g1, &alice.token, json!({"user_id": d, "role": "owner"})).is(400, "invalid_role"),
            add(&g1, &alice.token, json!({"user_id": nobody, "role": "owner"})).is(400, "invalid_role"),
            add(&g1, &alice.token, json!({"user_id": nobody})).is(400, "unknown_user"),
            add(&g1, &alice.token, json!({"user_id": b})).is(409, "already_member"),
            add(&g1, &alice.token, json!({"user_id": a, "role": "admin"})).is(409, "already_member"),
            add(&g2, &alice.token, json!({"user_id": d})).is(409, "group_full"),
            add(&g2, &alice.token, json!({"user_id": b})).is(409, "already_member"),
            // Remove or leave.
            remove("garbage", &b, &alice.token).is(404, "not_found"),
            remove(&direct, &b, &alice.token).is(404, "not_found"),
            remove(&unknown, &b, &alice.token).is(404, "not_found"),
            remove(&g1, "not-a-uuid", &alice.token).is(404, "not_found"),
            remove(&g1, &c, &carol.token).is(404, "not_found"),
            remove(&g1, &b, &carol.token).is(404, "not_found"),
            remove(&g1, &a, &bob.token).is(403, "forbidden"),
            remove(&g1, &c, &bob.token).is(403, "forbidden"),
            remove(&g1, &c, &alice.token).is(404, "not_found"),
            remove(&g1, &nobody, &alice.token).is(404, "not_found"),
        ],
    )
    .await;
    // The controls: the same commands by the right people are accepted.
    p.send(rename(&g1, &alice.token, "renamed")).await.expect_status(StatusCode::ACCEPTED);
    p.send(add(&g1, &alice.token, json!({"user_id": d}))).await.expect_status(StatusCode::ACCEPTED);
    p.send(remove(&g1, &b, &bob.token)).await.expect_status(StatusCode::ACCEPTED);
}

fn png(len: usize) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D, b'I', b'H', b'D', b'R'];
    v.resize(len.max(v.len()), 0);
    v
}

fn flac(len: usize) -> Vec<u8> {
    let mut v = b"fLaC\0\0\0\x22".to_vec();
    v.resize(len.max(v.len()), 0);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_uploads_downloads_and_avatars() {
    let p = Platform::with_defaults().await;
    let (_, alice_token) = p.stranger();
    let (_, bob_token) = p.stranger();
    let upload = |q: &str, t: &str, bytes: Vec<u8>| post(format!("/v1/media{q}")).auth(t).raw(Some("application/octet-stream"), bytes);

    let r = p.send(upload("?kind=image", &alice_token, png(16))).await;
    r.expect_status(StatusCode::CREATED);
    let alice_image = r.json()["media_id"].as_str().expect("media id").to_owned();
    let r = p.send(upload("?kind=audio", &alice_token, flac(64))).await;
    r.expect_status(StatusCode::CREATED);
    let alice_audio = r.json()["media_id"].as_str().expect("media id").to_owned();
    let r = p.send(upload("?kind=image", &bob_token, png(32))).await;
    r.expect_status(StatusCode::CREATED);
    let bob_image = r.json()["media_id"].as_str().expect("media id").to_owned();
    p.send(get(format!("/v1/media/{alice_image}")).auth(&alice_token)).await.expect_status(StatusCode::OK);

    let interrupted = {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(png(4096))), Err(std::io::Error::other("connection reset"))];
        Body::from_stream(futures::stream::iter(chunks))
    };
    let (image_limit, audio_limit, _) = MEDIA_LIMITS;
    let download = |id: &str, t: &str| get(format!("/v1/media/{id}")).auth(t);
    let profile = |t: &str, body: Value| call(Method::PUT, "/v1/profile").auth(t).json(body);
    check(
        &p,
        vec![
            // Upload.
            upload("", &alice_token, png(16)).is(400, "invalid_kind"),
            upload("?kind=", &alice_token, png(16)).is(400, "invalid_kind"),
            upload("?kind=text", &alice_token, png(16)).is(400, "invalid_kind"),
            upload("?kind=document", &alice_token, png(16)).is(400, "invalid_kind"),
            upload("?kinds=image", &alice_token, png(16)).is(400, "invalid_kind"),
            upload("?kind=image", &alice_token, Vec::new()).is(400, "empty_upload"),
            // Over the kind's limit; the image limit is above the 64 KiB of JSON bodies.
            upload("?kind=image", &alice_token, png(image_limit as usize + 1)).is(413, "media_too_large"),
            upload("?kind=audio", &alice_token, flac(audio_limit as usize + 1)).is(413, "media_too_large"),
            // The bytes must be of the declared kind (small, and refused after the first 8 KiB).
            upload("?kind=audio", &alice_token, png(16)).is(415, "unsupported_media"),
            upload("?kind=video", &alice_token, png(16)).is(415, "unsupported_media"),
            upload("?kind=image", &alice_token, flac(64)).is(415, "unsupported_media"),
            upload("?kind=image", &alice_token, b"just some text, not an image at all".to_vec()).is(415, "unsupported_media"),
            upload("?kind=image", &alice_token, vec![b'x'; 20 * 1024]).is(415, "unsupported_media"),
            post("/v1/media?kind=image").auth(&alice_token).stream(interrupted).is(400, "upload_interrupted"),
            // Download: someone else's upload, unknown and malformed ids are one answer.
            download(&alice_image, &bob_token).is(404, "not_found"),
            download(&alice_audio, &bob_token).is(404, "not_found"),
            download(&uuid::Uuid::new_v4().to_string(), &alice_token).is(404, "not_found"),
            download("not-a-uuid", &alice_token).is(404, "not_found"),
            // Profile.
            profile(&alice_token, json!({"display_name": ""})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "   "})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "x".repeat(65)})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "evil\u{202E}txt"})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "tab\there"})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "", "avatar_media_id": "nope"})).is(400, "invalid_display_name"),
            profile(&alice_token, json!({"display_name": "Alice", "avatar_media_id": "nope"})).is(400, "unknown_media"),
            profile(&alice_token, json!({"display_name": "Alice", "avatar_media_id": uuid::Uuid::new_v4()})).is(400, "unknown_media"),
            profile(&alice_token, json!({"display_name": "Alice", "avatar_media_id": bob_image})).is(400, "unknown_media"),
            profile(&alice_token, json!({"display_name": "Alice", "avatar_media_id": alice_audio})).is(400, "media_kind_mismatch"),
        ],
    )
    .await;

    // A range that cannot be served: 416 with the size, no body.
    for range in ["bytes=16-", "bytes=100-200", "bytes=9-3", "bytes=-0", "bytes=x-1"] {
        let r = p.send(download(&alice_image, &alice_token).header("range", range)).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()), Some("bytes */16"), "{range}");
        assert!(r.body.is_empty(), "{range}");
    }
    // Nothing refused was kept: only the three uploads are in the store.
    let kept = std::fs::read_dir(p.dir.join("media").join("media")).expect("media objects").count();
    assert_eq!(kept, 3, "refused uploads left objects behind");

    // Without media storage: the kind is checked first, then `media_unavailable`.
    let bare = Platform::open(Limits::default(), false).await;
    let (_, t) = bare.stranger();
    check(
        &bare,
        vec![
            upload("?kind=bogus", &t, png(16)).is(400, "invalid_kind"),
            upload("?kind=image", &t, png(16)).is(503, "media_unavailable"),
            download(&uuid::Uuid::new_v4().to_string(), &t).is(404, "not_found"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_analytics_and_audit() {
    let p = Platform::with_defaults().await;
    let plain = p.register("plain").await;
    let analyst_user = p.register("analyst").await;
    let auditor_user = p.register("auditor").await;
    p.chat.store.set_role(analyst_user.id, "analyst", true).await.expect("role");
    p.chat.store.set_role(auditor_user.id, "auditor", true).await.expect("role");
    // Roles are read at log-in.
    let analyst = p.login("analyst").await;
    let auditor = p.login("auditor").await;
    p.send(get("/v1/analytics/messages").auth(&analyst)).await.expect_status(StatusCode::OK);
    p.send(get("/v1/audit/metrics/daily").auth(&auditor)).await.expect_status(StatusCode::OK);

    let analytics = ["/v1/analytics/messages", "/v1/analytics/active-users", "/v1/analytics/profile-views", "/v1/analytics/topics"];
    let user = format!("user={}", plain.id);
    let mut cases = Vec::new();
    for path in analytics {
        let q = |extra: &str| {
            let sep = if path.ends_with("profile-views") { format!("?{user}&") } else { "?".to_owned() };
            format!("{path}{sep}{extra}")
        };
        cases.extend([
            get(path).auth(&plain.token).is(403, "forbidden"),
            get(path).auth(&auditor).is(403, "forbidden"),
            // The role before the parameters.
            get(q("from=bad")).auth(&plain.token).is(403, "forbidden"),
            get(q("from=bad")).auth(&analyst).is(400, "invalid_date"),
            get(q("to=2024-02-30")).auth(&analyst).is(400, "invalid_date"),
            get(q("from=2024-05-01T00:00:00Z")).auth(&analyst).is(400, "invalid_date"),
            get(q("from=2024-05-02&to=2024-05-01")).auth(&analyst).is(400, "invalid_range"),
            // 367 days, both ends included.
            get(q("from=2023-01-01&to=2024-01-02")).auth(&analyst).is(400, "invalid_range"),
        ]);
    }
    cases.extend([
        get("/v1/analytics/profile-views").auth(&analyst).is(400, "invalid_user"),
        get("/v1/analytics/profile-views?user=nope").auth(&analyst).is(400, "invalid_user"),
        // The dates before the user.
        get("/v1/analytics/profile-views?user=nope&from=bad").auth(&analyst).is(400, "invalid_date"),
    ]);
    let message = format!("/v1/audit/messages/{}/receipts", uuid::Uuid::new_v4());
    let edits = format!("/v1/audit/messages/{}/edits", uuid::Uuid::new_v4());
    let user_receipts = format!("/v1/audit/users/{}/receipts", plain.id);
    for path in [message.as_str(), edits.as_str(), user_receipts.as_str(), "/v1/audit/metrics/daily"] {
        cases.push(get(path).auth(&plain.token).is(403, "forbidden"));
        cases.push(get(path).auth(&analyst).is(403, "forbidden"));
        cases.push(get(format!("{path}?from=bad")).auth(&analyst).is(403, "forbidden"));
    }
    let ur = |q: &str| get(format!("{user_receipts}{q}")).auth(&auditor);
    cases.extend([
        get(&message).auth(&auditor).is(404, "not_found"),
        get("/v1/audit/messages/not-a-uuid/receipts").auth(&auditor).is(404, "not_found"),
        get(&edits).auth(&auditor).is(404, "not_found"),
        get("/v1/audit/messages/not-a-uuid/edits").auth(&auditor).is(404, "not_found"),
        ur("?from=bad").is(400, "invalid_time"),
        ur("?to=2024-05-01").is(400, "invalid_time"),
        ur("?from=2024-05-01T00:00:00Z&to=2024-05-01T00:00:00Z").is(400, "invalid_range"),
        ur("?from=2024-05-02T00:00:00Z&to=2024-05-01T00:00:00%2B02:00").is(400, "invalid_range"),
        ur("?from=2023-01-01T00:00:00Z&to=2024-01-02T00:00:00Z").is(400, "invalid_range"),
        // The parameters before the id.
        get("/v1/audit/users/not-a-uuid/receipts?from=bad").auth(&auditor).is(400, "invalid_time"),
        get("/v1/audit/users/not-a-uuid/receipts").auth(&auditor).is(404, "not_found"),
        get("/v1/audit/metrics/daily?from=bad").auth(&auditor).is(400, "invalid_date"),
        get("/v1/audit/metrics/daily?from=2024-05-02&to=2024-05-01").auth(&auditor).is(400, "invalid_range"),
        get("/v1/audit/metrics/daily?from=2023-01-01&to=2024-01-02").auth(&auditor).is(400, "invalid_range"),
    ]);

    // Auditors are read-only: every write is 403 (after the body is read), before any other check.
    let group = ConversationId::group(GroupId::random()).to_string();
    let someone = UserId::random().to_string();
    cases.extend([
        post("/v1/groups").auth(&auditor).json(json!({"name": "g"})).is(403, "forbidden"),
        post("/v1/groups").auth(&auditor).json(json!({"name": ""})).is(403, "forbidden"),
        call(Method::PATCH, format!("/v1/groups/{group}")).auth(&auditor).json(json!({"name": "g"})).is(403, "forbidden"),
        post(format!("/v1/groups/{group}/members")).auth(&auditor).json(json!({"user_id": someone})).is(403, "forbidden"),
        call(Method::DELETE, format!("/v1/groups/{group}/members/{someone}")).auth(&auditor).is(403, "forbidden"),
        call(Method::DELETE, format!("/v1/groups/{group}/members/{}", auditor_user.id)).auth(&auditor).is(403, "forbidden"),
        call(Method::PUT, "/v1/profile").auth(&auditor).json(json!({"display_name": "Aud"})).is(403, "forbidden"),
        call(Method::PUT, "/v1/profile").auth(&auditor).json(json!({"display_name": ""})).is(403, "forbidden"),
        post("/v1/media?kind=image").auth(&auditor).raw(None, png(16)).is(403, "forbidden"),
        post("/v1/media?kind=bogus").auth(&auditor).raw(None, png(16)).is(403, "forbidden"),
    ]);
    check(&p, cases).await;

    // The boundaries that are allowed: 366 days, both ends included; times just under 366 days.
    for ok in ["/v1/analytics/topics?from=2023-01-01&to=2024-01-01", "/v1/analytics/messages?from=2024-01-01&to=2024-12-31"] {
        p.send(get(ok).auth(&analyst)).await.expect_status(StatusCode::OK);
    }
    p.send(get(format!("{user_receipts}?from=2023-01-01T00:00:01Z&to=2024-01-01T23:59:59Z")).auth(&auditor)).await.expect_status(StatusCode::OK);
    // Auditors may read and log out (not a write).
    p.send(get("/v1/conversations").auth(&auditor)).await.expect_status(StatusCode::OK);
    p.send(call(Method::DELETE, "/v1/sessions").auth(&auditor)).await.expect_status(StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pre_upgrade_errors() {
    let p = Platform::open(Limits { max_connections_per_user: 1, ..Limits::default() }, false).await;
    let (user, token) = p.stranger();
    let expired = Tokens::new(SECRET, chrono::Duration::seconds(-60)).issue(user, "someone", Vec::new(), 0).expect("token").0;
    let upgrade = |c: Call| {
        c.header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let ws = |q: &str| upgrade(get(format!("/v1/ws{q}")));
    check(
        &p,
        vec![
            // The token first: nothing without one is ever upgraded.
            ws("").is(401, "unauthorized"),
            get("/v1/ws").is(401, "unauthorized"),
            ws("?access_token=garbage").is(401, "unauthorized"),
            ws(&format!("?access_token={expired}")).is(401, "unauthorized"),
            ws("").auth("garbage").is(401, "unauthorized"),
            ws("?device=bad%20device").is(401, "unauthorized"),
            // Then the device.
            ws(&format!("?access_token={token}&device=bad%20device")).is(400, "invalid_device"),
            ws("?device=").auth(&token).is(400, "invalid_device"),
            ws(&format!("?device={}", "d".repeat(65))).auth(&token).is(400, "invalid_device"),
            ws("?device=caf%C3%A9").auth(&token).is(400, "invalid_device"),
            get("/v1/ws?device=bad%20device").auth(&token).is(400, "invalid_device"),
            // Then the upgrade itself (the framework's rejection status).
            get("/v1/ws").auth(&token).is(400, "invalid_upgrade"),
            get("/v1/ws?device=phone-1").auth(&token).header("connection", "Upgrade").is(400, "invalid_upgrade"),
            get("/v1/ws").auth(&token).header("connection", "Upgrade").header("upgrade", "websocket").is(400, "invalid_upgrade"),
            get("/v1/ws")
                .auth(&token)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "8")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .is(400, "invalid_upgrade"),
            // A proper request on a connection that cannot be upgraded (in-process: no hyper
            // upgrade) → 426.
            ws("?device=phone-1").auth(&token).is(426, "invalid_upgrade"),
            upgrade(call(Method::POST, "/v1/ws")).auth(&token).is(405, "method_not_allowed"),
        ],
    )
    .await;

    // The user's connections on this node (1 here) are all taken.
    let _held = p.chat.connection_slot(user).expect("a slot").expect("a cap");
    check(
        &p,
        vec![
            ws("?device=phone-2").auth(&token).is(429, "rate_limited"),
            get("/v1/ws").auth(&token).is(429, "rate_limited"),
            // Token and device still come first.
            ws("").is(401, "unauthorized"),
            ws("?device=bad%20device").auth(&token).is(400, "invalid_device"),
        ],
    )
    .await;
    // Another user is not limited by it.
    let (_, other) = p.stranger();
    check(&p, vec![ws("").auth(&other).is(426, "invalid_upgrade")]).await;
}

/// docs/protocol.md §6: "A malformed id in a path is answered the same way" (404 `not_found`), and
/// §1.3: errors are in the JSON error format. A path parameter whose percent-encoding is not UTF-8
/// names nothing: 404 `not_found` (axum's own extractor answered 400 `text/plain` "Invalid URL",
/// and on the audit routes before the role check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_that_are_not_utf8_are_not_found() {
    let p = Platform::with_defaults().await;
    let (_, token) = p.stranger();
    let cases = ROUTES
        .iter()
        .filter(|(path, _)| path.contains('{'))
        .flat_map(|(path, ms)| ms.iter().map(move |(m, _)| (m, path)))
        .map(|(m, path)| {
            let mut uri = path.to_string();
            while let (Some(a), Some(b)) = (uri.find('{'), uri.find('}')) {
                uri.replace_range(a..=b, "%FF");
            }
            let status = if path.starts_with("/v1/audit") { 403 } else { 404 };
            let code = if status == 403 { "forbidden" } else { "not_found" };
            call(method(m), uri).auth(&token).json(json!({"name": "x"})).is(status, code)
        })
        .collect();
    check(&p, cases).await;
}

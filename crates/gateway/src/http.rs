//! HTTP routes: thin handlers (extract → authorize → one service call → response).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chat_events::DeviceId;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::frames::StrictObject;
use crate::insights::{day_range, require, time_range, writer};
use crate::service::Chat;

type App = Arc<Chat>;

/// Largest HTTP request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Every route of the gateway.
pub fn router(chat: App) -> Router {
    let echo = chat.limits.ws_echo;
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/accounts", post(register))
        .route("/v1/sessions", post(login).delete(logout_everywhere))
        .route("/v1/users/by-username/{username}", get(lookup_user))
        .route("/v1/users/{user_id}/last-seen", get(last_seen))
        .route("/v1/privacy", get(get_privacy).put(put_privacy))
        .route("/v1/blocks", get(list_blocks))
        .route("/v1/blocks/{user_id}", axum::routing::put(block_user).delete(unblock_user))
        .route("/v1/conversations", get(conversations))
        .route("/v1/conversations/{conversation_id}/messages", get(history))
        .route("/v1/messages/{message_id}/receipts", get(receipts))
        .route("/v1/search", get(search))
        .route("/v1/groups", post(create_group).get(my_groups))
        .route("/v1/groups/{conversation_id}", get(group_info).patch(rename_group))
        .route("/v1/groups/{conversation_id}/members", post(add_member))
        .route("/v1/groups/{conversation_id}/members/{user_id}", delete(remove_member))
        .route("/v1/media", post(upload_media).layer(DefaultBodyLimit::disable()))
        .route("/v1/media/{media_id}", get(download_media))
        .route("/v1/profile", axum::routing::put(update_profile))
        .route("/v1/users/{user_id}/profile", get(view_profile))
        .route("/v1/analytics/messages", get(analytics_messages))
        .route("/v1/analytics/active-users", get(analytics_active_users))
        .route("/v1/analytics/profile-views", get(analytics_profile_views))
        .route("/v1/analytics/topics", get(analytics_topics))
        .route("/v1/audit/messages/{message_id}/receipts", get(audit_message))
        .route("/v1/audit/messages/{message_id}/edits", get(audit_edits))
        .route("/v1/audit/users/{user_id}/receipts", get(audit_user))
        .route("/v1/audit/metrics/daily", get(audit_daily))
        .route("/v1/ws", get(websocket));
    let router = if echo { router.route("/v1/ws/echo", get(websocket_echo)) } else { router };
    router
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this path does not take that method")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // A request body that stops arriving (slowloris on the body) ends the request: no
        // chunk for this long and reading it fails (408 `request_timeout`), which closes the
        // connection. Between chunks, not in total, so a slow but moving upload goes on.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(crate::server::BODY_IDLE_TIMEOUT))
        .with_state(chat)
}

/// Whether a body error (or one of its causes) is the body's idle timeout.
pub(crate) fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// 408 `request_timeout`: the body stopped arriving.
pub(crate) fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!("the request body stopped arriving (nothing for {} s)", crate::server::BODY_IDLE_TIMEOUT.as_secs()),
    )
}

/// Path parameters. One that cannot be decoded (a percent-encoding that is not UTF-8) names
/// nothing that exists: 404 `not_found` in our error format, like any malformed id.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(_) => Err(ApiError::not_found()),
        }
    }
}

/// [`Path`] for handlers that check the caller's role first: the 404 of an undecodable
/// parameter comes after the 403.
pub struct LaterPath<T>(pub Result<T, ApiError>);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for LaterPath<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(LaterPath(Path::<T>::from_request_parts(parts, state).await.map(|Path(v)| v)))
    }
}

/// JSON body with errors in our format.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Every documented body is an object with distinct keys (as frames are parsed): serde
        // would also take a struct from an array, and with a plain `Value` the last of two equal
        // keys would silently win.
        match Json::<StrictObject>::from_request(req, state).await {
            Ok(Json(StrictObject(m))) => serde_json::from_value(serde_json::Value::Object(m)).map(ApiJson).map_err(|e| ApiError::bad_request("invalid_json", e.to_string())),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send application/json"))
            }
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("bodies are at most {MAX_BODY} bytes")))
            }
            Err(e) if body_timed_out(&e) => Err(body_timeout()),
            Err(e) => Err(ApiError::bad_request("invalid_json", e.body_text())),
        }
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme's name in any case, RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let (scheme, token) = headers.get(header::AUTHORIZATION)?.to_str().ok()?.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The authenticated caller of an HTTP request (bearer token in `Authorization`).
pub struct Caller(pub Principal);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, chat: &App) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        chat.authenticate(token).map(Caller)
    }
}

/// Query parameters, parsed strictly: a parameter given twice, or one that is not UTF-8 once
/// percent-decoded, is a 400 `invalid_query` (a lenient parser would keep the last of two and
/// replace bad bytes, so the server would answer a question the client did not ask).
fn query_map(RawQuery(raw): RawQuery) -> Result<HashMap<String, String>, ApiError> {
    parse_query(raw.as_deref().unwrap_or(""))
}

fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let invalid = |why: String| ApiError::bad_request("invalid_query", why);
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| invalid("the query string is not UTF-8 once percent-decoded".into()))
    };
    let mut out = HashMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k)?;
        if out.contains_key(&k) {
            let shown: String = k.chars().take(64).collect();
            return Err(invalid(format!("the query parameter `{shown}` is given twice")));
        }
        out.insert(k, decode(v)?);
    }
    Ok(out)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(chat): State<App>) -> Response {
    let checks = chat.readiness().await;
    let ready = checks.iter().all(|(_, ok)| *ok);
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks.iter().map(|(k, ok)| (k.to_string(), serde_json::Value::Bool(*ok))).collect::<serde_json::Map<_, _>>(),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(chat): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], chat.metrics.render()).into_response()
}

/// The OpenAPI description of these routes (`schemas/openapi.json`; `tests/openapi.rs` keeps the
/// two in step). No authentication.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../../../schemas/openapi.json")).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    username: String,
    password: String,
}

/// The client's address (the TCP peer; none when the router is called in-process).
pub struct Peer(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())))
    }
}

async fn register(State(chat): State<App>, Peer(peer): Peer, ApiJson(c): ApiJson<Credentials>) -> Result<Response, ApiError> {
    let r = chat.register(peer, &c.username, &c.password).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn login(State(chat): State<App>, Peer(peer): Peer, ApiJson(c): ApiJson<Credentials>) -> Result<Response, ApiError> {
    Ok(Json(chat.login(peer, &c.username, &c.password).await?).into_response())
}

/// Log-out everywhere: every token of the caller issued until now stops working on every node.
async fn logout_everywhere(State(chat): State<App>, Caller(p): Caller) -> Result<Response, ApiError> {
    chat.end_sessions(&p).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn lookup_user(State(chat): State<App>, _c: Caller, Path(username): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(chat.lookup_user(&username).await?).into_response())
}

async fn last_seen(State(chat): State<App>, Caller(p): Caller, Path(user_id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(chat.last_seen(p.user_id, &user_id).await?).into_response())
}

async fn get_privacy(State(chat): State<App>, Caller(p): Caller) -> Result<Response, ApiError> {
    Ok(Json(crate::privacy::PrivacySettings::from(chat.privacy(p.user_id).await?)).into_response())
}

async fn put_privacy(State(chat): State<App>, Caller(p): Caller, ApiJson(c): ApiJson<crate::privacy::PrivacyChange>) -> Result<Response, ApiError> {
    writer(&p)?;
    Ok(Json(chat.set_privacy(p.user_id, c).await?).into_response())
}

async fn list_blocks(State(chat): State<App>, Caller(p): Caller) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({ "blocked": chat.blocked_users(p.user_id).await? })).into_response())
}

async fn block_user(State(chat): State<App>, Caller(p): Caller, Path(user_id): Path<String>) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.set_block(p.user_id, &user_id, true).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn unblock_user(State(chat): State<App>, Caller(p): Caller, Path(user_id): Path<String>) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.set_block(p.user_id, &user_id, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn conversations(State(chat): State<App>, Caller(p): Caller) -> Result<Response, ApiError> {
    let rows = chat.conversations(p.user_id).await?;
    Ok(Json(serde_json::json!({ "conversations": rows })).into_response())
}

async fn history(
    State(chat): State<App>,
    Caller(p): Caller,
    Path(conversation_id): Path<String>,
    q: RawQuery,
) -> Result<Response, ApiError> {
    let q = query_map(q)?;
    let limit = match q.get("limit") {
        Some(l) => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request("invalid_limit", "limit is a positive integer"))?),
        None => None,
    };
    let page = chat.history(p.user_id, &conversation_id, q.get("before").map(String::as_str), limit).await?;
    Ok(Json(page).into_response())
}

async fn search(State(chat): State<App>, Caller(p): Caller, q: RawQuery) -> Result<Response, ApiError> {
    let q = query_map(q)?;
    let limit = match q.get("limit") {
        Some(l) => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request("invalid_limit", "limit is a positive integer"))?),
        None => None,
    };
    let text = q.get("q").ok_or_else(|| ApiError::bad_request("invalid_query", "q is required"))?;
    let page = chat.search(p.user_id, text, q.get("conversation_id").map(String::as_str), q.get("before").map(String::as_str), limit).await?;
    Ok(Json(page).into_response())
}

async fn receipts(State(chat): State<App>, Caller(p): Caller, Path(message_id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(chat.receipts(p.user_id, &message_id).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    user_id: String,
    #[serde(default)]
    role: Option<String>,
}

/// Group changes are decided by the fan-out at their position in the log: 202, and the outcome
/// arrives as a `group` frame / stream item.
fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(serde_json::json!({"status": "accepted"}))).into_response()
}

async fn create_group(State(chat): State<App>, Caller(p): Caller, ApiJson(g): ApiJson<NewGroup>) -> Result<Response, ApiError> {
    writer(&p)?;
    Ok((StatusCode::CREATED, Json(chat.create_group(p.user_id, &g.name, &g.members).await?)).into_response())
}

async fn my_groups(State(chat): State<App>, Caller(p): Caller) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({ "groups": chat.my_groups(p.user_id).await? })).into_response())
}

async fn group_info(State(chat): State<App>, Caller(p): Caller, Path(conversation_id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(chat.group_info(p.user_id, &conversation_id).await?).into_response())
}

async fn rename_group(
    State(chat): State<App>,
    Caller(p): Caller,
    Path(conversation_id): Path<String>,
    ApiJson(g): ApiJson<GroupName>,
) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.rename_group(p.user_id, &conversation_id, &g.name).await?;
    Ok(accepted())
}

async fn add_member(
    State(chat): State<App>,
    Caller(p): Caller,
    Path(conversation_id): Path<String>,
    ApiJson(m): ApiJson<NewMember>,
) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.add_member(p.user_id, &conversation_id, &m.user_id, m.role.as_deref()).await?;
    Ok(accepted())
}

async fn remove_member(
    State(chat): State<App>,
    Caller(p): Caller,
    Path((conversation_id, user_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.remove_member(p.user_id, &conversation_id, &user_id).await?;
    Ok(accepted())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileUpdate {
    display_name: String,
    #[serde(default)]
    avatar_media_id: Option<String>,
}

type QueryMap = RawQuery;

/// Streams the body into the media store; `?kind=image|audio|video`. The size limit of the kind
/// is enforced while streaming (the default body limit is off for this route).
async fn upload_media(State(chat): State<App>, Caller(p): Caller, q: QueryMap, body: axum::body::Body) -> Result<Response, ApiError> {
    writer(&p)?;
    let q = query_map(q)?;
    let kind = q.get("kind").map(String::as_str).unwrap_or("");
    Ok((StatusCode::CREATED, Json(chat.upload(p.user_id, kind, body).await?)).into_response())
}

async fn download_media(State(chat): State<App>, Caller(p): Caller, Path(media_id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    chat.download(p.user_id, &media_id, &headers).await
}

async fn update_profile(State(chat): State<App>, Caller(p): Caller, ApiJson(u): ApiJson<ProfileUpdate>) -> Result<Response, ApiError> {
    writer(&p)?;
    chat.update_profile(p.user_id, &u.display_name, u.avatar_media_id.as_deref()).await?;
    Ok(accepted())
}

async fn view_profile(State(chat): State<App>, Caller(p): Caller, Path(user_id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(chat.view_profile(p.user_id, &user_id).await?).into_response())
}

fn days(q: &HashMap<String, String>) -> Result<(chrono::NaiveDate, chrono::NaiveDate), ApiError> {
    day_range(q.get("from").map(String::as_str), q.get("to").map(String::as_str))
}

async fn analytics_messages(State(chat): State<App>, Caller(p): Caller, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "analyst")?;
    let (from, to) = days(&query_map(q)?)?;
    Ok(Json(serde_json::json!({ "days": chat.message_counts(from, to).await? })).into_response())
}

async fn analytics_active_users(State(chat): State<App>, Caller(p): Caller, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "analyst")?;
    let (from, to) = days(&query_map(q)?)?;
    let rows: Vec<serde_json::Value> =
        chat.active_users(from, to).await?.into_iter().map(|(day, users)| serde_json::json!({"day": day, "users": users})).collect();
    Ok(Json(serde_json::json!({ "days": rows })).into_response())
}

async fn analytics_profile_views(State(chat): State<App>, Caller(p): Caller, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "analyst")?;
    let q = query_map(q)?;
    let (from, to) = days(&q)?;
    let user = q.get("user").ok_or_else(|| ApiError::bad_request("invalid_user", "give ?user=<user id>"))?;
    Ok(Json(serde_json::json!({ "days": chat.profile_views(user, from, to).await? })).into_response())
}

async fn analytics_topics(State(chat): State<App>, Caller(p): Caller, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "analyst")?;
    let (from, to) = days(&query_map(q)?)?;
    Ok(Json(serde_json::json!({ "topics": chat.topic_counts(from, to).await? })).into_response())
}

async fn audit_message(State(chat): State<App>, Caller(p): Caller, LaterPath(message_id): LaterPath<String>) -> Result<Response, ApiError> {
    require(&p, "auditor")?;
    let message_id = message_id?;
    Ok(Json(chat.audit_message(&p, &message_id).await?).into_response())
}

async fn audit_edits(State(chat): State<App>, Caller(p): Caller, LaterPath(message_id): LaterPath<String>) -> Result<Response, ApiError> {
    require(&p, "auditor")?;
    let message_id = message_id?;
    Ok(Json(chat.audit_edits(&p, &message_id).await?).into_response())
}

async fn audit_user(State(chat): State<App>, Caller(p): Caller, LaterPath(user_id): LaterPath<String>, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "auditor")?;
    let user_id = user_id?;
    let q = query_map(q)?;
    let (from, to) = time_range(q.get("from").map(String::as_str), q.get("to").map(String::as_str))?;
    Ok(Json(serde_json::json!({ "user_id": user_id, "receipts": chat.audit_user(&p, &user_id, from, to).await? })).into_response())
}

async fn audit_daily(State(chat): State<App>, Caller(p): Caller, q: QueryMap) -> Result<Response, ApiError> {
    require(&p, "auditor")?;
    let (from, to) = days(&query_map(q)?)?;
    Ok(Json(serde_json::json!({ "days": chat.audit_daily(&p, from, to).await? })).into_response())
}

/// The WebSocket upgrade: the token is checked before anything else, so an unauthenticated
/// request gets 401 and never 101. Token in `Authorization: Bearer` or `?access_token=`
/// (browsers cannot set headers on a WebSocket); device in `?device=`.
async fn websocket(
    State(chat): State<App>,
    headers: HeaderMap,
    q: RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let q = query_map(q).unwrap_or_default();
    let token = bearer(&headers).map(str::to_owned).or_else(|| q.get("access_token").cloned());
    let principal = match token.as_deref().map(|t| chat.authenticate(t)) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return e.into_response(),
        None => return ApiError::unauthorized().into_response(),
    };
    let device = match q.get("device") {
        None => DeviceId::default_device(),
        Some(d) => match d.parse::<DeviceId>() {
            Ok(d) => d,
            Err(e) => return ApiError::bad_request("invalid_device", e.to_string()).into_response(),
        },
    };
    // The slot is taken before the upgrade and held until the connection ends: upgrades that
    // arrive together cannot all pass the cap.
    let slot = match chat.connection_slot(principal.user_id) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::new(rejection.status(), "invalid_upgrade", rejection.body_text()).into_response();
        }
    };
    configured(ws, &chat).on_upgrade(move |socket| crate::ws::serve(chat, principal, device, socket, slot))
}

/// The WebSocket settings of every socket the gateway accepts.
fn configured(ws: WebSocketUpgrade, chat: &Chat) -> WebSocketUpgrade {
    let limit = chat.limits.max_frame_bytes;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // Small per-connection buffers: chat frames are small, and the read buffer is allocated
        // (and zero-filled) per connection: the default 128 KiB would dominate an idle
        // connection's memory. A larger frame grows the buffer to its size while it is read.
        .read_buffer_size(512)
        .write_buffer_size(0)
}

/// `/v1/ws/echo` (only with `CHAT_WS_ECHO=1`): echoes every message on the same WebSocket
/// settings and close handling as `/v1/ws`, so that a conformance suite (Autobahn) can test the
/// gateway's WebSocket stack, which it cannot through the chat protocol's replies.
async fn websocket_echo(State(chat): State<App>, ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Response {
    match ws {
        Ok(ws) => {
            let idle = chat.limits.ws_idle;
            configured(ws, &chat).on_upgrade(move |socket| crate::ws::echo(socket, idle))
        }
        Err(rejection) => ApiError::new(rejection.status(), "invalid_upgrade", rejection.body_text()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_parsed_strictly() {
        let q = parse_query("limit=5&before=a%20b&kind=image+x&flag").expect("a good query");
        assert_eq!((q["limit"].as_str(), q["before"].as_str(), q["kind"].as_str(), q["flag"].as_str()), ("5", "a b", "image x", ""));
        assert!(parse_query("").expect("empty").is_empty());
        for bad in ["limit=1&limit=2", "a=%FF", "%C3%28=1", "x=1&x"] {
            let e = parse_query(bad).err().unwrap_or_else(|| panic!("{bad} must be refused"));
            assert_eq!(e.code, "invalid_query", "{bad}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("BEARER  abc")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&h("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}

//! What the gateway does, independent of HTTP and WebSocket framing: every command checks its
//! gate, appends its event and only then answers; every read is authorized first.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chat_events::{
    append_event, derive_id, now_millis, ConversationId, DeviceId, Envelope, Event, EventId, EventLog, MessageDelivered,
    MessageId, MessageKind, MessageRead, MessageSent, PresenceChanged, PresenceStatus, ReceiptStatus, StreamItem, Topics,
    UserId, UserRegistered,
};
use chat_store::{content_sha256, Account, InboxRow, MessageRow, ReceiptRow, SendRecord};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{debug, warn};

use crate::auth::{hash_password, verify_password, KdfLane, KdfPool, Principal, Tokens};
use crate::error::ApiError;
use crate::frames::{Ref, ServerFrame, SyncItem};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::routing::{ConnRef, Push, Routing};
use crate::sends::{Claim, SendDone, SendState};

/// How long a re-send that appended waits for the fan-out to decide which attempt is the message.
const DECISION_WAIT: Duration = Duration::from_secs(10);

fn reused() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "client_msg_id_reused", "this client_msg_id was used for another message")
}

/// Everything the gateway reads and gates on: a back-end's tables.
pub use chat_store::Tables as GatewayStore;

/// Bounds on client input.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest WebSocket message accepted (bigger ones close the socket with 1009).
    pub max_frame_bytes: usize,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Outbound frames queued per connection before it is closed as too slow.
    pub conn_queue: usize,
    /// Message ids per `delivered` frame.
    pub max_ids_per_ack: usize,
    /// Items per `sync` answer.
    pub max_sync: usize,
    /// Members per group, the creator included (WhatsApp's is 1024).
    pub max_group_size: usize,
    /// Messages per history page.
    pub max_page: usize,
    /// How long a connection's routing entry lives without a heartbeat; a crashed node's users
    /// are declared offline after about this long. Heartbeats run at a third of it.
    pub presence_ttl: Duration,
    /// Failed log-ins per account name in 15 minutes before further attempts are refused (0: no
    /// limit).
    pub login_failures_per_account: usize,
    /// Failed log-ins per peer address in 15 minutes (0: no limit).
    pub login_failures_per_address: usize,
    /// Registrations per peer address in an hour (0: no limit).
    pub registrations_per_address: usize,
    /// Distinct senders a topic needs on a day before analysts see it (k-anonymity).
    pub analytics_min_users: usize,
    /// WebSocket connections per user on one node (0: no limit).
    pub max_connections_per_user: usize,
    /// `send` frames per user and second on one node, on average (bursts of twice as many; 0: no
    /// limit).
    pub sends_per_user_per_sec: usize,
    /// How long after sending a message may be edited or deleted for everyone (the fan-out
    /// decides for good with its own setting; keep them equal).
    pub edit_window: Duration,
    /// Serve `/v1/ws/echo` (WebSocket conformance runs only).
    pub ws_echo: bool,
    /// A WebSocket connection with no frame from the client for this long is closed (1001); the
    /// server pings every third of it.
    pub ws_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            conn_queue: 256,
            max_ids_per_ack: 100,
            max_sync: 500,
            max_page: 200,
            max_group_size: 1024,
            edit_window: chat_events::DEFAULT_EDIT_WINDOW,
            presence_ttl: Duration::from_secs(30),
            login_failures_per_account: 10,
            login_failures_per_address: 50,
            registrations_per_address: 30,
            analytics_min_users: 5,
            max_connections_per_user: 32,
            sends_per_user_per_sec: 20,
            ws_echo: false,
            ws_idle: Duration::from_secs(90),
        }
    }
}

/// A `send` frame's fields.
#[derive(Debug)]
pub struct SendCommand {
    pub r#ref: Ref,
    pub client_msg_id: String,
    pub to: Option<String>,
    pub conversation_id: Option<String>,
    pub kind: Option<String>,
    pub body: String,
    pub media_id: Option<String>,
    pub metadata: Option<crate::frames::MediaMetadata>,
    /// A re-send of a `client_msg_id` that got no answer (see [`Chat::send`]).
    pub retry: bool,
    /// The message this one replies to.
    pub reply_to: Option<String>,
    /// The group members it mentions.
    pub mentions: Option<Vec<String>>,
}

/// One WebSocket connection's identity.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub user: UserId,
    pub device: DeviceId,
    pub conn: ConnRef,
    /// An auditor's connection: it may sync and read, never send, acknowledge or type.
    pub read_only: bool,
}

/// The gateway's service.
pub struct Chat {
    pub log: Arc<dyn EventLog>,
    pub topics: Topics,
    pub store: Arc<dyn GatewayStore>,
    pub routing: Arc<dyn Routing>,
    pub hub: Arc<Hub>,
    pub tokens: Tokens,
    pub node: String,
    pub limits: Limits,
    pub metrics: Metrics,
    /// Where media objects live (absent: uploads answer `media_unavailable`).
    pub media: Option<crate::media::MediaStorage>,
    /// The message search index (absent: searches answer `search_unavailable`).
    pub search: Option<Arc<chat_search::SearchIndex>>,
    /// Users known to exist (they never stop existing): saves a read per send.
    known_users: Mutex<HashSet<UserId>>,
    /// Block states this node read last, for sends while the tables do not answer.
    pub(crate) block_cache: crate::privacy::BlockCache,
    /// Sends this node answered or is answering, for same-node retries and concurrent attempts.
    recent: crate::sends::RecentSends,
    /// Password hashing, bounded (see [`KdfPool`]).
    kdf: KdfPool,
    /// Log-in and registration limits (brute force, floods).
    account_limits: crate::limits::AccountLimits,
    /// Sends per user (none: no limit).
    send_buckets: Option<crate::limits::Buckets<UserId>>,
    /// WebSocket connections per user on this node, counted from before the upgrade to the
    /// connection's end (none: no limit).
    connection_slots: Option<Arc<crate::limits::InFlight<UserId>>>,
    /// Ended sessions, as this node last read them.
    pub revocations: crate::revocations::Revocations,
}

const KNOWN_USERS_MAX: usize = 100_000;

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// The account created by a registration.
#[derive(Debug, Serialize)]
pub struct Registered {
    pub user_id: UserId,
    pub username: String,
}

/// A session token.
#[derive(Debug, Serialize)]
pub struct Session {
    pub token: String,
    pub user_id: UserId,
    pub username: String,
    pub expires_at: String,
}

/// A history page.
#[derive(Debug, Serialize)]
pub struct HistoryPage {
    pub messages: Vec<MessageRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The receipts of one message.
#[derive(Debug, Serialize)]
pub struct MessageReceipts {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub summary: ReceiptSummary,
    pub receipts: Vec<ReceiptRow>,
}

/// Counts over a message's recipients, and when the last of them got there.
#[derive(Debug, Serialize)]
pub struct ReceiptSummary {
    pub recipients: usize,
    pub delivered: usize,
    pub seen: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_to_all_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_by_all_at: Option<String>,
}

impl ReceiptSummary {
    /// Recipients are those with a `sent` row; a recipient's time for a status is their first
    /// row of it (any device); "all" is reached at the latest of those.
    pub fn of(rows: &[ReceiptRow]) -> Self {
        use std::collections::BTreeMap;
        let first = |status: ReceiptStatus| {
            let mut m: BTreeMap<UserId, DateTime<Utc>> = BTreeMap::new();
            for r in rows.iter().filter(|r| r.status == status) {
                let e = m.entry(r.recipient).or_insert(r.at);
                *e = (*e).min(r.at);
            }
            m
        };
        let (sent, delivered, seen) = (first(ReceiptStatus::Sent), first(ReceiptStatus::Delivered), first(ReceiptStatus::Seen));
        let all = |m: &BTreeMap<UserId, DateTime<Utc>>| {
            (!sent.is_empty() && sent.keys().all(|k| m.contains_key(k)))
                .then(|| m.values().max().map(chat_events::format_time))
                .flatten()
        };
        ReceiptSummary {
            recipients: sent.len(),
            delivered: delivered.len(),
            seen: seen.len(),
            delivered_to_all_at: all(&delivered),
            seen_by_all_at: all(&seen),
        }
    }
}

/// Presence of a user as another user may see it.
#[derive(Debug, Serialize)]
pub struct LastSeen {
    pub user_id: UserId,
    pub online: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

fn parse_conv(s: &str) -> Result<ConversationId, ApiError> {
    // An unparseable id is answered like any id that names nothing the caller can see.
    s.parse().map_err(|_| ApiError::not_found())
}

fn parse_message_id(s: &str) -> Result<MessageId, ApiError> {
    s.parse().map_err(|_| bad("invalid_message_id", "message ids are UUIDs"))
}

fn valid_username(u: &str) -> bool {
    (3..=32).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Whether a password is among what guessers try first: zxcvbn's estimate (common passwords,
/// names, dictionary words, dates, repeats, sequences, keyboard patterns, the username) below
/// "somewhat guessable" (score 2 of 4, about 10^8 guesses). Non-ASCII passwords are judged by
/// their ASCII part by the estimator; long ones pass.
fn too_guessable(username: &str, password: &str) -> bool {
    (zxcvbn::zxcvbn(password, &[username]).score() as u8) < 2
}

/// Password hashes waiting for the pool, at most (beyond: `overloaded`).
const KDF_QUEUE: usize = 256;

/// Whether a name others will see (a display name, a group name) is free of characters that
/// change how text around it is shown: control characters, bidirectional overrides and
/// isolates (U+202A–U+202E, U+2066–U+2069: "U+202E" makes `exe.txt` read as `txt.exe`),
/// zero-width and other invisible format characters (U+200B–U+200F, U+2060–U+2064, U+FEFF,
/// U+00AD, U+061C, U+180E, U+FFF9–U+FFFB).
pub(crate) fn displayable(name: &str) -> bool {
    !name.chars().any(|c| {
        c.is_control()
            || matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
    })
}

impl Chat {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: Arc<dyn EventLog>,
        topics: Topics,
        store: Arc<dyn GatewayStore>,
        routing: Arc<dyn Routing>,
        hub: Arc<Hub>,
        tokens: Tokens,
        node: String,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        let revocations = crate::revocations::Revocations::new(tokens.ttl());
        Chat {
            log,
            topics,
            store,
            routing,
            hub,
            tokens,
            node,
            limits: limits.clone(),
            metrics,
            media: None,
            search: None,
            revocations,
            known_users: Mutex::new(HashSet::new()),
            block_cache: crate::privacy::BlockCache::default(),
            recent: crate::sends::RecentSends::new(crate::sends::RECENT_SENDS),
            kdf: KdfPool::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2), KDF_QUEUE),
            account_limits: crate::limits::AccountLimits::new(
                limits.login_failures_per_account,
                limits.login_failures_per_address,
                limits.registrations_per_address,
                KDF_QUEUE,
            ),
            send_buckets: (limits.sends_per_user_per_sec > 0)
                .then(|| crate::limits::Buckets::new(limits.sends_per_user_per_sec as f64, 2.0 * limits.sends_per_user_per_sec as f64)),
            connection_slots: (limits.max_connections_per_user > 0).then(|| Arc::new(crate::limits::InFlight::new(limits.max_connections_per_user))),
        }
    }

    /// With media storage.
    pub fn with_media(mut self, media: crate::media::MediaStorage) -> Self {
        self.media = Some(media);
        self
    }

    /// With the message search index.
    pub fn with_search(mut self, index: Arc<chat_search::SearchIndex>) -> Self {
        self.search = Some(index);
        self
    }

    pub(crate) async fn append(&self, env: &Envelope) -> Result<(), ApiError> {
        append_event(self.log.as_ref(), &self.topics, env).await.map(|_| ()).map_err(ApiError::from)
    }

    /// A place for one more WebSocket connection of `user` on this node, held until the
    /// connection ends (`None`: no cap); `429 rate_limited` when the user has the most a node
    /// takes.
    pub fn connection_slot(&self, user: UserId) -> Result<Option<crate::ws::ConnectionSlot>, ApiError> {
        let Some(slots) = &self.connection_slots else { return Ok(None) };
        match slots.enter_owned(user) {
            Some(slot) => Ok(Some(slot)),
            None => {
                let cap = self.limits.max_connections_per_user;
                Err(ApiError::rate_limited(format!("at most {cap} connections per user on a node"), Duration::from_secs(5)))
            }
        }
    }

    // ----- accounts -----

    /// A slot of `peer` in the password-hashing queue (one address may fill a quarter of it).
    fn hashing_slot(&self, peer: Option<IpAddr>) -> Result<Option<crate::limits::Slot<'_, IpAddr>>, ApiError> {
        let Some(ip) = peer else { return Ok(None) };
        match self.account_limits.hashing_per_address.enter(ip) {
            Some(slot) => Ok(Some(slot)),
            None => Err(ApiError::rate_limited("too many log-ins or registrations under way from this address", Duration::from_secs(1))),
        }
    }

    /// Registers an account. `peer`: the client's address, for the per-address limit (none from
    /// in-process callers).
    pub async fn register(&self, peer: Option<IpAddr>, username: &str, password: &str) -> Result<Registered, ApiError> {
        let username = username.to_ascii_lowercase();
        if !valid_username(&username) {
            return Err(bad("invalid_username", "usernames are 3-32 characters of a-z, 0-9, '_', '.', '-'"));
        }
        if !(8..=128).contains(&password.chars().count()) {
            return Err(bad("invalid_password", "passwords are 8-128 characters"));
        }
        if too_guessable(&username, password) {
            return Err(bad("weak_password", "that password is too easy to guess (a common password, a name or word, a keyboard pattern or the username); a few unrelated words make a strong one"));
        }
        if let (Some(ip), Some(w)) = (peer, &self.account_limits.registrations_per_address) {
            w.take(ip).map_err(|wait| ApiError::rate_limited("too many registrations from this address", wait))?;
        }
        let _slot = self.hashing_slot(peer)?;
        let pw = password.to_owned();
        let hash = self.kdf.run(KdfLane::Registration, peer, move || hash_password(&pw)).await.ok_or_else(ApiError::overloaded)?.map_err(|e| ApiError::internal("hash", &e))?;
        let account = Account { user_id: UserId::random(), username: username.clone(), password_hash: hash, created_at: now_millis() };
        if !self.store.create_account(&account).await? {
            return Err(ApiError::new(StatusCode::CONFLICT, "username_taken", "that username is taken"));
        }
        let env = Envelope::new(
            derive_id::user_registered(account.user_id),
            Some(account.user_id),
            Event::UserRegistered(UserRegistered { user_id: account.user_id, username: username.clone() }),
        );
        if let Err(e) = self.append(&env).await {
            // No event, no account: give the name back so a retry can succeed.
            if let Err(re) = self.store.remove_account(&account).await {
                warn!(error = %re, "could not release a username after a failed registration");
            }
            return Err(e);
        }
        Ok(Registered { user_id: account.user_id, username })
    }

    /// Logs in. Refused before any password check while the account name or `peer` is at its
    /// limit of failed attempts (`rate_limited`, with `retry_after`), whatever the password.
    pub async fn login(&self, peer: Option<IpAddr>, username: &str, password: &str) -> Result<Session, ApiError> {
        let invalid = || ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong username or password");
        let name = username.to_ascii_lowercase();
        let limits = &self.account_limits;
        if let Some(wait) = limits.failures_per_account.as_ref().and_then(|w| w.wait(&name)) {
            return Err(ApiError::rate_limited("too many failed log-ins for this account", wait));
        }
        if let Some(wait) = peer.and_then(|ip| limits.failures_per_address.as_ref().and_then(|w| w.wait(&ip))) {
            return Err(ApiError::rate_limited("too many failed log-ins from this address", wait));
        }
        let _slot = self.hashing_slot(peer)?;
        let account = self.store.account_by_name(&name).await?;
        let pw = password.to_owned();
        let hash = account.as_ref().map(|a| a.password_hash.clone());
        // Verify against something even for an unknown name, so timing does not reveal
        // which usernames exist.
        let ok = self
            .kdf
            .run(KdfLane::LogIn, peer, move || match hash {
                Some(h) => verify_password(&pw, &h),
                None => {
                    let _ = verify_password(&pw, DUMMY_HASH);
                    false
                }
            })
            .await
            .ok_or_else(ApiError::overloaded)?;
        let account = match (ok, account) {
            (true, Some(a)) => a,
            _ => {
                if let Some(w) = &limits.failures_per_account {
                    w.add(name);
                }
                if let (Some(ip), Some(w)) = (peer, &limits.failures_per_address) {
                    w.add(ip);
                }
                return Err(invalid());
            }
        };
        if let Some(w) = &limits.failures_per_account {
            w.clear(&name);
        }
        let roles = self.store.roles(account.user_id).await?;
        // A ban is checked after the password, so that it tells nothing to someone guessing it.
        if roles.iter().any(|r| r == BANNED) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "account_banned", "this account is banned"));
        }
        let after = self.revocations.latest(account.user_id).unwrap_or(0);
        let (token, exp) =
            self.tokens.issue(account.user_id, &account.username, roles, after).map_err(|e| ApiError::internal("token", &e))?;
        Ok(Session { token, user_id: account.user_id, username: account.username, expires_at: chat_events::format_time(&exp) })
    }

    /// The principal of a bearer token: valid, unexpired and not ended by a revocation.
    pub fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        let p = self.tokens.verify(token).ok_or_else(ApiError::unauthorized)?;
        if self.revocations.ended(&p) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "session_ended", "this session was ended (log-out everywhere or a role change); log in again"));
        }
        Ok(p)
    }

    /// Log-out everywhere: ends every session of the caller, this one included, on every node
    /// (open sockets close with 1008 within seconds), and records it as `user.sessions_ended`.
    pub async fn end_sessions(&self, p: &Principal) -> Result<(), ApiError> {
        let at_ms = Utc::now().timestamp_millis().max(p.issued_at_ms);
        let at = chrono::DateTime::from_timestamp_millis(at_ms).ok_or_else(|| ApiError::internal("time", &at_ms))?;
        self.store.revoke_sessions(p.user_id, at).await?;
        self.ended(p.user_id, at_ms);
        let env = Envelope::new(EventId::new_v7(), Some(p.user_id), Event::SessionsEnded(chat_events::SessionsEnded { user_id: p.user_id, until: at }));
        self.append(&env).await
    }

    /// A revocation known here: refuses the ended tokens and closes their sockets on this node.
    fn ended(&self, user: UserId, at_ms: i64) {
        if self.revocations.note(user, at_ms) {
            let n = self.hub.end_sessions(user, at_ms, crate::ws::CLOSE_POLICY);
            if n > 0 {
                debug!(%user, connections = n, "sessions ended");
            }
        }
    }

    /// Reads the revocations written since the last read (every node does, every few seconds)
    /// and closes the ended sessions' sockets on this node.
    pub async fn refresh_revocations(&self) -> Result<usize, chat_store::StoreError> {
        let news = self.revocations.refresh(self.store.as_ref()).await?;
        for &(user, at_ms) in &news {
            self.hub.end_sessions(user, at_ms, crate::ws::CLOSE_POLICY);
        }
        Ok(news.len())
    }

    pub async fn lookup_user(&self, username: &str) -> Result<Registered, ApiError> {
        match self.store.account_by_name(&username.to_ascii_lowercase()).await? {
            Some(a) => Ok(Registered { user_id: a.user_id, username: a.username }),
            None => Err(ApiError::not_found()),
        }
    }

    pub(crate) async fn user_exists(&self, user: UserId) -> Result<bool, ApiError> {
        if self.known_users.lock().unwrap_or_else(|p| p.into_inner()).contains(&user) {
            return Ok(true);
        }
        let exists = self.store.account_by_id(user).await?.is_some();
        if exists {
            let mut known = self.known_users.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= KNOWN_USERS_MAX {
                known.clear();
            }
            known.insert(user);
        }
        Ok(exists)
    }

    // ----- WebSocket commands -----

    /// Accepts a message: gate on (sender, client_msg_id), append, then ack; push afterwards.
    /// One command of the user's send budget (sends, edits and deletes share it).
    pub(crate) fn take_send_budget(&self, user: UserId) -> Result<(), ApiError> {
        if let Some(b) = &self.send_buckets {
            b.take(user).map_err(|wait| ApiError::rate_limited("too many messages; slow down", wait))?;
        }
        Ok(())
    }

    pub async fn send(&self, ctx: &ConnCtx, cmd: SendCommand) -> Result<ServerFrame, ApiError> {
        let SendCommand { r#ref, client_msg_id, to, conversation_id, kind, body, media_id, metadata, retry, reply_to, mentions } = cmd;
        let started = Instant::now();
        self.take_send_budget(ctx.user)?;
        if client_msg_id.is_empty() || client_msg_id.len() > 64 {
            return Err(bad("invalid_client_msg_id", "client_msg_id must be 1-64 bytes"));
        }
        let kind = match kind.as_deref() {
            None => MessageKind::Text,
            Some(k) => MessageKind::parse(k).ok_or_else(|| bad("unsupported_kind", "kind is text, image, audio or video"))?,
        };
        // A text needs a body; a media message needs a media id and may have a caption.
        let empty_ok = kind != MessageKind::Text;
        if (body.is_empty() && !empty_ok) || body.len() > self.limits.max_body_bytes {
            return Err(bad("invalid_body", format!("body must be 1-{} bytes", self.limits.max_body_bytes)));
        }
        if (kind == MessageKind::Text) != media_id.is_none() || (kind == MessageKind::Text && metadata.is_some()) {
            return Err(bad("invalid_frame", "media_id (and metadata) go with kind image, audio or video, and only with them"));
        }
        let conv = match (to, conversation_id) {
            (Some(to), None) => {
                let peer: UserId = to.parse().map_err(|_| ApiError::bad_request("unknown_recipient", "no such user"))?;
                if peer == ctx.user {
                    return Err(bad("invalid_recipient", "you cannot message yourself"));
                }
                ConversationId::direct(ctx.user, peer)
            }
            (None, Some(c)) => self.member_conv(ctx.user, &c).await?,
            _ => return Err(bad("invalid_frame", "give exactly one of `to` and `conversation_id`")),
        };
        // A direct message to a user who blocks the sender is withheld (accepted, never
        // delivered, and nothing says so); one to a user the sender blocks is refused.
        let mut withheld = false;
        if !conv.is_group() {
            let peer = conv.peer_of(ctx.user).ok_or_else(ApiError::not_found)?;
            if !self.user_exists(peer).await? {
                return Err(bad("unknown_recipient", "no such user"));
            }
            let (mine, theirs) = self.send_blocks(ctx.user, peer).await;
            if mine {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "blocked", "you blocked this user; unblock them to send"));
            }
            withheld = theirs;
        }
        let mentions = self.mentioned(&conv, mentions).await?;
        let reply_to = self.reply_target(ctx.user, &conv, reply_to.as_deref()).await?;
        let media = match &media_id {
            None => None,
            Some(id) => {
                let object = self.attachable(ctx.user, id, kind).await?;
                let meta = metadata.clone().unwrap_or_default();
                if meta.width.is_some_and(|w| w == 0 || w > 100_000)
                    || meta.height.is_some_and(|h| h == 0 || h > 100_000)
                    || meta.duration_ms.is_some_and(|d| d > 86_400_000)
                {
                    return Err(bad("invalid_metadata", "width/height are 1-100000, duration_ms at most a day"));
                }
                Some(chat_events::MediaAttachment {
                    media_id: object.media_id,
                    content_type: object.content_type,
                    size: object.size.max(0) as u64,
                    width: meta.width,
                    height: meta.height,
                    duration_ms: meta.duration_ms,
                })
            }
        };
        // The idempotency key covers what the message says: body and attachment (the media id as
        // an id, whatever its spelling).
        let content = content_sha256(&body, media.as_ref().map(|m| m.media_id.to_string()).as_deref(), reply_to, &mentions);
        let key = (ctx.user, client_msg_id.clone());
        let claim = loop {
            let earlier = match self.recent.claim(&key, &conv, &content) {
                Claim::Mine(claim) => break claim,
                Claim::Done(done) => done,
                Claim::Reused => return Err(reused()),
                // Another attempt on this node is under way: its answer is ours (or, if it
                // failed, this attempt tries again).
                Claim::Wait(mut rx) => {
                    let _ = rx.wait_for(|s| !matches!(s, SendState::Pending)).await;
                    let state = rx.borrow().clone();
                    match state {
                        SendState::Done(done) => done,
                        _ => continue,
                    }
                }
            };
            // A re-send answered before by a plain attempt: that attempt's append may be the one
            // the fan-out dropped (another node appended the same send first); its record says.
            if retry && !earlier.decided {
                let rec = self.decided(&conv, ctx.user, &client_msg_id).await?;
                if rec.content_sha256 != content {
                    return Err(reused());
                }
                let done = SendDone { message_id: rec.message_id, sent_at: rec.sent_at, decided: true };
                return Ok(sent_frame(r#ref, client_msg_id, conv, done));
            }
            return Ok(sent_frame(r#ref, client_msg_id, conv, earlier));
        };
        // A re-send: the fan-out's record of the first attempt, if it got that far.
        if retry {
            if let Some(rec) = self.store.send_record(&conv, ctx.user, &client_msg_id).await? {
                if rec.content_sha256 != content {
                    return Err(reused());
                }
                let done = SendDone { message_id: rec.message_id, sent_at: rec.sent_at, decided: true };
                claim.done(done.clone());
                return Ok(sent_frame(r#ref, client_msg_id, conv, done));
            }
        }
        let event = MessageSent {
            message_id: self.tokens.message_ids().mint(&conv, ctx.user),
            conversation_id: conv.clone(),
            sender: ctx.user,
            sender_device: ctx.device.clone(),
            client_msg_id: client_msg_id.clone(),
            kind,
            body,
            media,
            reply_to,
            mentions,
            withheld,
        };
        // (A withheld message's media stays its sender's alone.)
        if let (Some(m), false) = (&event.media, withheld) {
            self.share(m.media_id, &conv).await?;
        }
        let env = Envelope {
            event_id: derive_id::message_sent(ctx.user, &client_msg_id),
            occurred_at: now_millis(),
            actor: Some(ctx.user),
            event: Event::MessageSent(event.clone()),
        };
        // The one durable write of a send.
        self.append(&env).await?;
        self.metrics.messages_sent.inc();
        let mut done = SendDone { message_id: event.message_id, sent_at: env.occurred_at, decided: false };
        if retry {
            // The first attempt may be in the log already, not yet decided: the fan-out keeps the
            // first of the two in log order, and its record says which one that is.
            let rec = self.decided(&conv, ctx.user, &client_msg_id).await?;
            if rec.content_sha256 != content {
                return Err(reused());
            }
            done = SendDone { message_id: rec.message_id, sent_at: rec.sent_at, decided: true };
        }
        claim.done(done.clone());
        // Direct messages are pushed right after the append (a re-send only if its own append is
        // the message); group messages by the fan-out, which alone knows the members at the
        // message's position.
        if !conv.is_group() && done.message_id == event.message_id {
            self.push_message(ctx, &event, done.sent_at).await;
        }
        self.metrics.send_seconds.observe(started.elapsed().as_secs_f64());
        Ok(sent_frame(r#ref, client_msg_id, conv, done))
    }

    /// The fan-out's decision about a send it has in its log: waits for its record (the fan-out's
    /// lag), up to [`DECISION_WAIT`]; past that the send is durable but undecided, and the client
    /// is told to try again (`unavailable`).
    async fn decided(&self, conv: &ConversationId, sender: UserId, client_msg_id: &str) -> Result<SendRecord, ApiError> {
        let deadline = Instant::now() + DECISION_WAIT;
        let mut step = Duration::from_millis(2);
        loop {
            if let Some(rec) = self.store.send_record(conv, sender, client_msg_id).await? {
                return Ok(rec);
            }
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the message is stored but not processed yet; send it again with retry: true",
                ));
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(Duration::from_millis(100));
        }
    }

    async fn push_message(&self, ctx: &ConnCtx, m: &MessageSent, sent_at: DateTime<Utc>) {
        let frame = ServerFrame::from_item(&StreamItem::Message {
            message_id: m.message_id,
            conversation_id: m.conversation_id.clone(),
            sender: m.sender,
            client_msg_id: m.client_msg_id.clone(),
            message_kind: m.kind,
            body: m.body.clone(),
            sent_at,
            sender_device: None,
            position: None,
            media: m.media.clone(),
            reply_to: m.reply_to,
            mentions: m.mentions.clone(),
            withheld: false,
        });
        let text: Arc<str> = Arc::from(frame.to_text());
        let at = Some(sent_at.timestamp_millis());
        let mut pushes = vec![Push { user: ctx.user, text: text.clone(), except: Some(ctx.conn.clone()), sent_at_ms: at }];
        if let (Some(peer), false) = (m.conversation_id.peer_of(ctx.user), m.withheld) {
            pushes.insert(0, Push { user: peer, text, except: None, sent_at_ms: at });
        }
        self.push(pushes).await;
    }

    pub(crate) async fn push(&self, pushes: Vec<Push>) {
        if let Err(e) = self.routing.push(pushes).await {
            // The durable path (sync) still delivers; the push was only the fast path.
            warn!(error = %e, "push failed");
        }
    }

    /// The conversation, if `user` is a member of it now (groups: per the projection, waiting
    /// briefly for a group that was just created).
    pub(crate) async fn member_conv(&self, user: UserId, conversation_id: &str) -> Result<ConversationId, ApiError> {
        let c = parse_conv(conversation_id)?;
        let member = if c.is_group() { self.active_member(&c, user).await?.is_some() } else { c.has_member(user) };
        if !member {
            return Err(ApiError::not_found());
        }
        Ok(c)
    }

    /// Whether `id` names a message of `conv` that `user` may acknowledge (`theirs`: sent by
    /// another member) or read up to (any member's). The id's tag answers with no lookup
    /// ([`crate::message_ids`]); an id minted before tags (or under another secret) is looked up
    /// in the message index, which lags the log a little.
    async fn known_message(&self, conv: &ConversationId, id: MessageId, user: UserId, theirs: bool) -> Result<bool, ApiError> {
        let ids = self.tokens.message_ids();
        let tagged = match conv.direct_members() {
            Some((a, b)) => {
                let peer = if a == user { b } else { a };
                ids.verify(id, conv, peer) || (!theirs && ids.verify(id, conv, user))
            }
            // A group's tag binds the group only; the fan-out ignores a member's ack of their own.
            None => ids.verify(id, conv, user),
        };
        if tagged {
            return Ok(true);
        }
        Ok(matches!(self.store.find_message(id).await?, Some(m) if &m.conversation_id == conv && (!theirs || m.sender != user)))
    }

    /// This device received these messages: one `message.delivered` each, then receipts pushed
    /// to the sender.
    pub async fn delivered(&self, ctx: &ConnCtx, conversation_id: &str, message_ids: &[String]) -> Result<(), ApiError> {
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        if message_ids.is_empty() || message_ids.len() > self.limits.max_ids_per_ack {
            return Err(bad("invalid_frame", format!("give 1-{} message ids", self.limits.max_ids_per_ack)));
        }
        let ids: Vec<MessageId> = message_ids.iter().map(|s| parse_message_id(s)).collect::<Result<_, _>>()?;
        // Only messages of this conversation sent by another member can be acknowledged.
        let checks = futures::future::join_all(ids.iter().map(|m| self.known_message(&conv, *m, ctx.user, true))).await;
        for known in checks {
            if !known? {
                return Err(ApiError::not_found());
            }
        }
        let now = now_millis();
        let envs: Vec<Envelope> = ids
            .iter()
            .map(|m| Envelope {
                event_id: derive_id::message_delivered(*m, ctx.user, &ctx.device),
                occurred_at: now,
                actor: Some(ctx.user),
                event: Event::MessageDelivered(MessageDelivered {
                    message_id: *m,
                    conversation_id: conv.clone(),
                    recipient: ctx.user,
                    device_id: ctx.device.clone(),
                }),
            })
            .collect();
        let batch = envs.iter().map(|e| (self.topics.name(e.event.topic_kind()), e.key(), e.encode())).collect();
        for r in self.log.append_batch(batch).await {
            r?;
        }
        if let Some(peer) = conv.peer_of(ctx.user) {
            let pushes = ids
                .iter()
                .map(|m| Push {
                    user: peer,
                    text: Arc::from(
                        ServerFrame::Receipt {
                            conversation_id: conv.clone(),
                            message_id: *m,
                            status: ReceiptStatus::Delivered,
                            by: ctx.user,
                            at: now,
                            all: false,
                            device_id: None,
                        }
                        .to_text(),
                    ),
                    except: None,
                    sent_at_ms: None,
                })
                .collect();
            self.push(pushes).await;
        }
        Ok(())
    }

    /// The user read the conversation up to a message.
    pub async fn read(&self, ctx: &ConnCtx, conversation_id: &str, up_to: &str) -> Result<(), ApiError> {
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        let up_to = parse_message_id(up_to)?;
        if !self.known_message(&conv, up_to, ctx.user, false).await? {
            return Err(ApiError::not_found());
        }
        // Read receipts of a direct conversation follow both members' settings, as they are now.
        // When the settings cannot be read (the tables are down), the read sends no receipt: a
        // read needs the log, not the tables, and in doubt privacy wins.
        let private = match conv.peer_of(ctx.user) {
            Some(peer) => !self.read_receipt_sent(ctx.user, peer).await.unwrap_or(false),
            None => false,
        };
        let env = Envelope::new(
            derive_id::message_read(&conv, ctx.user, up_to),
            Some(ctx.user),
            Event::MessageRead(MessageRead { private, conversation_id: conv.clone(), reader: ctx.user, device_id: ctx.device.clone(), up_to }),
        );
        self.append(&env).await?;
        // The user's other devices follow at once (their unread counts, their "read" marks); the
        // stream's `read` item is the certain path.
        let mut pushes = vec![Push {
            user: ctx.user,
            text: Arc::from(ServerFrame::Read { conversation_id: conv.clone(), up_to, at: env.occurred_at }.to_text()),
            except: Some(ctx.conn.clone()),
            sent_at_ms: None,
        }];
        if let (Some(peer), false) = (conv.peer_of(ctx.user), private) {
            pushes.push(Push {
                user: peer,
                text: Arc::from(
                    ServerFrame::Receipt {
                        conversation_id: conv,
                        message_id: up_to,
                        status: ReceiptStatus::Seen,
                        by: ctx.user,
                        at: env.occurred_at,
                        all: false,
                        device_id: None,
                    }
                    .to_text(),
                ),
                except: None,
                sent_at_ms: None,
            });
        }
        self.push(pushes).await;
        Ok(())
    }

    /// Items of the user's stream after a cursor. Only items the projection has written are
    /// returned, and it writes each user's items in cursor order, so a cursor never passes a
    /// hole.
    pub async fn sync(&self, ctx: &ConnCtx, r#ref: Ref, after: Option<String>, limit: Option<usize>) -> Result<ServerFrame, ApiError> {
        let after_seq: i64 = match &after {
            None => -1,
            Some(s) => match s.parse::<i64>() {
                Ok(v) if v >= -1 => v,
                _ => return Err(bad("invalid_cursor", "cursor is not one this server issued")),
            },
        };
        let limit = limit.unwrap_or(100).clamp(1, self.limits.max_sync);
        let rows = self.store.stream_after(ctx.user, after_seq, limit + 1).await?;
        let has_more = rows.len() > limit;
        let mut items = Vec::with_capacity(rows.len().min(limit));
        for row in rows.into_iter().take(limit) {
            let mut item: StreamItem = serde_json::from_str(&row.item).map_err(|e| ApiError::internal("stream item", &e))?;
            // Nothing tells the sender of a withheld message that it was.
            if let StreamItem::Message { withheld, .. } = &mut item {
                *withheld = false;
            }
            items.push(SyncItem { cursor: row.seq.to_string(), item });
        }
        let cursor = items.last().map(|i| i.cursor.clone()).or(after);
        Ok(ServerFrame::Sync { r#ref, items, cursor, has_more })
    }

    /// Tells the other member that this user is typing. Ephemeral: nothing is appended.
    pub async fn typing(&self, ctx: &ConnCtx, conversation_id: &str) -> Result<(), ApiError> {
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        let others: Vec<UserId> = match conv.peer_of(ctx.user) {
            // Neither member of a block sees the other typing.
            Some(peer) => {
                let (theirs, mine) = tokio::try_join!(self.blocks(peer, ctx.user), self.blocks(ctx.user, peer))?;
                if theirs || mine {
                    return Ok(());
                }
                vec![peer]
            }
            None => self.active_members(&conv).await?.into_iter().map(|m| m.member).filter(|m| *m != ctx.user).collect(),
        };
        let text: Arc<str> = Arc::from(ServerFrame::Typing { conversation_id: conv, from: ctx.user }.to_text());
        self.push(others.into_iter().map(|u| Push { user: u, text: text.clone(), except: None, sent_at_ms: None }).collect()).await;
        Ok(())
    }

    // ----- presence -----

    /// A connection opened. If it is the user's first, the user came online.
    /// A connection opened: registered for routing. True when it is the user's first (the
    /// caller then announces them online with [`Chat::went_online`]).
    pub async fn connected(&self, ctx: &ConnCtx) -> bool {
        match self.routing.connect(ctx.user, &ctx.conn).await {
            Ok(first) => first,
            Err(e) => {
                warn!(error = %e, "routing registration failed; pushes to this connection may be lost until the next heartbeat");
                false
            }
        }
    }

    /// Appends the user's `presence.changed` online and pushes it to their contacts.
    pub async fn went_online(&self, user: UserId) {
        self.presence_changed(user, PresenceStatus::Online).await
    }

    /// A connection closed. If it was the user's last, the user went offline.
    pub async fn disconnected(&self, ctx: &ConnCtx) {
        match self.routing.disconnect(ctx.user, &ctx.conn).await {
            Ok(true) => self.presence_changed(ctx.user, PresenceStatus::Offline).await,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "routing removal failed; the entry expires after the TTL"),
        }
    }

    /// Declares offline the users whose every connection died with a crashed node.
    pub async fn reap_dead_connections(&self) {
        match self.routing.reap(500).await {
            Ok(users) => {
                for u in users {
                    self.presence_changed(u, PresenceStatus::Offline).await;
                }
            }
            Err(e) => warn!(error = %e, "presence reaper failed"),
        }
    }

    async fn presence_changed(&self, user: UserId, status: PresenceStatus) {
        let env = Envelope::new(EventId::new_v7(), Some(user), Event::PresenceChanged(PresenceChanged { user_id: user, status }));
        if let Err(e) = self.append(&env).await {
            warn!(error = ?e, "presence event not appended");
        }
        let contacts = match self.presence_audience(user).await {
            Ok(contacts) => contacts,
            Err(e) => {
                warn!(error = ?e, "presence audience unavailable; presence not pushed");
                return;
            }
        };
        let last_seen = (status == PresenceStatus::Offline).then_some(env.occurred_at);
        let text: Arc<str> = Arc::from(ServerFrame::Presence { user_id: user, status: status.as_str(), last_seen }.to_text());
        let pushes = contacts.into_iter().map(|c| Push { user: c, text: text.clone(), except: None, sent_at_ms: None }).collect();
        debug!(%user, status = status.as_str(), "presence changed");
        self.push(pushes).await;
    }

    /// The user's contacts: the other members of their direct conversations in which both of
    /// them wrote (one who only received, or only sent, is not a contact). Only contacts see a
    /// user's presence and last seen.
    pub(crate) async fn contacts(&self, user: UserId) -> Result<Vec<UserId>, chat_store::StoreError> {
        let mine: Vec<(UserId, ConversationId)> =
            self.store.inbox(user, 1000).await?.into_iter().filter(|r| r.wrote).filter_map(|r| r.peer_id.map(|p| (p, r.conversation_id))).collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let theirs = self.store.inbox_rows(&mine).await?;
        Ok(mine.into_iter().zip(theirs).filter(|(_, row)| row.as_ref().is_some_and(|r| r.wrote)).map(|((peer, _), _)| peer).collect())
    }

    /// Whether two users are contacts (see [`Chat::contacts`]).
    pub(crate) async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool, chat_store::StoreError> {
        let conv = ConversationId::direct(a, b);
        let rows = self.store.inbox_rows(&[(a, conv.clone()), (b, conv)]).await?;
        Ok(rows.iter().all(|r| r.as_ref().is_some_and(|r| r.wrote)))
    }

    /// The welcome frame's `pending`: the user's unread messages over their conversations.
    pub async fn pending(&self, user: UserId) -> usize {
        self.store.unread_count(user, 10_000).await.unwrap_or(0)
    }

    // ----- HTTP reads -----

    pub async fn conversations(&self, user: UserId) -> Result<Vec<InboxRow>, ApiError> {
        let mut rows = self.store.inbox(user, 1000).await?;
        rows.sort_by(|a, b| b.last_at.cmp(&a.last_at).then(b.last_message_id.cmp(&a.last_message_id)));
        Ok(rows)
    }

    pub async fn history(&self, user: UserId, conversation_id: &str, before: Option<&str>, limit: Option<usize>) -> Result<HistoryPage, ApiError> {
        let conv = parse_conv(conversation_id)?;
        if conv.is_group() {
            let page = self.group_history(user, &conv, before, limit).await?;
            return self.finish_page(user, &conv, page).await;
        }
        if !conv.has_member(user) {
            return Err(ApiError::not_found());
        }
        let before = match before {
            Some(b) => Some(b.parse::<MessageId>().map_err(|_| bad("invalid_cursor", "cursor is not one this server issued"))?),
            None => None,
        };
        let limit = limit.unwrap_or(50).clamp(1, self.limits.max_page);
        let mut messages = self.store.history_page(&conv, before, limit + 1).await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        let next_cursor = if more { messages.last().map(|m| m.message_id.to_string()) } else { None };
        self.finish_page(user, &conv, HistoryPage { messages, next_cursor }).await
    }

    pub async fn receipts(&self, user: UserId, message_id: &str) -> Result<MessageReceipts, ApiError> {
        let id: MessageId = message_id.parse().map_err(|_| ApiError::not_found())?;
        let meta = self.store.find_message(id).await?.ok_or_else(ApiError::not_found)?;
        let visible = if meta.conversation_id.is_group() {
            meta.sender == user || self.saw_position(user, &meta.conversation_id, meta.position).await?
        } else {
            meta.conversation_id.has_member(user)
                && (meta.sender == user || self.visible_message(&meta.conversation_id, id, user).await?.is_some())
        };
        if !visible {
            return Err(ApiError::not_found());
        }
        let t = crate::insights::AuditTimeline::of(self.store.as_ref(), &meta).await?;
        Ok(MessageReceipts { message_id: id, conversation_id: t.conversation_id, sender: t.sender, summary: t.summary, receipts: t.receipts })
    }

    pub async fn last_seen(&self, viewer: UserId, user_id: &str) -> Result<LastSeen, ApiError> {
        let user: UserId = user_id.parse().map_err(|_| ApiError::not_found())?;
        // Presence is visible to the user and to whom their last-seen setting admits (by
        // default their contacts: both wrote in their direct conversation); to anyone else the
        // user does not exist.
        if !self.shown(user, viewer, crate::privacy::Shown::LastSeen).await? {
            return Err(ApiError::not_found());
        }
        let online = self
            .routing
            .online(&[user])
            .await
            .map_err(|e| ApiError::unavailable("routing", &e))?
            .first()
            .copied()
            .unwrap_or(false);
        let row = self.store.last_seen(user).await?;
        Ok(LastSeen { user_id: user, online, last_seen: row.and_then(|r| r.last_seen).map(|t| chat_events::format_time(&t)) })
    }

    /// Readiness of every dependency.
    pub async fn readiness(&self) -> Vec<(&'static str, bool)> {
        let (log, store, routing) = tokio::join!(self.log.ping(), self.store.ping(), self.routing.ping());
        vec![("event_log", log), ("store", store), ("routing", routing)]
    }
}

/// The command-side mark of a banned account, kept with the roles (`user_roles`, read at
/// log-in; `chat user ban`), never put in a token.
pub const BANNED: &str = "banned";

/// A valid argon2 hash of a random password, verified against when the username is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2n4nDbHx4JtJ2rXqzJ0v1mJ3u8xP1h8m6R0jQ3y8e3o";

fn sent_frame(r#ref: Ref, client_msg_id: String, conversation_id: ConversationId, done: SendDone) -> ServerFrame {
    ServerFrame::Sent { r#ref, client_msg_id, message_id: done.message_id, conversation_id, sent_at: done.sent_at }
}

#[cfg(test)]
mod tests {
    use super::displayable;

    #[test]
    fn names_with_control_bidi_or_invisible_characters_are_refused() {
        assert!(displayable("Ana María 🎉 عربى"));
        for bad in ["evil\u{202E}txt.exe", "a\u{200B}b", "tab\there", "nul\0", "\u{2066}iso", "bom\u{FEFF}", "soft\u{00AD}hyphen", "line\nbreak"] {
            assert!(!displayable(bad), "{bad:?}");
        }
    }

    #[test]
    fn common_passwords_and_the_username_are_too_guessable() {
        for weak in ["password", "12345678", "        ", "qwertyuiop", "alice2024", "Password1", "iloveyou"] {
            assert!(super::too_guessable("alice2024", weak), "{weak:?}");
        }
        for strong in ["correct horse battery", "load generator password", "tram-violet-51-oak", "Zürich Bahnhof um 7"] {
            assert!(!super::too_guessable("alice", strong), "{strong:?}");
        }
    }
}

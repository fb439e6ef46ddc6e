//! Profiles, roles, analytics and audit tables.
//!
//! Analytics are idempotent: a replay or a redelivered event changes no number. Active users,
//! profile views and topic mentions are sets (one row per counted thing, keyed by what makes it
//! unique; a number is the size of a set at query time). Messages are counted per deliveries
//! partition (`analytics_message_counts`: the count and the offset it reaches, written whole by
//! the partition's single projector, the row reaching further winning), never in Cassandra
//! counter columns.

use async_trait::async_trait;
use chat_events::UserId;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::{ReceiptRow, StoreError, StoreResult};

/// A user's public profile.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileRow {
    pub user_id: UserId,
    pub display_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_media_id: Option<uuid::Uuid>,
    #[serde(serialize_with = "crate::ser_time")]
    pub updated_at: DateTime<Utc>,
}

/// Messages of one day, kind and scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageCount {
    pub day: NaiveDate,
    /// text, image, audio, video
    pub kind: String,
    /// direct or group
    pub scope: String,
    pub messages: u64,
}

/// Profile views of one user on one day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProfileViews {
    pub day: NaiveDate,
    pub views: u64,
    /// Distinct viewers with their number of views that day, most views first.
    pub viewers: Vec<(UserId, u64)>,
}

/// Mentions of one topic on one day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopicCount {
    pub day: NaiveDate,
    pub topic: String,
    pub messages: u64,
    /// Distinct senders of those messages.
    pub users: u64,
}

/// Command-side roles (checked at log-in) and the profile, analytics and audit projections.
#[async_trait]
pub trait InsightStore: Send + Sync {
    // --- roles (command side: written before the event, read at log-in) ---
    async fn set_role(&self, user: UserId, role: &str, granted: bool) -> StoreResult<()>;
    async fn roles(&self, user: UserId) -> StoreResult<Vec<String>>;

    // --- session revocations (command side: written by what ends sessions, polled by every node) ---
    /// Ends every session (token) of `user` issued at or before `at` (a role change, a log-out
    /// everywhere). Kept for [`REVOCATIONS_KEPT`]; repeating one changes nothing.
    async fn revoke_sessions(&self, user: UserId, at: DateTime<Utc>) -> StoreResult<()>;
    /// The revocations with `at >= since` (at most [`REVOCATIONS_KEPT`] old), oldest first, a
    /// user's later revocation after its earlier one.
    async fn revocations_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<(UserId, DateTime<Utc>)>>;

    // --- profiles (latest `updated_at` wins, in any order) ---
    async fn profile(&self, user: UserId) -> StoreResult<Option<ProfileRow>>;

    // --- analytics (sets) ---
    /// Message counts for the days in `[from, to]`, every (kind, scope) with at least one;
    /// oldest day first, then kind and scope in the order of [`MESSAGE_KINDS`] and
    /// [`MESSAGE_SCOPES`].
    async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<MessageCount>>;
    /// Distinct active users per day in `[from, to]` (days with none omitted), oldest first.
    async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<(NaiveDate, u64)>>;
    /// Views of one user per day in `[from, to]` (days with none omitted), oldest first; viewers
    /// with equal views by user id.
    async fn profile_views(&self, viewed: UserId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<ProfileViews>>;
    /// Topic mentions per day in `[from, to]`, oldest day first, most mentioned first within a
    /// day (equal counts by topic).
    async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<TopicCount>>;

    // --- audit ---
    /// Receipts of one recipient (every message, status and device) with `from <= at < to`,
    /// ordered by time, then message id, status and device. (`put_receipts` writes this view
    /// too, with the same earliest-`at`-wins rule.)
    async fn receipts_of_user(&self, user: UserId, from: DateTime<Utc>, to: DateTime<Utc>) -> StoreResult<Vec<ReceiptRow>>;
}

/// How long a session revocation is kept: longer than any token lives (the gateway refuses a
/// token lifetime above it).
pub const REVOCATIONS_KEPT: chrono::Duration = chrono::Duration::days(7);

/// The kinds a message can have, for analytics.
pub const MESSAGE_KINDS: &[&str] = &["text", "image", "audio", "video"];
/// The scopes of a message.
pub const MESSAGE_SCOPES: &[&str] = &["direct", "group"];

/// Checks a message statistic's kind and scope (a [`crate::Write::MessageCount`] of another is refused).
pub(crate) fn check_message_stat(kind: &str, scope: &str) -> StoreResult<()> {
    if !MESSAGE_KINDS.contains(&kind) {
        return Err(StoreError::Data(format!("unknown message kind {kind:?} for analytics")));
    }
    if !MESSAGE_SCOPES.contains(&scope) {
        return Err(StoreError::Data(format!("unknown message scope {scope:?} for analytics")));
    }
    Ok(())
}

/// The days of `[from, to]`, oldest first (none when `from > to`).
pub(crate) fn days(from: NaiveDate, to: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    from.iter_days().take_while(move |d| *d <= to)
}

fn position(list: &[&str], s: &str) -> usize {
    list.iter().position(|x| *x == s).unwrap_or(list.len())
}

// The orders below are what both back-ends answer in: each sorts its rows with them, so the two
// cannot drift whatever order their queries return rows in.

pub(crate) fn sort_message_counts(rows: &mut [MessageCount]) {
    rows.sort_by(|a, b| {
        (a.day, position(MESSAGE_KINDS, &a.kind), position(MESSAGE_SCOPES, &a.scope))
            .cmp(&(b.day, position(MESSAGE_KINDS, &b.kind), position(MESSAGE_SCOPES, &b.scope)))
    });
}

/// Groups `(day, viewer, views)` counts into days, most views first.
pub(crate) fn profile_views_from(rows: impl IntoIterator<Item = (NaiveDate, UserId, u64)>) -> Vec<ProfileViews> {
    let mut by_day: std::collections::BTreeMap<NaiveDate, Vec<(UserId, u64)>> = std::collections::BTreeMap::new();
    for (day, viewer, n) in rows {
        if n > 0 {
            by_day.entry(day).or_default().push((viewer, n));
        }
    }
    by_day
        .into_iter()
        .map(|(day, mut viewers)| {
            viewers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            ProfileViews { day, views: viewers.iter().map(|v| v.1).sum(), viewers }
        })
        .collect()
}

pub(crate) fn sort_topic_counts(rows: &mut [TopicCount]) {
    rows.sort_by(|a, b| a.day.cmp(&b.day).then(b.messages.cmp(&a.messages)).then(a.topic.cmp(&b.topic)));
}

/// A message's timeline as read from `receipts`, where a transition that happened again (a
/// device acknowledging a message a second time, after a reconnect) is a row of its own: the
/// earliest row per recipient, status and device, in time order.
pub(crate) fn first_transitions(mut rows: Vec<ReceiptRow>) -> Vec<ReceiptRow> {
    rows.sort_by(|a, b| (a.at, a.recipient, a.status, &a.device_id).cmp(&(b.at, b.recipient, b.status, &b.device_id)));
    let mut seen = std::collections::HashSet::new();
    rows.retain(|r| seen.insert((r.recipient, r.status, r.device_id.clone())));
    rows
}

pub(crate) fn sort_receipts_of_user(rows: &mut [ReceiptRow]) {
    rows.sort_by(|a, b| {
        (a.at, a.message_id, a.status, &a.device_id).cmp(&(b.at, b.message_id, b.status, &b.device_id))
    });
}

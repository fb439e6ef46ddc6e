//! Profiles, analytics (role `analyst`) and audit (role `auditor`).
//!
//! Opening someone's profile is an event (`profile.viewed`), so analysts can see who opens a
//! person's profile often. Every audit read appends `audit.accessed` *before* answering: an
//! auditor never reads without a record of it.

use axum::http::StatusCode;
use chat_events::{
    format_time, AuditAccessed, ConversationId, Envelope, Event, EventId, MessageId, ProfileUpdated, ProfileViewed, UserId,
};
use chat_store::{MessageCount, ProfileRow, ProfileViews, ReceiptRow, TopicCount};

/// Views of one user's profile on one day, for analysts.
#[derive(Debug, Serialize)]
pub struct ProfileViewCount {
    pub day: NaiveDate,
    pub views: u64,
    /// Distinct viewers.
    pub viewers: u64,
}
use chrono::{DateTime, Duration as Days, NaiveDate, Utc};
use serde::Serialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::service::{Chat, ReceiptSummary};

/// The longest date range an analytics or audit query may span.
const MAX_DAYS: i64 = 366;

/// A profile as others see it.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub user_id: UserId,
    pub username: String,
    pub display_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_media_id: Option<uuid::Uuid>,
}

/// One version of a message's text.
#[derive(Debug, Serialize)]
pub struct MessageVersion {
    #[serde(serialize_with = "ser_time")]
    pub at: DateTime<Utc>,
    pub body: String,
}

/// A message with its edit history, for auditors.
#[derive(Debug, Serialize)]
pub struct AuditEdits {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    #[serde(serialize_with = "ser_time")]
    pub sent_at: DateTime<Utc>,
    /// The text now (empty once deleted).
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_time")]
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
    /// The text as sent, then each edit, oldest first; empty for a message never edited, and
    /// once deleted.
    pub versions: Vec<MessageVersion>,
}

/// The receipt timeline of a message, for auditors.
#[derive(Debug, Serialize)]
pub struct AuditTimeline {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    #[serde(serialize_with = "ser_time")]
    pub sent_at: DateTime<Utc>,
    pub summary: ReceiptSummary,
    pub receipts: Vec<ReceiptRow>,
}

impl AuditTimeline {
    /// Every recipient's every transition for one message, oldest first: what the stored
    /// timeline has, and a direct message's `sent` transition from the message's own row when
    /// the timeline does not have it yet (not projected yet, or projected by a layout before 4).
    /// One code path for the HTTP endpoints and `chat audit receipts`.
    pub async fn of(store: &dyn crate::service::GatewayStore, meta: &chat_store::MessageMeta) -> Result<AuditTimeline, chat_store::StoreError> {
        let mut receipts = store.receipts(meta.message_id).await?;
        if let Some(peer) = meta.conversation_id.peer_of(meta.sender) {
            if !receipts.iter().any(|r| r.status == chat_events::ReceiptStatus::Sent && r.recipient == peer) {
                receipts.push(ReceiptRow {
                    message_id: meta.message_id,
                    sender: meta.sender,
                    recipient: peer,
                    status: chat_events::ReceiptStatus::Sent,
                    device_id: String::new(),
                    at: meta.sent_at,
                    conversation_id: meta.conversation_id.clone(),
                });
            }
        }
        receipts.sort_by(|a, b| (a.at, a.recipient, a.status, &a.device_id).cmp(&(b.at, b.recipient, b.status, &b.device_id)));
        let summary = ReceiptSummary::of(&receipts);
        Ok(AuditTimeline { message_id: meta.message_id, conversation_id: meta.conversation_id.clone(), sender: meta.sender, sent_at: meta.sent_at, summary, receipts })
    }
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn forbidden(what: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this needs the {what} role"))
}

/// Requires a role.
pub fn require(p: &Principal, role: &str) -> Result<(), ApiError> {
    if p.has_role(role) {
        Ok(())
    } else {
        Err(forbidden(role))
    }
}

/// Refuses read-only (auditor) callers.
pub fn writer(p: &Principal) -> Result<(), ApiError> {
    if p.read_only() {
        Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "auditor accounts are read-only"))
    } else {
        Ok(())
    }
}

/// A `[from, to]` day range from `YYYY-MM-DD` parameters (default: the last 7 days).
pub fn day_range(from: Option<&str>, to: Option<&str>) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let parse = |v: &str| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| ApiError::bad_request("invalid_date", format!("{v:?} is not a YYYY-MM-DD date")))
    };
    let to = match to {
        Some(t) => parse(t)?,
        None => Utc::now().date_naive(),
    };
    let from = match from {
        Some(f) => parse(f)?,
        None => to - Days::days(6),
    };
    if from > to || (to - from).num_days() >= MAX_DAYS {
        return Err(ApiError::bad_request("invalid_range", format!("from must not be after to, and a range spans at most {MAX_DAYS} days")));
    }
    Ok((from, to))
}

/// A `[from, to)` time range from RFC 3339 parameters (default: the last 7 days).
pub fn time_range(from: Option<&str>, to: Option<&str>) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let parse = |v: &str| {
        DateTime::parse_from_rfc3339(v)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::bad_request("invalid_time", format!("{v:?} is not an RFC 3339 time")))
    };
    let to = match to {
        Some(t) => parse(t)?,
        None => Utc::now(),
    };
    let from = match from {
        Some(f) => parse(f)?,
        None => to - Days::days(7),
    };
    if from >= to || (to - from).num_days() >= MAX_DAYS {
        return Err(ApiError::bad_request("invalid_range", format!("from must be before to, and a range spans at most {MAX_DAYS} days")));
    }
    Ok((from, to))
}

impl Chat {
    async fn append_event(&self, actor: Option<UserId>, event: Event) -> Result<Envelope, ApiError> {
        let env = Envelope::new(EventId::new_v7(), actor, event);
        chat_events::append_event(self.log.as_ref(), &self.topics, &env).await.map_err(ApiError::from)?;
        Ok(env)
    }

    /// Sets the caller's display name and avatar (an image the caller uploaded).
    pub async fn update_profile(&self, user: UserId, display_name: &str, avatar: Option<&str>) -> Result<(), ApiError> {
        let display_name = display_name.trim().to_owned();
        if display_name.is_empty() || display_name.chars().count() > 64 || !crate::service::displayable(&display_name) {
            return Err(ApiError::bad_request(
                "invalid_display_name",
                "display names are 1-64 characters, without control, bidirectional or invisible formatting characters",
            ));
        }
        let avatar_media_id = match avatar {
            None => None,
            Some(a) => Some(self.own_image(user, a).await?),
        };
        self.append_event(Some(user), Event::ProfileUpdated(ProfileUpdated { user_id: user, display_name, avatar_media_id })).await?;
        Ok(())
    }

    /// A user's profile; opening someone else's is recorded (`profile.viewed`).
    pub async fn view_profile(&self, viewer: UserId, user_id: &str) -> Result<Profile, ApiError> {
        let user: UserId = user_id.parse().map_err(|_| ApiError::not_found())?;
        let username = self.store.account_by_id(user).await?.ok_or_else(ApiError::not_found)?;
        if viewer != user {
            self.append_event(Some(viewer), Event::ProfileViewed(ProfileViewed { viewer, viewed: user })).await?;
        }
        let row: Option<ProfileRow> = self.store.profile(user).await?;
        // The photo only for whom the user's photo setting admits.
        let photo = row.as_ref().is_some_and(|r| r.avatar_media_id.is_some()) && self.shown(user, viewer, crate::privacy::Shown::Photo).await?;
        Ok(Profile {
            user_id: user,
            display_name: row.as_ref().map(|r| r.display_name.clone()).unwrap_or_else(|| username.clone()),
            avatar_media_id: row.and_then(|r| r.avatar_media_id).filter(|_| photo),
            username,
        })
    }

    pub async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<MessageCount>, ApiError> {
        Ok(self.store.message_counts(from, to).await?)
    }

    pub async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<(NaiveDate, u64)>, ApiError> {
        Ok(self.store.active_users(from, to).await?)
    }

    /// Views of a user's profile per day, as aggregates: the views and the number of distinct
    /// viewers, never who they were.
    pub async fn profile_views(&self, user: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<ProfileViewCount>, ApiError> {
        let user: UserId = user.parse().map_err(|_| ApiError::bad_request("invalid_user", "user is a user id"))?;
        let days = self.store.profile_views(user, from, to).await?;
        Ok(days.into_iter().map(|d: ProfileViews| ProfileViewCount { day: d.day, views: d.views, viewers: d.viewers.len() as u64 }).collect())
    }

    /// Topic mentions per day, only topics used by at least `analytics_min_users` distinct
    /// senders that day (a hashtag of one private conversation is not shown).
    pub async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<TopicCount>, ApiError> {
        let min = self.limits.analytics_min_users as u64;
        Ok(self.store.topic_counts(from, to).await?.into_iter().filter(|t| t.users >= min).collect())
    }

    async fn audit_record(&self, auditor: &Principal, action: &str, target: Option<String>, from: Option<String>, to: Option<String>) -> Result<(), ApiError> {
        let event = AuditAccessed { auditor: Some(auditor.user_id), via: "http".into(), action: action.into(), target, from, to };
        self.append_event(Some(auditor.user_id), Event::AuditAccessed(event)).await.map(|_| ())
    }

    /// Every recipient's every transition for one message (any message: auditors are not
    /// limited to their own conversations).
    pub async fn audit_message(&self, auditor: &Principal, message_id: &str) -> Result<AuditTimeline, ApiError> {
        let id: MessageId = message_id.parse().map_err(|_| ApiError::not_found())?;
        self.audit_record(auditor, "message_receipts", Some(id.to_string()), None, None).await?;
        let meta = self.store.find_message(id).await?.ok_or_else(ApiError::not_found)?;
        Ok(AuditTimeline::of(self.store.as_ref(), &meta).await?)
    }

    /// A message's edit history (any message, like its receipt timeline).
    pub async fn audit_edits(&self, auditor: &Principal, message_id: &str) -> Result<AuditEdits, ApiError> {
        let id: MessageId = message_id.parse().map_err(|_| ApiError::not_found())?;
        self.audit_record(auditor, "message_edits", Some(id.to_string()), None, None).await?;
        let meta = self.store.find_message(id).await?.ok_or_else(ApiError::not_found)?;
        let next = MessageId(uuid::Uuid::from_u128(id.as_uuid().as_u128().saturating_add(1)));
        let row = self.store.history_page(&meta.conversation_id, Some(next), 1).await?.into_iter().find(|m| m.message_id == id);
        let row = row.ok_or_else(ApiError::not_found)?;
        let versions = self.store.message_versions(id).await?.into_iter().map(|(at, body)| MessageVersion { at, body }).collect();
        Ok(AuditEdits {
            message_id: id,
            conversation_id: meta.conversation_id,
            sender: meta.sender,
            sent_at: meta.sent_at,
            body: row.body,
            edited_at: row.edited_at,
            deleted: row.deleted,
            versions,
        })
    }

    /// Every receipt of one user (as a recipient) in a time range.
    pub async fn audit_user(&self, auditor: &Principal, user_id: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<ReceiptRow>, ApiError> {
        let user: UserId = user_id.parse().map_err(|_| ApiError::not_found())?;
        self.audit_record(auditor, "user_receipts", Some(user.to_string()), Some(format_time(&from)), Some(format_time(&to))).await?;
        Ok(self.store.receipts_of_user(user, from, to).await?)
    }

    /// Daily message metrics by kind and scope.
    pub async fn audit_daily(&self, auditor: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<MessageCount>, ApiError> {
        self.audit_record(auditor, "daily_metrics", None, Some(from.to_string()), Some(to.to_string())).await?;
        Ok(self.store.message_counts(from, to).await?)
    }

    /// An image the user uploaded, for an avatar: it becomes readable by every user.
    pub(crate) async fn own_image(&self, user: UserId, media_id: &str) -> Result<uuid::Uuid, ApiError> {
        let unknown = || ApiError::bad_request("unknown_media", "no such media");
        let id: uuid::Uuid = media_id.parse().map_err(|_| unknown())?;
        let m = self.store.media(id).await?.ok_or_else(unknown)?;
        if m.uploader != user {
            return Err(unknown());
        }
        if m.kind != "image" {
            return Err(ApiError::bad_request("media_kind_mismatch", "an avatar is an image"));
        }
        self.store.set_media_public(id).await?;
        Ok(id)
    }
}

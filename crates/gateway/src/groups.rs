//! Groups at the gateway: the commands (create, rename, add, remove, leave) and the reads.
//!
//! Commands are checked against the group projections (is the caller an admin, is the member
//! in the group, is there room) so that a client gets a clear error at once; the fan-out stage
//! then decides for good at the event's position in the log, and its decision is what every
//! member's stream and every projection reflect. A command that loses a race (say, two admins
//! removing each other) is accepted here and ignored there; clients learn the outcome from the
//! `group` items of their stream.

use std::time::Duration;

use axum::http::StatusCode;
use chat_events::{
    ConversationId, Envelope, Event, EventId, GroupCreated, GroupId, GroupMemberAdded, GroupMemberRemoved, GroupRenamed,
    GroupRole, MessageId, UserId,
};
use chat_store::{GroupMemberRow, UserGroupRow};
use serde::Serialize;

use crate::error::ApiError;
use crate::service::{Chat, HistoryPage};

/// How long a command of a group's creator waits for the group to be projected (a client that
/// created a group and posts to it at once). Only the creator of a group created less than this
/// long ago waits (the group id says who created it and when, see
/// [`crate::message_ids::MessageIds::mint_group`]); every other caller, and any id that names no
/// group, is answered at once, so that an unknown id costs what a foreign one does.
const NEW_GROUP_WAIT: Duration = Duration::from_secs(10);

/// A created group.
#[derive(Debug, Serialize)]
pub struct CreatedGroup {
    pub conversation_id: ConversationId,
    pub group_id: GroupId,
    pub name: String,
}

/// A group with its members.
#[derive(Debug, Serialize)]
pub struct GroupInfo {
    pub conversation_id: ConversationId,
    pub name: String,
    pub members: Vec<GroupMemberRow>,
}

/// A group in the caller's list.
#[derive(Debug, Serialize)]
pub struct MyGroup {
    pub conversation_id: ConversationId,
    pub name: String,
    pub role: GroupRole,
}

fn forbidden() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only group admins can do that")
}

fn valid_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || !crate::service::displayable(name) {
        return Err(ApiError::bad_request(
            "invalid_name",
            "group names are 1-100 characters, without control, bidirectional or invisible formatting characters",
        ));
    }
    Ok(name.to_owned())
}

fn parse_group(s: &str) -> Result<ConversationId, ApiError> {
    s.parse::<ConversationId>().ok().filter(ConversationId::is_group).ok_or_else(ApiError::not_found)
}

impl Chat {
    /// The caller's membership row if they are a member now. The creator of a group created
    /// moments ago waits briefly for it to be projected ([`NEW_GROUP_WAIT`]).
    pub(crate) async fn active_member(&self, conv: &ConversationId, user: UserId) -> Result<Option<GroupMemberRow>, ApiError> {
        let created = conv.group_id().and_then(|g| self.tokens.message_ids().created_by(g, user));
        let wait = created
            .and_then(|at| (at + NEW_GROUP_WAIT - chrono::Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO)
            .min(NEW_GROUP_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // The group row first: the projection writes it after every membership row the
            // creation made, so once it is visible a missing membership really is missing. (Read
            // the other way round, a commit of both between the two reads answered "not a
            // member" to a member.)
            let projected = self.store.group(conv).await?.is_some();
            if let Some(m) = self.store.group_member(conv, user).await? {
                return Ok(m.active.then_some(m));
            }
            if projected || tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn active_members(&self, conv: &ConversationId) -> Result<Vec<GroupMemberRow>, ApiError> {
        Ok(self.store.group_members(conv).await?.into_iter().filter(|m| m.active).collect())
    }

    /// Whether `user` was a member of the group at `position`.
    pub(crate) async fn saw_position(&self, user: UserId, conv: &ConversationId, position: i64) -> Result<bool, ApiError> {
        let intervals = self.store.user_group_intervals(user, conv).await?;
        Ok(intervals.iter().any(|(since, until)| *since < position && until.is_none_or(|u| position < u)))
    }

    async fn admin(&self, conv: &ConversationId, user: UserId) -> Result<(), ApiError> {
        match self.active_member(conv, user).await? {
            None => Err(ApiError::not_found()),
            Some(m) if m.role == GroupRole::Admin => Ok(()),
            Some(_) => Err(forbidden()),
        }
    }

    async fn append_group_event(&self, actor: UserId, event: Event) -> Result<(), ApiError> {
        let env = Envelope::new(EventId::new_v7(), Some(actor), event);
        chat_events::append_event(self.log.as_ref(), &self.topics, &env).await.map(|_| ()).map_err(ApiError::from)
    }

    pub async fn create_group(&self, creator: UserId, name: &str, members: &[String]) -> Result<CreatedGroup, ApiError> {
        let name = valid_name(name)?;
        let mut ids: Vec<UserId> = Vec::new();
        for m in members {
            let id: UserId = m.parse().map_err(|_| ApiError::bad_request("unknown_user", format!("no such user: {m}")))?;
            if id != creator && !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.len() + 1 > self.limits.max_group_size {
            return Err(ApiError::bad_request("group_full", format!("groups have at most {} members", self.limits.max_group_size)));
        }
        let exists = futures::future::try_join_all(ids.iter().map(|u| self.user_exists(*u))).await?;
        if let Some((u, _)) = ids.iter().zip(&exists).find(|(_, e)| !**e) {
            return Err(ApiError::bad_request("unknown_user", format!("no such user: {u}")));
        }
        let group_id = self.tokens.message_ids().mint_group(creator);
        let conversation_id = ConversationId::group(group_id);
        self.append_group_event(
            creator,
            Event::GroupCreated(GroupCreated { conversation_id: conversation_id.clone(), group_id, name: name.clone(), creator, members: ids }),
        )
        .await?;
        Ok(CreatedGroup { conversation_id, group_id, name })
    }

    pub async fn rename_group(&self, actor: UserId, conversation_id: &str, name: &str) -> Result<(), ApiError> {
        let conv = parse_group(conversation_id)?;
        self.admin(&conv, actor).await?;
        let name = valid_name(name)?;
        self.append_group_event(actor, Event::GroupRenamed(GroupRenamed { conversation_id: conv, name })).await
    }

    pub async fn add_member(&self, actor: UserId, conversation_id: &str, member: &str, role: Option<&str>) -> Result<(), ApiError> {
        let conv = parse_group(conversation_id)?;
        self.admin(&conv, actor).await?;
        let member: UserId = member.parse().map_err(|_| ApiError::bad_request("unknown_user", "no such user"))?;
        let role = match role {
            None => GroupRole::Member,
            Some(r) => GroupRole::parse(r).ok_or_else(|| ApiError::bad_request("invalid_role", "role is admin or member"))?,
        };
        if !self.user_exists(member).await? {
            return Err(ApiError::bad_request("unknown_user", "no such user"));
        }
        let members = self.active_members(&conv).await?;
        if members.iter().any(|m| m.member == member) {
            return Err(ApiError::new(StatusCode::CONFLICT, "already_member", "that user is already a member"));
        }
        if members.len() >= self.limits.max_group_size {
            return Err(ApiError::new(StatusCode::CONFLICT, "group_full", format!("groups have at most {} members", self.limits.max_group_size)));
        }
        self.append_group_event(actor, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv, member, role })).await
    }

    /// Removes a member (admins), or leaves (anyone, for themselves).
    pub async fn remove_member(&self, actor: UserId, conversation_id: &str, member: &str) -> Result<(), ApiError> {
        let conv = parse_group(conversation_id)?;
        let member: UserId = member.parse().map_err(|_| ApiError::not_found())?;
        if member == actor {
            self.active_member(&conv, actor).await?.ok_or_else(ApiError::not_found)?;
        } else {
            self.admin(&conv, actor).await?;
            if self.store.group_member(&conv, member).await?.is_none_or(|m| !m.active) {
                return Err(ApiError::not_found());
            }
        }
        self.append_group_event(actor, Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: conv, member })).await
    }

    /// The caller's groups.
    pub async fn my_groups(&self, user: UserId) -> Result<Vec<MyGroup>, ApiError> {
        let rows: Vec<UserGroupRow> = self.store.user_groups(user).await?.into_iter().filter(|g| g.active).collect();
        let names = futures::future::try_join_all(rows.iter().map(|g| self.store.group(&g.conversation_id))).await?;
        Ok(rows
            .into_iter()
            .zip(names)
            .map(|(g, info)| MyGroup { name: info.map(|i| i.name).unwrap_or_default(), conversation_id: g.conversation_id, role: g.role })
            .collect())
    }

    /// A group and its members, for its members.
    pub async fn group_info(&self, user: UserId, conversation_id: &str) -> Result<GroupInfo, ApiError> {
        let conv = parse_group(conversation_id)?;
        self.active_member(&conv, user).await?.ok_or_else(ApiError::not_found)?;
        // A member's own rows can be projected before the creator's copy of the creation, which
        // writes every member row and then the group row: wait for the group row (bounded), so
        // the answer never lists part of the initial members.
        let deadline = tokio::time::Instant::now() + NEW_GROUP_WAIT;
        let name = loop {
            match self.store.group(&conv).await? {
                Some(g) => break g.name,
                None if tokio::time::Instant::now() >= deadline => break String::new(),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let members = self.active_members(&conv).await?;
        Ok(GroupInfo { conversation_id: conv, name, members })
    }

    /// History of a group as one member may see it: only messages positioned while they were a
    /// member (a member removed before a message never sees it, one added after it neither).
    pub(crate) async fn group_history(
        &self,
        user: UserId,
        conv: &ConversationId,
        before: Option<&str>,
        limit: Option<usize>,
    ) -> Result<HistoryPage, ApiError> {
        let intervals = self.store.user_group_intervals(user, conv).await?;
        if intervals.is_empty() {
            return Err(ApiError::not_found());
        }
        let visible = |p: i64| intervals.iter().any(|(since, until)| *since < p && until.is_none_or(|u| p < u));
        let mut cursor = match before {
            Some(b) => Some(
                b.parse::<MessageId>()
                    .map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one this server issued"))?,
            ),
            None => None,
        };
        let limit = limit.unwrap_or(50).clamp(1, self.limits.max_page);
        let mut messages = Vec::new();
        // Pages of the whole history, filtered; bounded so a long invisible stretch cannot make
        // one request scan without end (the cursor lets the client go on).
        for _ in 0..20 {
            let page = self.store.history_page(conv, cursor, limit + 1).await?;
            let exhausted = page.len() <= limit;
            for m in page.into_iter().take(limit) {
                cursor = Some(m.message_id);
                if visible(m.position) {
                    messages.push(m);
                    if messages.len() > limit {
                        break;
                    }
                }
            }
            if messages.len() > limit || exhausted {
                let more = messages.len() > limit;
                messages.truncate(limit);
                let next_cursor = if more { messages.last().map(|m| m.message_id.to_string()) } else { None };
                return Ok(HistoryPage { messages, next_cursor });
            }
        }
        let next_cursor = cursor.map(|c| c.to_string());
        Ok(HistoryPage { messages, next_cursor })
    }
}

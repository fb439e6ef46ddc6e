//! Message search (`GET /v1/search`): the words of a query in the caller's own conversations,
//! newest first, paged. The index holds one document per message (see `chat_search`); the scope
//! of a search is the caller's history rule: every message of their direct conversations, and of
//! each group (present or past) the messages positioned inside their membership intervals, so
//! never a message from before they joined or after they left. Messages the caller deleted for
//! themselves are left out after the search (a page may then be shorter than `limit`; its cursor
//! still moves on); messages deleted for everyone are not in the index.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use chat_events::{ConversationId, MessageId, UserId};
use chat_search::{QueryError, Scope, SearchQuery};
use serde::Serialize;

use crate::error::ApiError;
use crate::service::Chat;

/// Bytes of a query, at most.
pub const MAX_QUERY_BYTES: usize = 256;

/// One message found.
#[derive(Debug, Serialize)]
pub struct Found {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub kind: String,
    pub body: String,
    #[serde(serialize_with = "time")]
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

fn time<S: serde::Serializer>(t: &chrono::DateTime<chrono::Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&chat_events::format_time(t))
}

/// A page of results.
#[derive(Debug, Serialize)]
pub struct SearchPage {
    pub results: Vec<Found>,
    /// Present when older results may exist: pass it as `before` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Chat {
    /// Searches the caller's conversations (or one of them) for messages with every word of `q`.
    pub async fn search(&self, user: UserId, q: &str, conversation: Option<&str>, before: Option<&str>, limit: Option<usize>) -> Result<SearchPage, ApiError> {
        let index = self
            .search
            .clone()
            .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "search_unavailable", "this node keeps no search index"))?;
        if q.len() > MAX_QUERY_BYTES {
            return Err(ApiError::bad_request("invalid_query", format!("q is at most {MAX_QUERY_BYTES} bytes")));
        }
        let before = match before {
            Some(b) => Some(b.parse::<MessageId>().map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one this server issued"))?),
            None => None,
        };
        let limit = limit.unwrap_or(20).clamp(1, chat_search::MAX_LIMIT);
        // The scope: the caller's direct conversations, and their groups' membership intervals.
        let conversation = match conversation {
            None => None,
            Some(c) => {
                let conv: ConversationId = c.parse().map_err(|_| ApiError::not_found())?;
                if !conv.has_member(user) && !conv.is_group() {
                    return Err(ApiError::not_found());
                }
                Some(conv)
            }
        };
        let groups: Vec<ConversationId> = match &conversation {
            Some(c) if c.is_group() => vec![c.clone()],
            Some(_) => Vec::new(),
            None => self.store.user_groups(user).await?.into_iter().map(|g| g.conversation_id).collect(),
        };
        let intervals = futures::future::try_join_all(groups.iter().map(|g| self.store.user_group_intervals(user, g))).await?;
        let groups: Vec<(ConversationId, chat_search::Intervals)> =
            groups.into_iter().zip(intervals).filter(|(_, i)| !i.is_empty()).collect();
        if conversation.as_ref().is_some_and(|c| c.is_group()) && groups.is_empty() {
            // Never a member: the same answer as for a conversation that does not exist.
            return Err(ApiError::not_found());
        }
        let query = SearchQuery { text: q.to_owned(), scope: Scope { user: Some(user), groups, conversation }, before, limit };
        let hits = tokio::task::spawn_blocking(move || index.search(&query))
            .await
            .map_err(|e| ApiError::internal("search", &e))?
            .map_err(|e| match e {
                QueryError::Empty => ApiError::bad_request("invalid_query", "q has no words"),
                QueryError::TooManyTerms => ApiError::bad_request("invalid_query", format!("q has at most {} words", chat_search::MAX_QUERY_TERMS)),
            })?
            .map_err(|e| ApiError::internal("search", &e))?;
        let next_cursor = (hits.len() == limit).then(|| hits.last().map(|h| h.message_id.to_string())).flatten();
        // Messages the caller deleted for themselves: left out, per conversation.
        let mut by_conv: BTreeMap<&ConversationId, Vec<MessageId>> = BTreeMap::new();
        for h in &hits {
            by_conv.entry(&h.conversation_id).or_default().push(h.message_id);
        }
        let hidden = futures::future::try_join_all(by_conv.iter().filter_map(|(c, ids)| {
            let (from, to) = (ids.iter().min().copied()?, ids.iter().max().copied()?);
            Some(self.store.hidden_messages(user, c, from, to))
        }))
        .await?;
        let hidden: Vec<MessageId> = hidden.into_iter().flatten().collect();
        let results = hits
            .into_iter()
            .filter(|h| !hidden.contains(&h.message_id))
            .map(|h| Found { message_id: h.message_id, conversation_id: h.conversation_id, sender: h.sender, kind: h.kind, body: h.body, sent_at: h.sent_at })
            .collect();
        Ok(SearchPage { results, next_cursor })
    }
}

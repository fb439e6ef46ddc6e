//! The rows a fold reads: fetched from the store once per slice of records, and kept up to date
//! with the slice's own writes, so that a record sees what the records before it in the slice
//! wrote even though nothing is applied until the slice is done.

use std::collections::{BTreeMap, HashMap};

use chat_events::{ConversationId, MessageId, UserId};
use chat_store::{InboxRow, MessageCountKey, StreamMark, StreamRow, Write};

/// A row (or a range of rows) a fold needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// `inbox` of (user, conversation).
    Inbox(UserId, ConversationId),
    /// `stream_heads` of (user, source partition).
    Head(UserId, i32),
    /// A user's stream items after a position, at most [`STREAM_SCAN`].
    StreamAfter(UserId, i64),
    /// A user's membership intervals in a group.
    Intervals(UserId, ConversationId),
    /// `analytics_message_counts` of a deliveries partition.
    MessageCount(MessageCountKey),
    /// `stream_messages` of (user, message): where the message sits in the user's stream.
    StreamMessages(UserId, MessageId),
}

/// How many stream items a [`Key::StreamAfter`] covers.
pub const STREAM_SCAN: usize = 2_000;

/// What the store answered for a [`Key`].
#[derive(Clone, Debug)]
pub enum Fetched {
    Inbox(Option<InboxRow>),
    Head(Option<i64>),
    Stream(Vec<StreamRow>),
    Intervals(Vec<(i64, Option<i64>)>),
    /// (messages, applied offset)
    Count(Option<(i64, i64)>),
    /// (seq, mark), by seq
    Seqs(Vec<(i64, StreamMark)>),
}

/// A fold needs a row that is not loaded yet: the driver fetches it and folds the record again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing(pub Key);

/// The rows of one slice: what was fetched, with the slice's writes on top.
#[derive(Default, Debug)]
pub struct Rows {
    fetched: HashMap<Key, Fetched>,
    /// Stream rows written by the slice so far, for range reads.
    stream: BTreeMap<(UserId, i64), StreamRow>,
    /// Interval writes of the slice so far, in order.
    intervals: Vec<(UserId, ConversationId, i64, Option<i64>)>,
    /// `stream_messages` rows written by the slice so far.
    stream_messages: BTreeMap<(UserId, MessageId, i64), StreamMark>,
}

impl Rows {
    /// Whether a key is loaded (a loaded key is never fetched again: the slice's writes are
    /// already on top of it).
    pub fn has(&self, key: &Key) -> bool {
        self.fetched.contains_key(key)
    }

    /// Records what the store answered for a key (ignored if the key is already loaded).
    pub fn insert(&mut self, key: Key, value: Fetched) {
        self.fetched.entry(key).or_insert(value);
    }

    fn get(&self, key: Key) -> Result<&Fetched, Missing> {
        self.fetched.get(&key).ok_or(Missing(key))
    }

    pub fn inbox(&self, user: UserId, conv: &ConversationId) -> Result<Option<InboxRow>, Missing> {
        match self.get(Key::Inbox(user, conv.clone()))? {
            Fetched::Inbox(r) => Ok(r.clone()),
            _ => Ok(None),
        }
    }

    pub fn head(&self, user: UserId, source_partition: i32) -> Result<Option<i64>, Missing> {
        match self.get(Key::Head(user, source_partition))? {
            Fetched::Head(p) => Ok(*p),
            _ => Ok(None),
        }
    }

    /// The messages a deliveries partition counted for a (day, kind, scope), and up to which
    /// offset.
    pub fn message_count(&self, key: &MessageCountKey) -> Result<Option<(i64, i64)>, Missing> {
        match self.get(Key::MessageCount(key.clone()))? {
            Fetched::Count(c) => Ok(*c),
            _ => Ok(None),
        }
    }

    /// Stream items of a user after `after`, in order, at most [`STREAM_SCAN`]: the store's and
    /// the slice's own.
    pub fn stream_after(&self, user: UserId, after: i64) -> Result<Vec<StreamRow>, Missing> {
        let base = match self.get(Key::StreamAfter(user, after))? {
            Fetched::Stream(s) => s,
            _ => return Ok(Vec::new()),
        };
        let mut all: BTreeMap<i64, StreamRow> = base.iter().map(|r| (r.seq, r.clone())).collect();
        for ((_, seq), r) in self.stream.range((user, after.saturating_add(1))..=(user, i64::MAX)) {
            all.insert(*seq, r.clone());
        }
        Ok(all.into_values().take(STREAM_SCAN).collect())
    }

    /// Where a message sits in a user's stream: (seq, mark) by seq, the store's and the slice's
    /// own.
    pub fn stream_messages(&self, user: UserId, message: MessageId) -> Result<Vec<(i64, StreamMark)>, Missing> {
        let base = match self.get(Key::StreamMessages(user, message))? {
            Fetched::Seqs(v) => v,
            _ => return Ok(Vec::new()),
        };
        let mut all: BTreeMap<i64, StreamMark> = base.iter().copied().collect();
        for ((_, _, seq), mark) in self.stream_messages.range((user, message, i64::MIN)..=(user, message, i64::MAX)) {
            all.insert(*seq, *mark);
        }
        Ok(all.into_iter().collect())
    }

    /// A user's intervals `(since, until)` in a group, by `since`: the store's with the slice's
    /// writes merged the way the tables merge them (a close stays closed).
    pub fn intervals(&self, user: UserId, conv: &ConversationId) -> Result<Vec<(i64, Option<i64>)>, Missing> {
        let base = match self.get(Key::Intervals(user, conv.clone()))? {
            Fetched::Intervals(v) => v,
            _ => return Ok(Vec::new()),
        };
        let mut all: BTreeMap<i64, Option<i64>> = base.iter().copied().collect();
        for (u, c, since, until) in &self.intervals {
            if *u == user && c == conv {
                let e = all.entry(*since).or_insert(None);
                *e = match (*e, *until) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Only the point rows (inbox rows, stream heads, message counts), for the next slice of the same partition:
    /// ranges are read again, since later slices add to them.
    pub fn into_points(self) -> Rows {
        let fetched = self.fetched.into_iter().filter(|(k, _)| matches!(k, Key::Inbox(..) | Key::Head(..) | Key::MessageCount(..))).collect();
        Rows { fetched, ..Rows::default() }
    }

    /// How many rows are loaded.
    pub fn len(&self) -> usize {
        self.fetched.len()
    }

    /// Whether no row is loaded.
    pub fn is_empty(&self) -> bool {
        self.fetched.is_empty()
    }

    /// Makes later reads of the slice see a write.
    pub fn note(&mut self, w: &Write) {
        match w {
            Write::Inbox(r) => {
                self.fetched.insert(Key::Inbox(r.user_id, r.conversation_id.clone()), Fetched::Inbox(Some(r.clone())));
            }
            Write::StreamHead { user, source_partition, position } => {
                let key = Key::Head(*user, *source_partition);
                let p = match self.fetched.get(&key) {
                    Some(Fetched::Head(Some(old))) => (*old).max(*position),
                    _ => *position,
                };
                self.fetched.insert(key, Fetched::Head(Some(p)));
            }
            Write::Stream { user, row } => {
                self.stream.insert((*user, row.seq), row.clone());
            }
            Write::UserGroupInterval { user, conversation, since, until } => {
                self.intervals.push((*user, conversation.clone(), *since, *until));
            }
            Write::MessageCount { key, messages, applied_offset } => {
                self.fetched.insert(Key::MessageCount(key.clone()), Fetched::Count(Some((*messages, *applied_offset))));
            }
            Write::StreamMessage { user, message, seq, mark } => {
                self.stream_messages.insert((*user, *message, *seq), *mark);
            }
            // Nothing a fold reads back.
            Write::MessageEdited { .. }
            | Write::MessageDeleted { .. }
            | Write::HiddenMessage { .. }
            | Write::Reaction { .. }
            | Write::MessageVersion { .. }
            | Write::TopicRemoved { .. }
            | Write::User { .. }
            | Write::Message(_)
            | Write::Bucket { .. }
            | Write::MediaMessage { .. }
            | Write::Receipt(_)
            | Write::Presence { .. }
            | Write::Group(_)
            | Write::GroupName { .. }
            | Write::GroupMember(_)
            | Write::UserGroup(_)
            | Write::Profile(_)
            | Write::Privacy(_)
            | Write::Block(_)
            | Write::ActiveUser { .. }
            | Write::ProfileView { .. }
            | Write::Topic { .. } => {}
        }
    }
}

//! Events, their envelope and the JSON codec.
//!
//! On the wire (the Kafka record value, and a JSON line in `replay`) an event is
//! `{"event_id","type","version","occurred_at","actor","key","data"}`; `schemas/events/<type>.json`
//! describes `data` and the envelope of each type. The decoder reads `type` and `version` first and
//! then the `data` of that version, which is where an old version would be upcast.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, EventId, GroupId, MessageId, UserId};
use crate::topics::TopicKind;

/// A user account was created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    pub user_id: UserId,
    pub username: String,
}

/// What a message carries. Only text for now; media kinds refer to an uploaded object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Text,
    Image,
    Audio,
    Video,
}

impl MessageKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Image => "image",
            MessageKind::Audio => "audio",
            MessageKind::Video => "video",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(MessageKind::Text),
            "image" => Some(MessageKind::Image),
            "audio" => Some(MessageKind::Audio),
            "video" => Some(MessageKind::Video),
            _ => None,
        }
    }
}

/// The media a message of kind image, audio or video refers to, with what the client said
/// about it (dimensions, duration) and what the server measured (type, size).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaAttachment {
    pub media_id: uuid::Uuid,
    /// Detected from the bytes at upload.
    pub content_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A file was uploaded and stored (the object is in the media store before this is appended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaUploaded {
    pub media_id: uuid::Uuid,
    pub uploader: UserId,
    /// image, audio or video
    pub kind: MessageKind,
    pub content_type: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
}

/// A message was accepted: the broker acknowledged this append before the sender got its ack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSent {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub sender_device: DeviceId,
    /// The sender's idempotency key: a retried send with the same key is the same message.
    pub client_msg_id: String,
    pub kind: MessageKind,
    /// The text, or the caption of a media message (may be empty then).
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaAttachment>,
    /// A reply: the earlier message of the same conversation it quotes (by reference only: the
    /// quoted text is never copied, so a delete of the original leaves nothing behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// Group members the message mentions (distinct; the fan-out keeps those who are members at
    /// the message's position).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<UserId>,
    /// Withheld: the recipient of this direct message had blocked the sender when it was sent.
    /// It stays in the sender's own stream and history only, as if undelivered; nothing tells
    /// the sender (docs/protocol.md §16.3).
    #[serde(default, skip_serializing_if = "is_false")]
    pub withheld: bool,
}

/// A device of a recipient acknowledged receipt of a message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageDelivered {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub recipient: UserId,
    pub device_id: DeviceId,
}

/// A member read a conversation up to (and including) a message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRead {
    pub conversation_id: ConversationId,
    pub reader: UserId,
    pub device_id: DeviceId,
    pub up_to: MessageId,
    /// No read receipt: the reader's or the sender's read-receipt setting hid this read from the
    /// other member of a direct conversation when it happened. The reader's own devices and
    /// unread counts still follow it (docs/protocol.md §16.1).
    #[serde(default, skip_serializing_if = "is_false")]
    pub private: bool,
}

/// The sender changed the text (or a media message's caption) of their message, within the edit
/// window (see docs/protocol.md §5.7). The envelope's actor is the sender. The log keeps every
/// version: the history of edits, for auditors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageEdited {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    /// The message's sender (the only one who may edit it).
    pub sender: UserId,
    /// The new text or caption.
    pub body: String,
    /// The message was withheld (see [`MessageSent::withheld`]): the change reaches its sender only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withheld: bool,
}

/// A message was deleted for everyone: by its sender, or by an admin of its group (the
/// envelope's actor). Every projection drops its body; its receipts stay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageDeleted {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    /// The message's sender.
    pub sender: UserId,
    /// Who deleted it: the sender or a group admin.
    pub deleted_by: UserId,
    /// The message was withheld (see [`MessageSent::withheld`]): the change reaches its sender only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withheld: bool,
}

/// A member deleted a message for themselves only ("delete for me"): it leaves their own stream,
/// history and conversation list, on every device of theirs; nobody else sees a change. The
/// envelope's actor is the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageHidden {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    /// Who deleted it for themselves.
    pub user: UserId,
}

/// A member reacted to a message with one emoji, changed their reaction, or (no `emoji`) took it
/// back: one reaction per user per message, the latest in log order counts. The envelope's actor
/// is the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageReacted {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    /// Who reacted.
    pub user: UserId,
    /// The emoji; absent when the reaction is taken back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
    /// The message was withheld (see [`MessageSent::withheld`]): the change reaches its sender only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withheld: bool,
}

/// How long after it was sent a message may be edited or deleted for everyone, by default.
pub const DEFAULT_EDIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(48 * 3600);

/// Whether a change at `at` is within `window` of the message's sending (the time in its id,
/// minted when the message was accepted). The gateway asks with the time it puts on the event, the
/// fan-out with the event's time: from the log alone, the same answer on every run.
pub fn within_edit_window(at: &DateTime<Utc>, message: MessageId, window: std::time::Duration) -> bool {
    let age_ms = at.timestamp_millis() - message.unix_millis();
    // An id a minute in the future is a clock step between nodes, not a forgery worth refusing.
    age_ms >= -60_000 && u128::try_from(age_ms.max(0)).unwrap_or(0) <= window.as_millis()
}

/// A member's role in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupRole {
    /// May rename the group and add and remove members.
    Admin,
    Member,
}

impl GroupRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            GroupRole::Admin => "admin",
            GroupRole::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(GroupRole::Admin),
            "member" => Some(GroupRole::Member),
            _ => None,
        }
    }
}

/// A group was created; the creator is its first admin. The envelope's actor is the creator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupCreated {
    pub conversation_id: ConversationId,
    pub group_id: GroupId,
    pub name: String,
    pub creator: UserId,
    /// The other initial members.
    pub members: Vec<UserId>,
}

/// An admin (the envelope's actor) renamed a group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRenamed {
    pub conversation_id: ConversationId,
    pub name: String,
}

/// An admin (the envelope's actor) added a member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberAdded {
    pub conversation_id: ConversationId,
    pub member: UserId,
    pub role: GroupRole,
}

/// An admin removed a member, or a member left (actor == member).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberRemoved {
    pub conversation_id: ConversationId,
    pub member: UserId,
}

/// An operator granted or revoked a role (`analyst`, `auditor`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRoleChanged {
    pub user_id: UserId,
    pub role: String,
    pub granted: bool,
}

/// A user ended every session (token) of theirs issued at or before `until`: "log out
/// everywhere". Their open sockets close within seconds on every node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsEnded {
    pub user_id: UserId,
    #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
    pub until: DateTime<Utc>,
}

/// A user changed their profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdated {
    pub user_id: UserId,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_media_id: Option<uuid::Uuid>,
}

/// Who may see one thing of a user (last seen and online, profile photo, read receipts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Every user (except those the user blocked).
    Everyone,
    /// The user's contacts: the other members of direct conversations in which both wrote.
    #[default]
    Contacts,
    /// No one.
    Nobody,
}

impl Audience {
    pub fn as_str(&self) -> &'static str {
        match self {
            Audience::Everyone => "everyone",
            Audience::Contacts => "contacts",
            Audience::Nobody => "nobody",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "everyone" => Some(Audience::Everyone),
            "contacts" => Some(Audience::Contacts),
            "nobody" => Some(Audience::Nobody),
            _ => None,
        }
    }
}

/// A user's privacy settings, whole (the latest update wins). A user who never set them has the
/// defaults: last seen and profile photo for contacts, read receipts for everyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyUpdated {
    pub user_id: UserId,
    /// Who sees the user's last seen and online status.
    pub last_seen: Audience,
    /// Who sees the user's profile photo.
    pub photo: Audience,
    /// Whose direct messages get a read receipt from the user (reciprocal: the user sees read
    /// receipts only from those it admits). Group read receipts are always on.
    pub read_receipts: Audience,
}

impl PrivacyUpdated {
    /// The settings of a user who never changed them.
    pub fn defaults(user_id: UserId) -> Self {
        PrivacyUpdated { user_id, last_seen: Audience::Contacts, photo: Audience::Contacts, read_receipts: Audience::Everyone }
    }
}

/// A user blocked (`user.blocked`) or unblocked (`user.unblocked`) another user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBlocked {
    /// Who blocks.
    pub user_id: UserId,
    /// Who is blocked.
    pub target: UserId,
}

/// An operator banned (`user.banned`) or unbanned (`user.unbanned`) a user: a banned user's
/// sessions end on every node within seconds and their log-ins are refused. Written by the
/// `chat user` command, so without an actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBanned {
    pub user_id: UserId,
}

/// A user opened another user's profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileViewed {
    pub viewer: UserId,
    pub viewed: UserId,
}

/// An auditor read audit data (the access itself is on the record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAccessed {
    /// The auditor's account (absent when an operator used the CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditor: Option<UserId>,
    /// http or cli
    pub via: String,
    /// What was read, e.g. `message_receipts`, `user_receipts`, `daily_metrics`.
    pub action: String,
    /// The message or user read about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Online or offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Offline,
}

impl PresenceStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Offline => "offline",
        }
    }
}

/// A user came online (first device connected) or went offline (last device gone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceChanged {
    pub user_id: UserId,
    pub status: PresenceStatus,
}

/// A receipt as the sender of a message sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    Sent,
    Delivered,
    Seen,
}

impl ReceiptStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReceiptStatus::Sent => "sent",
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::Seen => "seen",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sent" => Some(ReceiptStatus::Sent),
            "delivered" => Some(ReceiptStatus::Delivered),
            "seen" => Some(ReceiptStatus::Seen),
            _ => None,
        }
    }
}

/// One entry of a user's stream: what a device of that user must eventually receive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamItem {
    /// A message of a conversation the user is in (including the user's own messages, so the
    /// user's other devices see them).
    Message {
        message_id: MessageId,
        conversation_id: ConversationId,
        sender: UserId,
        client_msg_id: String,
        #[serde(rename = "message_kind")]
        message_kind: MessageKind,
        body: String,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        sent_at: DateTime<Utc>,
        /// The device that sent the message: on the sender's own copy only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sender_device: Option<String>,
        /// Offset of the `message.sent` in the conversation's partition (set for groups, where
        /// membership is decided by position).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<MediaAttachment>,
        /// The message this one replies to (same conversation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<MessageId>,
        /// The members it mentions (members at the message's position).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mentions: Vec<UserId>,
        /// Withheld from the recipient (a block): only ever on the sender's own copy, and never
        /// shown to a client.
        #[serde(default, skip_serializing_if = "is_false")]
        withheld: bool,
    },
    /// A receipt for messages the user sent: `by` got (delivered) or read up to (seen)
    /// `message_id`. With `all`, every recipient of a group message has reached `status`.
    Receipt {
        conversation_id: ConversationId,
        message_id: MessageId,
        status: ReceiptStatus,
        by: UserId,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "is_false")]
        all: bool,
        /// The device that acknowledged a delivery (group receipts).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
    },
    /// The user (on some device) read a conversation up to a message: lets the user's other
    /// devices and the user's unread counts follow.
    Read {
        conversation_id: ConversationId,
        up_to: MessageId,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
        /// The device that read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        /// The read sent no read receipt (see [`MessageRead::private`]): no `seen` transition.
        #[serde(default, skip_serializing_if = "is_false")]
        private: bool,
    },
    /// A message's sender edited it: its text (or caption) is now `body`. Each edit is one item.
    Edited {
        conversation_id: ConversationId,
        message_id: MessageId,
        /// The message's sender, who edited it.
        sender: UserId,
        body: String,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
    },
    /// A message was deleted for everyone. In a user's stream this item also takes the place of
    /// the message's own item and of its edits (the body is gone from every row).
    Deleted {
        conversation_id: ConversationId,
        message_id: MessageId,
        /// The message's sender.
        sender: UserId,
        /// The sender, or an admin of the group.
        by: UserId,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
    },
    /// The user deleted a message for themselves. In the user's stream this item also takes the
    /// place of the message's own item and of its edits.
    Hidden {
        conversation_id: ConversationId,
        message_id: MessageId,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
    },
    /// A member reacted to a message of a conversation the user is in (`emoji`), or took their
    /// reaction back (no `emoji`). Each reaction event is one item.
    Reaction {
        conversation_id: ConversationId,
        message_id: MessageId,
        /// Who reacted.
        by: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        emoji: Option<String>,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
    },
    /// A change of a group the user is (or was just) in.
    Group {
        conversation_id: ConversationId,
        /// created | renamed | member_added | member_removed
        change: GroupChange,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        member: Option<UserId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<GroupRole>,
        /// created, in the creator's copy only: every initial member, the creator included (that
        /// copy's projection writes the whole membership, then the group row). Before 2026-12-07
        /// every member's copy listed them (n² rows and bytes for a creation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members: Option<Vec<UserId>>,
        by: UserId,
        #[serde(serialize_with = "serialize_time", deserialize_with = "deserialize_time")]
        at: DateTime<Utc>,
        /// Offset of the change in the group's partition.
        position: i64,
    },
}

/// What happened to a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupChange {
    Created,
    Renamed,
    MemberAdded,
    MemberRemoved,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Serialises a time in the one wire format (RFC 3339 UTC with milliseconds); chrono's default
/// drops `.000` on whole seconds.
pub fn serialize_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// Reads a time that [`serialize_time`] wrote: any RFC 3339 time, cut to milliseconds (all the wire
/// carries), so that a decoded time encodes back to itself.
pub fn deserialize_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    DateTime::<Utc>::deserialize(d).map(to_millis)
}

/// The time cut to milliseconds (a leap second stays one).
fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(t)
}

/// Written by the fan-out stage: an item for one recipient's stream. Its offset in the
/// per-recipient topic is the recipient's sync cursor (one writer, in order, no holes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQueued {
    pub recipient: UserId,
    pub item: StreamItem,
    /// Where the fan-out made it (version 2; absent in version 1 records): the event it routed
    /// and which of that event's outputs this is. A fan-out that routes an event again (after a
    /// crash, before its offset was committed) makes the same outputs with the same sources, so
    /// a projection keeps, per user and source partition, the highest source it applied and
    /// drops anything at or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// The position of a fan-out output: the routed event's partition and offset in the
/// conversations topic, and the output's index among that event's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
    pub index: u32,
    /// Appended exactly once: in the same atomic step as the fan-out's offset (the embedded log),
    /// so no later output repeats it and projections need not record its position as a guard
    /// (they still drop it if an earlier, guarded output of the same source covered it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exactly_once: bool,
}

impl Source {
    /// (offset, index) as one number that orders like the pair (indexes below 2^16).
    pub fn packed(&self) -> i64 {
        (self.offset << 16) | i64::from(self.index.min(0xffff))
    }
}

/// Every event type. Exhaustive matches over it are how a new type reaches every consumer.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    UserRegistered(UserRegistered),
    MessageSent(MessageSent),
    MessageDelivered(MessageDelivered),
    MessageRead(MessageRead),
    MessageEdited(MessageEdited),
    MessageDeleted(MessageDeleted),
    MessageHidden(MessageHidden),
    MessageReacted(MessageReacted),
    PresenceChanged(PresenceChanged),
    DeliveryQueued(DeliveryQueued),
    GroupCreated(GroupCreated),
    GroupRenamed(GroupRenamed),
    GroupMemberAdded(GroupMemberAdded),
    GroupMemberRemoved(GroupMemberRemoved),
    UserRoleChanged(UserRoleChanged),
    SessionsEnded(SessionsEnded),
    ProfileUpdated(ProfileUpdated),
    ProfileViewed(ProfileViewed),
    AuditAccessed(AuditAccessed),
    MediaUploaded(MediaUploaded),
    PrivacyUpdated(PrivacyUpdated),
    UserBlocked(UserBlocked),
    UserUnblocked(UserBlocked),
    UserBanned(UserBanned),
    UserUnbanned(UserBanned),
}

/// The (type name, current version) of every event type, for schema tests and docs.
pub const EVENT_TYPES: &[(&str, u32)] = &[
    ("user.registered", 1),
    ("message.sent", 1),
    ("message.delivered", 1),
    ("message.read", 1),
    ("message.edited", 1),
    ("message.deleted", 1),
    ("message.hidden", 1),
    ("message.reacted", 1),
    ("presence.changed", 1),
    ("delivery.queued", 2),
    ("group.created", 1),
    ("group.renamed", 1),
    ("group.member_added", 1),
    ("group.member_removed", 1),
    ("user.role_changed", 1),
    ("user.sessions_ended", 1),
    ("profile.updated", 1),
    ("profile.viewed", 1),
    ("audit.accessed", 1),
    ("media.uploaded", 1),
    ("privacy.updated", 1),
    ("user.blocked", 1),
    ("user.unblocked", 1),
    ("user.banned", 1),
    ("user.unbanned", 1),
];

impl Event {
    /// The stable wire name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::UserRegistered(_) => "user.registered",
            Event::MessageSent(_) => "message.sent",
            Event::MessageDelivered(_) => "message.delivered",
            Event::MessageRead(_) => "message.read",
            Event::MessageEdited(_) => "message.edited",
            Event::MessageDeleted(_) => "message.deleted",
            Event::MessageHidden(_) => "message.hidden",
            Event::MessageReacted(_) => "message.reacted",
            Event::PresenceChanged(_) => "presence.changed",
            Event::DeliveryQueued(_) => "delivery.queued",
            Event::GroupCreated(_) => "group.created",
            Event::GroupRenamed(_) => "group.renamed",
            Event::GroupMemberAdded(_) => "group.member_added",
            Event::GroupMemberRemoved(_) => "group.member_removed",
            Event::UserRoleChanged(_) => "user.role_changed",
            Event::SessionsEnded(_) => "user.sessions_ended",
            Event::ProfileUpdated(_) => "profile.updated",
            Event::ProfileViewed(_) => "profile.viewed",
            Event::AuditAccessed(_) => "audit.accessed",
            Event::MediaUploaded(_) => "media.uploaded",
            Event::PrivacyUpdated(_) => "privacy.updated",
            Event::UserBlocked(_) => "user.blocked",
            Event::UserUnblocked(_) => "user.unblocked",
            Event::UserBanned(_) => "user.banned",
            Event::UserUnbanned(_) => "user.unbanned",
        }
    }

    /// The version this build writes.
    pub fn version(&self) -> u32 {
        match self {
            Event::UserRegistered(_)
            | Event::MessageSent(_)
            | Event::MessageDelivered(_)
            | Event::MessageRead(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::MessageHidden(_)
            | Event::MessageReacted(_)
            | Event::PresenceChanged(_)
            | Event::GroupCreated(_)
            | Event::GroupRenamed(_)
            | Event::GroupMemberAdded(_)
            | Event::GroupMemberRemoved(_)
            | Event::UserRoleChanged(_)
            | Event::SessionsEnded(_)
            | Event::ProfileUpdated(_)
            | Event::ProfileViewed(_)
            | Event::AuditAccessed(_)
            | Event::MediaUploaded(_)
            | Event::PrivacyUpdated(_)
            | Event::UserBlocked(_)
            | Event::UserUnblocked(_)
            | Event::UserBanned(_)
            | Event::UserUnbanned(_) => 1,
            // 2: with `source`. One without (read from a version 1 record) is written as version
            // 1 again: version 2 requires a source, so it would not decode.
            Event::DeliveryQueued(q) => if q.source.is_some() { 2 } else { 1 },
        }
    }

    /// The topic this event belongs to.
    pub fn topic_kind(&self) -> TopicKind {
        match self {
            Event::UserRegistered(_)
            | Event::PresenceChanged(_)
            | Event::UserRoleChanged(_)
            | Event::SessionsEnded(_)
            | Event::ProfileUpdated(_)
            | Event::ProfileViewed(_)
            | Event::AuditAccessed(_)
            | Event::MediaUploaded(_)
            | Event::PrivacyUpdated(_)
            | Event::UserBlocked(_)
            | Event::UserUnblocked(_)
            | Event::UserBanned(_)
            | Event::UserUnbanned(_) => TopicKind::Users,
            Event::MessageSent(_)
            | Event::MessageDelivered(_)
            | Event::MessageRead(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::MessageHidden(_)
            | Event::MessageReacted(_)
            | Event::GroupCreated(_)
            | Event::GroupRenamed(_)
            | Event::GroupMemberAdded(_)
            | Event::GroupMemberRemoved(_) => TopicKind::Conversations,
            Event::DeliveryQueued(_) => TopicKind::Deliveries,
        }
    }

    /// The partition key: all events of one conversation (or one user) in one partition, so
    /// every consumer sees them in the order they were appended.
    pub fn partition_key(&self) -> String {
        match self {
            Event::UserRegistered(e) => e.user_id.to_string(),
            Event::PresenceChanged(e) => e.user_id.to_string(),
            Event::MessageSent(e) => e.conversation_id.to_string(),
            Event::MessageDelivered(e) => e.conversation_id.to_string(),
            Event::MessageRead(e) => e.conversation_id.to_string(),
            Event::MessageEdited(e) => e.conversation_id.to_string(),
            Event::MessageDeleted(e) => e.conversation_id.to_string(),
            Event::MessageHidden(e) => e.conversation_id.to_string(),
            Event::MessageReacted(e) => e.conversation_id.to_string(),
            Event::DeliveryQueued(e) => e.recipient.to_string(),
            Event::GroupCreated(e) => e.conversation_id.to_string(),
            Event::GroupRenamed(e) => e.conversation_id.to_string(),
            Event::GroupMemberAdded(e) => e.conversation_id.to_string(),
            Event::GroupMemberRemoved(e) => e.conversation_id.to_string(),
            Event::UserRoleChanged(e) => e.user_id.to_string(),
            Event::SessionsEnded(e) => e.user_id.to_string(),
            Event::ProfileUpdated(e) => e.user_id.to_string(),
            Event::ProfileViewed(e) => e.viewed.to_string(),
            Event::AuditAccessed(e) => e.auditor.map(|a| a.to_string()).unwrap_or_else(|| "cli".into()),
            Event::MediaUploaded(e) => e.uploader.to_string(),
            Event::PrivacyUpdated(e) => e.user_id.to_string(),
            Event::UserBlocked(e) | Event::UserUnblocked(e) => e.user_id.to_string(),
            Event::UserBanned(e) | Event::UserUnbanned(e) => e.user_id.to_string(),
        }
    }

    /// The conversation an event belongs to, if any.
    pub fn conversation_id(&self) -> Option<&ConversationId> {
        match self {
            Event::MessageSent(m) => Some(&m.conversation_id),
            Event::MessageDelivered(d) => Some(&d.conversation_id),
            Event::MessageRead(r) => Some(&r.conversation_id),
            Event::MessageEdited(e) => Some(&e.conversation_id),
            Event::MessageDeleted(d) => Some(&d.conversation_id),
            Event::MessageHidden(h) => Some(&h.conversation_id),
            Event::MessageReacted(r) => Some(&r.conversation_id),
            Event::GroupCreated(g) => Some(&g.conversation_id),
            Event::GroupRenamed(g) => Some(&g.conversation_id),
            Event::GroupMemberAdded(g) => Some(&g.conversation_id),
            Event::GroupMemberRemoved(g) => Some(&g.conversation_id),
            Event::DeliveryQueued(q) => Some(match &q.item {
                StreamItem::Message { conversation_id, .. }
                | StreamItem::Receipt { conversation_id, .. }
                | StreamItem::Read { conversation_id, .. }
                | StreamItem::Edited { conversation_id, .. }
                | StreamItem::Deleted { conversation_id, .. }
                | StreamItem::Hidden { conversation_id, .. }
                | StreamItem::Reaction { conversation_id, .. }
                | StreamItem::Group { conversation_id, .. } => conversation_id,
            }),
            Event::UserRegistered(_)
            | Event::PresenceChanged(_)
            | Event::UserRoleChanged(_)
            | Event::SessionsEnded(_)
            | Event::ProfileUpdated(_)
            | Event::ProfileViewed(_)
            | Event::AuditAccessed(_)
            | Event::MediaUploaded(_)
            | Event::PrivacyUpdated(_)
            | Event::UserBlocked(_)
            | Event::UserUnblocked(_)
            | Event::UserBanned(_)
            | Event::UserUnbanned(_) => None,
        }
    }

    /// Every user an event names (sender, recipient, reader, member, ...), for filtering.
    pub fn users(&self) -> Vec<UserId> {
        match self {
            Event::UserRegistered(e) => vec![e.user_id],
            Event::MessageSent(e) => {
                let mut v = vec![e.sender];
                if let Some((a, b)) = e.conversation_id.direct_members() {
                    v.extend([a, b]);
                }
                v
            }
            Event::MessageDelivered(e) => vec![e.recipient],
            Event::MessageRead(e) => vec![e.reader],
            Event::MessageEdited(e) => vec![e.sender],
            Event::MessageDeleted(e) => vec![e.sender, e.deleted_by],
            Event::MessageHidden(e) => vec![e.user],
            Event::MessageReacted(e) => vec![e.user],
            Event::PresenceChanged(e) => vec![e.user_id],
            Event::DeliveryQueued(e) => vec![e.recipient],
            Event::GroupCreated(e) => {
                let mut v = vec![e.creator];
                v.extend(e.members.iter().copied());
                v
            }
            Event::GroupRenamed(_) => Vec::new(),
            Event::GroupMemberAdded(e) => vec![e.member],
            Event::GroupMemberRemoved(e) => vec![e.member],
            Event::UserRoleChanged(e) => vec![e.user_id],
            Event::SessionsEnded(e) => vec![e.user_id],
            Event::ProfileUpdated(e) => vec![e.user_id],
            Event::ProfileViewed(e) => vec![e.viewer, e.viewed],
            Event::AuditAccessed(e) => e.auditor.into_iter().collect(),
            Event::MediaUploaded(e) => vec![e.uploader],
            Event::PrivacyUpdated(e) => vec![e.user_id],
            Event::UserBlocked(e) | Event::UserUnblocked(e) => vec![e.user_id, e.target],
            Event::UserBanned(e) | Event::UserUnbanned(e) => vec![e.user_id],
        }
    }

    fn data(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Event::UserRegistered(e) => serde_json::to_value(e),
            Event::MessageSent(e) => serde_json::to_value(e),
            Event::MessageDelivered(e) => serde_json::to_value(e),
            Event::MessageRead(e) => serde_json::to_value(e),
            Event::MessageEdited(e) => serde_json::to_value(e),
            Event::MessageDeleted(e) => serde_json::to_value(e),
            Event::MessageHidden(e) => serde_json::to_value(e),
            Event::MessageReacted(e) => serde_json::to_value(e),
            Event::PresenceChanged(e) => serde_json::to_value(e),
            Event::DeliveryQueued(e) => serde_json::to_value(e),
            Event::GroupCreated(e) => serde_json::to_value(e),
            Event::GroupRenamed(e) => serde_json::to_value(e),
            Event::GroupMemberAdded(e) => serde_json::to_value(e),
            Event::GroupMemberRemoved(e) => serde_json::to_value(e),
            Event::UserRoleChanged(e) => serde_json::to_value(e),
            Event::SessionsEnded(e) => serde_json::to_value(e),
            Event::ProfileUpdated(e) => serde_json::to_value(e),
            Event::ProfileViewed(e) => serde_json::to_value(e),
            Event::AuditAccessed(e) => serde_json::to_value(e),
            Event::MediaUploaded(e) => serde_json::to_value(e),
            Event::PrivacyUpdated(e) => serde_json::to_value(e),
            Event::UserBlocked(e) | Event::UserUnblocked(e) => serde_json::to_value(e),
            Event::UserBanned(e) | Event::UserUnbanned(e) => serde_json::to_value(e),
        }
    }

    fn from_data(type_name: &str, version: u32, data: serde_json::Value) -> Result<Event, CodecError> {
        let bad = |e: serde_json::Error| CodecError::BadData {
            type_name: type_name.to_owned(),
            reason: e.to_string(),
        };
        let reason = |r: &str| CodecError::BadData { type_name: type_name.to_owned(), reason: r.to_owned() };
        // Upcasting lives here: match an older (type, version) and convert its data.
        match (type_name, version) {
            ("user.registered", 1) => serde_json::from_value(data).map(Event::UserRegistered).map_err(bad),
            ("message.sent", 1) => serde_json::from_value(data).map(Event::MessageSent).map_err(bad),
            ("message.delivered", 1) => serde_json::from_value(data).map(Event::MessageDelivered).map_err(bad),
            ("message.read", 1) => serde_json::from_value(data).map(Event::MessageRead).map_err(bad),
            ("message.edited", 1) => serde_json::from_value(data).map(Event::MessageEdited).map_err(bad),
            ("message.deleted", 1) => serde_json::from_value(data).map(Event::MessageDeleted).map_err(bad),
            ("message.hidden", 1) => serde_json::from_value(data).map(Event::MessageHidden).map_err(bad),
            ("message.reacted", 1) => serde_json::from_value(data).map(Event::MessageReacted).map_err(bad),
            ("presence.changed", 1) => serde_json::from_value(data).map(Event::PresenceChanged).map_err(bad),
            // Version 1 had no `source`; version 2 always has one.
            ("delivery.queued", 1) => serde_json::from_value::<DeliveryQueued>(data)
                .map_err(bad)
                .and_then(|q| if q.source.is_none() { Ok(Event::DeliveryQueued(q)) } else { Err(reason("version 1 has no source")) }),
            ("delivery.queued", 2) => serde_json::from_value::<DeliveryQueued>(data)
                .map_err(bad)
                .and_then(|q| if q.source.is_some() { Ok(Event::DeliveryQueued(q)) } else { Err(reason("version 2 needs a source")) }),
            ("group.created", 1) => serde_json::from_value(data).map(Event::GroupCreated).map_err(bad),
            ("group.renamed", 1) => serde_json::from_value(data).map(Event::GroupRenamed).map_err(bad),
            ("group.member_added", 1) => serde_json::from_value(data).map(Event::GroupMemberAdded).map_err(bad),
            ("group.member_removed", 1) => serde_json::from_value(data).map(Event::GroupMemberRemoved).map_err(bad),
            ("user.role_changed", 1) => serde_json::from_value(data).map(Event::UserRoleChanged).map_err(bad),
            ("user.sessions_ended", 1) => serde_json::from_value(data).map(Event::SessionsEnded).map_err(bad),
            ("profile.updated", 1) => serde_json::from_value(data).map(Event::ProfileUpdated).map_err(bad),
            ("profile.viewed", 1) => serde_json::from_value(data).map(Event::ProfileViewed).map_err(bad),
            ("audit.accessed", 1) => serde_json::from_value(data).map(Event::AuditAccessed).map_err(bad),
            ("media.uploaded", 1) => serde_json::from_value(data).map(Event::MediaUploaded).map_err(bad),
            ("privacy.updated", 1) => serde_json::from_value(data).map(Event::PrivacyUpdated).map_err(bad),
            ("user.blocked", 1) => serde_json::from_value(data).map(Event::UserBlocked).map_err(bad),
            ("user.unblocked", 1) => serde_json::from_value(data).map(Event::UserUnblocked).map_err(bad),
            ("user.banned", 1) => serde_json::from_value(data).map(Event::UserBanned).map_err(bad),
            ("user.unbanned", 1) => serde_json::from_value(data).map(Event::UserUnbanned).map_err(bad),
            _ => Err(CodecError::Unknown {
                type_name: type_name.to_owned(),
                version,
            }),
        }
    }
}

/// An event with its metadata, as appended to the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub event_id: EventId,
    /// When the command was accepted, UTC, millisecond precision.
    pub occurred_at: DateTime<Utc>,
    /// The user whose action this is (absent for system events).
    pub actor: Option<UserId>,
    pub event: Event,
}

/// Why bytes from the log could not be turned into an event. Both are permanent: a consumer
/// dead-letters the record and moves on.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not JSON, or the envelope fields are missing or of the wrong type.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A type or version this build does not know (written by a newer producer).
    #[error("unknown event type {type_name} version {version}")]
    Unknown { type_name: String, version: u32 },
    /// The data does not match the type's schema.
    #[error("bad data for {type_name}: {reason}")]
    BadData { type_name: String, reason: String },
}

#[derive(Serialize, Deserialize)]
struct WireEnvelope {
    event_id: EventId,
    #[serde(rename = "type")]
    type_name: String,
    version: u32,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    actor: Option<UserId>,
    key: String,
    data: serde_json::Value,
}

/// RFC 3339 UTC with milliseconds, the one time format on every wire of this platform.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time truncated to milliseconds, so that a time survives a round trip through
/// JSON and the tables unchanged.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

impl Envelope {
    /// A new envelope stamped now.
    pub fn new(event_id: EventId, actor: Option<UserId>, event: Event) -> Self {
        Envelope {
            event_id,
            occurred_at: now_millis(),
            actor,
            event,
        }
    }

    /// The partition key of the event.
    pub fn key(&self) -> String {
        self.event.partition_key()
    }

    /// JSON bytes for the log.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireEnvelope {
            event_id: self.event_id,
            type_name: self.event.type_name().to_owned(),
            version: self.event.version(),
            occurred_at: format_time(&self.occurred_at),
            actor: self.actor,
            key: self.key(),
            // Serialising plain structs of strings and ids into a Value cannot fail.
            data: self.event.data().unwrap_or(serde_json::Value::Null),
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// The envelope as a JSON value (for `replay` and tests).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.encode()).unwrap_or(serde_json::Value::Null)
    }

    /// Parses bytes from the log.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
        let wire: WireEnvelope =
            serde_json::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
        let occurred_at = DateTime::parse_from_rfc3339(&wire.occurred_at)
            .map_err(|e| CodecError::Malformed(format!("occurred_at: {e}")))?
            .with_timezone(&Utc);
        // In UTC (an offset can move it out of years 0000-9999, which RFC 3339 cannot write, so
        // it would not decode again) and to the millisecond, as `encode` writes it.
        if !(0..=9999).contains(&occurred_at.year()) {
            return Err(CodecError::Malformed(format!("occurred_at: {} is outside years 0000-9999 in UTC", wire.occurred_at)));
        }
        let occurred_at = to_millis(occurred_at);
        let event = Event::from_data(&wire.type_name, wire.version, wire.data)?;
        Ok(Envelope {
            event_id: wire.event_id,
            occurred_at,
            actor: wire.actor,
            event,
        })
    }
}

/// Event ids derived from natural keys, so that a retried command collapses onto the first.
pub mod derive_id {
    use super::*;

    /// `message.sent`: one per (sender, client_msg_id).
    pub fn message_sent(sender: UserId, client_msg_id: &str) -> EventId {
        EventId::derived(&["message.sent", &sender.to_string(), client_msg_id])
    }

    /// `message.delivered`: one per (message, recipient, device).
    pub fn message_delivered(message: MessageId, recipient: UserId, device: &DeviceId) -> EventId {
        EventId::derived(&["message.delivered", &message.to_string(), &recipient.to_string(), device.as_str()])
    }

    /// `message.read`: one per (conversation, reader, up_to).
    pub fn message_read(conversation: &ConversationId, reader: UserId, up_to: MessageId) -> EventId {
        EventId::derived(&["message.read", conversation.as_str(), &reader.to_string(), &up_to.to_string()])
    }

    /// `message.deleted`: one per message (a retried or repeated delete is the same event).
    pub fn message_deleted(message: MessageId) -> EventId {
        EventId::derived(&["message.deleted", &message.to_string()])
    }

    /// `message.hidden`: one per (message, user).
    pub fn message_hidden(message: MessageId, user: UserId) -> EventId {
        EventId::derived(&["message.hidden", &message.to_string(), &user.to_string()])
    }

    /// `user.registered`: one per user.
    pub fn user_registered(user: UserId) -> EventId {
        EventId::derived(&["user.registered", &user.to_string()])
    }

    /// `delivery.queued`: one per (recipient, item identity). Receipts collapse per
    /// (message, reader, status): a second device's delivery does not notify the sender again.
    pub fn delivery_queued(recipient: UserId, item: &StreamItem, source: EventId) -> EventId {
        let r = recipient.to_string();
        match item {
            StreamItem::Message { message_id, .. } => {
                EventId::derived(&["delivery.queued", &r, "message", &message_id.to_string()])
            }
            StreamItem::Receipt { message_id, status, by, all, .. } => EventId::derived(&[
                "delivery.queued",
                &r,
                if *all { "receipt-all" } else { "receipt" },
                status.as_str(),
                &message_id.to_string(),
                &by.to_string(),
            ]),
            StreamItem::Read { conversation_id, up_to, .. } => {
                EventId::derived(&["delivery.queued", &r, "read", conversation_id.as_str(), &up_to.to_string()])
            }
            // One edit is one source event; the caller passes its id.
            StreamItem::Edited { .. } => EventId::derived(&["delivery.queued", &r, "edited", &source.to_string()]),
            // A message is deleted once: the item in its place and the delete's own item are one.
            StreamItem::Deleted { message_id, .. } => {
                EventId::derived(&["delivery.queued", &r, "deleted", &message_id.to_string()])
            }
            StreamItem::Hidden { message_id, .. } => EventId::derived(&["delivery.queued", &r, "hidden", &message_id.to_string()]),
            // One reaction is one source event; the caller passes its id.
            StreamItem::Reaction { .. } => EventId::derived(&["delivery.queued", &r, "reaction", &source.to_string()]),
            // One group change is one source event; the caller passes its id.
            StreamItem::Group { .. } => EventId::derived(&["delivery.queued", &r, "group", &source.to_string()]),
        }
    }
}

/// One fixture of every event type, used by the schema test and by the docs.
pub fn fixtures() -> Vec<Envelope> {
    let alice: UserId = "0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01".parse().unwrap_or(UserId::random());
    let bob: UserId = "7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".parse().unwrap_or(UserId::random());
    let conv = ConversationId::direct(alice, bob);
    let msg: MessageId = "01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e".parse().unwrap_or(MessageId::new_v7());
    let phone: DeviceId = "phone".parse().unwrap_or(DeviceId::default_device());
    let at = now_millis();
    let item = StreamItem::Message {
        message_id: msg,
        conversation_id: conv.clone(),
        sender: alice,
        client_msg_id: "c-1".into(),
        message_kind: MessageKind::Text,
        body: "hello".into(),
        sent_at: at,
        sender_device: None,
        position: None,
        media: None,
        reply_to: None,
        mentions: Vec::new(),
        withheld: false,
    };
    let receipt = StreamItem::Receipt {
        conversation_id: conv.clone(),
        message_id: msg,
        status: ReceiptStatus::Seen,
        by: bob,
        at,
        all: false,
        device_id: None,
    };
    let group = GroupId(uuid::Uuid::from_u128(0x5a1e_0000_4000_8000_0000_0000_0000_0001));
    let gconv = ConversationId::group(group);
    let gitem = StreamItem::Group {
        conversation_id: gconv.clone(),
        change: GroupChange::MemberAdded,
        name: None,
        member: Some(bob),
        role: Some(GroupRole::Member),
        members: None,
        by: alice,
        at,
        position: 7,
    };
    let src = EventId::new_v7();
    let eitem = StreamItem::Edited { conversation_id: conv.clone(), message_id: msg, sender: alice, body: "hello, world".into(), at };
    let hitem = StreamItem::Hidden { conversation_id: conv.clone(), message_id: msg, at };
    let ditem = StreamItem::Deleted { conversation_id: conv.clone(), message_id: msg, sender: alice, by: alice, at };
    let xitem = StreamItem::Reaction { conversation_id: conv.clone(), message_id: msg, by: bob, emoji: Some("👍".into()), at };
    let ritem = StreamItem::Read { private: false, conversation_id: conv.clone(), up_to: msg, at, device_id: Some("phone".into()) };
    vec![
        Envelope::new(
            derive_id::user_registered(alice),
            Some(alice),
            Event::UserRegistered(UserRegistered { user_id: alice, username: "alice".into() }),
        ),
        Envelope::new(
            derive_id::message_sent(alice, "c-1"),
            Some(alice),
            Event::MessageSent(MessageSent {
                message_id: msg,
                conversation_id: conv.clone(),
                sender: alice,
                sender_device: phone.clone(),
                client_msg_id: "c-1".into(),
                kind: MessageKind::Text,
                body: "hello".into(),
                media: None,
                reply_to: None,
                mentions: Vec::new(),
                withheld: false,
            }),
        ),
        Envelope::new(
            derive_id::message_delivered(msg, bob, &phone),
            Some(bob),
            Event::MessageDelivered(MessageDelivered {
                message_id: msg,
                conversation_id: conv.clone(),
                recipient: bob,
                device_id: phone.clone(),
            }),
        ),
        Envelope::new(
            derive_id::message_read(&conv, bob, msg),
            Some(bob),
            Event::MessageRead(MessageRead { private: false, conversation_id: conv.clone(), reader: bob, device_id: phone, up_to: msg }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(bob),
            Event::PresenceChanged(PresenceChanged { user_id: bob, status: PresenceStatus::Offline }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &item, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item, source: Some(Source { partition: 2, offset: 40, index: 0, exactly_once: false }) }),
        ),
        Envelope::new(
            derive_id::delivery_queued(alice, &receipt, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: alice, item: receipt, source: Some(Source { partition: 2, offset: 40 + 1, index: 1, exactly_once: true }) }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &ritem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item: ritem, source: Some(Source { partition: 2, offset: 40 + 2, index: 2, exactly_once: false }) }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &gitem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item: gitem, source: Some(Source { partition: 2, offset: 40 + 3, index: 3, exactly_once: false }) }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(alice),
            Event::GroupCreated(GroupCreated {
                conversation_id: gconv.clone(),
                group_id: group,
                name: "climbers".into(),
                creator: alice,
                members: vec![bob],
            }),
        ),
        Envelope::new(EventId::new_v7(), Some(alice), Event::GroupRenamed(GroupRenamed { conversation_id: gconv.clone(), name: "boulderers".into() })),
        Envelope::new(
            EventId::new_v7(),
            Some(alice),
            Event::GroupMemberAdded(GroupMemberAdded { conversation_id: gconv.clone(), member: bob, role: GroupRole::Admin }),
        ),
        Envelope::new(
            derive_id::message_sent(bob, "g-1"),
            Some(bob),
            Event::MessageSent(MessageSent {
                message_id: MessageId(uuid::Uuid::from_u128(0x0193_2c07_8a4e_7b3c_9d2e_1f0a_9b8c_7d70)),
                conversation_id: gconv.clone(),
                sender: bob,
                sender_device: DeviceId::default_device(),
                client_msg_id: "g-1".into(),
                kind: MessageKind::Text,
                body: "@alice rope?".into(),
                media: None,
                reply_to: None,
                mentions: vec![alice],
                withheld: false,
            }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(bob),
            Event::MessageReacted(MessageReacted { withheld: false, message_id: msg, conversation_id: conv.clone(), user: bob, emoji: Some("👍".into()) }),
        ),
        Envelope::new(EventId::new_v7(), Some(bob), Event::MessageReacted(MessageReacted { withheld: false, message_id: msg, conversation_id: conv.clone(), user: bob, emoji: None })),
        Envelope::new(
            derive_id::delivery_queued(alice, &xitem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: alice, item: xitem, source: Some(Source { partition: 2, offset: 53, index: 0, exactly_once: false }) }),
        ),
        Envelope::new(EventId::new_v7(), Some(bob), Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: gconv, member: bob })),
        Envelope::new(
            EventId::new_v7(),
            Some(alice),
            Event::MessageEdited(MessageEdited { withheld: false, message_id: msg, conversation_id: conv.clone(), sender: alice, body: "hello, world".into() }),
        ),
        Envelope::new(
            derive_id::message_deleted(msg),
            Some(alice),
            Event::MessageDeleted(MessageDeleted { withheld: false, message_id: msg, conversation_id: conv.clone(), sender: alice, deleted_by: alice }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &eitem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item: eitem, source: Some(Source { partition: 2, offset: 50, index: 0, exactly_once: false }) }),
        ),
        Envelope::new(
            derive_id::message_hidden(msg, bob),
            Some(bob),
            Event::MessageHidden(MessageHidden { message_id: msg, conversation_id: conv.clone(), user: bob }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &hitem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item: hitem, source: Some(Source { partition: 2, offset: 52, index: 0, exactly_once: false }) }),
        ),
        Envelope::new(
            derive_id::delivery_queued(bob, &ditem, src),
            None,
            Event::DeliveryQueued(DeliveryQueued { recipient: bob, item: ditem, source: Some(Source { partition: 2, offset: 51, index: 0, exactly_once: false }) }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(alice),
            Event::MediaUploaded(MediaUploaded {
                media_id: uuid::Uuid::from_u128(7),
                uploader: alice,
                kind: MessageKind::Image,
                content_type: "image/png".into(),
                size: 1234,
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(bob),
            Event::PrivacyUpdated(PrivacyUpdated { user_id: bob, last_seen: Audience::Nobody, photo: Audience::Everyone, read_receipts: Audience::Contacts }),
        ),
        Envelope::new(EventId::new_v7(), Some(bob), Event::UserBlocked(UserBlocked { user_id: bob, target: alice })),
        Envelope::new(EventId::new_v7(), Some(bob), Event::UserUnblocked(UserBlocked { user_id: bob, target: alice })),
        Envelope::new(EventId::new_v7(), None, Event::UserBanned(UserBanned { user_id: bob })),
        Envelope::new(EventId::new_v7(), None, Event::UserUnbanned(UserBanned { user_id: bob })),
        Envelope::new(
            derive_id::message_sent(alice, "c-2"),
            Some(alice),
            Event::MessageSent(MessageSent {
                message_id: MessageId(uuid::Uuid::from_u128(0x0193_2c07_8a4e_7b3c_9d2e_1f0a_9b8c_7d6f)),
                conversation_id: conv.clone(),
                sender: alice,
                sender_device: DeviceId::default_device(),
                client_msg_id: "c-2".into(),
                kind: MessageKind::Image,
                body: "the crag".into(),
                media: Some(MediaAttachment {
                    media_id: uuid::Uuid::from_u128(7),
                    content_type: "image/png".into(),
                    size: 1234,
                    width: Some(640),
                    height: Some(480),
                    duration_ms: None,
                }),
                reply_to: Some(msg),
                mentions: Vec::new(),
                withheld: false,
            }),
        ),
        Envelope::new(EventId::new_v7(), None, Event::UserRoleChanged(UserRoleChanged { user_id: bob, role: "auditor".into(), granted: true })),
        Envelope::new(
            EventId::new_v7(),
            Some(bob),
            Event::SessionsEnded(SessionsEnded { user_id: bob, until: DateTime::from_timestamp_millis(1_764_000_000_123).expect("time") }),
        ),
        Envelope::new(
            EventId::new_v7(),
            Some(alice),
            Event::ProfileUpdated(ProfileUpdated { user_id: alice, display_name: "Alice A.".into(), avatar_media_id: Some(uuid::Uuid::from_u128(7)) }),
        ),
        Envelope::new(EventId::new_v7(), Some(bob), Event::ProfileViewed(ProfileViewed { viewer: bob, viewed: alice })),
        Envelope::new(
            EventId::new_v7(),
            Some(bob),
            Event::AuditAccessed(AuditAccessed {
                auditor: Some(bob),
                via: "http".into(),
                action: "user_receipts".into(),
                target: Some(alice.to_string()),
                from: Some("2026-01-01T00:00:00.000Z".into()),
                to: Some("2026-02-01T00:00:00.000Z".into()),
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_round_trips() {
        for env in fixtures() {
            let bytes = env.encode();
            let back = Envelope::decode(&bytes).expect("decodes");
            assert_eq!(back, env, "{}", env.event.type_name());
        }
    }

    #[test]
    fn every_type_has_a_fixture() {
        let names: std::collections::BTreeSet<_> = fixtures().iter().map(|e| e.event.type_name()).collect();
        for (name, _) in EVENT_TYPES {
            assert!(names.contains(name), "no fixture for {name}");
        }
    }

    #[test]
    fn a_version_1_delivery_has_no_source_and_still_decodes() {
        let v1 = br#"{"event_id":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","type":"delivery.queued","version":1,"occurred_at":"2026-01-01T00:00:00.000Z","key":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","data":{"recipient":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","item":{"kind":"read","conversation_id":"d.0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01.7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","up_to":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","at":"2026-01-01T00:00:00.000Z"}}}"#;
        let env = Envelope::decode(v1).expect("a version 1 record decodes");
        assert!(matches!(env.event, Event::DeliveryQueued(DeliveryQueued { source: None, .. })));
        let as_v2 = String::from_utf8_lossy(v1).replace("\"version\":1", "\"version\":2");
        assert!(matches!(Envelope::decode(as_v2.as_bytes()), Err(CodecError::BadData { .. })), "version 2 needs a source");
        let s = Source { partition: 1, offset: 7, index: 3, exactly_once: false };
        assert!(Source { offset: 7, index: 4, ..s }.packed() > s.packed() && Source { offset: 8, index: 0, ..s }.packed() > s.packed());
    }

    #[test]
    fn unknown_types_and_versions_are_errors_not_panics() {
        let raw = br#"{"event_id":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","type":"message.sent","version":9,"occurred_at":"2026-01-01T00:00:00.000Z","key":"k","data":{}}"#;
        assert!(matches!(Envelope::decode(raw), Err(CodecError::Unknown { version: 9, .. })));
        assert!(matches!(Envelope::decode(b"not json"), Err(CodecError::Malformed(_))));
        let bad = br#"{"event_id":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","type":"message.sent","version":1,"occurred_at":"2026-01-01T00:00:00.000Z","key":"k","data":{"x":1}}"#;
        assert!(matches!(Envelope::decode(bad), Err(CodecError::BadData { .. })));
    }

    /// Found by fuzzing (fuzz/fuzz_targets/event_decode.rs): a decoded envelope must encode to
    /// bytes that decode to an equal envelope. A version 1 `delivery.queued` was written back as
    /// version 2 without a source (which does not decode); an `occurred_at` whose offset moves it
    /// out of years 0000-9999 in UTC was written as `+10000-…`/`-0001-…` (which does not
    /// decode); a time with more than milliseconds lost them on the way back.
    #[test]
    fn decoded_envelopes_round_trip() {
        let v1 = br#"{"event_id":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","type":"delivery.queued","version":1,"occurred_at":"2026-01-01T00:00:00.000Z","key":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","data":{"recipient":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","item":{"kind":"read","conversation_id":"d.0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01.7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","up_to":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","at":"2026-01-01T00:00:00.123456Z"}}}"#;
        let sessions = br#"{"event_id":"01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e","type":"user.sessions_ended","version":1,"occurred_at":"2026-01-01T01:00:00.1239+01:00","key":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","data":{"user_id":"7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9","until":"2016-12-31T23:59:60.5009Z"}}"#;
        for raw in [&v1[..], &sessions[..]] {
            let env = Envelope::decode(raw).expect("decodes");
            let again = Envelope::decode(&env.encode()).expect("the re-encoded envelope decodes");
            assert_eq!(again, env);
            assert_eq!(again.encode(), env.encode());
        }
        assert_eq!(Envelope::decode(v1).expect("v1").to_json()["version"], 1);
        let env = Envelope::decode(sessions).expect("decodes");
        assert_eq!(format_time(&env.occurred_at), "2026-01-01T00:00:00.123Z");
        assert_eq!(env.to_json()["data"]["until"], "2016-12-31T23:59:60.500Z", "to the millisecond, still a leap second");
        for edge in ["9999-12-31T23:59:59.999-01:00", "0000-01-01T00:30:00.000+01:00"] {
            let raw = String::from_utf8_lossy(sessions).replace("2026-01-01T01:00:00.1239+01:00", edge);
            assert!(matches!(Envelope::decode(raw.as_bytes()), Err(CodecError::Malformed(_))), "{edge}");
        }
        for edge in ["9999-12-31T23:59:59.999Z", "0000-01-01T00:00:00.000Z"] {
            let raw = String::from_utf8_lossy(sessions).replace("2026-01-01T01:00:00.1239+01:00", edge);
            let env = Envelope::decode(raw.as_bytes()).expect(edge);
            assert_eq!(env.to_json()["occurred_at"], edge);
        }
    }

    #[test]
    fn the_key_follows_the_conversation() {
        for env in fixtures() {
            let json = env.to_json();
            assert_eq!(json["key"], serde_json::Value::String(env.key()));
        }
    }
}

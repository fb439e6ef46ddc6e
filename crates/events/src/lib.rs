//! The vocabulary of the chat platform.
//!
//! - [`ids`]: `UserId`, `MessageId`, `ConversationId`, `DeviceId`, `EventId`.
//! - [`event`]: every event type, the [`Envelope`] and its JSON codec (matching `schemas/events/`).
//! - [`topics`]: which topic and key each event goes to.
//! - [`log`]: the event-log boundary ([`EventLog`], [`LogConsumer`]); [`kafka`] is its Kafka
//!   back-end (cargo feature `kafka`), `embedded` the SQLite one (cargo feature `embedded`);
//!   `conformance` is the suite both must pass (cargo feature `conformance`).
//!
//! Life of a send: the gateway builds `Event::MessageSent` inside an [`Envelope`] whose id is
//! derived from (sender, client_msg_id), [`log::append_event`] puts it on the conversation's
//! partition, and projection workers [`Envelope::decode`] it from there.

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod event;
pub mod ids;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod log;
#[cfg(feature = "embedded")]
pub mod sqlite;
pub mod topics;

pub use event::{
    derive_id, format_time, Audience, PrivacyUpdated, UserBanned, UserBlocked, within_edit_window, DEFAULT_EDIT_WINDOW, now_millis, AuditAccessed, CodecError, DeliveryQueued, Envelope, Event, GroupChange, GroupCreated,
    GroupMemberAdded, GroupMemberRemoved, GroupRenamed, GroupRole, MediaAttachment, MediaUploaded, MessageDelivered, MessageKind,
    MessageDeleted, MessageEdited, MessageHidden, MessageReacted, MessageRead, MessageSent,
    PresenceChanged, PresenceStatus, ProfileUpdated, ProfileViewed, ReceiptStatus, Source, StreamItem, UserRegistered,
    UserRoleChanged,
    SessionsEnded,
};
pub use ids::{ConversationId, DeviceId, EventId, GroupId, IdError, MessageId, UserId};
pub use log::{append_event, Committer, EventLog, LogConsumer, LogError, LogReader, PartitionLag, Position, Record, TopicSpec};
pub use topics::{TopicKind, Topics};

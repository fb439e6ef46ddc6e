//! Topic names and layout.
//!
//! | topic | key | events |
//! |---|---|---|
//! | `<prefix>conversations` | conversation id | message.sent, message.delivered, message.read |
//! | `<prefix>users` | user id | user.registered, presence.changed |
//! | `<prefix>deliveries` | recipient user id | delivery.queued (written by the fan-out stage) |
//!
//! One key, one partition: every consumer sees sent < delivered < read of a conversation in
//! append order, and one recipient's stream in the order the fan-out stage wrote it.

/// The three topics of the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TopicKind {
    Conversations,
    Users,
    Deliveries,
}

impl TopicKind {
    pub const ALL: [TopicKind; 3] = [TopicKind::Conversations, TopicKind::Users, TopicKind::Deliveries];

    fn suffix(&self) -> &'static str {
        match self {
            TopicKind::Conversations => "conversations",
            TopicKind::Users => "users",
            TopicKind::Deliveries => "deliveries",
        }
    }
}

/// Topic names under a prefix (so that test runs, tenants or environments can share a cluster).
#[derive(Clone, Debug)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics { prefix: prefix.into() }
    }

    /// The full name of one topic.
    pub fn name(&self, kind: TopicKind) -> String {
        format!("{}{}", self.prefix, kind.suffix())
    }

    /// Which topic a name is, if it is one of ours.
    pub fn kind_of(&self, name: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|k| self.name(*k) == name)
    }

    /// Where consumers put records they cannot decode, with the reason (never read back
    /// automatically; an operator inspects and replays them).
    pub fn dead_letters(&self) -> String {
        format!("{}dead-letters", self.prefix)
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All topic names.
    pub fn all(&self) -> Vec<String> {
        TopicKind::ALL.iter().map(|k| self.name(*k)).collect()
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics::new("chat.")
    }
}

//! Identifier newtypes. Every id is a string on the wire; the types keep a user id from being
//! passed where a message id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace for the name-based (v5) ids this platform derives, so that a retried command maps to
/// the same id on every node without a lookup.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_3b7e_8a52_4d0e_9b6f_2f1c_d7a4_e915);

/// Why an id in client input could not be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// Not a UUID in the canonical text form.
    #[error("not a valid id")]
    Malformed,
    /// A conversation id that is neither a direct (`d.<a>.<b>`) nor a known form.
    #[error("not a valid conversation id")]
    BadConversation,
    /// A device id outside `[A-Za-z0-9_-]{1,64}`.
    #[error("device id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadDevice,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                // Only the canonical hyphenated form: one id has one spelling, so it can be used
                // as a key in Redis and in string-typed columns.
                if s.len() != 36 {
                    return Err(IdError::Malformed);
                }
                Uuid::parse_str(s).map($name).map_err(|_| IdError::Malformed)
            }
        }
    };
}

uuid_id!(
    /// A registered user. Random (v4) so that it reveals nothing.
    UserId
);
uuid_id!(
    /// A message. Time-ordered (UUIDv7), so history pages sort by it; it is *not* a sync cursor
    /// (ids are minted by many gateways, see `docs/architecture.md`).
    MessageId
);
uuid_id!(
    /// An event. Derived (v5) from the command's natural key where a retry must collapse onto the
    /// first attempt, time-ordered (v7) otherwise.
    EventId
);

uuid_id!(
    /// A group (its conversation id is `g.<group id>`). Random (v4).
    GroupId
);

impl GroupId {
    /// A fresh random group id.
    pub fn random() -> Self {
        GroupId(Uuid::new_v4())
    }
}

impl UserId {
    /// A fresh random user id.
    pub fn random() -> Self {
        UserId(Uuid::new_v4())
    }
}

impl MessageId {
    /// A fresh time-ordered message id.
    pub fn new_v7() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// Milliseconds since the Unix epoch encoded in a v7 id (0 for ids of other versions).
    pub fn unix_millis(&self) -> i64 {
        match self.0.get_timestamp() {
            Some(ts) => {
                let (secs, nanos) = ts.to_unix();
                (secs as i64) * 1000 + (nanos / 1_000_000) as i64
            }
            None => 0,
        }
    }
}

impl EventId {
    /// A fresh time-ordered event id, for events with no natural key.
    pub fn new_v7() -> Self {
        EventId(Uuid::now_v7())
    }

    /// A deterministic id derived from a natural key: the same key gives the same id everywhere.
    pub fn derived(parts: &[&str]) -> Self {
        let name = parts.join("\u{1f}");
        EventId(Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()))
    }
}

/// A conversation. A direct (one-to-one) conversation's id is derived from its two members,
/// order-independent (`d.<smaller user id>.<larger user id>`), so both sides and every node agree
/// on it without a lookup and its members can be read off the id. A group conversation's id is
/// `g.<group id>`; its members are whoever the log says they are at a given position.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConversationId(String);

impl ConversationId {
    /// The direct conversation of two users.
    pub fn direct(a: UserId, b: UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        ConversationId(format!("d.{lo}.{hi}"))
    }

    /// The conversation of a group.
    pub fn group(g: GroupId) -> Self {
        ConversationId(format!("g.{g}"))
    }

    /// The group of a group conversation.
    pub fn group_id(&self) -> Option<GroupId> {
        self.0.strip_prefix("g.")?.parse().ok()
    }

    /// Whether this is a group conversation.
    pub fn is_group(&self) -> bool {
        self.group_id().is_some()
    }

    /// The two members of a direct conversation.
    pub fn direct_members(&self) -> Option<(UserId, UserId)> {
        let rest = self.0.strip_prefix("d.")?;
        let (a, b) = rest.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// Whether `user` is a member of a *direct* conversation (its id names its members). Always
    /// false for groups, whose membership needs a lookup.
    pub fn has_member(&self, user: UserId) -> bool {
        matches!(self.direct_members(), Some((a, b)) if a == user || b == user)
    }

    /// The other member of a direct conversation, seen from `user`.
    pub fn peer_of(&self, user: UserId) -> Option<UserId> {
        let (a, b) = self.direct_members()?;
        if a == user {
            Some(b)
        } else if b == user {
            Some(a)
        } else {
            None
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ConversationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if let Some(g) = ConversationId(s.to_owned()).group_id() {
            return Ok(ConversationId::group(g));
        }
        match ConversationId(s.to_owned()).direct_members() {
            // A direct id must name two different users in canonical order; it is rebuilt from
            // them, so that upper- and lower-case spellings are one conversation.
            Some((a, b)) if a < b => Ok(ConversationId::direct(a, b)),
            _ => Err(IdError::BadConversation),
        }
    }
}

impl TryFrom<String> for ConversationId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<ConversationId> for String {
    fn from(c: ConversationId) -> String {
        c.0
    }
}

/// One of a user's devices (phone, laptop, ...), chosen by the client at connect time. Delivery
/// receipts are per device; presence is per user (online while any device is connected).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// The device id of clients that do not name one.
    pub fn default_device() -> Self {
        DeviceId("default".to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(IdError::BadDevice)
        }
    }
}

impl TryFrom<String> for DeviceId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversation_is_order_independent() {
        let a = UserId::random();
        let b = UserId::random();
        let c1 = ConversationId::direct(a, b);
        let c2 = ConversationId::direct(b, a);
        assert_eq!(c1, c2);
        assert!(c1.has_member(a) && c1.has_member(b));
        assert!(!c1.has_member(UserId::random()));
        assert_eq!(c1.peer_of(a), Some(b));
        assert_eq!(c1.as_str().parse::<ConversationId>().unwrap(), c1);
    }

    #[test]
    fn non_canonical_conversation_ids_are_refused() {
        let a = UserId::random();
        let b = UserId::random();
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        assert!(format!("d.{hi}.{lo}").parse::<ConversationId>().is_err());
        assert!(format!("d.{lo}.{lo}").parse::<ConversationId>().is_err());
        assert!("x".parse::<ConversationId>().is_err());
        assert!(format!("d.{lo}.{hi}.x").parse::<ConversationId>().is_err());
        let upper = format!("d.{}.{}", lo.to_string().to_uppercase(), hi.to_string().to_uppercase());
        assert_eq!(upper.parse::<ConversationId>().unwrap(), ConversationId::direct(lo, hi));
    }

    #[test]
    fn group_conversations() {
        let g = GroupId::random();
        let c = ConversationId::group(g);
        assert!(c.is_group());
        assert_eq!(c.group_id(), Some(g));
        assert!(!c.has_member(UserId::random()));
        assert_eq!(c.as_str().to_uppercase().replacen('G', "g", 1).parse::<ConversationId>().unwrap(), c);
        assert!("g.nope".parse::<ConversationId>().is_err());
    }

    #[test]
    fn derived_event_ids_are_stable() {
        assert_eq!(EventId::derived(&["a", "b"]), EventId::derived(&["a", "b"]));
        assert_ne!(EventId::derived(&["a", "b"]), EventId::derived(&["ab"]));
    }

    #[test]
    fn v7_ids_sort_by_time() {
        let a = MessageId::new_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = MessageId::new_v7();
        assert!(a < b);
        assert!(b.unix_millis() >= a.unix_millis());
        assert!(a.unix_millis() > 1_700_000_000_000);
    }

    #[test]
    fn device_ids_are_validated() {
        assert!("phone-1".parse::<DeviceId>().is_ok());
        assert!("".parse::<DeviceId>().is_err());
        assert!("a b".parse::<DeviceId>().is_err());
        assert!("x".repeat(65).parse::<DeviceId>().is_err());
    }
}

//! The WebSocket protocol: JSON text frames with a `type` field. `ClientFrame` is what a client
//! may send, `ServerFrame` what the server sends; `schemas/frames/` and `docs/protocol.md`
//! describe both.

use chat_events::{format_time, ConversationId, GroupChange, GroupRole, MediaAttachment, MessageId, ReceiptStatus, StreamItem, UserId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A client-chosen correlation value, echoed in the answer.
pub type Ref = Option<serde_json::Value>;

/// Dimensions and duration a client states for its media (a JSON object only: it goes through
/// a map first, so the array form that serde would otherwise accept for a struct is refused).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct MediaMetadata {
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for MediaMetadata {
    type Error = String;
    fn try_from(m: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(default)]
            width: Option<u32>,
            #[serde(default)]
            height: Option<u32>,
            #[serde(default)]
            duration_ms: Option<u64>,
        }
        let f: Fields = serde_json::from_value(serde_json::Value::Object(m)).map_err(|e| e.to_string())?;
        Ok(MediaMetadata { width: f.width, height: f.height, duration_ms: f.duration_ms })
    }
}

/// A JSON object whose keys are distinct: a frame naming a field twice is refused (with plain
/// `serde_json::Value` the last one would silently win).
pub struct StrictObject(pub serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut m = serde_json::Map::new();
                while let Some((k, v)) = access.next_entry::<String, serde_json::Value>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    m.insert(k, v);
                }
                Ok(StrictObject(m))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Frames a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Send a message. Give `to` (a user id) or `conversation_id`.
    Send {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        client_msg_id: String,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        conversation_id: Option<String>,
        /// text (default), image, audio or video.
        #[serde(default)]
        kind: Option<String>,
        /// The text, or a media message's caption (may be empty then).
        #[serde(default)]
        body: String,
        /// For image, audio and video: an uploaded media id.
        #[serde(default)]
        media_id: Option<String>,
        /// What the client knows about the media.
        #[serde(default)]
        metadata: Option<MediaMetadata>,
        /// This `client_msg_id` was sent before without a `sent` answer (a re-send): the answer
        /// names the first attempt's message, whichever node it reached.
        #[serde(default)]
        retry: bool,
        /// A reply: the id of an earlier message of the same conversation that the sender can read.
        #[serde(default)]
        reply_to: Option<String>,
        /// In a group: the user ids of members the message mentions.
        #[serde(default)]
        mentions: Option<Vec<String>>,
    },
    /// This device received these messages.
    Delivered {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
        message_ids: Vec<String>,
    },
    /// The user read the conversation up to this message.
    Read {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
        up_to: String,
    },
    /// Items of the user's stream after a cursor (from the beginning without one).
    Sync {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Change the text (or caption) of a message this user sent, within the edit window.
    Edit {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
        message_id: String,
        body: String,
    },
    /// Delete a message. `scope` `everyone` (the default): one this user sent (within the edit
    /// window), or, for a group admin, any message of the group. `me`: any message the user can
    /// read, for this user only.
    Delete {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
        message_id: String,
        #[serde(default)]
        scope: Option<String>,
    },
    /// React to a message the user can read with one emoji (replacing the user's earlier
    /// reaction to it), or, without `emoji` (or with `null`), take the reaction back.
    React {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
        message_id: String,
        #[serde(default)]
        emoji: Option<String>,
    },
    /// The user is typing (ephemeral: not an event, not stored).
    Typing {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
        conversation_id: String,
    },
    /// Application-level keep-alive.
    Ping {
        #[serde(rename = "ref", default)]
        r#ref: Ref,
    },
}

impl ClientFrame {
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Send { .. } => "send",
            ClientFrame::Delivered { .. } => "delivered",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Edit { .. } => "edit",
            ClientFrame::Delete { .. } => "delete",
            ClientFrame::React { .. } => "react",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

/// Why a text frame is not a client frame: the answer's stable code (`bad_json` when the text
/// is not JSON, `invalid_frame` otherwise), its message, and the `ref` to echo.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    /// The frame's `ref` as written (`null` included), when the text was an object with
    /// distinct keys; absent otherwise.
    pub r#ref: Ref,
}

/// Parses a text frame: the client frame and its `ref` as written (echoed in any error answer,
/// `null` included), or why it is not one. Pure (no I/O); `ws::handle_text` answers with it.
pub fn parse_client_frame(text: &str) -> Result<(ClientFrame, Ref), FrameError> {
    let invalid = |e: serde_json::Error, r#ref: Ref| FrameError { code: "invalid_frame", message: format!("not a valid client frame: {e}"), r#ref };
    let bad_json = || FrameError { code: "bad_json", message: "frame is not valid JSON".into(), r#ref: None };
    let value = match serde_json::from_str::<StrictObject>(text) {
        Ok(v) => serde_json::Value::Object(v.0),
        // A data error can come before the end of the text (`nullnull` is refused at the first
        // `null` as "not an object", `[1,` at the `[`): `invalid_frame` only if the text is JSON.
        Err(e) if e.is_data() && serde_json::from_str::<serde_json::Value>(text).is_ok() => return Err(invalid(e, None)),
        Err(_) => return Err(bad_json()),
    };
    let r#ref = value.get("ref").cloned();
    match serde_json::from_value::<ClientFrame>(value) {
        Ok(frame) => Ok((frame, r#ref)),
        Err(e) => Err(invalid(e, r#ref)),
    }
}

fn time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn opt_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

/// A stream item as the client sees it, with the cursor that follows it.
#[derive(Debug, Serialize)]
pub struct SyncItem {
    pub cursor: String,
    #[serde(flatten)]
    pub item: StreamItem,
}

/// Frames the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame after the upgrade.
    Welcome {
        user_id: UserId,
        device_id: String,
        /// The user's unread messages over their conversations (a badge hint).
        pending: usize,
    },
    /// The message is durable in the log.
    Sent {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Ref,
        client_msg_id: String,
        message_id: MessageId,
        conversation_id: ConversationId,
        #[serde(serialize_with = "time")]
        sent_at: DateTime<Utc>,
    },
    /// A new message (pushed right after its append; also delivered through `sync`).
    Message {
        message_id: MessageId,
        conversation_id: ConversationId,
        sender: UserId,
        client_msg_id: String,
        kind: String,
        body: String,
        #[serde(serialize_with = "time")]
        sent_at: DateTime<Utc>,
        #[serde(skip_serializing_if = "Option::is_none")]
        media: Option<MediaAttachment>,
        /// A reply: the message it quotes.
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_to: Option<MessageId>,
        /// The members it mentions.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        mentions: Vec<UserId>,
    },
    /// A receipt for a message this user sent. With `all`, every recipient of a group message
    /// has reached `status`.
    Receipt {
        conversation_id: ConversationId,
        message_id: MessageId,
        status: ReceiptStatus,
        by: UserId,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        all: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
    },
    /// A group this user is in changed (created, renamed, member added or removed).
    Group {
        conversation_id: ConversationId,
        change: GroupChange,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        member: Option<UserId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<GroupRole>,
        by: UserId,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// A message was edited by its sender: its text (or caption) is now `body`.
    Edited {
        conversation_id: ConversationId,
        message_id: MessageId,
        sender: UserId,
        body: String,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// A message was deleted for everyone (by its sender or a group admin, `by`).
    Deleted {
        conversation_id: ConversationId,
        message_id: MessageId,
        sender: UserId,
        by: UserId,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// This user deleted a message for themselves (on another device, or this one's echo).
    Hidden {
        conversation_id: ConversationId,
        message_id: MessageId,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// A member reacted to a message (`emoji`) or took their reaction back (no `emoji`).
    Reaction {
        conversation_id: ConversationId,
        message_id: MessageId,
        by: UserId,
        #[serde(skip_serializing_if = "Option::is_none")]
        emoji: Option<String>,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// This user read a conversation up to a message on another device.
    Read {
        conversation_id: ConversationId,
        up_to: MessageId,
        #[serde(serialize_with = "time")]
        at: DateTime<Utc>,
    },
    /// The answer to `sync`.
    Sync {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Ref,
        items: Vec<SyncItem>,
        /// Where the next sync starts (the cursor of the last item, or the one given).
        cursor: Option<String>,
        has_more: bool,
    },
    /// Someone the user talks to came online or went offline.
    Presence {
        user_id: UserId,
        status: &'static str,
        #[serde(serialize_with = "opt_time", skip_serializing_if = "Option::is_none")]
        last_seen: Option<DateTime<Utc>>,
    },
    /// The other member is typing.
    Typing { conversation_id: ConversationId, from: UserId },
    /// A `delivered`, `read`, `edit`, `delete` or `typing` frame was accepted (and, for all but
    /// `typing`, is durable).
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Ref,
        #[serde(rename = "for")]
        for_type: &'static str,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Ref,
    },
    Error {
        code: &'static str,
        message: String,
        /// With `rate_limited`: milliseconds until the command may succeed.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Ref,
    },
}

impl ServerFrame {
    /// JSON text of the frame.
    pub fn to_text(&self) -> String {
        // Serialising these plain types cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"type":"error","code":"internal","message":"internal error"}"#.into())
    }

    /// The push frame of a stream item.
    pub fn from_item(item: &StreamItem) -> ServerFrame {
        match item.clone() {
            StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, sent_at, media, reply_to, mentions, .. } => {
                ServerFrame::Message {
                    message_id,
                    conversation_id,
                    sender,
                    client_msg_id,
                    kind: message_kind.as_str().to_owned(),
                    body,
                    sent_at,
                    media,
                    reply_to,
                    mentions,
                }
            }
            StreamItem::Receipt { conversation_id, message_id, status, by, at, all, device_id } => {
                ServerFrame::Receipt { conversation_id, message_id, status, by, at, all, device_id }
            }
            StreamItem::Group { conversation_id, change, name, member, role, by, at, .. } => {
                ServerFrame::Group { conversation_id, change, name, member, role, by, at }
            }
            StreamItem::Read { conversation_id, up_to, at, .. } => ServerFrame::Read { conversation_id, up_to, at },
            StreamItem::Edited { conversation_id, message_id, sender, body, at } => {
                ServerFrame::Edited { conversation_id, message_id, sender, body, at }
            }
            StreamItem::Deleted { conversation_id, message_id, sender, by, at } => {
                ServerFrame::Deleted { conversation_id, message_id, sender, by, at }
            }
            StreamItem::Hidden { conversation_id, message_id, at } => ServerFrame::Hidden { conversation_id, message_id, at },
            StreamItem::Reaction { conversation_id, message_id, by, emoji, at } => ServerFrame::Reaction { conversation_id, message_id, by, emoji, at },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_and_reject_unknown_fields() {
        let f: ClientFrame = serde_json::from_str(r#"{"type":"send","ref":1,"client_msg_id":"a","to":"x","body":"hi"}"#).unwrap();
        assert_eq!(f.type_name(), "send");
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"send","client_msg_id":"a","body":"hi","extra":1}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        let dup = serde_json::from_str::<StrictObject>(r#"{"type":"send","body":"a","body":"b"}"#).err().expect("a duplicate is refused");
        assert!(dup.is_data() && dup.to_string().contains("duplicate field `body`"), "{dup}");
        assert!(serde_json::from_str::<StrictObject>(r#"[1]"#).err().is_some_and(|e| e.is_data()), "an array is not a frame");
        assert!(serde_json::from_str::<StrictObject>(r#"{"a":"#).err().is_some_and(|e| !e.is_data()), "broken JSON is a syntax error");
    }

    /// `bad_json` exactly when the text is not JSON, `invalid_frame` for JSON that is not a client
    /// frame, with the `ref` of an object with distinct keys as written. Found by fuzzing
    /// (fuzz/fuzz_targets/client_frame.rs): a text that begins with a JSON value other than an
    /// object (`nullnull`, `[1,`) was refused as `invalid_frame` at its first value.
    #[test]
    fn parse_client_frame_codes_and_refs() {
        let code = |t: &str| parse_client_frame(t).err().map(|e| e.code);
        for not_json in ["nullnull", "[1,", "[", "1 2", "\"a", "{\"type\":\"ping\"} x", "{\"type\":", "", "ping", "[".repeat(200).as_str()] {
            assert_eq!(code(not_json), Some("bad_json"), "{not_json:?}");
        }
        for not_a_frame in ["null", "[1]", "42", "\"ping\"", "{\"type\":\"nope\"}", "{\"type\":\"ping\",\"ref\":1,\"ref\":2}"] {
            assert_eq!(code(not_a_frame), Some("invalid_frame"), "{not_a_frame:?}");
        }
        let e = parse_client_frame(r#"{"type":"send","ref":{"a":1},"body":"x"}"#).expect_err("no client_msg_id");
        assert_eq!((e.code, e.r#ref), ("invalid_frame", Some(serde_json::json!({"a": 1}))));
        assert!(e.message.starts_with("not a valid client frame: missing field `client_msg_id`"), "{}", e.message);
        assert_eq!(parse_client_frame(r#"{"type":"ping","ref":1,"ref":1}"#).err().and_then(|e| e.r#ref), None, "no ref from a duplicate");
        let (frame, r#ref) = parse_client_frame(r#"{"type":"ping","ref":null}"#).expect("a ping");
        assert_eq!((frame.type_name(), r#ref), ("ping", Some(serde_json::Value::Null)), "a null ref as written");
    }

    #[test]
    fn server_frames_have_snake_case_types() {
        let t = ServerFrame::Ack { r#ref: None, for_type: "read" }.to_text();
        assert_eq!(t, r#"{"type":"ack","for":"read"}"#);
    }
}

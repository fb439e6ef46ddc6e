//! `schemas/frames/` cannot drift from `ClientFrame` / `ServerFrame`: one instance of every server
//! frame, serialised as the connection sends it, must validate against `server.json`; example
//! client frames must both parse as `ClientFrame` and validate against `client.json`; and both
//! sides must refuse the same malformed frames.

use std::collections::BTreeSet;
use std::path::Path;

use chat_events::{
    ConversationId, GroupChange, GroupId, GroupRole, MediaAttachment, MessageId, MessageKind, PresenceStatus, ReceiptStatus, StreamItem,
    UserId,
};
use chat_gateway::error::ApiError;
use chat_gateway::frames::{ClientFrame, ServerFrame, SyncItem};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// A new variant is a compile error here until it has a name, an instance in
/// `every_server_frame()` and a branch in server.json.
fn server_type(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Welcome { .. } => "welcome",
        ServerFrame::Sent { .. } => "sent",
        ServerFrame::Message { .. } => "message",
        ServerFrame::Receipt { .. } => "receipt",
        ServerFrame::Group { .. } => "group",
        ServerFrame::Edited { .. } => "edited",
        ServerFrame::Deleted { .. } => "deleted",
        ServerFrame::Hidden { .. } => "hidden",
        ServerFrame::Reaction { .. } => "reaction",
        ServerFrame::Read { .. } => "read",
        ServerFrame::Sync { .. } => "sync",
        ServerFrame::Presence { .. } => "presence",
        ServerFrame::Typing { .. } => "typing",
        ServerFrame::Ack { .. } => "ack",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Error { .. } => "error",
    }
}

/// Same for client frames: a new variant needs an example in `client_examples()`.
fn client_type(f: &ClientFrame) -> &'static str {
    match f {
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

fn schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/frames").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    let v = jsonschema::draft202012::new(schema).unwrap_or_else(|e| panic!("schema does not compile: {e}"));
    v.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// The `type` consts of the `oneOf` branches.
fn branch_types(schema: &Value) -> BTreeSet<String> {
    branch_consts(&schema["oneOf"], "type")
}

/// The `tag` consts of the branches of a `oneOf`.
fn branch_consts(one_of: &Value, tag: &str) -> BTreeSet<String> {
    one_of
        .as_array()
        .expect("oneOf")
        .iter()
        .map(|b| b["properties"][tag]["const"].as_str().expect("branch with a tag const").to_owned())
        .collect()
}

/// The `kind` of a stream item: a new kind is a compile error here until `Items` has one and the
/// `stream_item` definition of server.json a branch.
fn item_kind(item: &StreamItem) -> &'static str {
    match item {
        StreamItem::Message { .. } => "message",
        StreamItem::Receipt { .. } => "receipt",
        StreamItem::Read { .. } => "read",
        StreamItem::Edited { .. } => "edited",
        StreamItem::Deleted { .. } => "deleted",
        StreamItem::Hidden { .. } => "hidden",
        StreamItem::Reaction { .. } => "reaction",
        StreamItem::Group { .. } => "group",
    }
}

const ALICE: &str = "0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01";
const BOB: &str = "7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const MSG: &str = "01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e";
const GROUP: &str = "5a1e0000-4000-8000-0000-000000000001";
const MEDIA: &str = "00000000-0000-0000-0000-000000000007";
/// An admin of the group, who is neither of the other two.
const ADMIN: &str = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";
/// An earlier message, which replies quote.
const QUOTED: &str = "01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6d";

fn ids() -> (UserId, UserId, ConversationId, MessageId) {
    let alice: UserId = ALICE.parse().expect("id");
    let bob: UserId = BOB.parse().expect("id");
    (alice, bob, ConversationId::direct(alice, bob), MSG.parse().expect("id"))
}

fn conv() -> String {
    ids().2.to_string()
}

/// The group conversation `g.<GROUP>`.
fn group_conv() -> ConversationId {
    ConversationId::group(GroupId(GROUP.parse().expect("id")))
}

/// Sub-second on purpose; `sync_item_times_keep_their_milliseconds_at_whole_seconds` checks a
/// whole second.
fn at() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_767_225_600_123).expect("time")
}

/// One stream item of every kind, the optional fields absent (direct conversation) and present
/// (group conversation).
struct Items {
    message: StreamItem,
    group_message: StreamItem,
    /// An image with its media, in a group.
    image_message: StreamItem,
    /// A caption-less audio message with only a duration.
    audio_message: StreamItem,
    /// A group reply that mentions two members.
    reply_message: StreamItem,
    /// A direct reply with an image (mentions are for groups only).
    image_reply: StreamItem,
    receipt: StreamItem,
    group_receipt: StreamItem,
    all_receipt: StreamItem,
    read: StreamItem,
    edited: StreamItem,
    /// An edit of a group message.
    group_edited: StreamItem,
    /// Deleted by its sender.
    deleted: StreamItem,
    /// A group message deleted by an admin of the group.
    admin_deleted: StreamItem,
    /// Deleted for the stream's owner only.
    hidden: StreamItem,
    /// A group message deleted for the stream's owner only.
    group_hidden: StreamItem,
    /// A reaction to a direct message.
    reaction: StreamItem,
    /// A reaction to a group message taken back (no emoji).
    reaction_taken_back: StreamItem,
    group_created: StreamItem,
    member_added: StreamItem,
}

impl Items {
    fn all(&self) -> Vec<StreamItem> {
        vec![
            self.message.clone(),
            self.group_message.clone(),
            self.image_message.clone(),
            self.audio_message.clone(),
            self.reply_message.clone(),
            self.image_reply.clone(),
            self.receipt.clone(),
            self.group_receipt.clone(),
            self.all_receipt.clone(),
            self.read.clone(),
            self.edited.clone(),
            self.group_edited.clone(),
            self.deleted.clone(),
            self.admin_deleted.clone(),
            self.hidden.clone(),
            self.group_hidden.clone(),
            self.reaction.clone(),
            self.reaction_taken_back.clone(),
            self.group_created.clone(),
            self.member_added.clone(),
        ]
    }
}

fn items() -> Items {
    let (alice, bob, conv, msg) = ids();
    let g = group_conv();
    let message = |conversation_id: ConversationId, position: Option<i64>| StreamItem::Message {
        message_id: msg,
        conversation_id,
        sender: alice,
        client_msg_id: "c-1".into(),
        message_kind: MessageKind::Text,
        body: "hello".into(),
        sent_at: at(),
        sender_device: Some("phone".into()),
        position,
        media: None,
        reply_to: None,
        mentions: Vec::new(),
        withheld: false,
    };
    let media_message = |conversation_id: ConversationId, position: Option<i64>, message_kind: MessageKind, body: &str, media: MediaAttachment| {
        StreamItem::Message {
            message_id: msg,
            conversation_id,
            sender: alice,
            client_msg_id: "c-m".into(),
            message_kind,
            body: body.into(),
            sent_at: at(),
            sender_device: None,
            position,
            media: Some(media),
            reply_to: None,
            mentions: Vec::new(),
            withheld: false,
        }
    };
    let quoted: MessageId = QUOTED.parse().expect("id");
    let receipt = |conversation_id: ConversationId, by: UserId, all: bool, device_id: Option<String>| StreamItem::Receipt {
        conversation_id,
        message_id: msg,
        status: ReceiptStatus::Delivered,
        by,
        at: at(),
        all,
        device_id,
    };
    Items {
        message: message(conv.clone(), None),
        group_message: message(g.clone(), Some(12)),
        image_message: media_message(
            g.clone(),
            Some(13),
            MessageKind::Image,
            "the crag",
            MediaAttachment {
                media_id: MEDIA.parse().expect("id"),
                content_type: "image/png".into(),
                size: 1234,
                width: Some(640),
                height: Some(480),
                duration_ms: None,
            },
        ),
        audio_message: media_message(
            conv.clone(),
            None,
            MessageKind::Audio,
            "",
            MediaAttachment {
                media_id: MEDIA.parse().expect("id"),
                content_type: "audio/ogg".into(),
                size: 0,
                width: None,
                height: None,
                duration_ms: Some(3_000),
            },
        ),
        reply_message: StreamItem::Message {
            message_id: msg,
            conversation_id: g.clone(),
            sender: bob,
            client_msg_id: "c-r".into(),
            message_kind: MessageKind::Text,
            body: "@alice @admin rope?".into(),
            sent_at: at(),
            sender_device: None,
            position: Some(14),
            media: None,
            reply_to: Some(quoted),
            mentions: vec![alice, ADMIN.parse().expect("id")],
            withheld: false,
        },
        image_reply: {
            let mut m = media_message(
                conv.clone(),
                None,
                MessageKind::Image,
                "",
                MediaAttachment {
                    media_id: MEDIA.parse().expect("id"),
                    content_type: "image/jpeg".into(),
                    size: 99,
                    width: None,
                    height: None,
                    duration_ms: None,
                },
            );
            if let StreamItem::Message { reply_to, .. } = &mut m {
                *reply_to = Some(quoted);
            }
            m
        },
        receipt: receipt(conv.clone(), bob, false, None),
        group_receipt: receipt(g.clone(), bob, false, Some("phone".into())),
        all_receipt: receipt(g.clone(), alice, true, None),
        read: StreamItem::Read { private: false, conversation_id: conv.clone(), up_to: msg, at: at(), device_id: Some("phone".into()) },
        edited: StreamItem::Edited { conversation_id: conv.clone(), message_id: msg, sender: alice, body: "hello, world".into(), at: at() },
        group_edited: StreamItem::Edited { conversation_id: g.clone(), message_id: msg, sender: alice, body: "é".repeat(100), at: at() },
        deleted: StreamItem::Deleted { conversation_id: conv.clone(), message_id: msg, sender: alice, by: alice, at: at() },
        admin_deleted: StreamItem::Deleted {
            conversation_id: g.clone(),
            message_id: msg,
            sender: bob,
            by: ADMIN.parse().expect("id"),
            at: at(),
        },
        reaction: StreamItem::Reaction { conversation_id: conv.clone(), message_id: msg, by: bob, emoji: Some("👍".into()), at: at() },
        reaction_taken_back: StreamItem::Reaction { conversation_id: g.clone(), message_id: msg, by: ADMIN.parse().expect("id"), emoji: None, at: at() },
        hidden: StreamItem::Hidden { conversation_id: conv, message_id: msg, at: at() },
        group_hidden: StreamItem::Hidden { conversation_id: g.clone(), message_id: msg, at: at() },
        group_created: StreamItem::Group {
            conversation_id: g.clone(),
            change: GroupChange::Created,
            name: Some("climbers".into()),
            member: None,
            role: None,
            members: Some(vec![alice, bob]),
            by: alice,
            at: at(),
            position: 0,
        },
        member_added: StreamItem::Group {
            conversation_id: g,
            change: GroupChange::MemberAdded,
            name: Some("climbers".into()),
            member: Some(bob),
            role: Some(GroupRole::Member),
            members: None,
            by: alice,
            at: at(),
            position: 3,
        },
    }
}

fn sync_of(items: Vec<StreamItem>) -> ServerFrame {
    let items: Vec<SyncItem> = items.into_iter().enumerate().map(|(i, item)| SyncItem { cursor: i.to_string(), item }).collect();
    let cursor = items.last().map(|i| i.cursor.clone());
    ServerFrame::Sync { r#ref: None, items, cursor, has_more: false }
}

/// At least one instance of every variant, with optional fields both present and absent.
fn every_server_frame() -> Vec<ServerFrame> {
    let (alice, bob, conv, msg) = ids();
    let items = items();
    let not_found = ApiError::not_found();
    let mut frames = vec![
        ServerFrame::Welcome { user_id: alice, device_id: "phone".into(), pending: 3 },
        ServerFrame::Sent {
            r#ref: Some(json!(7)),
            client_msg_id: "c-1".into(),
            message_id: msg,
            conversation_id: conv.clone(),
            sent_at: at(),
        },
        ServerFrame::Sent { r#ref: None, client_msg_id: "c-2".into(), message_id: msg, conversation_id: group_conv(), sent_at: at() },
        ServerFrame::Group {
            conversation_id: group_conv(),
            change: GroupChange::Renamed,
            name: Some("boulderers".into()),
            member: None,
            role: None,
            by: alice,
            at: at(),
        },
        ServerFrame::Group {
            conversation_id: group_conv(),
            change: GroupChange::MemberRemoved,
            name: None,
            member: Some(bob),
            role: Some(GroupRole::Admin),
            by: bob,
            at: at(),
        },
        ServerFrame::Sync {
            r#ref: Some(json!("s-1")),
            items: vec![SyncItem { cursor: "0".into(), item: items.message.clone() }, SyncItem { cursor: "1".into(), item: items.receipt.clone() }],
            cursor: Some("1".into()),
            has_more: true,
        },
        sync_of(items.all()),
        ServerFrame::Sync { r#ref: None, items: vec![], cursor: None, has_more: false },
        ServerFrame::Presence { user_id: bob, status: PresenceStatus::Online.as_str(), last_seen: None },
        ServerFrame::Presence { user_id: bob, status: PresenceStatus::Offline.as_str(), last_seen: Some(at()) },
        ServerFrame::Typing { conversation_id: conv, from: bob },
        ServerFrame::Typing { conversation_id: group_conv(), from: bob },
        ServerFrame::Ack { r#ref: Some(json!({"n": 1})), for_type: "delivered" },
        ServerFrame::Ack { r#ref: None, for_type: "read" },
        ServerFrame::Ack { r#ref: Some(json!("e-1")), for_type: "edit" },
        ServerFrame::Ack { r#ref: None, for_type: "delete" },
        ServerFrame::Ack { r#ref: Some(json!("r-1")), for_type: "react" },
        ServerFrame::Ack { r#ref: None, for_type: "typing" },
        ServerFrame::Pong { r#ref: Some(json!(1)) },
        ServerFrame::Pong { r#ref: None },
        ServerFrame::Error { code: not_found.code, message: not_found.message.clone(), retry_after_ms: None, r#ref: Some(json!("x")) },
        ServerFrame::Error { code: "invalid_frame", message: "not a frame".into(), retry_after_ms: None, r#ref: None },
        ServerFrame::Error { code: "rate_limited", message: "slow down".into(), retry_after_ms: Some(250), r#ref: Some(json!(3)) },
        ServerFrame::Error { code: "invalid_mentions", message: "mentions are for group messages".into(), retry_after_ms: None, r#ref: Some(json!(4)) },
        ServerFrame::Error { code: "invalid_emoji", message: "emoji is one emoji".into(), retry_after_ms: None, r#ref: None },
        ServerFrame::Error { code: "message_deleted", message: "the message was deleted".into(), retry_after_ms: None, r#ref: Some(json!("r-2")) },
    ];
    // The push frame of every item.
    frames.extend(items.all().iter().map(ServerFrame::from_item));
    frames
}

fn server_json(f: &ServerFrame) -> Value {
    serde_json::from_str(&f.to_text()).expect("server frames are JSON")
}

#[test]
fn every_server_frame_validates_against_server_json() {
    let schema = schema("server.json");
    let mut covered = BTreeSet::new();
    for frame in every_server_frame() {
        let json = server_json(&frame);
        let name = server_type(&frame);
        assert_eq!(json["type"], json!(name), "wire name of {frame:?}");
        let errs = errors(&schema, &json);
        assert!(errs.is_empty(), "{name} does not match server.json:\n{}\n{json:#}", errs.join("\n"));
        covered.insert(name.to_owned());
    }
    assert_eq!(covered, branch_types(&schema), "server frame instances vs server.json branches");
}

/// A sync answer carries every kind of stream item, and `items()` has one of each kind.
#[test]
fn sync_items_of_every_kind_validate() {
    let schema = schema("server.json");
    let all = items().all();
    let kinds: BTreeSet<String> = all.iter().map(|i| item_kind(i).to_owned()).collect();
    assert_eq!(kinds, branch_consts(&schema["$defs"]["stream_item"]["oneOf"], "kind"), "items() vs stream_item branches");
    for item in all {
        let json = server_json(&sync_of(vec![item]));
        let errs = errors(&schema, &json);
        assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
    }
}

/// The push frames drop what only the stream needs (`position`) and keep the optional fields
/// that are set.
#[test]
fn push_frames_of_group_items() {
    let items = items();
    let message = server_json(&ServerFrame::from_item(&items.group_message));
    assert!(message.get("position").is_none(), "{message}");
    let group = server_json(&ServerFrame::from_item(&items.member_added));
    assert!(group.get("position").is_none(), "{group}");
    assert_eq!(group["member"], json!(BOB));
    assert_eq!(group["role"], json!("member"));
    let receipt = server_json(&ServerFrame::from_item(&items.receipt));
    assert!(receipt.get("all").is_none() && receipt.get("device_id").is_none(), "{receipt}");
    let all = server_json(&ServerFrame::from_item(&items.all_receipt));
    assert_eq!(all["all"], json!(true));
    let device = server_json(&ServerFrame::from_item(&items.group_receipt));
    assert_eq!(device["device_id"], json!("phone"));
}

/// The push frame of an edit or a delete (for everyone or for me) is the stream item with `type`
/// for `kind`; a delete carries no body, a delete for me nothing but the message and the time.
#[test]
fn push_frames_of_edits_and_deletes() {
    let items = items();
    for item in [&items.edited, &items.group_edited, &items.deleted, &items.admin_deleted, &items.hidden, &items.group_hidden] {
        let push = server_json(&ServerFrame::from_item(item));
        let mut stream = serde_json::to_value(item).expect("item");
        let kind = stream.as_object_mut().and_then(|o| o.remove("kind")).expect("a kind");
        stream["type"] = kind;
        assert_eq!(push, stream);
    }
    let deleted = server_json(&ServerFrame::from_item(&items.admin_deleted));
    assert!(deleted.get("body").is_none(), "{deleted}");
    assert_eq!((&deleted["sender"], &deleted["by"]), (&json!(BOB), &json!(ADMIN)));
    let hidden = server_json(&ServerFrame::from_item(&items.group_hidden));
    assert_eq!(
        hidden,
        json!({"type": "hidden", "conversation_id": group_conv().to_string(), "message_id": MSG, "at": "2026-01-01T00:00:00.123Z"})
    );
}

/// The push frame of a reaction is the stream item with `type` for `kind`; a reaction taken back
/// has no `emoji` (not null).
#[test]
fn push_frames_of_reactions() {
    let items = items();
    for item in [&items.reaction, &items.reaction_taken_back] {
        let push = server_json(&ServerFrame::from_item(item));
        let mut stream = serde_json::to_value(item).expect("item");
        let kind = stream.as_object_mut().and_then(|o| o.remove("kind")).expect("a kind");
        stream["type"] = kind;
        assert_eq!(push, stream);
    }
    let reaction = server_json(&ServerFrame::from_item(&items.reaction));
    assert_eq!(
        reaction,
        json!({"type": "reaction", "conversation_id": conv(), "message_id": MSG, "by": BOB, "emoji": "👍", "at": "2026-01-01T00:00:00.123Z"})
    );
    let back = server_json(&ServerFrame::from_item(&items.reaction_taken_back));
    assert_eq!(
        back,
        json!({"type": "reaction", "conversation_id": group_conv().to_string(), "message_id": MSG, "by": ADMIN, "at": "2026-01-01T00:00:00.123Z"})
    );
}

/// The push frame of a reply carries `reply_to`, and of a group message that mentions members,
/// `mentions`, as the stream item has them; a message that does neither has neither field.
#[test]
fn push_frames_carry_replies_and_mentions() {
    let items = items();
    let reply = server_json(&ServerFrame::from_item(&items.reply_message));
    assert_eq!(reply["reply_to"], json!(QUOTED), "{reply}");
    assert_eq!(reply["mentions"], json!([ALICE, ADMIN]), "{reply}");
    assert!(reply.get("position").is_none(), "{reply}");
    let image = server_json(&ServerFrame::from_item(&items.image_reply));
    assert_eq!(image["reply_to"], json!(QUOTED), "{image}");
    assert!(image.get("mentions").is_none(), "{image}");
    let plain = server_json(&ServerFrame::from_item(&items.group_message));
    assert!(plain.get("reply_to").is_none() && plain.get("mentions").is_none(), "{plain}");
    let sync = server_json(&sync_of(vec![items.reply_message.clone()]));
    assert_eq!((&sync["items"][0]["reply_to"], &sync["items"][0]["mentions"]), (&reply["reply_to"], &reply["mentions"]));
}

/// The push frame of a media message carries its media as the stream item has it; a text has
/// none.
#[test]
fn push_frames_carry_media() {
    let items = items();
    let image = server_json(&ServerFrame::from_item(&items.image_message));
    assert_eq!(image["kind"], json!("image"));
    assert_eq!(
        image["media"],
        json!({"media_id": MEDIA, "content_type": "image/png", "size": 1234, "width": 640, "height": 480}),
        "{image}"
    );
    let audio = server_json(&ServerFrame::from_item(&items.audio_message));
    assert_eq!(audio["media"], json!({"media_id": MEDIA, "content_type": "audio/ogg", "size": 0, "duration_ms": 3000}), "{audio}");
    assert_eq!(audio["body"], json!(""));
    let text = server_json(&ServerFrame::from_item(&items.message));
    assert!(text.get("media").is_none(), "{text}");
    // And the sync item is the stream item as is.
    let sync = server_json(&sync_of(vec![items.image_message.clone()]));
    assert_eq!(sync["items"][0]["media"], image["media"]);
    assert_eq!(sync["items"][0]["message_kind"], json!("image"));
}

fn client_examples() -> Vec<Value> {
    let c = conv();
    let g = group_conv().to_string();
    vec![
        json!({"type": "send", "ref": 1, "client_msg_id": "c-1", "to": BOB, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-2", "conversation_id": c, "kind": "text", "body": "hi", "to": null}),
        json!({"type": "send", "client_msg_id": "c-3", "conversation_id": g, "body": "hi all"}),
        json!({"type": "send", "client_msg_id": "c-4", "to": BOB, "kind": null, "body": "hi", "media_id": null, "metadata": null}),
        json!({"type": "send", "client_msg_id": "c-5", "to": BOB, "kind": "image", "body": "the crag", "media_id": MEDIA, "metadata": {"width": 640, "height": 480}}),
        json!({"type": "send", "client_msg_id": "c-6", "conversation_id": g, "kind": "audio", "media_id": MEDIA}),
        json!({"type": "send", "client_msg_id": "c-7", "conversation_id": c, "kind": "video", "body": "", "media_id": MEDIA, "metadata": {"width": 1920, "height": 1080, "duration_ms": 86_400_000}}),
        json!({"type": "send", "client_msg_id": "c-8", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"width": null}}),
        json!({"type": "send", "client_msg_id": "c-9", "to": BOB, "kind": "audio", "media_id": MEDIA, "metadata": {}}),
        json!({"type": "send", "client_msg_id": "c-10", "conversation_id": g, "body": "@alice @bob rope?", "reply_to": MSG, "mentions": [ALICE, BOB]}),
        json!({"type": "send", "client_msg_id": "c-11", "conversation_id": g, "body": "me, me, me", "mentions": [ALICE, ALICE, ALICE], "reply_to": null}),
        json!({"type": "send", "client_msg_id": "c-12", "to": BOB, "body": "yes", "reply_to": MSG, "mentions": []}),
        json!({"type": "send", "client_msg_id": "c-13", "conversation_id": c, "kind": "image", "media_id": MEDIA, "reply_to": MSG, "mentions": null}),
        json!({"type": "send", "client_msg_id": "c-14", "conversation_id": g, "body": "all of you", "mentions": (0..50).map(|_| ALICE).collect::<Vec<_>>()}),
        json!({"type": "delivered", "ref": "d-1", "conversation_id": c, "message_ids": [MSG]}),
        json!({"type": "delivered", "conversation_id": g, "message_ids": [MSG]}),
        json!({"type": "read", "conversation_id": c, "up_to": MSG}),
        json!({"type": "read", "conversation_id": g, "up_to": MSG}),
        json!({"type": "sync", "ref": {"any": "json"}, "after": "41", "limit": 50}),
        json!({"type": "sync"}),
        json!({"type": "edit", "ref": 2, "conversation_id": c, "message_id": MSG, "body": "hello, world"}),
        json!({"type": "edit", "conversation_id": g, "message_id": MSG, "body": "é"}),
        json!({"type": "delete", "ref": "x-1", "conversation_id": c, "message_id": MSG}),
        json!({"type": "delete", "conversation_id": g, "message_id": MSG}),
        json!({"type": "delete", "ref": "x-2", "conversation_id": c, "message_id": MSG, "scope": "everyone"}),
        json!({"type": "delete", "conversation_id": g, "message_id": MSG, "scope": "me"}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": null}),
        json!({"type": "react", "ref": 3, "conversation_id": c, "message_id": MSG, "emoji": "👍"}),
        json!({"type": "react", "conversation_id": g, "message_id": MSG, "emoji": "❤"}),
        json!({"type": "react", "conversation_id": g, "message_id": MSG, "emoji": "👨‍👩‍👧"}),
        json!({"type": "react", "ref": "r-1", "conversation_id": c, "message_id": MSG, "emoji": null}),
        json!({"type": "react", "conversation_id": g, "message_id": MSG}),
        json!({"type": "typing", "conversation_id": c}),
        json!({"type": "typing", "conversation_id": g}),
        json!({"type": "ping", "ref": null}),
        json!({"type": "ping"}),
    ]
}

#[test]
fn client_examples_parse_and_validate_against_client_json() {
    let schema = schema("client.json");
    let mut covered = BTreeSet::new();
    for json in client_examples() {
        let frame: ClientFrame = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(json["type"], json!(client_type(&frame)));
        let errs = errors(&schema, &json);
        assert!(errs.is_empty(), "{json} does not match client.json:\n{}", errs.join("\n"));
        covered.insert(client_type(&frame).to_owned());
    }
    assert_eq!(covered, branch_types(&schema), "client examples vs client.json branches");
}

#[test]
fn malformed_client_frames_are_refused_by_serde_and_schema() {
    let schema = schema("client.json");
    let c = conv();
    let cases = [
        json!({"type": "subscribe", "conversation_id": c}),
        json!({"conversation_id": c}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "extra": 1}),
        json!({"type": "ping", "extra": true}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": null}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": 1, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": 7}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"width": 640, "format": "png"}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"width": -1}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"height": 1.5}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media": {"media_id": MEDIA}}),
        json!({"type": "read", "conversation_id": c, "up_to": 5}),
        json!({"type": "delivered", "conversation_id": c, "message_ids": MSG}),
        json!({"type": "sync", "limit": -1}),
        json!({"type": "edit", "conversation_id": c, "message_id": MSG}),
        json!({"type": "edit", "conversation_id": c, "message_id": MSG, "body": null}),
        json!({"type": "edit", "conversation_id": c, "body": "hi"}),
        json!({"type": "edit", "conversation_id": c, "message_id": MSG, "body": "hi", "kind": "text"}),
        json!({"type": "edit", "conversation_id": c, "message_id": [MSG], "body": "hi"}),
        json!({"type": "delete", "conversation_id": c}),
        json!({"type": "delete", "message_id": MSG}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "body": "hi"}),
        json!({"type": "delete", "conversation_id": c, "message_ids": [MSG]}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": 1}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": true}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": ["me"]}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": {"me": true}}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "for": "me"}),
        json!({"type": "delete", "conversation_id": c, "scope": "me"}),
        json!({"type": "Send", "client_msg_id": "c-1", "to": BOB, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": ALICE}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": [7]}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": [{"user_id": ALICE}]}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply_to": 5}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply_to": [MSG]}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply_to": {"message_id": MSG}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply": MSG}),
        json!({"type": "react", "conversation_id": c, "emoji": "👍"}),
        json!({"type": "react", "message_id": MSG, "emoji": "👍"}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "emoji": 1}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "emoji": ["👍"]}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "emoji": "👍", "body": "hi"}),
        json!({"type": "react", "conversation_id": c, "message_ids": [MSG], "emoji": "👍"}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "reaction": "👍"}),
        json!({"type": "reaction", "conversation_id": c, "message_id": MSG, "emoji": "👍"}),
    ];
    for json in cases {
        assert!(serde_json::from_value::<ClientFrame>(json.clone()).is_err(), "serde accepts {json}");
        assert!(!errors(&schema, &json).is_empty(), "client.json accepts {json}");
    }
}

/// Frames that parse but that the server refuses by content: the schema documents those rules
/// too, so it must refuse them.
#[test]
fn client_json_states_the_content_rules() {
    let schema = schema("client.json");
    let c = conv();
    let cases = [
        json!({"type": "send", "client_msg_id": "c-1", "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "conversation_id": c, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "", "to": BOB, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": ""}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": null}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "text", "body": ""}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "sticker", "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "video", "media_id": null}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "audio", "metadata": {"duration_ms": 1000}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "text", "body": "hi", "media_id": MEDIA}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "media_id": MEDIA}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "metadata": {"width": 1}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "metadata": {}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": "not-a-uuid"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"width": 0}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "media_id": MEDIA, "metadata": {"height": 100_001}}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "video", "media_id": MEDIA, "metadata": {"duration_ms": 86_400_001}}),
        json!({"type": "send", "client_msg_id": "c-1", "kind": "image", "media_id": MEDIA}),
        json!({"type": "send", "client_msg_id": "c-1", "to": "bob", "body": "hi"}),
        json!({"type": "read", "conversation_id": "g.1", "up_to": MSG}),
        json!({"type": "read", "conversation_id": format!("g.{GROUP}x"), "up_to": MSG}),
        json!({"type": "typing", "conversation_id": format!("x.{GROUP}")}),
        json!({"type": "edit", "conversation_id": c, "message_id": MSG, "body": ""}),
        json!({"type": "edit", "conversation_id": "g.1", "message_id": MSG, "body": "hi"}),
        json!({"type": "edit", "conversation_id": c, "message_id": "not-a-uuid", "body": "hi"}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG.to_uppercase()}),
        json!({"type": "delete", "conversation_id": format!("g.{GROUP}x"), "message_id": MSG}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": "all"}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": "Me"}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": "EVERYONE"}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": ""}),
        json!({"type": "delete", "conversation_id": c, "message_id": MSG, "scope": "hidden"}),
        json!({"type": "delete", "conversation_id": c, "message_id": "not-a-uuid", "scope": "me"}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{MSG}.{GROUP}"), "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "mentions": [BOB]}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": c, "body": "hi", "mentions": [ALICE]}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": ["alice"]}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": [ALICE.to_uppercase()]}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": format!("g.{GROUP}"), "body": "hi", "mentions": (0..51).map(|_| ALICE).collect::<Vec<_>>()}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply_to": "not-a-uuid"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "body": "hi", "reply_to": ""}),
        json!({"type": "send", "client_msg_id": "c-1", "conversation_id": c, "body": "hi", "reply_to": c}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "emoji": ""}),
        json!({"type": "react", "conversation_id": c, "message_id": MSG, "emoji": "👍".repeat(65)}),
        json!({"type": "react", "conversation_id": c, "message_id": "not-a-uuid", "emoji": "👍"}),
        json!({"type": "react", "conversation_id": "g.1", "message_id": MSG, "emoji": "👍"}),
        json!({"type": "react", "conversation_id": format!("g.{GROUP}x"), "message_id": MSG}),
    ];
    for json in cases {
        assert!(serde_json::from_value::<ClientFrame>(json.clone()).is_ok(), "serde refuses {json}");
        assert!(!errors(&schema, &json).is_empty(), "client.json accepts {json}");
    }
}

/// So that a too-loose server.json fails this test.
#[test]
fn server_json_refuses_drifted_frames() {
    let schema = schema("server.json");
    let (_, bob, _, _) = ids();
    let i = items();
    let group_frame = || ServerFrame::from_item(&i.member_added);
    type Mutation = fn(&mut Value);
    let cases: Vec<(ServerFrame, &str, Mutation)> = vec![
        (ServerFrame::Pong { r#ref: None }, "unknown type", |v| v["type"] = json!("pang")),
        (ServerFrame::Pong { r#ref: None }, "null ref", |v| v["ref"] = Value::Null),
        (ServerFrame::Welcome { user_id: bob, device_id: "phone".into(), pending: 0 }, "extra field", |v| v["extra"] = json!(1)),
        (ServerFrame::Ack { r#ref: None, for_type: "read" }, "ack for a non-acked frame", |v| v["for"] = json!("send")),
        (ServerFrame::Ack { r#ref: None, for_type: "edit" }, "ack for a server frame name", |v| v["for"] = json!("edited")),
        (ServerFrame::Ack { r#ref: None, for_type: "delete" }, "ack for a sync", |v| v["for"] = json!("sync")),
        (ServerFrame::Ack { r#ref: None, for_type: "react" }, "ack for a server frame name", |v| v["for"] = json!("reaction")),
        (ServerFrame::from_item(&i.message), "time without milliseconds", |v| v["sent_at"] = json!("2026-01-01T00:00:00Z")),
        (ServerFrame::from_item(&i.message), "position in a message frame", |v| v["position"] = json!(3)),
        (ServerFrame::from_item(&i.message), "g. conversation id with a bad uuid", |v| v["conversation_id"] = json!("g.5a1e0000-4000-8000-0000-00000000000")),
        (ServerFrame::from_item(&i.message), "unknown kind", |v| v["kind"] = json!("sticker")),
        (ServerFrame::from_item(&i.message), "text with media", |v| v["media"] = json!({"media_id": MEDIA, "content_type": "image/png", "size": 1})),
        (ServerFrame::from_item(&i.message), "image without media", |v| v["kind"] = json!("image")),
        (ServerFrame::from_item(&i.image_message), "media with a bad uuid", |v| v["media"]["media_id"] = json!("not-a-uuid")),
        (ServerFrame::from_item(&i.image_message), "media with an unknown field", |v| v["media"]["thumbnail"] = json!("x")),
        (ServerFrame::from_item(&i.image_message), "media without size", |v| remove(&mut v["media"], "size")),
        (ServerFrame::from_item(&i.image_message), "media with a negative size", |v| v["media"]["size"] = json!(-1)),
        (ServerFrame::from_item(&i.image_message), "media with a null width", |v| v["media"]["width"] = Value::Null),
        (ServerFrame::from_item(&i.image_message), "media with a bad content type", |v| v["media"]["content_type"] = json!("image")),
        (ServerFrame::from_item(&i.audio_message), "media with a fractional duration", |v| v["media"]["duration_ms"] = json!(2.5)),
        (ServerFrame::from_item(&i.image_message), "image without media", |v| remove(v, "media")),
        (ServerFrame::from_item(&i.message), "mentions in a direct message", |v| v["mentions"] = json!([BOB])),
        (ServerFrame::from_item(&i.message), "bad reply_to", |v| v["reply_to"] = json!("01932c07")),
        (ServerFrame::from_item(&i.message), "null reply_to", |v| v["reply_to"] = Value::Null),
        (ServerFrame::from_item(&i.reply_message), "quoted text instead of an id", |v| v["reply_to"] = json!({"message_id": QUOTED, "body": "hi"})),
        (ServerFrame::from_item(&i.reply_message), "empty mentions", |v| v["mentions"] = json!([])),
        (ServerFrame::from_item(&i.reply_message), "null mentions", |v| v["mentions"] = Value::Null),
        (ServerFrame::from_item(&i.reply_message), "duplicate mentions", |v| v["mentions"] = json!([ALICE, ALICE])),
        (ServerFrame::from_item(&i.reply_message), "a bad mention", |v| v["mentions"] = json!(["alice"])),
        (ServerFrame::from_item(&i.reply_message), "mentions not a list", |v| v["mentions"] = json!(ALICE)),
        (ServerFrame::from_item(&i.reply_message), "mentions moved to a direct conversation", |v| v["conversation_id"] = json!(conv())),
        (ServerFrame::from_item(&i.reply_message), "position in a reply frame", |v| v["position"] = json!(14)),
        (ServerFrame::from_item(&i.reaction), "missing by", |v| remove(v, "by")),
        (ServerFrame::from_item(&i.reaction), "missing message_id", |v| remove(v, "message_id")),
        (ServerFrame::from_item(&i.reaction), "missing at", |v| remove(v, "at")),
        (ServerFrame::from_item(&i.reaction), "null emoji", |v| v["emoji"] = Value::Null),
        (ServerFrame::from_item(&i.reaction), "empty emoji", |v| v["emoji"] = json!("")),
        (ServerFrame::from_item(&i.reaction), "emoji not a string", |v| v["emoji"] = json!(1)),
        (ServerFrame::from_item(&i.reaction), "a count in a reaction frame", |v| v["count"] = json!(1)),
        (ServerFrame::from_item(&i.reaction), "user instead of by", |v| {
            v["user"] = v["by"].clone();
            remove(v, "by");
        }),
        (ServerFrame::from_item(&i.reaction_taken_back), "bad by", |v| v["by"] = json!("admin")),
        (ServerFrame::from_item(&i.reaction_taken_back), "a kind in a reaction frame", |v| v["kind"] = json!("reaction")),
        (ServerFrame::from_item(&i.reaction_taken_back), "position in a reaction frame", |v| v["position"] = json!(3)),
        (ServerFrame::from_item(&i.reaction_taken_back), "time without milliseconds", |v| v["at"] = json!("2026-01-01T00:00:00Z")),
        (ServerFrame::from_item(&i.receipt), "bad status", |v| v["status"] = json!("read")),
        (ServerFrame::from_item(&i.receipt), "all written as false", |v| v["all"] = json!(false)),
        (ServerFrame::from_item(&i.group_receipt), "bad device id", |v| v["device_id"] = json!("my phone")),
        (group_frame(), "position in a group frame", |v| v["position"] = json!(3)),
        (group_frame(), "unknown change", |v| v["change"] = json!("archived")),
        (group_frame(), "unknown role", |v| v["role"] = json!("owner")),
        (group_frame(), "g. conversation id with a bad uuid", |v| v["conversation_id"] = json!("g.not-a-uuid")),
        (group_frame(), "direct conversation id", |v| v["conversation_id"] = json!(conv())),
        (group_frame(), "empty name", |v| v["name"] = json!("")),
        (group_frame(), "missing by", |v| remove(v, "by")),
        (ServerFrame::from_item(&i.edited), "missing body", |v| remove(v, "body")),
        (ServerFrame::from_item(&i.edited), "missing sender", |v| remove(v, "sender")),
        (ServerFrame::from_item(&i.edited), "kind in an edited frame", |v| v["kind"] = json!("text")),
        (ServerFrame::from_item(&i.edited), "body not a string", |v| v["body"] = Value::Null),
        (ServerFrame::from_item(&i.group_edited), "time without milliseconds", |v| v["at"] = json!("2026-01-01T00:00:00Z")),
        (ServerFrame::from_item(&i.deleted), "missing by", |v| remove(v, "by")),
        (ServerFrame::from_item(&i.deleted), "a body in a deleted frame", |v| v["body"] = json!("hello")),
        (ServerFrame::from_item(&i.admin_deleted), "bad by", |v| v["by"] = json!("admin")),
        (ServerFrame::from_item(&i.admin_deleted), "missing message_id", |v| remove(v, "message_id")),
        (ServerFrame::from_item(&i.hidden), "missing at", |v| remove(v, "at")),
        (ServerFrame::from_item(&i.hidden), "missing message_id", |v| remove(v, "message_id")),
        (ServerFrame::from_item(&i.hidden), "a body in a hidden frame", |v| v["body"] = json!("hello")),
        (ServerFrame::from_item(&i.hidden), "a sender in a hidden frame", |v| v["sender"] = json!(ALICE)),
        (ServerFrame::from_item(&i.hidden), "a by in a hidden frame", |v| v["by"] = json!(BOB)),
        (ServerFrame::from_item(&i.hidden), "a scope in a hidden frame", |v| v["scope"] = json!("me")),
        (ServerFrame::from_item(&i.group_hidden), "bad message id", |v| v["message_id"] = json!("not-a-uuid")),
        (ServerFrame::from_item(&i.group_hidden), "g. conversation id with a bad uuid", |v| v["conversation_id"] = json!("g.not-a-uuid")),
        (ServerFrame::from_item(&i.group_hidden), "time without milliseconds", |v| v["at"] = json!("2026-01-01T00:00:00Z")),
        (ServerFrame::from_item(&i.read), "missing up_to", |v| remove(v, "up_to")),
        (ServerFrame::from_item(&i.read), "extra read field", |v| v["status"] = json!("seen")),
        (sync_of(vec![i.message.clone()]), "extra sync item field", |v| v["items"][0]["extra"] = json!(1)),
        (sync_of(vec![i.receipt.clone()]), "sync item without cursor", |v| remove(&mut v["items"][0], "cursor")),
        (sync_of(vec![i.member_added.clone()]), "group sync item without position", |v| remove(&mut v["items"][0], "position")),
        (sync_of(vec![i.group_created.clone()]), "group sync item with an unknown change", |v| v["items"][0]["change"] = json!("archived")),
        (sync_of(vec![i.group_message.clone()]), "non-integer message position", |v| v["items"][0]["position"] = json!("12")),
        (sync_of(vec![i.image_message.clone()]), "sync item media with a bad uuid", |v| v["items"][0]["media"]["media_id"] = json!("g.1")),
        (sync_of(vec![i.image_message.clone()]), "sync item media with an unknown field", |v| v["items"][0]["media"]["cursor"] = json!("1")),
        (sync_of(vec![i.image_message.clone()]), "sync item image without media", |v| remove(&mut v["items"][0], "media")),
        (sync_of(vec![i.message.clone()]), "sync item text with media", |v| v["items"][0]["media"] = json!({"media_id": MEDIA, "content_type": "image/png", "size": 1})),
        (sync_of(vec![i.message.clone()]), "sync item with an unknown message kind", |v| v["items"][0]["message_kind"] = json!("sticker")),
        (sync_of(vec![i.read.clone()]), "read sync item without at", |v| remove(&mut v["items"][0], "at")),
        (sync_of(vec![i.edited.clone()]), "edited sync item without body", |v| remove(&mut v["items"][0], "body")),
        (sync_of(vec![i.group_edited.clone()]), "edited sync item with a position", |v| v["items"][0]["position"] = json!(3)),
        (sync_of(vec![i.edited.clone()]), "edited sync item without cursor", |v| remove(&mut v["items"][0], "cursor")),
        (sync_of(vec![i.deleted.clone()]), "deleted sync item with a body", |v| v["items"][0]["body"] = json!("hello")),
        (sync_of(vec![i.admin_deleted.clone()]), "deleted sync item without by", |v| remove(&mut v["items"][0], "by")),
        (sync_of(vec![i.deleted.clone()]), "deleted sync item as a push frame", |v| v["items"][0]["type"] = json!("deleted")),
        (sync_of(vec![i.hidden.clone()]), "hidden sync item with a body", |v| v["items"][0]["body"] = json!("hello")),
        (sync_of(vec![i.hidden.clone()]), "hidden sync item with a sender", |v| v["items"][0]["sender"] = json!(ALICE)),
        (sync_of(vec![i.group_hidden.clone()]), "hidden sync item with a position", |v| v["items"][0]["position"] = json!(3)),
        (sync_of(vec![i.group_hidden.clone()]), "hidden sync item without message_id", |v| remove(&mut v["items"][0], "message_id")),
        (sync_of(vec![i.hidden.clone()]), "hidden sync item without at", |v| remove(&mut v["items"][0], "at")),
        (sync_of(vec![i.hidden.clone()]), "hidden sync item without cursor", |v| remove(&mut v["items"][0], "cursor")),
        (sync_of(vec![i.hidden.clone()]), "hidden sync item as a push frame", |v| v["items"][0]["type"] = json!("hidden")),
        (sync_of(vec![i.reaction.clone()]), "reaction sync item without cursor", |v| remove(&mut v["items"][0], "cursor")),
        (sync_of(vec![i.reaction.clone()]), "reaction sync item without by", |v| remove(&mut v["items"][0], "by")),
        (sync_of(vec![i.reaction.clone()]), "reaction sync item with an empty emoji", |v| v["items"][0]["emoji"] = json!("")),
        (sync_of(vec![i.reaction_taken_back.clone()]), "reaction sync item with a null emoji", |v| v["items"][0]["emoji"] = Value::Null),
        (sync_of(vec![i.reaction.clone()]), "reaction sync item as a push frame", |v| v["items"][0]["type"] = json!("reaction")),
        (sync_of(vec![i.reply_message.clone()]), "sync item with empty mentions", |v| v["items"][0]["mentions"] = json!([])),
        (sync_of(vec![i.message.clone()]), "direct sync item with mentions", |v| v["items"][0]["mentions"] = json!([BOB])),
        (sync_of(vec![i.image_reply.clone()]), "sync item with a bad reply_to", |v| v["items"][0]["reply_to"] = json!("g.1")),
        (sync_of(vec![i.read.clone()]), "unknown sync item kind", |v| v["items"][0]["kind"] = json!("typing")),
        (sync_of(vec![i.read.clone()]), "sync item as a push frame", |v| v["items"][0]["type"] = json!("read")),
        (ServerFrame::Sync { r#ref: None, items: vec![], cursor: None, has_more: false }, "missing cursor", |v| remove(v, "cursor")),
    ];
    for (frame, what, mutate) in cases {
        let mut json = server_json(&frame);
        assert!(errors(&schema, &json).is_empty(), "{what}: the unmutated frame must be valid: {json}");
        mutate(&mut json);
        assert!(!errors(&schema, &json).is_empty(), "server.json accepts {what}: {json}");
    }
}

fn remove(v: &mut Value, field: &str) {
    if let Some(o) = v.as_object_mut() {
        o.remove(field);
    }
}

/// Sync items flatten `StreamItem`, whose times must go through `format_time`: chrono's default
/// serialiser drops a `.000` fraction at a whole second.
#[test]
fn sync_item_times_keep_their_milliseconds_at_whole_seconds() {
    let whole_second = DateTime::from_timestamp(1_767_225_600, 0).expect("time");
    let mut all = items().all();
    for item in &mut all {
        match item {
            StreamItem::Message { sent_at, .. } => *sent_at = whole_second,
            StreamItem::Receipt { at, .. }
            | StreamItem::Read { at, .. }
            | StreamItem::Edited { at, .. }
            | StreamItem::Deleted { at, .. }
            | StreamItem::Hidden { at, .. }
            | StreamItem::Reaction { at, .. }
            | StreamItem::Group { at, .. } => *at = whole_second,
        }
    }
    let json = server_json(&sync_of(all));
    let errs = errors(&schema("server.json"), &json);
    assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
}

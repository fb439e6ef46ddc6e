//! `schemas/frames/` cannot drift from `ClientFrame` / `ServerFrame`: one instance of every server
//! frame, serialised as the connection sends it, must validate against `server.json`; example
//! client frames must both parse as `ClientFrame` and validate against `client.json`; and both
//! sides must refuse the same malformed frames.

use std::collections::BTreeSet;
use std::path::Path;

use chat_events::{ConversationId, MessageId, MessageKind, PresenceStatus, ReceiptStatus, StreamItem, UserId};
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
    schema["oneOf"]
        .as_array()
        .expect("top-level oneOf")
        .iter()
        .map(|b| b["properties"]["type"]["const"].as_str().expect("branch with a type const").to_owned())
        .collect()
}

const ALICE: &str = "0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01";
const BOB: &str = "7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const MSG: &str = "01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e";

fn ids() -> (UserId, UserId, ConversationId, MessageId) {
    let alice: UserId = ALICE.parse().expect("id");
    let bob: UserId = BOB.parse().expect("id");
    (alice, bob, ConversationId::direct(alice, bob), MSG.parse().expect("id"))
}

fn conv() -> String {
    ids().2.to_string()
}

/// Sub-second on purpose: chrono's default serialiser (used for flattened stream items) drops a
/// `.000` fraction, see `sync_item_times_keep_their_milliseconds_at_whole_seconds`.
fn at() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_767_225_600_123).expect("time")
}

fn items() -> (StreamItem, StreamItem) {
    let (alice, bob, conv, msg) = ids();
    let message = StreamItem::Message {
        message_id: msg,
        conversation_id: conv.clone(),
        sender: alice,
        client_msg_id: "c-1".into(),
        message_kind: MessageKind::Text,
        body: "hello".into(),
        sent_at: at(),
    };
    let receipt = StreamItem::Receipt { conversation_id: conv, message_id: msg, status: ReceiptStatus::Delivered, by: bob, at: at() };
    (message, receipt)
}

/// At least one instance of every variant, with optional fields both present and absent.
fn every_server_frame() -> Vec<ServerFrame> {
    let (alice, bob, conv, msg) = ids();
    let (message, receipt) = items();
    let not_found = ApiError::not_found();
    vec![
        ServerFrame::Welcome { user_id: alice, device_id: "phone".into(), pending: 3 },
        ServerFrame::Sent {
            r#ref: Some(json!(7)),
            client_msg_id: "c-1".into(),
            message_id: msg,
            conversation_id: conv.clone(),
            sent_at: at(),
        },
        ServerFrame::Sent { r#ref: None, client_msg_id: "c-2".into(), message_id: msg, conversation_id: conv.clone(), sent_at: at() },
        ServerFrame::from_item(&message),
        ServerFrame::from_item(&receipt),
        ServerFrame::Sync {
            r#ref: Some(json!("s-1")),
            items: vec![SyncItem { cursor: "0".into(), item: message }, SyncItem { cursor: "1".into(), item: receipt }],
            cursor: Some("1".into()),
            has_more: true,
        },
        ServerFrame::Sync { r#ref: None, items: vec![], cursor: None, has_more: false },
        ServerFrame::Presence { user_id: bob, status: PresenceStatus::Online.as_str(), last_seen: None },
        ServerFrame::Presence { user_id: bob, status: PresenceStatus::Offline.as_str(), last_seen: Some(at()) },
        ServerFrame::Typing { conversation_id: conv, from: bob },
        ServerFrame::Ack { r#ref: Some(json!({"n": 1})), for_type: "delivered" },
        ServerFrame::Ack { r#ref: None, for_type: "read" },
        ServerFrame::Ack { r#ref: None, for_type: "typing" },
        ServerFrame::Pong { r#ref: Some(json!(1)) },
        ServerFrame::Pong { r#ref: None },
        ServerFrame::Error { code: not_found.code, message: not_found.message.clone(), r#ref: Some(json!("x")) },
        ServerFrame::Error { code: "invalid_frame", message: "not a frame".into(), r#ref: None },
    ]
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

fn client_examples() -> Vec<Value> {
    let c = conv();
    vec![
        json!({"type": "send", "ref": 1, "client_msg_id": "c-1", "to": BOB, "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-2", "conversation_id": c, "kind": "text", "body": "hi", "to": null}),
        json!({"type": "delivered", "ref": "d-1", "conversation_id": c, "message_ids": [MSG]}),
        json!({"type": "read", "conversation_id": c, "up_to": MSG}),
        json!({"type": "sync", "ref": {"any": "json"}, "after": "41", "limit": 50}),
        json!({"type": "sync"}),
        json!({"type": "typing", "conversation_id": c}),
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
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB}),
        json!({"type": "ping", "extra": true}),
        json!({"type": "read", "conversation_id": c, "up_to": 5}),
        json!({"type": "delivered", "conversation_id": c, "message_ids": MSG}),
        json!({"type": "sync", "limit": -1}),
        json!({"type": "Send", "client_msg_id": "c-1", "to": BOB, "body": "hi"}),
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
        json!({"type": "send", "client_msg_id": "c-1", "to": BOB, "kind": "image", "body": "hi"}),
        json!({"type": "send", "client_msg_id": "c-1", "to": "bob", "body": "hi"}),
        json!({"type": "read", "conversation_id": "g.1", "up_to": MSG}),
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
    type Mutation = fn(&mut Value);
    let cases: Vec<(ServerFrame, &str, Mutation)> = vec![
        (ServerFrame::Pong { r#ref: None }, "unknown type", |v| v["type"] = json!("pang")),
        (ServerFrame::Pong { r#ref: None }, "null ref", |v| v["ref"] = Value::Null),
        (ServerFrame::Welcome { user_id: bob, device_id: "phone".into(), pending: 0 }, "extra field", |v| v["extra"] = json!(1)),
        (ServerFrame::Ack { r#ref: None, for_type: "read" }, "ack for a non-acked frame", |v| v["for"] = json!("send")),
        (ServerFrame::from_item(&items().0), "time without milliseconds", |v| v["sent_at"] = json!("2026-01-01T00:00:00Z")),
        (ServerFrame::from_item(&items().1), "bad status", |v| v["status"] = json!("read")),
        (
            ServerFrame::Sync { r#ref: None, items: vec![SyncItem { cursor: "0".into(), item: items().0 }], cursor: Some("0".into()), has_more: false },
            "extra sync item field",
            |v| v["items"][0]["extra"] = json!(1),
        ),
        (
            ServerFrame::Sync { r#ref: None, items: vec![SyncItem { cursor: "0".into(), item: items().1 }], cursor: Some("0".into()), has_more: false },
            "sync item without cursor",
            |v| {
                if let Some(item) = v["items"][0].as_object_mut() {
                    item.remove("cursor");
                }
            },
        ),
        (ServerFrame::Sync { r#ref: None, items: vec![], cursor: None, has_more: false }, "missing cursor", |v| {
            if let Some(frame) = v.as_object_mut() {
                frame.remove("cursor");
            }
        }),
    ];
    for (frame, what, mutate) in cases {
        let mut json = server_json(&frame);
        assert!(errors(&schema, &json).is_empty(), "{what}: the unmutated frame must be valid: {json}");
        mutate(&mut json);
        assert!(!errors(&schema, &json).is_empty(), "server.json accepts {what}: {json}");
    }
}

/// Sync items flatten `StreamItem`, whose times use chrono's default serialiser rather than
/// `format_time`: at a whole second the `.000` is dropped.
#[test]
fn sync_item_times_keep_their_milliseconds_at_whole_seconds() {
    let (message, _) = items();
    let StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, .. } = message else {
        unreachable!("items().0 is a message")
    };
    let sent_at = DateTime::from_timestamp(1_767_225_600, 0).expect("time");
    let item = StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, sent_at };
    let frame = ServerFrame::Sync { r#ref: None, items: vec![SyncItem { cursor: "0".into(), item }], cursor: Some("0".into()), has_more: false };
    let json = server_json(&frame);
    let errs = errors(&schema("server.json"), &json);
    assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
}

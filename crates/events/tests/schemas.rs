//! `schemas/events/` cannot drift from the types: every fixture, as `Envelope::encode` writes it,
//! must validate against the schema of its type, and every type must have exactly one schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chat_events::event::{
    fixtures, AuditAccessed, Envelope, Event, GroupChange, GroupRole, MediaAttachment, MessageKind, StreamItem, EVENT_TYPES,
};
use chat_events::{ConversationId, GroupId, MessageId, UserId};
use serde_json::{json, Value};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn event_schema(type_name: &str) -> Value {
    load(&schemas_dir().join("events").join(format!("{type_name}.json")))
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::draft202012::new(schema).unwrap_or_else(|e| panic!("schema does not compile: {e}"))
}

/// Every error, with where it is, so a failure says which field drifted.
fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    validator(schema).iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// The `kind` of a stream item. A new kind is a compile error here until it has a name, a fixture
/// in `chat_events::event::fixtures()` and a branch in the `stream_item` definition.
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

/// Every message kind, by wire name. A new kind is a compile error here until it has a name and
/// is in the `message_kind` definition.
fn kind_name(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Text => "text",
        MessageKind::Image => "image",
        MessageKind::Audio => "audio",
        MessageKind::Video => "video",
    }
}

const ALL_KINDS: [MessageKind; 4] = [MessageKind::Text, MessageKind::Image, MessageKind::Audio, MessageKind::Video];

/// The fixture of an event type, or with `delivery.queued#<kind>` the `delivery.queued` fixture
/// carrying that kind of item, or with `message.sent#<kind>` the `message.sent` fixture of that
/// message kind (`message.sent#mentions`: the group message that mentions a member,
/// `message.sent#reply`: the reply), or with `message.reacted#retracted` the reaction taken back.
fn fixture(which: &str) -> Envelope {
    let (type_name, kind) = match which.split_once('#') {
        Some((t, k)) => (t, Some(k)),
        None => (which, None),
    };
    fixtures()
        .into_iter()
        .find(|e| {
            e.event.type_name() == type_name
                && match (&e.event, kind) {
                    (_, None) => true,
                    (Event::DeliveryQueued(d), Some(k)) => item_kind(&d.item) == k,
                    (Event::MessageSent(m), Some("mentions")) => !m.mentions.is_empty(),
                    (Event::MessageSent(m), Some("reply")) => m.reply_to.is_some(),
                    (Event::MessageSent(m), Some(k)) => kind_name(m.kind) == k,
                    (Event::MessageReacted(r), Some("retracted")) => r.emoji.is_none(),
                    (_, Some(_)) => false,
                }
        })
        .unwrap_or_else(|| panic!("no fixture {which}"))
}

fn fixture_json(which: &str) -> Value {
    fixture(which).to_json()
}

/// The schema file of a fixture selector (`delivery.queued#group` is `delivery.queued`).
fn schema_of(which: &str) -> Value {
    event_schema(which.split_once('#').map_or(which, |(t, _)| t))
}

/// The `.json` files of a schema folder, by file stem.
fn json_files(dir: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_stem().and_then(|s| s.to_str()).expect("utf-8 name").to_owned(), p))
        .collect()
}

#[test]
fn every_fixture_validates_against_its_schema() {
    for env in fixtures() {
        let name = env.event.type_name();
        let json = env.to_json();
        let errs = errors(&event_schema(name), &json);
        assert!(errs.is_empty(), "{name} does not match schemas/events/{name}.json:\n{}\n{json:#}", errs.join("\n"));
    }
}

#[test]
fn every_event_type_has_a_schema_and_every_schema_an_event_type() {
    let files = json_files(&schemas_dir().join("events"));
    let types: BTreeMap<&str, u32> = EVENT_TYPES.iter().copied().collect();
    let stems: BTreeSet<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(stems, types.keys().copied().collect::<BTreeSet<_>>(), "schemas/events/ vs EVENT_TYPES");
    for (name, version) in types {
        let schema = event_schema(name);
        assert_eq!(schema["properties"]["type"]["const"], json!(name), "{name}: type const");
        assert_eq!(schema["properties"]["version"]["const"], json!(version), "{name}: version const");
    }
}

/// Shared definitions are inlined per file (no ref resolution needed by any tool); this keeps the
/// copies identical.
#[test]
fn shared_definitions_are_identical_in_every_schema_file() {
    let mut seen: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for folder in ["events", "frames"] {
        for (stem, path) in json_files(&schemas_dir().join(folder)) {
            let file = format!("{folder}/{stem}.json");
            let schema = load(&path);
            let Some(defs) = schema.get("$defs").and_then(Value::as_object) else { continue };
            for (name, def) in defs {
                match seen.get(name) {
                    Some((first, v)) => assert_eq!(v, def, "$defs/{name} differs between {first} and {file}"),
                    None => {
                        seen.insert(name.clone(), (file.clone(), def.clone()));
                    }
                }
            }
        }
    }
    assert!(seen.contains_key("uuid") && seen.contains_key("time"), "no shared definitions found");
}

/// The `enum` of a definition, as strings.
fn enum_of(def: &Value) -> BTreeSet<String> {
    def["enum"].as_array().expect("an enum").iter().map(|v| v.as_str().expect("a string").to_owned()).collect()
}

/// Every message kind is in the `message_kind` definition (identical in every file, see above)
/// and round-trips through its name; `media.uploaded` takes every kind but text.
#[test]
fn every_message_kind_is_in_the_schemas() {
    let names: BTreeSet<String> = ALL_KINDS.iter().map(|k| kind_name(*k).to_owned()).collect();
    for k in ALL_KINDS {
        assert_eq!(k.as_str(), kind_name(k));
        assert_eq!(MessageKind::parse(kind_name(k)), Some(k));
        assert_eq!(serde_json::to_value(k).expect("kind"), json!(kind_name(k)));
    }
    assert_eq!(enum_of(&event_schema("message.sent")["$defs"]["message_kind"]), names, "message_kind vs MessageKind");
    let media: BTreeSet<String> = names.iter().filter(|n| *n != "text").cloned().collect();
    assert_eq!(enum_of(&event_schema("media.uploaded")["properties"]["data"]["properties"]["kind"]), media, "media.uploaded kind");
}

/// Every kind of stream item has a fixture and a branch of `stream_item`, and nothing else does.
#[test]
fn every_stream_item_kind_has_a_fixture_and_a_schema_branch() {
    let covered: BTreeSet<&str> = fixtures()
        .iter()
        .filter_map(|e| match &e.event {
            Event::DeliveryQueued(d) => Some(item_kind(&d.item)),
            _ => None,
        })
        .collect();
    let schema = event_schema("delivery.queued");
    let branches: BTreeSet<&str> = schema["$defs"]["stream_item"]["oneOf"]
        .as_array()
        .expect("stream_item oneOf")
        .iter()
        .map(|b| b["properties"]["kind"]["const"].as_str().expect("branch with a kind const"))
        .collect();
    assert_eq!(covered, branches, "delivery.queued fixtures vs stream_item branches");
}

/// The fixtures leave most optional fields out; these variants set them (and use a group
/// conversation where the fixture is direct), so that both shapes are checked.
#[test]
fn optional_fields_validate_when_present() {
    let group = ConversationId::group(GroupId("5a1e0000-4000-8000-0000-000000000002".parse().expect("uuid")));
    let mut variants = Vec::new();
    for env in fixtures() {
        let Event::DeliveryQueued(d) = &env.event else { continue };
        let mut changed = |f: fn(&mut StreamItem, &ConversationId)| {
            let mut v = env.clone();
            if let Event::DeliveryQueued(d) = &mut v.event {
                f(&mut d.item, &group);
            }
            variants.push(v);
        };
        match &d.item {
            StreamItem::Message { .. } => {
                changed(|item, g| {
                    if let StreamItem::Message { position, conversation_id, .. } = item {
                        *position = Some(0);
                        *conversation_id = g.clone();
                    }
                });
                changed(|item, g| {
                    if let StreamItem::Message { position, conversation_id, message_kind, body, media, .. } = item {
                        *position = Some(3);
                        *conversation_id = g.clone();
                        *message_kind = MessageKind::Video;
                        *body = String::new();
                        *media = Some(MediaAttachment {
                            media_id: uuid::Uuid::from_u128(8),
                            content_type: "video/mp4".into(),
                            size: 0,
                            width: Some(1920),
                            height: Some(1080),
                            duration_ms: Some(86_400_000),
                        });
                    }
                });
                // A group reply that mentions two members.
                changed(|item, g| {
                    if let StreamItem::Message { position, conversation_id, reply_to, mentions, .. } = item {
                        *position = Some(4);
                        *conversation_id = g.clone();
                        *reply_to = Some(MessageId(uuid::Uuid::from_u128(0x0193_2c07_8a4e_7b3c_9d2e_1f0a_9b8c_7d6f)));
                        *mentions = vec![ADMIN.parse().expect("uuid"), ALICE.parse().expect("uuid")];
                    }
                });
                // A direct reply (mentions are for groups only).
                changed(|item, _| {
                    if let StreamItem::Message { reply_to, .. } = item {
                        *reply_to = Some(MessageId(uuid::Uuid::from_u128(0x0193_2c07_8a4e_7b3c_9d2e_1f0a_9b8c_7d6f)));
                    }
                });
                changed(|item, _| {
                    if let StreamItem::Message { message_kind, media, .. } = item {
                        *message_kind = MessageKind::Audio;
                        *media = Some(MediaAttachment {
                            media_id: uuid::Uuid::from_u128(9),
                            content_type: "audio/ogg".into(),
                            size: 4096,
                            width: None,
                            height: None,
                            duration_ms: Some(0),
                        });
                    }
                });
            }
            StreamItem::Receipt { .. } => {
                changed(|item, g| {
                    if let StreamItem::Receipt { all, device_id, conversation_id, .. } = item {
                        *device_id = Some("phone-1".into());
                        *conversation_id = g.clone();
                        *all = false;
                    }
                });
                changed(|item, g| {
                    if let StreamItem::Receipt { all, conversation_id, .. } = item {
                        *all = true;
                        *conversation_id = g.clone();
                    }
                });
            }
            StreamItem::Read { .. } => changed(|item, g| {
                if let StreamItem::Read { conversation_id, .. } = item {
                    *conversation_id = g.clone();
                }
            }),
            StreamItem::Edited { .. } => changed(|item, g| {
                if let StreamItem::Edited { conversation_id, body, .. } = item {
                    *conversation_id = g.clone();
                    *body = "é".repeat(100);
                }
            }),
            // Deleted by an admin of the group, not the sender.
            StreamItem::Deleted { .. } => changed(|item, g| {
                if let StreamItem::Deleted { conversation_id, by, .. } = item {
                    *conversation_id = g.clone();
                    *by = ADMIN.parse::<UserId>().expect("uuid");
                }
            }),
            // A group message deleted for the user only.
            StreamItem::Hidden { .. } => changed(|item, g| {
                if let StreamItem::Hidden { conversation_id, .. } = item {
                    *conversation_id = g.clone();
                }
            }),
            // A reaction to a group message taken back, and one with a sequence emoji.
            StreamItem::Reaction { .. } => {
                changed(|item, g| {
                    if let StreamItem::Reaction { conversation_id, emoji, .. } = item {
                        *conversation_id = g.clone();
                        *emoji = None;
                    }
                });
                changed(|item, _| {
                    if let StreamItem::Reaction { emoji, by, .. } = item {
                        *emoji = Some("👨‍👩‍👧".into());
                        *by = ALICE.parse::<UserId>().expect("uuid");
                    }
                });
            }
            StreamItem::Group { .. } => {
                changed(|item, _| {
                    if let StreamItem::Group { change, name, member, role, .. } = item {
                        *change = GroupChange::Created;
                        *name = Some("climbers".into());
                        *member = None;
                        *role = None;
                    }
                });
                changed(|item, _| {
                    if let StreamItem::Group { change, name, role, .. } = item {
                        *change = GroupChange::MemberRemoved;
                        *name = Some("x".repeat(100));
                        *role = Some(GroupRole::Admin);
                    }
                });
                changed(|item, _| {
                    if let StreamItem::Group { change, name, .. } = item {
                        *change = GroupChange::Renamed;
                        *name = Some("boulderers".into());
                    }
                });
            }
        }
    }
    assert!(variants.len() >= 16, "not every stream item kind was varied");
    for env in variants {
        let json = env.to_json();
        let errs = errors(&event_schema("delivery.queued"), &json);
        assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
        assert_eq!(Envelope::decode(&env.encode()).expect("decodes"), env, "round trip of {json}");
    }
}

/// A block's traces: a withheld message, its edit, delete and reaction, its sender's own stream
/// item, and a read without a receipt all validate and round-trip.
#[test]
fn withheld_and_private_flags_validate() {
    let mut variants = Vec::new();
    for env in fixtures() {
        let mut v = env.clone();
        match &mut v.event {
            Event::MessageSent(m) => m.withheld = true,
            Event::MessageEdited(m) => m.withheld = true,
            Event::MessageDeleted(m) => m.withheld = true,
            Event::MessageReacted(m) => m.withheld = true,
            Event::MessageRead(r) => r.private = true,
            Event::DeliveryQueued(d) => match &mut d.item {
                StreamItem::Message { withheld, .. } => *withheld = true,
                StreamItem::Read { private, .. } => *private = true,
                _ => continue,
            },
            _ => continue,
        }
        variants.push(v);
    }
    let covered: BTreeSet<&str> = variants.iter().map(|v| v.event.type_name()).collect();
    let expected = BTreeSet::from(["message.sent", "message.edited", "message.deleted", "message.reacted", "message.read", "delivery.queued"]);
    assert_eq!(covered, expected, "variants");
    for env in variants {
        let json = env.to_json();
        let errs = errors(&event_schema(env.event.type_name()), &json);
        assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
        assert_eq!(Envelope::decode(&env.encode()).expect("decodes"), env, "round trip of {json}");
    }
}

/// The same for the other events whose fixtures set their optional fields: the variants leave them
/// out (or use another kind), and the key follows `Event::partition_key`.
#[test]
fn optional_fields_of_events_validate_when_absent() {
    let mut variants = Vec::new();
    for env in fixtures() {
        let mut v = env.clone();
        match &mut v.event {
            Event::MessageSent(m) if m.media.is_some() => {
                // A caption-less audio message with only a duration, replying to nothing.
                m.reply_to = None;
                m.kind = MessageKind::Audio;
                m.body = String::new();
                if let Some(media) = &mut m.media {
                    media.content_type = "video/mp4".into();
                    media.width = None;
                    media.height = None;
                    media.duration_ms = Some(12_000);
                }
            }
            Event::MessageSent(m) if !m.mentions.is_empty() => {
                // A group reply to a video that mentions the most members a message may (the
                // sender among them).
                m.reply_to = Some(MessageId(uuid::Uuid::from_u128(0x0193_2c07_8a4e_7b3c_9d2e_1f0a_9b8c_7d6f)));
                m.mentions = (0..50).map(|i| UserId(uuid::Uuid::from_u128(0x3c4d_5e6f_7a8b_4c9d_8e0f_1a2b_3c4d_5e00 + i))).collect();
                m.mentions[0] = m.sender;
                m.kind = MessageKind::Video;
                m.body = String::new();
                m.media = Some(MediaAttachment {
                    media_id: uuid::Uuid::from_u128(8),
                    content_type: "video/webm".into(),
                    size: 10,
                    width: None,
                    height: None,
                    duration_ms: None,
                });
            }
            Event::ProfileUpdated(p) => p.avatar_media_id = None,
            Event::AuditAccessed(_) => {
                // The CLI form: no auditor and no actor, so the key is `cli`.
                v.actor = None;
                v.event = Event::AuditAccessed(AuditAccessed {
                    auditor: None,
                    via: "cli".into(),
                    action: "daily_metrics".into(),
                    target: None,
                    from: None,
                    to: None,
                });
                assert_eq!(v.key(), "cli");
            }
            Event::UserRoleChanged(r) => {
                r.role = "analyst".into();
                r.granted = false;
            }
            Event::MediaUploaded(m) => {
                m.kind = MessageKind::Video;
                m.content_type = "video/webm".into();
                m.size = 1;
            }
            _ => continue,
        }
        variants.push(v);
    }
    let covered: BTreeSet<&str> = variants.iter().map(|v| v.event.type_name()).collect();
    let expected = BTreeSet::from(["message.sent", "profile.updated", "audit.accessed", "user.role_changed", "media.uploaded"]);
    assert_eq!(covered, expected, "variants");
    for env in variants {
        let name = env.event.type_name();
        let json = env.to_json();
        let errs = errors(&event_schema(name), &json);
        assert!(errs.is_empty(), "{name}:\n{}\n{json:#}", errs.join("\n"));
        assert_eq!(json["key"], json!(env.event.partition_key()));
        assert_eq!(Envelope::decode(&env.encode()).expect("decodes"), env, "round trip of {json}");
    }
    // The audit record of an auditor over HTTP is keyed by the auditor.
    let audit = fixture("audit.accessed");
    let Event::AuditAccessed(a) = &audit.event else { unreachable!() };
    assert_eq!(audit.key(), a.auditor.expect("the fixture has an auditor").to_string());
    // A profile view is keyed by the viewed user.
    let view = fixture("profile.viewed");
    let Event::ProfileViewed(p) = &view.event else { unreachable!() };
    assert_eq!(view.key(), p.viewed.to_string());
}

/// Each mutation must be refused by the schema, so a too-loose schema fails this test; where the
/// decoder refuses it too, that is checked as well (the schema describes what is written, which is
/// stricter than what the decoder tolerates, e.g. upper-case UUIDs).
#[test]
fn malformed_envelopes_are_refused() {
    type Mutation = fn(&mut Value);
    let cases: &[(&str, &str, Mutation, bool)] = &[
        ("message.sent", "extra data field", |v| v["data"]["extra"] = json!(1), true),
        ("message.sent", "missing data field", |v| {
            if let Some(d) = v["data"].as_object_mut() {
                d.remove("body");
            }
        }, true),
        ("message.sent", "unknown kind", |v| v["data"]["kind"] = json!("sticker"), true),
        ("message.sent", "image without media", |v| v["data"]["kind"] = json!("image"), false),
        ("message.sent", "text with media", |v| v["data"]["media"] = media_json(), false),
        ("message.sent#image", "media with a bad uuid", |v| v["data"]["media"]["media_id"] = json!("not-a-uuid"), true),
        ("message.sent#image", "media with an upper-case uuid", |v| v["data"]["media"]["media_id"] = json!("0B6E3A5C-8D7F-4E21-9A3B-5C6D7E8F9A01"), false),
        ("message.sent#image", "media with an extra field", |v| v["data"]["media"]["sha256"] = json!("00"), true),
        ("message.sent#image", "media without content_type", |v| remove(&mut v["data"]["media"], "content_type"), true),
        ("message.sent#image", "media without size", |v| remove(&mut v["data"]["media"], "size"), true),
        ("message.sent#image", "negative size", |v| v["data"]["media"]["size"] = json!(-1), true),
        ("message.sent#image", "size as a string", |v| v["data"]["media"]["size"] = json!("1234"), true),
        ("message.sent#image", "zero width", |v| v["data"]["media"]["width"] = json!(0), false),
        ("message.sent#image", "null height", |v| v["data"]["media"]["height"] = Value::Null, false),
        ("message.sent#image", "duration over a day", |v| v["data"]["media"]["duration_ms"] = json!(86_400_001), false),
        ("message.sent#image", "content type not a media type", |v| v["data"]["media"]["content_type"] = json!("application/pdf"), false),
        ("message.sent#image", "image without media", |v| remove(&mut v["data"], "media"), false),
        ("message.sent#image", "media not an object", |v| v["data"]["media"] = json!("00000000-0000-0000-0000-000000000007"), true),
        ("message.sent", "bad device id", |v| v["data"]["sender_device"] = json!("my phone"), true),
        ("message.sent", "mentions in a direct message", |v| v["data"]["mentions"] = json!([BOB]), false),
        ("message.sent", "bad reply_to", |v| v["data"]["reply_to"] = json!("not-a-uuid"), true),
        ("message.sent", "null reply_to", |v| v["data"]["reply_to"] = Value::Null, false),
        ("message.sent", "reply_to as a list", |v| v["data"]["reply_to"] = json!([MSG]), true),
        ("message.sent", "quoted text instead of an id", |v| v["data"]["reply_to"] = json!({"message_id": MSG, "body": "hello"}), true),
        ("message.sent#reply", "upper-case reply_to", |v| v["data"]["reply_to"] = json!(MSG.to_uppercase()), false),
        ("message.sent#reply", "reply_to a conversation", |v| v["data"]["reply_to"] = v["data"]["conversation_id"].clone(), true),
        ("message.sent#mentions", "empty mentions", |v| v["data"]["mentions"] = json!([]), false),
        ("message.sent#mentions", "null mentions", |v| v["data"]["mentions"] = Value::Null, true),
        ("message.sent#mentions", "mentions not a list", |v| v["data"]["mentions"] = json!(ALICE), true),
        ("message.sent#mentions", "a bad mention", |v| v["data"]["mentions"] = json!(["alice"]), true),
        ("message.sent#mentions", "duplicate mentions", |v| v["data"]["mentions"] = json!([ALICE, ALICE]), false),
        ("message.sent#mentions", "more than 50 mentions", |v| {
            let many: Vec<String> = (0..51).map(|i| format!("3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d{i:04x}")).collect();
            v["data"]["mentions"] = json!(many);
        }, false),
        ("message.sent#mentions", "mentions moved to a direct conversation", |v| {
            v["data"]["conversation_id"] = direct_conversation();
            v["key"] = direct_conversation();
        }, false),
        ("message.sent", "g. conversation id with a bad uuid", |v| v["data"]["conversation_id"] = json!("g.5a1e0000-4000-8000-0000-00000000001"), true),
        ("message.sent", "unknown conversation kind", |v| v["data"]["conversation_id"] = json!("c.5a1e0000-4000-8000-0000-000000000001"), true),
        ("message.read", "bad uuid", |v| v["data"]["up_to"] = json!("not-a-uuid"), true),
        ("message.read", "upper-case uuid", |v| v["event_id"] = json!("0B6E3A5C-8D7F-4E21-9A3B-5C6D7E8F9A01"), false),
        ("message.read", "upper-case group conversation id", |v| v["data"]["conversation_id"] = json!("g.5A1E0000-4000-8000-0000-000000000001"), false),
        ("message.edited", "extra data field", |v| v["data"]["deleted_by"] = v["data"]["sender"].clone(), true),
        ("message.edited", "missing body", |v| remove(&mut v["data"], "body"), true),
        ("message.edited", "missing sender", |v| remove(&mut v["data"], "sender"), true),
        ("message.edited", "body not a string", |v| v["data"]["body"] = json!(["hello"]), true),
        ("message.edited", "bad message id", |v| v["data"]["message_id"] = json!("not-a-uuid"), true),
        ("message.edited", "other version", |v| v["version"] = json!(2), true),
        ("message.edited", "key not a conversation id", |v| v["key"] = v["data"]["sender"].clone(), false),
        ("message.edited", "upper-case sender", |v| v["data"]["sender"] = json!("0B6E3A5C-8D7F-4E21-9A3B-5C6D7E8F9A01"), false),
        ("message.deleted", "extra data field", |v| v["data"]["body"] = json!("hello"), true),
        ("message.deleted", "missing deleted_by", |v| remove(&mut v["data"], "deleted_by"), true),
        ("message.deleted", "missing sender", |v| remove(&mut v["data"], "sender"), true),
        ("message.deleted", "bad deleted_by", |v| v["data"]["deleted_by"] = json!("alice"), true),
        ("message.deleted", "g. conversation id with a bad uuid", |v| v["data"]["conversation_id"] = json!("g.5a1e0000-4000-8000-0000-00000000001"), true),
        ("message.deleted", "other type", |v| v["type"] = json!("message.removed"), true),
        ("message.deleted", "time without milliseconds", |v| v["occurred_at"] = json!("2026-01-01T00:00:00Z"), false),
        ("message.hidden", "extra data field", |v| v["data"]["sender"] = v["data"]["user"].clone(), true),
        ("message.hidden", "a body in the data", |v| v["data"]["body"] = json!("hello"), true),
        ("message.hidden", "missing user", |v| remove(&mut v["data"], "user"), true),
        ("message.hidden", "missing message_id", |v| remove(&mut v["data"], "message_id"), true),
        ("message.hidden", "deleted_by instead of user", |v| {
            v["data"]["deleted_by"] = v["data"]["user"].clone();
            remove(&mut v["data"], "user");
        }, true),
        ("message.hidden", "bad user", |v| v["data"]["user"] = json!("bob"), true),
        ("message.hidden", "bad conversation id", |v| v["data"]["conversation_id"] = json!("g.1"), true),
        ("message.hidden", "other version", |v| v["version"] = json!(2), true),
        ("message.hidden", "other type", |v| v["type"] = json!("message.deleted_for_me"), true),
        ("message.hidden", "key not a conversation id", |v| v["key"] = v["data"]["user"].clone(), false),
        ("message.hidden", "upper-case message id", |v| v["data"]["message_id"] = json!("01932C07-8A4E-7B3C-9D2E-1F0A9B8C7D6E"), false),
        ("message.hidden", "time without milliseconds", |v| v["occurred_at"] = json!("2026-01-01T00:00:00Z"), false),
        ("message.reacted", "extra data field", |v| v["data"]["sender"] = v["data"]["user"].clone(), true),
        ("message.reacted", "missing user", |v| remove(&mut v["data"], "user"), true),
        ("message.reacted", "missing message_id", |v| remove(&mut v["data"], "message_id"), true),
        ("message.reacted", "missing conversation_id", |v| remove(&mut v["data"], "conversation_id"), true),
        ("message.reacted", "by instead of user", |v| {
            v["data"]["by"] = v["data"]["user"].clone();
            remove(&mut v["data"], "user");
        }, true),
        ("message.reacted", "emoji not a string", |v| v["data"]["emoji"] = json!(1), true),
        ("message.reacted", "emoji as a list", |v| v["data"]["emoji"] = json!(["👍"]), true),
        ("message.reacted", "null emoji", |v| v["data"]["emoji"] = Value::Null, false),
        ("message.reacted", "empty emoji", |v| v["data"]["emoji"] = json!(""), false),
        ("message.reacted", "emoji too long", |v| v["data"]["emoji"] = json!("👍".repeat(65)), false),
        ("message.reacted", "a count in the data", |v| v["data"]["count"] = json!(1), true),
        ("message.reacted", "bad user", |v| v["data"]["user"] = json!("bob"), true),
        ("message.reacted", "bad conversation id", |v| v["data"]["conversation_id"] = json!("g.1"), true),
        ("message.reacted", "other version", |v| v["version"] = json!(2), true),
        ("message.reacted", "other type", |v| v["type"] = json!("message.liked"), true),
        ("message.reacted", "key not a conversation id", |v| v["key"] = v["data"]["user"].clone(), false),
        ("message.reacted", "upper-case message id", |v| v["data"]["message_id"] = json!(MSG.to_uppercase()), false),
        ("message.reacted", "time without milliseconds", |v| v["occurred_at"] = json!("2026-01-01T00:00:00Z"), false),
        ("message.reacted#retracted", "missing user", |v| remove(&mut v["data"], "user"), true),
        ("message.reacted#retracted", "null emoji", |v| v["data"]["emoji"] = Value::Null, false),
        ("message.reacted#retracted", "a retracted flag", |v| v["data"]["retracted"] = json!(true), true),
        ("message.delivered", "bad conversation id", |v| v["data"]["conversation_id"] = json!("g.1"), true),
        ("presence.changed", "bad status", |v| v["data"]["status"] = json!("away"), true),
        ("user.registered", "extra envelope field", |v| v["extra"] = json!(1), false),
        ("user.registered", "other version", |v| v["version"] = json!(2), true),
        ("user.registered", "time without milliseconds", |v| v["occurred_at"] = json!("2026-01-01T00:00:00Z"), false),
        ("user.registered", "time not in UTC", |v| v["occurred_at"] = json!("2026-01-01T00:00:00.000+01:00"), false),
        ("user.registered", "null actor", |v| v["actor"] = Value::Null, false),
        ("delivery.queued", "extra item field", |v| v["data"]["item"]["extra"] = json!(1), true),
        ("delivery.queued", "unknown item kind", |v| v["data"]["item"]["kind"] = json!("typing"), true),
        ("delivery.queued#message", "non-integer position", |v| v["data"]["item"]["position"] = json!(1.5), true),
        ("delivery.queued#message", "position as a string", |v| v["data"]["item"]["position"] = json!("7"), true),
        ("delivery.queued#message", "negative position", |v| v["data"]["item"]["position"] = json!(-1), false),
        ("delivery.queued#message", "unknown message kind", |v| v["data"]["item"]["message_kind"] = json!("sticker"), true),
        ("delivery.queued#message", "text item with media", |v| v["data"]["item"]["media"] = media_json(), false),
        ("delivery.queued#message", "video item without media", |v| v["data"]["item"]["message_kind"] = json!("video"), false),
        ("delivery.queued#message", "item media with a bad uuid", |v| {
            v["data"]["item"]["message_kind"] = json!("image");
            v["data"]["item"]["media"] = media_json();
            v["data"]["item"]["media"]["media_id"] = json!("00000000-0000-0000-0000-00000000000g");
        }, true),
        ("delivery.queued#message", "item media with an unknown field", |v| {
            v["data"]["item"]["message_kind"] = json!("image");
            v["data"]["item"]["media"] = media_json();
            v["data"]["item"]["media"]["caption"] = json!("x");
        }, true),
        ("delivery.queued#message", "item media with a fractional duration", |v| {
            v["data"]["item"]["message_kind"] = json!("audio");
            v["data"]["item"]["media"] = media_json();
            v["data"]["item"]["media"]["duration_ms"] = json!(1.5);
        }, true),
        ("delivery.queued#message", "bad reply_to", |v| v["data"]["item"]["reply_to"] = json!("01932c07"), true),
        ("delivery.queued#message", "null reply_to", |v| v["data"]["item"]["reply_to"] = Value::Null, false),
        ("delivery.queued#message", "mentions in a direct message", |v| v["data"]["item"]["mentions"] = json!([ALICE]), false),
        ("delivery.queued#message", "empty mentions", |v| v["data"]["item"]["mentions"] = json!([]), false),
        ("delivery.queued#message", "mentions not a list", |v| v["data"]["item"]["mentions"] = json!(ALICE), true),
        ("delivery.queued#message", "group message with duplicate mentions", |v| {
            v["data"]["item"]["conversation_id"] = json!(format!("g.{GROUP}"));
            v["data"]["item"]["mentions"] = json!([ALICE, ALICE]);
        }, false),
        ("delivery.queued#message", "group message with a bad mention", |v| {
            v["data"]["item"]["conversation_id"] = json!(format!("g.{GROUP}"));
            v["data"]["item"]["mentions"] = json!(["@alice"]);
        }, true),
        ("delivery.queued#receipt", "all written as false", |v| v["data"]["item"]["all"] = json!(false), false),
        ("delivery.queued#receipt", "all not a boolean", |v| v["data"]["item"]["all"] = json!("yes"), true),
        ("delivery.queued#receipt", "bad device id", |v| v["data"]["item"]["device_id"] = json!("my phone"), false),
        ("delivery.queued#read", "missing up_to", |v| remove(&mut v["data"]["item"], "up_to"), true),
        ("delivery.queued#read", "extra read field", |v| v["data"]["item"]["status"] = json!("seen"), true),
        ("delivery.queued#read", "time without milliseconds", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00Z"), false),
        ("delivery.queued#edited", "missing body", |v| remove(&mut v["data"]["item"], "body"), true),
        ("delivery.queued#edited", "missing sender", |v| remove(&mut v["data"]["item"], "sender"), true),
        ("delivery.queued#edited", "extra edited field", |v| v["data"]["item"]["by"] = v["data"]["item"]["sender"].clone(), true),
        ("delivery.queued#edited", "position in an edited item", |v| v["data"]["item"]["position"] = json!(3), true),
        ("delivery.queued#edited", "body not a string", |v| v["data"]["item"]["body"] = Value::Null, true),
        ("delivery.queued#edited", "time without milliseconds", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00Z"), false),
        ("delivery.queued#deleted", "missing by", |v| remove(&mut v["data"]["item"], "by"), true),
        ("delivery.queued#deleted", "missing at", |v| remove(&mut v["data"]["item"], "at"), true),
        ("delivery.queued#deleted", "a body in a deleted item", |v| v["data"]["item"]["body"] = json!("hello"), true),
        ("delivery.queued#deleted", "bad message id", |v| v["data"]["item"]["message_id"] = json!("01932c07"), true),
        ("delivery.queued#deleted", "deleted_by instead of by", |v| {
            v["data"]["item"]["deleted_by"] = v["data"]["item"]["by"].clone();
            remove(&mut v["data"]["item"], "by");
        }, true),
        ("delivery.queued#deleted", "time not in UTC", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00.000+01:00"), false),
        ("delivery.queued#hidden", "missing message_id", |v| remove(&mut v["data"]["item"], "message_id"), true),
        ("delivery.queued#hidden", "missing conversation_id", |v| remove(&mut v["data"]["item"], "conversation_id"), true),
        ("delivery.queued#hidden", "missing at", |v| remove(&mut v["data"]["item"], "at"), true),
        ("delivery.queued#hidden", "a body in a hidden item", |v| v["data"]["item"]["body"] = json!("hello"), true),
        ("delivery.queued#hidden", "a sender in a hidden item", |v| v["data"]["item"]["sender"] = v["data"]["recipient"].clone(), true),
        ("delivery.queued#hidden", "a by in a hidden item", |v| v["data"]["item"]["by"] = v["data"]["recipient"].clone(), true),
        ("delivery.queued#hidden", "position in a hidden item", |v| v["data"]["item"]["position"] = json!(3), true),
        ("delivery.queued#hidden", "up_to instead of message_id", |v| {
            v["data"]["item"]["up_to"] = v["data"]["item"]["message_id"].clone();
            remove(&mut v["data"]["item"], "message_id");
        }, true),
        ("delivery.queued#hidden", "bad message id", |v| v["data"]["item"]["message_id"] = json!("01932c07"), true),
        ("delivery.queued#hidden", "time without milliseconds", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00Z"), false),
        ("delivery.queued#reaction", "missing by", |v| remove(&mut v["data"]["item"], "by"), true),
        ("delivery.queued#reaction", "missing message_id", |v| remove(&mut v["data"]["item"], "message_id"), true),
        ("delivery.queued#reaction", "missing conversation_id", |v| remove(&mut v["data"]["item"], "conversation_id"), true),
        ("delivery.queued#reaction", "missing at", |v| remove(&mut v["data"]["item"], "at"), true),
        ("delivery.queued#reaction", "user instead of by", |v| {
            v["data"]["item"]["user"] = v["data"]["item"]["by"].clone();
            remove(&mut v["data"]["item"], "by");
        }, true),
        ("delivery.queued#reaction", "null emoji", |v| v["data"]["item"]["emoji"] = Value::Null, false),
        ("delivery.queued#reaction", "empty emoji", |v| v["data"]["item"]["emoji"] = json!(""), false),
        ("delivery.queued#reaction", "emoji not a string", |v| v["data"]["item"]["emoji"] = json!(128077), true),
        ("delivery.queued#reaction", "a body in a reaction item", |v| v["data"]["item"]["body"] = json!("hello"), true),
        ("delivery.queued#reaction", "a count in a reaction item", |v| v["data"]["item"]["count"] = json!(1), true),
        ("delivery.queued#reaction", "position in a reaction item", |v| v["data"]["item"]["position"] = json!(3), true),
        ("delivery.queued#reaction", "bad by", |v| v["data"]["item"]["by"] = json!("bob"), true),
        ("delivery.queued#reaction", "time without milliseconds", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00Z"), false),
        ("delivery.queued#group", "group item without position", |v| remove(&mut v["data"]["item"], "position"), true),
        ("delivery.queued#group", "unknown change", |v| v["data"]["item"]["change"] = json!("archived"), true),
        ("delivery.queued#group", "bad role", |v| v["data"]["item"]["role"] = json!("owner"), true),
        ("delivery.queued#group", "missing by", |v| remove(&mut v["data"]["item"], "by"), true),
        ("delivery.queued#group", "g. conversation id with a bad uuid", |v| v["data"]["item"]["conversation_id"] = json!("g.not-a-uuid"), true),
        ("delivery.queued#group", "direct conversation id", |v| v["data"]["item"]["conversation_id"] = direct_conversation(), false),
        ("delivery.queued#group", "empty name", |v| v["data"]["item"]["name"] = json!(""), false),
        ("delivery.queued#group", "negative position", |v| v["data"]["item"]["position"] = json!(-1), false),
        ("group.created", "g. conversation id with a bad uuid", |v| v["data"]["conversation_id"] = json!("g.5a1e0000-4000-8000-0000-00000000000z"), true),
        ("group.created", "direct conversation id", |v| v["data"]["conversation_id"] = direct_conversation(), false),
        ("group.created", "direct conversation key", |v| v["key"] = direct_conversation(), false),
        ("group.created", "missing members", |v| remove(&mut v["data"], "members"), true),
        ("group.created", "members not a list", |v| v["data"]["members"] = json!("7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"), true),
        ("group.created", "duplicate members", |v| {
            let m = v["data"]["members"][0].clone();
            v["data"]["members"] = json!([m, m]);
        }, false),
        ("group.created", "bad group id", |v| v["data"]["group_id"] = json!("g.5a1e0000-4000-8000-0000-000000000001"), true),
        ("group.created", "empty name", |v| v["data"]["name"] = json!(""), false),
        ("group.created", "name too long", |v| v["data"]["name"] = json!("x".repeat(101)), false),
        ("group.renamed", "extra data field", |v| v["data"]["extra"] = json!(1), true),
        ("group.renamed", "missing name", |v| remove(&mut v["data"], "name"), true),
        ("group.member_added", "unknown role", |v| v["data"]["role"] = json!("owner"), true),
        ("group.member_added", "missing role", |v| remove(&mut v["data"], "role"), true),
        ("group.member_added", "missing actor", |v| remove(v, "actor"), false),
        ("group.member_removed", "bad member", |v| v["data"]["member"] = json!("bob"), true),
        ("group.member_removed", "role given", |v| v["data"]["role"] = json!("member"), true),
        ("group.member_removed", "other type", |v| v["type"] = json!("group.member_left"), true),
        ("user.role_changed", "unknown role", |v| v["data"]["role"] = json!("admin"), false),
        ("user.role_changed", "granted not a boolean", |v| v["data"]["granted"] = json!("yes"), true),
        ("user.role_changed", "missing granted", |v| remove(&mut v["data"], "granted"), true),
        ("user.role_changed", "bad user id", |v| v["data"]["user_id"] = json!("bob"), true),
        ("user.role_changed", "cli key", |v| v["key"] = json!("cli"), false),
        ("profile.updated", "bad avatar uuid", |v| v["data"]["avatar_media_id"] = json!("avatar.png"), true),
        ("profile.updated", "null avatar", |v| v["data"]["avatar_media_id"] = Value::Null, false),
        ("profile.updated", "empty display name", |v| v["data"]["display_name"] = json!(""), false),
        ("profile.updated", "display name too long", |v| v["data"]["display_name"] = json!("é".repeat(65)), false),
        ("profile.updated", "missing display name", |v| remove(&mut v["data"], "display_name"), true),
        ("profile.updated", "missing actor", |v| remove(v, "actor"), false),
        ("profile.viewed", "bad viewer", |v| v["data"]["viewer"] = json!(42), true),
        ("profile.viewed", "missing viewed", |v| remove(&mut v["data"], "viewed"), true),
        ("profile.viewed", "extra data field", |v| v["data"]["at"] = json!("2026-01-01T00:00:00.000Z"), true),
        ("profile.viewed", "key not a user id", |v| v["key"] = json!("cli"), false),
        ("audit.accessed", "unknown via", |v| v["data"]["via"] = json!("grpc"), false),
        ("audit.accessed", "unknown action", |v| v["data"]["action"] = json!("read_messages"), false),
        ("audit.accessed", "missing action", |v| remove(&mut v["data"], "action"), true),
        ("audit.accessed", "bad auditor", |v| v["data"]["auditor"] = json!("not-a-uuid"), true),
        ("audit.accessed", "target not a string", |v| v["data"]["target"] = json!(7), true),
        ("audit.accessed", "extra data field", |v| v["data"]["rows"] = json!(3), true),
        ("audit.accessed", "http access without auditor", |v| remove(&mut v["data"], "auditor"), false),
        ("audit.accessed", "http access keyed cli", |v| v["key"] = json!("cli"), false),
        ("audit.accessed", "http access without actor", |v| remove(v, "actor"), false),
        ("audit.accessed", "cli access with an auditor", |v| {
            v["data"]["via"] = json!("cli");
            v["key"] = json!("cli");
            remove(v, "actor");
        }, false),
        ("audit.accessed", "cli access keyed by a user", |v| {
            v["data"]["via"] = json!("cli");
            remove(&mut v["data"], "auditor");
            remove(v, "actor");
        }, false),
        ("audit.accessed", "other key", |v| v["key"] = json!("http"), false),
        ("media.uploaded", "bad media id", |v| v["data"]["media_id"] = json!("7"), true),
        ("media.uploaded", "bad uploader", |v| v["data"]["uploader"] = json!("alice"), true),
        ("media.uploaded", "unknown kind", |v| v["data"]["kind"] = json!("document"), true),
        ("media.uploaded", "text kind", |v| v["data"]["kind"] = json!("text"), false),
        ("media.uploaded", "short sha256", |v| v["data"]["sha256"] = json!("9f86d081884c7d659a2feaa0c55ad015"), false),
        ("media.uploaded", "upper-case sha256", |v| {
            let upper = v["data"]["sha256"].as_str().map(str::to_ascii_uppercase);
            v["data"]["sha256"] = json!(upper);
        }, false),
        ("media.uploaded", "sha256 not hex", |v| v["data"]["sha256"] = json!("z".repeat(64)), false),
        ("media.uploaded", "missing sha256", |v| remove(&mut v["data"], "sha256"), true),
        ("media.uploaded", "negative size", |v| v["data"]["size"] = json!(-1), true),
        ("media.uploaded", "empty upload", |v| v["data"]["size"] = json!(0), false),
        ("media.uploaded", "content type not a media type", |v| v["data"]["content_type"] = json!("text/plain"), false),
        ("media.uploaded", "missing actor", |v| remove(v, "actor"), false),
    ];
    for (type_name, what, mutate, decoder_refuses) in cases {
        let mut json = fixture_json(type_name);
        assert!(errors(&schema_of(type_name), &json).is_empty(), "{type_name}: the unmutated fixture must be valid");
        mutate(&mut json);
        assert!(!errors(&schema_of(type_name), &json).is_empty(), "{type_name}: schema accepts {what}:\n{json:#}");
        if *decoder_refuses {
            let bytes = serde_json::to_vec(&json).expect("json");
            assert!(Envelope::decode(&bytes).is_err(), "{type_name}: decoder accepts {what}");
        }
    }
}

/// `StreamItem` times must go through `format_time`: chrono's default (`SecondsFormat::AutoSi`)
/// drops `.000` at a whole second. The fixtures use the current time, so only a fixed
/// whole-second time shows it every run.
#[test]
fn stream_item_times_keep_their_milliseconds_at_whole_seconds() {
    let whole_second = chrono::DateTime::from_timestamp(1_767_225_600, 0).expect("time");
    for mut env in fixtures() {
        if let Event::DeliveryQueued(d) = &mut env.event {
            match &mut d.item {
                StreamItem::Message { sent_at, .. } => *sent_at = whole_second,
                StreamItem::Receipt { at, .. } => *at = whole_second,
                StreamItem::Read { at, .. } => *at = whole_second,
                StreamItem::Edited { at, .. } => *at = whole_second,
                StreamItem::Deleted { at, .. } => *at = whole_second,
                StreamItem::Hidden { at, .. } => *at = whole_second,
                StreamItem::Reaction { at, .. } => *at = whole_second,
                StreamItem::Group { at, .. } => *at = whole_second,
            }
            let json = env.to_json();
            let errs = errors(&event_schema("delivery.queued"), &json);
            assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
        }
    }
}

fn remove(v: &mut Value, field: &str) {
    if let Some(o) = v.as_object_mut() {
        o.remove(field);
    }
}

/// A valid media attachment (of an image).
fn media_json() -> Value {
    json!({"media_id": "00000000-0000-0000-0000-000000000007", "content_type": "image/png", "size": 1234, "width": 640, "height": 480})
}

/// A user other than the fixtures' two (an admin of a group deleting someone else's message).
const ADMIN: &str = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";

/// The fixtures' users, message and group.
const ALICE: &str = "0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01";
const BOB: &str = "7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const MSG: &str = "01932c07-8a4e-7b3c-9d2e-1f0a9b8c7d6e";
const GROUP: &str = "5a1e0000-4000-8000-0000-000000000001";

/// A valid direct conversation id (of the fixtures' two users).
fn direct_conversation() -> Value {
    json!("d.0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01.7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")
}

//! `schemas/events/` cannot drift from the types: every fixture, as `Envelope::encode` writes it,
//! must validate against the schema of its type, and every type must have exactly one schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chat_events::event::{fixtures, Envelope, Event, GroupChange, GroupRole, StreamItem, EVENT_TYPES};
use chat_events::{ConversationId, GroupId};
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
        StreamItem::Group { .. } => "group",
    }
}

/// The fixture of an event type, or with `delivery.queued#<kind>` the `delivery.queued` fixture
/// carrying that kind of item.
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
            StreamItem::Message { .. } => changed(|item, g| {
                if let StreamItem::Message { position, conversation_id, .. } = item {
                    *position = Some(0);
                    *conversation_id = g.clone();
                }
            }),
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
    assert!(variants.len() >= 7, "not every stream item kind was varied");
    for env in variants {
        let json = env.to_json();
        let errs = errors(&event_schema("delivery.queued"), &json);
        assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
        assert_eq!(Envelope::decode(&env.encode()).expect("decodes"), env, "round trip of {json}");
    }
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
        ("message.sent", "bad kind", |v| v["data"]["kind"] = json!("image"), true),
        ("message.sent", "bad device id", |v| v["data"]["sender_device"] = json!("my phone"), true),
        ("message.sent", "g. conversation id with a bad uuid", |v| v["data"]["conversation_id"] = json!("g.5a1e0000-4000-8000-0000-00000000001"), true),
        ("message.sent", "unknown conversation kind", |v| v["data"]["conversation_id"] = json!("c.5a1e0000-4000-8000-0000-000000000001"), true),
        ("message.read", "bad uuid", |v| v["data"]["up_to"] = json!("not-a-uuid"), true),
        ("message.read", "upper-case uuid", |v| v["event_id"] = json!("0B6E3A5C-8D7F-4E21-9A3B-5C6D7E8F9A01"), false),
        ("message.read", "upper-case group conversation id", |v| v["data"]["conversation_id"] = json!("g.5A1E0000-4000-8000-0000-000000000001"), false),
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
        ("delivery.queued#receipt", "all written as false", |v| v["data"]["item"]["all"] = json!(false), false),
        ("delivery.queued#receipt", "all not a boolean", |v| v["data"]["item"]["all"] = json!("yes"), true),
        ("delivery.queued#receipt", "bad device id", |v| v["data"]["item"]["device_id"] = json!("my phone"), false),
        ("delivery.queued#read", "missing up_to", |v| remove(&mut v["data"]["item"], "up_to"), true),
        ("delivery.queued#read", "extra read field", |v| v["data"]["item"]["status"] = json!("seen"), true),
        ("delivery.queued#read", "time without milliseconds", |v| v["data"]["item"]["at"] = json!("2026-01-01T00:00:00Z"), false),
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

/// A valid direct conversation id (of the fixtures' two users).
fn direct_conversation() -> Value {
    json!("d.0b6e3a5c-8d7f-4e21-9a3b-5c6d7e8f9a01.7f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")
}

//! `schemas/events/` cannot drift from the types: every fixture, as `Envelope::encode` writes it,
//! must validate against the schema of its type, and every type must have exactly one schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chat_events::event::{fixtures, Envelope, Event, StreamItem, EVENT_TYPES};
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

fn fixture_json(type_name: &str) -> Value {
    let env = fixtures().into_iter().find(|e| e.event.type_name() == type_name).expect("fixture");
    env.to_json()
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
        ("message.read", "bad uuid", |v| v["data"]["up_to"] = json!("not-a-uuid"), true),
        ("message.read", "upper-case uuid", |v| v["event_id"] = json!("0B6E3A5C-8D7F-4E21-9A3B-5C6D7E8F9A01"), false),
        ("message.delivered", "bad conversation id", |v| v["data"]["conversation_id"] = json!("g.1"), true),
        ("presence.changed", "bad status", |v| v["data"]["status"] = json!("away"), true),
        ("user.registered", "extra envelope field", |v| v["extra"] = json!(1), false),
        ("user.registered", "other version", |v| v["version"] = json!(2), true),
        ("user.registered", "time without milliseconds", |v| v["occurred_at"] = json!("2026-01-01T00:00:00Z"), false),
        ("user.registered", "time not in UTC", |v| v["occurred_at"] = json!("2026-01-01T00:00:00.000+01:00"), false),
        ("user.registered", "null actor", |v| v["actor"] = Value::Null, false),
        ("delivery.queued", "extra item field", |v| v["data"]["item"]["extra"] = json!(1), true),
        ("delivery.queued", "unknown item kind", |v| v["data"]["item"]["kind"] = json!("typing"), true),
    ];
    for (type_name, what, mutate, decoder_refuses) in cases {
        let mut json = fixture_json(type_name);
        mutate(&mut json);
        assert!(!errors(&event_schema(type_name), &json).is_empty(), "{type_name}: schema accepts {what}:\n{json:#}");
        if *decoder_refuses {
            let bytes = serde_json::to_vec(&json).expect("json");
            assert!(Envelope::decode(&bytes).is_err(), "{type_name}: decoder accepts {what}");
        }
    }
}

/// `StreamItem` times are serialised by chrono's default (`SecondsFormat::AutoSi`), which drops
/// `.000` at a whole second instead of using `format_time`; the fixtures use the current time, so
/// only a fixed whole-second time shows it every run.
#[test]
fn stream_item_times_keep_their_milliseconds_at_whole_seconds() {
    let whole_second = chrono::DateTime::from_timestamp(1_767_225_600, 0).expect("time");
    for mut env in fixtures() {
        if let Event::DeliveryQueued(d) = &mut env.event {
            match &mut d.item {
                StreamItem::Message { sent_at, .. } => *sent_at = whole_second,
                StreamItem::Receipt { at, .. } => *at = whole_second,
            }
            let json = env.to_json();
            let errs = errors(&event_schema("delivery.queued"), &json);
            assert!(errs.is_empty(), "{}\n{json:#}", errs.join("\n"));
        }
    }
}

//! Client-frame decoding (`chat_gateway::frames::parse_client_frame`, what the gateway does with
//! every WebSocket text frame). Beyond "never panics":
//! - an accepted frame is a JSON object whose `type` is its `type_name()`, one of the
//!   documented types (docs/protocol.md §3), and the `ref` returned is the object's `ref` as
//!   written (the frame's own `ref` is the same, a `null` one aside);
//! - a refused frame has one of the two stable codes: `bad_json` exactly when the text is not
//!   JSON (no `ref` then), `invalid_frame` otherwise, echoing the `ref` of an object with
//!   distinct keys and none for anything else.
#![no_main]

use chat_gateway::frames::{parse_client_frame, ClientFrame};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TYPES: [&str; 9] = ["send", "delivered", "read", "edit", "delete", "react", "sync", "typing", "ping"];

/// The top-level keys of a JSON object in the order written, duplicates kept (an oracle
/// independent of the gateway's `StrictObject`); `None` for anything but an object.
fn keys(text: &str) -> Option<Vec<String>> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, serde::de::IgnoredAny)) = a.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(keys)
        }
    }
    struct Object(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Object {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Keys).map(Object)
        }
    }
    serde_json::from_str::<Object>(text).ok().map(|o| o.0)
}

fn own_ref(frame: &ClientFrame) -> Option<&Value> {
    match frame {
        ClientFrame::Send { r#ref, .. }
        | ClientFrame::Delivered { r#ref, .. }
        | ClientFrame::Read { r#ref, .. }
        | ClientFrame::Edit { r#ref, .. }
        | ClientFrame::Delete { r#ref, .. }
        | ClientFrame::React { r#ref, .. }
        | ClientFrame::Sync { r#ref, .. }
        | ClientFrame::Typing { r#ref, .. }
        | ClientFrame::Ping { r#ref } => r#ref.as_ref(),
    }
}

fuzz_target!(|data: &[u8]| {
    // A text frame that is not UTF-8 never reaches the parser (the socket closes with 1007).
    let Ok(text) = std::str::from_utf8(data) else { return };
    let json = serde_json::from_str::<Value>(text).ok();
    let object_keys = keys(text);
    let distinct = object_keys.as_ref().is_some_and(|k| {
        let mut sorted = k.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len() == k.len()
    });
    let written_ref = || json.as_ref().and_then(|v| v.get("ref")).cloned();
    match parse_client_frame(text) {
        Ok((frame, r#ref)) => {
            let name = frame.type_name();
            assert!(TYPES.contains(&name), "undocumented type {name}");
            let json = json.as_ref().expect("an accepted frame is JSON");
            assert!(distinct, "an accepted frame is an object with distinct keys: {text:?}");
            assert_eq!(json.get("type").and_then(Value::as_str), Some(name), "type of {text:?}");
            assert_eq!(r#ref, written_ref(), "ref of {text:?}");
            assert_eq!(own_ref(&frame), r#ref.as_ref().filter(|v| !v.is_null()), "frame's own ref of {text:?}");
        }
        Err(e) => match e.code {
            "bad_json" => {
                assert!(json.is_none(), "bad_json for JSON text {text:?}");
                assert_eq!(e.message, "frame is not valid JSON");
                assert_eq!(e.r#ref, None, "bad_json echoes no ref");
            }
            "invalid_frame" => {
                assert!(json.is_some(), "invalid_frame for a text that is not JSON: {text:?}");
                assert!(e.message.starts_with("not a valid client frame: "), "{}", e.message);
                let expected = if distinct { written_ref() } else { None };
                assert_eq!(e.r#ref, expected, "ref echoed for {text:?}");
            }
            other => panic!("unstable error code {other:?} for {text:?}"),
        },
    }
});

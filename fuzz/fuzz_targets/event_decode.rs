//! Event decoding (`chat_events::Envelope::decode`, what every consumer does with every record
//! of the log). Beyond "never panics":
//! - a decoded envelope has a known type, re-encodes (`Envelope::encode`) to a JSON object whose
//!   `type`, `version` and `key` are the event's, and those bytes decode to an equal envelope and
//!   encode to the same bytes again (the codec is a faithful, stable round trip);
//! - a refusal is `Unknown` only for a (type, version) this build does not read.
#![no_main]

use chat_events::event::EVENT_TYPES;
use chat_events::{CodecError, Envelope};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    match Envelope::decode(data) {
        Ok(env) => {
            let name = env.event.type_name();
            let version = env.event.version();
            assert!(EVENT_TYPES.iter().any(|(n, _)| *n == name), "unlisted type {name}");
            let bytes = env.encode();
            let json: Value = serde_json::from_slice(&bytes).expect("encode writes JSON");
            assert_eq!(json["type"], Value::from(name));
            assert_eq!(json["version"], Value::from(version));
            assert_eq!(json["key"], Value::from(env.key()));
            let back = Envelope::decode(&bytes).unwrap_or_else(|e| {
                panic!("re-encoded envelope does not decode: {e}\n  input: {}\n  encoded: {}", String::from_utf8_lossy(data), String::from_utf8_lossy(&bytes))
            });
            assert_eq!(back, env, "round trip changed the envelope\n  input: {}\n  encoded: {}", String::from_utf8_lossy(data), String::from_utf8_lossy(&bytes));
            assert_eq!(back.encode(), bytes, "encoding is not stable");
        }
        Err(e) => {
            let _message = e.to_string();
            if let CodecError::Unknown { type_name, version } = &e {
                let known = EVENT_TYPES.iter().any(|(n, v)| n == type_name && v == version)
                    || (type_name == "delivery.queued" && *version == 1);
                assert!(!known, "{type_name} v{version} is known but refused as unknown");
            }
        }
    }
});

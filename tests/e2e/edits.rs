//! Edit and delete for everyone (both modes): live pushes and `sync` on every device, history and
//! the conversation list, the authorization matrix of the `edit` and `delete` frames, and no
//! trace of a deleted message's text in any projection table.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;
use crate::product::with_auditor;

const T: Duration = Duration::from_secs(60);

fn edit(conv: &str, id: &str, body: &str) -> Value {
    json!({"type": "edit", "conversation_id": conv, "message_id": id, "body": body})
}

fn delete(conv: &str, id: &str) -> Value {
    json!({"type": "delete", "conversation_id": conv, "message_id": id})
}

pub(crate) fn code(f: &Value) -> &str {
    assert_eq!(f["type"], "error", "expected an error: {f}");
    f["code"].as_str().unwrap_or_default()
}

pub(crate) fn acked(f: &Value, what: &str) {
    assert_eq!((f["type"].as_str(), f["for"].as_str()), (Some("ack"), Some(what)), "{f}");
}

/// The history row of a message, once `pred` holds for it.
pub(crate) async fn history_row(gw: &Gateway, user: &User, conv: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("history of {id}"), T, || async {
        let (st, page) = gw.get(&user.token, &format!("/v1/conversations/{conv}/messages?limit=50")).await;
        assert_eq!(st, 200, "{page}");
        page["messages"].as_array().unwrap().iter().find(|m| m["message_id"] == json!(id) && pred(m)).cloned()
    })
    .await
}

/// Syncs a device's whole stream from the start until `pred` holds for it.
async fn stream_until(ws: &mut Ws, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (items, _) = ws.sync_until(None, 1, T).await;
        if pred(&items) {
            return items;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {T:?}: {items:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A direct conversation: the sender edits (pushed to the peer and the sender's other device,
/// in history with `edited_at`), then deletes (pushed; history and inbox keep a placeholder with
/// no text; every stream row of the message and its edit is replaced); nobody else may change
/// the message, and no table keeps its text.
pub async fn edits_and_deletes_for_everyone(mode: Mode) {
    let s = Scope::new("edits", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, carol) = (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await);
    let (gw, erin) = with_auditor(&s, gw, "erin").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut a2 = gw.connect(&alice, "laptop").await;
    let mut b = gw.connect(&bob, "phone").await;
    let mut c = gw.connect(&carol, "phone").await;
    let mut e = gw.connect(&erin, "desk").await;

    let secret = format!("the code is {}", uuid::Uuid::new_v4().simple());
    let edited = format!("{secret} (fixed)");
    let sent = a.send_text(&bob.id, "m1", &secret).await;
    let (conv, id) = (sent["conversation_id"].as_str().unwrap().to_owned(), sent["message_id"].as_str().unwrap().to_owned());
    b.expect("the message", T, |f| f["type"] == "message" && f["message_id"] == json!(id)).await;
    let keep = a.send_text(&bob.id, "m2", "this one stays").await["message_id"].as_str().unwrap().to_owned();
    // Carol's conversation with erin: a message id foreign to alice and bob.
    let foreign = c.send_text(&erin.id, "c1", "elsewhere").await["message_id"].as_str().unwrap().to_owned();
    let random = uuid::Uuid::now_v7().to_string();

    // The sender edits: everyone's devices hear of it.
    acked(&a.request(edit(&conv, &id, &edited)).await, "edit");
    for ws in [&mut b, &mut a2] {
        let f = ws.expect("edited push", T, |f| f["type"] == "edited" && f["message_id"] == json!(id)).await;
        assert_eq!((f["body"].as_str(), f["sender"].as_str()), (Some(edited.as_str()), Some(alice.id.as_str())), "{f}");
    }
    let row = history_row(&gw, &bob, &conv, &id, |m| m["body"] == json!(edited)).await;
    assert!(row["edited_at"].is_string(), "{row}");
    // Auditors read the edit history; nobody else does.
    let edits_path = format!("/v1/audit/messages/{id}/edits");
    let (st, audit) = gw.get(&erin.token, &edits_path).await;
    assert_eq!(st, 200, "{audit}");
    let versions: Vec<&str> = audit["versions"].as_array().unwrap().iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(versions, vec![secret.as_str(), edited.as_str()], "{audit}");
    assert_eq!((audit["body"].as_str(), audit["deleted"].as_bool()), (Some(edited.as_str()), Some(false)), "{audit}");
    for u in [&alice, &bob, &carol] {
        assert_eq!(gw.get(&u.token, &edits_path).await.0, 403, "{} is not an auditor", u.name);
    }

    // The authorization matrix: the peer, a stranger, an auditor; a foreign id and a random id
    // get the same answer.
    assert_eq!(code(&b.request(edit(&conv, &id, "mine now")).await), "forbidden", "only the sender edits");
    assert_eq!(code(&b.request(delete(&conv, &id)).await), "forbidden", "only the sender deletes a direct message");
    for (ws, who) in [(&mut c, "a stranger")] {
        assert_eq!(code(&ws.request(edit(&conv, &id, "x")).await), "not_found", "{who}");
        assert_eq!(code(&ws.request(delete(&conv, &id)).await), "not_found", "{who}");
        assert_eq!(code(&ws.request(delete(&conv, &random)).await), "not_found", "{who}");
    }
    assert_eq!(code(&e.request(delete(&conv, &id)).await), "forbidden", "auditors are read-only");
    assert_eq!(code(&e.request(edit(&conv, &id, "x")).await), "forbidden", "auditors are read-only");
    for other in [&foreign, &random] {
        assert_eq!(code(&a.request(edit(&conv, other, "x")).await), "not_found", "a message not in the conversation");
        assert_eq!(code(&a.request(delete(&conv, other)).await), "not_found", "a message not in the conversation");
    }
    assert_eq!(code(&a.request(edit(&conv, &id, "")).await), "invalid_body");
    assert_eq!(code(&a.request(edit(&conv, "not-an-id", "x")).await), "invalid_message_id");

    // Before the delete the text is in the tables (the check below can fail).
    s.wait_settled(T).await;
    let found = s.tables_containing(&secret).await;
    assert!(found.contains_key("messages") && found.contains_key("user_stream"), "{found:?}");

    // The sender deletes: pushed to both members' devices.
    acked(&a.request(delete(&conv, &id)).await, "delete");
    for ws in [&mut b, &mut a2] {
        let f = ws.expect("deleted push", T, |f| f["type"] == "deleted" && f["message_id"] == json!(id)).await;
        assert_eq!(f["by"], json!(alice.id), "{f}");
    }
    acked(&a.request(delete(&conv, &id)).await, "delete");

    // History keeps a placeholder without text for both; the conversation list too.
    for u in [&alice, &bob] {
        let row = history_row(&gw, u, &conv, &id, |m| m["deleted"] == json!(true)).await;
        assert_eq!(row["body"], "", "{row}");
        assert!(row.get("edited_at").is_none(), "{row}");
    }
    // Once the delete is projected, an edit is refused (one racing the delete is dropped by the
    // projections instead).
    assert_eq!(code(&a.request(edit(&conv, &id, "back")).await), "message_deleted");
    let (_, list) = gw.get(&bob.token, "/v1/conversations").await;
    let row = list["conversations"].as_array().and_then(|l| l.iter().find(|c| c["conversation_id"] == json!(conv)).cloned());
    assert!(row.as_ref().is_some_and(|r| !r.to_string().contains(&secret)), "{list}");
    let (_, kept) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=50")).await;
    assert!(kept["messages"].as_array().unwrap().iter().any(|m| m["message_id"] == json!(keep) && m["body"] == "this one stays"));

    let (_, audit) = gw.get(&erin.token, &edits_path).await;
    assert_eq!((audit["deleted"].as_bool(), audit["body"].as_str(), audit["versions"].as_array().map(Vec::len)), (Some(true), Some(""), Some(0)), "{audit}");

    // A new device syncing from the start sees the delete in the message's place, no text.
    let mut b2 = gw.connect(&bob, "tablet").await;
    let (items, _) = b2.sync_until(None, 3, T).await;
    let text = serde_json::to_string(&items).unwrap();
    assert!(!text.contains(&secret), "a stream row keeps the deleted text: {text}");
    let kinds: Vec<&str> = items.iter().filter(|i| i["message_id"] == json!(id)).map(|i| i["kind"].as_str().unwrap()).collect();
    assert!(!kinds.is_empty() && kinds.iter().all(|k| *k == "deleted"), "{kinds:?}");

    // No projection table holds the text any more.
    s.wait_settled(T).await;
    let found = s.tables_containing(&secret).await;
    assert!(found.is_empty(), "the deleted text is still in {found:?}");

    // Delete for me: bob's copy goes, alice's stays. A stranger, an auditor, a random id, a bad
    // scope: refused.
    let me = |conv: &str, id: &str| json!({"type": "delete", "conversation_id": conv, "message_id": id, "scope": "me"});
    assert_eq!(code(&c.request(me(&conv, &keep)).await), "not_found", "a stranger");
    assert_eq!(code(&e.request(me(&conv, &keep)).await), "forbidden", "auditors are read-only");
    assert_eq!(code(&b.request(me(&conv, &random)).await), "not_found");
    assert_eq!(code(&b.request(me(&conv, &foreign)).await), "not_found");
    let mut bad = me(&conv, &keep);
    bad["scope"] = json!("all");
    assert_eq!(code(&b.request(bad).await), "invalid_frame");
    acked(&b.request(me(&conv, &keep)).await, "delete");
    b2.expect("hidden push to bob's other device", T, |f| f["type"] == "hidden" && f["message_id"] == json!(keep)).await;
    wait_for("gone from bob's history", T, || async {
        let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=50")).await;
        (!page["messages"].as_array().unwrap().iter().any(|m| m["message_id"] == json!(keep))).then_some(())
    })
    .await;
    history_row(&gw, &alice, &conv, &keep, |m| m["body"] == "this one stays").await;
    let mut b3 = gw.connect(&bob, "watch").await;
    let items = stream_until(&mut b3, "bob's stream hides it", |items| items.iter().any(|i| i["kind"] == "hidden" && i["message_id"] == json!(keep))).await;
    assert!(!serde_json::to_string(&items).unwrap().contains("this one stays"), "{items:?}");
    let (_, list) = gw.get(&bob.token, "/v1/conversations").await;
    assert!(!list.to_string().contains("this one stays"), "{list}");
    let alice_items = stream_until(&mut a2, "alice keeps it", |items| items.iter().any(|i| i["kind"] == "message" && i["message_id"] == json!(keep))).await;
    assert!(serde_json::to_string(&alice_items).unwrap().contains("this one stays"));
    for ws in [a, a2, b, b2, b3, c, e] {
        ws.close().await;
    }
}

/// A group: the sender's edit reaches everyone who got the message, a member who left since
/// included, and not a member who joined after it; an admin deletes a member's message; a
/// member deletes no one else's; neither a former member nor a later one can touch it.
pub async fn group_edits_and_admin_deletes(mode: Mode) {
    let s = Scope::new("gedits", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (admin, bob, carol, dave) = (gw.register("admin").await, gw.register("bob").await, gw.register("carol").await, gw.register("dave").await);
    let ids: Vec<&str> = vec![bob.id.as_str(), carol.id.as_str()];
    let (st, body) = gw.call(Method::POST, &admin.token, "/v1/groups", Some(json!({"name": "crew", "members": ids}))).await;
    assert_eq!(st, 201, "{body}");
    let conv = body["conversation_id"].as_str().unwrap().to_owned();
    // Members other than the creator act once the membership is projected.
    for u in [&bob, &carol] {
        wait_for(&format!("{} is a member", u.name), T, || async { (gw.get(&u.token, &format!("/v1/groups/{conv}")).await.0 == 200).then_some(()) }).await;
    }
    let mut ad = gw.connect(&admin, "p").await;
    let mut b = gw.connect(&bob, "p").await;
    let mut c = gw.connect(&carol, "p").await;
    let secret = format!("group secret {}", uuid::Uuid::new_v4().simple());
    let f = b.request(json!({"type": "send", "client_msg_id": "g1", "conversation_id": conv, "body": secret})).await;
    assert_eq!(f["type"], "sent", "{f}");
    let id = f["message_id"].as_str().unwrap().to_owned();
    let f = ad.request(json!({"type": "send", "client_msg_id": "g2", "conversation_id": conv, "body": "admin's"})).await;
    let admins = f["message_id"].as_str().unwrap().to_owned();
    c.expect("bob's message", T, |f| f["type"] == "message" && f["message_id"] == json!(id)).await;
    c.expect("admin's message", T, |f| f["type"] == "message" && f["message_id"] == json!(admins)).await;

    // carol may not delete the admin's message; then she leaves, and dave joins.
    assert_eq!(code(&c.request(delete(&conv, &admins)).await), "forbidden");
    let (st, body) = gw.call(Method::DELETE, &carol.token, &format!("/v1/groups/{conv}/members/{}", carol.id), None).await;
    assert!(st == 200 || st == 202 || st == 204, "{st} {body}");
    let (st, body) = gw.call(Method::POST, &admin.token, &format!("/v1/groups/{conv}/members"), Some(json!({"user_id": dave.id}))).await;
    assert!(st == 200 || st == 201 || st == 202, "{st} {body}");
    let mut d = gw.connect(&dave, "p").await;
    // Until the projections show the change, carol could still act as a member.
    wait_for("carol is out, dave is in", T, || async {
        let (_, info) = gw.get(&admin.token, &format!("/v1/groups/{conv}")).await;
        let m = info["members"].as_array().cloned().unwrap_or_default();
        let active = |u: &User| m.iter().any(|x| x["member"] == json!(u.id) && x["active"] != json!(false));
        (!active(&carol) && active(&dave)).then_some(())
    })
    .await;

    // Neither the former member nor the later one can touch it.
    assert_eq!(code(&c.request(edit(&conv, &id, "x")).await), "not_found", "a former member");
    assert_eq!(code(&d.request(delete(&conv, &id)).await), "not_found", "a member since after the message");
    assert_eq!(code(&ad.request(edit(&conv, &id, "x")).await), "forbidden", "an admin edits no one else's message");

    // bob edits: admin and carol (who got the message) hear of it; dave does not.
    acked(&b.request(edit(&conv, &id, &format!("{secret}!"))).await, "edit");
    ad.expect("edited push", T, |f| f["type"] == "edited" && f["message_id"] == json!(id)).await;
    stream_until(&mut c, "carol's stream has the edit", |items| items.iter().any(|i| i["kind"] == "edited" && i["message_id"] == json!(id))).await;
    // The admin deletes bob's message.
    acked(&ad.request(delete(&conv, &id)).await, "delete");
    b.expect("deleted push", T, |f| f["type"] == "deleted" && f["message_id"] == json!(id) && f["by"] == json!(admin.id)).await;
    let row = history_row(&gw, &bob, &conv, &id, |m| m["deleted"] == json!(true)).await;
    assert_eq!(row["body"], "");
    stream_until(&mut c, "carol's stream has the delete and no text", |items| {
        let text = serde_json::to_string(items).unwrap();
        items.iter().any(|i| i["kind"] == "deleted" && i["message_id"] == json!(id)) && !text.contains(&secret)
    })
    .await;
    let (dave_items, _) = d.sync_until(None, 1, T).await;
    assert!(!dave_items.iter().any(|i| i["message_id"] == json!(id)), "dave never had the message: {dave_items:?}");
    s.wait_settled(T).await;
    let found = s.tables_containing(&secret).await;
    assert!(found.is_empty(), "the deleted text is still in {found:?}");
    for ws in [ad, b, c, d] {
        ws.close().await;
    }
}

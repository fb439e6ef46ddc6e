//! Replies, mentions and reactions (both modes): live pushes and `sync`, history and the
//! conversation list, and the authorization matrix of `send` with `reply_to` / `mentions` and of
//! the `react` frame (a stranger, a former group member, a member who joined later, an auditor;
//! a foreign id answered like a random one).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::edits::{acked, code, history_row};
use crate::harness::*;
use crate::product::with_auditor;

const T: Duration = Duration::from_secs(60);

fn react(conv: &str, id: &str, emoji: Option<&str>) -> Value {
    let mut f = json!({"type": "react", "conversation_id": conv, "message_id": id});
    if let Some(e) = emoji {
        f["emoji"] = json!(e);
    }
    f
}

fn reply(cmid: &str, conv: &str, to: &str, body: &str) -> Value {
    json!({"type": "send", "client_msg_id": cmid, "conversation_id": conv, "body": body, "reply_to": to})
}

fn sent_id(f: &Value) -> String {
    assert_eq!(f["type"], "sent", "{f}");
    f["message_id"].as_str().unwrap().to_owned()
}

/// `user`'s conversation-list row of `conv`, once `pred` holds for it.
async fn inbox_row(gw: &Gateway, user: &User, conv: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("{}'s row of {conv}", user.name), T, || async {
        let (st, list) = gw.get(&user.token, "/v1/conversations").await;
        assert_eq!(st, 200, "{list}");
        list["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == json!(conv) && pred(c)).cloned()
    })
    .await
}

fn counts(row: &Value) -> Vec<(String, u64)> {
    row["reactions"]
        .as_array()
        .map(|r| r.iter().map(|c| (c["emoji"].as_str().unwrap().to_owned(), c["count"].as_u64().unwrap())).collect())
        .unwrap_or_default()
}

/// A direct conversation: a reply quotes an earlier message by id (pushed, in history, and only
/// of a message the sender can read); reactions are one per user per message, changed and taken
/// back, pushed to both members' devices, counted in history with the reader's own, in `sync`
/// on a new device; none on a deleted message.
pub async fn replies_and_reactions(mode: Mode) {
    let s = Scope::new("react", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, carol) = (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await);
    let (gw, erin) = with_auditor(&s, gw, "erin").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut a2 = gw.connect(&alice, "laptop").await;
    let mut b = gw.connect(&bob, "phone").await;
    let mut c = gw.connect(&carol, "phone").await;
    let mut e = gw.connect(&erin, "desk").await;

    let first = a.send_text(&bob.id, "m1", "lunch at noon?").await;
    let (conv, id) = (first["conversation_id"].as_str().unwrap().to_owned(), first["message_id"].as_str().unwrap().to_owned());
    b.expect("the message", T, |f| f["type"] == "message" && f["message_id"] == json!(id)).await;
    let foreign = c.send_text(&erin.id, "c1", "elsewhere").await["message_id"].as_str().unwrap().to_owned();
    let random = uuid::Uuid::now_v7().to_string();

    // A reply: pushed with its reference, in history for both.
    let r = sent_id(&b.request(reply("r1", &conv, &id, "yes!")).await);
    let f = a.expect("the reply", T, |f| f["type"] == "message" && f["message_id"] == json!(r)).await;
    assert_eq!(f["reply_to"], json!(id), "{f}");
    for u in [&alice, &bob] {
        history_row(&gw, u, &conv, &r, |m| m["reply_to"] == json!(id)).await;
    }
    // Only a message of this conversation that the sender can read; same answer for a foreign
    // id and a random one.
    for other in [&foreign, &random] {
        assert_eq!(code(&b.request(reply("r2", &conv, other, "x")).await), "not_found");
    }
    assert_eq!(code(&b.request(reply("r3", &conv, "not-an-id", "x")).await), "invalid_message_id");
    assert_eq!(code(&c.request(reply("r4", &conv, &id, "x")).await), "not_found", "a stranger");
    assert_eq!(code(&e.request(reply("r5", &conv, &id, "x")).await), "forbidden", "auditors are read-only");
    // Mentions are for groups.
    let f = b.request(json!({"type": "send", "client_msg_id": "r6", "to": alice.id, "body": "hi", "mentions": [alice.id]})).await;
    assert_eq!(code(&f), "invalid_mentions");
    // The idempotency key covers the reference: the same key for another reply is refused.
    let again = b.request(reply("r1", &conv, &r, "yes!")).await;
    assert_eq!(again["type"], "error", "a reused key with another reply_to: {again}");

    // Reactions: bob 👍, then ❤ (unqualified: stored as ❤️), alice 👍.
    acked(&b.request(react(&conv, &id, Some("👍"))).await, "react");
    for ws in [&mut a, &mut a2] {
        let f = ws.expect("reaction push", T, |f| f["type"] == "reaction" && f["message_id"] == json!(id)).await;
        assert_eq!((f["by"].as_str(), f["emoji"].as_str()), (Some(bob.id.as_str()), Some("👍")), "{f}");
    }
    let row = history_row(&gw, &alice, &conv, &id, |m| !counts(m).is_empty()).await;
    assert_eq!(counts(&row), vec![("👍".to_owned(), 1)], "{row}");
    assert!(row.get("my_reaction").is_none(), "alice has not reacted: {row}");
    acked(&b.request(react(&conv, &id, Some("\u{2764}"))).await, "react");
    acked(&a.request(react(&conv, &id, Some("👍"))).await, "react");
    let row = history_row(&gw, &bob, &conv, &id, |m| counts(m).len() == 2).await;
    assert_eq!(counts(&row), vec![("❤️".to_owned(), 1), ("👍".to_owned(), 1)], "{row}");
    assert_eq!(row["my_reaction"], json!("❤️"), "{row}");
    // The same reaction again changes nothing (acknowledged, nothing appended).
    acked(&a.request(react(&conv, &id, Some("👍"))).await, "react");
    // bob takes his back.
    acked(&b.request(react(&conv, &id, None)).await, "react");
    a2.expect("the take-back push", T, |f| f["type"] == "reaction" && f["message_id"] == json!(id) && f.get("emoji").is_none()).await;
    let row = history_row(&gw, &bob, &conv, &id, |m| counts(m).len() == 1).await;
    assert_eq!(counts(&row), vec![("👍".to_owned(), 1)], "{row}");
    assert!(row.get("my_reaction").is_none(), "{row}");

    // The authorization matrix of `react`.
    assert_eq!(code(&b.request(react(&conv, &id, Some("ok"))).await), "invalid_emoji");
    assert_eq!(code(&b.request(react(&conv, &id, Some("👍👍"))).await), "invalid_emoji");
    assert_eq!(code(&c.request(react(&conv, &id, Some("👍"))).await), "not_found", "a stranger");
    assert_eq!(code(&e.request(react(&conv, &id, Some("👍"))).await), "forbidden", "auditors are read-only");
    for other in [&foreign, &random] {
        assert_eq!(code(&b.request(react(&conv, other, Some("👍"))).await), "not_found", "a message not in the conversation");
    }
    assert_eq!(code(&b.request(react(&conv, "x", Some("👍"))).await), "invalid_message_id");

    // A new device of alice's syncs the reactions in order.
    let mut a3 = gw.connect(&alice, "tablet").await;
    let (items, _) = a3.sync_until(None, 6, T).await;
    let reactions: Vec<(String, Option<String>)> = items
        .iter()
        .filter(|i| i["kind"] == "reaction")
        .map(|i| (i["by"].as_str().unwrap().to_owned(), i["emoji"].as_str().map(str::to_owned)))
        .collect();
    assert_eq!(
        reactions,
        vec![(bob.id.clone(), Some("👍".into())), (bob.id.clone(), Some("❤️".into())), (alice.id.clone(), Some("👍".into())), (bob.id.clone(), None)],
        "{items:?}"
    );

    // A deleted message: no reactions shown, none taken, no reply to it.
    acked(&a.request(json!({"type": "delete", "conversation_id": conv, "message_id": id})).await, "delete");
    let row = history_row(&gw, &bob, &conv, &id, |m| m["deleted"] == json!(true)).await;
    assert!(row.get("reactions").is_none() && row.get("my_reaction").is_none(), "{row}");
    assert_eq!(code(&b.request(react(&conv, &id, Some("👍"))).await), "message_deleted");
    assert_eq!(code(&b.request(reply("r7", &conv, &id, "x")).await), "message_deleted");
    // Deleted for oneself: not quotable, not reactable by that user.
    acked(&b.request(json!({"type": "delete", "conversation_id": conv, "message_id": r, "scope": "me"})).await, "delete");
    wait_for("the reply gone from bob's history", T, || async {
        let (_, page) = gw.get(&bob.token, &format!("/v1/conversations/{conv}/messages?limit=50")).await;
        (!page["messages"].as_array().unwrap().iter().any(|m| m["message_id"] == json!(r))).then_some(())
    })
    .await;
    assert_eq!(code(&b.request(react(&conv, &r, Some("👍"))).await), "not_found");
    assert_eq!(code(&b.request(reply("r8", &conv, &r, "x")).await), "not_found");
    acked(&a.request(react(&conv, &r, Some("🎉"))).await, "react");
    for ws in [a, a2, a3, b, c, e] {
        ws.close().await;
    }
}

/// A group: mentions name members (validated; kept as of the message's position), flag the
/// message in the mentioned member's conversation list until they read it; replies and
/// reactions only to messages the member could see; a former member and a later one reach
/// nothing, and reactions reach only the members who got the message.
pub async fn group_mentions_replies_and_reactions(mode: Mode) {
    let s = Scope::new("gmention", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (admin, bob, carol, dave, eve) =
        (gw.register("admin").await, gw.register("bob").await, gw.register("carol").await, gw.register("dave").await, gw.register("eve").await);
    let ids: Vec<&str> = vec![bob.id.as_str(), carol.id.as_str()];
    let (st, body) = gw.call(Method::POST, &admin.token, "/v1/groups", Some(json!({"name": "crew", "members": ids}))).await;
    assert_eq!(st, 201, "{body}");
    let conv = body["conversation_id"].as_str().unwrap().to_owned();
    for u in [&bob, &carol] {
        wait_for(&format!("{} is a member", u.name), T, || async { (gw.get(&u.token, &format!("/v1/groups/{conv}")).await.0 == 200).then_some(()) }).await;
    }
    let mut ad = gw.connect(&admin, "p").await;
    let mut b = gw.connect(&bob, "p").await;
    let mut c = gw.connect(&carol, "p").await;
    let mut ev = gw.connect(&eve, "p").await;
    let send = |cmid: &str, body: &str, mentions: Vec<&str>| json!({"type": "send", "client_msg_id": cmid, "conversation_id": conv, "body": body, "mentions": mentions});

    // Mentions: members only, at most 50.
    assert_eq!(code(&b.request(send("x1", "hey", vec![eve.id.as_str()])).await), "invalid_mentions", "not a member");
    assert_eq!(code(&b.request(send("x2", "hey", vec!["nobody"])).await), "invalid_mentions");
    let many: Vec<&str> = std::iter::repeat_n(carol.id.as_str(), 51).collect();
    assert_eq!(code(&b.request(send("x3", "hey", many)).await), "invalid_mentions");
    assert_eq!(code(&ev.request(send("x4", "hey", vec![carol.id.as_str()])).await), "not_found", "a stranger posts nothing");
    let m = sent_id(&b.request(send("m1", "@carol @admin rope?", vec![carol.id.as_str(), admin.id.as_str(), carol.id.as_str()])).await);
    let f = c.expect("the mention", T, |f| f["type"] == "message" && f["message_id"] == json!(m)).await;
    assert_eq!(f["mentions"], json!([carol.id, admin.id]), "distinct, in order: {f}");
    let plain = sent_id(&ad.request(send("m2", "no mentions here", vec![])).await);
    c.expect("the plain one", T, |f| f["type"] == "message" && f["message_id"] == json!(plain)).await;
    history_row(&gw, &bob, &conv, &m, |r| r["mentions"] == json!([carol.id, admin.id])).await;
    // carol's list flags the mention until she reads past it; bob (the sender) has none.
    let row = inbox_row(&gw, &carol, &conv, |r| r["unread"] == json!(2)).await;
    assert_eq!(row["mentions"], json!(1), "{row}");
    let row = inbox_row(&gw, &admin, &conv, |r| r["unread"] == json!(1)).await;
    assert_eq!(row["mentions"], json!(1), "the admin was mentioned by bob: {row}");
    assert_eq!(inbox_row(&gw, &bob, &conv, |_| true).await["mentions"], json!(0));
    acked(&c.request(json!({"type": "read", "conversation_id": conv, "up_to": m})).await, "read");
    let row = inbox_row(&gw, &carol, &conv, |r| r["unread"] == json!(1)).await;
    assert_eq!(row["mentions"], json!(0), "read past the mention: {row}");

    // A reply and reactions inside the group.
    let r = sent_id(&c.request(json!({"type": "send", "client_msg_id": "c1", "conversation_id": conv, "body": "on it", "reply_to": m})).await);
    b.expect("carol's reply", T, |f| f["type"] == "message" && f["message_id"] == json!(r) && f["reply_to"] == json!(m)).await;
    acked(&c.request(react(&conv, &m, Some("🧗"))).await, "react");
    b.expect("carol's reaction", T, |f| f["type"] == "reaction" && f["message_id"] == json!(m) && f["by"] == json!(carol.id)).await;

    // carol leaves, dave joins.
    let (st, body) = gw.call(Method::DELETE, &carol.token, &format!("/v1/groups/{conv}/members/{}", carol.id), None).await;
    assert!(st == 200 || st == 202 || st == 204, "{st} {body}");
    let (st, body) = gw.call(Method::POST, &admin.token, &format!("/v1/groups/{conv}/members"), Some(json!({"user_id": dave.id}))).await;
    assert!(st == 200 || st == 201 || st == 202, "{st} {body}");
    let mut d = gw.connect(&dave, "p").await;
    wait_for("carol is out, dave is in", T, || async {
        let (_, info) = gw.get(&admin.token, &format!("/v1/groups/{conv}")).await;
        let members = info["members"].as_array().cloned().unwrap_or_default();
        let active = |u: &User| members.iter().any(|x| x["member"] == json!(u.id) && x["active"] != json!(false));
        (!active(&carol) && active(&dave)).then_some(())
    })
    .await;
    // A former member and a later one: nothing (same as a random id).
    let random = uuid::Uuid::now_v7().to_string();
    for (ws, who) in [(&mut c, "a former member"), (&mut d, "a member since after the message")] {
        assert_eq!(code(&ws.request(react(&conv, &m, Some("👍"))).await), "not_found", "{who}");
        assert_eq!(code(&ws.request(react(&conv, &random, Some("👍"))).await), "not_found", "{who}");
    }
    assert_eq!(code(&d.request(json!({"type": "send", "client_msg_id": "d1", "conversation_id": conv, "body": "?", "reply_to": m})).await), "not_found");
    assert_eq!(code(&c.request(send("c2", "still here?", vec![])).await), "not_found", "a former member posts nothing");
    assert_eq!(code(&ad.request(send("m3", "hi carol", vec![carol.id.as_str()])).await), "invalid_mentions", "carol is no longer a member");
    // dave's own messages he may reply to and react to; the admin reacts to bob's: bob and the
    // admin hear of it, not carol (gone) nor dave (joined after it).
    let dm = sent_id(&d.request(send("d2", "hello all", vec![])).await);
    acked(&d.request(react(&conv, &dm, Some("👋"))).await, "react");
    acked(&ad.request(react(&conv, &m, Some("🔥"))).await, "react");
    b.expect("the admin's reaction", T, |f| f["type"] == "reaction" && f["message_id"] == json!(m) && f["by"] == json!(admin.id)).await;
    let row = history_row(&gw, &bob, &conv, &m, |r| counts(r).len() == 2).await;
    assert_eq!(counts(&row), vec![("🔥".to_owned(), 1), ("🧗".to_owned(), 1)], "{row}");
    s.wait_settled(T).await;
    let (dave_items, _) = d.sync_until(None, 1, T).await;
    assert!(!dave_items.iter().any(|i| i["message_id"] == json!(m)), "dave never had the message: {dave_items:?}");
    let (carol_items, _) = c.sync_until(None, 1, T).await;
    assert!(
        !carol_items.iter().any(|i| i["kind"] == "reaction" && i["by"] == json!(admin.id)),
        "carol left before the admin's reaction: {carol_items:?}"
    );
    // Nor does history show the group to outsiders.
    assert_eq!(gw.get(&eve.token, &format!("/v1/conversations/{conv}/messages")).await.0, 404);
    for ws in [ad, b, c, d, ev] {
        ws.close().await;
    }
}

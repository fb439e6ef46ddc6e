//! Message search (both modes): only the caller's own conversations, in a group only the
//! messages of their membership intervals; words, not substrings, accents folded; newest first
//! and paged; edits, deletes for everyone and deletes for me followed; the authorization matrix
//! of `GET /v1/search` (a stranger, a former member, an auditor; a foreign conversation answered
//! like a random one).

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::edits::acked;
use crate::harness::*;
use crate::product::with_auditor;

const T: Duration = Duration::from_secs(60);

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The bodies `user` finds for `q` (all pages of `limit`), newest first.
async fn found(gw: &Gateway, user: &User, q: &str, extra: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut before = String::new();
    loop {
        let (st, page) = gw.get(&user.token, &format!("/v1/search?q={}&limit={limit}{extra}{before}", enc(q))).await;
        assert_eq!(st, 200, "{page}");
        let results = page["results"].as_array().unwrap();
        assert!(results.len() <= limit, "{page}");
        out.extend(results.iter().map(|r| r["body"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => before = format!("&before={c}"),
            None => return out,
        }
    }
}

/// Waits until `user`'s search for `q` finds exactly `want` (the index follows the log).
async fn finds(gw: &Gateway, user: &User, q: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let got = found(gw, user, q, "", 20).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} searching {q:?}: got {got:?}, want {want:?}", user.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn search_own_conversations(mode: Mode) {
    let s = Scope::new("search", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, carol, dave, eve) =
        (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await, gw.register("dave").await, gw.register("eve").await);
    let (gw, erin) = with_auditor(&s, gw, "erin").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut b = gw.connect(&bob, "phone").await;
    let mut c = gw.connect(&carol, "phone").await;

    let sat = a.send_text(&bob.id, "d1", "Bouldering at Fontainebleau on Saturday").await;
    let dm = sat["conversation_id"].as_str().unwrap().to_owned();
    let sat = sat["message_id"].as_str().unwrap().to_owned();
    let cafe = a.send_text(&bob.id, "d2", "Café later?").await["message_id"].as_str().unwrap().to_owned();
    b.send_text(&alice.id, "d3", "fontainebleau works for me").await;
    let secret = c.send_text(&dave.id, "c1", "Fontainebleau secret between carol and dave").await;
    let carol_dave = secret["conversation_id"].as_str().unwrap().to_owned();

    // A group: plan A before carol joins, B while she is in, C after she left.
    let (st, body) = gw.call(Method::POST, &alice.token, "/v1/groups", Some(json!({"name": "crew", "members": [bob.id]}))).await;
    assert_eq!(st, 201, "{body}");
    let g = body["conversation_id"].as_str().unwrap().to_owned();
    let gsend = |cmid: &str, body: &str| json!({"type": "send", "client_msg_id": cmid, "conversation_id": g, "body": body});
    let plan_a = a.request(gsend("g1", "fontainebleau plan A")).await["message_id"].as_str().unwrap().to_owned();
    let (st, body) = gw.call(Method::POST, &alice.token, &format!("/v1/groups/{g}/members"), Some(json!({"user_id": carol.id}))).await;
    assert!(st == 200 || st == 201 || st == 202, "{st} {body}");
    wait_for("carol is a member", T, || async { (gw.get(&carol.token, &format!("/v1/groups/{g}")).await.0 == 200).then_some(()) }).await;
    let f = a.request(gsend("g2", "fontainebleau plan B")).await;
    assert_eq!(f["type"], "sent", "{f}");
    c.expect("plan B", T, |f| f["type"] == "message" && f["body"] == "fontainebleau plan B").await;
    let (st, body) = gw.call(Method::DELETE, &alice.token, &format!("/v1/groups/{g}/members/{}", carol.id), None).await;
    assert!(st == 200 || st == 202 || st == 204, "{st} {body}");
    wait_for("carol is out", T, || async { (gw.get(&carol.token, &format!("/v1/groups/{g}")).await.0 == 404).then_some(()) }).await;
    let f = a.request(gsend("g3", "fontainebleau plan C")).await;
    assert_eq!(f["type"], "sent", "{f}");

    // Each finds what they can read, newest first, by word (any case, accents folded).
    let both = ["fontainebleau plan C", "fontainebleau plan B", "fontainebleau plan A", "fontainebleau works for me", "Bouldering at Fontainebleau on Saturday"];
    finds(&gw, &alice, "FONTAINEBLEAU", &both).await;
    finds(&gw, &bob, "fontainebleau", &both).await;
    finds(&gw, &carol, "fontainebleau", &["fontainebleau plan B", "Fontainebleau secret between carol and dave"]).await;
    finds(&gw, &alice, "cafe", &["Café later?"]).await;
    finds(&gw, &alice, "plan fontainebleau", &["fontainebleau plan C", "fontainebleau plan B", "fontainebleau plan A"]).await;
    assert!(found(&gw, &alice, "fontaine", "", 20).await.is_empty(), "words, not substrings");
    // Paged one by one: the same list.
    assert_eq!(found(&gw, &alice, "fontainebleau", "", 1).await, both);
    assert_eq!(found(&gw, &alice, "fontainebleau", "", 2).await, both);
    // One conversation.
    assert_eq!(found(&gw, &alice, "fontainebleau", &format!("&conversation_id={g}"), 20).await, both[..3].to_vec());
    assert_eq!(found(&gw, &carol, "fontainebleau", &format!("&conversation_id={g}"), 20).await, vec!["fontainebleau plan B"], "a former member: her interval");

    // The authorization matrix: strangers, auditors and former members reach nothing else; a
    // foreign conversation is answered like a random one.
    for u in [&eve, &erin] {
        assert!(found(&gw, u, "fontainebleau", "", 20).await.is_empty(), "{}", u.name);
    }
    let random_group = format!("g.{}", uuid::Uuid::new_v4());
    for (u, conv) in [(&eve, &g), (&eve, &dm), (&eve, &random_group), (&carol, &dm), (&alice, &carol_dave), (&erin, &g)] {
        let (st, body) = gw.get(&u.token, &format!("/v1/search?q=fontainebleau&conversation_id={}", enc(conv))).await;
        assert_eq!((st, body["error"]["code"].as_str()), (404, Some("not_found")), "{} in {conv}: {body}", u.name);
    }
    let bad = [("", "invalid_query"), ("?q=%20%3B", "invalid_query"), ("?q=a&before=nope", "invalid_cursor"), ("?q=a&limit=x", "invalid_limit")];
    for (query, want) in bad {
        let (st, body) = gw.get(&alice.token, &format!("/v1/search{query}")).await;
        assert_eq!((st, body["error"]["code"].as_str()), (400, Some(want)), "{query}: {body}");
    }
    let long: String = (0..11).map(|i| format!("w{i} ")).collect();
    assert_eq!(gw.get(&alice.token, &format!("/v1/search?q={}", enc(&long))).await.0, 400, "more than 10 words");
    assert_eq!(gw.get("not-a-token", "/v1/search?q=a").await.0, 401);

    // An edit replaces the words; a delete for everyone takes the message out for both; a delete
    // for me for that user only.
    acked(&a.request(json!({"type": "edit", "conversation_id": dm, "message_id": cafe, "body": "Tea later?"})).await, "edit");
    finds(&gw, &bob, "cafe", &[]).await;
    finds(&gw, &bob, "tea", &["Tea later?"]).await;
    acked(&a.request(json!({"type": "delete", "conversation_id": dm, "message_id": sat})).await, "delete");
    acked(&b.request(json!({"type": "delete", "scope": "me", "conversation_id": g, "message_id": plan_a})).await, "delete");
    finds(&gw, &alice, "fontainebleau", &both[..4]).await;
    finds(&gw, &bob, "fontainebleau", &["fontainebleau plan C", "fontainebleau plan B", "fontainebleau works for me"]).await;
    assert!(found(&gw, &bob, "bouldering", "", 20).await.is_empty());
    for ws in [a, b, c] {
        ws.close().await;
    }
}

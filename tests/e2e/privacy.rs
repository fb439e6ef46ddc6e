//! Privacy (both modes): blocking (a blocked user's messages withheld without a word; presence,
//! last seen, profile photo and typing hidden; unblock restores) with the authorization matrix of
//! the block endpoints, and the privacy settings matrix: (setting × relation: contact /
//! non-contact / blocked) × (last seen read, presence push, profile photo, read receipt).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::edits::code;
use crate::harness::*;
use crate::product::{png, with_auditor};

const T: Duration = Duration::from_secs(60);
/// How long a negative check waits for a frame that must not come (after the positive ones of
/// the same cause arrived).
const QUIET: Duration = Duration::from_millis(1500);

fn presence_of(u: &User, status: &'static str) -> impl Fn(&Value) -> bool {
    let id = json!(u.id);
    move |f: &Value| f["type"] == "presence" && f["user_id"] == id && f["status"] == status
}

fn message_with(body: &'static str) -> impl Fn(&Value) -> bool {
    move |f: &Value| f["type"] == "message" && f["body"] == body
}

fn seen_of(id: &str) -> impl Fn(&Value) -> bool {
    let id = json!(id);
    move |f: &Value| f["type"] == "receipt" && f["status"] == "seen" && f["message_id"] == id
}

/// Bodies of `user`'s history of `conv`, newest first.
async fn bodies(gw: &Gateway, user: &User, conv: &str) -> Vec<String> {
    let (st, page) = gw.get(&user.token, &format!("/v1/conversations/{conv}/messages?limit=100")).await;
    assert_eq!(st, 200, "{page}");
    page["messages"].as_array().unwrap().iter().map(|m| m["body"].as_str().unwrap_or_default().to_owned()).collect()
}

async fn history_has(gw: &Gateway, user: &User, conv: &str, body: &str) {
    wait_for(&format!("{body:?} in {}'s history", user.name), T, || async { bodies(gw, user, conv).await.iter().any(|b| b == body).then_some(()) }).await;
}

/// Sets an avatar for `user`; returns its media id.
async fn set_avatar(gw: &Gateway, user: &User) -> String {
    let (st, up) = gw.upload(&user.token, "image", png(2_000)).await;
    assert_eq!(st, 201, "{up}");
    let media = up["media_id"].as_str().unwrap().to_owned();
    let (st, b) = gw.call(Method::PUT, &user.token, "/v1/profile", Some(json!({"display_name": user.name, "avatar_media_id": media}))).await;
    assert!(st == 202 || st == 200, "{st} {b}");
    wait_for("the avatar projected", T, || async {
        let (_, p) = gw.get(&user.token, &format!("/v1/users/{}/profile", user.id)).await;
        (p["avatar_media_id"] == json!(media)).then_some(())
    })
    .await;
    media
}

/// What `viewer` sees of `owner`: (last seen readable, avatar in the profile, avatar downloadable).
async fn sees(gw: &Gateway, viewer: &User, owner: &User, avatar: &str) -> (bool, bool, bool) {
    let (ls, body) = gw.get(&viewer.token, &format!("/v1/users/{}/last-seen", owner.id)).await;
    assert!(ls == 200 || (ls == 404 && body["error"]["code"] == "not_found"), "{ls} {body}");
    let (st, profile) = gw.get(&viewer.token, &format!("/v1/users/{}/profile", owner.id)).await;
    assert_eq!(st, 200, "{profile}");
    let photo = gw.fetch(&viewer.token, &format!("/v1/media/{avatar}"), None).await.status().as_u16();
    assert!(photo == 200 || photo == 404, "{photo}");
    (ls == 200, profile.get("avatar_media_id") == Some(&json!(avatar)), photo == 200)
}

/// Two users who both wrote in their direct conversation (contacts); returns its id.
async fn make_contacts(x: &mut Ws, xu: &User, y: &mut Ws, yu: &User, tag: &str) -> String {
    let f = x.send_text(&yu.id, &format!("{tag}-1"), &format!("hello from {}", xu.name)).await;
    y.expect("the first message", T, |m| m["type"] == "message" && m["message_id"] == f["message_id"]).await;
    y.send_text(&xu.id, &format!("{tag}-2"), &format!("hello from {}", yu.name)).await;
    f["conversation_id"].as_str().unwrap().to_owned()
}

/// Blocking: bob's messages to alice are accepted (`sent`) and withheld (not pushed, not in her
/// history, list, receipts or search; edits of them neither); alice cannot message bob
/// (`blocked`); bob no longer sees alice's last seen, presence, photo or typing. Unblocking
/// restores all of it for what comes after; what was withheld stays withheld. The block
/// endpoints' authorization matrix: self, unknown ids, an auditor, no token.
pub async fn blocking_withholds_and_hides(mode: Mode) {
    let s = Scope::new("block", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob, carol) = (gw.register("alice").await, gw.register("bob").await, gw.register("carol").await);
    let (gw, erin) = with_auditor(&s, gw, "erin").await;
    let mut a = gw.connect(&alice, "phone").await;
    let mut b = gw.connect(&bob, "phone").await;
    let conv = make_contacts(&mut a, &alice, &mut b, &bob, "intro").await;
    let avatar = set_avatar(&gw, &alice).await;
    wait_for("bob sees alice (contacts)", T, || async { (sees(&gw, &bob, &alice, &avatar).await == (true, true, true)).then_some(()) }).await;

    // The block endpoints: nothing blocked yet; the matrix of who may call them.
    let (st, list) = gw.get(&alice.token, "/v1/blocks").await;
    assert_eq!((st, list), (200, json!({"blocked": []})));
    let (st, e) = gw.call(Method::PUT, &alice.token, &format!("/v1/blocks/{}", alice.id), None).await;
    assert_eq!((st, e["error"]["code"].as_str()), (400, Some("invalid_block")), "{e}");
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-user".to_owned()] {
        let (st, e) = gw.call(Method::PUT, &alice.token, &format!("/v1/blocks/{id}"), None).await;
        assert_eq!((st, e["error"]["code"].as_str()), (404, Some("not_found")), "{e}");
    }
    let (st, e) = gw.call(Method::PUT, &erin.token, &format!("/v1/blocks/{}", bob.id), None).await;
    assert_eq!((st, e["error"]["code"].as_str()), (403, Some("forbidden")), "an auditor is read-only: {e}");
    let (st, _) = gw.call(Method::PUT, "", &format!("/v1/blocks/{}", bob.id), None).await;
    assert_eq!(st, 401);

    // alice blocks bob: in effect when the answer comes; blocking again changes nothing.
    for _ in 0..2 {
        let (st, e) = gw.call(Method::PUT, &alice.token, &format!("/v1/blocks/{}", bob.id), None).await;
        assert_eq!(st, 204, "{e}");
    }
    let (_, list) = gw.get(&alice.token, "/v1/blocks").await;
    let blocked = list["blocked"].as_array().unwrap();
    assert_eq!(blocked.len(), 1, "{list}");
    assert_eq!((blocked[0]["user_id"].clone(), blocked[0]["username"].clone()), (json!(bob.id), json!("bob")), "{list}");
    assert!(blocked[0]["blocked_at"].as_str().unwrap().ends_with('Z'));
    let (_, bobs) = gw.get(&bob.token, "/v1/blocks").await;
    assert_eq!(bobs, json!({"blocked": []}), "a block is its blocker's to see");

    // bob writes: `sent` as ever; alice gets nothing, anywhere.
    let w = b.send_text(&alice.id, "w-1", "withheld-zq7 hello?").await;
    let wid = w["message_id"].as_str().unwrap().to_owned();
    history_has(&gw, &bob, &conv, "withheld-zq7 hello?").await;
    let edit = b.request(json!({"type": "edit", "conversation_id": conv, "message_id": wid, "body": "withheld-zq7 edited"})).await;
    assert_eq!(edit["type"], "ack", "{edit}");
    history_has(&gw, &bob, &conv, "withheld-zq7 edited").await;
    let react = b.request(json!({"type": "react", "conversation_id": conv, "message_id": wid, "emoji": "👍"})).await;
    assert_eq!(react["type"], "ack", "{react}");
    let typing = b.request(json!({"type": "typing", "conversation_id": conv})).await;
    assert_eq!(typing["type"], "ack", "{typing}");
    assert!(
        !a.arrives_within(QUIET, |f| f["message_id"] == json!(wid) || f["type"] == "typing").await,
        "alice got something of the withheld message or bob's typing: {:?}",
        a.try_request(json!({"type": "sync"}), T).await
    );
    assert!(!bodies(&gw, &alice, &conv).await.iter().any(|b| b.contains("withheld-zq7")), "in alice's history");
    let (_, convs) = gw.get(&alice.token, "/v1/conversations").await;
    assert!(!convs.to_string().contains("withheld-zq7"), "in alice's conversation list: {convs}");
    let (st, _) = gw.get(&alice.token, &format!("/v1/messages/{wid}/receipts")).await;
    assert_eq!(st, 404, "alice reads the receipts of a message withheld from her");
    let (st, r) = gw.get(&bob.token, &format!("/v1/messages/{wid}/receipts")).await;
    assert_eq!(st, 200, "{r}");
    let statuses: Vec<&str> = r["receipts"].as_array().unwrap().iter().map(|x| x["status"].as_str().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == "sent"), "never delivered nor seen: {r}");
    let reacted = a.request(json!({"type": "react", "conversation_id": conv, "message_id": wid, "emoji": "❤️"})).await;
    assert_eq!(code(&reacted), "not_found", "{reacted}");
    let (a_sync, _) = a.sync_until(None, 0, T).await;
    assert!(!Value::Array(a_sync).to_string().contains("withheld-zq7"), "in alice's sync");
    let (b_sync, _) = b.sync_until(None, 0, T).await;
    let b_sync = Value::Array(b_sync).to_string();
    assert!(b_sync.contains("withheld-zq7") && !b_sync.contains("withheld\""), "bob's own sync has it, and nothing says it was withheld: {b_sync}");
    let (st, found) = gw.get(&alice.token, "/v1/search?q=withheld-zq7").await;
    assert!(st == 200 && found["results"].as_array().is_none_or(Vec::is_empty), "{st} {found}");

    // Groups are not affected (as WhatsApp): bob's group message reaches alice.
    let (st, g) = gw.call(Method::POST, &carol.token, "/v1/groups", Some(json!({"name": "crag", "members": [alice.id, bob.id]}))).await;
    assert_eq!(st, 201, "{g}");
    let group = g["conversation_id"].as_str().unwrap().to_owned();
    wait_for("bob's membership projected", T, || async { (gw.get(&bob.token, &format!("/v1/groups/{group}")).await.0 == 200).then_some(()) }).await;
    let sent = b.request(json!({"type": "send", "client_msg_id": "g-1", "conversation_id": group, "body": "bob in the group"})).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    a.expect("bob's group message", T, message_with("bob in the group")).await;

    // alice cannot write to bob while she blocks him; carol is not affected.
    let refused = a.request(json!({"type": "send", "client_msg_id": "a-x", "to": bob.id, "body": "hi"})).await;
    assert_eq!(code(&refused), "blocked", "{refused}");
    let mut c = gw.connect(&carol, "phone").await;
    c.send_text(&alice.id, "c-1", "carol here").await;
    a.expect("carol's message", T, message_with("carol here")).await;

    // bob no longer sees alice's last seen, photo, presence or typing.
    assert_eq!(sees(&gw, &bob, &alice, &avatar).await, (false, false, false), "what bob sees of alice while blocked");
    let typing = a.request(json!({"type": "typing", "conversation_id": conv})).await;
    assert_eq!(typing["type"], "ack", "{typing}");
    a.close().await;
    assert!(!b.arrives_within(QUIET, |f| presence_of(&alice, "offline")(f) || f["type"] == "typing").await, "bob got alice's presence or typing");

    // Unblocked: what comes next is delivered and shown; the withheld message stays withheld.
    let (st, _) = gw.call(Method::DELETE, &alice.token, &format!("/v1/blocks/{}", bob.id), None).await;
    assert_eq!(st, 204);
    let (_, list) = gw.get(&alice.token, "/v1/blocks").await;
    assert_eq!(list, json!({"blocked": []}));
    let mut a = gw.connect(&alice, "phone").await;
    b.expect("alice's presence once unblocked", T, presence_of(&alice, "online")).await;
    b.send_text(&alice.id, "w-2", "after the unblock").await;
    a.expect("bob's message after the unblock", T, message_with("after the unblock")).await;
    history_has(&gw, &alice, &conv, "after the unblock").await;
    assert!(!bodies(&gw, &alice, &conv).await.iter().any(|b| b.contains("withheld-zq7")), "the withheld message came back");
    assert_eq!(sees(&gw, &bob, &alice, &avatar).await, (true, true, true), "what bob sees of alice once unblocked");
    a.send_text(&bob.id, "a-y", "hi again").await;
    b.expect("alice's message", T, message_with("hi again")).await;
}

/// The privacy settings matrix. `tess` has an avatar; `cora` is her contact (both wrote), `nick`
/// wrote to her and never got an answer (not a contact), `ben` is a contact she blocks. For each
/// setting of all three of tess's (everyone / contacts / nobody) and each of them: whether they
/// read her last seen, get her presence pushed, see her photo (in her profile and by download),
/// and get a read receipt when she reads their message. Then the reciprocal rule: cora turns
/// her read receipts off and no longer sees tess's. The settings endpoint's matrix: defaults,
/// partial changes, a bad value, an auditor, no token.
pub async fn privacy_settings_matrix(mode: Mode) {
    let s = Scope::new("privacy", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (tess, cora, nick, ben) = (gw.register("tess").await, gw.register("cora").await, gw.register("nick").await, gw.register("ben").await);
    let (gw, erin) = with_auditor(&s, gw, "erin").await;

    // The settings endpoint.
    let (st, p) = gw.get(&tess.token, "/v1/privacy").await;
    assert_eq!((st, p), (200, json!({"last_seen": "contacts", "photo": "contacts", "read_receipts": "everyone"})), "the defaults");
    let (st, e) = gw.call(Method::PUT, &tess.token, "/v1/privacy", Some(json!({"last_seen": "friends"}))).await;
    assert_eq!((st, e["error"]["code"].as_str()), (400, Some("invalid_privacy")), "{e}");
    let (st, e) = gw.call(Method::PUT, &tess.token, "/v1/privacy", Some(json!({"online": "nobody"}))).await;
    assert_eq!(st, 400, "an unknown setting: {e}");
    let (st, e) = gw.call(Method::PUT, &erin.token, "/v1/privacy", Some(json!({"photo": "nobody"}))).await;
    assert_eq!((st, e["error"]["code"].as_str()), (403, Some("forbidden")), "an auditor is read-only: {e}");
    let (st, _) = gw.call(Method::PUT, "", "/v1/privacy", Some(json!({"photo": "nobody"}))).await;
    assert_eq!(st, 401);
    let (st, p) = gw.call(Method::PUT, &tess.token, "/v1/privacy", Some(json!({"photo": "nobody"}))).await;
    assert_eq!((st, p), (200, json!({"last_seen": "contacts", "photo": "nobody", "read_receipts": "everyone"})), "a partial change");
    let (_, p) = gw.get(&cora.token, "/v1/privacy").await;
    assert_eq!(p["photo"], "contacts", "settings are their user's own");

    // The relations.
    let mut t = gw.connect(&tess, "phone").await;
    let mut c = gw.connect(&cora, "phone").await;
    let mut n = gw.connect(&nick, "phone").await;
    let mut b = gw.connect(&ben, "phone").await;
    let tc = make_contacts(&mut c, &cora, &mut t, &tess, "tc").await;
    let tb = make_contacts(&mut b, &ben, &mut t, &tess, "tb").await;
    let nf = n.send_text(&tess.id, "n-0", "hello tess, it's nick").await;
    let tn = nf["conversation_id"].as_str().unwrap().to_owned();
    t.expect("nick's message", T, message_with("hello tess, it's nick")).await;
    let avatar = set_avatar(&gw, &tess).await;
    // Everyone reads tess's last seen before the block (ben is a contact): wait for the
    // projections of both sides' messages.
    wait_for("cora and ben are tess's contacts", T, || async {
        let c_ok = gw.get(&cora.token, &format!("/v1/users/{}/last-seen", tess.id)).await.0 == 200;
        let b_ok = gw.get(&ben.token, &format!("/v1/users/{}/last-seen", tess.id)).await.0 == 200;
        (c_ok && b_ok).then_some(())
    })
    .await;
    let (st, _) = gw.call(Method::PUT, &tess.token, &format!("/v1/blocks/{}", ben.id), None).await;
    assert_eq!(st, 204);
    // (Presence goes to the other members of tess's direct conversations: nick's too, once projected.)
    wait_for("nick's conversation in tess's list", T, || async {
        let (_, l) = gw.get(&tess.token, "/v1/conversations").await;
        l["conversations"].as_array().unwrap().iter().any(|r| r["conversation_id"] == json!(tn)).then_some(())
    })
    .await;

    let viewers: [(&str, &User, &str); 3] = [("contact", &cora, &tc), ("non-contact", &nick, &tn), ("blocked", &ben, &tb)];
    let mut round = 0;
    for setting in ["everyone", "contacts", "nobody"] {
        round += 1;
        let (st, p) = gw
            .call(Method::PUT, &tess.token, "/v1/privacy", Some(json!({"last_seen": setting, "photo": setting, "read_receipts": setting})))
            .await;
        assert_eq!((st, p), (200, json!({"last_seen": setting, "photo": setting, "read_receipts": setting})));
        let shown = |relation: &str| matches!((setting, relation), ("everyone", "contact" | "non-contact") | ("contacts", "contact"));

        // Last seen and photo, read.
        for (relation, viewer, _) in viewers {
            let want = shown(relation);
            assert_eq!(sees(&gw, viewer, &tess, &avatar).await, (want, want, want), "{setting} × {relation}: last seen, photo in profile, photo download");
        }

        // Presence, pushed: tess goes offline and comes back.
        t.close().await;
        for (relation, viewer, _) in viewers {
            let ws = match relation {
                "contact" => &mut c,
                "non-contact" => &mut n,
                _ => &mut b,
            };
            if shown(relation) {
                ws.expect(&format!("{setting} × {relation}: tess's presence"), T, presence_of(&tess, "offline")).await;
            } else {
                assert!(!ws.arrives_within(QUIET, presence_of(&tess, "offline")).await, "{setting} × {relation}: {} got tess's presence", viewer.name);
            }
        }
        t = gw.connect(&tess, "phone").await;

        // Read receipts: each writes to tess, she reads it.
        for (relation, viewer, conv) in viewers {
            let ws = match relation {
                "contact" => &mut c,
                "non-contact" => &mut n,
                _ => &mut b,
            };
            let body = format!("round {round} from {relation}");
            let f = ws.send_text(&tess.id, &format!("r{round}-{relation}"), &body).await;
            let id = f["message_id"].as_str().unwrap().to_owned();
            if relation != "blocked" {
                let got = t.expect("the message", T, |m| m["type"] == "message" && m["message_id"] == json!(id)).await;
                assert_eq!(got["body"], json!(body));
            }
            let ack = t.request(json!({"type": "read", "conversation_id": conv, "up_to": id})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            if shown(relation) {
                ws.expect(&format!("{setting} × {relation}: the seen receipt"), T, seen_of(&id)).await;
            } else {
                assert!(!ws.arrives_within(QUIET, seen_of(&id)).await, "{setting} × {relation}: {} got a seen receipt", viewer.name);
            }
            // The timeline the sender reads says the same, once tess's read is projected.
            wait_for("tess's read projected", T, || async {
                let (_, l) = gw.get(&tess.token, "/v1/conversations").await;
                l["conversations"].as_array().unwrap().iter().any(|r| r["conversation_id"] == json!(conv) && r["unread"] == json!(0)).then_some(())
            })
            .await;
            let r = wait_for("the message's timeline", T, || async {
                let (st, r) = gw.get(&viewer.token, &format!("/v1/messages/{id}/receipts")).await;
                (st == 200).then_some(r)
            })
            .await;
            let seen_row = r["receipts"].as_array().unwrap().iter().any(|x| x["status"] == "seen");
            if shown(relation) {
                wait_for("the seen row", T, || async {
                    let (_, r) = gw.get(&viewer.token, &format!("/v1/messages/{id}/receipts")).await;
                    r["receipts"].as_array().unwrap().iter().any(|x| x["status"] == "seen").then_some(())
                })
                .await;
            } else {
                assert!(!seen_row, "{setting} × {relation}: a seen row in {r}");
            }
        }
    }

    // Reciprocal: tess shares read receipts with everyone again; cora turns hers off and gets
    // none from tess (and sends none).
    let (st, _) = gw.call(Method::PUT, &tess.token, "/v1/privacy", Some(json!({"read_receipts": "everyone"}))).await;
    assert_eq!(st, 200);
    let (st, _) = gw.call(Method::PUT, &cora.token, "/v1/privacy", Some(json!({"read_receipts": "nobody"}))).await;
    assert_eq!(st, 200);
    let f = c.send_text(&tess.id, "recip-1", "reciprocal").await;
    let id = f["message_id"].as_str().unwrap().to_owned();
    t.expect("cora's message", T, message_with("reciprocal")).await;
    let ack = t.request(json!({"type": "read", "conversation_id": tc, "up_to": id})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let f = t.send_text(&cora.id, "recip-2", "and back").await;
    let back = f["message_id"].as_str().unwrap().to_owned();
    c.expect("tess's message", T, message_with("and back")).await;
    let ack = c.request(json!({"type": "read", "conversation_id": tc, "up_to": back})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(!c.arrives_within(QUIET, seen_of(&id)).await, "cora got tess's receipt with her own off");
    assert!(!t.arrives_within(QUIET, seen_of(&back)).await, "tess got cora's receipt");
}

/// A `read` on one device reaches the user's other devices at once (a `read` frame), in a direct
/// conversation and in a group, and no one else's; a new device's `sync` has it too.
pub async fn reads_follow_on_other_devices(mode: Mode) {
    let s = Scope::new("readsync", mode).await;
    let gw = s.gateway("n1").await;
    let _worker = s.worker().await;
    let (alice, bob) = (gw.register("alice").await, gw.register("bob").await);
    let mut phone = gw.connect(&alice, "phone").await;
    let mut laptop = gw.connect(&alice, "laptop").await;
    let mut b = gw.connect(&bob, "phone").await;
    let (st, g) = gw.call(Method::POST, &bob.token, "/v1/groups", Some(json!({"name": "crew", "members": [alice.id]}))).await;
    assert_eq!(st, 201, "{g}");
    let group = g["conversation_id"].as_str().unwrap().to_owned();
    phone.expect("the group", T, |f| f["type"] == "group" && f["conversation_id"] == json!(group)).await;

    let direct = b.send_text(&alice.id, "d-1", "direct one").await;
    let g1 = b.request(json!({"type": "send", "client_msg_id": "g-1", "conversation_id": group, "body": "group one"})).await;
    assert_eq!(g1["type"], "sent", "{g1}");
    for (conv, id) in [(direct["conversation_id"].clone(), direct["message_id"].clone()), (json!(group), g1["message_id"].clone())] {
        phone.expect("the message", T, |f| f["type"] == "message" && f["message_id"] == id).await;
        let ack = phone.request(json!({"type": "read", "conversation_id": conv, "up_to": id})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let f = laptop.expect("the read on the other device", Duration::from_secs(5), |f| f["type"] == "read" && f["up_to"] == id).await;
        assert_eq!(f["conversation_id"], conv, "{f}");
        assert!(!phone.arrives_within(Duration::from_millis(300), |f| f["type"] == "read").await, "the reading device gets its own read back");
    }
    assert!(!b.arrives_within(QUIET, |f| f["type"] == "read").await, "bob got alice's read");
    wait_for("both reads in a new device's sync", T, || async {
        let (items, _) = gw.connect(&alice, "tablet").await.sync_until(None, 0, T).await;
        (items.iter().filter(|i| i["kind"] == "read").count() == 2).then_some(())
    })
    .await;
}

/// Bans (`chat user ban|unban`, an operator's command; embedded: beside the running server): a
/// banned user's tokens are refused and their open sockets close with 1008 on every node within
/// 5 s, their log-ins are refused (`account_banned`, only with the right password), both changes
/// are events; an unban lets them log in again. Others are not affected.
pub async fn bans_end_sessions_everywhere(mode: Mode) {
    const WITHIN: Duration = Duration::from_secs(5);
    let s = Scope::new("ban", mode).await;
    let gw = s.gateway("n1").await;
    let second_node = match mode {
        Mode::Cluster => Some(s.gateway("n2").await),
        Mode::Embedded => None,
    };
    let far = second_node.as_ref().unwrap_or(&gw);
    let _worker = s.worker().await;
    let (mallory, bob) = (gw.register("mallory").await, gw.register("bob").await);
    let laptop = gw.login("mallory").await;
    let mut near_ws = gw.connect(&mallory, "phone").await;
    let mut far_ws = Ws::connect(&far.ws_url(), &laptop, "laptop").await;
    let mut b = gw.connect(&bob, "phone").await;

    let out = s.chat(&["user", "ban", "--username", "mallory"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("banned mallory"), "{out:?}");
    let t0 = tokio::time::Instant::now();
    wait_for("the ban ends mallory's tokens on every node", WITHIN, || async {
        let near = gw.get(&mallory.token, "/v1/conversations").await;
        let far_answer = far.get(&laptop, "/v1/conversations").await;
        (near.0 == 401 && far_answer.0 == 401 && near.1["error"]["code"] == "session_ended").then_some(())
    })
    .await;
    for ws in [&mut near_ws, &mut far_ws] {
        assert!(!ws.arrives_within(WITHIN.saturating_sub(t0.elapsed()), |_| false).await);
        assert_eq!(ws.closed, Some(1008), "an open socket of a banned user closes with 1008");
    }
    // Log-ins: refused with the right password only (a wrong one says nothing of the ban).
    let login = |password: &'static str| {
        let gw = &gw;
        async move {
            let r = gw.http.post(format!("{}/v1/sessions", gw.url)).json(&json!({"username": "mallory", "password": password})).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, e) = login("correct horse battery").await;
    assert_eq!((st, e["error"]["code"].as_str()), (403, Some("account_banned")), "{e}");
    let (st, e) = login("not her password at all").await;
    assert_eq!((st, e["error"]["code"].as_str()), (401, Some("invalid_credentials")), "{e}");
    // bob is not affected.
    b.send_text(&mallory.id, "b-1", "still here").await;

    let out = s.chat(&["user", "unban", "--username", "mallory"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = gw.login("mallory").await;
    assert_eq!(far.get(&fresh, "/v1/conversations").await.0, 200);
    let out = s.chat(&["user", "ban", "--username", "nobody-like-this"]).await;
    assert!(!out.status.success(), "banning an unknown user fails");
    // Both are in the log.
    let events = wait_for("user.banned and user.unbanned in the log", T, || async {
        let v: Vec<String> = s
            .read_topic(chat_events::TopicKind::Users)
            .into_iter()
            .filter(|e| e["data"]["user_id"] == json!(mallory.id) && e["type"].as_str().is_some_and(|t| t.ends_with("banned")))
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        (v.len() == 2).then_some(v)
    })
    .await;
    assert_eq!(events, vec!["user.banned", "user.unbanned"]);
}

//! The conformance suite of the table-store boundary: what every [`Tables`] back-end must do,
//! run against Cassandra/ScyllaDB ([`crate::ScyllaStore`], in `tests/e2e/conformance.rs`) and
//! SQLite ([`crate::SqliteStore`], in `crates/store/tests/conformance.rs`), so the two cannot
//! drift. Cargo feature `conformance`.
//!
//! Every case takes a store and panics with a message naming the broken rule. Cases use fresh
//! random ids, so they do not see each other's rows (analytics sets are per day for every user,
//! so each analytics case writes days of its own); [`checksums_and_truncate`] empties the
//! projection tables and so must not run beside another case. [`run_all`] runs them in order on
//! a fresh store (a new keyspace, a new directory).
//!
//! Times are whole milliseconds: that is what both back-ends keep.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use chat_events::{ConversationId, EventId, GroupId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, Days, NaiveDate, Utc};
use uuid::Uuid;

use crate::{
    Write, WriteExt,
    bucket_of, Account, FanoutGroup, FanoutMessage, GroupMemberRow, GroupRow, InboxRow, MemberInterval, MessageCount, MessageCountKey, MessageMeta,
    BlockRow, MessageRow, PrivacyRow, ProfileRow, ProfileViews, Reaction, ReceiptRow, SendRecord, StoreError, StreamMark, StreamRow, Tables, TopicCount,
    UserGroupRow, PROJECTION_TABLES,
};

/// 2024-05-01T00:00:00Z: the start of a day bucket.
const DAY0_MS: i64 = 1_714_521_600_000;
const DAY_MS: i64 = 86_400_000;

/// Runs every case, in order.
pub async fn run_all(tables: Arc<dyn Tables>) {
    let t = &*tables;
    ping_answers(t).await;
    checksums_and_truncate(t).await;
    accounts(t).await;
    send_records(t).await;
    media_objects(t).await;
    history(t).await;
    message_changes(t).await;
    withheld_messages(t).await;
    inbox(t).await;
    stream_heads(t).await;
    receipts(t).await;
    stream(t).await;
    stream_rows_appear_in_order(t).await;
    media_positions(t).await;
    unread(t).await;
    last_seen(t).await;
    zero_limits(t).await;
    fanout_groups(t).await;
    fanout_member_intervals(t).await;
    fanout_messages(t).await;
    fanout_acks(t).await;
    fanout_read_markers(t).await;
    fanout_watermarks(t).await;
    group_rows_highest_position_wins(t).await;
    user_group_intervals(t).await;
    roles(t).await;
    revocations(t).await;
    profiles_latest_wins(t).await;
    privacy_latest_wins(t).await;
    blocks_latest_wins(t).await;
    message_counts(t).await;
    active_users(t).await;
    profile_views(t).await;
    topic_counts(t).await;
    receipts_of_user(t).await;
}

/// The first of a few days that only the analytics case `slot` (0, 1, 2, ...) writes: analytics
/// sets are per day for every user, so cases keep apart by day, and runs on one store by a random
/// base (some time in the 22nd to 27th centuries).
fn case_day(slot: u64) -> NaiveDate {
    static BASE: OnceLock<NaiveDate> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let start = NaiveDate::from_ymd_opt(2100, 1, 1).expect("a valid date");
        start + Days::new((Uuid::new_v4().as_u128() % 200_000) as u64)
    });
    base + Days::new(slot * 100)
}

fn plus_days(d: NaiveDate, n: u64) -> NaiveDate {
    d + Days::new(n)
}

/// A UUIDv7 message id minted at the start of `day` plus `ms`.
fn msg_on(day: NaiveDate, ms: i64) -> MessageId {
    let start = day.and_hms_opt(0, 0, 0).expect("a valid time").and_utc().timestamp_millis();
    msg_id(start + ms)
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("a valid time")
}

/// A UUIDv7 message id minted at `ms`.
fn msg_id(ms: i64) -> MessageId {
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, ((ms % 1000) * 1_000_000) as u32);
    MessageId(Uuid::new_v7(ts))
}

fn direct() -> (UserId, UserId, ConversationId) {
    let (a, b) = (UserId::random(), UserId::random());
    (a, b, ConversationId::direct(a, b))
}

/// A fresh group conversation.
fn group() -> ConversationId {
    ConversationId::group(GroupId::random())
}

fn message(conv: &ConversationId, sender: UserId, ms: i64, n: usize) -> MessageRow {
    MessageRow {
        conversation_id: conv.clone(),
        message_id: msg_id(ms),
        sender,
        sender_device: "phone".into(),
        client_msg_id: format!("cm-{n}"),
        kind: "text".into(),
        body: format!("héllo ✓ {n}"),
        sent_at: at(ms),
        position: 1_000 + n as i64,
        // Every third message carries an attachment, which must come back as written.
        media: n.is_multiple_of(3).then(|| chat_events::MediaAttachment {
            media_id: uuid::Uuid::from_u128(n as u128 + 1),
            content_type: "image/png".into(),
            size: 1_000 + n as u64,
            width: Some(640),
            height: None,
            duration_ms: Some(n as u64),
        }),
        edited_at: None,
        deleted: false,
        // Most messages reply to another; every third mentions two members: both come back.
        reply_to: (!n.is_multiple_of(4)).then(|| msg_id(ms - 1_000)),
        mentions: if n.is_multiple_of(3) { vec![UserId(uuid::Uuid::from_u128(0x77 + n as u128)), sender] } else { Vec::new() },
        reactions: Vec::new(),
        my_reaction: None,
        withheld: false,
    }
}

/// Media objects read back as written; `public` flips once; shares are a set per object.
pub async fn media_objects(t: &dyn Tables) {
    let id = uuid::Uuid::new_v4();
    assert_eq!(t.media(id).await.expect("media"), None, "an unknown media object");
    let m = crate::MediaObject {
        media_id: id,
        uploader: UserId::random(),
        kind: "video".into(),
        content_type: "video/mp4".into(),
        size: 6 << 20,
        sha256: "ab".repeat(32),
        created_at: at(DAY0_MS + 3),
        public: false,
    };
    t.put_media(&m).await.expect("put_media");
    assert_eq!(t.media(id).await.expect("media"), Some(m.clone()), "put_media reads back");
    t.set_media_public(id).await.expect("set_media_public");
    assert_eq!(t.media(id).await.expect("media").map(|x| x.public), Some(true), "set_media_public");
    assert!(t.media_shares(id).await.expect("media_shares").is_empty(), "no shares yet");
    let (c1, c2) = (group(), group());
    for c in [&c1, &c2, &c1] {
        t.share_media(id, c).await.expect("share_media");
    }
    let mut got = t.media_shares(id).await.expect("media_shares");
    got.sort();
    let mut want = vec![c1, c2];
    want.sort();
    assert_eq!(got, want, "shares are a set");
}

fn ids(rows: &[MessageRow]) -> Vec<MessageId> {
    rows.iter().map(|r| r.message_id).collect()
}

/// `ping` is true for a working store.
pub async fn ping_answers(t: &dyn Tables) {
    assert!(t.ping().await, "ping: a working store must answer true");
}

/// Usernames: of 8 concurrent claims of one name exactly one wins; the winner reads back by
/// name and by id; removing a loser's claim changes nothing; removing the winner's frees the name.
pub async fn accounts(t: &dyn Tables) {
    let name = format!("user-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let claims: Vec<Account> = (0..8)
        .map(|i| Account {
            user_id: UserId::random(),
            username: name.clone(),
            password_hash: format!("$argon2id$hash-{i}"),
            created_at: at(DAY0_MS + i),
        })
        .collect();
    let results = futures::future::join_all(claims.iter().map(|a| t.create_account(a))).await;
    let won: Vec<&Account> =
        claims.iter().zip(results).filter_map(|(a, r)| r.unwrap_or_else(|e| panic!("create_account: {e}")).then_some(a)).collect();
    assert_eq!(won.len(), 1, "of 8 concurrent create_account of one name exactly one must win, {} did", won.len());
    let winner = won[0];
    let check_winner = |got: Option<Account>, what: &str| {
        let got = got.unwrap_or_else(|| panic!("{what}: account_by_name must find the winner"));
        assert_eq!(got.user_id, winner.user_id, "{what}: account_by_name returns the winner's user id");
        assert_eq!(got.username, name);
        assert_eq!(got.password_hash, winner.password_hash, "{what}: account_by_name returns the winner's password hash");
        assert_eq!(got.created_at, winner.created_at, "{what}: account_by_name returns the winner's created_at");
    };
    check_winner(t.account_by_name(&name).await.expect("account_by_name"), "after the claims");
    assert_eq!(t.account_by_id(winner.user_id).await.expect("account_by_id"), Some(name.clone()), "account_by_id of the winner");
    for a in claims.iter().filter(|a| a.user_id != winner.user_id) {
        assert_eq!(t.account_by_id(a.user_id).await.expect("account_by_id"), None, "a losing claim must leave no account by id");
    }
    assert!(t.account_by_name(&format!("{name}-nobody")).await.expect("account_by_name").is_none(), "unknown name");
    assert!(!t.create_account(winner).await.expect("create_account"), "claiming a taken name again (even by its holder) loses");

    let loser = claims.iter().find(|a| a.user_id != winner.user_id).expect("a loser");
    t.remove_account(loser).await.expect("remove_account");
    check_winner(t.account_by_name(&name).await.expect("account_by_name"), "remove_account of a losing claim must not free the name");
    assert_eq!(t.account_by_id(winner.user_id).await.expect("account_by_id"), Some(name.clone()));

    t.remove_account(winner).await.expect("remove_account");
    assert!(t.account_by_name(&name).await.expect("account_by_name").is_none(), "remove_account frees the name");
    assert_eq!(t.account_by_id(winner.user_id).await.expect("account_by_id"), None, "remove_account removes the id");
    let again = Account { user_id: UserId::random(), username: name.clone(), password_hash: "h".into(), created_at: at(DAY0_MS) };
    assert!(t.create_account(&again).await.expect("create_account"), "a freed name can be claimed again");
    assert_eq!(t.account_by_name(&name).await.expect("account_by_name").map(|a| a.user_id), Some(again.user_id));
}

/// Accepted sends: read back per (conversation, sender, client_msg_id); of two records of one key
/// the one at the lower position stays, whatever the order they are written in (a replay writes
/// the same values); another conversation, sender or id is another key.
pub async fn send_records(t: &dyn Tables) {
    let (sender, peer, conv) = direct();
    let first = SendRecord {
        conversation_id: conv.clone(),
        sender,
        client_msg_id: "c-1".into(),
        message_id: msg_id(DAY0_MS + 1),
        sent_at: at(DAY0_MS + 1),
        content_sha256: "a".repeat(64),
        position: 7,
    };
    assert_eq!(t.send_record(&conv, sender, "c-1").await.expect("send_record"), None, "send_record before any");
    let later = SendRecord { message_id: msg_id(DAY0_MS + 2), sent_at: at(DAY0_MS + 2), position: 9, ..first.clone() };
    t.put_send_records(std::slice::from_ref(&later)).await.expect("put_send_records");
    t.put_send_records(std::slice::from_ref(&first)).await.expect("put_send_records");
    t.put_send_records(&[later.clone(), first.clone()]).await.expect("put_send_records again");
    assert_eq!(t.send_record(&conv, sender, "c-1").await.expect("send_record"), Some(first.clone()), "the lower position stays, in any order");
    let migrated = SendRecord { position: -1, message_id: msg_id(DAY0_MS), ..first.clone() };
    t.put_send_records(std::slice::from_ref(&migrated)).await.expect("put_send_records");
    assert_eq!(t.send_record(&conv, sender, "c-1").await.expect("send_record"), Some(migrated), "a record from before positions (-1) wins over any");

    let other_conv = ConversationId::direct(sender, UserId::random());
    assert_eq!(t.send_record(&other_conv, sender, "c-1").await.expect("send_record"), None, "another conversation is another key");
    assert_eq!(t.send_record(&conv, peer, "c-1").await.expect("send_record"), None, "another sender is another key");
    assert_eq!(t.send_record(&conv, sender, "c-2").await.expect("send_record"), None, "another client_msg_id is another key");
}

/// History: newest-first pages with `before` across two day buckets, `find_message`.
/// Another message id than `m`'s.
fn b_message(m: &MessageRow) -> MessageId {
    MessageId(uuid::Uuid::from_u128(m.message_id.0.as_u128() ^ 1))
}

/// Edits and deletes of a message: the last edit's text, a delete for good (its body and media
/// gone, whatever is applied after it), and the `stream_messages` rows a delete reads.
pub async fn message_changes(t: &dyn Tables) {
    let (a, b, conv) = direct();
    let m = message(&conv, a, DAY0_MS + 5_000, 3);
    assert!(m.media.is_some(), "the fixture carries media");
    let at = |s: i64| DateTime::from_timestamp_millis(DAY0_MS + s * 1000).unwrap_or_default();
    let edit = |body: &str, s: i64| Write::MessageEdited { conversation: conv.clone(), message: m.message_id, body: body.into(), at: at(s) };
    let read = || async { t.history_page(&conv, None, 10).await.expect("history_page").into_iter().next().expect("the message") };
    // An edit of a message not in history writes nothing.
    t.apply(vec![edit("early", 1)]).await.expect("apply");
    assert!(t.history_page(&conv, None, 10).await.expect("history_page").is_empty(), "no row from an edit alone");
    t.put_message(&m).await.expect("put_message");
    let secret = format!("second {}", uuid::Uuid::new_v4());
    t.apply(vec![edit("first", 10), edit(&secret, 20)]).await.expect("apply");
    let row = read().await;
    assert_eq!((row.body.as_str(), row.edited_at, row.deleted), (secret.as_str(), Some(at(20)), false), "the last edit of a list counts");
    let found = t.tables_containing(&secret).await.expect("tables_containing");
    assert_eq!(found, BTreeMap::from([("messages".to_owned(), 1)]), "tables_containing finds the text");
    // The message item applied again (a redelivery) keeps the edit.
    t.put_message(&m).await.expect("put_message");
    assert_eq!(read().await.body, secret, "a message written again never undoes an edit");
    // The edit history: versions by time, written in any order, each once.
    let version = |s: i64, body: &str| Write::MessageVersion { message: m.message_id, at: at(s), body: body.into() };
    t.apply(vec![version(20, &secret), version(0, "as sent"), version(10, "first"), version(20, &secret)]).await.expect("apply");
    assert_eq!(
        t.message_versions(m.message_id).await.expect("message_versions"),
        vec![(at(0), "as sent".to_owned()), (at(10), "first".to_owned()), (at(20), secret.clone())]
    );
    assert!(t.message_versions(b_message(&m)).await.expect("message_versions").is_empty());
    t.apply(vec![version(30, "in the same list as the delete"), Write::MessageDeleted { conversation: conv.clone(), message: m.message_id }])
        .await
        .expect("apply");
    assert!(t.message_versions(m.message_id).await.expect("message_versions").is_empty(), "a delete removes every version");
    let row = read().await;
    assert!(
        row.deleted && row.body.is_empty() && row.media.is_none() && row.edited_at.is_none() && row.reply_to.is_none() && row.mentions.is_empty(),
        "a deleted message keeps no body, media, edit time, reply or mentions: {row:?}"
    );
    assert!(t.tables_containing(&secret).await.expect("tables_containing").is_empty(), "the deleted text is in no table");
    t.put_message(&m).await.expect("put_message");
    t.apply(vec![edit("after", 30)]).await.expect("apply");
    let row = read().await;
    assert!(row.deleted && row.body.is_empty() && row.media.is_none(), "deleted stays deleted: {row:?}");
    assert_eq!(row.sender, a, "the rest of the row stays");

    // Where a message sits in a user's stream, by seq; per user and message.
    let sm = |user, message: MessageId, seq, deleted: bool| Write::StreamMessage { user, message, seq, mark: if deleted { StreamMark::Deleted } else { StreamMark::Message } };
    let other = msg_id(DAY0_MS + 6_000);
    t.apply(vec![sm(b, m.message_id, 40, false), sm(b, m.message_id, 7, false), sm(b, other, 8, false), sm(a, m.message_id, 9, false)])
        .await
        .expect("apply");
    t.apply(vec![sm(b, m.message_id, 41, true), sm(b, m.message_id, 7, false)]).await.expect("apply");
    assert_eq!(
        t.stream_messages(b, m.message_id).await.expect("stream_messages"),
        vec![(7, StreamMark::Message), (40, StreamMark::Message), (41, StreamMark::Deleted)]
    );
    assert_eq!(t.stream_messages(a, m.message_id).await.expect("stream_messages"), vec![(9, StreamMark::Message)]);
    t.apply(vec![Write::StreamMessage { user: a, message: m.message_id, seq: 12, mark: StreamMark::Hidden }]).await.expect("apply");
    assert_eq!(t.stream_messages(a, m.message_id).await.expect("stream_messages"), vec![(9, StreamMark::Message), (12, StreamMark::Hidden)]);

    // What a user deleted for themselves, by conversation and id range (both ends included).
    let ids: Vec<MessageId> = (0..4).map(|i| msg_id(DAY0_MS + 7_000 + i)).collect();
    let (_, _, conv2) = direct();
    let hide = |user, conversation: &ConversationId, message| Write::HiddenMessage { user, conversation: conversation.clone(), message };
    t.apply(vec![hide(b, &conv, ids[0]), hide(b, &conv, ids[2]), hide(b, &conv, ids[3]), hide(b, &conv, ids[2]), hide(a, &conv, ids[1]), hide(b, &conv2, ids[1])])
        .await
        .expect("apply");
    let mut got = t.hidden_messages(b, &conv, ids[0], ids[2]).await.expect("hidden_messages");
    got.sort();
    assert_eq!(got, vec![ids[0], ids[2]], "per user and conversation, both ends included");
    assert_eq!(t.hidden_messages(a, &conv, ids[0], ids[3]).await.expect("hidden_messages"), vec![ids[1]]);
    assert!(t.stream_messages(a, other).await.expect("stream_messages").is_empty());

    // Reactions: one per user and message, the highest seq wins in any order; taken back is none.
    let react = |user, message, emoji: Option<&str>, seq| Write::Reaction { conversation: conv.clone(), message, user, emoji: emoji.map(str::to_owned), seq };
    t.apply(vec![react(a, ids[0], Some("👍"), 5), react(b, ids[0], Some("❤️"), 9), react(b, ids[0], Some("😂"), 3)]).await.expect("apply");
    t.apply(vec![react(a, ids[1], Some("👍"), 6), react(a, ids[0], Some("🔥"), 4), react(a, ids[3], Some("👍"), 2)]).await.expect("apply");
    t.apply(vec![react(a, ids[3], None, 7), react(a, ids[3], Some("👍"), 2)]).await.expect("apply");
    let mut got = t.reactions(&conv, &[ids[0], ids[1], ids[3]], 100).await.expect("reactions");
    got.sort_by_key(|r| (r.message_id, r.user));
    let mut want = vec![
        Reaction { message_id: ids[0], user: a, emoji: "👍".into() },
        Reaction { message_id: ids[0], user: b, emoji: "❤️".into() },
        Reaction { message_id: ids[1], user: a, emoji: "👍".into() },
    ];
    want.sort_by_key(|r| (r.message_id, r.user));
    assert_eq!(got, want, "the latest reaction of each user, none where taken back");
    assert!(t.reactions(&conv2, &[ids[0], ids[1]], 100).await.expect("reactions").is_empty(), "per conversation");
    assert_eq!(t.reactions(&conv, &[ids[1]], 100).await.expect("reactions").len(), 1, "one message");
}

/// A message withheld from its recipient (a block) reads back withheld from history, through an
/// edit and a delete for everyone; a message not withheld reads back as not.
pub async fn withheld_messages(t: &dyn Tables) {
    let (a, _, conv) = direct();
    let normal = message(&conv, a, DAY0_MS + 9_000, 1);
    let held = MessageRow { withheld: true, ..message(&conv, a, DAY0_MS + 9_001, 3) };
    assert!(held.media.is_some() && !held.mentions.is_empty(), "the fixture carries media and mentions");
    t.put_message(&normal).await.expect("put_message");
    t.put_message(&held).await.expect("put_message");
    assert_eq!(
        t.history_page(&conv, None, 10).await.expect("history_page"),
        vec![held.clone(), normal.clone()],
        "a withheld message reads back withheld, every other field intact; a normal one not withheld"
    );
    let c = &conv;
    let read = |id: MessageId| async move {
        t.history_page(c, None, 10).await.expect("history_page").into_iter().find(|m| m.message_id == id).expect("the message")
    };
    let at = |s: i64| DateTime::from_timestamp_millis(DAY0_MS + s * 1000).unwrap_or_default();
    t.apply(vec![Write::MessageEdited { conversation: conv.clone(), message: held.message_id, body: "edited".into(), at: at(10) }]).await.expect("apply");
    let row = read(held.message_id).await;
    assert!(row.withheld && row.body == "edited", "an edit keeps a message withheld: {row:?}");
    t.apply(vec![Write::MessageDeleted { conversation: conv.clone(), message: held.message_id }]).await.expect("apply");
    let row = read(held.message_id).await;
    assert!(row.withheld && row.deleted && row.body.is_empty() && row.media.is_none(), "a delete for everyone keeps a message withheld: {row:?}");
    // The message item applied again changes nothing.
    t.put_message(&held).await.expect("put_message");
    let row = read(held.message_id).await;
    assert!(row.withheld && row.deleted, "deleted and withheld stay: {row:?}");
    t.apply(vec![Write::MessageDeleted { conversation: conv.clone(), message: normal.message_id }]).await.expect("apply");
    let row = read(normal.message_id).await;
    assert!(!row.withheld && row.deleted, "a delete does not withhold a message: {row:?}");
}

pub async fn history(t: &dyn Tables) {
    let (a, b, conv) = direct();
    let (_, _, other) = direct();
    // Five messages late on day 0, five early on day 1: two buckets.
    let rows: Vec<MessageRow> = (0..10)
        .map(|i| {
            let ms = if i < 5 { DAY0_MS + 20 * 3_600_000 + i as i64 * 60_000 } else { DAY0_MS + DAY_MS + 3_600_000 + i as i64 * 60_000 };
            message(&conv, if i % 2 == 0 { a } else { b }, ms, i)
        })
        .collect();
    assert_eq!(bucket_of(rows[4].message_id) + 1, bucket_of(rows[5].message_id), "the fixture spans two day buckets");
    // Another conversation's messages in the same buckets must never show up.
    let noise: Vec<MessageRow> = [DAY0_MS + 20 * 3_600_000 + 90_000, DAY0_MS + DAY_MS + 3_600_000 + 390_000]
        .iter()
        .enumerate()
        .map(|(i, ms)| message(&other, a, *ms, 100 + i))
        .collect();
    // Written out of order, one of them twice.
    for i in [7, 2, 9, 0, 5, 3, 8, 1, 6, 4, 7] {
        t.put_message(&rows[i]).await.expect("put_message");
    }
    for n in &noise {
        t.put_message(n).await.expect("put_message");
    }

    let newest_first: Vec<MessageRow> = rows.iter().rev().cloned().collect();
    let c = &conv;
    let page = |before: Option<MessageId>, limit: usize| async move {
        t.history_page(c, before, limit).await.unwrap_or_else(|e| panic!("history_page: {e}"))
    };
    let p1 = page(None, 4).await;
    assert_eq!(p1, newest_first[0..4], "history_page(None, 4) is the 4 newest messages, newest first, every field intact");
    let p2 = page(Some(p1[3].message_id), 4).await;
    assert_eq!(ids(&p2), ids(&newest_first[4..8]), "history_page with `before` continues strictly older, across the day bucket boundary");
    let p3 = page(Some(p2[3].message_id), 4).await;
    assert_eq!(ids(&p3), ids(&newest_first[8..10]), "the last page holds what is left");
    assert!(page(Some(p3[1].message_id), 4).await.is_empty(), "history_page before the oldest message is empty");
    assert_eq!(page(None, 100).await, newest_first, "history_page(None, 100) is the whole history, newest first");
    let between = msg_id(rows[6].sent_at.timestamp_millis() + 30_000);
    assert_eq!(
        ids(&page(Some(between), 100).await),
        ids(&newest_first[3..]),
        "history_page before an id that is not a message: everything strictly older"
    );
    assert_eq!(ids(&page(Some(msg_id(DAY0_MS + 10 * DAY_MS)), 3).await), ids(&newest_first[0..3]), "before a later id");

    let meta = MessageMeta {
        message_id: rows[3].message_id,
        conversation_id: conv.clone(),
        sender: rows[3].sender,
        sent_at: rows[3].sent_at,
        position: rows[3].position,
    };
    assert_eq!(t.find_message(rows[3].message_id).await.expect("find_message"), Some(meta), "find_message");
    assert_eq!(t.find_message(between).await.expect("find_message"), None, "find_message of an unknown id");
}

fn sorted_inbox(mut rows: Vec<InboxRow>) -> Vec<InboxRow> {
    rows.sort_by(|x, y| x.conversation_id.cmp(&y.conversation_id));
    rows
}

/// Inbox rows read back whole (applied offset included), list per user, overwrite.
pub async fn inbox(t: &dyn Tables) {
    let (u, p, c1) = direct();
    let c2 = ConversationId::direct(u, UserId::random());
    assert_eq!(t.inbox_row(u, &c1).await.expect("inbox_row"), None, "inbox_row before any write");
    assert!(!t.in_inbox(u, &c1).await.expect("in_inbox"), "in_inbox before any write");
    assert!(t.inbox(u, 10).await.expect("inbox").is_empty(), "inbox of a new user");
    let row1 = InboxRow {
        user_id: u,
        conversation_id: c1.clone(),
        peer_id: Some(p),
        last_message_id: msg_id(DAY0_MS + 100),
        last_sender: p,
        last_kind: "text".into(),
        last_body: "héllo ✓".into(),
        last_at: at(DAY0_MS + 100),
        unread: 3,
        first_unread_seq: Some(12),
        read_up_to: Some(msg_id(DAY0_MS + 50)),
        applied_offset: 17,
        wrote: false,
        mentions: 0,
    };
    let row2 = InboxRow {
        conversation_id: c2.clone(),
        peer_id: None,
        last_message_id: msg_id(DAY0_MS + 200),
        last_sender: u,
        last_at: at(DAY0_MS + 200),
        unread: 0,
        first_unread_seq: None,
        read_up_to: None,
        applied_offset: 0,
        wrote: true,
        mentions: 2,
        ..row1.clone()
    };
    t.put_inbox_row(&row1).await.expect("put_inbox_row");
    t.put_inbox_row(&row2).await.expect("put_inbox_row");
    assert_eq!(t.inbox_row(u, &c1).await.expect("inbox_row"), Some(row1.clone()), "inbox_row reads back every field");
    assert_eq!(t.inbox_row(u, &c2).await.expect("inbox_row"), Some(row2.clone()), "inbox_row with no peer reads back");
    assert!(t.in_inbox(u, &c1).await.expect("in_inbox"), "in_inbox after put_inbox_row");
    assert!(!t.in_inbox(p, &c1).await.expect("in_inbox"), "in_inbox is per user: the peer has no row");
    assert_eq!(
        sorted_inbox(t.inbox(u, 10).await.expect("inbox")),
        sorted_inbox(vec![row1.clone(), row2.clone()]),
        "inbox lists the user's rows"
    );
    assert_eq!(t.inbox(u, 1).await.expect("inbox").len(), 1, "inbox honours its limit");
    assert!(t.inbox(p, 10).await.expect("inbox").is_empty(), "another user's inbox is separate");

    let newer = InboxRow { last_message_id: msg_id(DAY0_MS + 300), last_at: at(DAY0_MS + 300), unread: 4, applied_offset: 18, ..row1 };
    t.put_inbox_row(&newer).await.expect("put_inbox_row");
    assert_eq!(t.inbox_row(u, &c1).await.expect("inbox_row"), Some(newer), "put_inbox_row overwrites the row");
    assert_eq!(t.inbox(u, 10).await.expect("inbox").len(), 2, "an overwrite adds no row");
}

/// Stream heads: per (user, source partition), the highest position written stays, in any
/// order.
pub async fn stream_heads(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    assert_eq!(t.stream_head(u, 3).await.expect("stream_head"), None, "stream_head before any write");
    let head = |user, partition, position| Write::StreamHead { user, source_partition: partition, position };
    t.apply(vec![head(u, 3, 70), head(u, 3, 50)]).await.expect("apply");
    t.apply(vec![head(u, 3, 60)]).await.expect("apply");
    t.apply(vec![head(u, 4, 5), head(v, 3, 9)]).await.expect("apply");
    assert_eq!(t.stream_head(u, 3).await.expect("stream_head"), Some(70), "the highest position stays, in any order");
    assert_eq!(t.stream_head(u, 4).await.expect("stream_head"), Some(5), "heads are per source partition");
    assert_eq!(t.stream_head(v, 3).await.expect("stream_head"), Some(9), "heads are per user");
    t.apply(vec![head(u, 3, 71)]).await.expect("apply");
    assert_eq!(t.stream_head(u, 3).await.expect("stream_head"), Some(71));
}

fn receipt(m: MessageId, r: UserId, status: ReceiptStatus, device: &str, ms: i64, c: &ConversationId) -> ReceiptRow {
    let sender = c.peer_of(r).unwrap_or(UserId(uuid::Uuid::from_u128(0x5e4d)));
    ReceiptRow { message_id: m, sender, recipient: r, status, device_id: device.into(), at: at(ms), conversation_id: c.clone() }
}

fn sorted_receipts(mut rows: Vec<ReceiptRow>) -> Vec<ReceiptRow> {
    rows.sort_by(|x, y| (x.recipient, x.status.as_str(), &x.device_id).cmp(&(y.recipient, y.status.as_str(), &y.device_id)));
    rows
}

/// Receipts: a message's timeline reads one transition per (recipient, status, device), in time
/// order; of two writes of one key the earliest `at` is the transition, in either write order,
/// also within one call.
pub async fn receipts(t: &dyn Tables) {
    let (sender, r, c) = direct();
    let m = msg_id(DAY0_MS + 1_000);
    let other = msg_id(DAY0_MS + 2_000);
    let (t1, t2, t3) = (DAY0_MS + 10_000, DAY0_MS + 20_000, DAY0_MS + 30_000);
    let put = |rows: Vec<ReceiptRow>| async move { t.put_receipts(&rows).await.unwrap_or_else(|e| panic!("put_receipts: {e}")) };
    // Later first, then earlier.
    put(vec![receipt(m, r, ReceiptStatus::Delivered, "phone", t2, &c)]).await;
    put(vec![receipt(m, r, ReceiptStatus::Delivered, "phone", t1, &c)]).await;
    // Earlier first, then later.
    put(vec![receipt(m, r, ReceiptStatus::Seen, "phone", t1, &c)]).await;
    put(vec![receipt(m, r, ReceiptStatus::Seen, "phone", t2, &c)]).await;
    // The same row twice, and another device.
    put(vec![receipt(m, r, ReceiptStatus::Delivered, "laptop", t3, &c)]).await;
    put(vec![receipt(m, r, ReceiptStatus::Delivered, "laptop", t3, &c)]).await;
    // Both times of one key in one call, later first.
    put(vec![receipt(m, sender, ReceiptStatus::Sent, "", t2, &c), receipt(m, sender, ReceiptStatus::Sent, "", t1, &c)]).await;
    put(vec![receipt(other, r, ReceiptStatus::Delivered, "phone", t1, &c)]).await;

    let want = sorted_receipts(vec![
        receipt(m, r, ReceiptStatus::Delivered, "phone", t1, &c),
        receipt(m, r, ReceiptStatus::Seen, "phone", t1, &c),
        receipt(m, r, ReceiptStatus::Delivered, "laptop", t3, &c),
        receipt(m, sender, ReceiptStatus::Sent, "", t1, &c),
    ]);
    let timeline = t.receipts(m).await.expect("receipts");
    assert!(timeline.windows(2).all(|w| w[0].at <= w[1].at), "receipts come in time order: {timeline:?}");
    let got = sorted_receipts(timeline);
    assert_eq!(got, want, "receipts: one row per (message, recipient, status, device), the earliest `at` wins whatever the write order");
    assert_eq!(t.receipts(other).await.expect("receipts").len(), 1, "receipts are per message");
    assert!(t.receipts(msg_id(DAY0_MS)).await.expect("receipts").is_empty(), "receipts of an unknown message");
}

/// Streams: items by seq, in order, with a limit; the item-id index.
pub async fn stream(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    let rows: Vec<StreamRow> = (1..=5)
        .map(|seq| StreamRow { seq, item_id: Uuid::new_v4(), item: format!("{{\"kind\":\"message\",\"n\":{seq},\"body\":\"✓\"}}") })
        .collect();
    for i in [2, 0, 4, 1, 3, 1] {
        t.put_stream_item(u, &rows[i]).await.expect("put_stream_item");
    }
    t.put_stream_item(v, &StreamRow { seq: 1, item_id: rows[0].item_id, item: "{}".into() }).await.expect("put_stream_item");

    let after =
        |after: i64, limit: usize| async move { t.stream_after(u, after, limit).await.unwrap_or_else(|e| panic!("stream_after: {e}")) };
    assert_eq!(after(0, 10).await, rows, "stream_after(0) is every item, in seq order, intact");
    assert_eq!(after(2, 2).await, rows[2..4], "stream_after(2, limit 2) is seq 3 and 4");
    assert!(after(5, 10).await.is_empty(), "stream_after the last seq is empty");
    assert_eq!(t.stream_after(v, 0, 10).await.expect("stream_after").len(), 1, "streams are per user");
}

/// A user's stream rows of one apply become visible in seq order: a reader polling while they
/// are written never sees a row above a missing one (the sync cursor would pass the hole for
/// good). Three users' rows interleaved in one list, as a slice of a deliveries partition.
pub async fn stream_rows_appear_in_order(t: &dyn Tables) {
    let users = [UserId::random(), UserId::random(), UserId::random()];
    let per_user = 300i64;
    let body = "x".repeat(400);
    let mut writes = Vec::new();
    for seq in 0..per_user * 3 {
        let user = users[(seq % 3) as usize];
        writes.push(Write::Stream { user, row: StreamRow { seq, item_id: Uuid::new_v4(), item: format!("{{\"n\":{seq},\"b\":\"{body}\"}}") } });
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let applying = async {
        t.apply(writes).await.expect("apply");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let reading = async {
        let mut reads = 0;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let rows = t.stream_after(users[0], -1, 1000).await.expect("stream_after");
            reads += 1;
            let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
            let expected: Vec<i64> = (0..seqs.len() as i64).map(|i| i * 3).collect();
            assert_eq!(seqs, expected, "read {reads}: a row visible above a missing one");
            if finished {
                assert_eq!(seqs.len() as i64, per_user, "every row once the apply returned");
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    futures::join!(applying, reading);
}

/// The messages that carry a media object, by conversation: positions in order, a set.
pub async fn media_positions(t: &dyn Tables) {
    let media = Uuid::new_v4();
    let g1 = ConversationId::group(GroupId::random());
    let g2 = ConversationId::group(GroupId::random());
    assert!(t.media_positions(media, &g1).await.expect("media_positions").is_empty());
    let (m1, m2, m3) = (msg_id(DAY0_MS + 1), msg_id(DAY0_MS + 2), msg_id(DAY0_MS + 3));
    let w = |conv: &ConversationId, message: MessageId, position: i64| Write::MediaMessage { media, conversation: conv.clone(), message, position };
    t.apply(vec![w(&g1, m2, 40), w(&g1, m1, 12), w(&g2, m3, 5), w(&g1, m2, 40)]).await.expect("apply");
    assert_eq!(t.media_positions(media, &g1).await.expect("media_positions"), vec![12, 40]);
    assert_eq!(t.media_positions(media, &g2).await.expect("media_positions"), vec![5]);
    assert!(t.media_positions(Uuid::new_v4(), &g1).await.expect("media_positions").is_empty(), "per media object");
}

/// The welcome frame's count: the sum of a user's inbox rows' `unread`, per user, capped.
pub async fn unread(t: &dyn Tables) {
    let (u, v, c) = direct();
    let g = group();
    let count = |user: UserId, cap: usize| async move { t.unread_count(user, cap).await.unwrap_or_else(|e| panic!("unread_count: {e}")) };
    assert_eq!(count(u, 100).await, 0, "unread_count of a new user");
    let row = |user: UserId, conv: &ConversationId, unread: i32| InboxRow {
        user_id: user,
        conversation_id: conv.clone(),
        peer_id: conv.peer_of(user),
        last_message_id: msg_id(DAY0_MS),
        last_sender: v,
        last_kind: "text".into(),
        last_body: "x".into(),
        last_at: at(DAY0_MS),
        unread,
        first_unread_seq: (unread > 0).then_some(1),
        read_up_to: None,
        applied_offset: 1,
        wrote: false,
        mentions: 0,
    };
    t.put_inbox_row(&row(u, &c, 3)).await.expect("put_inbox_row");
    t.put_inbox_row(&row(u, &g, 4)).await.expect("put_inbox_row");
    t.put_inbox_row(&row(v, &c, 0)).await.expect("put_inbox_row");
    assert_eq!(count(u, 100).await, 7, "unread over the user's conversations");
    assert_eq!(count(u, 5).await, 5, "unread_count stops at its cap");
    assert_eq!(count(v, 100).await, 0, "per user");
    t.put_inbox_row(&row(u, &c, 0)).await.expect("put_inbox_row");
    assert_eq!(count(u, 100).await, 4, "a conversation read drops out");
}

/// Last seen: the latest change wins, in any order; last_seen is the latest offline time.
pub async fn last_seen(t: &dyn Tables) {
    let (t1, t2, t3) = (DAY0_MS + 1_000, DAY0_MS + 2_000, DAY0_MS + 3_000);
    // (what, presence writes (online?, at) in write order, then the expected status,
    // changed_at and last_seen)
    type Case<'a> = (&'a str, &'a [(bool, i64)], &'a str, i64, Option<i64>);
    let cases: &[Case<'_>] = &[
        ("online then a later offline", &[(true, t1), (false, t2)], "offline", t2, Some(t2)),
        ("a later offline written before an earlier online", &[(false, t2), (true, t1)], "offline", t2, Some(t2)),
        ("online then an earlier offline", &[(true, t2), (false, t1)], "online", t2, Some(t1)),
        ("offline then a later online", &[(false, t1), (true, t2)], "online", t2, Some(t1)),
        ("three offlines out of order", &[(false, t1), (false, t3), (false, t2)], "offline", t3, Some(t3)),
        ("offline, online, offline, newest first", &[(false, t3), (true, t2), (false, t1)], "offline", t3, Some(t3)),
        ("online only", &[(true, t1)], "online", t1, None),
    ];
    for (what, writes, status, changed, seen) in cases {
        let u = UserId::random();
        for (online, ms) in *writes {
            t.put_presence(u, *online, at(*ms)).await.expect("put_presence");
        }
        let got = t.last_seen(u).await.expect("last_seen").unwrap_or_else(|| panic!("last_seen ({what}): no row"));
        assert_eq!(
            (got.user_id, got.status.as_str(), got.changed_at, got.last_seen),
            (u, *status, at(*changed), seen.map(at)),
            "last_seen ({what}): the latest change wins and last_seen is the latest offline time"
        );
    }
    assert_eq!(t.last_seen(UserId::random()).await.expect("last_seen"), None, "last_seen of a user never seen");

    // An online and an offline at the same instant: the outcome must not depend on the order
    // they are written in, or a rebuild could disagree with the live projection.
    let (x, y) = (UserId::random(), UserId::random());
    t.put_presence(x, true, at(t2)).await.expect("put_presence");
    t.put_presence(x, false, at(t2)).await.expect("put_presence");
    t.put_presence(y, false, at(t2)).await.expect("put_presence");
    t.put_presence(y, true, at(t2)).await.expect("put_presence");
    let gx = t.last_seen(x).await.expect("last_seen").expect("a row");
    let gy = t.last_seen(y).await.expect("last_seen").expect("a row");
    assert_eq!(
        (&gx.status, gx.changed_at, gx.last_seen),
        (&gy.status, gy.changed_at, gy.last_seen),
        "last_seen: an online and an offline at the same time give the same row in either write order"
    );
    // Cassandra resolves two cells with one write time by value, the greater ('online') wins;
    // every back-end must agree on it.
    assert_eq!(gx.status, "online", "last_seen: of an online and an offline at the same time, online wins");
}

/// A zero limit or cap is an empty answer, not an error.
pub async fn zero_limits(t: &dyn Tables) {
    let (u, p, c) = direct();
    let row = message(&c, u, DAY0_MS + 5_000, 0);
    t.put_message(&row).await.expect("put_message");
    t.put_inbox_row(&InboxRow {
        user_id: u,
        conversation_id: c.clone(),
        peer_id: Some(p),
        last_message_id: row.message_id,
        last_sender: u,
        last_kind: "text".into(),
        last_body: "x".into(),
        last_at: row.sent_at,
        unread: 0,
        first_unread_seq: None,
        read_up_to: None,
        applied_offset: 0,
        wrote: true,
        mentions: 0,
    })
    .await
    .expect("put_inbox_row");
    t.put_stream_item(u, &StreamRow { seq: 1, item_id: Uuid::new_v4(), item: "{}".into() }).await.expect("put_stream_item");
    let ok = |what: &str, r: Result<usize, crate::StoreError>| match r {
        Ok(n) => assert_eq!(n, 0, "{what} with limit 0 returns nothing"),
        Err(e) => panic!("{what} with limit 0 must return nothing, not fail: {e}"),
    };
    ok("history_page", t.history_page(&c, None, 0).await.map(|v| v.len()));
    ok("inbox", t.inbox(u, 0).await.map(|v| v.len()));
    ok("stream_after", t.stream_after(u, 0, 0).await.map(|v| v.len()));
    ok("unread_count", t.unread_count(u, 0).await);
}

/// The fan-out's group record reads back whole and is overwritten; groups are separate.
pub async fn fanout_groups(t: &dyn Tables) {
    let (c, other) = (group(), group());
    assert_eq!(t.fanout_group(&c).await.expect("fanout_group"), None, "fanout_group of an unknown group");
    let g = FanoutGroup { conversation_id: c.clone(), name: "climbers ✓".into(), created_at: 3, membership_version: 3 };
    t.put_fanout_group(&g).await.expect("put_fanout_group");
    t.put_fanout_group(&g).await.expect("put_fanout_group is idempotent");
    assert_eq!(t.fanout_group(&c).await.expect("fanout_group"), Some(g.clone()), "fanout_group reads back every field");
    let renamed = FanoutGroup { name: "boulderers".into(), membership_version: 9, ..g };
    t.put_fanout_group(&renamed).await.expect("put_fanout_group");
    assert_eq!(t.fanout_group(&c).await.expect("fanout_group"), Some(renamed), "put_fanout_group overwrites");
    assert_eq!(t.fanout_group(&other).await.expect("fanout_group"), None, "fanout groups are per group");
}

fn interval(member: UserId, since: i64, until: Option<i64>, role: GroupRole) -> MemberInterval {
    MemberInterval { member, since, until, role }
}

fn sorted_intervals(mut v: Vec<MemberInterval>) -> Vec<MemberInterval> {
    v.sort_by_key(|m| (m.member.0, m.since));
    v
}

/// Membership intervals: keyed by (group, member, since); open then close and close then open
/// both give the closed interval; an open written again after the close does not reopen it;
/// `fanout_members` lists every interval of the group (several per member), role intact.
pub async fn fanout_member_intervals(t: &dyn Tables) {
    let (c, other) = (group(), group());
    let (a, b, d) = (UserId::random(), UserId::random(), UserId::random());
    let members = |c: ConversationId| async move { t.fanout_members(&c).await.unwrap_or_else(|e| panic!("fanout_members: {e}")) };
    let put = |m: MemberInterval| {
        let c = c.clone();
        async move { t.put_fanout_member(&c, &m).await.unwrap_or_else(|e| panic!("put_fanout_member: {e}")) }
    };
    assert!(members(c.clone()).await.is_empty(), "fanout_members of an unknown group");

    // a: open, read, then close.
    put(interval(a, 0, None, GroupRole::Admin)).await;
    assert_eq!(members(c.clone()).await, vec![interval(a, 0, None, GroupRole::Admin)], "an open interval reads back with no until");
    put(interval(a, 0, Some(5), GroupRole::Admin)).await;
    assert_eq!(members(c.clone()).await, vec![interval(a, 0, Some(5), GroupRole::Admin)], "writing until closes the interval");
    put(interval(a, 0, None, GroupRole::Admin)).await;
    assert_eq!(
        members(c.clone()).await,
        vec![interval(a, 0, Some(5), GroupRole::Admin)],
        "the open written again after the close (a replay) leaves the interval closed"
    );
    // a rejoins: a second interval of the same member.
    put(interval(a, 8, None, GroupRole::Member)).await;
    // b: the close is written before the open (a replay out of order).
    put(interval(b, 2, Some(6), GroupRole::Member)).await;
    put(interval(b, 2, None, GroupRole::Member)).await;
    // d: open, twice.
    put(interval(d, 4, None, GroupRole::Member)).await;
    put(interval(d, 4, None, GroupRole::Member)).await;
    t.put_fanout_member(&other, &interval(a, 1, None, GroupRole::Member)).await.expect("put_fanout_member");

    let want = sorted_intervals(vec![
        interval(a, 0, Some(5), GroupRole::Admin),
        interval(a, 8, None, GroupRole::Member),
        interval(b, 2, Some(6), GroupRole::Member),
        interval(d, 4, None, GroupRole::Member),
    ]);
    assert_eq!(
        sorted_intervals(members(c.clone()).await),
        want,
        "fanout_members lists every interval of the group (close before open gives the closed interval, repeats add nothing)"
    );
    assert_eq!(members(other).await, vec![interval(a, 1, None, GroupRole::Member)], "intervals are per group");

    // Several at once (a creation's members), the merge rule applied within the batch too.
    let third = group();
    let batch = [interval(b, 3, None, GroupRole::Admin), interval(d, 3, Some(9), GroupRole::Member), interval(d, 3, None, GroupRole::Member)];
    t.put_fanout_members(&third, &batch).await.expect("put_fanout_members");
    assert_eq!(
        sorted_intervals(members(third).await),
        sorted_intervals(vec![interval(b, 3, None, GroupRole::Admin), interval(d, 3, Some(9), GroupRole::Member)]),
        "put_fanout_members writes each interval, an open after its close in the same batch leaves it closed"
    );
}

fn fanout_ids(rows: &[FanoutMessage]) -> Vec<MessageId> {
    rows.iter().map(|r| r.message_id).collect()
}

/// Group messages: round trip; `fanout_messages_between` has the bounds and the order of
/// `messages_between` (after excluded, up_to included, oldest first, across days).
pub async fn fanout_messages(t: &dyn Tables) {
    let (c, other) = (group(), group());
    let (a, b) = (UserId::random(), UserId::random());
    // Three late on day 0, three early on day 1.
    let rows: Vec<FanoutMessage> = (0..6)
        .map(|i| {
            let ms = if i < 3 { DAY0_MS + 20 * 3_600_000 + i * 60_000 } else { DAY0_MS + DAY_MS + 3_600_000 + i * 60_000 };
            FanoutMessage {
                conversation_id: c.clone(),
                message_id: msg_id(ms),
                sender: if i % 2 == 0 { a } else { b },
                position: 10 + i,
                recipients: i as i32,
            }
        })
        .collect();
    let noise = FanoutMessage {
        conversation_id: other.clone(),
        message_id: msg_id(DAY0_MS + 20 * 3_600_000 + 90_000),
        sender: a,
        position: 3,
        recipients: 7,
    };
    assert_eq!(t.fanout_message(&c, rows[0].message_id).await.expect("fanout_message"), None, "fanout_message before any write");
    for i in [4, 1, 5, 0, 3, 2, 4] {
        t.put_fanout_message(&rows[i]).await.expect("put_fanout_message");
    }
    t.put_fanout_message(&noise).await.expect("put_fanout_message");
    for r in &rows {
        assert_eq!(
            t.fanout_message(&c, r.message_id).await.expect("fanout_message"),
            Some(r.clone()),
            "fanout_message reads back every field"
        );
    }
    assert_eq!(t.fanout_message(&other, rows[0].message_id).await.expect("fanout_message"), None, "fanout messages are per group");

    let cc = &c;
    let range = |after: Option<MessageId>, up_to: MessageId| async move {
        t.fanout_messages_between(cc, after, up_to).await.unwrap_or_else(|e| panic!("fanout_messages_between: {e}"))
    };
    assert_eq!(
        range(None, rows[3].message_id).await,
        rows[0..=3],
        "fanout_messages_between(None, up_to): from the start, up_to included, oldest first, intact"
    );
    assert_eq!(
        fanout_ids(&range(Some(rows[1].message_id), rows[4].message_id).await),
        fanout_ids(&rows[2..=4]),
        "fanout_messages_between(after, up_to): after excluded, up_to included, across days"
    );
    assert!(range(Some(rows[2].message_id), rows[2].message_id).await.is_empty(), "fanout_messages_between(x, x) is empty");
    assert_eq!(
        fanout_ids(&range(None, rows[5].message_id).await),
        fanout_ids(&rows),
        "fanout_messages_between(None, newest) is everything"
    );
    let between = msg_id(rows[1].message_id.unix_millis() + 30_000);
    assert_eq!(
        fanout_ids(&range(Some(between), msg_id(DAY0_MS + 10 * DAY_MS)).await),
        fanout_ids(&rows[2..]),
        "fanout_messages_between with bounds that are not messages"
    );
    assert!(range(None, msg_id(DAY0_MS)).await.is_empty(), "fanout_messages_between up to before the first message is empty");
}

/// Acknowledgements are a set per (message, status): adding one twice counts once.
pub async fn fanout_acks(t: &dyn Tables) {
    let (m, other) = (msg_id(DAY0_MS + 1), msg_id(DAY0_MS + 2));
    let (a, b) = (UserId::random(), UserId::random());
    let count =
        |m: MessageId, s: ReceiptStatus| async move { t.fanout_ack_count(m, s).await.unwrap_or_else(|e| panic!("fanout_ack_count: {e}")) };
    assert_eq!(count(m, ReceiptStatus::Delivered).await, 0, "fanout_ack_count before any ack");
    for (s, u) in [(ReceiptStatus::Delivered, a), (ReceiptStatus::Delivered, a), (ReceiptStatus::Delivered, b), (ReceiptStatus::Seen, a)] {
        t.add_fanout_ack(m, s, u).await.expect("add_fanout_ack");
    }
    t.add_fanout_ack(other, ReceiptStatus::Seen, b).await.expect("add_fanout_ack");
    assert_eq!(count(m, ReceiptStatus::Delivered).await, 2, "two members delivered (one of them acknowledged twice)");
    assert_eq!(count(m, ReceiptStatus::Seen).await, 1, "acks are counted per status");
    assert_eq!(count(m, ReceiptStatus::Sent).await, 0, "a status nobody reached counts zero");
    assert_eq!(count(other, ReceiptStatus::Seen).await, 1, "acks are per message");
}

/// The fan-out's read markers read back (with their position) and are overwritten.
pub async fn fanout_read_markers(t: &dyn Tables) {
    let (c, other) = (group(), group());
    let (u, v) = (UserId::random(), UserId::random());
    let (m1, m2) = (msg_id(DAY0_MS + 1), msg_id(DAY0_MS + 2));
    assert_eq!(t.fanout_read_marker(&c, u).await.expect("fanout_read_marker"), None, "fanout_read_marker before any write");
    t.put_fanout_read_marker(&c, u, m1, 4).await.expect("put_fanout_read_marker");
    assert_eq!(t.fanout_read_marker(&c, u).await.expect("fanout_read_marker"), Some((m1, 4)), "fanout_read_marker reads back");
    assert_eq!(t.fanout_read_marker(&c, v).await.expect("fanout_read_marker"), None, "fanout read markers are per reader");
    assert_eq!(t.fanout_read_marker(&other, u).await.expect("fanout_read_marker"), None, "fanout read markers are per group");
    t.put_fanout_read_marker(&c, u, m2, 7).await.expect("put_fanout_read_marker");
    assert_eq!(t.fanout_read_marker(&c, u).await.expect("fanout_read_marker"), Some((m2, 7)), "put_fanout_read_marker overwrites");
}

/// The fan-out's watermarks read back per (topic, partition) and are overwritten.
pub async fn fanout_watermarks(t: &dyn Tables) {
    let topic = format!("conversations-{}", UserId::random());
    assert_eq!(t.fanout_watermark(&topic, 0).await.expect("fanout_watermark"), None, "fanout_watermark before any write");
    t.put_fanout_watermark(&topic, 0, 17).await.expect("put_fanout_watermark");
    assert_eq!(t.fanout_watermark(&topic, 0).await.expect("fanout_watermark"), Some(17), "fanout_watermark reads back");
    assert_eq!(t.fanout_watermark(&topic, 1).await.expect("fanout_watermark"), None, "fanout watermarks are per partition");
    assert_eq!(t.fanout_watermark(&format!("{topic}-other"), 0).await.expect("fanout_watermark"), None, "fanout watermarks are per topic");
    t.put_fanout_watermark(&topic, 0, 40).await.expect("put_fanout_watermark");
    assert_eq!(t.fanout_watermark(&topic, 0).await.expect("fanout_watermark"), Some(40), "put_fanout_watermark overwrites");
}

/// Group projections keep, per row, the write with the highest position, in either write order;
/// a write repeated at the same position changes nothing; reads return what was written.
pub async fn group_rows_highest_position_wins(t: &dyn Tables) {
    let (creator, u, v) = (UserId::random(), UserId::random(), UserId::random());
    let unknown = group();
    assert_eq!(t.group(&unknown).await.expect("group"), None, "group of an unknown group");
    assert!(t.group_members(&unknown).await.expect("group_members").is_empty(), "group_members of an unknown group");
    assert_eq!(t.group_member(&unknown, u).await.expect("group_member"), None, "group_member of an unknown group");
    assert!(t.user_groups(UserId::random()).await.expect("user_groups").is_empty(), "user_groups of an unknown user");

    // groups: (lower, higher) written in both orders.
    for (what, higher_first) in [("lower then higher", false), ("higher then lower", true)] {
        let c = group();
        let low = GroupRow { conversation_id: c.clone(), name: "climbers".into(), creator, created_at: at(DAY0_MS + 7), position: 3 };
        let high = GroupRow { name: "bouldérers ✓".into(), position: 11, ..low.clone() };
        let order = if higher_first { [&high, &low, &high] } else { [&low, &high, &high] };
        for g in order {
            t.put_group(g).await.expect("put_group");
        }
        assert_eq!(t.group(&c).await.expect("group"), Some(high), "put_group ({what}): the highest position wins");
    }

    // Renames change only the name, keep the latest, and may arrive before the creation.
    let c = group();
    t.put_group_name(&c, "late name", 20).await.expect("put_group_name");
    assert_eq!(t.group(&c).await.expect("group"), None, "a rename alone is not a group yet");
    let created = GroupRow { conversation_id: c.clone(), name: "original".into(), creator, created_at: at(DAY0_MS + 9), position: 5 };
    t.put_group(&created).await.expect("put_group");
    t.put_group_name(&c, "older rename", 10).await.expect("put_group_name");
    assert_eq!(
        t.group(&c).await.expect("group"),
        Some(GroupRow { name: "late name".into(), ..created.clone() }),
        "the latest rename wins over the creation's name and an older rename, in any order"
    );
    t.put_group_name(&c, "newest", 30).await.expect("put_group_name");
    assert_eq!(t.group(&c).await.expect("group").map(|g| g.name), Some("newest".to_owned()), "a later rename wins");

    // group_members: member u in both orders, member v written once, in one group.
    let c = group();
    let member = |m: UserId, role: GroupRole, active: bool, position: i64| GroupMemberRow {
        conversation_id: c.clone(),
        member: m,
        role,
        active,
        position,
    };
    for w in [member(u, GroupRole::Admin, false, 9), member(u, GroupRole::Member, true, 2)] {
        t.put_group_member(&w).await.expect("put_group_member");
    }
    assert_eq!(
        t.group_member(&c, u).await.expect("group_member"),
        Some(member(u, GroupRole::Admin, false, 9)),
        "put_group_member (higher then lower): the highest position wins"
    );
    for w in [member(v, GroupRole::Member, true, 4), member(v, GroupRole::Admin, true, 6), member(v, GroupRole::Admin, true, 6)] {
        t.put_group_member(&w).await.expect("put_group_member");
    }
    assert_eq!(
        t.group_member(&c, v).await.expect("group_member"),
        Some(member(v, GroupRole::Admin, true, 6)),
        "put_group_member (lower then higher): the highest position wins"
    );
    let mut got = t.group_members(&c).await.expect("group_members");
    got.sort_by_key(|m| m.member.0);
    let mut want = vec![member(u, GroupRole::Admin, false, 9), member(v, GroupRole::Admin, true, 6)];
    want.sort_by_key(|m| m.member.0);
    assert_eq!(got, want, "group_members lists current and former members, one row each");
    assert_eq!(t.group_member(&c, creator).await.expect("group_member"), None, "group_member of a user who never was one");

    // user_groups: two groups of u, one in each order.
    let (g1, g2) = (group(), group());
    let row = |g: &ConversationId, role: GroupRole, active: bool, position: i64| UserGroupRow {
        user_id: u,
        conversation_id: g.clone(),
        role,
        active,
        position,
    };
    for w in [row(&g1, GroupRole::Member, true, 1), row(&g1, GroupRole::Member, false, 8)] {
        t.put_user_group(&w).await.expect("put_user_group");
    }
    for w in [row(&g2, GroupRole::Admin, true, 12), row(&g2, GroupRole::Member, true, 5), row(&g2, GroupRole::Admin, true, 12)] {
        t.put_user_group(&w).await.expect("put_user_group");
    }
    let mut got = t.user_groups(u).await.expect("user_groups");
    got.sort_by(|x, y| x.conversation_id.cmp(&y.conversation_id));
    let mut want = vec![row(&g1, GroupRole::Member, false, 8), row(&g2, GroupRole::Admin, true, 12)];
    want.sort_by(|x, y| x.conversation_id.cmp(&y.conversation_id));
    assert_eq!(got, want, "put_user_group: the highest position wins in either order; user_groups lists every group of the user");
    assert!(t.user_groups(v).await.expect("user_groups").is_empty(), "user groups are per user");
}

/// A user's intervals in a group, by `since`: a close written before its open gives the closed
/// interval, an open written after its close does not reopen it.
pub async fn user_group_intervals(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    let (c, other) = (group(), group());
    let put = |since: i64, until: Option<i64>| {
        let c = c.clone();
        async move { t.put_user_group_interval(u, &c, since, until).await.unwrap_or_else(|e| panic!("put_user_group_interval: {e}")) }
    };
    let get = |user: UserId, c: ConversationId| async move {
        t.user_group_intervals(user, &c).await.unwrap_or_else(|e| panic!("user_group_intervals: {e}"))
    };
    assert!(get(u, c.clone()).await.is_empty(), "user_group_intervals before any write");
    put(20, None).await;
    assert_eq!(get(u, c.clone()).await, vec![(20, None)], "an open interval reads back with no until");
    // Open then close.
    put(0, None).await;
    put(0, Some(4)).await;
    // Close then open (a replay out of order), then the open again.
    put(10, Some(12)).await;
    put(10, None).await;
    put(10, None).await;
    assert_eq!(
        get(u, c.clone()).await,
        vec![(0, Some(4)), (10, Some(12)), (20, None)],
        "user_group_intervals by since; a close wins over an open in either order"
    );
    assert!(get(v, c.clone()).await.is_empty(), "intervals are per user");
    assert!(get(u, other).await.is_empty(), "intervals are per group");
}

/// Roles: a grant adds the role once however often it is repeated, a revoke removes it (also
/// when repeated or when the role was never granted), roles are per user, listed by name.
pub async fn roles(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    let roles = |user: UserId| async move { t.roles(user).await.unwrap_or_else(|e| panic!("roles: {e}")) };
    let set = |role: &'static str, granted: bool| async move {
        t.set_role(u, role, granted).await.unwrap_or_else(|e| panic!("set_role({role}, {granted}): {e}"))
    };
    assert!(roles(u).await.is_empty(), "roles of a user never granted one");
    set("auditor", true).await;
    set("analyst", true).await;
    set("auditor", true).await;
    assert_eq!(roles(u).await, ["analyst", "auditor"], "roles lists each granted role once, by name");
    assert!(roles(v).await.is_empty(), "roles are per user");
    set("auditor", false).await;
    assert_eq!(roles(u).await, ["analyst"], "a revoke removes the role");
    set("auditor", false).await;
    set("admin", false).await;
    assert_eq!(roles(u).await, ["analyst"], "revoking a role the user does not have changes nothing");
    set("auditor", true).await;
    assert_eq!(roles(u).await, ["analyst", "auditor"], "a revoked role can be granted again");
}

/// Session revocations: every node reads the ones since a time, oldest first; a repeat is one
/// row; a user's later revocation is listed after the earlier one; older ones are left out.
pub async fn revocations(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    // Millisecond times (both back-ends keep milliseconds), an hour apart across a partition.
    let base = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis() - 2 * 3_600_000).expect("time");
    let at = |mins: i64| base + chrono::Duration::minutes(mins);
    let revoke = |user: UserId, when: chrono::DateTime<Utc>| async move {
        t.revoke_sessions(user, when).await.unwrap_or_else(|e| panic!("revoke_sessions: {e}"))
    };
    revoke(u, at(0)).await;
    revoke(v, at(61)).await;
    revoke(u, at(90)).await;
    revoke(u, at(90)).await;
    let ours = |since: chrono::DateTime<Utc>| async move {
        let all = t.revocations_since(since).await.unwrap_or_else(|e| panic!("revocations_since: {e}"));
        all.into_iter().filter(|(w, _)| *w == u || *w == v).collect::<Vec<_>>()
    };
    assert_eq!(ours(at(-1)).await, [(u, at(0)), (v, at(61)), (u, at(90))], "every revocation since, oldest first, a repeat once");
    assert_eq!(ours(at(61)).await, [(v, at(61)), (u, at(90))], "since is inclusive; older ones are left out");
    assert!(ours(at(91)).await.is_empty(), "none after the last");
}

/// Profiles: the latest `updated_at` wins whatever the write order (a later update without an
/// avatar clears an older one's avatar); repeats change nothing; two updates with one
/// `updated_at` give the same row in either order.
pub async fn profiles_latest_wins(t: &dyn Tables) {
    assert_eq!(t.profile(UserId::random()).await.expect("profile"), None, "profile of a user with none");
    let profile = |user: UserId, name: &str, avatar: Option<Uuid>, ms: i64| ProfileRow {
        user_id: user,
        display_name: name.into(),
        avatar_media_id: avatar,
        updated_at: at(ms),
    };
    let (t1, t2) = (DAY0_MS + 1_000, DAY0_MS + 2_000);
    let (a1, a2) = (Uuid::new_v4(), Uuid::new_v4());
    // (what, older, newer)
    let cases = [
        ("the newer clears the avatar", (Some(a1), "Old name"), (None, "Néw ✓")),
        ("the newer sets an avatar", (None, "Old name"), (Some(a2), "Néw ✓")),
        ("the newer changes the avatar", (Some(a1), "Same"), (Some(a2), "Same")),
    ];
    for (what, (old_avatar, old_name), (new_avatar, new_name)) in cases {
        for newer_first in [false, true] {
            let u = UserId::random();
            let older = profile(u, old_name, old_avatar, t1);
            let newer = profile(u, new_name, new_avatar, t2);
            let order = if newer_first { [&newer, &older, &newer] } else { [&older, &newer, &newer] };
            for p in order {
                t.put_profile(p).await.expect("put_profile");
            }
            let order = if newer_first { "newer first" } else { "older first" };
            assert_eq!(t.profile(u).await.expect("profile"), Some(newer), "put_profile ({what}, {order}): the latest updated_at wins");
        }
    }

    // One updated_at, two contents: whatever the back-end picks, the order must not matter.
    let (x, y) = (UserId::random(), UserId::random());
    let one = |u: UserId| profile(u, "Ann", Some(a1), t1);
    let other = |u: UserId| profile(u, "Bob", None, t1);
    for p in [one(x), other(x)] {
        t.put_profile(&p).await.expect("put_profile");
    }
    for p in [other(y), one(y)] {
        t.put_profile(&p).await.expect("put_profile");
    }
    let gx = t.profile(x).await.expect("profile").expect("a profile");
    let gy = t.profile(y).await.expect("profile").expect("a profile");
    assert_eq!(
        (&gx.display_name, gx.avatar_media_id, gx.updated_at),
        (&gy.display_name, gy.avatar_media_id, gy.updated_at),
        "put_profile: two updates with one updated_at give the same profile in either write order"
    );
}

/// Privacy settings: none for a user who never set them; the latest `updated_at` wins whatever
/// the write order (also when the older settings have the greater values); repeats change nothing;
/// two writes with one `updated_at` give the same row in either order (each setting's greater
/// text, as Cassandra resolves cells of one write time); every audience reads back.
pub async fn privacy_latest_wins(t: &dyn Tables) {
    use chat_events::Audience::{Contacts, Everyone, Nobody};
    assert_eq!(t.privacy(UserId::random()).await.expect("privacy"), None, "privacy of a user who never set it");
    let row = |user, last_seen, photo, read_receipts, ms| PrivacyRow { user_id: user, last_seen, photo, read_receipts, updated_at: at(ms) };
    let put = |p: PrivacyRow| async move { t.apply(vec![Write::Privacy(p)]).await.expect("apply privacy") };
    let (t1, t2) = (DAY0_MS + 1_000, DAY0_MS + 2_000);
    for newer_first in [false, true] {
        let u = UserId::random();
        // "nobody" is the greatest text: the older row would win a comparison of values.
        let older = row(u, Nobody, Nobody, Nobody, t1);
        let newer = row(u, Everyone, Contacts, Everyone, t2);
        let order = if newer_first { [newer, older, newer] } else { [older, newer, newer] };
        for p in order {
            put(p).await;
        }
        let order = if newer_first { "newer first" } else { "older first" };
        assert_eq!(t.privacy(u).await.expect("privacy"), Some(newer), "privacy ({order}): the latest updated_at wins");
    }

    // Every audience in every setting reads back.
    let all = [Everyone, Contacts, Nobody];
    for i in 0..all.len() {
        let u = UserId::random();
        let p = row(u, all[i], all[(i + 1) % 3], all[(i + 2) % 3], t1);
        put(p).await;
        assert_eq!(t.privacy(u).await.expect("privacy"), Some(p), "privacy reads back as written");
    }

    // One updated_at, two contents: the same row in either order (and in one list).
    let (x, y, z) = (UserId::random(), UserId::random(), UserId::random());
    let one = |u| row(u, Everyone, Nobody, Contacts, t1);
    let other = |u| row(u, Contacts, Everyone, Nobody, t1);
    put(one(x)).await;
    put(other(x)).await;
    put(other(y)).await;
    put(one(y)).await;
    t.apply(vec![Write::Privacy(one(z)), Write::Privacy(other(z))]).await.expect("apply privacy");
    for u in [x, y, z] {
        assert_eq!(
            t.privacy(u).await.expect("privacy"),
            Some(row(u, Everyone, Nobody, Nobody, t1)),
            "privacy: two writes with one updated_at give each setting's greater value, in any order"
        );
    }
}

/// Blocks: none for a pair never written; the latest `at` wins whatever the write order (a
/// block then an unblock ends unblocked, an unblock then a block blocked); a block and an
/// unblock at one time end blocked in either order; repeats change nothing; `blocks` lists only
/// the targets blocked now, by target id, at most `limit`, of that user only.
pub async fn blocks_latest_wins(t: &dyn Tables) {
    let (u, v) = (UserId::random(), UserId::random());
    assert_eq!(t.block(u, UserId::random()).await.expect("block"), None, "block of a pair never written");
    assert!(t.blocks(u, 10).await.expect("blocks").is_empty(), "blocks of a user who blocked no one");
    let row = |user, target, blocked, ms| BlockRow { user_id: user, target, blocked, at: at(ms) };
    let put = |b: BlockRow| async move { t.apply(vec![Write::Block(b)]).await.expect("apply block") };
    let (t1, t2) = (DAY0_MS + 1_000, DAY0_MS + 2_000);
    let mut targets: Vec<UserId> = (0..6).map(|_| UserId::random()).collect();
    targets.sort();
    let g = &targets;
    // 0: blocked, written twice.
    put(row(u, g[0], true, t1)).await;
    put(row(u, g[0], true, t1)).await;
    // 1 and 2: blocked then unblocked later, written in either order.
    put(row(u, g[1], false, t2)).await;
    put(row(u, g[1], true, t1)).await;
    put(row(u, g[2], true, t1)).await;
    put(row(u, g[2], false, t2)).await;
    // 3 and 4: a block and an unblock at one time, in either order (4: in one list).
    put(row(u, g[3], false, t1)).await;
    put(row(u, g[3], true, t1)).await;
    t.apply(vec![Write::Block(row(u, g[4], true, t1)), Write::Block(row(u, g[4], false, t1))]).await.expect("apply block");
    // 5: unblocked then blocked again later, written later first.
    put(row(u, g[5], true, t2)).await;
    put(row(u, g[5], false, t1)).await;
    // Another user's blocks.
    put(row(v, g[1], true, t1)).await;
    put(row(v, g[2], true, t1)).await;

    let want = [row(u, g[0], true, t1), row(u, g[1], false, t2), row(u, g[2], false, t2), row(u, g[3], true, t1), row(u, g[4], true, t1), row(u, g[5], true, t2)];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(t.block(u, g[i]).await.expect("block"), Some(*w), "block of target {i}: the latest change wins, at one time the block");
    }
    let blocked: Vec<BlockRow> = want.iter().copied().filter(|b| b.blocked).collect();
    assert_eq!(t.blocks(u, 100).await.expect("blocks"), blocked, "blocks: the targets blocked now, by target id");
    assert_eq!(t.blocks(u, 2).await.expect("blocks"), blocked[..2], "blocks honours its limit");
    assert!(t.blocks(u, 0).await.expect("blocks").is_empty(), "blocks with limit 0");
    put(row(u, g[0], true, t1)).await;
    assert_eq!(t.blocks(u, 100).await.expect("blocks"), blocked, "a repeated block changes nothing");
    assert_eq!(t.blocks(v, 100).await.expect("blocks"), vec![row(v, g[1], true, t1), row(v, g[2], true, t1)], "blocks are per user");
    assert_eq!(t.block(v, g[0]).await.expect("block"), None, "another user's block is not this user's");
    assert_eq!(t.block(g[0], u).await.expect("block"), None, "a block is one way");
}

/// Message counts: each deliveries partition's row of a (day, kind, scope) holds what that
/// partition counted up to an offset; the row with the highest offset wins whatever the order
/// of writes (a replayed older version changes nothing); a query sums the partitions' rows; a
/// range covers its first and last day and nothing else, days and keys with nothing are left
/// out; an unknown kind or scope is refused.
pub async fn message_counts(t: &dyn Tables) {
    let d0 = case_day(0);
    let (d1, d2, d3) = (plus_days(d0, 1), plus_days(d0, 2), plus_days(d0, 3));
    let before = d0.pred_opt().expect("a day before");
    let put = |day: NaiveDate, kind: &'static str, scope: &'static str, partition: i32, messages: i64, applied_offset: i64| async move {
        let key = MessageCountKey { day, kind: kind.into(), scope: scope.into(), partition };
        t.apply(vec![Write::MessageCount { key, messages, applied_offset }]).await.unwrap_or_else(|e| panic!("MessageCount: {e}"))
    };
    put(d0, "text", "direct", 0, 2, 10).await;
    put(d0, "text", "direct", 0, 1, 5).await;
    put(d0, "text", "direct", 1, 3, 7).await;
    put(d0, "image", "group", 0, 1, 11).await;
    put(d2, "video", "direct", 0, 1, 20).await;
    put(d2, "text", "group", 0, 2, 4).await;
    put(d2, "text", "group", 0, 2, 4).await;
    put(d2, "text", "group", 3, 1, 3).await;
    put(d2, "text", "group", 3, 4, 9).await;
    put(d2, "audio", "direct", 2, 1, 1).await;
    put(d3, "text", "direct", 0, 1, 30).await;
    put(before, "text", "direct", 0, 1, 1).await;
    let key = MessageCountKey { day: d2, kind: "text".into(), scope: "group".into(), partition: 3 };
    assert_eq!(t.message_count_row(&key).await.expect("message_count_row"), Some((4, 9)), "message_count_row: the latest version");
    let none = MessageCountKey { partition: 4, ..key };
    assert_eq!(t.message_count_row(&none).await.expect("message_count_row"), None, "message_count_row of a partition that counted nothing");

    let counts = |from: NaiveDate, to: NaiveDate| async move {
        t.message_counts(from, to).await.unwrap_or_else(|e| panic!("message_counts: {e}"))
    };
    let count = |day: NaiveDate, kind: &str, scope: &str, messages: u64| MessageCount { day, kind: kind.into(), scope: scope.into(), messages };
    assert_eq!(
        counts(d0, d2).await,
        vec![
            count(d0, "text", "direct", 5),
            count(d0, "image", "group", 1),
            count(d2, "text", "group", 6),
            count(d2, "audio", "direct", 1),
            count(d2, "video", "direct", 1),
        ],
        "message_counts: the partitions' latest rows summed per (day, kind, scope), both ends of the range included, empty \
         days and keys left out, by day then kind and scope in the order of MESSAGE_KINDS and MESSAGE_SCOPES"
    );
    assert!(counts(d1, d1).await.is_empty(), "message_counts of a day with no messages is empty");
    assert_eq!(counts(d3, d3).await, vec![count(d3, "text", "direct", 1)], "message_counts of one day");

    for (kind, scope) in [("sticker", "direct"), ("text", "channel")] {
        let key = MessageCountKey { day: d1, kind: kind.into(), scope: scope.into(), partition: 0 };
        match t.apply(vec![Write::MessageCount { key, messages: 1, applied_offset: 1 }]).await {
            Err(StoreError::Data(_)) => {}
            other => panic!("MessageCount({kind}, {scope}) must be refused as a data error, got {other:?}"),
        }
    }
    assert!(counts(d1, d1).await.is_empty(), "a refused MessageCount writes nothing");
}

/// Active users: a user counts once per day, per day in the range, days with none left out.
pub async fn active_users(t: &dyn Tables) {
    let d0 = case_day(1);
    let (d1, d2, d3) = (plus_days(d0, 1), plus_days(d0, 2), plus_days(d0, 3));
    let (u, v, w) = (UserId::random(), UserId::random(), UserId::random());
    for (day, user) in [(d0, u), (d0, v), (d0, u), (d2, u), (d2, u), (d3, w)] {
        t.add_active_user(day, user).await.expect("add_active_user");
    }
    let active = |from: NaiveDate, to: NaiveDate| async move {
        t.active_users(from, to).await.unwrap_or_else(|e| panic!("active_users: {e}"))
    };
    assert_eq!(active(d0, d2).await, vec![(d0, 2), (d2, 1)], "active_users: distinct users per day, oldest first, empty days left out");
    assert!(active(d1, d1).await.is_empty(), "active_users of a day with none is empty");
    assert_eq!(active(d0, d3).await.len(), 3, "active_users includes the last day of the range");
}

/// Profile views: one per view event however often it is written, per viewed user and day;
/// distinct viewers with their views, most views first (equal views by viewer id).
pub async fn profile_views(t: &dyn Tables) {
    let d0 = case_day(2);
    let (d1, d2, d3) = (plus_days(d0, 1), plus_days(d0, 2), plus_days(d0, 3));
    let (viewed, other) = (UserId::random(), UserId::random());
    let (a, b, c) = (UserId::random(), UserId::random(), UserId::random());
    let e: Vec<EventId> = (0..10).map(|_| EventId(Uuid::new_v4())).collect();
    let writes = [
        (viewed, d0, a, e[0]),
        (viewed, d0, a, e[1]),
        (viewed, d0, a, e[0]),
        (viewed, d0, b, e[2]),
        (viewed, d0, a, e[3]),
        (viewed, d0, c, e[4]),
        (viewed, d2, b, e[5]),
        (viewed, d2, b, e[6]),
        (viewed, d3, c, e[7]),
        (other, d0, a, e[8]),
    ];
    for (viewed, day, viewer, view) in writes {
        t.add_profile_view(viewed, day, viewer, view).await.expect("add_profile_view");
    }
    let views = |user: UserId, from: NaiveDate, to: NaiveDate| async move {
        t.profile_views(user, from, to).await.unwrap_or_else(|e| panic!("profile_views: {e}"))
    };
    let mut tied = vec![(b, 1), (c, 1)];
    tied.sort_by_key(|(u, _)| *u);
    let mut day0 = vec![(a, 3)];
    day0.extend(tied);
    assert_eq!(
        views(viewed, d0, d2).await,
        vec![ProfileViews { day: d0, views: 5, viewers: day0 }, ProfileViews { day: d2, views: 2, viewers: vec![(b, 2)] }],
        "profile_views: each view once, per day, empty days left out, viewers by views (most first, then by id)"
    );
    assert!(views(viewed, d1, d1).await.is_empty(), "profile_views of a day with none is empty");
    assert_eq!(
        views(other, d0, d3).await,
        vec![ProfileViews { day: d0, views: 1, viewers: vec![(a, 1)] }],
        "profile views are per viewed user"
    );
    assert!(views(UserId::random(), d0, d3).await.is_empty(), "profile_views of a user nobody viewed");
}

/// Topic counts: a message counts once per topic and day; most mentioned first within a day,
/// equal counts by topic.
pub async fn topic_counts(t: &dyn Tables) {
    let d0 = case_day(3);
    let (d1, d2, d3) = (plus_days(d0, 1), plus_days(d0, 2), plus_days(d0, 3));
    let m: Vec<MessageId> = (0..8).map(|i| msg_on(d0, i)).collect();
    let (u, v) = (UserId::random(), UserId::random());
    let writes = [
        (d0, "#climb", m[0], u),
        (d0, "#climb", m[1], v),
        (d0, "#climb", m[0], u),
        (d0, "rain", m[0], u),
        (d0, "#über", m[1], v),
        (d0, "#climb", m[2], v),
        (d0, "#über", m[2], v),
        (d2, "b", m[3], u),
        (d2, "a", m[4], u),
        (d3, "rain", m[5], v),
    ];
    for (day, topic, msg, sender) in writes {
        t.add_topic(day, topic, msg, sender).await.expect("add_topic");
    }
    let topics = |from: NaiveDate, to: NaiveDate| async move {
        t.topic_counts(from, to).await.unwrap_or_else(|e| panic!("topic_counts: {e}"))
    };
    let tc = |day: NaiveDate, topic: &str, messages: u64, users: u64| TopicCount { day, topic: topic.into(), messages, users };
    assert_eq!(
        topics(d0, d2).await,
        vec![tc(d0, "#climb", 3, 2), tc(d0, "#über", 2, 1), tc(d0, "rain", 1, 1), tc(d2, "a", 1, 1), tc(d2, "b", 1, 1)],
        "topic_counts: each message once per topic, by day, most mentioned first, equal counts by topic, empty days left out; distinct senders"
    );
    assert!(topics(d1, d1).await.is_empty(), "topic_counts of a day with none is empty");
    assert_eq!(topics(d3, d3).await, vec![tc(d3, "rain", 1, 1)], "topic_counts of one day");
    // A deleted message's topics go.
    t.apply(vec![Write::TopicRemoved { day: d0, topic: "#climb".into(), message: m[0] }, Write::TopicRemoved { day: d3, topic: "rain".into(), message: m[5] }])
        .await
        .expect("apply");
    assert!(topics(d3, d3).await.is_empty(), "a removed topic row is gone");
    assert_eq!(topics(d0, d0).await[0], tc(d0, "#climb", 2, 1), "only the removed message's row goes");
}

/// The receipts of one recipient: filled by `put_receipts`, with the earliest `at` per key in
/// either write order; `from` included, `to` excluded (also between milliseconds); ordered by
/// time, then message id, status (sent, delivered, seen) and device.
pub async fn receipts_of_user(t: &dyn Tables) {
    let (s, r, c) = direct();
    let base = DAY0_MS + 40 * DAY_MS;
    let (m1, m2, m3) = (msg_id(base), msg_id(base + 1_000), msg_id(base + 2_000));
    let (t1, t2, t3, t4, t5) = (base + 10_000, base + 20_000, base + 30_000, base + 40_000, base + 50_000);
    let put = |rows: Vec<ReceiptRow>| async move { t.put_receipts(&rows).await.unwrap_or_else(|e| panic!("put_receipts: {e}")) };
    use ReceiptStatus::{Delivered, Seen, Sent};
    // m1 delivered: later first, then earlier (t1 wins).
    put(vec![receipt(m1, r, Delivered, "phone", t3, &c)]).await;
    put(vec![receipt(m1, r, Delivered, "phone", t1, &c)]).await;
    // m1 seen: earlier first, then later (t2 wins).
    put(vec![receipt(m1, r, Seen, "phone", t2, &c)]).await;
    put(vec![receipt(m1, r, Seen, "phone", t4, &c)]).await;
    // m2 delivered on the laptop at t2 too (a tie in time: m1 before m2), written twice.
    put(vec![receipt(m2, r, Delivered, "laptop", t2, &c)]).await;
    put(vec![receipt(m2, r, Delivered, "laptop", t2, &c)]).await;
    // m3: delivered on two devices and seen, all at t4, in one call, with a later duplicate first.
    put(vec![
        receipt(m3, r, Seen, "phone", t5, &c),
        receipt(m3, r, Seen, "phone", t4, &c),
        receipt(m3, r, Delivered, "phone", t4, &c),
        receipt(m3, r, Delivered, "laptop", t4, &c),
    ])
    .await;
    // Another recipient's rows are theirs, not r's; a direct message's `sent` is in the
    // message's timeline only, a group member's `sent` in their audit too.
    let g = group();
    put(vec![receipt(m1, s, Sent, "", t1, &c), receipt(m2, s, Sent, "", t1, &g)]).await;

    let of = |user: UserId, from: DateTime<Utc>, to: DateTime<Utc>| async move {
        t.receipts_of_user(user, from, to).await.unwrap_or_else(|e| panic!("receipts_of_user: {e}"))
    };
    let all = vec![
        receipt(m1, r, Delivered, "phone", t1, &c),
        receipt(m1, r, Seen, "phone", t2, &c),
        receipt(m2, r, Delivered, "laptop", t2, &c),
        receipt(m3, r, Delivered, "laptop", t4, &c),
        receipt(m3, r, Delivered, "phone", t4, &c),
        receipt(m3, r, Seen, "phone", t4, &c),
    ];
    assert_eq!(
        of(r, at(base), at(base + DAY_MS)).await,
        all,
        "receipts_of_user: every receipt of the recipient, the earliest `at` per key whatever the write order, \
         by time, then message id, status and device"
    );
    assert_eq!(of(r, at(t2), at(t4)).await, all[1..3], "receipts_of_user: `from` included, `to` excluded");
    assert_eq!(of(r, at(t2), at(t4 + 1)).await, all[1..], "receipts_of_user: up to just after the last");
    let half_ms = chrono::Duration::microseconds(500);
    assert_eq!(
        of(r, at(t2) + half_ms, at(t4) + half_ms).await,
        all[3..],
        "receipts_of_user: bounds between milliseconds (a row at t2 is before `from`, one at t4 before `to`)"
    );
    assert!(of(r, at(base), at(t1)).await.is_empty(), "receipts_of_user before the first receipt is empty");
    assert!(of(r, at(t5), at(base + DAY_MS)).await.is_empty(), "receipts_of_user after the last receipt is empty");
    assert_eq!(
        of(s, at(base), at(base + DAY_MS)).await,
        vec![receipt(m2, s, Sent, "", t1, &g)],
        "receipts are per recipient, and a direct `sent` is not in the recipient's audit"
    );
    assert!(t.receipts(m1).await.expect("receipts").iter().any(|x| x.status == Sent), "the direct `sent` is in the timeline");
    assert!(of(UserId::random(), at(base), at(base + DAY_MS)).await.is_empty(), "receipts_of_user of a user with none");
    assert_eq!(t.receipts(m3).await.expect("receipts").len(), 3, "put_receipts still writes the timeline by message");
}

async fn apply(t: &dyn Tables, w: &Write) {
    t.apply(vec![w.clone()]).await.unwrap_or_else(|e| panic!("fixture write {}: {e}", w.table()));
}

/// A small instance of every projection table, and the row count each table must then have.
fn fixture() -> (Vec<Write>, BTreeMap<&'static str, u64>) {
    use chat_events::Audience::{Contacts, Everyone, Nobody};
    let (a, b, c) = direct();
    let g = group();
    let m1 = message(&c, a, DAY0_MS + 3_600_000, 1);
    let m2 = MessageRow { withheld: true, ..message(&c, b, DAY0_MS + 3_600_000 + 1, 2) };
    let m3 = message(&c, a, DAY0_MS + DAY_MS + 5, 3);
    let day0 = m1.sent_at.date_naive();
    let day1 = m3.sent_at.date_naive();
    let count_key = |day: NaiveDate, partition: i32| MessageCountKey { day, kind: "text".into(), scope: "direct".into(), partition };
    let (view1, view2) = (EventId(Uuid::new_v4()), EventId(Uuid::new_v4()));
    let (item1, item2) = (Uuid::new_v4(), Uuid::new_v4());
    let inbox = |user: UserId, peer: UserId, unread: i32| InboxRow {
        user_id: user,
        conversation_id: c.clone(),
        peer_id: Some(peer),
        last_message_id: m3.message_id,
        last_sender: a,
        last_kind: "text".into(),
        last_body: m3.body.clone(),
        last_at: m3.sent_at,
        unread,
        first_unread_seq: None,
        read_up_to: None,
        applied_offset: 3,
        wrote: user == a,
        mentions: 0,
    };
    let writes = vec![
        Write::User { user: a, username: "alice".into(), at: at(DAY0_MS) },
        Write::User { user: b, username: "bob".into(), at: at(DAY0_MS + 1) },
        Write::Message(m1.clone()),
        Write::Message(m2.clone()),
        Write::Message(m3.clone()),
        Write::Inbox(inbox(a, b, 0)),
        Write::Inbox(inbox(b, a, 2)),
        Write::Bucket { conversation: c.clone(), bucket: bucket_of(m1.message_id) },
        Write::Bucket { conversation: c.clone(), bucket: bucket_of(m3.message_id) },
        Write::Bucket { conversation: c.clone(), bucket: bucket_of(m2.message_id) },
        Write::Stream { user: b, row: StreamRow { seq: 1, item_id: item1, item: "{\"n\":1}".into() } },
        Write::StreamHead { user: b, source_partition: 0, position: 1 },
        Write::Stream { user: b, row: StreamRow { seq: 2, item_id: item2, item: "{\"n\":2}".into() } },
        Write::StreamHead { user: b, source_partition: 0, position: 2 },
        Write::Receipt(receipt(m1.message_id, b, ReceiptStatus::Delivered, "phone", DAY0_MS + 7_200_000, &c)),
        Write::Receipt(receipt(m1.message_id, b, ReceiptStatus::Delivered, "phone", DAY0_MS + 7_100_000, &c)),
        Write::Receipt(receipt(m1.message_id, b, ReceiptStatus::Seen, "phone", DAY0_MS + 7_300_000, &c)),
        Write::Presence { user: b, online: true, at: at(DAY0_MS + 1_000) },
        Write::Presence { user: b, online: false, at: at(DAY0_MS + 2_000) },
        // A group made by a with b, renamed, then b removed: rows at several positions.
        Write::Group(GroupRow { conversation_id: g.clone(), name: "climbers".into(), creator: a, created_at: at(DAY0_MS), position: 0 }),
        Write::GroupMember(GroupMemberRow { conversation_id: g.clone(), member: a, role: GroupRole::Admin, active: true, position: 0 }),
        Write::GroupMember(GroupMemberRow { conversation_id: g.clone(), member: b, role: GroupRole::Member, active: true, position: 0 }),
        Write::UserGroup(UserGroupRow { user_id: a, conversation_id: g.clone(), role: GroupRole::Admin, active: true, position: 0 }),
        Write::UserGroup(UserGroupRow { user_id: b, conversation_id: g.clone(), role: GroupRole::Member, active: true, position: 0 }),
        Write::UserGroupInterval { user: a, conversation: g.clone(), since: 0, until: None },
        Write::UserGroupInterval { user: b, conversation: g.clone(), since: 0, until: None },
        Write::Group(GroupRow { conversation_id: g.clone(), name: "boulderers".into(), creator: a, created_at: at(DAY0_MS), position: 2 }),
        Write::GroupMember(GroupMemberRow { conversation_id: g.clone(), member: b, role: GroupRole::Member, active: false, position: 5 }),
        Write::UserGroup(UserGroupRow { user_id: b, conversation_id: g.clone(), role: GroupRole::Member, active: false, position: 5 }),
        Write::UserGroupInterval { user: b, conversation: g.clone(), since: 0, until: Some(5) },
        // Profiles, analytics sets (each with a repeat) and, through the receipts above, the
        // receipts of each recipient.
        Write::Profile(ProfileRow { user_id: a, display_name: "Alice".into(), avatar_media_id: Some(Uuid::new_v4()), updated_at: at(DAY0_MS) }),
        Write::Profile(ProfileRow { user_id: a, display_name: "Alice ✓".into(), avatar_media_id: None, updated_at: at(DAY0_MS + 5) }),
        Write::MessageCount { key: count_key(day0, 0), messages: 2, applied_offset: 8 },
        Write::MessageCount { key: count_key(day0, 0), messages: 1, applied_offset: 4 },
        Write::MessageCount { key: count_key(day0, 0), messages: 2, applied_offset: 8 },
        Write::MessageCount { key: count_key(day1, 1), messages: 1, applied_offset: 9 },
        Write::ActiveUser { day: day0, user: a },
        Write::ActiveUser { day: day0, user: b },
        Write::ActiveUser { day: day0, user: a },
        Write::ProfileView { viewed: a, day: day0, viewer: b, view: view1 },
        Write::ProfileView { viewed: a, day: day0, viewer: b, view: view2 },
        Write::ProfileView { viewed: a, day: day0, viewer: b, view: view1 },
        Write::Topic { day: day0, topic: "#climb".into(), message: m1.message_id, sender: a },
        Write::Topic { day: day0, topic: "#climb".into(), message: m2.message_id, sender: a },
        Write::Topic { day: day0, topic: "#climb".into(), message: m1.message_id, sender: a },
        Write::MediaMessage { media: item1, conversation: c.clone(), message: m1.message_id, position: 7 },
        Write::MediaMessage { media: item1, conversation: c.clone(), message: m2.message_id, position: 9 },
        Write::MediaMessage { media: item1, conversation: c.clone(), message: m1.message_id, position: 7 },
        Write::StreamMessage { user: b, message: m1.message_id, seq: 1, mark: StreamMark::Message },
        Write::StreamMessage { user: b, message: m1.message_id, seq: 2, mark: StreamMark::Deleted },
        Write::StreamMessage { user: b, message: m1.message_id, seq: 1, mark: StreamMark::Message },
        Write::HiddenMessage { user: b, conversation: c.clone(), message: m1.message_id },
        Write::HiddenMessage { user: b, conversation: c.clone(), message: m1.message_id },
        Write::Reaction { conversation: c.clone(), message: m1.message_id, user: b, emoji: Some("👍".into()), seq: 3 },
        Write::Reaction { conversation: c.clone(), message: m1.message_id, user: b, emoji: Some("👍".into()), seq: 3 },
        Write::MessageVersion { message: m2.message_id, at: at(DAY0_MS + 1), body: "v1".into() },
        Write::MessageVersion { message: m2.message_id, at: at(DAY0_MS + 1), body: "v1".into() },
        // Privacy: a's later settings win; b's two at one time resolve alike in any order.
        Write::Privacy(PrivacyRow { user_id: a, last_seen: Nobody, photo: Nobody, read_receipts: Everyone, updated_at: at(DAY0_MS) }),
        Write::Privacy(PrivacyRow { user_id: a, last_seen: Everyone, photo: Contacts, read_receipts: Nobody, updated_at: at(DAY0_MS + 5) }),
        Write::Privacy(PrivacyRow { user_id: b, last_seen: Everyone, photo: Nobody, read_receipts: Contacts, updated_at: at(DAY0_MS + 7) }),
        Write::Privacy(PrivacyRow { user_id: b, last_seen: Contacts, photo: Everyone, read_receipts: Nobody, updated_at: at(DAY0_MS + 7) }),
        // Blocks: a blocks and later unblocks b; b's block and unblock of a at one time.
        Write::Block(BlockRow { user_id: a, target: b, blocked: true, at: at(DAY0_MS + 10) }),
        Write::Block(BlockRow { user_id: a, target: b, blocked: false, at: at(DAY0_MS + 20) }),
        Write::Block(BlockRow { user_id: b, target: a, blocked: false, at: at(DAY0_MS + 30) }),
        Write::Block(BlockRow { user_id: b, target: a, blocked: true, at: at(DAY0_MS + 30) }),
    ];
    let rows = BTreeMap::from([
        ("users", 2),
        ("messages", 3),
        ("conversation_buckets", 2),
        ("message_index", 3),
        ("inbox", 2),
        ("user_stream", 2),
        ("stream_heads", 1),
        // Two acks of one device at two times are two rows of the timeline (readers keep the
        // first); by user, one.
        ("receipts", 3),
        ("last_seen", 1),
        ("groups", 1),
        ("group_members", 2),
        ("user_groups", 2),
        ("user_group_intervals", 2),
        ("profiles", 1),
        ("analytics_message_counts", 2),
        ("analytics_active_users", 2),
        ("analytics_profile_views", 2),
        ("analytics_topics", 2),
        ("receipts_by_user", 2),
        ("media_messages", 2),
        ("stream_messages", 2),
        ("hidden_messages", 1),
        ("message_edits", 1),
        ("reactions", 1),
        ("privacy_settings", 2),
        ("blocks", 2),
    ]);
    (writes, rows)
}

async fn checksums(t: &dyn Tables, what: &str) -> BTreeMap<String, crate::TableChecksum> {
    let cs = t.checksums().await.unwrap_or_else(|e| panic!("checksums ({what}): {e}"));
    let names: Vec<&str> = cs.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = PROJECTION_TABLES.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "checksums ({what}) covers exactly the projection tables");
    cs
}

fn row_counts(cs: &BTreeMap<String, crate::TableChecksum>) -> BTreeMap<&str, u64> {
    cs.iter().map(|(k, v)| (k.as_str(), v.rows)).collect()
}

/// Checksums count the rows written, a replay of the same writes (in reverse order) leaves them
/// unchanged, the same writes applied in reverse order to empty tables (a rebuild that sees them
/// in another order) give the same checksums, and `truncate_projections` empties the
/// projections but neither the command tables nor the fan-out's state.
/// Empties the projection tables first: do not run it beside other cases.
pub async fn checksums_and_truncate(t: &dyn Tables) {
    t.truncate_projections().await.expect("truncate_projections");
    let empty = checksums(t, "after truncate_projections").await;
    assert!(row_counts(&empty).values().all(|n| *n == 0), "truncate_projections leaves no rows: {:?}", row_counts(&empty));

    // Command tables, which a truncation must keep.
    let (sender, _, conv) = direct();
    let account = Account {
        user_id: sender,
        username: format!("keep-{}", &Uuid::new_v4().simple().to_string()[..12]),
        password_hash: "h".into(),
        created_at: at(DAY0_MS),
    };
    assert!(t.create_account(&account).await.expect("create_account"));
    t.set_role(sender, "auditor", true).await.expect("set_role");

    // The fan-out's state, which a truncation must keep too.
    let g = group();
    let fgroup = FanoutGroup { conversation_id: g.clone(), name: "keep".into(), created_at: 0, membership_version: 1 };
    let fmember = interval(sender, 1, Some(3), GroupRole::Member);
    let fmessage = FanoutMessage { conversation_id: g.clone(), message_id: msg_id(DAY0_MS + 11), sender, position: 2, recipients: 1 };
    let send = SendRecord {
        conversation_id: conv.clone(),
        sender,
        client_msg_id: "keep".into(),
        message_id: msg_id(DAY0_MS + 9),
        sent_at: at(DAY0_MS + 9),
        content_sha256: "c".repeat(64),
        position: 4,
    };
    t.put_send_records(std::slice::from_ref(&send)).await.expect("put_send_records");
    t.put_fanout_group(&fgroup).await.expect("put_fanout_group");
    t.put_fanout_member(&g, &fmember).await.expect("put_fanout_member");
    t.put_fanout_message(&fmessage).await.expect("put_fanout_message");
    t.add_fanout_ack(fmessage.message_id, ReceiptStatus::Delivered, sender).await.expect("add_fanout_ack");
    t.put_fanout_read_marker(&g, sender, fmessage.message_id, 2).await.expect("put_fanout_read_marker");
    let watermark_topic = format!("conversations-{g}");
    t.put_fanout_watermark(&watermark_topic, 3, 9).await.expect("put_fanout_watermark");

    let (writes, want) = fixture();
    for w in &writes {
        apply(t, w).await;
    }
    let first = checksums(t, "after the fixture").await;
    assert_eq!(row_counts(&first), want, "checksums count the rows of each projection table");
    for w in writes.iter().rev() {
        apply(t, w).await;
    }
    let replayed = checksums(t, "after replaying the fixture in reverse").await;
    assert_eq!(replayed, first, "replaying the same writes (here in reverse order) must leave every table's checksum unchanged");

    t.truncate_projections().await.expect("truncate_projections");
    for w in writes.iter().rev() {
        apply(t, w).await;
    }
    let reversed = checksums(t, "after the fixture in reverse order on empty tables").await;
    assert_eq!(reversed, first, "the same writes in reverse order on empty tables (a rebuild) must give the same checksums");

    // The whole list in one apply (how a worker writes a slice of records), twice.
    t.truncate_projections().await.expect("truncate_projections");
    t.apply(writes.clone()).await.expect("apply of the whole fixture");
    t.apply(writes.clone()).await.expect("apply of the whole fixture again");
    let batched = checksums(t, "after the fixture in one apply").await;
    assert_eq!(batched, first, "the fixture in one apply must give the same checksums as one write at a time");

    t.truncate_projections().await.expect("truncate_projections");
    let cleared = checksums(t, "after truncate_projections").await;
    assert!(row_counts(&cleared).values().all(|n| *n == 0), "truncate_projections leaves no rows: {:?}", row_counts(&cleared));
    assert_eq!(cleared, empty, "empty tables have the same checksums as before");
    assert_eq!(
        t.account_by_name(&account.username).await.expect("account_by_name").map(|a| a.user_id),
        Some(sender),
        "truncate_projections keeps accounts"
    );
    assert_eq!(
        t.account_by_id(sender).await.expect("account_by_id"),
        Some(account.username.clone()),
        "truncate_projections keeps accounts by id"
    );
    assert_eq!(t.send_record(&conv, sender, "keep").await.expect("send_record"), Some(send), "truncate_projections keeps sends");
    assert_eq!(t.fanout_group(&g).await.expect("fanout_group"), Some(fgroup), "truncate_projections keeps fanout_groups");
    assert_eq!(t.fanout_members(&g).await.expect("fanout_members"), vec![fmember], "truncate_projections keeps fanout_members");
    assert_eq!(
        t.fanout_message(&g, fmessage.message_id).await.expect("fanout_message"),
        Some(fmessage.clone()),
        "truncate_projections keeps fanout_messages"
    );
    assert_eq!(
        t.fanout_ack_count(fmessage.message_id, ReceiptStatus::Delivered).await.expect("fanout_ack_count"),
        1,
        "truncate_projections keeps fanout_acks"
    );
    assert_eq!(
        t.fanout_read_marker(&g, sender).await.expect("fanout_read_marker"),
        Some((fmessage.message_id, 2)),
        "truncate_projections keeps fanout_read_markers"
    );
    assert_eq!(
        t.fanout_watermark(&watermark_topic, 3).await.expect("fanout_watermark"),
        Some(9),
        "truncate_projections keeps fanout_watermarks"
    );
    assert_eq!(t.roles(sender).await.expect("roles"), ["auditor"], "truncate_projections keeps user_roles");
}

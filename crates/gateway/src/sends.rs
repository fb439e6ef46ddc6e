//! What this node remembers of the sends it answered: a same-node retry of a `client_msg_id`
//! (the common case: the connection dropped and the client reconnected to the same node) gets
//! the first answer without an append (a marked re-send checks a plain attempt's answer against
//! the fan-out's record, see [`SendDone::decided`]), and two attempts of one key at once on this node
//! share one append. Memory only, bounded; across nodes and restarts the fan-out's record of the
//! accepted send ([`chat_store::SendRecord`]) is what answers a retry (see `Chat::send`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chat_events::{ConversationId, MessageId, UserId};
use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// Sends remembered, at most (the oldest are forgotten first).
pub const RECENT_SENDS: usize = 100_000;

/// The answer of a send.
#[derive(Clone, Debug, PartialEq)]
pub struct SendDone {
    pub message_id: MessageId,
    pub sent_at: DateTime<Utc>,
    /// The answer is the fan-out's decision (its record of the send). A plain attempt is
    /// answered with its own append before the fan-out decides; if another node appended the same
    /// send first, the fan-out kept that one, so a re-send must not be answered with this.
    pub decided: bool,
}

/// Where an attempt is.
#[derive(Clone, Debug, PartialEq)]
pub enum SendState {
    Pending,
    Done(SendDone),
    /// It failed before it was answered (its claim is gone: another attempt may take over).
    Failed,
}

type Key = (UserId, String);

struct Entry {
    conv: ConversationId,
    content: String,
    state: watch::Sender<SendState>,
    /// Which insertion this is (the order queue may hold an older, removed one of the same key).
    serial: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    order: VecDeque<(Key, u64)>,
    next: u64,
}

/// The sends this node answered or is answering.
pub struct RecentSends {
    inner: Mutex<Inner>,
    max: usize,
}

/// What a new attempt of a key finds.
pub enum Claim<'a> {
    /// Nobody on this node has it: this attempt does the send and answers the others.
    Mine(ClaimGuard<'a>),
    /// An earlier attempt was answered with this.
    Done(SendDone),
    /// An earlier attempt was for another conversation or other content.
    Reused,
    /// An attempt is under way: wait for its answer.
    Wait(watch::Receiver<SendState>),
}

/// The attempt that does a send. Dropped before [`ClaimGuard::done`], it fails: waiters try
/// again and the key is free.
pub struct ClaimGuard<'a> {
    sends: &'a RecentSends,
    key: Key,
    serial: u64,
    finished: bool,
}

impl RecentSends {
    pub fn new(max: usize) -> Self {
        RecentSends { inner: Mutex::new(Inner::default()), max: max.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` for a send of `content` to `conv`, or finds the attempt that has it.
    pub fn claim(&self, key: &Key, conv: &ConversationId, content: &str) -> Claim<'_> {
        let mut inner = self.lock();
        if let Some(e) = inner.map.get(key) {
            if &e.conv != conv || e.content != content {
                return Claim::Reused;
            }
            let state = e.state.borrow().clone();
            return match state {
                SendState::Done(done) => Claim::Done(done),
                SendState::Pending | SendState::Failed => Claim::Wait(e.state.subscribe()),
            };
        }
        inner.next += 1;
        let serial = inner.next;
        inner.map.insert(key.clone(), Entry { conv: conv.clone(), content: content.to_owned(), state: watch::channel(SendState::Pending).0, serial });
        inner.order.push_back((key.clone(), serial));
        while inner.map.len() > self.max {
            let Some((old, s)) = inner.order.pop_front() else { break };
            if inner.map.get(&old).is_some_and(|e| e.serial == s) {
                inner.map.remove(&old);
            }
        }
        Claim::Mine(ClaimGuard { sends: self, key: key.clone(), serial, finished: false })
    }
}

impl ClaimGuard<'_> {
    /// The send is answered: remembered, and every waiter gets the same answer.
    pub fn done(mut self, done: SendDone) {
        self.finished = true;
        if let Some(e) = self.sends.lock().map.get(&self.key).filter(|e| e.serial == self.serial) {
            e.state.send_replace(SendState::Done(done));
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut inner = self.sends.lock();
        if inner.map.get(&self.key).is_some_and(|e| e.serial == self.serial) {
            if let Some(e) = inner.map.remove(&self.key) {
                e.state.send_replace(SendState::Failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        (UserId(uuid::Uuid::from_u128(1)), n.to_owned())
    }

    #[tokio::test]
    async fn a_second_attempt_waits_for_the_first_and_gets_its_answer() {
        let sends = RecentSends::new(10);
        let conv = ConversationId::direct(UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        let Claim::Mine(first) = sends.claim(&key("a"), &conv, "h") else { panic!("the first attempt claims") };
        let Claim::Wait(mut rx) = sends.claim(&key("a"), &conv, "h") else { panic!("the second waits") };
        assert!(matches!(sends.claim(&key("a"), &conv, "other"), Claim::Reused), "other content is a reuse");
        let done = SendDone { message_id: MessageId::new_v7(), sent_at: Utc::now(), decided: false };
        first.done(done.clone());
        rx.wait_for(|s| *s != SendState::Pending).await.unwrap();
        assert_eq!(*rx.borrow(), SendState::Done(done.clone()));
        assert!(matches!(sends.claim(&key("a"), &conv, "h"), Claim::Done(d) if d == done), "a later retry is answered at once");
    }

    #[tokio::test]
    async fn a_failed_attempt_frees_the_key() {
        let sends = RecentSends::new(10);
        let conv = ConversationId::direct(UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        let Claim::Mine(first) = sends.claim(&key("a"), &conv, "h") else { panic!() };
        let Claim::Wait(mut rx) = sends.claim(&key("a"), &conv, "h") else { panic!() };
        drop(first);
        rx.wait_for(|s| *s != SendState::Pending).await.unwrap();
        assert_eq!(*rx.borrow(), SendState::Failed);
        assert!(matches!(sends.claim(&key("a"), &conv, "h"), Claim::Mine(_)), "the next attempt claims it");
    }

    #[test]
    fn the_oldest_are_forgotten_beyond_the_bound() {
        let sends = RecentSends::new(2);
        let conv = ConversationId::direct(UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        for n in ["a", "b", "c"] {
            let Claim::Mine(c) = sends.claim(&key(n), &conv, "h") else { panic!() };
            c.done(SendDone { message_id: MessageId::new_v7(), sent_at: Utc::now(), decided: false });
        }
        assert!(matches!(sends.claim(&key("a"), &conv, "h"), Claim::Mine(_)), "a was forgotten");
        assert!(matches!(sends.claim(&key("c"), &conv, "h"), Claim::Done(_)));
    }
}

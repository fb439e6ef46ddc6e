//! Passwords (argon2id) and bearer tokens (HS256 JWTs signed with a secret shared by all
//! gateway nodes, with an expiry).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chat_events::UserId;
use chrono::{DateTime, Utc};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Signs and checks tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: chrono::Duration,
    ids: crate::message_ids::MessageIds,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    iat: i64,
    /// `iat` in milliseconds: a revocation ends the tokens issued at or before its time.
    #[serde(default)]
    iat_ms: i64,
    exp: i64,
    /// analyst, auditor (as granted when the token was issued).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
}

/// Who a valid token names.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub user_id: UserId,
    pub username: String,
    /// When the token stops being valid (an open WebSocket is closed then).
    pub expires_at: DateTime<Utc>,
    /// When the token was issued (ms since the epoch): a session revocation at or after it ends
    /// the token.
    pub issued_at_ms: i64,
    pub roles: Vec<String>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Auditors read; they never send or change anything.
    pub fn read_only(&self) -> bool {
        self.has_role("auditor")
    }
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: chrono::Duration) -> Self {
        Tokens { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), ttl, ids: crate::message_ids::MessageIds::new(secret) }
    }

    /// Message ids, tagged with a key derived from the same secret (see
    /// [`crate::message_ids`]).
    pub fn message_ids(&self) -> &crate::message_ids::MessageIds {
        &self.ids
    }

    /// How long a token lives.
    pub fn ttl(&self) -> chrono::Duration {
        self.ttl
    }

    /// A token for a user, and when it expires. Issued after `after_ms` (the user's latest
    /// session revocation): a clock behind the revoking one cannot mint an already revoked token.
    pub fn issue(&self, user: UserId, username: &str, roles: Vec<String>, after_ms: i64) -> Result<(String, DateTime<Utc>), jsonwebtoken::errors::Error> {
        let now = Utc::now();
        let iat_ms = now.timestamp_millis().max(after_ms.saturating_add(1));
        let exp = now + self.ttl;
        let claims =
            Claims { sub: user.to_string(), name: username.to_owned(), iat: iat_ms.div_euclid(1000), iat_ms, exp: exp.timestamp(), roles };
        Ok((encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?, exp))
    }

    /// The principal of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 5;
        let data = decode::<Claims>(token, &self.decoding, &v).ok()?;
        Some(Principal {
            user_id: data.claims.sub.parse().ok()?,
            username: data.claims.name,
            expires_at: DateTime::from_timestamp(data.claims.exp, 0)?,
            // Tokens from before `iat_ms` existed: their second, rounded up (ended by a
            // revocation in that second).
            issued_at_ms: if data.claims.iat_ms > 0 { data.claims.iat_ms } else { data.claims.iat.saturating_mul(1000).saturating_add(999) },
            roles: data.claims.roles,
        })
    }
}

/// The password-hashing pool: a thread per core behind bounded queues. Two lanes: log-ins are
/// taken before registrations, so a registration burst (from many addresses) delays a log-in by
/// at most the hashes already running, never by the registrations queued ahead of it. Each lane
/// holds at most `queue` jobs; past that a job is refused at once (`503 overloaded`). Within a
/// lane the jobs of different client addresses take turns (round robin), so an address with many
/// jobs queued delays another address's job by at most one of its own hashes per thread, not by
/// its whole backlog.
pub struct KdfPool {
    shared: std::sync::Arc<KdfShared>,
}

/// Which lane a job waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfLane {
    LogIn,
    Registration,
}

type KdfJob = Box<dyn FnOnce() + Send>;

struct KdfShared {
    lanes: std::sync::Mutex<KdfLanes>,
    ready: std::sync::Condvar,
    queue: usize,
}

#[derive(Default)]
struct KdfLanes {
    log_ins: FairQueue,
    registrations: FairQueue,
}

/// The jobs of one lane, a queue per client address (`None`: in-process callers), served in turn.
#[derive(Default)]
struct FairQueue {
    by_key: std::collections::HashMap<Option<std::net::IpAddr>, std::collections::VecDeque<KdfJob>>,
    /// The keys with jobs, in the order they are served next.
    turns: std::collections::VecDeque<Option<std::net::IpAddr>>,
    len: usize,
}

impl FairQueue {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, key: Option<std::net::IpAddr>, job: KdfJob) {
        let q = self.by_key.entry(key).or_default();
        if q.is_empty() {
            self.turns.push_back(key);
        }
        q.push_back(job);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<KdfJob> {
        let key = self.turns.pop_front()?;
        let q = self.by_key.get_mut(&key)?;
        let job = q.pop_front();
        if q.is_empty() {
            self.by_key.remove(&key);
        } else {
            self.turns.push_back(key);
        }
        self.len -= usize::from(job.is_some());
        job
    }
}

impl KdfPool {
    pub fn new(threads: usize, queue: usize) -> Self {
        let shared = std::sync::Arc::new(KdfShared { lanes: Default::default(), ready: std::sync::Condvar::new(), queue: queue.max(1) });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("chat-kdf-{i}")).spawn(move || loop {
                let job = {
                    let mut lanes = shared.lanes.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(job) = lanes.log_ins.pop().or_else(|| lanes.registrations.pop()) {
                            break job;
                        }
                        lanes = shared.ready.wait(lanes).unwrap_or_else(|p| p.into_inner());
                    }
                };
                job();
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password-hashing thread");
            }
        }
        KdfPool { shared }
    }

    /// Runs `f` on the pool in `lane`, in turn with the other addresses' jobs (`from`: the
    /// client's address); `None` if that lane's queue is full.
    pub async fn run<T: Send + 'static>(&self, lane: KdfLane, from: Option<std::net::IpAddr>, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut lanes = self.shared.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let q = match lane {
                KdfLane::LogIn => &mut lanes.log_ins,
                KdfLane::Registration => &mut lanes.registrations,
            };
            if q.len() >= self.shared.queue {
                return None;
            }
            q.push(
                from,
                Box::new(move || {
                    let _ = tx.send(f());
                }),
            );
        }
        self.shared.ready.notify_one();
        rx.await.ok()
    }
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    let salt = SaltString::encode_b64(&bytes)?;
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

/// Checks a password against a stored PHC hash.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log-in queued behind registrations is hashed before them; a full lane refuses at once
    /// and does not refuse the other lane.
    #[tokio::test]
    async fn log_ins_go_before_queued_registrations() {
        let pool = std::sync::Arc::new(KdfPool::new(1, 4));
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        // Hold the one thread until the queues are filled.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let (pool, started) = (pool.clone(), started.clone());
            tokio::spawn(async move {
                pool.run(KdfLane::Registration, None, move || {
                    started.store(true, std::sync::atomic::Ordering::SeqCst);
                    hold.recv().ok()
                })
                .await
            })
        };
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let mut jobs = Vec::new();
        for i in 0..4 {
            let (pool, order) = (pool.clone(), order.clone());
            jobs.push(tokio::spawn(async move { pool.run(KdfLane::Registration, None, move || order.lock().unwrap().push(format!("r{i}"))).await }));
        }
        while pool.shared.lanes.lock().unwrap().registrations.len() < 4 {
            tokio::task::yield_now().await;
        }
        assert!(pool.run(KdfLane::Registration, None, || ()).await.is_none(), "the registrations' lane is full");
        let login = {
            let (pool, order) = (pool.clone(), order.clone());
            tokio::spawn(async move { pool.run(KdfLane::LogIn, None, move || order.lock().unwrap().push("login".to_owned())).await })
        };
        while pool.shared.lanes.lock().unwrap().log_ins.len() == 0 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert!(busy.await.unwrap().is_some());
        assert!(login.await.unwrap().is_some());
        for j in jobs {
            assert!(j.await.unwrap().is_some());
        }
        assert_eq!(order.lock().unwrap().first().map(String::as_str), Some("login"), "{:?}", order.lock().unwrap());
    }

    /// Addresses take turns within a lane: an address with many log-ins queued delays another
    /// address's log-in by one job, not by its backlog.
    #[test]
    fn addresses_take_turns_in_a_lane() {
        let ip = |n: u8| Some(std::net::IpAddr::from([127, 0, 0, n]));
        let mut q = FairQueue::default();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let job = |name: &'static str| -> KdfJob {
            let order = order.clone();
            Box::new(move || order.lock().unwrap().push(name))
        };
        for name in ["f1", "f2", "f3", "f4"] {
            q.push(ip(2), job(name));
        }
        q.push(ip(3), job("user"));
        q.push(None, job("local"));
        q.push(ip(3), job("user2"));
        assert_eq!(q.len(), 7);
        while let Some(j) = q.pop() {
            j();
        }
        assert_eq!(q.len(), 0);
        assert!(q.by_key.is_empty() && q.turns.is_empty());
        assert_eq!(*order.lock().unwrap(), ["f1", "user", "local", "f2", "user2", "f3", "f4"]);
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let t = Tokens::new(b"secret-secret-secret-secret-1234", chrono::Duration::hours(1));
        let u = UserId::random();
        let (tok, _) = t.issue(u, "alice", vec!["auditor".into()], 0).unwrap();
        let p = t.verify(&tok).unwrap();
        assert_eq!(p.user_id, u);
        assert!((p.issued_at_ms - Utc::now().timestamp_millis()).abs() < 5_000);
        // Issued after a revocation stamped by a clock ahead of this one.
        let ahead = Utc::now().timestamp_millis() + 60_000;
        let (tok, _) = t.issue(u, "alice", Vec::new(), ahead).unwrap();
        assert_eq!(t.verify(&tok).unwrap().issued_at_ms, ahead + 1);
        assert!(p.has_role("auditor") && p.read_only() && !p.has_role("analyst"));
        let other = Tokens::new(b"another-secret-another-secret-12", chrono::Duration::hours(1));
        assert!(other.verify(&tok).is_none());
        assert!(t.verify("garbage").is_none());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let t = Tokens::new(b"secret-secret-secret-secret-1234", chrono::Duration::seconds(-60));
        let (tok, _) = t.issue(UserId::random(), "alice", Vec::new(), 0).unwrap();
        assert!(t.verify(&tok).is_none());
    }

    #[test]
    fn passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }
}

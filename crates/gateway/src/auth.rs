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

/// Runs password hashing (argon2id: 19 MiB and tens of milliseconds of CPU each) on a fixed
/// set of threads, one per core, behind a bounded queue. Unbounded `spawn_blocking` let a burst
/// of log-ins run hundreds of hashes at once, and the C allocator kept their memory in one arena
/// per thread: 2.8 GB of RSS after 100 registrations. Here at most `threads` hashes are live and
/// a full queue answers `overloaded` at once.
pub struct KdfPool {
    jobs: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

impl KdfPool {
    pub fn new(threads: usize, queue: usize) -> Self {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(queue);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("chat-kdf-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password-hashing thread");
            }
        }
        KdfPool { jobs }
    }

    /// Runs `f` on the pool; `None` if the queue is full or the pool is gone.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
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

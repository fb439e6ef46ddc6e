//! Attempt limits for the endpoints an attacker can hammer without an account: log-in
//! (brute force on one account, or a flood that takes the password-hashing queue) and
//! registration (mass account creation).
//!
//! Counted in this node's memory, per key (an account name, a peer address), in a sliding
//! window; bounded in keys. With N gateway nodes behind a balancer, a client spreading its
//! attempts over them gets up to N times each limit (see docs/protocol.md, "Limits").

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked per limiter, at most; past it the expired ones are dropped, then the oldest.
const MAX_KEYS: usize = 100_000;

/// At most `max` events per key within `window`.
pub struct Window<K> {
    max: usize,
    window: Duration,
    keys: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Hash + Eq + Clone> Window<K> {
    pub fn new(max: usize, window: Duration) -> Self {
        Window { max: max.max(1), window, keys: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, VecDeque<Instant>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long until `key` may have one more event (none: now).
    pub fn wait(&self, key: &K) -> Option<Duration> {
        let now = Instant::now();
        let mut keys = self.lock();
        let events = keys.get_mut(key)?;
        while events.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
            events.pop_front();
        }
        if events.len() < self.max {
            return None;
        }
        events.front().map(|oldest| self.window.saturating_sub(now.duration_since(*oldest)))
    }

    /// Counts an event of `key`.
    pub fn add(&self, key: K) {
        let now = Instant::now();
        let mut keys = self.lock();
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            keys.retain(|_, events| events.back().is_some_and(|t| now.duration_since(*t) < self.window));
            if keys.len() >= MAX_KEYS {
                // Still full of live keys: forget the one whose last event is oldest.
                if let Some(oldest) = keys.iter().min_by_key(|(_, e)| e.back().copied()).map(|(k, _)| k.clone()) {
                    keys.remove(&oldest);
                }
            }
        }
        let events = keys.entry(key).or_default();
        events.push_back(now);
        while events.len() > self.max {
            events.pop_front();
        }
    }

    /// Forgets `key` (a successful log-in clears the account's failures).
    pub fn clear(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Checks and counts in one step: `Err(wait)` if the key is at its limit.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        if let Some(w) = self.wait(&key) {
            return Err(w);
        }
        self.add(key);
        Ok(())
    }
}

/// At most `max` operations per key under way at once.
pub struct InFlight<K> {
    max: usize,
    keys: Mutex<HashMap<K, usize>>,
}

/// One operation under way; ends when dropped.
pub struct Slot<'a, K: Hash + Eq + Clone> {
    owner: &'a InFlight<K>,
    key: K,
}

impl<K: Hash + Eq + Clone> InFlight<K> {
    pub fn new(max: usize) -> Self {
        InFlight { max: max.max(1), keys: Mutex::new(HashMap::new()) }
    }

    /// A slot for `key`, unless it has `max` under way.
    pub fn enter(&self, key: K) -> Option<Slot<'_, K>> {
        self.take(&key).then_some(Slot { owner: self, key })
    }

    /// Counts one more for `key`, unless it has `max` under way.
    fn take(&self, key: &K) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let n = keys.entry(key.clone()).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }
}

/// A slot that owns its counter: held as long as a connection lives (a task of its own).
pub struct OwnedSlot<K: Hash + Eq + Clone> {
    owner: std::sync::Arc<InFlight<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> InFlight<K> {
    /// [`InFlight::enter`], for a slot that outlives the borrow: taken and counted at once, so
    /// operations started together cannot all pass a check made before any is counted.
    pub fn enter_owned(self: &std::sync::Arc<Self>, key: K) -> Option<OwnedSlot<K>> {
        self.take(&key).then(|| OwnedSlot { owner: self.clone(), key })
    }

    fn leave(&self, key: &K) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                keys.remove(key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for OwnedSlot<K> {
    fn drop(&mut self) {
        self.owner.leave(&self.key);
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<'_, K> {
    fn drop(&mut self) {
        self.owner.leave(&self.key);
    }
}

/// A token bucket per key: `rate` events a second on average, up to `burst` at once.
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    keys: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: f64, burst: f64) -> Self {
        Buckets { rate: rate.max(f64::MIN_POSITIVE), burst: burst.max(1.0), keys: Mutex::new(HashMap::new()) }
    }

    /// Takes one token of `key`: `Err(wait)` until one is there.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            // A bucket that has refilled is the same as no bucket.
            let (rate, burst) = (self.rate, self.burst);
            keys.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = keys.entry(key).or_insert((self.burst, now));
        let available = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        if available < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - available) / self.rate));
        }
        *tokens = available - 1.0;
        *at = now;
        Ok(())
    }
}

/// The window of the log-in failure limits.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The window of the registration limit.
pub const REGISTRATION_WINDOW: Duration = Duration::from_secs(60 * 60);

/// The limits of the account endpoints; a limit configured as 0 is off.
pub struct AccountLimits {
    /// Failed log-ins per account name, in [`LOGIN_WINDOW`].
    pub failures_per_account: Option<Window<String>>,
    /// Failed log-ins per peer address, in [`LOGIN_WINDOW`].
    pub failures_per_address: Option<Window<IpAddr>>,
    /// Log-ins and registrations of one address waiting for or in password hashing: one address
    /// cannot take the whole hashing queue.
    pub hashing_per_address: InFlight<IpAddr>,
    /// Registrations per peer address, in [`REGISTRATION_WINDOW`].
    pub registrations_per_address: Option<Window<IpAddr>>,
}

impl AccountLimits {
    /// `hashing_queue`: the password-hashing queue's length (one address may fill a quarter).
    pub fn new(failures_per_account: usize, failures_per_address: usize, registrations_per_address: usize, hashing_queue: usize) -> Self {
        AccountLimits {
            failures_per_account: (failures_per_account > 0).then(|| Window::new(failures_per_account, LOGIN_WINDOW)),
            failures_per_address: (failures_per_address > 0).then(|| Window::new(failures_per_address, LOGIN_WINDOW)),
            hashing_per_address: InFlight::new(hashing_queue / 4),
            registrations_per_address: (registrations_per_address > 0).then(|| Window::new(registrations_per_address, REGISTRATION_WINDOW)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_refuses_past_its_limit_and_says_how_long_to_wait() {
        let w = Window::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(w.take("a").is_ok());
        }
        let wait = w.take("a").expect_err("the fourth is refused");
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60), "{wait:?}");
        assert!(w.take("b").is_ok(), "keys are separate");
        w.clear(&"a");
        assert!(w.take("a").is_ok(), "cleared");
    }

    #[test]
    fn events_leave_the_window() {
        let w = Window::new(1, Duration::from_millis(30));
        assert!(w.take(1).is_ok());
        assert!(w.take(1).is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(w.take(1).is_ok());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = Buckets::new(10.0, 3.0);
        for _ in 0..3 {
            assert!(b.take("u").is_ok());
        }
        let wait = b.take("u").expect_err("the burst is spent");
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(b.take("v").is_ok(), "per key");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(b.take("u").is_ok(), "one token came back");
    }

    #[test]
    fn in_flight_slots_are_per_key_and_freed_on_drop() {
        let f = InFlight::new(2);
        let a1 = f.enter("a").expect("first");
        let _a2 = f.enter("a").expect("second");
        assert!(f.enter("a").is_none(), "third refused");
        assert!(f.enter("b").is_some());
        drop(a1);
        assert!(f.enter("a").is_some(), "a slot came back");
        // Owned slots count with the borrowed ones and are freed on drop too.
        let f = std::sync::Arc::new(InFlight::new(2));
        let o1 = f.enter_owned("a").expect("first");
        let _b = f.enter("a").expect("second");
        assert!(f.enter_owned("a").is_none(), "third refused");
        drop(o1);
        assert!(f.enter_owned("a").is_some(), "a slot came back");
    }
}

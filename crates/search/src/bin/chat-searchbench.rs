//! Search benchmark: builds an index of one user's conversations (and other users' beside them,
//! as in the shared index) and measures the latency of that user's searches.
//!
//! ```text
//! cargo run --release -p chat-search --bin chat-searchbench -- [messages-of-the-user] [messages-of-others] [queries] [dir]
//! ```
//!
//! Defaults: 1,000,000 messages of the user over 200 direct conversations and 20 groups (a
//! member of each since its start), 1,000,000 of other users' conversations, 2,000 searches of
//! one or two words drawn with the words' own frequencies (Zipf over a 20,000-word vocabulary),
//! each for the newest 20 results, half of them the next page. Prints indexing throughput and
//! search latency percentiles as JSON.

use std::time::Instant;

use chat_events::{ConversationId, GroupId, MessageId, MessageKind, UserId};
use chat_search::{IndexOp, MessageDoc, Scope, SearchIndex, SearchQuery};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Word ranks with Zipf(1) frequencies, by inverse transform over the cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                acc += 1.0 / k as f64;
                acc
            })
            .collect();
        Zipf { cumulative }
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.unit() * total;
        self.cumulative.partition_point(|c| *c < x).min(self.cumulative.len() - 1)
    }
}

fn word(rank: usize) -> String {
    // Distinct pronounceable words: syllables of the rank in base 20.
    const SYL: [&str; 20] = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fe", "gu", "hi", "ja", "ko", "be", "ci", "wu", "yo"];
    let mut n = rank + 20;
    let mut w = String::new();
    while n > 0 {
        w.push_str(SYL[n % 20]);
        n /= 20;
    }
    w
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (mine, others, queries) = (arg(1, 1_000_000), arg(2, 1_000_000), arg(3, 2_000));
    let dir = args.get(4).map(std::path::PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join(format!("chat-searchbench-{}", std::process::id())));
    // `reuse` (fifth argument): search an index a run with the same dir and counts left.
    let reuse = args.get(5).is_some_and(|a| a == "reuse");
    if !reuse {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let index = SearchIndex::open(&dir).expect("open the index");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let vocabulary = 20_000;
    let zipf = Zipf::new(vocabulary);
    let words: Vec<String> = (0..vocabulary).map(word).collect();

    let user = UserId(uuid::Uuid::from_u128(1));
    let peers: Vec<UserId> = (0..200u128).map(|i| UserId(uuid::Uuid::from_u128(1000 + i))).collect();
    let directs: Vec<ConversationId> = peers.iter().map(|p| ConversationId::direct(user, *p)).collect();
    let groups: Vec<ConversationId> = (0..20u128).map(|i| ConversationId::group(GroupId(uuid::Uuid::from_u128(5000 + i)))).collect();
    let strangers: Vec<ConversationId> =
        (0..2_000u128).map(|i| ConversationId::direct(UserId(uuid::Uuid::from_u128(10_000 + i)), UserId(uuid::Uuid::from_u128(20_000 + i)))).collect();

    // Messages a millisecond apart, the user's and the others' interleaved.
    let t0: u128 = 1_700_000_000_000;
    let total = mine + others;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    let mut positions = vec![0i64; groups.len()];
    for n in 0..if reuse { 0 } else { total } {
        let ms = t0 + n as u128;
        let id = MessageId(uuid::Uuid::from_u128((ms << 80) | (0x7000u128 << 64) | (0x8000u128 << 48) | n as u128));
        let theirs = mine > 0 && (others == 0 || (n as u64 * mine as u64 / total as u64) != ((n as u64 + 1) * mine as u64 / total as u64));
        let (conv, sender, position) = if theirs {
            if rng.below(10) < 7 {
                let i = rng.below(directs.len() as u64) as usize;
                (directs[i].clone(), if rng.below(2) == 0 { user } else { peers[i] }, 0)
            } else {
                let i = rng.below(groups.len() as u64) as usize;
                positions[i] += 1;
                (groups[i].clone(), peers[rng.below(peers.len() as u64) as usize], positions[i])
            }
        } else {
            let i = rng.below(strangers.len() as u64) as usize;
            (strangers[i].clone(), UserId(uuid::Uuid::from_u128(10_000 + i as u128)), 0)
        };
        let len = 6 + rng.below(10) as usize;
        let body: Vec<&str> = (0..len).map(|_| words[zipf.sample(&mut rng)].as_str()).collect();
        batch.push(IndexOp::Put(MessageDoc {
            message_id: id,
            conversation_id: conv,
            sender,
            kind: MessageKind::Text,
            body: body.join(" "),
            sent_at: chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default(),
            position,
        }));
        if batch.len() == 10_000 {
            index.apply(std::mem::take(&mut batch)).expect("apply");
        }
        if (n + 1) % 200_000 == 0 {
            index.commit().expect("commit");
        }
    }
    index.apply(batch).expect("apply");
    index.commit().expect("commit");
    let indexing = started.elapsed().as_secs_f64();
    eprintln!("indexed {total} messages in {indexing:.1} s");

    let mut scope = Scope { user: Some(user), groups: groups.iter().map(|g| (g.clone(), vec![(0, None)])).collect(), conversation: None };
    if std::env::var_os("SB_NO_GROUPS").is_some() {
        scope.groups.clear();
    }
    let mut lat = Vec::with_capacity(queries);
    let mut hits_total = 0usize;
    let mut empty = 0usize;
    for q in 0..queries {
        let n_words = 1 + rng.below(2) as usize;
        let text: Vec<&str> = (0..n_words).map(|_| words[zipf.sample(&mut rng)].as_str()).collect();
        let query = SearchQuery { text: text.join(" "), scope: scope.clone(), before: None, limit: 20 };
        let t = Instant::now();
        let hits = index.search(&query).expect("query").expect("search");
        // Half the searches also read the next page.
        let more = if q % 2 == 1 && hits.len() == 20 {
            let next = SearchQuery { before: hits.last().map(|h| h.message_id), ..query };
            index.search(&next).expect("query").expect("search").len()
        } else {
            0
        };
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        hits_total += hits.len() + more;
        if hits.is_empty() {
            empty += 1;
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let report = serde_json_like(&[
        ("messages_of_the_user", mine as f64),
        ("messages_of_others", others as f64),
        ("indexing_seconds", indexing),
        ("indexed_per_second", total as f64 / indexing),
        ("searches", queries as f64),
        ("searches_with_no_result", empty as f64),
        ("results_per_search", hits_total as f64 / queries.max(1) as f64),
        ("p50_ms", percentile(&lat, 0.50)),
        ("p95_ms", percentile(&lat, 0.95)),
        ("p99_ms", percentile(&lat, 0.99)),
        ("max_ms", lat.last().copied().unwrap_or(0.0)),
        ("index_bytes", dir_size(&dir) as f64),
    ]);
    println!("{report}");
    if !reuse && args.get(5).is_none_or(|a| a != "keep") {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn serde_json_like(fields: &[(&str, f64)]) -> String {
    let parts: Vec<String> = fields.iter().map(|(k, v)| if v.fract() == 0.0 { format!("\"{k}\":{v:.0}") } else { format!("\"{k}\":{v:.2}") }).collect();
    format!("{{{}}}", parts.join(","))
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

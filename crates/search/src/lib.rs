//! The message search index: one tantivy document per message of a conversation (not per
//! recipient), written from the fan-out's output by a single indexer, and queried with the
//! reader's history rule (a direct conversation of theirs; a group message positioned inside one
//! of their membership intervals).
//!
//! Documents hold the message's id, conversation, sender, kind, time, group position and text
//! (tokenised by [`ANALYZER`]: words split on non-alphanumerics, lower-cased, accents folded, so
//! `Café` finds `cafe`). An edit replaces the document's text; a delete for everyone removes the
//! document. Every change is idempotent (a document is replaced by id), so the indexer may apply
//! a record again after a crash; [`SearchIndex::commit`] makes the changes so far durable and
//! visible to searches, and the indexer stores its offsets only after it.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use chat_events::{ConversationId, MessageId, MessageKind, UserId};
use chrono::{DateTime, Utc};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED, STRING,
};
use tantivy::tokenizer::{AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer, TokenStream};
use tantivy::{doc, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term};

/// The name of the text analyzer of message bodies (and of queries).
pub const ANALYZER: &str = "chat_text";

/// Words of a query, at most.
pub const MAX_QUERY_TERMS: usize = 10;

/// Results per page, at most.
pub const MAX_LIMIT: usize = 100;

/// Memory of the index writer's buffer (tantivy splits it over its indexing threads).
const WRITER_MEMORY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search index: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("search index directory: {0}")]
    Dir(#[from] tantivy::directory::error::OpenDirectoryError),
    #[error("search index: {0}")]
    Io(#[from] std::io::Error),
}

pub type SearchResult<T> = Result<T, SearchError>;

/// A message as indexed.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageDoc {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub kind: MessageKind,
    pub body: String,
    pub sent_at: DateTime<Utc>,
    /// Offset of the message in its group's partition (0 for a direct message).
    pub position: i64,
}

/// One change to the index.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexOp {
    /// A message (again: it replaces the document of the same id).
    Put(MessageDoc),
    /// Its sender edited it: the text is now `body`.
    Edit { message_id: MessageId, body: String },
    /// It was deleted for everyone.
    Remove { message_id: MessageId },
}

/// A reader's membership intervals of a group: `[since, until)` positions (`until` none: still a
/// member).
pub type Intervals = Vec<(i64, Option<i64>)>;

/// What a reader may search: every message of their direct conversations, and of each group the
/// messages positioned inside one of their membership intervals `[since, until)`.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub user: Option<UserId>,
    pub groups: Vec<(ConversationId, Intervals)>,
    /// Only this conversation (which must be one the scope covers).
    pub conversation: Option<ConversationId>,
}

/// A search: the words (all must match), where, and the page.
#[derive(Clone, Debug)]
pub struct SearchQuery {
    pub text: String,
    pub scope: Scope,
    /// Only messages older than this one (the previous page's cursor).
    pub before: Option<MessageId>,
    pub limit: usize,
}

/// One message found.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub kind: String,
    pub body: String,
    pub sent_at: DateTime<Utc>,
    /// The message's position in its group's partition (0 for a direct message).
    pub position: i64,
}

/// Why a query is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("the query has no words")]
    Empty,
    #[error("the query has more than {MAX_QUERY_TERMS} words")]
    TooManyTerms,
}

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    conv: Field,
    member: Field,
    position: Field,
    order: Field,
    sender: Field,
    kind: Field,
    body: Field,
    sent: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text = TextOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer(ANALYZER).set_index_option(IndexRecordOption::Basic))
        .set_stored();
    let fields = Fields {
        id: b.add_text_field("id", STRING | STORED),
        conv: b.add_text_field("conv", STRING | STORED),
        member: b.add_text_field("member", STRING),
        position: b.add_i64_field("position", NumericOptions::default().set_fast().set_stored()),
        order: b.add_u64_field("order", INDEXED | FAST),
        sender: b.add_text_field("sender", STRING | STORED),
        kind: b.add_text_field("kind", STRING | STORED),
        body: b.add_text_field("body", text),
        sent: b.add_i64_field("sent", STORED),
    };
    (b.build(), fields)
}

/// The analyzer of bodies and queries.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default()).filter(RemoveLongFilter::limit(40)).filter(LowerCaser).filter(AsciiFoldingFilter).build()
}

/// The words of a text as indexed.
pub fn words(text: &str) -> Vec<String> {
    let mut a = analyzer();
    let mut stream = a.token_stream(text);
    let mut out = Vec::new();
    while let Some(t) = stream.next() {
        if !out.contains(&t.text) {
            out.push(t.text.clone());
        }
    }
    out
}

/// The order of a message id: its top 64 bits (a v7 id's millisecond time first), so that newer
/// messages sort first; ties (the same millisecond and 12 random bits) are broken by the id.
fn order_of(id: MessageId) -> u64 {
    (id.as_uuid().as_u128() >> 64) as u64
}

/// The index and its one writer.
pub struct SearchIndex {
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    /// Documents put since the last commit (an edit of one of them needs its other fields,
    /// which a search does not see before the commit).
    pending: Mutex<HashMap<MessageId, MessageDoc>>,
    f: Fields,
}

impl SearchIndex {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> SearchResult<SearchIndex> {
        std::fs::create_dir_all(dir)?;
        let (schema, f) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir)?;
        let index = Index::open_or_create(directory, schema)?;
        Self::with_index(index, f)
    }

    /// An index in memory (tests).
    pub fn in_memory() -> SearchResult<SearchIndex> {
        let (schema, f) = schema();
        Self::with_index(Index::create_in_ram(schema), f)
    }

    fn with_index(index: Index, f: Fields) -> SearchResult<SearchIndex> {
        index.tokenizers().register(ANALYZER, analyzer());
        // One indexing thread: the projection workers and the gateway share the machine.
        let writer = index.writer_with_num_threads(1, WRITER_MEMORY)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(SearchIndex { reader, writer: Mutex::new(writer), pending: Mutex::new(HashMap::new()), f })
    }

    fn document(&self, d: &MessageDoc) -> TantivyDocument {
        let f = &self.f;
        let mut doc = doc!(
            f.id => d.message_id.to_string(),
            f.conv => d.conversation_id.as_str(),
            f.position => d.position,
            f.order => order_of(d.message_id),
            f.sender => d.sender.to_string(),
            f.kind => d.kind.as_str(),
            f.body => d.body.as_str(),
            f.sent => d.sent_at.timestamp_millis(),
        );
        if let Some((a, b)) = d.conversation_id.direct_members() {
            doc.add_text(f.member, a.to_string());
            doc.add_text(f.member, b.to_string());
        }
        doc
    }

    /// Applies changes (visible to searches after the next [`SearchIndex::commit`]).
    pub fn apply(&self, ops: Vec<IndexOp>) -> SearchResult<()> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            match op {
                IndexOp::Put(d) => {
                    writer.delete_term(Term::from_field_text(self.f.id, &d.message_id.to_string()));
                    writer.add_document(self.document(&d))?;
                    pending.insert(d.message_id, d);
                }
                IndexOp::Edit { message_id, body } => {
                    let Some(mut d) = pending.get(&message_id).cloned().or(self.stored(message_id)?) else { continue };
                    d.body = body;
                    writer.delete_term(Term::from_field_text(self.f.id, &message_id.to_string()));
                    writer.add_document(self.document(&d))?;
                    pending.insert(message_id, d);
                }
                IndexOp::Remove { message_id } => {
                    writer.delete_term(Term::from_field_text(self.f.id, &message_id.to_string()));
                    pending.remove(&message_id);
                }
            }
        }
        Ok(())
    }

    /// Makes every change applied so far durable and visible to searches.
    pub fn commit(&self) -> SearchResult<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.commit()?;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        drop(writer);
        self.reader.reload()?;
        Ok(())
    }

    /// Removes every document (a rebuild from offset zero).
    pub fn clear(&self) -> SearchResult<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.delete_all_documents()?;
        writer.commit()?;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        drop(writer);
        self.reader.reload()?;
        Ok(())
    }

    /// How many documents searches see.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Whether searches see no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The committed document of a message.
    fn stored(&self, id: MessageId) -> SearchResult<Option<MessageDoc>> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(Term::from_field_text(self.f.id, &id.to_string()), IndexRecordOption::Basic);
        let Some((_, addr)) = searcher.search(&q, &TopDocs::with_limit(1).order_by_score())?.into_iter().next() else { return Ok(None) };
        let doc: TantivyDocument = searcher.doc(addr)?;
        Ok(self.hit(&doc).map(|h| MessageDoc {
            message_id: h.message_id,
            conversation_id: h.conversation_id,
            sender: h.sender,
            kind: MessageKind::parse(&h.kind).unwrap_or(MessageKind::Text),
            body: h.body,
            sent_at: h.sent_at,
            position: h.position,
        }))
    }

    fn hit(&self, doc: &TantivyDocument) -> Option<Hit> {
        let text = |field: Field| doc.get_first(field).and_then(|v| v.as_str()).map(str::to_owned);
        Some(Hit {
            message_id: text(self.f.id)?.parse().ok()?,
            conversation_id: text(self.f.conv)?.parse().ok()?,
            sender: text(self.f.sender)?.parse().ok()?,
            kind: text(self.f.kind)?,
            body: text(self.f.body)?,
            sent_at: DateTime::from_timestamp_millis(doc.get_first(self.f.sent).and_then(|v| v.as_i64())?)?,
            position: doc.get_first(self.f.position).and_then(|v| v.as_i64()).unwrap_or(0),
        })
    }

    /// The messages of the scope whose text has every word of the query, newest first.
    pub fn search(&self, q: &SearchQuery) -> Result<SearchResult<Vec<Hit>>, QueryError> {
        let terms = words(&q.text);
        if terms.is_empty() {
            return Err(QueryError::Empty);
        }
        if terms.len() > MAX_QUERY_TERMS {
            return Err(QueryError::TooManyTerms);
        }
        Ok(self.run(q, &terms))
    }

    fn run(&self, q: &SearchQuery, terms: &[String]) -> SearchResult<Vec<Hit>> {
        let f = &self.f;
        let only = q.scope.conversation.as_ref();
        let groups: Vec<&(ConversationId, Intervals)> = q.scope.groups.iter().filter(|(c, _)| only.is_none_or(|o| o == c)).collect();
        let user = q.scope.user.filter(|_| only.is_none_or(|c| !c.is_group()));
        if user.is_none() && groups.is_empty() {
            return Ok(Vec::new());
        }
        let term = |field: Field, text: &str| -> Box<dyn Query> { Box::new(TermQuery::new(Term::from_field_text(field, text), IndexRecordOption::Basic)) };
        let mut words: Vec<(Occur, Box<dyn Query>)> = terms.iter().map(|t| (Occur::Must, term(f.body, t))).collect();
        if let Some(c) = only {
            words.push((Occur::Must, term(f.conv, c.as_str())));
        }
        // Where, two ways. Exact: the reader's direct conversations, and each group's messages
        // inside their intervals (a position range per interval: each scans a column). Coarse:
        // the direct conversations and the groups whole, the intervals checked on the hits (most
        // readers were in most of their groups' history, so few hits are dropped).
        let mut coarse: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut exact: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        if let Some(u) = user {
            coarse.push((Occur::Should, term(f.member, &u.to_string())));
            exact.push((Occur::Should, term(f.member, &u.to_string())));
        }
        for (conv, intervals) in &groups {
            coarse.push((Occur::Should, term(f.conv, conv.as_str())));
            for (since, until) in intervals {
                let upper = match until {
                    Some(u) => Bound::Excluded(Term::from_field_i64(f.position, *u)),
                    None => Bound::Unbounded,
                };
                let clause = BooleanQuery::new(vec![
                    (Occur::Must, term(f.conv, conv.as_str())),
                    (Occur::Must, Box::new(RangeQuery::new(Bound::Excluded(Term::from_field_i64(f.position, *since)), upper))),
                ]);
                exact.push((Occur::Should, Box::new(clause)));
            }
        }
        let readable = |h: &Hit| -> bool {
            if !h.conversation_id.is_group() {
                return user.is_some_and(|u| h.conversation_id.has_member(u));
            }
            groups.iter().any(|(c, iv)| *c == h.conversation_id && iv.iter().any(|(s, u)| *s < h.position && u.is_none_or(|u| h.position < u)))
        };
        let limit = q.limit.clamp(1, MAX_LIMIT);
        let searcher = self.reader.searcher();
        // The newest and oldest order in the index (column bounds: no document is read).
        let (mut oldest, mut newest) = (u64::MAX, 0u64);
        for seg in searcher.segment_readers() {
            if seg.num_docs() > 0 {
                let column = seg.fast_fields().u64("order")?;
                (oldest, newest) = (oldest.min(column.min_value()), newest.max(column.max_value()));
            }
        }
        if let Some(b) = q.before {
            // At or below the cursor's order; the cursor itself and ties above it are dropped below.
            newest = newest.min(order_of(b));
        }
        if oldest > newest {
            return Ok(Vec::new());
        }
        // Newest first without visiting every match of a common word: search a window of the
        // newest 1/1024 of the time span first, then 1/64, 1/8 and everything, until a window
        // holds a page. Each step costs what its window matches.
        let span = newest - oldest;
        let mut windows: Vec<Option<u64>> = [1024, 64, 8].iter().map(|d| Some(newest - span / d)).collect();
        windows.push(None);
        windows.dedup();
        let mut hits = Vec::new();
        for from in windows {
            let lower = match from {
                Some(l) if l > oldest => Bound::Included(Term::from_field_u64(f.order, l)),
                _ => Bound::Unbounded,
            };
            let window = || -> Box<dyn Query> { Box::new(RangeQuery::new(lower.clone(), Bound::Included(Term::from_field_u64(f.order, newest)))) };
            let query = |wher: &[(Occur, Box<dyn Query>)]| {
                let mut clauses: Vec<(Occur, Box<dyn Query>)> = words.iter().map(|(o, q)| (*o, q.box_clone())).collect();
                clauses.push((Occur::Must, Box::new(BooleanQuery::new(wher.iter().map(|(o, q)| (*o, q.box_clone())).collect()))));
                clauses.push((Occur::Must, window()));
                BooleanQuery::new(clauses)
            };
            // A few more than asked for: ties at the cursor's order, and hits outside the
            // reader's intervals, are dropped after the search.
            let want = limit * 2 + 8;
            let (found, complete) = self.collect(&searcher, &query(&coarse), want, q.before, &readable)?;
            hits = if found.len() >= limit || complete {
                found
            } else {
                // Too many coarse hits outside the intervals: the exact query for this window.
                self.collect(&searcher, &query(&exact), limit + 8, q.before, &readable)?.0
            };
            if hits.len() >= limit || matches!(lower, Bound::Unbounded) {
                break;
            }
        }
        hits.sort_by_key(|h| std::cmp::Reverse(h.message_id));
        hits.truncate(limit);
        Ok(hits)
    }

    /// The newest `want` matches of a query that the reader may read (and older than `before`);
    /// and whether those were all the matches.
    fn collect(&self, searcher: &tantivy::Searcher, query: &dyn Query, want: usize, before: Option<MessageId>, readable: &dyn Fn(&Hit) -> bool) -> SearchResult<(Vec<Hit>, bool)> {
        let collector = TopDocs::with_limit(want).order_by_fast_field::<u64>("order", Order::Desc);
        let found = searcher.search(query, &collector)?;
        let complete = found.len() < want;
        let mut hits = Vec::with_capacity(found.len());
        for (_, addr) in found {
            let doc: TantivyDocument = searcher.doc(addr)?;
            if let Some(h) = self.hit(&doc) {
                if before.is_none_or(|b| h.message_id < b) && readable(&h) {
                    hits.push(h);
                }
            }
        }
        Ok((hits, complete))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_events::GroupId;

    /// A v7 message id of millisecond `ms` (deterministic).
    fn id(ms: i64, n: u16) -> MessageId {
        MessageId(uuid::Uuid::from_u128(((ms as u128) << 80) | (0x7000u128 << 64) | (0x8000u128 << 48) | u128::from(n)))
    }

    fn put(conv: &ConversationId, sender: UserId, id: MessageId, body: &str, position: i64) -> IndexOp {
        IndexOp::Put(MessageDoc {
            message_id: id,
            conversation_id: conv.clone(),
            sender,
            kind: MessageKind::Text,
            body: body.into(),
            sent_at: DateTime::from_timestamp_millis(id.unix_millis()).unwrap_or_default(),
            position,
        })
    }

    #[test]
    fn a_page_past_many_messages_outside_the_readers_interval_is_exact() {
        let ix = SearchIndex::in_memory().unwrap();
        let (a, c) = (UserId::random(), UserId::random());
        let g = ConversationId::group(GroupId::random());
        let t0 = 1_800_000_000_000;
        // a was in the group for positions 1..=5; 40 later messages match too.
        let mut ops: Vec<IndexOp> = (1..=45).map(|p| put(&g, c, id(t0 + p, 0), &format!("rope {p}"), p)).collect();
        ops.push(put(&g, c, id(t0 + 100, 0), "other words", 100));
        ix.apply(ops).unwrap();
        ix.commit().unwrap();
        let scope = Scope { user: Some(a), groups: vec![(g.clone(), vec![(0, Some(6))])], conversation: None };
        let hits = ix.search(&SearchQuery { text: "rope".into(), scope, before: None, limit: 2 }).unwrap().unwrap();
        let bodies: Vec<&str> = hits.iter().map(|h| h.body.as_str()).collect();
        assert_eq!(bodies, vec!["rope 5", "rope 4"]);
    }

    #[test]
    fn words_are_lower_cased_and_folded() {
        assert_eq!(words("Café, CAFE; naïve-test  x"), vec!["cafe", "naive", "test", "x"]);
        assert!(words(" ,;. ").is_empty());
    }

    #[test]
    fn searches_follow_the_history_rule_and_page_newest_first() {
        let ix = SearchIndex::in_memory().unwrap();
        let (a, b, c) = (UserId::random(), UserId::random(), UserId::random());
        let ab = ConversationId::direct(a, b);
        let bc = ConversationId::direct(b, c);
        let g = ConversationId::group(GroupId::random());
        let t0 = 1_800_000_000_000;
        ix.apply(vec![
            put(&ab, a, id(t0, 1), "Climbing at the crag tomorrow", 0),
            put(&ab, b, id(t0 + 1, 1), "the crag is wet", 0),
            put(&bc, b, id(t0 + 2, 1), "crag secret between b and c", 0),
            put(&g, c, id(t0 + 3, 1), "group crag before a joined", 10),
            put(&g, c, id(t0 + 4, 1), "group crag while a is in", 20),
            put(&g, c, id(t0 + 5, 1), "group crag after a left", 30),
        ])
        .unwrap();
        ix.commit().unwrap();
        let scope = Scope { user: Some(a), groups: vec![(g.clone(), vec![(15, Some(25))])], conversation: None };
        let run = |text: &str, scope: &Scope, before: Option<MessageId>, limit: usize| -> Vec<String> {
            ix.search(&SearchQuery { text: text.into(), scope: scope.clone(), before, limit }).unwrap().unwrap().into_iter().map(|h| h.body).collect()
        };
        assert_eq!(run("CRAG", &scope, None, 10), vec!["group crag while a is in", "the crag is wet", "Climbing at the crag tomorrow"]);
        assert_eq!(run("crag wet", &scope, None, 10), vec!["the crag is wet"], "every word must match");
        assert!(run("secret", &scope, None, 10).is_empty(), "another pair's conversation");
        // Paging: the cursor is the last message of the previous page.
        let first = ix.search(&SearchQuery { text: "crag".into(), scope: scope.clone(), before: None, limit: 2 }).unwrap().unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(run("crag", &scope, Some(first[1].message_id), 2), vec!["Climbing at the crag tomorrow"]);
        // One conversation only.
        let only_g = Scope { conversation: Some(g.clone()), ..scope.clone() };
        assert_eq!(run("crag", &only_g, None, 10), vec!["group crag while a is in"]);
        // Edits replace the text; deletes remove the document.
        ix.apply(vec![
            IndexOp::Edit { message_id: id(t0 + 1, 1), body: "dry now".into() },
            IndexOp::Remove { message_id: id(t0, 1) },
            IndexOp::Edit { message_id: id(t0 + 4, 1), body: "group rope while a is in".into() },
        ])
        .unwrap();
        ix.commit().unwrap();
        assert!(run("crag", &scope, None, 10).is_empty(), "{:?}", run("crag", &scope, None, 10));
        assert_eq!(run("dry", &scope, None, 10), vec!["dry now"]);
        assert_eq!(run("rope", &scope, None, 10), vec!["group rope while a is in"], "an edited group message keeps its position");
        // A put and its edit before one commit.
        ix.apply(vec![put(&ab, a, id(t0 + 6, 1), "first words", 0), IndexOp::Edit { message_id: id(t0 + 6, 1), body: "second words".into() }]).unwrap();
        ix.commit().unwrap();
        assert_eq!(run("words", &scope, None, 10), vec!["second words"]);
        assert_eq!(ix.search(&SearchQuery { text: " ;; ".into(), scope, before: None, limit: 1 }).err(), Some(QueryError::Empty));
    }
}

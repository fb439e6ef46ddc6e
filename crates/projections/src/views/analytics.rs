//! Analytics, idempotent: a replayed event changes no number. Active users, profile views and
//! topics are sets (`analytics_active_users`, `analytics_profile_views`, `analytics_topics`: a
//! replayed event writes the same rows again). Messages are counted per deliveries partition
//! (`analytics_message_counts`): a row per (day, kind, scope, partition) that the partition's
//! single projector reads, adds to and writes whole with the offset it counted up to, so an
//! item at or below that offset (redelivered, replayed) is not counted again. The projector
//! writes the row at its next sync (`Projector::flush_deferred`), so the messages between two
//! syncs cost one write per row instead of one per message.

use std::collections::BTreeSet;

use chat_events::{Envelope, MessageId, ProfileViewed, UserId};
use chat_store::{MessageCountKey, Write};
use chrono::{DateTime, NaiveDate, Utc};

use super::rows::{Missing, Rows};
use super::Settings;

/// `user` was active on the day of `at`.
pub fn active(out: &mut Vec<Write>, at: &DateTime<Utc>, user: UserId) {
    out.push(Write::ActiveUser { day: day_of(at), user });
}

/// Where and what a message is counted as: its sender's copy at `offset` of deliveries
/// partition `partition`.
#[derive(Clone, Copy, Debug)]
pub struct Counted<'a> {
    pub partition: i32,
    pub offset: i64,
    pub kind: &'a str,
    pub group: bool,
}

/// The count row a message sent at `at` goes to.
pub fn count_key(partition: i32, kind: &str, group: bool, at: &DateTime<Utc>) -> MessageCountKey {
    MessageCountKey { day: day_of(at), kind: kind.to_owned(), scope: if group { "group" } else { "direct" }.to_owned(), partition }
}

/// One accepted message: counted once in its (day, kind, scope), its sender active that day, its
/// topics.
#[allow(clippy::too_many_arguments)]
pub fn message(out: &mut Vec<Write>, rows: &Rows, settings: &Settings, c: &Counted<'_>, id: MessageId, sender: UserId, body: &str, at: &DateTime<Utc>) -> Result<(), Missing> {
    let day = day_of(at);
    let key = count_key(c.partition, c.kind, c.group, at);
    match rows.message_count(&key)? {
        Some((_, applied)) if applied >= c.offset => {}
        row => out.push(Write::MessageCount { key, messages: row.map_or(0, |(n, _)| n) + 1, applied_offset: c.offset }),
    }
    out.push(Write::ActiveUser { day, user: sender });
    for topic in topics_of(body, &settings.keywords) {
        out.push(Write::Topic { day, topic, message: id, sender });
    }
    Ok(())
}

/// One profile view (keyed by the view event's id).
pub fn profile_view(out: &mut Vec<Write>, env: &Envelope, v: &ProfileViewed) {
    out.push(Write::ProfileView { viewed: v.viewed, day: day_of(&env.occurred_at), viewer: v.viewer, view: env.event_id });
}

/// The UTC day of a time.
pub fn day_of(t: &DateTime<Utc>) -> NaiveDate {
    t.date_naive()
}

/// The topics of a message: its hashtags (`#word`, lower-cased, letters, digits and `_`) and the
/// configured keywords it contains as whole words (case-insensitive).
pub fn topics_of(text: &str, keywords: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '#' && (i == 0 || !word(chars[i - 1])) {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && word(chars[end]) {
                end += 1;
            }
            if end > start {
                let tag: String = chars[start..end].iter().collect::<String>().to_lowercase();
                out.insert(format!("#{tag}"));
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    if !keywords.is_empty() {
        let words: BTreeSet<String> = text.split(|c: char| !word(c)).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
        for k in keywords {
            let k = k.trim().to_lowercase();
            if !k.is_empty() && words.contains(&k) {
                out.insert(k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};

    #[test]
    fn messages_are_counted_once_per_offset_of_their_partition() {
        let (a, _, _) = users();
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap_or_default();
        let key = count_key(2, "text", false, &at);
        let mut rows = Rows::default();
        rows.insert(Key::MessageCount(key.clone()), Fetched::Count(Some((5, 40))));
        let count = |rows: &Rows, offset: i64| {
            let mut out = Vec::new();
            let c = Counted { partition: 2, offset, kind: "text", group: false };
            message(&mut out, rows, &Settings::default(), &c, msg_id(offset as u64), a, "hi", &at).unwrap();
            out.into_iter().find_map(|w| match w {
                Write::MessageCount { key: k, messages, applied_offset } if k == key => Some((messages, applied_offset)),
                _ => None,
            })
        };
        assert_eq!(count(&rows, 41), Some((6, 41)), "one more, counted up to its offset");
        assert_eq!(count(&rows, 40), None, "at the row's offset: counted already");
        assert_eq!(count(&rows, 12), None, "below it: counted already");
        rows.note(&Write::MessageCount { key: key.clone(), messages: 6, applied_offset: 41 });
        assert_eq!(count(&rows, 44), Some((7, 44)), "the slice's own writes count");
        let mut out = Vec::new();
        let c = Counted { partition: 2, offset: 50, kind: "text", group: true };
        assert_eq!(message(&mut out, &rows, &Settings::default(), &c, msg_id(1), a, "hi", &at), Err(Missing(Key::MessageCount(count_key(2, "text", true, &at)))));
    }

    #[test]
    fn hashtags_and_keywords() {
        let t = topics_of("Going to #Climb today #climb! #über_cool, not a#tag, ## nor #", &["Rain".into(), "sun".into()]);
        assert_eq!(t, ["#climb", "#über_cool"].iter().map(|s| s.to_string()).collect());
        let t = topics_of("rain again, RAIN. sunny is not sun? yes: sun", &["rain".into(), "sun".into(), "snow".into()]);
        assert_eq!(t, ["rain", "sun"].iter().map(|s| s.to_string()).collect());
        assert!(topics_of("", &[]).is_empty());
    }
}

//! Analytics: sets, never counters (`analytics_messages`, `analytics_active_users`,
//! `analytics_profile_views`, `analytics_topics`). A replayed event writes the same rows again
//! and changes no number.

use std::collections::BTreeSet;

use chat_events::{Envelope, MessageId, ProfileViewed, UserId};
use chat_store::Write;
use chrono::{DateTime, NaiveDate, Utc};

use super::Settings;

/// `user` was active on the day of `at`.
pub fn active(out: &mut Vec<Write>, at: &DateTime<Utc>, user: UserId) {
    out.push(Write::ActiveUser { day: day_of(at), user });
}

/// One accepted message: counted once per (day, kind, scope), its sender active that day, its
/// topics.
#[allow(clippy::too_many_arguments)]
pub fn message(out: &mut Vec<Write>, settings: &Settings, id: MessageId, sender: UserId, kind: &str, group: bool, body: &str, at: &DateTime<Utc>) {
    let day = day_of(at);
    out.push(Write::MessageStat { day, kind: kind.to_owned(), scope: if group { "group" } else { "direct" }.to_owned(), message: id });
    out.push(Write::ActiveUser { day, user: sender });
    for topic in topics_of(body, &settings.keywords) {
        out.push(Write::Topic { day, topic, message: id, sender });
    }
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

    #[test]
    fn hashtags_and_keywords() {
        let t = topics_of("Going to #Climb today #climb! #über_cool, not a#tag, ## nor #", &["Rain".into(), "sun".into()]);
        assert_eq!(t, ["#climb", "#über_cool"].iter().map(|s| s.to_string()).collect());
        let t = topics_of("rain again, RAIN. sunny is not sun? yes: sun", &["rain".into(), "sun".into(), "snow".into()]);
        assert_eq!(t, ["rain", "sun"].iter().map(|s| s.to_string()).collect());
        assert!(topics_of("", &[]).is_empty());
    }
}

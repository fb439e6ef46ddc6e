//! Group views, from the fan-out's validated output: the `delivery.queued` items of each user's
//! stream, which carry positions. Each user's items are projected by one writer in stream order,
//! so the rows of one user (their inbox row of a group, `user_groups`, `user_group_intervals`)
//! have a single writer. `groups` and `group_members` are written from every member's stream, in
//! no particular order: every write carries its position and the highest position wins. A
//! creation's member rows and its group row come from the creator's copy, the only one that lists
//! the members; each other member's copy writes that member's own row.

use chat_events::{ConversationId, GroupChange, GroupRole, StreamItem, UserId};
use chat_store::{GroupMemberRow, GroupRow, UserGroupRow, Write};

use super::rows::{Missing, Rows};

/// A `group` item of `user`'s stream: the membership rows it changes.
pub fn membership(out: &mut Vec<Write>, rows: &Rows, user: UserId, item: &StreamItem) -> Result<(), Missing> {
    let StreamItem::Group { conversation_id, change, name, member, role, members, by, at, position } = item else { return Ok(()) };
    apply(out, rows, user, Change { conv: conversation_id, change: *change, name, member: *member, role: *role, members, by: *by, at, position: *position })
}

/// A `group` item's fields.
struct Change<'a> {
    conv: &'a ConversationId,
    change: GroupChange,
    name: &'a Option<String>,
    member: Option<UserId>,
    role: Option<GroupRole>,
    members: &'a Option<Vec<UserId>>,
    by: UserId,
    at: &'a chrono::DateTime<chrono::Utc>,
    position: i64,
}

fn apply(out: &mut Vec<Write>, rows: &Rows, user: UserId, c: Change<'_>) -> Result<(), Missing> {
    let p = c.position;
    let name = c.name.clone().unwrap_or_default();
    // Who the item is about: the member it names, or (created) the recipient.
    let subject = match c.change {
        GroupChange::Created => Some((user, true)),
        GroupChange::MemberAdded => Some((c.member.unwrap_or(user), true)),
        GroupChange::MemberRemoved => Some((c.member.unwrap_or(user), false)),
        GroupChange::Renamed => None,
    };
    let role = c.role.unwrap_or(if c.change == GroupChange::Created && c.by == user { GroupRole::Admin } else { GroupRole::Member });
    // A removal closes the user's open interval: read it before writing anything.
    let interval = match subject {
        Some((s, active)) if s == user => {
            let since = if active { Some(p) } else { open_since(rows, user, c.conv)? };
            since.map(|since| (since, (!active).then_some(p)))
        }
        _ => None,
    };
    // Member rows before the group row: once a reader sees the group, it sees every membership
    // the creation made (the gateway's membership check relies on it).
    if c.change == GroupChange::Created {
        for m in c.members.iter().flatten() {
            let role = if *m == c.by { GroupRole::Admin } else { GroupRole::Member };
            out.push(Write::GroupMember(GroupMemberRow { conversation_id: c.conv.clone(), member: *m, role, active: true, position: p }));
        }
    }
    if let Some((subject, active)) = subject {
        out.push(Write::GroupMember(GroupMemberRow { conversation_id: c.conv.clone(), member: subject, role, active, position: p }));
        if subject == user {
            out.push(Write::UserGroup(UserGroupRow { user_id: user, conversation_id: c.conv.clone(), role, active, position: p }));
        }
    }
    if let Some((since, until)) = interval {
        out.push(Write::UserGroupInterval { user, conversation: c.conv.clone(), since, until });
    }
    if c.change == GroupChange::Created {
        // Only the copy that listed every member makes the group visible (the creator's; logs
        // written before 2026-12-07 list them in every copy).
        if c.members.is_some() {
            out.push(Write::Group(GroupRow { conversation_id: c.conv.clone(), name, creator: c.by, created_at: *c.at, position: p }));
        }
    } else {
        out.push(Write::GroupName { conversation: c.conv.clone(), name, position: p });
    }
    Ok(())
}

/// The `since` of the user's open interval in a group (the one a removal closes).
fn open_since(rows: &Rows, user: UserId, conv: &ConversationId) -> Result<Option<i64>, Missing> {
    Ok(rows.intervals(user, conv)?.iter().rev().find(|(_, until)| until.is_none()).map(|(since, _)| *since))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::rows::{Fetched, Key};

    fn group_item(change: GroupChange, member: Option<UserId>, by: UserId, position: i64) -> StreamItem {
        StreamItem::Group {
            conversation_id: ConversationId::group(chat_events::GroupId(uuid::Uuid::from_u128(7))),
            change,
            name: Some("g".into()),
            member,
            role: Some(GroupRole::Member),
            members: None,
            by,
            at: chrono::Utc::now(),
            position,
        }
    }

    #[test]
    fn a_removal_closes_the_interval_its_addition_opened() {
        let (admin, bob) = (UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        let conv = ConversationId::group(chat_events::GroupId(uuid::Uuid::from_u128(7)));
        let mut rows = Rows::default();
        rows.insert(Key::Intervals(bob, conv.clone()), Fetched::Intervals(vec![]));
        let mut out = Vec::new();
        membership(&mut out, &rows, bob, &group_item(GroupChange::MemberAdded, Some(bob), admin, 5)).unwrap();
        for w in &out {
            rows.note(w);
        }
        let mut out = Vec::new();
        membership(&mut out, &rows, bob, &group_item(GroupChange::MemberRemoved, Some(bob), admin, 9)).unwrap();
        assert!(out.contains(&Write::UserGroupInterval { user: bob, conversation: conv.clone(), since: 5, until: Some(9) }), "{out:?}");
        assert!(out.iter().any(|w| matches!(w, Write::UserGroup(g) if !g.active && g.position == 9)));
        // Another member's copy of the same removal writes the group's rows but not bob's own.
        let mut theirs = Vec::new();
        membership(&mut theirs, &rows, admin, &group_item(GroupChange::MemberRemoved, Some(bob), admin, 9)).unwrap();
        assert!(!theirs.iter().any(|w| matches!(w, Write::UserGroup(_) | Write::UserGroupInterval { .. })));
        assert!(theirs.iter().any(|w| matches!(w, Write::GroupMember(m) if m.member == bob && !m.active)));
    }

    #[test]
    fn a_creation_is_projected_whole_from_the_creators_copy_and_each_member_writes_its_own_rows() {
        let (admin, bob, carol) = (UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)), UserId(uuid::Uuid::from_u128(3)));
        let rows = Rows::default();
        let created = |members: Option<Vec<UserId>>| {
            let mut item = group_item(GroupChange::Created, None, admin, 4);
            if let StreamItem::Group { members: m, role, .. } = &mut item {
                *m = members;
                *role = None;
            }
            item
        };
        // The creator's copy: every member row, then the group row last.
        let mut out = Vec::new();
        membership(&mut out, &rows, admin, &created(Some(vec![admin, bob, carol]))).unwrap();
        let members: Vec<(UserId, GroupRole)> = out.iter().filter_map(|w| match w { Write::GroupMember(m) => Some((m.member, m.role)), _ => None }).collect();
        for m in [(admin, GroupRole::Admin), (bob, GroupRole::Member), (carol, GroupRole::Member)] {
            assert!(members.contains(&m), "{out:?}");
        }
        assert!(matches!(out.last(), Some(Write::Group(g)) if g.creator == admin), "{out:?}");
        // bob's copy: bob's own rows only, and not the group row (a reader that sees the group
        // must see every member of the creation).
        let mut out = Vec::new();
        membership(&mut out, &rows, bob, &created(None)).unwrap();
        assert!(!out.iter().any(|w| matches!(w, Write::Group(_))), "{out:?}");
        assert!(out.iter().all(|w| match w {
            Write::GroupMember(m) => m.member == bob && m.role == GroupRole::Member && m.active,
            Write::UserGroup(g) => g.user_id == bob,
            Write::UserGroupInterval { user, since, until, .. } => *user == bob && *since == 4 && until.is_none(),
            _ => false,
        }), "{out:?}");
        assert_eq!(out.len(), 3, "{out:?}");
    }
}

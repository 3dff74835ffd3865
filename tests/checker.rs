//! The linearizability checker must accept what is linearizable and reject what is not;
//! otherwise the chaos test proves nothing.

mod common;

use std::time::Duration;

use common::linearizability::{check, Call, Op, Ret};

fn ms(t: u64) -> Duration {
    Duration::from_millis(t)
}

fn op(client: usize, call: Call, from: u64, to: Option<(u64, Ret)>) -> Op {
    Op {
        client,
        key: b"k".to_vec(),
        call,
        invoked: ms(from),
        completed: to.map(|(t, r)| (ms(t), r)),
    }
}

fn put(c: usize, v: &str, from: u64, to: u64) -> Op {
    op(
        c,
        Call::Put(v.as_bytes().to_vec()),
        from,
        Some((to, Ret::Put)),
    )
}

fn get(c: usize, v: Option<&str>, from: u64, to: u64) -> Op {
    op(
        c,
        Call::Get,
        from,
        Some((to, Ret::Get(v.map(|v| v.as_bytes().to_vec())))),
    )
}

fn ok(h: &[Op]) -> bool {
    check(h).is_empty()
}

#[test]
fn sequential_history_is_linearizable() {
    assert!(ok(&[
        put(0, "1", 0, 1),
        get(1, Some("1"), 2, 3),
        put(0, "2", 4, 5),
        get(1, Some("2"), 6, 7)
    ]));
}

#[test]
fn stale_read_after_a_completed_write_is_rejected() {
    assert!(!ok(&[put(0, "1", 0, 1), get(1, None, 2, 3)]));
    assert!(!ok(&[
        put(0, "1", 0, 1),
        put(0, "2", 2, 3),
        get(1, Some("1"), 4, 5)
    ]));
}

#[test]
fn concurrent_read_may_see_either_value() {
    assert!(ok(&[put(0, "1", 0, 10), get(1, None, 2, 3)]));
    assert!(ok(&[put(0, "1", 0, 10), get(1, Some("1"), 2, 3)]));
}

#[test]
fn reads_must_not_go_back_in_time() {
    // Once a read saw the new value, a later read must not see the old one, even though both
    // overlap the write.
    assert!(!ok(&[
        put(0, "1", 0, 100),
        get(1, Some("1"), 10, 20),
        get(2, None, 30, 40)
    ]));
    assert!(ok(&[
        put(0, "1", 0, 100),
        get(1, None, 10, 20),
        get(2, Some("1"), 30, 40)
    ]));
}

#[test]
fn a_value_never_written_is_rejected() {
    assert!(!ok(&[put(0, "1", 0, 1), get(1, Some("2"), 2, 3)]));
}

#[test]
fn unknown_writes_may_or_may_not_take_effect() {
    let unknown = op(0, Call::Put(b"1".to_vec()), 0, None);
    assert!(ok(&[unknown.clone(), get(1, None, 5, 6)]));
    assert!(ok(&[unknown.clone(), get(1, Some("1"), 5, 6)]));
    // ...but only after they were invoked.
    assert!(!ok(&[
        get(1, Some("1"), 0, 1),
        op(0, Call::Put(b"1".to_vec()), 5, None)
    ]));
    // And once seen, they stay (no flapping back to absent without a write).
    assert!(!ok(&[unknown, get(1, Some("1"), 5, 6), get(1, None, 7, 8)]));
}

#[test]
fn deletes_report_existence() {
    let del = |c, existed, from, to| op(c, Call::Delete, from, Some((to, Ret::Delete(existed))));
    assert!(ok(&[
        put(0, "1", 0, 1),
        del(1, true, 2, 3),
        get(0, None, 4, 5)
    ]));
    assert!(!ok(&[put(0, "1", 0, 1), del(1, false, 2, 3)]));
    assert!(!ok(&[del(1, true, 0, 1)]));
    // Two concurrent deletes of an existing key: exactly one saw it.
    assert!(ok(&[
        put(0, "1", 0, 1),
        del(1, true, 2, 5),
        del(2, false, 2, 5)
    ]));
    assert!(!ok(&[
        put(0, "1", 0, 1),
        del(1, true, 2, 5),
        del(2, true, 2, 5)
    ]));
}

#[test]
fn keys_are_checked_independently() {
    let mut other = get(1, None, 2, 3);
    other.key = b"other".to_vec();
    assert!(ok(&[put(0, "1", 0, 1), other]));
    let bad = check(&[put(0, "1", 0, 1), get(1, None, 2, 3)]);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, b"k");
}

#[test]
fn a_long_concurrent_history_is_checked_quickly() {
    // 4 writers and 4 readers over 200 overlapping rounds: linearizable by construction (each
    // read returns the value of the write that completed last before it began, and writes in a
    // round overlap only reads of the same round).
    let mut h = Vec::new();
    let mut last: Option<String> = None;
    for round in 0..200u64 {
        let t = round * 100;
        for w in 0..4 {
            h.push(get(4 + w, last.as_deref(), t, t + 10));
        }
        let v = format!("{round}");
        h.push(put(round as usize % 4, &v, t + 20, t + 60));
        for w in 0..4 {
            // Concurrent with the write: may see either.
            let seen = if w % 2 == 0 {
                last.clone()
            } else {
                Some(v.clone())
            };
            h.push(get(4 + w, seen.as_deref(), t + 30, t + 50));
        }
        // Reads within a round must be ordered consistently: the odd readers saw the new value
        // at time 30..50, so the even ones (same interval) are still allowed the old value.
        last = Some(v);
    }
    assert!(ok(&h));
    // The same history with one read that goes back in time is caught.
    h.push(get(9, Some("3"), 100_000, 100_001));
    assert!(!ok(&h));
}

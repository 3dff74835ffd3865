//! A linearizability checker for key-value histories (Wing & Gong's search with Lowe's
//! memoization, as in Porcupine), used by the chaos test.
//!
//! A history is a list of operations, each with the time the client invoked it and the time it
//! completed. An operation whose outcome the client does not know (a timeout, a connection lost
//! mid-request, an UNAVAILABLE write that may have committed) has no completion: it may take
//! effect at any point after its invocation, or never. Keys are independent registers, so each
//! key's sub-history is checked on its own (linearizability is compositional).
//!
//! The model: `Put(v)` sets the value; `Delete` removes it (and, when its answer is known, it must
//! match whether the key existed); `Get` must return the current value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Put(Vec<u8>),
    Get,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    Put,
    /// The value read.
    Get(Option<Vec<u8>>),
    /// Whether the key existed.
    Delete(bool),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub key: Vec<u8>,
    pub call: Call,
    pub invoked: Duration,
    /// `None`: outcome unknown.
    pub completed: Option<(Duration, Ret)>,
}

/// What the checker found for one key.
#[derive(Debug)]
pub struct Violation {
    pub key: Vec<u8>,
    pub ops: Vec<Op>,
}

/// Checks every key's history; returns the keys whose history is not linearizable.
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    by_key
        .into_iter()
        .filter(|(_, ops)| !check_register(ops))
        .map(|(k, ops)| Violation {
            key: k.to_vec(),
            ops: ops.into_iter().cloned().collect(),
        })
        .collect()
}

/// For a non-linearizable history: the earliest time `t` such that the history cut at `t` (ops
/// invoked later dropped, ops still running at `t` made unknown) is already not linearizable.
/// The operations just before `t` are where to look.
pub fn first_violation_time(history: &[Op]) -> Option<Duration> {
    let cut = |t: Duration| -> Vec<Op> {
        history
            .iter()
            .filter(|o| o.invoked < t)
            .map(|o| {
                let mut o = o.clone();
                if o.completed.as_ref().is_some_and(|(c, _)| *c >= t) {
                    o.completed = None;
                }
                o
            })
            .collect()
    };
    let mut times: Vec<Duration> = history
        .iter()
        .filter_map(|o| {
            o.completed
                .as_ref()
                .map(|(c, _)| *c + Duration::from_nanos(1))
        })
        .collect();
    times.sort();
    times.dedup();
    let (mut lo, mut hi) = (0usize, times.len());
    if hi == 0 || check(&cut(times[hi - 1])).is_empty() {
        return None;
    }
    hi -= 1;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if check(&cut(times[mid])).is_empty() {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Some(times[lo])
}

/// States the search of one key may explore before it gives up (and fails the check loudly).
const SEARCH_BUDGET: usize = 50_000_000;

/// A fixed pseudo-random 128-bit tag for op `i` (splitmix64, twice).
fn zobrist_tag(i: u64) -> u128 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let a = mix(i.wrapping_mul(2).wrapping_add(0x9e37_79b9_7f4a_7c15));
    let b = mix(i
        .wrapping_mul(2)
        .wrapping_add(1)
        .wrapping_add(0x9e37_79b9_7f4a_7c15));
    (u128::from(a) << 64) | u128::from(b)
}

/// Model state: the interned value, or None when absent.
type State = Option<u32>;

struct Interned {
    ids: HashMap<Vec<u8>, u32>,
}

impl Interned {
    fn id(&mut self, v: &[u8]) -> u32 {
        let n = self.ids.len() as u32;
        *self.ids.entry(v.to_vec()).or_insert(n)
    }
}

/// One operation in the search: what it does to the state and what it must observe.
#[derive(Clone, Copy)]
enum Step {
    Write(State),
    /// Delete whose answer (existed or not) is known.
    DeleteSaw(bool),
    Read(State),
}

fn apply(state: State, step: Step) -> Option<State> {
    match step {
        Step::Write(v) => Some(v),
        Step::DeleteSaw(existed) => (state.is_some() == existed).then_some(None),
        Step::Read(v) => (state == v).then_some(state),
    }
}

/// Wing–Gong–Lowe search over one register's history.
fn check_register(ops: &[&Op]) -> bool {
    let mut interned = Interned {
        ids: HashMap::new(),
    };
    // Reads without an answer constrain nothing: drop them.
    let mut steps = Vec::new();
    let mut events: Vec<(Duration, bool, usize)> = Vec::new(); // (time, is_return, op)
    for op in ops {
        let step = match (&op.call, &op.completed) {
            (Call::Get, None) => continue,
            (Call::Get, Some((_, Ret::Get(v)))) => Step::Read(v.as_ref().map(|v| interned.id(v))),
            (Call::Put(v), _) => Step::Write(Some(interned.id(v))),
            (Call::Delete, Some((_, Ret::Delete(existed)))) => Step::DeleteSaw(*existed),
            (Call::Delete, _) => Step::Write(None),
            // A completed op whose answer does not match its call: treat as a failed check.
            (Call::Get, Some(_)) => return false,
        };
        let i = steps.len();
        steps.push(step);
        events.push((op.invoked, false, i));
        // Unknown outcomes return "at infinity": after every other event.
        let end = op.completed.as_ref().map_or(Duration::MAX, |(t, _)| *t);
        events.push((end, true, i));
    }
    // Calls before returns at equal times: the more permissive (concurrent) reading.
    events.sort_by_key(|(t, is_ret, _)| (*t, *is_ret));
    let n = events.len();
    // A doubly linked list over events, so linearized ops can be lifted out and put back.
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    const NIL: usize = usize::MAX;
    let head_sentinel = n; // next[n] is the first event
    next.push(if n == 0 { NIL } else { 0 });
    prev.push(NIL);
    if n > 0 {
        prev[0] = head_sentinel;
        next[n - 1] = NIL;
    }
    let mut ret_of = vec![0usize; steps.len()];
    for (idx, (_, is_ret, op)) in events.iter().enumerate() {
        if *is_ret {
            ret_of[*op] = idx;
        }
    }
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != NIL {
            prev[nx] = p;
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != NIL {
            prev[nx] = i;
        }
    };

    // Lowe's cache holds (set of linearized ops, state) pairs already explored. The set is kept
    // as a 128-bit Zobrist hash (the XOR of a random 128-bit tag per op) instead of a bitset: a
    // bitset made each entry, and each step's copy of it, as long as the key's history (a 60-s
    // chaos round once took 24 GB and was OOM-killed). Two different sets share a hash with
    // probability 2^-128; even then the search would only skip a branch, which can report a
    // violation that is not there, never hide one.
    let tags: Vec<u128> = (0..steps.len() as u64).map(zobrist_tag).collect();
    let mut linearized: u128 = 0;
    let mut cache: HashSet<(u128, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new(); // (call event, state before)
    let mut state: State = None;
    let mut entry = next[head_sentinel];
    loop {
        if next[head_sentinel] == NIL {
            return true;
        }
        // A call: try to linearize it here. A return (or the end of the list) reached before its
        // call was linearized: undo the last choice.
        if entry != NIL && !events[entry].1 {
            let op = events[entry].2;
            if let Some(new_state) = apply(state, steps[op]) {
                let lin = linearized ^ tags[op];
                if cache.insert((lin, new_state)) {
                    assert!(
                        cache.len() <= SEARCH_BUDGET,
                        "linearizability search gave up after {SEARCH_BUDGET} states on a key \
                         with {} operations: undecided, not a pass",
                        steps.len()
                    );
                    stack.push((entry, state));
                    state = new_state;
                    linearized = lin;
                    lift(&mut next, &mut prev, entry);
                    lift(&mut next, &mut prev, ret_of[op]);
                    entry = next[head_sentinel];
                    continue;
                }
            }
            entry = next[entry];
            continue;
        }
        let Some((call, s)) = stack.pop() else {
            return false;
        };
        let op = events[call].2;
        state = s;
        linearized ^= tags[op];
        unlift(&mut next, &mut prev, ret_of[op]);
        unlift(&mut next, &mut prev, call);
        entry = next[call];
    }
}

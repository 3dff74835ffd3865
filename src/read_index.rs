//! Linearizable reads of one shard share read-index rounds.
//!
//! A linearizable read needs one *read-index round* (`Raft::ensure_linearizable`): the leader
//! notes its commit index, confirms with a quorum that it still leads, and waits until it has
//! applied that index. One round proves that every write that completed before the round
//! *started* is visible; reads that arrive together can therefore share a round.
//!
//! The subtlety: a round that started before a read arrived proves nothing about that read (a
//! write may have completed between the round's start and the read's arrival). So a read never
//! joins a round in flight: it waits for the *next* round, which starts only once the one in
//! flight has finished, and every read that arrived in the meantime shares it. At most one round
//! per shard runs at a time; under load a read waits for at most the rest of the current round
//! plus one round, and a shard runs one round for many reads instead of one per read.
//!
//! Rounds run on their own task, so a read whose client goes away cannot strand the others. A
//! round's outcome (success or error) goes to every read that waited for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Starts one round; called once per round, on the coalescer's task.
pub type RoundFn<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

/// Runs rounds of `T`-producing work so that each caller of [`Coalescer::wait`] gets the result
/// of a round that started after it called, and concurrent callers share rounds.
pub struct Coalescer<T> {
    round: RoundFn<T>,
    state: Arc<Mutex<State<T>>>,
}

struct State<T> {
    /// A round task is running (its round may be in flight, or it is about to pick up `next`).
    running: bool,
    /// The round that starts after the one in flight; callers arriving now wait for it.
    next: Option<watch::Sender<Option<T>>>,
    /// Rounds started so far.
    rounds: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only plain fields are updated under the lock; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Clone + Send + Sync + 'static> Coalescer<T> {
    pub fn new(round: RoundFn<T>) -> Self {
        Coalescer {
            round,
            state: Arc::new(Mutex::new(State {
                running: false,
                next: None,
                rounds: 0,
            })),
        }
    }

    /// The result of a round started after this call. `None` if that round was abandoned (its
    /// task panicked or the runtime is shutting down): nothing was proven, the caller may retry.
    pub async fn wait(&self) -> Option<T> {
        let (mut rx, start_task) = {
            let mut st = lock(&self.state);
            let rx = match &st.next {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    st.next = Some(tx);
                    rx
                }
            };
            let start_task = !st.running;
            st.running = true;
            (rx, start_task)
        };
        if start_task {
            tokio::spawn(run_rounds(self.round.clone(), self.state.clone()));
        }
        let result = rx.wait_for(Option::is_some).await.ok()?.clone();
        result
    }

    /// Rounds started so far.
    pub fn rounds(&self) -> u64 {
        lock(&self.state).rounds
    }
}

/// Runs rounds while callers wait for one, then stops.
async fn run_rounds<T: Clone + Send + Sync + 'static>(
    round: RoundFn<T>,
    state: Arc<Mutex<State<T>>>,
) {
    // If a round panics, the task must not stay "running" with callers queued behind it.
    struct Reset<'a, T>(&'a Mutex<State<T>>);
    impl<T> Drop for Reset<'_, T> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut st = lock(self.0);
                st.running = false;
                // Its waiters see the sender dropped: "abandoned".
                st.next = None;
            }
        }
    }
    let _reset = Reset(&state);
    loop {
        // Taken *before* the round starts: everyone waiting on `tx` arrived before it, and
        // anyone arriving from now on waits for a later round.
        let tx = {
            let mut st = lock(&state);
            match st.next.take() {
                Some(tx) => {
                    st.rounds += 1;
                    tx
                }
                None => {
                    st.running = false;
                    return;
                }
            }
        };
        let result = round().await;
        // No receivers left (every caller gave up) is fine.
        let _ = tx.send(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// A round function whose rounds number themselves 1, 2, ... and each wait for a permit.
    fn gated() -> (RoundFn<u64>, Arc<Semaphore>, Arc<AtomicU64>) {
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let (g, s) = (gate.clone(), started.clone());
        let f: RoundFn<u64> = Arc::new(move || {
            let (g, s) = (g.clone(), s.clone());
            Box::pin(async move {
                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                g.acquire().await.expect("gate open").forget();
                n
            })
        });
        (f, gate, started)
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    fn waiting<T>(c: &Coalescer<T>) -> usize {
        lock(&c.state)
            .next
            .as_ref()
            .map_or(0, |tx| tx.receiver_count())
    }

    /// The linearizability rule: a read that arrives while a round is in flight is not answered
    /// by that round (which started before it), but by the next one, started after it arrived.
    #[tokio::test]
    async fn a_read_never_shares_a_round_that_started_before_it() {
        let (f, gate, started) = gated();
        let c = Arc::new(Coalescer::new(f));
        let a = tokio::spawn({
            let c = c.clone();
            async move { c.wait().await }
        });
        until("round 1 started", || started.load(Ordering::SeqCst) == 1).await;
        // Round 1 is in flight; b arrives now.
        let b = tokio::spawn({
            let c = c.clone();
            async move { c.wait().await }
        });
        until("b is waiting", || waiting(&c) == 1).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "no round starts while one is in flight"
        );
        gate.add_permits(1);
        assert_eq!(a.await.unwrap(), Some(1));
        // Round 2 starts only now, after b arrived; b gets its result, not round 1's.
        until("round 2 started", || started.load(Ordering::SeqCst) == 2).await;
        assert!(!b.is_finished(), "b was answered by the round before it");
        gate.add_permits(1);
        assert_eq!(b.await.unwrap(), Some(2));
        assert_eq!(c.rounds(), 2);
    }

    /// Reads that arrive during one round all share the next one.
    #[tokio::test]
    async fn concurrent_reads_share_one_round() {
        let (f, gate, started) = gated();
        let c = Arc::new(Coalescer::new(f));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.wait().await }
        });
        until("round 1 started", || started.load(Ordering::SeqCst) == 1).await;
        let rest: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.wait().await })
            })
            .collect();
        until("all 20 wait", || waiting(&c) == 20).await;
        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Some(1));
        for r in rest {
            assert_eq!(r.await.unwrap(), Some(2));
        }
        assert_eq!(c.rounds(), 2, "21 reads, 2 rounds");
        // Idle again: the next read starts a fresh round by itself.
        gate.add_permits(1);
        assert_eq!(c.wait().await, Some(3));
    }

    /// A round's error reaches every read that waited for it; a panicking round leaves the
    /// coalescer usable.
    #[tokio::test]
    async fn errors_reach_every_waiter_and_a_panic_does_not_wedge() {
        let calls = Arc::new(AtomicU64::new(0));
        let k = calls.clone();
        let f: RoundFn<Result<(), String>> = Arc::new(move || {
            let n = k.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match n {
                    0 => Err("not leader".to_string()),
                    1 => panic!("round panicked"),
                    _ => Ok(()),
                }
            })
        });
        let c = Arc::new(Coalescer::new(f));
        let reads: Vec<_> = (0..5)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.wait().await })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap(), Some(Err("not leader".to_string())));
        }
        assert_eq!(c.wait().await, None, "abandoned by the panic");
        assert_eq!(c.wait().await, Some(Ok(())));
    }
}

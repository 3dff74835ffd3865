//! openraft's async runtime: tokio, with one seam for the deterministic simulation.
//!
//! openraft draws every election timeout from `AsyncRuntime::thread_rng()`. With tokio's own
//! runtime that is `rand::thread_rng()`, seeded from the OS, so a simulated run could never be
//! replayed exactly. [`KvRuntime`] is tokio in every respect except that its generator can be
//! seeded per thread with [`seed_thread_rng`]; a thread that never calls it (every thread of a
//! real node) gets the OS-seeded `rand::thread_rng()`, exactly as before.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// From now on, openraft's random draws on this thread (election timeouts) come from a
/// generator seeded with `seed`. For the simulation's single-threaded runtime only.
pub fn seed_thread_rng(seed: u64) {
    SEEDED.with(|s| *s.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Back to the OS-seeded generator on this thread.
pub fn unseed_thread_rng() {
    SEEDED.with(|s| *s.borrow_mut() = None);
}

/// The generator openraft gets: the thread's seeded one if set, else `rand::thread_rng()`.
pub struct KvRng(rand::rngs::ThreadRng);

/// Runs `f` on the thread's seeded generator if there is one, else on `fallback`.
fn with_rng<T>(fallback: &mut rand::rngs::ThreadRng, f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(seeded) => f(seeded),
        None => f(fallback),
    })
}

impl RngCore for KvRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(&mut self.0, |r| r.next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        with_rng(&mut self.0, |r| r.next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(&mut self.0, |r| r.fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(&mut self.0, |r| r.try_fill_bytes(dest))
    }
}

/// tokio, with [`KvRng`] as the random source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KvRuntime;

impl AsyncRuntime for KvRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = KvRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        KvRng(rand::thread_rng())
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    fn draws() -> Vec<u64> {
        let mut rng = KvRuntime::thread_rng();
        (0..8).map(|_| rng.gen_range(150..300)).collect()
    }

    #[test]
    fn seeded_draws_replay_and_unseeded_draws_vary() {
        seed_thread_rng(7);
        let a = draws();
        seed_thread_rng(7);
        assert_eq!(a, draws(), "same seed, same election timeouts");
        seed_thread_rng(8);
        assert_ne!(a, draws(), "another seed, other timeouts");
        unseed_thread_rng();
        let (x, y) = (draws(), draws());
        assert_ne!(x, y, "OS-seeded generator repeated itself");
    }
}

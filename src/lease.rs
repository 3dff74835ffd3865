//! Leader leases: linearizable reads served by a shard's leader without a quorum round.
//!
//! A read-index round (see [`crate::read_index`]) costs the leader one exchange with a quorum per
//! batch of reads. A lease replaces it with a promise the followers have already made: openraft
//! 0.9's followers refuse every vote request for `election_timeout_max` (twice our
//! `election_timeout_ms`) after they last accepted an AppendEntries from their leader, heartbeats
//! included. So when a quorum accepted requests this leader *sent* at time `t` or later, no other
//! leader can be elected before `t + 2 × election_timeout_ms` — on the followers' clocks.
//!
//! # The rule
//!
//! The leader serves a linearizable read from its own state machine, with no round, when all of
//! these hold, both before it reads and again after (so the read itself happened inside them):
//!
//! 1. its metrics say it leads the shard under a committed vote of term `T`;
//! 2. a read-index round completed in this process under term `T` (openraft's
//!    `ensure_linearizable` waits until everything committed before it is applied; every write
//!    acknowledged later was applied here before it was acknowledged, so the state machine holds
//!    every acknowledged write);
//! 3. a quorum (counting itself) accepted AppendEntries requests of term `T` sent no longer than
//!    half of `election_timeout_max` ago (`election_timeout_ms`): half the followers' promise,
//!    which leaves room for clocks that run at different rates and for a slow check;
//! 4. no vote request for a term after `T` has reached it. openraft's leader does not hold its
//!    own vote to the lease, so it may grant a candidate's vote, and a candidate elected with it
//!    needs no follower's promise; the vote request is seen here, by our RPC handler, before
//!    openraft handles it, and the lease of term `T` is gone for good. (A candidate of term `T`
//!    itself cannot win: every voter that elected this leader has voted in `T` already.)
//!
//! Otherwise the read takes a round, as before.
//!
//! # Restarted followers
//!
//! A follower's promise lives in memory. openraft 0.9.25 keeps it across a restart: it stamps the
//! vote it reads from disk with the start time (`storage::helper`), so a restarted follower
//! refuses votes for `election_timeout_max` after it starts, and a restart comes after the
//! promise was made. `tests/scenarios.rs` (`restarted_node_holds_its_vote_while_a_lease_may_run`)
//! checks that on real processes, so an upgrade that changed it would be caught.
//!
//! # Assumptions
//!
//! Clocks run at the same rate within a factor of two over a few hundred milliseconds (they only
//! measure intervals, never compare times across nodes), and a node does not lose its WAL tail
//! while staying leader (the same assumption the read-index rounds make).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use openraft::raft::AppendEntriesResponse;
use openraft::{RaftMetrics, ServerState};
use tokio::time::Instant;

use crate::raft::{LogId, NodeId, Raft, Vote};

/// A shard group's metrics.
pub type Metrics = RaftMetrics<NodeId, openraft::BasicNode>;

/// One shard's lease on this node: the evidence for rules 2–4 above.
pub struct LeaderLease {
    me: NodeId,
    /// The other voters of the shard.
    peers: Vec<NodeId>,
    /// How long an accepted request keeps this node's lease (rule 3).
    duration: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The leader vote the acceptances below were given to.
    vote: Option<Vote>,
    /// Per peer: when the latest request it accepted under `vote` was sent.
    accepted: BTreeMap<NodeId, Instant>,
    /// Terms in which a read-index round completed (only the highest is kept).
    confirmed_term: Option<u64>,
    /// The highest term a vote request asked for.
    requested_term: Option<u64>,
}

impl LeaderLease {
    /// `replicas` are the shard's voters, this node among them; `raft` is the group's openraft
    /// config, whose `election_timeout_max` is how long a follower keeps its promise (openraft's
    /// leader lease); this node trusts half of it.
    pub fn new(me: NodeId, replicas: &[NodeId], raft: &openraft::Config) -> LeaderLease {
        LeaderLease {
            me,
            peers: replicas.iter().copied().filter(|r| *r != me).collect(),
            duration: Duration::from_millis(raft.election_timeout_max / 2),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only plain fields are updated under the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network's report: `peer` answered an AppendEntries request carrying `vote`, sent at
    /// `sent`.
    pub fn answered(
        &self,
        vote: &Vote,
        peer: NodeId,
        sent: Instant,
        resp: &AppendEntriesResponse<NodeId>,
    ) {
        // Conflict and HigherVote are not counted (a conflict does accept the vote, but the
        // rule is simpler without it and the next request is accepted).
        if !matches!(
            resp,
            AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)
        ) || !vote.is_committed()
        {
            return;
        }
        let mut st = self.lock();
        match &st.vote {
            Some(v) if v == vote => {}
            // Late answer to an older leadership: ignore.
            Some(v) if v > vote => return,
            _ => {
                st.vote = Some(*vote);
                st.accepted.clear();
            }
        }
        let at = st.accepted.entry(peer).or_insert(sent);
        *at = (*at).max(sent);
    }

    /// A read-index round succeeded; `read_log_id` is what openraft returned (a log id of the
    /// leader's own term: its first entry, or a later committed one).
    pub fn confirmed(&self, read_log_id: Option<LogId>) {
        if let Some(id) = read_log_id {
            let mut st = self.lock();
            st.confirmed_term = st.confirmed_term.max(Some(id.leader_id.term));
        }
    }

    /// A vote request reached this node (call it before openraft sees the request).
    pub fn vote_requested(&self, candidate: &Vote) {
        let mut st = self.lock();
        st.requested_term = st.requested_term.max(Some(candidate.leader_id().term));
    }

    /// Runs `read` under the lease: `Some` of its result when the lease held both before and
    /// after it (so the read itself happened inside the lease), `None` when the read must take a
    /// read-index round instead.
    pub fn read<T>(&self, raft: &Raft, read: impl FnOnce() -> T) -> Option<T> {
        let metrics = raft.metrics();
        if !self.holds_at(&metrics.borrow(), Instant::now()) {
            return None;
        }
        let value = read();
        let still = self.holds_at(&metrics.borrow(), Instant::now());
        still.then_some(value)
    }

    /// Whether a linearizable read may be served locally at `now` (rules 1–4).
    fn holds_at(&self, m: &Metrics, now: Instant) -> bool {
        let term = m.vote.leader_id().term;
        if m.state != ServerState::Leader
            || !m.vote.is_committed()
            || m.vote.leader_id().voted_for() != Some(self.me)
        {
            return false;
        }
        let st = self.lock();
        if st.vote != Some(m.vote)
            || st.confirmed_term != Some(term)
            || st.requested_term.is_some_and(|t| t > term)
        {
            return false;
        }
        // A majority of the voters (peers and this node) is `voters / 2 + 1`; less this node:
        let voters = self.peers.len() + 1;
        let needed = voters / 2;
        if needed == 0 {
            return true;
        }
        let mut sent: Vec<Instant> = self
            .peers
            .iter()
            .filter_map(|p| st.accepted.get(p).copied())
            .collect();
        if sent.len() < needed {
            return false;
        }
        sent.sort_unstable_by(|a, b| b.cmp(a));
        now < sent[needed - 1] + self.duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId as OLogId};

    const ET: Duration = Duration::from_millis(300);

    fn raft_config() -> openraft::Config {
        openraft::Config {
            election_timeout_min: 300,
            election_timeout_max: 600,
            ..Default::default()
        }
    }

    fn leader_metrics(me: NodeId, term: u64) -> Metrics {
        let mut m = Metrics::new_initial(me);
        m.state = ServerState::Leader;
        m.vote = Vote::new_committed(term, me);
        m.current_term = term;
        m
    }

    fn log_id(term: u64, index: u64) -> Option<LogId> {
        Some(OLogId::new(CommittedLeaderId::new(term, 0), index))
    }

    /// A lease for node 1 of {1, 2, 3}, leading term 5, confirmed by a round, with node 2
    /// having accepted a request sent at `sent`.
    fn leased(sent: Instant) -> (LeaderLease, Metrics) {
        let lease = LeaderLease::new(1, &[1, 2, 3], &raft_config());
        let m = leader_metrics(1, 5);
        lease.confirmed(log_id(5, 10));
        lease.answered(&m.vote, 2, sent, &AppendEntriesResponse::Success);
        (lease, m)
    }

    #[tokio::test(start_paused = true)]
    async fn holds_after_a_round_and_a_quorum_of_acceptances_then_expires() {
        let t0 = Instant::now();
        let (lease, m) = leased(t0);
        assert!(lease.holds_at(&m, t0));
        assert!(lease.holds_at(&m, t0 + ET - Duration::from_millis(1)));
        assert!(
            !lease.holds_at(&m, t0 + ET),
            "expired: counted from the send time"
        );
        // A newer acceptance renews it.
        lease.answered(&m.vote, 3, t0 + ET, &AppendEntriesResponse::Success);
        assert!(lease.holds_at(&m, t0 + ET + Duration::from_millis(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn needs_a_round_in_the_current_term() {
        let t0 = Instant::now();
        let lease = LeaderLease::new(1, &[1, 2, 3], &raft_config());
        let m = leader_metrics(1, 5);
        lease.answered(&m.vote, 2, t0, &AppendEntriesResponse::Success);
        assert!(!lease.holds_at(&m, t0), "no round yet");
        lease.confirmed(log_id(4, 9));
        assert!(
            !lease.holds_at(&m, t0),
            "a round of an earlier term proves nothing now"
        );
        lease.confirmed(log_id(5, 12));
        assert!(lease.holds_at(&m, t0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vote_request_ends_the_lease_of_the_term() {
        let t0 = Instant::now();
        let (lease, m) = leased(t0);
        lease.vote_requested(&Vote::new(4, 3));
        lease.vote_requested(&Vote::new(5, 3));
        assert!(
            lease.holds_at(&m, t0),
            "a candidate of this term or before cannot win"
        );
        lease.vote_requested(&Vote::new(6, 3));
        assert!(!lease.holds_at(&m, t0));
        lease.answered(&m.vote, 2, t0, &AppendEntriesResponse::Success);
        assert!(!lease.holds_at(&m, t0), "not even after new acceptances");
    }

    #[tokio::test(start_paused = true)]
    async fn only_leaders_with_accepted_requests_of_their_own_vote_hold_it() {
        let t0 = Instant::now();
        let (lease, mut m) = leased(t0);
        // Refusals do not count.
        let other = LeaderLease::new(1, &[1, 2, 3], &raft_config());
        other.confirmed(log_id(5, 10));
        other.answered(
            &m.vote,
            2,
            t0,
            &AppendEntriesResponse::HigherVote(Vote::new(6, 2)),
        );
        other.answered(&m.vote, 3, t0, &AppendEntriesResponse::Conflict);
        assert!(!other.holds_at(&m, t0));
        // A late acceptance of an older vote neither counts nor clears the current ones.
        lease.answered(
            &Vote::new_committed(4, 1),
            3,
            t0,
            &AppendEntriesResponse::Success,
        );
        assert!(lease.holds_at(&m, t0));
        // Not a leader (any more): no lease, whatever the evidence.
        m.state = ServerState::Follower;
        assert!(!lease.holds_at(&m, t0));
        // Leader of a newer term: the old term's acceptances do not carry over.
        let m6 = leader_metrics(1, 6);
        lease.confirmed(log_id(6, 20));
        assert!(!lease.holds_at(&m6, t0));
    }

    #[tokio::test(start_paused = true)]
    async fn five_voters_need_two_acceptances() {
        let t0 = Instant::now();
        let lease = LeaderLease::new(1, &[1, 2, 3, 4, 5], &raft_config());
        let m = leader_metrics(1, 5);
        lease.confirmed(log_id(5, 10));
        lease.answered(&m.vote, 2, t0 + ET, &AppendEntriesResponse::Success);
        assert!(!lease.holds_at(&m, t0 + ET));
        lease.answered(&m.vote, 4, t0, &AppendEntriesResponse::Success);
        // Quorum {1, 2, 4}: the older of the two acceptances bounds the lease.
        assert!(lease.holds_at(&m, t0 + ET - Duration::from_millis(1)));
        assert!(!lease.holds_at(&m, t0 + ET));
    }
}

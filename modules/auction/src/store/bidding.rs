//! The bidding rules as pure functions: a run of bids judged in order against an auction's
//! state, with the room sequence numbers and soft-close extensions they cause. No database:
//! [`super::apply_bids`] stores what [`decide_run`] decided, in one transaction.

use std::collections::HashMap;

use super::BidCommand;
use crate::entity::auction;
use crate::protocol::{Outcome, ServerMsg};

/// The smallest amount the next bid must have.
pub fn min_next(a: &auction::Model) -> i64 {
    match a.highest_amount {
        Some(h) => h.saturating_add(a.min_increment),
        None => a.start_price,
    }
}

/// The judgement of one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub outcome: Outcome,
    pub reason: Option<String>,
    /// Highest amount after this bid was applied.
    pub highest: Option<i64>,
}

/// Judge `cmd` against `a` as of `cmd.received_at_ms` (A6): the end in force is the current
/// one, which soft-close extensions only ever move later.
pub fn judge(a: &auction::Model, cmd: &BidCommand) -> Judgement {
    let (outcome, reason) = if a.status == "closed" || cmd.received_at_ms >= a.ends_at_ms {
        (Outcome::Closed, Some("received after the end".to_owned()))
    } else if cmd.received_at_ms < a.starts_at_ms {
        (
            Outcome::NotStarted,
            Some("received before the start".to_owned()),
        )
    } else if cmd.amount < min_next(a) {
        (
            Outcome::TooLow,
            Some(format!("the minimum is {}", min_next(a))),
        )
    } else {
        (Outcome::Accepted, None)
    };
    let highest = if outcome == Outcome::Accepted {
        Some(cmd.amount)
    } else {
        a.highest_amount
    };
    Judgement {
        outcome,
        reason,
        highest,
    }
}

/// How a bid of the run was answered when an earlier delivery stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub outcome: Outcome,
    pub reason: Option<String>,
}

/// What the run decided for one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// New: store it with this judgement and room `seq` (accepted bids only), then send `room`.
    Fresh {
        judgement: Judgement,
        seq: Option<i64>,
        room: Vec<ServerMsg>,
    },
    /// Stored before, or earlier in this run: its first answer; nothing is applied again.
    Duplicate(Judgement),
}

/// The decisions of a run, in its order, and the auction after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub decisions: Vec<Decision>,
    /// The auction after the run. Its `highest_bid_id` is left as it was: the new highest
    /// bid's row id exists only once the caller inserted it (see `highest`).
    pub state: auction::Model,
    /// Index in the run of the bid that is now the highest, when one of the run is.
    pub highest: Option<usize>,
}

/// Judge `bids` in order (each with what an earlier delivery stored for it, if anything)
/// against `start`: every accepted bid takes the next room sequence number; one received
/// within `soft_close_window` of the end moves the end to `received_at + soft_close_extension`
/// (if later), which takes the sequence number after it (`extended`).
pub fn decide_run(start: &auction::Model, bids: &[(&BidCommand, Option<Stored>)]) -> Run {
    let mut a = start.clone();
    let mut highest = None;
    let mut decisions = Vec::with_capacity(bids.len());
    // Bids of this run already decided, by their unique key: a repeat is a duplicate of the
    // first, as the database's unique key would make it.
    let mut first: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, (cmd, stored)) in bids.iter().enumerate() {
        let earlier = match stored {
            Some(s) => Some((s.outcome, s.reason.clone())),
            None => first
                .get(&(cmd.bidder.as_str(), cmd.client_bid_id.as_str()))
                .and_then(|&j| match &decisions[j] {
                    Decision::Fresh { judgement, .. } => {
                        Some((judgement.outcome, judgement.reason.clone()))
                    }
                    Decision::Duplicate(_) => None,
                }),
        };
        if let Some((outcome, reason)) = earlier {
            decisions.push(Decision::Duplicate(Judgement {
                outcome,
                reason,
                highest: a.highest_amount,
            }));
            continue;
        }
        first.insert((cmd.bidder.as_str(), cmd.client_bid_id.as_str()), i);
        let judgement = judge(&a, cmd);
        let mut room = Vec::new();
        let mut seq = None;
        if judgement.outcome == Outcome::Accepted {
            a.seq += 1;
            seq = Some(a.seq);
            let before = a.ends_at_ms;
            if cmd.received_at_ms >= a.ends_at_ms - a.soft_close_window_ms {
                a.ends_at_ms = a
                    .ends_at_ms
                    .max(cmd.received_at_ms + a.soft_close_extension_ms);
            }
            room.push(ServerMsg::BidPlaced {
                seq: a.seq,
                amount: cmd.amount,
                bidder: cmd.bidder.clone(),
                received_at_ms: cmd.received_at_ms,
                ends_at_ms: a.ends_at_ms,
            });
            if a.ends_at_ms != before {
                a.seq += 1;
                room.push(ServerMsg::Extended {
                    seq: a.seq,
                    ends_at_ms: a.ends_at_ms,
                });
            }
            a.highest_amount = Some(cmd.amount);
            a.highest_bidder = Some(cmd.bidder.clone());
            a.bid_count += 1;
            highest = Some(i);
        }
        decisions.push(Decision::Fresh {
            judgement,
            seq,
            room,
        });
    }
    Run {
        decisions,
        state: a,
        highest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::reserve_met;

    const START: i64 = 1_000;
    const END: i64 = 100_000;
    const WINDOW: i64 = 10_000;
    const EXTENSION: i64 = 30_000;

    fn auction() -> auction::Model {
        auction::Model {
            id: 7,
            title: "lot".into(),
            starts_at_ms: START,
            ends_at_ms: END,
            scheduled_end_ms: END,
            start_price: 100,
            reserve: Some(500),
            min_increment: 10,
            soft_close_window_ms: WINDOW,
            soft_close_extension_ms: EXTENSION,
            status: "open".into(),
            version: 3,
            seq: 40,
            highest_amount: None,
            highest_bidder: None,
            highest_bid_id: None,
            bid_count: 0,
            created_at_ms: 0,
        }
    }

    fn bid(bidder: &str, id: &str, amount: i64, received_at_ms: i64) -> BidCommand {
        BidCommand {
            auction_id: 7,
            bidder: bidder.into(),
            client_bid_id: id.into(),
            amount,
            received_at_ms,
            stream_seq: None,
        }
    }

    fn run(start: &auction::Model, cmds: &[BidCommand]) -> Run {
        let bids: Vec<_> = cmds.iter().map(|c| (c, None)).collect();
        decide_run(start, &bids)
    }

    fn outcomes(r: &Run) -> Vec<(Outcome, Option<i64>)> {
        r.decisions
            .iter()
            .map(|d| match d {
                Decision::Fresh { judgement, seq, .. } => (judgement.outcome, *seq),
                Decision::Duplicate(j) => (j.outcome, None),
            })
            .collect()
    }

    #[test]
    fn bids_at_or_above_the_minimum_are_accepted_and_below_it_too_low() {
        let cmds = [
            bid("ann", "1", 99, 2_000),  // under the start price
            bid("ann", "2", 100, 2_000), // the start price itself
            bid("bob", "1", 109, 3_000), // under highest + min_increment
            bid("bob", "2", 110, 3_000), // exactly highest + min_increment
        ];
        let r = run(&auction(), &cmds);
        assert_eq!(
            outcomes(&r),
            [
                (Outcome::TooLow, None),
                (Outcome::Accepted, Some(41)),
                (Outcome::TooLow, None),
                (Outcome::Accepted, Some(42)),
            ]
        );
        let Decision::Fresh { judgement, .. } = &r.decisions[2] else {
            panic!("fresh")
        };
        assert_eq!(judgement.reason.as_deref(), Some("the minimum is 110"));
        assert_eq!(
            judgement.highest,
            Some(100),
            "a rejected bid reports the highest"
        );
        assert_eq!(r.state.highest_amount, Some(110));
        assert_eq!(r.state.highest_bidder.as_deref(), Some("bob"));
        assert_eq!((r.state.bid_count, r.highest), (2, Some(3)));
        assert_eq!(min_next(&r.state), 120);
    }

    #[test]
    fn bids_after_the_end_or_before_the_start_change_nothing() {
        let start = auction();
        let r = run(
            &start,
            &[
                bid("ann", "1", 500, END),
                bid("ann", "2", 500, END + 1),
                bid("bob", "1", 500, START - 1),
            ],
        );
        assert_eq!(
            outcomes(&r),
            [
                (Outcome::Closed, None),
                (Outcome::Closed, None),
                (Outcome::NotStarted, None),
            ]
        );
        assert_eq!(r.state, start, "rejected bids leave the auction as it was");
        assert_eq!(r.highest, None);
        let closed = auction::Model {
            status: "closed".into(),
            ..start
        };
        let late = run(&closed, &[bid("ann", "3", 500, START + 1)]);
        assert_eq!(
            outcomes(&late),
            [(Outcome::Closed, None)],
            "closed by status"
        );
    }

    #[test]
    fn a_bid_inside_the_soft_close_window_extends_the_end_and_one_outside_does_not() {
        let start = auction();
        let outside = run(&start, &[bid("ann", "1", 100, END - WINDOW - 1)]);
        assert_eq!(outside.state.ends_at_ms, END);
        assert_eq!(outside.state.seq, 41, "only bid_placed");

        let at = END - WINDOW; // the window's first millisecond
        let inside = run(&start, &[bid("ann", "1", 100, at)]);
        assert_eq!(inside.state.ends_at_ms, at + EXTENSION);
        let Decision::Fresh { room, seq, .. } = &inside.decisions[0] else {
            panic!("fresh")
        };
        assert_eq!(*seq, Some(41));
        assert_eq!(
            room,
            &[
                ServerMsg::BidPlaced {
                    seq: 41,
                    amount: 100,
                    bidder: "ann".into(),
                    received_at_ms: at,
                    ends_at_ms: at + EXTENSION,
                },
                ServerMsg::Extended {
                    seq: 42,
                    ends_at_ms: at + EXTENSION,
                },
            ]
        );

        // A later bid in the (moved) window extends from its own stamp; one whose extension
        // would not pass the current end leaves it.
        let short = auction::Model {
            soft_close_extension_ms: 1_000,
            ..start
        };
        let r = run(&short, &[bid("ann", "1", 100, END - 5_000)]);
        assert_eq!(
            r.state.ends_at_ms, END,
            "extension ends before the current end"
        );
        assert_eq!(r.state.seq, 41, "no extended message");
    }

    #[test]
    fn sequence_numbers_are_contiguous_across_a_run_with_extensions() {
        let r = run(
            &auction(),
            &[
                bid("ann", "1", 100, 2_000),   // 41
                bid("bob", "1", 105, 2_000),   // too low: no number
                bid("bob", "2", 110, 99_000),  // 42; in the window: end 129_000, 43
                bid("ann", "2", 120, 100_000), // 44; outside the new window: no extension
                bid("cat", "1", 130, 125_000), // 45; after the first end, before the new: 155_000, 46
            ],
        );
        let seqs: Vec<i64> = r
            .decisions
            .iter()
            .flat_map(|d| match d {
                Decision::Fresh { room, .. } => room.iter().filter_map(ServerMsg::seq).collect(),
                Decision::Duplicate(_) => Vec::new(),
            })
            .collect();
        assert_eq!(seqs, (41..=46).collect::<Vec<_>>());
        assert_eq!(
            outcomes(&r),
            [
                (Outcome::Accepted, Some(41)),
                (Outcome::TooLow, None),
                (Outcome::Accepted, Some(42)),
                (Outcome::Accepted, Some(44)),
                (Outcome::Accepted, Some(45)),
            ],
            "a bid's own number is its bid_placed's"
        );
        assert_eq!(r.state.seq, 46);
        assert_eq!(r.state.ends_at_ms, 125_000 + EXTENSION);
        assert_eq!((r.state.bid_count, r.highest), (4, Some(4)));
    }

    #[test]
    fn duplicates_keep_their_first_answer_and_take_no_sequence_number() {
        let start = auction();
        let first = bid("ann", "1", 100, 2_000);
        let again_in_run = bid("ann", "1", 100, 2_000);
        let stored_before = bid("bob", "9", 50, 1_500);
        let other_bidder_same_id = bid("bob", "1", 110, 2_500);
        let bids = [
            (&first, None),
            (&again_in_run, None),
            (
                &stored_before,
                Some(Stored {
                    outcome: Outcome::TooLow,
                    reason: Some("the minimum is 100".into()),
                }),
            ),
            (&other_bidder_same_id, None),
        ];
        let r = decide_run(&start, &bids);
        assert_eq!(
            r.decisions[1],
            Decision::Duplicate(Judgement {
                outcome: Outcome::Accepted,
                reason: None,
                highest: Some(100),
            })
        );
        assert_eq!(
            r.decisions[2],
            Decision::Duplicate(Judgement {
                outcome: Outcome::TooLow,
                reason: Some("the minimum is 100".into()),
                highest: Some(100),
            })
        );
        assert_eq!(
            outcomes(&r),
            [
                (Outcome::Accepted, Some(41)),
                (Outcome::Accepted, None),
                (Outcome::TooLow, None),
                (Outcome::Accepted, Some(42)),
            ],
            "an id is scoped to its bidder"
        );
        assert_eq!(r.state.bid_count, 2);
    }

    #[test]
    fn the_reserve_does_not_refuse_bids_it_only_decides_the_result() {
        let start = auction();
        let below = run(&start, &[bid("ann", "1", 200, 2_000)]);
        assert_eq!(outcomes(&below), [(Outcome::Accepted, Some(41))]);
        assert!(!reserve_met(&below.state));
        let met = run(&below.state, &[bid("bob", "1", 500, 3_000)]);
        assert!(reserve_met(&met.state));
        let no_reserve = auction::Model {
            reserve: None,
            ..start
        };
        assert!(!reserve_met(&no_reserve), "no bid, no winner");
        let any = run(&no_reserve, &[bid("ann", "1", 100, 2_000)]);
        assert!(reserve_met(&any.state));
    }
}

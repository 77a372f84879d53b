//! The WebSocket protocol of `/ws/auction/{id}` (docs/protocol/auction.md, AsyncAPI in
//! docs/protocol/auction.asyncapi.yaml). JSON text frames, one message each, tagged by `type`.
//! Times are Unix milliseconds; money is integer minor units.

use serde::{Deserialize, Serialize};

/// Longest client bid id.
pub const MAX_BID_ID_LEN: usize = 64;

/// Close codes this endpoint uses besides the standard ones (1000 normal, 1009 too big,
/// 1012 service restart: reconnect).
pub mod close_code {
    /// The client did not read its messages for `slow_client_timeout`; reconnect and resync.
    pub const SLOW_CLIENT: u16 = 4008;
    /// The client kept sending frames that are not protocol messages.
    pub const PROTOCOL_ABUSE: u16 = 4002;
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Place a bid. `id` is chosen by the client and reused on every resend of this bid.
    Bid { id: String, amount: i64 },
    /// Ask for a fresh `state` (e.g. after seeing a gap in `seq`).
    Sync,
}

/// The highest bid so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Highest {
    pub amount: i64,
    pub bidder: String,
}

/// One accepted bid as the room sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacedBid {
    pub seq: i64,
    pub amount: i64,
    pub bidder: String,
    pub received_at_ms: i64,
}

/// The final result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultView {
    /// `None` when nobody bid or the reserve was not met.
    pub winner: Option<String>,
    pub amount: Option<i64>,
    pub reserve_met: bool,
    pub closed_at_ms: i64,
}

/// The room's full state: sent on every connect, reconnect and `sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct State {
    pub auction_id: i64,
    pub title: String,
    /// `scheduled`, `open` or `closed`.
    pub status: String,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    /// The server clock when this state was read: clients compute their offset from it.
    pub server_now_ms: i64,
    pub start_price: i64,
    pub min_increment: i64,
    /// The smallest amount a new bid must have.
    pub min_next: i64,
    pub reserve_met: bool,
    pub highest: Option<Highest>,
    pub bid_count: i64,
    /// The most recent accepted bids, newest first.
    pub bids: Vec<PlacedBid>,
    /// Last room sequence number reflected in this state.
    pub seq: i64,
    pub result: Option<ResultView>,
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    State(Box<State>),
    /// The bid is stored durably; its outcome follows as `bid_result`.
    Ack {
        id: String,
        status: AckStatus,
    },
    /// The outcome of one of your bids.
    BidResult {
        id: String,
        outcome: Outcome,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        reason: Option<String>,
        highest: Option<i64>,
    },
    /// Room: a bid was accepted.
    BidPlaced {
        seq: i64,
        amount: i64,
        bidder: String,
        received_at_ms: i64,
        ends_at_ms: i64,
    },
    /// Room: a late bid moved the end (soft close).
    Extended {
        seq: i64,
        ends_at_ms: i64,
    },
    /// Room: the auction is over.
    Closed {
        seq: i64,
        winner: Option<String>,
        amount: Option<i64>,
        reserve_met: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
    },
}

impl ServerMsg {
    /// Room sequence of a room message.
    pub fn seq(&self) -> Option<i64> {
        match self {
            ServerMsg::BidPlaced { seq, .. }
            | ServerMsg::Extended { seq, .. }
            | ServerMsg::Closed { seq, .. } => Some(*seq),
            ServerMsg::State(s) => Some(s.seq),
            _ => None,
        }
    }
    /// The `type` tag, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMsg::State(_) => "state",
            ServerMsg::Ack { .. } => "ack",
            ServerMsg::BidResult { .. } => "bid_result",
            ServerMsg::BidPlaced { .. } => "bid_placed",
            ServerMsg::Extended { .. } => "extended",
            ServerMsg::Closed { .. } => "closed",
            ServerMsg::Error { .. } => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Stored now.
    Stored,
    /// This id was stored before; nothing new was queued.
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The bid is the new highest.
    Accepted,
    /// Below the minimum (`start_price`, or highest + `min_increment`).
    TooLow,
    /// Received at or after the end.
    Closed,
    /// Received before the start.
    NotStarted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::TooLow => "too_low",
            Outcome::Closed => "closed",
            Outcome::NotStarted => "not_started",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accepted" => Outcome::Accepted,
            "too_low" => Outcome::TooLow,
            "closed" => Outcome::Closed,
            "not_started" => Outcome::NotStarted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown `type`, or a field of the wrong type.
    BadMessage,
    /// A bid with an invalid id or amount.
    InvalidBid,
    /// This connection's role may not bid (needs `bidder`).
    Forbidden,
    /// Too many bids; retry later with the same id.
    RateLimited,
    /// The bid could not be stored; retry with the same id.
    Unavailable,
}

/// What travels on the room subject between the worker and every web instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomEvent {
    /// Deliver only to this bidder's sockets (`bid_result`); `None`: everyone in the room.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    pub msg: ServerMsg,
}

/// What travels on the bid stream (`auction.bids.<partition>.<auction>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Bid {
        auction_id: i64,
        bidder: String,
        id: String,
        amount: i64,
        received_at_ms: i64,
    },
    /// Published by the scheduler after `ends_at` + `close_settle`: processed after every bid
    /// stored before it on the same (ordered) partition.
    Close { auction_id: i64, ends_at_ms: i64 },
}

/// Validate a client bid: id shape and amount range. The message names the field.
pub fn validate_bid(id: &str, amount: i64) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_BID_ID_LEN {
        return Err(format!("id: must be 1 to {MAX_BID_ID_LEN} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("id: only letters, digits, `-` and `_` are allowed".into());
    }
    if amount <= 0 {
        return Err("amount: must be a positive integer in minor units".into());
    }
    if amount > 1_000_000_000_000_000 {
        return Err("amount: too large".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_and_reject_unknown_fields() {
        let bid: ClientMsg =
            serde_json::from_str(r#"{"type":"bid","id":"a1","amount":500}"#).expect("bid");
        assert_eq!(
            bid,
            ClientMsg::Bid {
                id: "a1".into(),
                amount: 500
            }
        );
        assert!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"bid","id":"a1","amount":1.5}"#).is_err()
        );
        assert!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"bid","id":"a","amount":1,"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn bids_are_validated_by_field() {
        assert!(validate_bid("b-1_x", 1).is_ok());
        assert!(validate_bid("", 1).expect_err("invalid").starts_with("id"));
        assert!(
            validate_bid("a b", 1)
                .expect_err("invalid")
                .starts_with("id")
        );
        assert!(
            validate_bid(&"x".repeat(65), 1)
                .expect_err("invalid")
                .starts_with("id")
        );
        assert!(
            validate_bid("a", 0)
                .expect_err("invalid")
                .starts_with("amount")
        );
        assert!(
            validate_bid("a", -5)
                .expect_err("invalid")
                .starts_with("amount")
        );
    }

    #[test]
    fn server_messages_are_tagged() {
        let m = ServerMsg::Ack {
            id: "a".into(),
            status: AckStatus::Duplicate,
        };
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(v["type"], "ack");
        assert_eq!(v["status"], "duplicate");
        let back: ServerMsg = serde_json::from_value(v).expect("parse");
        assert_eq!(back, m);
    }
}

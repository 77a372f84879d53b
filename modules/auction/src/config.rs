//! The `[auction]` section.

use std::time::Duration;

use bulwark_kernel::config::ConfigError;
use serde::{Deserialize, Serialize};

/// Settings of the auction module. Every field has a default, so an empty section works.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuctionConfig {
    /// Bids are spread over this many ordered partitions (`auction.bids.<p>.<auction>`); one
    /// worker process owns a partition at a time, so bids of one auction are applied in the
    /// order the stream stored them. Changing it needs an empty stream (see docs/auction.md).
    pub partitions: u16,
    /// Lease on a partition; a crashed worker's partitions move after this long.
    #[serde(with = "humantime_serde")]
    pub partition_lease: Duration,
    /// An unacked bid is redelivered after this long. A worker taking over from one that died
    /// waits this long (plus a third of the lease) before it fetches, so keep it short: the
    /// worker reports progress while it retries, so only a single transaction must fit in it.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a bid that keeps failing goes to the dead-letter stream.
    pub max_deliver: u32,
    /// The scheduler closes an auction this long after `ends_at`, so that every bid stamped
    /// before the end has been stored ahead of the close (keep it above `bus.request_timeout`).
    #[serde(with = "humantime_serde")]
    pub close_settle: Duration,
    /// How often the scheduler looks for auctions to close.
    #[serde(with = "humantime_serde")]
    pub scheduler_interval: Duration,
    /// Bids in the `state` message.
    pub state_bids: u32,
    /// Room messages buffered per socket before the client is resynchronised with a fresh
    /// `state`.
    pub room_buffer: usize,
    /// Frames queued for one client; a client that stays this far behind for
    /// `slow_client_timeout` is closed with 4008.
    pub send_queue: usize,
    #[serde(with = "humantime_serde")]
    pub slow_client_timeout: Duration,
    /// Largest accepted WebSocket message in bytes.
    pub max_message_bytes: usize,
    /// Sustained bids per second per bidder and process, and the burst above it.
    pub bids_per_second: f64,
    pub bid_burst: f64,
    /// Presence entries of a crashed instance disappear after this long.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
}

impl Default for AuctionConfig {
    fn default() -> Self {
        Self {
            partitions: 4,
            partition_lease: Duration::from_secs(10),
            ack_wait: Duration::from_secs(10),
            max_deliver: 10,
            close_settle: Duration::from_secs(6),
            scheduler_interval: Duration::from_millis(500),
            state_bids: 20,
            room_buffer: 256,
            send_queue: 64,
            slow_client_timeout: Duration::from_secs(5),
            max_message_bytes: 4096,
            bids_per_second: 5.0,
            bid_burst: 10.0,
            presence_ttl: Duration::from_secs(30),
        }
    }
}

impl bulwark_kernel::config::ModuleConfig for AuctionConfig {
    /// Rules serde cannot express; errors name the key.
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |k: &str, m: &str| Err(ConfigError::new(format!("auction.{k}"), m));
        if self.partitions == 0 || self.partitions > 1024 {
            return err("partitions", "must be between 1 and 1024");
        }
        if self.partition_lease < Duration::from_secs(1) {
            return err("partition_lease", "must be at least 1s");
        }
        if self.ack_wait < Duration::from_secs(1) {
            return err("ack_wait", "must be at least 1s");
        }
        if self.max_deliver == 0 {
            return err("max_deliver", "must be at least 1");
        }
        if self.scheduler_interval.is_zero() {
            return err("scheduler_interval", "must be positive");
        }
        if self.state_bids == 0 || self.state_bids > 500 {
            return err("state_bids", "must be between 1 and 500");
        }
        if self.room_buffer == 0 || self.send_queue == 0 {
            return err("room_buffer", "room_buffer and send_queue must be positive");
        }
        if self.max_message_bytes < 256 {
            return err("max_message_bytes", "must be at least 256");
        }
        if !(self.bids_per_second > 0.0 && self.bids_per_second.is_finite()) {
            return err("bids_per_second", "must be a positive number");
        }
        if !(self.bid_burst >= 1.0 && self.bid_burst.is_finite()) {
            return err("bid_burst", "must be at least 1");
        }
        if self.presence_ttl < Duration::from_secs(3) {
            return err("presence_ttl", "must be at least 3s");
        }
        Ok(())
    }
}

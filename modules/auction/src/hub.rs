//! This instance's rooms: the sockets watching each auction (A2, A4).
//!
//! The worker publishes room messages on the ephemeral bus subject `auction.room.<id>`; one
//! subscription per web instance feeds them into a `tokio::sync::broadcast` channel per room,
//! which every local socket of that room reads. The channel is bounded (`room_buffer`): a
//! socket that falls that far behind gets `Lagged` and resynchronises with a fresh `state`
//! instead of holding memory for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::protocol::RoomEvent;

#[derive(Clone)]
pub struct Hub {
    rooms: Arc<Mutex<HashMap<i64, broadcast::Sender<Arc<RoomEvent>>>>>,
    buffer: usize,
}

impl Hub {
    pub fn new(buffer: usize) -> Self {
        Self {
            rooms: Arc::default(),
            buffer: buffer.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, broadcast::Sender<Arc<RoomEvent>>>> {
        // A panic while holding this lock leaves a consistent map; keep serving.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the room of `auction_id`.
    pub fn join(&self, auction_id: i64) -> broadcast::Receiver<Arc<RoomEvent>> {
        let mut rooms = self.lock();
        rooms
            .entry(auction_id)
            .or_insert_with(|| broadcast::channel(self.buffer).0)
            .subscribe()
    }

    /// Forget the room when its last socket left.
    pub fn leave(&self, auction_id: i64) {
        let mut rooms = self.lock();
        if rooms
            .get(&auction_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            rooms.remove(&auction_id);
        }
    }

    /// Hand a room message to every local socket of the room (none: dropped).
    pub fn deliver(&self, auction_id: i64, event: RoomEvent) {
        let rooms = self.lock();
        if let Some(tx) = rooms.get(&auction_id) {
            let _ = tx.send(Arc::new(event));
        }
    }

    pub fn rooms(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ServerMsg;

    fn ev(seq: i64) -> RoomEvent {
        RoomEvent {
            to: None,
            msg: ServerMsg::Extended { seq, ends_at_ms: 1 },
        }
    }

    #[tokio::test]
    async fn rooms_are_separate_and_forgotten_when_empty() {
        let hub = Hub::new(4);
        let mut a = hub.join(1);
        let mut b = hub.join(2);
        hub.deliver(1, ev(1));
        assert_eq!(a.recv().await.expect("a").msg.seq(), Some(1));
        assert!(b.try_recv().is_err());
        drop(b);
        hub.leave(2);
        assert_eq!(hub.rooms(), 1);
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_it_lagged() {
        let hub = Hub::new(2);
        let mut a = hub.join(1);
        for i in 0..5 {
            hub.deliver(1, ev(i));
        }
        assert!(matches!(
            a.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
    }
}

//! WebSockets that take part in the drain (K7) and cannot eat unbounded memory.
//!
//! axum's graceful shutdown does not see upgraded connections, so [`serve`] runs each socket on
//! the [`Shutdown`] tracker. The socket is split: the handler reads `inbound` and writes
//! through `outbound`, a bounded queue drained by a writer task. When the drain reaches its
//! closing phase the writer sends close code 1012 (service restart: reconnect elsewhere); from
//! the start of the drain, new upgrades are refused with 503.
//! A handler whose client cannot keep up sees `try_send` fail and decides (resync or close).
//! A close with a code goes through [`Closer`], not the queue: the queue may be the very thing
//! that is full (a slow client), and the close must still reach the client.

use std::future::Future;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::SinkExt as _;
use futures::stream::{SplitStream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::shutdown::{CLOSE_SERVICE_RESTART, Shutdown};

/// How long a finished socket's writer may take to flush before the connection is dropped.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Limits of one socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    /// Messages queued for a client before `try_send` fails.
    pub send_queue: usize,
    /// Largest accepted frame and message, in bytes.
    pub max_message_bytes: usize,
}

impl Default for SocketLimits {
    fn default() -> Self {
        Self {
            send_queue: 64,
            max_message_bytes: 16 * 1024,
        }
    }
}

/// What a socket handler works with.
pub struct TrackedSocket {
    /// Frames from the client.
    pub inbound: SplitStream<WebSocket>,
    /// Frames to the client (bounded). Dropping every sender closes the socket normally.
    pub outbound: mpsc::Sender<Message>,
    /// Fires when the process starts closing; the handler should return soon after.
    pub closing: CancellationToken,
    /// Close the socket with a code, ahead of whatever is still queued in `outbound`.
    pub closer: Closer,
}

/// Closes a socket with a code and reason, bypassing the (possibly full) outbound queue: the
/// writer drops the queued frames, finishes the frame it is writing, and sends the close
/// frame next, within the writer's grace period (a client that reads nothing at all is then
/// dropped without it).
#[derive(Debug)]
pub struct Closer(Option<oneshot::Sender<Message>>);

impl Closer {
    /// Send `frame` (a [`Message::Close`]) as the socket's next and last frame. Only the first
    /// call counts.
    pub fn close_with(&mut self, frame: Message) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(frame);
        }
    }

    /// [`Closer::close_with`] a close frame with `code` and `reason`.
    pub fn close(&mut self, code: u16, reason: &'static str) {
        self.close_with(close(code, reason));
    }
}

/// A close frame with a code and reason.
pub fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// The close frame for a failed read: 1009 when the client sent a message above
/// `max_message_bytes`, 1002 for other protocol errors. axum hides the tungstenite error
/// type, so the capacity case is recognised by its text.
pub fn close_for_read_error(e: &axum::Error) -> Message {
    let text = e.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        close(1009, "message too big")
    } else {
        close(1002, "protocol error")
    }
}

/// The close frame the handler sent through its [`Closer`]; never ready once the closer was
/// dropped without closing (`rx` is then `None`).
async fn next_close(
    rx: &mut Option<oneshot::Receiver<Message>>,
) -> Result<Message, oneshot::error::RecvError> {
    match rx {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

/// Upgrade `ws` and run `handler` on a tracked socket labelled `module` in metrics.
pub fn serve<F, Fut>(
    ws: WebSocketUpgrade,
    shutdown: &Shutdown,
    module: &'static str,
    limits: SocketLimits,
    handler: F,
) -> Response
where
    F: FnOnce(TrackedSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if shutdown.is_draining() {
        // Readiness already fails; a load balancer that still routes here learns it now and
        // the client's next attempt goes elsewhere.
        use axum::response::IntoResponse as _;
        let mut res = crate::problem::Problem::unavailable(
            "this instance is shutting down; reconnect (another instance will answer)",
        )
        .into_response();
        res.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return res;
    }
    let shutdown = shutdown.clone();
    ws.max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        .on_upgrade(move |socket| async move {
            if shutdown.closing_token().is_cancelled() {
                let (mut sink, _) = socket.split();
                let _ = sink.send(close(CLOSE_SERVICE_RESTART, "server restarting")).await;
                return;
            }
            let gauge = metrics::gauge!("bulwark_websocket_connections", "module" => module);
            gauge.increment(1.0);
            let closing = shutdown.closing_token();
            let (mut sink, inbound) = socket.split();
            let (tx, mut rx) = mpsc::channel::<Message>(limits.send_queue.max(1));
            let (close_tx, close_rx) = oneshot::channel::<Message>();
            let writer_closing = closing.clone();
            let writer = shutdown.spawn(async move {
                // `None` once the handler dropped its closer without closing.
                let mut close_rx = Some(close_rx);
                loop {
                    tokio::select! {
                        biased;
                        frame = next_close(&mut close_rx) => {
                            match frame {
                                Ok(frame) => {
                                    // Whatever is still queued is dropped: the close goes next.
                                    let _ = sink.send(frame).await;
                                    break;
                                }
                                Err(_) => close_rx = None,
                            }
                        }
                        msg = rx.recv() => match msg {
                            Some(m) => {
                                let is_close = matches!(m, Message::Close(_));
                                if sink.send(m).await.is_err() || is_close {
                                    break;
                                }
                            }
                            None => {
                                // The handler returned; if that was because of the drain, say so.
                                let frame = if writer_closing.is_cancelled() {
                                    close(CLOSE_SERVICE_RESTART, "server restarting")
                                } else {
                                    Message::Close(None)
                                };
                                let _ = sink.send(frame).await;
                                break;
                            }
                        },
                        _ = writer_closing.cancelled() => {
                            metrics::counter!("bulwark_websocket_closed_for_restart_total", "module" => module).increment(1);
                            let _ = sink.send(close(CLOSE_SERVICE_RESTART, "server restarting")).await;
                            break;
                        }
                    }
                }
                let _ = sink.close().await;
            });
            shutdown.spawn(async move {
                handler(TrackedSocket {
                    inbound,
                    outbound: tx,
                    closing,
                    closer: Closer(Some(close_tx)),
                })
                .await;
                // The writer flushes what is queued and the close frame. A client that stopped
                // reading blocks it on a full TCP buffer: give up after WRITER_GRACE and drop the
                // connection, so a dead reader holds no task or buffer.
                let abort = writer.abort_handle();
                if tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
                    abort.abort();
                    metrics::counter!("bulwark_websocket_dropped_unread_total", "module" => module).increment(1);
                }
                gauge.decrement(1.0);
            });
        })
}

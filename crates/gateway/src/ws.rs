//! One WebSocket connection: a reader that handles client frames one at a time (so a client's
//! sends keep their order), a writer that drains the connection's bounded queue, and presence
//! bookkeeping at both ends.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chat_events::DeviceId;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::hub::Kick;
use tokio_tungstenite::tungstenite;
use tracing::debug;

use crate::auth::Principal;
use crate::edits::Change;
use crate::error::ApiError;
use crate::frames::{ClientFrame, ServerFrame};
use crate::hub::Outbound;
use crate::routing::ConnRef;
use crate::service::{Chat, ConnCtx, SendCommand};

/// Close codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_INVALID_DATA: u16 = 1007;
pub(crate) const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// A frame the peer's TCP window has not taken within this long makes the connection a slow
/// consumer: it is dropped (its close frame could not be written either), and the client syncs
/// from its cursor when it reconnects.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the close handshake may take (our close frame out, the peer's in) before the socket
/// is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Sink = futures::stream::SplitSink<WebSocket, Message>;
type Stream = futures::stream::SplitStream<WebSocket>;

fn close_reason(code: u16) -> &'static str {
    match code {
        CLOSE_TOO_BIG => "frame too large",
        CLOSE_PROTOCOL_ERROR => "protocol error",
        CLOSE_INVALID_DATA => "text frame is not valid UTF-8",
        CLOSE_TRY_AGAIN_LATER => "too slow to receive; reconnect and sync",
        CLOSE_GOING_AWAY => "server going away or idle; reconnect",
        CLOSE_POLICY => "session expired or ended; log in again",
        _ => "",
    }
}

/// Sends the close frame, bounded by [`CLOSE_TIMEOUT`]. After a close from the peer the socket
/// has already queued its answer (the peer's code), and this one is refused.
async fn send_close(sink: &mut Sink, code: u16) {
    let _closing = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _sent = sink.send(Message::Close(Some(CloseFrame { code, reason: close_reason(code).into() }))).await;
        sink.flush().await
    })
    .await;
}

/// Ends the close handshake on the read side: reads (and discards) what the peer still sends
/// until its close frame, which also flushes the answer to a close the peer started. Without it
/// a socket closed with unread input in the kernel is reset (RST), and the peer may lose our
/// close frame. Bounded by [`CLOSE_TIMEOUT`].
async fn finish_close(stream: &mut Stream) {
    let _drained = tokio::time::timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = stream.next().await {} }).await;
}

/// `/v1/ws/echo`: every text and binary message back as it came; the reads, limits, close codes
/// and close handshake of a chat connection.
pub async fn echo(socket: WebSocket, idle: Duration) {
    let (mut sink, mut stream) = socket.split();
    let code = loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => break Some(CLOSE_GOING_AWAY),
            Ok(None) => return,
            Ok(Some(Err(e))) => match close_code_for(&e) {
                Some(code) => break Some(code),
                None => return,
            },
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) => break None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
        }
    };
    if let Some(code) = code {
        send_close(&mut sink, code).await;
    }
    finish_close(&mut stream).await;
}

/// How a frame's write ended.
enum Written {
    Sent,
    /// The peer is gone (a write error).
    Gone,
    /// The peer did not take the frame in time, or the queue overflowed meanwhile.
    Slow,
}

/// Writes one frame, giving up after [`WRITE_TIMEOUT`] or when the connection is kicked (its
/// queue overflowed while this write was blocked by TCP back-pressure).
async fn write(sink: &mut Sink, m: Message, kick: &Kick) -> Written {
    tokio::select! {
        biased;
        r = sink.send(m) => if r.is_ok() { Written::Sent } else { Written::Gone },
        _ = kick.notified() => Written::Slow,
        _ = tokio::time::sleep(WRITE_TIMEOUT) => Written::Slow,
    }
}

fn error_frame(e: &ApiError, r#ref: crate::frames::Ref) -> Outbound {
    let retry_after_ms = e.retry_after.map(|d| d.as_millis().max(1) as u64);
    Arc::from(ServerFrame::Error { code: e.code, message: e.message.clone(), retry_after_ms, r#ref }.to_text())
}

/// The close code for a read error (RFC 6455 §7.4.1): 1009 for a message over the limit, 1007
/// for a text message that is not UTF-8, 1002 for any other violation of the protocol; none
/// when the socket itself failed (nothing can be sent on it).
fn close_code_for(e: &axum::Error) -> Option<u16> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        match s.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => return Some(CLOSE_TOO_BIG),
            Some(tungstenite::Error::Utf8(_)) => return Some(CLOSE_INVALID_DATA),
            Some(tungstenite::Error::Protocol(_)) => return Some(CLOSE_PROTOCOL_ERROR),
            Some(_) => return None,
            None => {}
        }
        source = s.source();
    }
    e.to_string().contains("Space limit exceeded").then_some(CLOSE_TOO_BIG)
}

/// Serves one authenticated connection until it closes: splits the socket and hands the halves
/// to a task of their own, so that the upgrade task (which holds the whole socket and the
/// handler's state, about 2 KB) ends at once and an idle connection keeps only what it uses.
pub fn serve(chat: Arc<Chat>, principal: Principal, device: DeviceId, socket: WebSocket, slot: Option<ConnectionSlot>) -> std::future::Ready<()> {
    let (sink, stream) = socket.split();
    tokio::spawn(async move {
        connection(chat, principal, device, sink, stream).await;
        // The user's connection slot on this node is given back when the connection has ended.
        drop(slot);
    });
    std::future::ready(())
}

/// A user's place under the node's connections-per-user cap, held for the connection's life.
pub type ConnectionSlot = crate::limits::OwnedSlot<chat_events::UserId>;

async fn connection(
    chat: Arc<Chat>,
    principal: Principal,
    device: DeviceId,
    mut sink: Sink,
    mut stream: Stream,
) {
    let user = principal.user_id;
    let (tx, mut rx) = mpsc::channel::<Outbound>(chat.limits.conn_queue);
    let kick = Arc::new(Kick::default());
    // `welcome` is queued before the connection can receive pushes, so it is always first.
    let welcome = ServerFrame::Welcome { user_id: user, device_id: device.to_string(), pending: Box::pin(chat.pending(user)).await };
    let _queued = tx.try_send(Arc::from(welcome.to_text()));
    let id = chat.hub.register(user, device.clone(), principal.issued_at_ms, tx.clone(), kick.clone());
    // A revocation read between the upgrade's check and the registration.
    if chat.revocations.ended(&principal) {
        kick.close(CLOSE_POLICY);
    }
    let ctx = ConnCtx { user, device: device.clone(), conn: ConnRef { node: chat.node.clone(), conn: id }, read_only: principal.read_only() };
    chat.metrics.connections_open.inc();
    chat.metrics.connections_total.inc();

    let (close_tx, mut close_rx) = oneshot::channel::<u16>();
    let idle = chat.limits.ws_idle;
    let ping_every = idle / 3;
    let metrics_chat = chat.clone();
    let writer = tokio::spawn(async move {
        // The server pings this often (a third of the idle timeout), so that dead peers are
        // noticed and proxies keep the socket; clients' stacks answer, which keeps them connected.
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let slow = || metrics_chat.metrics.slow_consumers.inc();
        let code = loop {
            let frame = tokio::select! {
                biased;
                code = &mut close_rx => break code.unwrap_or(CLOSE_NORMAL),
                _ = kick.notified() => match kick.code() {
                    Some(code) => break code,
                    None => {
                        slow();
                        break CLOSE_TRY_AGAIN_LATER;
                    }
                },
                m = rx.recv() => match m {
                    Some(text) => Message::Text(Utf8Bytes::from(text.as_ref())),
                    None => break CLOSE_NORMAL,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            match write(&mut sink, frame, &kick).await {
                Written::Sent => {}
                Written::Gone => return false,
                // The socket cannot take even a close frame: dropped as it is.
                Written::Slow => {
                    if kick.code().is_none() {
                        slow();
                    }
                    return false;
                }
            }
        };
        send_close(&mut sink, code).await;
        true
    });
    let mut writer = writer;
    // Whether the writer has ended, and if so whether it sent a close frame (else the socket is
    // dropped as it is).
    let mut writer_done: Option<bool> = None;

    // Registered for routing before the reader starts; announced online beside it: with the log
    // unreachable the presence append waits up to its timeout, and the client must be able to sync
    // meanwhile. The offline announcement waits for it (online is appended first).
    let announced = Box::pin(chat.connected(&ctx)).await.then(|| {
        let chat = chat.clone();
        tokio::spawn(async move { chat.went_online(user).await })
    });
    let expiry = tokio::time::Instant::now()
        + (principal.expires_at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);

    let mut closing = chat.hub.closing();
    let close_code = loop {
        if *closing.borrow() {
            break Some(CLOSE_GOING_AWAY);
        }
        let next = tokio::select! {
            // A connection with no frame from the client for this long is closed.
            n = tokio::time::timeout(idle, stream.next()) => n,
            _ = closing.changed() => break Some(CLOSE_GOING_AWAY),
            _ = tokio::time::sleep_until(expiry) => break Some(CLOSE_POLICY),
            // The writer gave up (a slow consumer, or the peer is gone): so does the reader.
            closed = &mut writer => {
                writer_done = Some(closed.unwrap_or(false));
                break None;
            }
        };
        let msg = match next {
            Err(_) => break Some(CLOSE_GOING_AWAY),
            Ok(None) => break None,
            Ok(Some(Err(e))) => {
                let code = close_code_for(&e);
                let label = match code {
                    Some(CLOSE_TOO_BIG) => "frame_too_large",
                    Some(CLOSE_INVALID_DATA) => "invalid_utf8",
                    Some(CLOSE_PROTOCOL_ERROR) => "protocol_error",
                    _ => "socket_error",
                };
                chat.metrics.errors.with_label_values(&[label]).inc();
                debug!(error = %e, "websocket read error");
                break code;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(text) => {
                // Boxed: the futures of frame handling are large and live only while a frame is
                // handled, so an idle connection does not carry their space.
                if let Some(reply) = Box::pin(handle_text(&chat, &ctx, text.as_str())).await {
                    // Replies go through the same bounded queue as pushes, in order.
                    if tx.send(reply).await.is_err() {
                        break None;
                    }
                }
            }
            Message::Binary(_) => {
                let e = ApiError::bad_request("unsupported_frame", "frames are JSON text");
                chat.metrics.errors.with_label_values(&[e.code]).inc();
                if tx.send(error_frame(&e, None)).await.is_err() {
                    break None;
                }
            }
            Message::Close(_) => break None,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    };

    // The close code goes to the writer before its queue closes: with the queue closed first,
    // a writer waiting on it could end with 1000 before the code arrived (seen in CI: a frame over
    // the limit closed with 1000 instead of 1009).
    if let Some(code) = close_code {
        let _sent = close_tx.send(code);
    }
    chat.hub.unregister(user, id);
    drop(tx);
    // The socket is closed (both halves dropped) before the disconnect is handled: that appends
    // a presence event and pushes to contacts, and holding the descriptor meanwhile let a burst of
    // reconnects run the process out of descriptors (the accept loop then pauses for a second).
    // Bounded: every write of the writer gives up after WRITE_TIMEOUT, the close handshake after
    // CLOSE_TIMEOUT.
    match writer_done {
        None => {
            let ((), _done) = tokio::join!(finish_close(&mut stream), writer);
        }
        Some(true) => finish_close(&mut stream).await,
        Some(false) => {}
    }
    drop(stream);
    chat.metrics.connections_open.dec();
    if let Some(announced) = announced {
        let _announced = announced.await;
    }
    Box::pin(chat.disconnected(&ctx)).await;
    chat.hub.session_ended();
}

/// Handles one text frame; returns the reply to queue, if any.
async fn handle_text(chat: &Chat, ctx: &ConnCtx, text: &str) -> Option<Outbound> {
    // `bad_json` (not JSON) or `invalid_frame` (not a client frame), echoing the object's `ref`.
    let (frame, r#ref) = match crate::frames::parse_client_frame(text) {
        Ok(parsed) => parsed,
        Err(e) => {
            chat.metrics.errors.with_label_values(&[e.code]).inc();
            return Some(error_frame(&ApiError::bad_request(e.code, e.message), e.r#ref));
        }
    };
    chat.metrics.frames_in.with_label_values(&[frame.type_name()]).inc();
    let writes = matches!(
        frame,
        ClientFrame::Send { .. }
            | ClientFrame::Delivered { .. }
            | ClientFrame::Read { .. }
            | ClientFrame::Edit { .. }
            | ClientFrame::Delete { .. }
            | ClientFrame::React { .. }
            | ClientFrame::Typing { .. }
    );
    if writes && ctx.read_only {
        let e = ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden", "auditor accounts are read-only");
        chat.metrics.errors.with_label_values(&[e.code]).inc();
        return Some(error_frame(&e, r#ref));
    }
    let result = match frame {
        ClientFrame::Send { r#ref, client_msg_id, to, conversation_id, kind, body, media_id, metadata, retry, reply_to, mentions } => {
            chat.send(ctx, SendCommand { r#ref, client_msg_id, to, conversation_id, kind, body, media_id, metadata, retry, reply_to, mentions }).await
        }
        ClientFrame::Delivered { r#ref, conversation_id, message_ids } => chat
            .delivered(ctx, &conversation_id, &message_ids)
            .await
            .map(|()| ServerFrame::Ack { r#ref, for_type: "delivered" }),
        ClientFrame::Read { r#ref, conversation_id, up_to } => {
            chat.read(ctx, &conversation_id, &up_to).await.map(|()| ServerFrame::Ack { r#ref, for_type: "read" })
        }
        ClientFrame::Edit { r#ref, conversation_id, message_id, body } => chat
            .change_message(ctx, &conversation_id, &message_id, Change::Edit { body })
            .await
            .map(|()| ServerFrame::Ack { r#ref, for_type: "edit" }),
        ClientFrame::Delete { r#ref, conversation_id, message_id, scope } => match scope.as_deref() {
            None | Some("everyone") => chat.change_message(ctx, &conversation_id, &message_id, Change::Delete).await,
            Some("me") => chat.hide_message(ctx, &conversation_id, &message_id).await,
            Some(_) => Err(ApiError::bad_request("invalid_frame", "scope is everyone or me")),
        }
        .map(|()| ServerFrame::Ack { r#ref, for_type: "delete" }),
        ClientFrame::React { r#ref, conversation_id, message_id, emoji } => chat
            .react(ctx, &conversation_id, &message_id, emoji.as_deref())
            .await
            .map(|()| ServerFrame::Ack { r#ref, for_type: "react" }),
        ClientFrame::Sync { r#ref, after, limit } => chat.sync(ctx, r#ref, after, limit).await,
        ClientFrame::Typing { r#ref, conversation_id } => {
            chat.typing(ctx, &conversation_id).await.map(|()| ServerFrame::Ack { r#ref, for_type: "typing" })
        }
        ClientFrame::Ping { r#ref } => Ok(ServerFrame::Pong { r#ref }),
    };
    Some(match result {
        Ok(frame) => Arc::from(frame.to_text()),
        Err(e) => {
            chat.metrics.errors.with_label_values(&[e.code]).inc();
            error_frame(&e, r#ref)
        }
    })
}

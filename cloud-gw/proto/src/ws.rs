//! Messages over a WebSocket: one binary WebSocket message per frame.
//! Both sides use this, so limits and error handling are the same.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

use crate::frame::{FrameError, MAX_PAYLOAD};
use crate::message::Message;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer closed the link{}", .0.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),
    #[error("the peer sent a text message; the link is binary")]
    Text,
}

/// The WebSocket limits that go with [`MAX_PAYLOAD`], and small buffers
/// (tungstenite's default is 128 KiB each way per connection; cloud-gw
/// holds thousands of mostly idle links).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_PAYLOAD + 2))
        .max_frame_size(Some(MAX_PAYLOAD + 2))
}

/// The edge's side: one link per node, so messages queued together (the
/// hello and the digest) may wait in a buffer and go out in one write.
pub fn ws_client_config() -> WebSocketConfig {
    ws_config().write_buffer_size(16 << 10)
}

pub struct Link<S> {
    ws: WebSocketStream<S>,
    /// When the peer last sent anything (data, ping or pong).
    seen: std::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    pub fn new(ws: WebSocketStream<S>) -> Link<S> {
        Link {
            ws,
            seen: std::time::Instant::now(),
        }
    }

    pub async fn send(&mut self, m: &Message) -> Result<(), LinkError> {
        let bytes = m.encode(MAX_PAYLOAD)?;
        self.ws.send(WsMessage::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Queue a message to go out with the next `send` (one write, one TLS
    /// record for both).
    pub async fn feed(&mut self, m: &Message) -> Result<(), LinkError> {
        let bytes = m.encode(MAX_PAYLOAD)?;
        self.ws.feed(WsMessage::Binary(bytes.into())).await?;
        Ok(())
    }

    /// The next message. WebSocket pings are answered on the way.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        loop {
            let next = self.ws.next().await;
            self.seen = std::time::Instant::now();
            match next {
                None => return Err(LinkError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(WsMessage::Binary(b))) => return Ok(Message::decode(&b, MAX_PAYLOAD)?),
                Some(Ok(WsMessage::Close(f))) => {
                    return Err(LinkError::Closed(f.map(|f| f.reason.to_string())))
                }
                Some(Ok(WsMessage::Text(_))) => return Err(LinkError::Text),
                Some(Ok(_)) => {}
            }
        }
    }

    /// How long the peer has been silent.
    pub fn idle(&self) -> std::time::Duration {
        self.seen.elapsed()
    }

    /// A WebSocket ping (2 bytes plus TLS framing): the heartbeat.
    pub async fn ping(&mut self) -> Result<(), LinkError> {
        self.ws.send(WsMessage::Ping(Default::default())).await?;
        Ok(())
    }

    /// Close with a reason the peer logs.
    pub async fn close(&mut self, reason: &str) {
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: reason.to_string().into(),
            }))
            .await;
    }

    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }
}

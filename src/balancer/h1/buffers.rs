//! One client connection's buffers, reused from request to request.

use bytes::BytesMut;

use crate::http1::request::RequestHead;
use crate::http1::response::ResponseHead;

/// One client connection's reusable buffers.
#[derive(Default)]
pub(super) struct Buffers {
    /// Bytes from the client not yet used.
    pub(super) input: BytesMut,
    /// What is written next, to the upstream or the client.
    pub(super) out: Vec<u8>,
    /// Bytes from the upstream.
    pub(super) resp: BytesMut,
    pub(super) head: RequestHead,
    pub(super) rhead: ResponseHead,
}

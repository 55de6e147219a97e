//! How every route of a node writes its answer: JSON, with
//! `Content-Type: application/json`, from a fixed body or a serde type.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Response, StatusCode};

/// A node's answer: a whole JSON body.
pub type Answer = Response<Full<Bytes>>;

/// An answer whose body is fixed (the hot path's and the refusals').
pub fn fixed(status: StatusCode, body: &'static [u8]) -> Answer {
    crate::server::json(status, Bytes::from_static(body))
}

/// An answer whose body was written already (a cached one).
pub fn written(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    crate::server::json(status, body)
}

/// A 200 with `body` (a contract type, see [`crate::protocol`]) as JSON.
pub fn json_of(body: &impl serde::Serialize) -> Answer {
    match serde_json::to_vec(body) {
        Ok(body) => written(StatusCode::OK, body),
        Err(_) => fixed(StatusCode::INTERNAL_SERVER_ERROR, b"{\"status\":\"error\"}"),
    }
}

/// The 405 naming the methods the route takes.
pub fn not_allowed(allow: &'static str) -> Answer {
    let mut res = fixed(
        StatusCode::METHOD_NOT_ALLOWED,
        b"{\"status\":\"method_not_allowed\"}",
    );
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}

/// Unix milliseconds as RFC 3339 (UTC, to the millisecond).
pub fn rfc3339(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

//! How every route of a node writes its answer: JSON, with
//! `Content-Type: application/json`, from a fixed body or a serde type
//! (`/holders` alone answers bytes, see [`bytes`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Response, StatusCode};

/// A node's answer: a whole JSON body.
pub type Answer = Response<Full<Bytes>>;

/// An answer whose body is fixed (the hot path's and the refusals').
pub fn fixed(status: StatusCode, body: &'static [u8]) -> Answer {
    crate::server::json(status, body)
}

/// An answer whose body was written already (a cached one).
pub fn written(status: StatusCode, body: impl crate::server::JsonBody) -> Answer {
    crate::server::json(status, body)
}

/// An answer whose body is `body` written as JSON (a 500 if it cannot be):
/// every body built at run time goes through here.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Answer {
    match serde_json::to_vec(body) {
        Ok(body) => written(status, body),
        Err(_) => fixed(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"{\"status\":\"error\",\"reason\":\"the answer could not be written\"}\n",
        ),
    }
}

/// A 200 with `body` (a contract type, see [`crate::protocol`]) as JSON.
pub fn json_of(body: &impl serde::Serialize) -> Answer {
    json(StatusCode::OK, body)
}

/// A 200 whose body is bytes, not JSON (`GET /holders`).
pub fn bytes(body: Vec<u8>) -> Answer {
    // Not through `written`: a JSON body gets a newline, bytes must not.
    let mut res = Response::new(Full::new(Bytes::from(body)));
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    res
}

/// The 405 naming the methods the route takes.
pub fn not_allowed(allow: &'static str) -> Answer {
    let mut res = fixed(
        StatusCode::METHOD_NOT_ALLOWED,
        b"{\"status\":\"method_not_allowed\",\"reason\":\"the Allow header lists the methods this route takes\"}\n",
    );
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}

/// The 401 of a request `[auth]` refuses: the challenge RFC 6750 asks for
/// (`error="invalid_token"` when a token or signature was sent and did not
/// verify), and the reason in JSON.
pub fn unauthorized(e: &crate::auth::AuthError) -> Answer {
    #[derive(serde::Serialize)]
    struct Refused<'a> {
        status: &'a str,
        reason: &'a str,
    }
    let mut res = json(
        StatusCode::UNAUTHORIZED,
        &Refused {
            status: e.label(),
            reason: &e.to_string(),
        },
    );
    let challenge = match e {
        crate::auth::AuthError::Missing => "Bearer realm=\"spike\"",
        _ => "Bearer realm=\"spike\", error=\"invalid_token\"",
    };
    res.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

/// Unix milliseconds as RFC 3339 (UTC, to the millisecond).
pub fn rfc3339(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Unix milliseconds that a body shows as RFC 3339 (see [`rfc3339`]).
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub u64);

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&rfc3339(self.0))
    }
}

/// An order's ticket numbers (`quantity` of them, up to the one its id
/// ends with), written as a JSON list.
pub struct Tickets(pub std::ops::RangeInclusive<u64>);

impl serde::Serialize for Tickets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}

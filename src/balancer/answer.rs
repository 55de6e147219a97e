//! The answers the balancer makes itself, instead of an upstream's: one
//! enum, each with its status, JSON body, extra header and metrics label,
//! so that both forwarding paths answer (and count) the same way. At the
//! bottom of the balancer's layers: it imports none of them.

use hyper::StatusCode;

/// An answer of the balancer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAnswer {
    /// The request (its body) could not be read: cut off, or stalled for
    /// `body_timeout`.
    BadRequest,
    /// Not exactly one valid `Host` (RFC 9112 3.2).
    BadHost,
    /// A malformed chunked body, or a chunk size past 2^63 - 1.
    BadChunk,
    /// CONNECT or TRACE, which are not proxied (as in Nginx).
    MethodNotAllowed,
    /// A body over `max_body`, declared or streamed.
    PayloadTooLarge,
    /// Every upstream tried failed (refused, reset, or a malformed answer).
    BadGateway,
    /// No upstream is usable: each is out (its health check fails, or it is
    /// marked failed for `fail_timeout`), so nothing was tried. Unlike a
    /// 502 this is the service being down for a while, and it says when to
    /// come back.
    NoUpstream,
    /// The last upstream tried did not answer in time.
    GatewayTimeout,
    /// Every upstream is at its `max_conns` and the queue is full.
    QueueFull,
    /// Every upstream stayed at its `max_conns` for `queue_timeout`.
    QueueTimeout,
}

/// The values of `spike_balancer_local_responses_total`'s `code` label, in
/// the order of [`LocalAnswer::slot`].
pub const LOCAL_LABELS: [&str; 6] = ["400", "405", "413", "502", "503", "504"];

impl LocalAnswer {
    /// The status.
    pub const fn status(self) -> StatusCode {
        match self {
            LocalAnswer::BadRequest | LocalAnswer::BadHost | LocalAnswer::BadChunk => {
                StatusCode::BAD_REQUEST
            }
            LocalAnswer::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            LocalAnswer::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            LocalAnswer::BadGateway => StatusCode::BAD_GATEWAY,
            LocalAnswer::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            LocalAnswer::NoUpstream | LocalAnswer::QueueFull | LocalAnswer::QueueTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The status line's reason phrase.
    pub fn reason(self) -> &'static str {
        self.status().canonical_reason().unwrap_or("")
    }

    /// The JSON body.
    pub const fn body(self) -> &'static [u8] {
        match self {
            LocalAnswer::BadRequest => {
                b"{\"status\":\"bad_request\",\"reason\":\"the request could not be read\"}\n"
            }
            LocalAnswer::BadHost => {
                b"{\"status\":\"bad_request\",\"reason\":\"the request needs exactly one valid Host header\"}\n"
            }
            LocalAnswer::BadChunk => {
                b"{\"status\":\"bad_request\",\"reason\":\"the chunked request body is malformed or a chunk size is too large\"}\n"
            }
            LocalAnswer::MethodNotAllowed => {
                b"{\"status\":\"method_not_allowed\",\"reason\":\"CONNECT and TRACE are not proxied\"}\n"
            }
            LocalAnswer::PayloadTooLarge => {
                b"{\"status\":\"payload_too_large\",\"reason\":\"the request body is larger than max_body\"}\n"
            }
            LocalAnswer::BadGateway => {
                b"{\"status\":\"bad_gateway\",\"reason\":\"no upstream could answer\"}\n"
            }
            LocalAnswer::NoUpstream => {
                b"{\"status\":\"unavailable\",\"reason\":\"no upstream is available (each fails its health check or was marked failed); retry after a second\"}\n"
            }
            LocalAnswer::GatewayTimeout => {
                b"{\"status\":\"gateway_timeout\",\"reason\":\"the upstream did not answer in time\"}\n"
            }
            LocalAnswer::QueueFull => {
                b"{\"status\":\"busy\",\"reason\":\"every upstream is at its max_conns and the queue is full; retry after a second\"}\n"
            }
            LocalAnswer::QueueTimeout => {
                b"{\"status\":\"busy\",\"reason\":\"every upstream stayed at its max_conns for queue_timeout; retry after a second\"}\n"
            }
        }
    }

    /// A header the answer carries besides `Content-Type` (name in lower
    /// case): what a 405 allows, when to retry a 503.
    pub const fn header(self) -> Option<(&'static str, &'static str)> {
        match self {
            LocalAnswer::MethodNotAllowed => {
                Some(("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"))
            }
            LocalAnswer::NoUpstream | LocalAnswer::QueueFull | LocalAnswer::QueueTimeout => {
                Some(("retry-after", "1"))
            }
            _ => None,
        }
    }

    /// Where the answer is counted in `spike_balancer_local_responses_total`
    /// (an index into [`LOCAL_LABELS`], its status code); `None` for the
    /// admission 503s, which `spike_balancer_queue_total` counts.
    pub const fn slot(self) -> Option<usize> {
        match self {
            LocalAnswer::BadRequest | LocalAnswer::BadHost | LocalAnswer::BadChunk => Some(0),
            LocalAnswer::MethodNotAllowed => Some(1),
            LocalAnswer::PayloadTooLarge => Some(2),
            LocalAnswer::BadGateway => Some(3),
            LocalAnswer::NoUpstream => Some(4),
            LocalAnswer::GatewayTimeout => Some(5),
            LocalAnswer::QueueFull | LocalAnswer::QueueTimeout => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [LocalAnswer; 10] = [
        LocalAnswer::BadRequest,
        LocalAnswer::BadHost,
        LocalAnswer::BadChunk,
        LocalAnswer::MethodNotAllowed,
        LocalAnswer::PayloadTooLarge,
        LocalAnswer::BadGateway,
        LocalAnswer::GatewayTimeout,
        LocalAnswer::NoUpstream,
        LocalAnswer::QueueFull,
        LocalAnswer::QueueTimeout,
    ];

    #[test]
    fn each_answer_is_counted_under_its_own_status() {
        for a in ALL {
            match a.slot() {
                Some(i) => assert_eq!(LOCAL_LABELS[i], a.status().as_str(), "{a:?}"),
                None => assert_eq!(a.status(), StatusCode::SERVICE_UNAVAILABLE, "{a:?}"),
            }
            let v: serde_json::Value = serde_json::from_slice(a.body()).expect("JSON");
            assert!(v["status"].is_string() && v["reason"].is_string(), "{a:?}");
            assert!(a.body().ends_with(b"\n"), "{a:?}");
        }
    }
}

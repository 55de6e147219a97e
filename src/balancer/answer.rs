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
    /// In front of a sale, a path that is not the nodes' public API (nor
    /// listed in `pass_paths`): the nodes' internal routes stay inside.
    NotFound,
    /// CONNECT or TRACE, which are not proxied (as in Nginx).
    MethodNotAllowed,
    /// A body over `max_body`, declared or streamed.
    PayloadTooLarge,
    /// A request line over `max_header_line` (Nginx's 414).
    UriTooLong,
    /// A header line over `max_header_line`, or a head over `max_head`
    /// (Nginx's "Request Header Or Cookie Too Large"; 431 is RFC 6585's
    /// status for it).
    HeaderTooLarge,
    /// A transfer coding other than one `chunked` (`gzip, chunked`): the
    /// balancer does not decode it, and forwarding it without its coding
    /// would hand the backend bytes it reads as something else (Nginx's
    /// 501 too).
    NotImplemented,
    /// Every upstream tried failed (refused, reset, or a malformed answer).
    BadGateway,
    /// No upstream is usable: each is out (its health check fails, or it is
    /// marked failed for `fail_timeout`), so nothing was tried. Unlike a
    /// 502 this is the service being down for a while, and it says when to
    /// come back.
    NoUpstream,
    /// The last upstream tried did not answer in time.
    GatewayTimeout,
    /// The balancer had no file descriptor left for an upstream connection
    /// (EMFILE/ENFILE, even after closing its idle ones): its own
    /// shortage, not the upstream's fault, so the upstream is not marked
    /// failed and the client is told to come back (Nginx answers 500
    /// there and does not mark the peer either).
    OutOfFiles,
    /// Every upstream is at its `max_conns` and the queue is full.
    QueueFull,
    /// Every upstream stayed at its `max_conns` for `queue_timeout`.
    QueueTimeout,
    /// The client is over `limit_rate` and its `limit_burst` (Nginx's
    /// `limit_req`); `retry_after`: whole seconds until a request of it
    /// would pass (at least 1, at most [`MAX_RETRY_AFTER`]).
    RateLimited { retry_after: u8 },
    /// The client has `limit_conns` requests in flight already (Nginx's
    /// `limit_conn`).
    ConnLimited,
}

/// The longest `Retry-After` of a [`LocalAnswer::RateLimited`], in
/// seconds: the slowest rate, 1r/m (drained at 16 thousandths of a request
/// a second, as Nginx truncates it), frees a request within 63 s.
pub const MAX_RETRY_AFTER: u8 = 64;

/// `Retry-After` values, so that an answer's header stays a `&'static str`.
const SECONDS: [&str; MAX_RETRY_AFTER as usize + 1] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32",
    "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46", "47", "48",
    "49", "50", "51", "52", "53", "54", "55", "56", "57", "58", "59", "60", "61", "62", "63", "64",
];

/// `Retry-After: S` as a static header, S between 1 and
/// [`MAX_RETRY_AFTER`] (a client told to come back later than that asks
/// again then, and is told again).
pub fn retry_after(seconds: u64) -> (&'static str, &'static str) {
    let s = seconds.clamp(1, u64::from(MAX_RETRY_AFTER)) as usize;
    ("retry-after", SECONDS[s])
}

/// The values of `spike_balancer_local_responses_total`'s `code` label, in
/// the order of [`LocalAnswer::slot`].
pub const LOCAL_LABELS: [&str; 11] = [
    "400", "404", "405", "413", "414", "429", "431", "501", "502", "503", "504",
];

impl LocalAnswer {
    /// The status.
    pub const fn status(self) -> StatusCode {
        match self {
            LocalAnswer::BadRequest | LocalAnswer::BadHost | LocalAnswer::BadChunk => {
                StatusCode::BAD_REQUEST
            }
            LocalAnswer::NotFound => StatusCode::NOT_FOUND,
            LocalAnswer::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            LocalAnswer::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            LocalAnswer::RateLimited { .. } | LocalAnswer::ConnLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            LocalAnswer::UriTooLong => StatusCode::URI_TOO_LONG,
            LocalAnswer::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            LocalAnswer::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            LocalAnswer::BadGateway => StatusCode::BAD_GATEWAY,
            LocalAnswer::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            LocalAnswer::NoUpstream
            | LocalAnswer::OutOfFiles
            | LocalAnswer::QueueFull
            | LocalAnswer::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
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
            LocalAnswer::NotFound => {
                b"{\"status\":\"not_found\",\"reason\":\"no such route: purchases are at /buy/ticket, orders at /orders/{id}\"}\n"
            }
            LocalAnswer::MethodNotAllowed => {
                b"{\"status\":\"method_not_allowed\",\"reason\":\"CONNECT and TRACE are not proxied\"}\n"
            }
            LocalAnswer::PayloadTooLarge => {
                b"{\"status\":\"payload_too_large\",\"reason\":\"the request body is larger than max_body\"}\n"
            }
            LocalAnswer::UriTooLong => {
                b"{\"status\":\"uri_too_long\",\"reason\":\"the request line is longer than max_header_line\"}\n"
            }
            LocalAnswer::HeaderTooLarge => {
                b"{\"status\":\"header_too_large\",\"reason\":\"a header line is longer than max_header_line, or the request head longer than max_head\"}\n"
            }
            LocalAnswer::NotImplemented => {
                b"{\"status\":\"not_implemented\",\"reason\":\"the only transfer coding accepted is one chunked: a body in another coding is not forwarded\"}\n"
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
            LocalAnswer::OutOfFiles => {
                b"{\"status\":\"unavailable\",\"reason\":\"the balancer has no connection to spare for this request; retry after a second\"}\n"
            }
            LocalAnswer::QueueFull => {
                b"{\"status\":\"busy\",\"reason\":\"every upstream is at its max_conns and the queue is full; retry after a second\"}\n"
            }
            LocalAnswer::QueueTimeout => {
                b"{\"status\":\"busy\",\"reason\":\"every upstream stayed at its max_conns for queue_timeout; retry after a second\"}\n"
            }
            LocalAnswer::RateLimited { .. } => {
                b"{\"status\":\"too_many_requests\",\"reason\":\"this client sent more requests than limit_rate and limit_burst allow; retry after Retry-After seconds\"}\n"
            }
            LocalAnswer::ConnLimited => {
                b"{\"status\":\"too_many_requests\",\"reason\":\"this client has limit_conns requests in flight already; retry when one has ended\"}\n"
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
            LocalAnswer::NoUpstream
            | LocalAnswer::OutOfFiles
            | LocalAnswer::QueueFull
            | LocalAnswer::QueueTimeout
            | LocalAnswer::ConnLimited => Some(("retry-after", "1")),
            LocalAnswer::RateLimited { retry_after } => {
                let s = if retry_after > MAX_RETRY_AFTER {
                    MAX_RETRY_AFTER
                } else if retry_after == 0 {
                    1
                } else {
                    retry_after
                };
                Some(("retry-after", SECONDS[s as usize]))
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
            LocalAnswer::NotFound => Some(1),
            LocalAnswer::MethodNotAllowed => Some(2),
            LocalAnswer::PayloadTooLarge => Some(3),
            LocalAnswer::UriTooLong => Some(4),
            LocalAnswer::RateLimited { .. } | LocalAnswer::ConnLimited => Some(5),
            LocalAnswer::HeaderTooLarge => Some(6),
            LocalAnswer::NotImplemented => Some(7),
            LocalAnswer::BadGateway => Some(8),
            LocalAnswer::NoUpstream | LocalAnswer::OutOfFiles => Some(9),
            LocalAnswer::GatewayTimeout => Some(10),
            LocalAnswer::QueueFull | LocalAnswer::QueueTimeout => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [LocalAnswer; 17] = [
        LocalAnswer::BadRequest,
        LocalAnswer::BadHost,
        LocalAnswer::BadChunk,
        LocalAnswer::NotFound,
        LocalAnswer::MethodNotAllowed,
        LocalAnswer::PayloadTooLarge,
        LocalAnswer::UriTooLong,
        LocalAnswer::HeaderTooLarge,
        LocalAnswer::NotImplemented,
        LocalAnswer::BadGateway,
        LocalAnswer::GatewayTimeout,
        LocalAnswer::NoUpstream,
        LocalAnswer::OutOfFiles,
        LocalAnswer::QueueFull,
        LocalAnswer::QueueTimeout,
        LocalAnswer::RateLimited { retry_after: 3 },
        LocalAnswer::ConnLimited,
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

    #[test]
    fn a_rate_limited_answer_says_when_to_come_back() {
        let after = |s| LocalAnswer::RateLimited { retry_after: s }.header();
        assert_eq!(after(3), Some(("retry-after", "3")));
        assert_eq!(after(0), Some(("retry-after", "1")));
        assert_eq!(after(200), Some(("retry-after", "64")));
        assert_eq!(
            LocalAnswer::ConnLimited.header(),
            Some(("retry-after", "1"))
        );
        for (i, s) in SECONDS.iter().enumerate() {
            assert_eq!(s.parse::<usize>().ok(), Some(i));
        }
    }
}

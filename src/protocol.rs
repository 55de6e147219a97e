//! The contract between the two roles: what a node serves and what a
//! balancer in front of it reads, in one module that imports neither.
//!
//! - the paths and header names both sides use ([`PURCHASE_PATH`],
//!   [`SOLD_OUT_HEADER`], ...);
//! - the buyer id and the `Idempotency-Key`, parsed one way with one
//!   character set ([`buyer_from`], [`key_token`]): the node refuses what
//!   the balancer would not answer for, and the other way round;
//! - the bodies of `GET /sold_out` ([`SoldOutView`]) and `GET /holders`
//!   ([`HoldersView`]) as `serde` structs: the node writes them and the
//!   balancer reads them with the same type, so a renamed field is a
//!   compile error on both sides, not an edge that silently stays off.
//!
//! (The sale's snapshot, `GET /sale`, is the store's `Snapshot`: the
//! balancer passes its bytes on without reading them.)

use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// The one path on which a request is a purchase.
pub const PURCHASE_PATH: &str = "/buy/ticket";

/// The prefix of a purchase in a named sale, `/events/{event}/buy`
/// (beside `/buy/ticket?event={event}`).
pub const EVENTS_PREFIX: &str = "/events/";

/// [`event_purchase`]'s paths as a regular expression, for the Nginx and
/// HAProxy files spike prints: they forward what the balancer forwards.
pub const EVENT_PURCHASE_PATTERN: &str = "^/events/[A-Za-z0-9._-]{1,64}/buy$";

/// The event of a purchase path `/events/{event}/buy`, or `None` when
/// `path` is not one: an event is 1 to 64 characters of letters, digits,
/// '-', '_' or '.' (as `[sale] event` is), so the path is exact.
pub fn event_purchase(path: &str) -> Option<&str> {
    let event = path.strip_prefix(EVENTS_PREFIX)?.strip_suffix("/buy")?;
    is_event(event).then_some(event)
}

/// Whether `e` is an event name as the file allows them.
pub fn is_event(e: &str) -> bool {
    !e.is_empty()
        && e.len() <= 64
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The `event` query parameter, the sale a request names (`Ok(None)`: it
/// names none, which means a fleet's only sale). Taken as it stands: a
/// name that is no event of the fleet is its 404. Given twice it is an
/// error ([`EventTwice`]), even with the same value: a proxy in front may
/// read the first and the node the last, and a purchase must not be in
/// one sale for one of them and in another for the other.
pub fn event_from(query: Option<&str>) -> Result<Option<&str>, EventTwice> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut named = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("event="));
    let first = named.next();
    match named.next() {
        Some(_) => Err(EventTwice),
        None => Ok(first),
    }
}

/// A query that names `event=` more than once: the request's 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`event` is given more than once in the query: name one sale")]
pub struct EventTwice;

/// The one sale a purchase names, as the balancer's edge and waiting room
/// read it: `/events/{event}/buy`'s or its `?event=` (`Ok(None)`: it
/// names none); [`AmbiguousSale`] when it names more than one (`event=`
/// twice, or a query that names another sale than the path), which
/// neither the edge nor the waiting room may pick for a node.
pub fn purchase_event<'a>(
    path: &'a str,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, AmbiguousSale> {
    let mut named = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("event="));
    let in_query = named.next();
    if named.next().is_some() {
        return Err(AmbiguousSale);
    }
    match (event_purchase(path), in_query) {
        (Some(p), Some(q)) if p != q => Err(AmbiguousSale),
        (Some(p), _) => Ok(Some(p)),
        (None, q) => Ok(q),
    }
}

/// A purchase that names more than one sale (see [`purchase_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the purchase names more than one sale (`event` twice, or another in the query than in the path): name one"
)]
pub struct AmbiguousSale;

/// A node's view of the sale from memory ([`SoldOutView`]); with
/// `?epoch=E&released=R`, a long poll (see [`sold_out_poll`]).
pub const SOLD_OUT_PATH: &str = "/sold_out";

/// The buyers at the limit once sold out ([`HoldersView`]).
pub const HOLDERS_PATH: &str = "/holders";

/// The sale's snapshot (the store's `Snapshot`, as JSON).
pub const SALE_PATH: &str = "/sale";

/// The prefix of the order routes (`GET /orders/{id}`, `POST
/// /orders/{id}/pay`, `POST /orders/{id}/cancel`), which buyers call.
pub const ORDERS_PREFIX: &str = "/orders/";

/// Several purchases in one request, from a balancer to a node (`POST`,
/// the body in [`batch`]'s frames): one message each way for what would
/// otherwise be one per buyer.
pub const PURCHASES_PATH: &str = "/purchases";

/// The routes a node serves for its balancer, its health checks and
/// Prometheus, never for buyers: on `[[node]] internal` only when that is
/// set, and never forwarded by a balancer in front of a sale (see
/// [`is_public_path`]).
pub const INTERNAL_PATHS: [&str; 7] = [
    HOLDERS_PATH,
    "/stats",
    "/metrics",
    SALE_PATH,
    SOLD_OUT_PATH,
    "/healthz",
    PURCHASES_PATH,
];

/// The body of a [`PURCHASES_PATH`] request and of its answer: items one
/// after another, each a 4-byte big-endian length and that many bytes,
/// an HTTP/1.1 request exactly as the balancer would send it alone, and
/// the node's HTTP/1.1 response to it, in the same order. Written and
/// read here only, so both ends agree.
pub mod batch {
    /// Purchases in one batch at most: a bound on the node's work for one
    /// request and on the wait of the last buyer in it.
    pub const MAX_ITEMS: usize = 64;

    /// Bytes in one batch's body at most (the node refuses more, 413).
    pub const MAX_BYTES: usize = 4 << 20;

    /// Bytes in one item at most: what hyper takes of a request alone
    /// (the node answers a bigger item 431).
    pub const MAX_ITEM_BYTES: usize = 96 * 1024;

    /// Bytes of a request a balancer puts in a batch at most (a bigger one
    /// goes alone), so that a full batch stays far below [`MAX_BYTES`].
    pub const BATCHED_REQUEST_BYTES: usize = 16 * 1024;

    /// Appends `item` as one frame.
    pub fn push(out: &mut Vec<u8>, item: &[u8]) {
        let len = u32::try_from(item.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&item[..len as usize]);
    }

    /// The frames in `body`, or None if it does not end at a frame's end
    /// or holds more than `most`.
    pub fn items(body: &[u8], most: usize) -> Option<Vec<&[u8]>> {
        let mut items = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            if items.len() == most {
                return None;
            }
            let (len, after) = rest.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            if after.len() < len {
                return None;
            }
            let (item, after) = after.split_at(len);
            items.push(item);
            rest = after;
        }
        Some(items)
    }
}

/// Whether `path` (a request's path, without its query, exactly as it
/// came) is one of [`INTERNAL_PATHS`]: what a node with an internal
/// listener serves there, and only there.
pub fn is_internal_path(path: &str) -> bool {
    INTERNAL_PATHS.contains(&path)
}

/// Whether `path` (a request's path, without its query, exactly as it
/// came: nothing decoded or normalised) is the nodes' public API, the one
/// part of them a balancer in front of a sale forwards: the purchase
/// ([`PURCHASE_PATH`]) and the order routes, `/orders/{id}`,
/// `/orders/{id}/pay` and `/orders/{id}/cancel`, with an id of
/// `[A-Za-z0-9_.:@-]` that is not `.` or `..`.
///
/// Exact, byte for byte, as the node routes: `/buy/ticket/../holders`,
/// `//holders` or `/%68olders` are not public, so no spelling of an
/// internal route passes, even through something behind the balancer that
/// would normalise it. A later public route is added here, and both the
/// balancer and `spike nginx-conf`/`haproxy-conf` follow.
pub fn is_public_path(path: &[u8]) -> bool {
    if path == PURCHASE_PATH.as_bytes() {
        return true;
    }
    let Some(rest) = path.strip_prefix(ORDERS_PREFIX.as_bytes()) else {
        return false;
    };
    let id = match rest.iter().position(|&b| b == b'/') {
        None => rest,
        Some(i) => match &rest[i..] {
            b"/pay" | b"/cancel" => &rest[..i],
            _ => return false,
        },
    };
    is_id(id, MAX_ORDER_ID_LEN) && id != b"." && id != b".."
}

/// The order routes of [`is_public_path`] as one anchored PCRE, for the
/// files `spike nginx-conf` and `spike haproxy-conf` print (both take
/// PCRE): Nginx and HAProxy forward what spike's balancer forwards. No
/// backslash, no quote and no space, so it reads the same quoted in
/// either file.
pub const ORDER_PATH_PATTERN: &str =
    "^/orders/(?![.][.]?(/|$))[A-Za-z0-9_.:@-]{1,128}(/pay|/cancel)?$";

/// Longest order id a balancer passes on (an order id is two numbers of at
/// most 20 digits and a dash, after `EVENT:` in a fleet of several sales;
/// the node says what is wrong with one).
pub const MAX_ORDER_ID_LEN: usize = 128;

/// On every `sold_out` answer of a node: how a balancer in front learns,
/// from the traffic it already carries, that it may ask for the holders and
/// answer the sold-out flood itself.
pub const SOLD_OUT_HEADER: HeaderName = HeaderName::from_static(SOLD_OUT_HEADER_NAME);

/// [`SOLD_OUT_HEADER`] as text (lower case), for a path that writes and
/// reads header lines as bytes.
pub const SOLD_OUT_HEADER_NAME: &str = "spike-sold-out";

/// Beside [`SOLD_OUT_HEADER`] on a node's `sold_out` answer when the
/// fleet sells several sales: the sale that sold out, so a balancer keeps
/// its edge for that sale only.
pub const SALE_EVENT_HEADER_NAME: &str = "spike-event";

/// [`SALE_EVENT_HEADER_NAME`] as a header name.
pub const SALE_EVENT_HEADER: HeaderName = HeaderName::from_static(SALE_EVENT_HEADER_NAME);

/// The purchase's idempotency key (IETF httpapi draft; lower case, as
/// hyper stores names).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Sent by a balancer with an `Idempotency-Key` it made itself (the
/// request came without one): such a key is unique and only the
/// balancer's retry sends it again, so a store may keep it with the order
/// alone (see `deduct.lua`). A client's copy is dropped by the balancer.
pub const MADE_KEY: HeaderName = HeaderName::from_static(MADE_KEY_NAME);

/// [`MADE_KEY`]'s name.
pub const MADE_KEY_NAME: &str = "spike-made-key";

/// The buyer's id when the query has no `user=`.
pub const USER_ID: HeaderName = HeaderName::from_static("x-user-id");

/// Longest buyer id.
pub const MAX_BUYER_LEN: usize = 64;

/// Longest `Idempotency-Key`, without the optional quotes.
pub const MAX_KEY_LEN: usize = 64;

/// The body of a `sold_out` answer (409, with [`SOLD_OUT_HEADER`]), from a
/// node or from the balancer's edge.
pub const SOLD_OUT_BODY: &[u8] = b"{\"status\":\"sold_out\"}\n";

/// Why a sale that exists sells nothing now: the moments of `[sale]
/// opens_at` and `closes_at`, and the operator's `spike stock pause` and
/// `close`. A state of the sale, so it is answered with what to do next
/// (come back at the opening; the sale is over), never as a 503 that
/// invites a retry every second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shut {
    /// Before the opening, at `opens_at_ms` (Unix ms).
    NotOpen {
        /// When the sale opens, Unix ms in the store's clock.
        opens_at_ms: u64,
    },
    /// Closed for good, at `closed_at_ms`.
    Closed {
        /// When it closed, Unix ms.
        closed_at_ms: u64,
    },
    /// Paused by the operator until `spike stock resume`.
    Paused,
}

impl Shut {
    /// The `status` of the answer: `not_open`, `closed` or `paused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Shut::NotOpen { .. } => "not_open",
            Shut::Closed { .. } => "closed",
            Shut::Paused => "paused",
        }
    }

    /// Reads the scripts' answer: the kind, and the moment it names.
    pub fn parse(kind: &str, at_ms: u64) -> Option<Shut> {
        Some(match kind {
            "not_open" => Shut::NotOpen { opens_at_ms: at_ms },
            "closed" => Shut::Closed {
                closed_at_ms: at_ms,
            },
            "paused" => Shut::Paused,
            _ => return None,
        })
    }
}

/// When a sale sells, as the store keeps it (and as a node and the
/// balancer last heard it): its opening and closing, and the operator's
/// pause and close. Part of every store answer, so a node's memory answers
/// follow the stored sale, not its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Moments {
    /// When the sale opens, Unix ms (0: open since `stock init`).
    #[serde(default)]
    pub opens_at_ms: u64,
    /// When it closes or closed, Unix ms (0: no closing).
    #[serde(default)]
    pub closes_at_ms: u64,
    /// Paused by the operator (`spike stock pause`).
    #[serde(default)]
    pub paused: bool,
    /// Closed by the operator (`spike stock close`): closed whatever a
    /// clock says, so a clock that steps back cannot open it again.
    #[serde(default)]
    pub closed: bool,
}

/// [`Moments`] as last heard, read by every purchase without a lock (a
/// node's view of its store, the balancer's edge's view of a node's).
#[derive(Debug, Default)]
pub struct MomentsCell {
    opens_at: std::sync::atomic::AtomicU64,
    closes_at: std::sync::atomic::AtomicU64,
    /// [`Self::PAUSED`], [`Self::CLOSED`], [`Self::KNOWN`].
    flags: std::sync::atomic::AtomicU8,
}

impl MomentsCell {
    const PAUSED: u8 = 1;
    const CLOSED: u8 = 2;
    /// Something was heard (until then the file's moments hold).
    const KNOWN: u8 = 4;

    /// The moments last set; `None` before any.
    pub fn get(&self) -> Option<Moments> {
        use std::sync::atomic::Ordering;
        let flags = self.flags.load(Ordering::Acquire);
        (flags & Self::KNOWN != 0).then(|| Moments {
            opens_at_ms: self.opens_at.load(Ordering::Relaxed),
            closes_at_ms: self.closes_at.load(Ordering::Relaxed),
            paused: flags & Self::PAUSED != 0,
            closed: flags & Self::CLOSED != 0,
        })
    }

    /// Keeps `m` (a reader between two fields may see old and new mixed
    /// for an instant; the store decides every sale, so a memory answer
    /// off by one read is no sale made or lost).
    pub fn set(&self, m: &Moments) {
        use std::sync::atomic::Ordering;
        if self.get() == Some(*m) {
            return;
        }
        self.opens_at.store(m.opens_at_ms, Ordering::Relaxed);
        self.closes_at.store(m.closes_at_ms, Ordering::Relaxed);
        let flags = Self::KNOWN
            | if m.paused { Self::PAUSED } else { 0 }
            | if m.closed { Self::CLOSED } else { 0 };
        self.flags.store(flags, Ordering::Release);
    }
}

impl Moments {
    /// Why the sale sells nothing at `now_ms` (Unix ms), if so: the one
    /// rule both stores and the memory answers of the node and the
    /// balancer follow. A closing comes first: a sale closed before its
    /// opening is closed, not "not open yet".
    pub fn shut_at(&self, now_ms: u64) -> Option<Shut> {
        if self.closed || (self.closes_at_ms > 0 && now_ms >= self.closes_at_ms) {
            Some(Shut::Closed {
                closed_at_ms: self.closes_at_ms,
            })
        } else if now_ms < self.opens_at_ms {
            Some(Shut::NotOpen {
                opens_at_ms: self.opens_at_ms,
            })
        } else if self.paused {
            Some(Shut::Paused)
        } else {
            None
        }
    }

    /// Whether any moment or flag is set (a sale without them sells from
    /// `stock init` on, and nobody needs the clock to answer for it).
    pub fn any(&self) -> bool {
        *self != Moments::default()
    }
}

impl std::fmt::Display for Shut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a purchase while the sale does not sell (409, from the
/// node, the store's word, or the balancer's edge, from memory): the body,
/// and `Retry-After` in seconds where coming back makes sense (the
/// opening; a pause), given the time now (Unix ms). One rule, so that
/// every door says it alike.
pub fn not_selling_answer(shut: Shut, now_ms: u64) -> (String, Option<u64>) {
    let at = rfc3339_ms;
    match shut {
        Shut::NotOpen { opens_at_ms } => {
            let when = at(opens_at_ms);
            (
                format!(
                    "{{\"status\":\"not_open\",\"reason\":\"the sale opens at {when}; come back then\",\"opens_at\":\"{when}\"}}\n"
                ),
                Some(
                    opens_at_ms
                        .saturating_sub(now_ms)
                        .div_ceil(1000)
                        .clamp(1, MAX_NOT_OPEN_RETRY_AFTER_S),
                ),
            )
        }
        Shut::Closed { closed_at_ms } => {
            let when = at(closed_at_ms);
            (
                format!(
                    "{{\"status\":\"closed\",\"reason\":\"the sale closed at {when}\",\"closed_at\":\"{when}\"}}\n"
                ),
                None,
            )
        }
        Shut::Paused => (
            "{\"status\":\"paused\",\"reason\":\"the sale is paused by its operator; it goes on when resumed\"}\n"
                .to_string(),
            Some(PAUSED_RETRY_AFTER_S),
        ),
    }
}

/// Unix ms in RFC 3339 (UTC, milliseconds), as answers give moments.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// The longest `Retry-After` before an opening: a client told to come back
/// later asks again then, and learns the time left (a clock that jumps
/// meanwhile, or a postponed opening, is caught up with).
pub const MAX_NOT_OPEN_RETRY_AFTER_S: u64 = 64;

/// `Retry-After` on a paused sale's answer: a pause is the operator's, of
/// unknown length; asking every few seconds finds the sale resumed soon
/// enough without a flood.
pub const PAUSED_RETRY_AFTER_S: u64 = 5;

/// The body of an `already_bought` answer (409) for a buyer at the limit,
/// with their last order.
pub fn already_bought_body(order: &str) -> String {
    let mut body = String::with_capacity(48 + order.len());
    body.push_str("{\"status\":\"already_bought\",\"order\":\"");
    body.push_str(order);
    body.push_str("\"}\n");
    body
}

/// Whether `b` may be in a buyer id or a key: `[A-Za-z0-9_.:@-]`, safe as
/// a Redis hash field and in JSON without escaping.
pub fn is_id_byte(b: u8) -> bool {
    ID_BYTE[b as usize]
}

/// [`is_id_byte`] as a table: every purchase checks its buyer and its key
/// byte by byte.
static ID_BYTE: [bool; 256] = crate::http1::alphanumeric_and(b"_.:@-");

/// Whether `id` is 1 to `max` bytes of [`is_id_byte`].
fn is_id(id: &[u8], max: usize) -> bool {
    (1..=max).contains(&id.len()) && id.iter().all(|&b| is_id_byte(b))
}

/// Why a buyer id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuyerError {
    /// No `user` parameter and no `X-User-Id`, but the sale needs one.
    #[error("a buyer id is required: ?user=ID or the X-User-Id header")]
    Missing,
    /// Empty, too long, or with characters outside `[A-Za-z0-9_.:@-]`.
    #[error("a buyer id is 1 to 64 characters of letters, digits, '_', '.', ':', '@' or '-'")]
    Malformed,
}

/// The buyer of a request: the `user` query parameter, else `X-User-Id`.
/// Returns `""` for an anonymous buyer when none is required.
pub fn buyer_of<B>(req: &hyper::Request<B>, required: bool) -> Result<&str, BuyerError> {
    buyer_in(req.uri(), req.headers(), required)
}

/// [`buyer_of`] from a request's parts (the balancer's edge reads it there).
pub fn buyer_in<'a>(
    uri: &'a hyper::Uri,
    headers: &'a hyper::HeaderMap,
    required: bool,
) -> Result<&'a str, BuyerError> {
    buyer_from(
        uri.query(),
        headers.get(USER_ID).map(HeaderValue::as_bytes),
        required,
    )
}

/// [`buyer_of`] from a request's query and `X-User-Id` value as they came:
/// the balancer's own HTTP/1 path reads the buyer the same way without
/// building hyper's types. A value that is not text is malformed (as
/// [`check_buyer`] would find it anyway).
pub fn buyer_from<'a>(
    query: Option<&'a str>,
    user_id: Option<&'a [u8]>,
    required: bool,
) -> Result<&'a str, BuyerError> {
    let from_query = query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("user=")));
    let raw = match from_query {
        Some(v) => Some(v),
        None => match user_id {
            Some(h) => Some(std::str::from_utf8(h).map_err(|_| BuyerError::Malformed)?),
            None => None,
        },
    };
    match raw {
        None if required => Err(BuyerError::Missing),
        None => Ok(""),
        Some(id) => check_buyer(id),
    }
}

/// Accepts only ids that are safe as a Redis hash field and in JSON without
/// escaping; percent-encoding is refused rather than decoded, so one buyer
/// has exactly one spelling.
pub fn check_buyer(id: &str) -> Result<&str, BuyerError> {
    if is_id(id.as_bytes(), MAX_BUYER_LEN) {
        Ok(id)
    } else {
        Err(BuyerError::Malformed)
    }
}

/// Why a purchase's `quantity` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a whole number from 1 to the sale's `max_per_purchase`, or
    /// given twice.
    #[error("quantity is a whole number from 1 to {0} (the sale's max_per_purchase)")]
    OutOfRange(u64),
}

/// How many tickets a purchase asks for: the `quantity` query parameter,
/// 1 when absent; 1 to `max` digits-only (no sign, no spaces), once. The
/// node and the balancer's edge read it this one way.
pub fn quantity_from(query: Option<&str>, max: u64) -> Result<u64, QuantityError> {
    let Some(q) = query else {
        return Ok(1);
    };
    let mut found = None;
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("quantity=") {
            if found.is_some() {
                return Err(QuantityError::OutOfRange(max));
            }
            found = Some(v);
        } else if pair == "quantity" {
            return Err(QuantityError::OutOfRange(max));
        }
    }
    let Some(v) = found else {
        return Ok(1);
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QuantityError::OutOfRange(max));
    }
    // At most 3 digits past leading zeros (`max_per_purchase` is at most
    // 100): `002` and `0002` are both 2, and no length overflows the parse.
    let v = v.trim_start_matches('0');
    if v.len() > 3 {
        return Err(QuantityError::OutOfRange(max));
    }
    match v.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(QuantityError::OutOfRange(max)),
    }
}

/// Why an `Idempotency-Key` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Sent more than once, or not 1 to 64 characters of `[A-Za-z0-9_.:@-]`
    /// (optionally in double quotes).
    #[error(
        "an Idempotency-Key is one header of 1 to 64 characters of letters, digits, '_', '.', ':', '@' or '-', optionally in double quotes"
    )]
    Malformed,
}

/// The key in one `Idempotency-Key` value as it came: 1 to 64 characters
/// from `[A-Za-z0-9_.:@-]`, optionally inside double quotes (the draft's
/// sf-string form; `"k"` and `k` are the same key). `None`: malformed.
pub fn key_token(value: &[u8]) -> Option<&[u8]> {
    let inner = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    is_id(inner, MAX_KEY_LEN).then_some(inner)
}

/// The request's `Idempotency-Key`, `""` when it has none (surrounding
/// spaces ignored).
pub fn key_in(headers: &hyper::HeaderMap) -> Result<&str, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(v) = values.next() else {
        return Ok("");
    };
    if values.next().is_some() {
        return Err(KeyError::Malformed);
    }
    // The spaces and tabs a header value may have around it; any other byte
    // outside the key's alphabet is refused by `key_token`.
    let v = v.as_bytes();
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    match key_token(&v[start..end]) {
        // The token is ASCII.
        Some(k) => std::str::from_utf8(k).map_err(|_| KeyError::Malformed),
        None => Err(KeyError::Malformed),
    }
}

/// `GET /sold_out`: whether the node answers `sold_out` from memory, for
/// which epoch, and how many tickets had come back when it last heard from
/// the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoldOutView {
    /// The node answers `sold_out` from memory (and heard from the store
    /// lately).
    pub sold_out: bool,
    /// The sale's epoch (a reset starts a new one).
    pub epoch: u64,
    /// Tickets that came back (cancels, expiries), ever, in this epoch.
    pub released: u64,
    /// The sale's moments as the node last heard them from its store
    /// (absent before its first answer, and from an older node), so that a
    /// balancer answers before the opening and after the closing by the
    /// stored sale, not by its own file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moments: Option<Moments>,
    /// The store's clock as the node measured it when it answered (Unix
    /// ms; absent from an older node), so that a balancer reads those
    /// moments in the store's clock, not in its own host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_now_ms: Option<u64>,
}

/// The long poll of `GET /sold_out`: answered once the node's view is no
/// longer `epoch` and `released` (or after the node's wait).
pub fn sold_out_poll(epoch: u64, released: u64) -> String {
    format!("{SOLD_OUT_PATH}?epoch={epoch}&released={released}")
}

/// The view a [`sold_out_poll`] asks about, from the request's query;
/// `None` for a plain `GET /sold_out`.
pub fn sold_out_poll_params(query: Option<&str>) -> Option<(u64, u64)> {
    let param = |name: &str| -> Option<u64> {
        query?
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    Some((param("epoch")?, param("released")?))
}

/// `GET /holders` (200, once the node answers `sold_out` from memory and
/// its holders are current): the buyers at the limit and their last
/// orders, compactly (a buyer is a keyed hash, an order its sequence in
/// the epoch), so that a balancer answers `already_bought` for them
/// without a node. Sent as [`HoldersView::encode`]'s bytes
/// (`application/octet-stream`, about 11 bytes a holder), not JSON: at
/// 100,000 holders JSON was megabytes to write, send and parse per reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldersView {
    /// The epoch the holders belong to (order ids are `epoch-seq`).
    pub epoch: u64,
    /// Tickets that had come back when the node last heard from the store.
    pub released: u64,
    /// The stored per-user limit (0: no buyer is ever at a limit).
    pub per_user_limit: u64,
    /// The keys of the buyers' hashes (SipHash-2-4 of the buyer id).
    pub seed: [u64; 2],
    /// `[buyer hash, order sequence]` of every buyer at the limit.
    pub buyers: Vec<[u64; 2]>,
    /// Buyer hashes two holders share: only a node answers for them.
    pub ask: Vec<u64>,
}

/// The first bytes of an encoded [`HoldersView`]: the format and its
/// version, so a balancer and a node of different versions refuse each
/// other's bytes instead of misreading them.
pub const HOLDERS_MAGIC: &[u8; 5] = b"SPKH1";

/// Why bytes are not an encoded [`HoldersView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HoldersDecodeError {
    /// Not this format, or another version of it.
    #[error("not a holders list of this version")]
    Magic,
    /// Cut short, or a number that does not fit.
    #[error("a holders list cut short or malformed")]
    Truncated,
    /// Bytes left after the last entry.
    #[error("bytes after the end of a holders list")]
    Trailing,
}

/// Reads encoded [`HoldersView`] numbers from the front of a slice.
struct ViewBytes<'a>(&'a [u8]);

impl ViewBytes<'_> {
    fn u64(&mut self) -> Result<u64, HoldersDecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<8>()
            .ok_or(HoldersDecodeError::Truncated)?;
        self.0 = rest;
        Ok(u64::from_le_bytes(*head))
    }

    /// LEB128: seven bits a byte, low first; at most ten bytes.
    fn varint(&mut self) -> Result<u64, HoldersDecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or(HoldersDecodeError::Truncated)?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(HoldersDecodeError::Truncated)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl HoldersView {
    /// The bytes of `GET /holders`: [`HOLDERS_MAGIC`], then little-endian
    /// u64s `epoch`, `released`, `per_user_limit`, the two seeds, the
    /// number of buyers and of ask hashes; then per buyer its hash (u64)
    /// and its order sequence (LEB128); then the ask hashes (u64 each).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 7 * 8 + self.buyers.len() * 12 + self.ask.len() * 8);
        out.extend_from_slice(HOLDERS_MAGIC);
        for n in [
            self.epoch,
            self.released,
            self.per_user_limit,
            self.seed[0],
            self.seed[1],
            self.buyers.len() as u64,
            self.ask.len() as u64,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for [hash, seq] in &self.buyers {
            out.extend_from_slice(&hash.to_le_bytes());
            put_varint(&mut out, *seq);
        }
        for hash in &self.ask {
            out.extend_from_slice(&hash.to_le_bytes());
        }
        out
    }

    /// The view [`HoldersView::encode`] wrote; any other bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<HoldersView, HoldersDecodeError> {
        let rest = bytes
            .strip_prefix(HOLDERS_MAGIC)
            .ok_or(HoldersDecodeError::Magic)?;
        let mut b = ViewBytes(rest);
        let (epoch, released, per_user_limit) = (b.u64()?, b.u64()?, b.u64()?);
        let seed = [b.u64()?, b.u64()?];
        let (buyers, ask) = (b.u64()?, b.u64()?);
        // Each buyer takes at least 9 bytes and each ask 8: a count the
        // bytes cannot hold is refused before anything is allocated.
        let room = b.0.len() as u64;
        if buyers
            .saturating_mul(9)
            .saturating_add(ask.saturating_mul(8))
            > room
        {
            return Err(HoldersDecodeError::Truncated);
        }
        let mut view = HoldersView {
            epoch,
            released,
            per_user_limit,
            seed,
            buyers: Vec::with_capacity(buyers as usize),
            ask: Vec::with_capacity(ask as usize),
        };
        for _ in 0..buyers {
            view.buyers.push([b.u64()?, b.varint()?]);
        }
        for _ in 0..ask {
            view.ask.push(b.u64()?);
        }
        if !b.0.is_empty() {
            return Err(HoldersDecodeError::Trailing);
        }
        Ok(view)
    }

    /// `buyer`'s last order when the view lists them at the limit (for a
    /// reader holding names, e.g. a test; the balancer keeps the hashes).
    pub fn order_of(&self, buyer: &str) -> Option<String> {
        let h = crate::node::store::HolderSeed(self.seed[0], self.seed[1]).hash(buyer);
        if self.ask.contains(&h) {
            return None;
        }
        self.buyers
            .iter()
            .find(|[b, _]| *b == h)
            .map(|[_, seq]| format!("{}-{seq}", self.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holders_view_comes_back_as_it_was_encoded_and_bad_bytes_are_refused() {
        let view = HoldersView {
            epoch: 1_796_605_317_350,
            released: 3,
            per_user_limit: 1,
            seed: [7, u64::MAX],
            buyers: vec![[u64::MAX, 0], [1, 127], [2, 128], [3, u64::MAX]],
            ask: vec![42, 0],
        };
        let bytes = view.encode();
        assert_eq!(HoldersView::decode(&bytes), Ok(view.clone()));
        let empty = HoldersView {
            buyers: vec![],
            ask: vec![],
            ..view
        };
        assert_eq!(HoldersView::decode(&empty.encode()), Ok(empty));
        for cut in 0..bytes.len() {
            assert!(HoldersView::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            HoldersView::decode(&longer),
            Err(HoldersDecodeError::Trailing)
        );
        assert_eq!(
            HoldersView::decode(b"{\"epoch\":1}"),
            Err(HoldersDecodeError::Magic)
        );
        // A count the bytes cannot hold allocates nothing.
        let mut huge = HOLDERS_MAGIC.to_vec();
        for n in [1, 0, 1, 0, 0, u64::MAX, 0] {
            huge.extend_from_slice(&u64::to_le_bytes(n));
        }
        assert_eq!(
            HoldersView::decode(&huge),
            Err(HoldersDecodeError::Truncated)
        );
    }

    fn req(uri: &str, header: Option<&str>) -> hyper::Request<()> {
        let mut b = hyper::Request::builder().uri(uri);
        if let Some(h) = header {
            b = b.header("X-User-Id", h);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn buyer_comes_from_query_then_header() {
        assert_eq!(
            buyer_of(&req("/buy/ticket?a=1&user=u7", None), true),
            Ok("u7")
        );
        assert_eq!(buyer_of(&req("/buy/ticket", Some("h9")), true), Ok("h9"));
        assert_eq!(
            buyer_of(&req("/buy/ticket?user=q", Some("h")), true),
            Ok("q")
        );
    }

    #[test]
    fn buyer_is_required_only_with_a_limit() {
        assert_eq!(
            buyer_of(&req("/buy/ticket", None), true),
            Err(BuyerError::Missing)
        );
        assert_eq!(buyer_of(&req("/buy/ticket", None), false), Ok(""));
    }

    #[test]
    fn bad_buyer_ids_are_refused() {
        let long = "x".repeat(MAX_BUYER_LEN + 1);
        for bad in ["", "a b", "a%20b", "ä", "a\"b", "a{b}", long.as_str()] {
            assert_eq!(check_buyer(bad), Err(BuyerError::Malformed), "{bad:?}");
        }
        assert_eq!(
            check_buyer(&"y".repeat(MAX_BUYER_LEN)).map(str::len),
            Ok(MAX_BUYER_LEN)
        );
        assert_eq!(
            buyer_of(&req("/buy/ticket?user=", None), true),
            Err(BuyerError::Malformed)
        );
    }

    #[test]
    fn keys_quoted_or_bare_are_one_key() {
        assert_eq!(key_token(b"k1"), Some(&b"k1"[..]));
        assert_eq!(key_token(b"\"k1\""), Some(&b"k1"[..]));
        for bad in [&b""[..], b"\"\"", b"a b", b"\"a", b"a/b"] {
            assert_eq!(key_token(bad), None, "{bad:?}");
        }
        let mut h = hyper::HeaderMap::new();
        assert_eq!(key_in(&h), Ok(""));
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"abc\""));
        assert_eq!(key_in(&h), Ok("abc"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("abc"));
        assert_eq!(key_in(&h), Err(KeyError::Malformed));
    }

    /// `key_in` on bytes is the rule it replaced (text of visible ASCII and
    /// tabs, trimmed, then the token), for values around every byte, and the
    /// table is the alphabet.
    #[test]
    fn key_in_is_the_text_rule() {
        fn text_rule(v: &HeaderValue) -> Result<&str, KeyError> {
            let v = v.to_str().map_err(|_| KeyError::Malformed)?.trim();
            key_token(v.as_bytes())
                .map(|k| std::str::from_utf8(k).expect("ascii"))
                .ok_or(KeyError::Malformed)
        }
        for b in 0..=255u8 {
            assert_eq!(
                is_id_byte(b),
                b.is_ascii_alphanumeric() || b"_.:@-".contains(&b),
                "{b}"
            );
            for shape in [
                vec![b],
                vec![b, b'k'],
                vec![b'k', b],
                vec![b, b'"', b'k', b'"', b],
                vec![b' ', b'k', b, b'k', b'\t'],
            ] {
                let Ok(v) = HeaderValue::from_bytes(&shape) else {
                    continue;
                };
                let mut h = hyper::HeaderMap::new();
                h.insert(IDEMPOTENCY_KEY, v.clone());
                assert_eq!(key_in(&h), text_rule(&v), "{shape:?}");
            }
        }
    }

    #[test]
    fn only_the_public_api_is_public() {
        for public in [
            "/buy/ticket",
            "/orders/17-3",
            "/orders/17-3/pay",
            "/orders/17-3/cancel",
            "/orders/bad.id",
        ] {
            assert!(is_public_path(public.as_bytes()), "{public}");
        }
        for closed in [
            "/",
            "",
            "*",
            "/holders",
            "/stats",
            "/metrics",
            "/sale",
            "/sold_out",
            "/healthz",
            "/buy/ticket/",
            "/buy/ticket/../holders",
            "//buy/ticket",
            "/BUY/ticket",
            "/buy/ticke%74",
            "/buy/ticket?x",
            "/orders/",
            "/orders",
            "/orders/1-1/",
            "/orders/1-1/pay/",
            "/orders/1-1/refund",
            "/orders/1-1/../../holders",
            "/orders/../holders",
            "/orders/..",
            "/orders/.",
            "/orders/%2E%2E",
            "/orders//pay",
            "http://a/buy/ticket",
        ] {
            assert!(!is_public_path(closed.as_bytes()), "{closed}");
        }
        // A purchase in a named sale: the path exact, the event as the
        // file allows them.
        assert_eq!(event_purchase("/events/IC-512.a_b/buy"), Some("IC-512.a_b"));
        for bad in [
            "/events//buy",
            "/events/a/b/buy",
            "/events/a/buy/",
            "/events/%41/buy",
            "/events/a",
        ] {
            assert_eq!(event_purchase(bad), None, "{bad}");
        }
        assert_eq!(event_from(Some("user=u&event=E1")), Ok(Some("E1")));
        assert_eq!(event_from(Some("user=u")), Ok(None));
        assert_eq!(event_from(None), Ok(None));
        assert_eq!(event_from(Some("event=a&user=u&event=b")), Err(EventTwice));
        assert_eq!(event_from(Some("event=a&event=a")), Err(EventTwice));
        assert_eq!(
            purchase_event("/events/a/buy", Some("user=u")),
            Ok(Some("a"))
        );
        assert_eq!(
            purchase_event("/buy/ticket", Some("event=b&user=u")),
            Ok(Some("b"))
        );
        assert_eq!(
            purchase_event("/events/a/buy", Some("event=a")),
            Ok(Some("a"))
        );
        assert_eq!(
            purchase_event("/events/a/buy", Some("event=b")),
            Err(AmbiguousSale)
        );
        assert_eq!(
            purchase_event("/buy/ticket", Some("event=b&event=b")),
            Err(AmbiguousSale)
        );
        assert_eq!(purchase_event("/buy/ticket", Some("user=u")), Ok(None));
        // An id of several sales' fleet: `EVENT:EPOCH-SEQ`, up to 128.
        assert!(is_public_path(
            format!("/orders/{}:1-1", "e".repeat(64)).as_bytes()
        ));
        assert!(!is_public_path(
            format!("/orders/{}", "9".repeat(MAX_ORDER_ID_LEN + 1)).as_bytes()
        ));
        for p in INTERNAL_PATHS {
            assert!(is_internal_path(p) && !is_public_path(p.as_bytes()), "{p}");
        }
        assert!(!is_internal_path("/holders/") && !is_internal_path("/buy/ticket"));
        // The pattern the generated nginx.conf and haproxy.cfg use.
        assert!(ORDER_PATH_PATTERN.contains(&format!("{{1,{MAX_ORDER_ID_LEN}}}")));
        assert!(ORDER_PATH_PATTERN.starts_with(&format!("^{ORDERS_PREFIX}")));
    }

    #[test]
    fn a_closing_comes_before_the_opening_and_a_pause() {
        let m = |opens, closes, paused, closed| Moments {
            opens_at_ms: opens,
            closes_at_ms: closes,
            paused,
            closed,
        };
        assert_eq!(m(0, 0, false, false).shut_at(5), None);
        assert_eq!(
            m(10, 0, true, false).shut_at(5),
            Some(Shut::NotOpen { opens_at_ms: 10 })
        );
        assert_eq!(m(10, 0, true, false).shut_at(10), Some(Shut::Paused));
        // Closed by hand before the opening: closed, not "not open".
        assert_eq!(
            m(10, 3, false, true).shut_at(5),
            Some(Shut::Closed { closed_at_ms: 3 })
        );
        // Closed by hand, and the clock stepped back before the moment.
        assert_eq!(
            m(0, 30, false, true).shut_at(20),
            Some(Shut::Closed { closed_at_ms: 30 })
        );
        assert_eq!(
            m(0, 30, true, false).shut_at(30),
            Some(Shut::Closed { closed_at_ms: 30 })
        );
        // Retry-After before an opening: at least 1 s, at most 64.
        assert_eq!(
            not_selling_answer(
                Shut::NotOpen {
                    opens_at_ms: 10_000
                },
                9_999
            )
            .1,
            Some(1)
        );
        assert_eq!(
            not_selling_answer(
                Shut::NotOpen {
                    opens_at_ms: 1_000_000
                },
                0
            )
            .1,
            Some(MAX_NOT_OPEN_RETRY_AFTER_S)
        );
        let (body, after) = not_selling_answer(Shut::Closed { closed_at_ms: 0 }, 5);
        assert!(after.is_none() && body.ends_with("}\n"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "closed");
        assert!(v["reason"].is_string());
    }

    /// A batch's frames read back as written; a body that stops inside a
    /// frame is no batch.
    #[test]
    fn batch_frames_read_back_and_a_cut_one_is_refused() {
        let mut body = Vec::new();
        batch::push(&mut body, b"GET /buy/ticket?user=a HTTP/1.1\r\n\r\n");
        batch::push(&mut body, b"");
        batch::push(&mut body, b"x");
        let items = batch::items(&body, 3).expect("frames");
        assert_eq!(batch::items(&body, 2), None);
        assert_eq!(
            items,
            [&b"GET /buy/ticket?user=a HTTP/1.1\r\n\r\n"[..], b"", b"x"]
        );
        assert_eq!(batch::items(&[], 1), Some(vec![]));
        assert_eq!(batch::items(&body[..body.len() - 1], 3), None);
        assert_eq!(batch::items(&body[..2], 3), None);
    }

    #[test]
    fn the_views_read_back_what_was_written() {
        let view = SoldOutView {
            sold_out: true,
            epoch: 3,
            released: 2,
            moments: Some(Moments {
                opens_at_ms: 10,
                closes_at_ms: 20,
                paused: true,
                closed: false,
            }),
            store_now_ms: Some(30),
        };
        let text = serde_json::to_string(&view).expect("json");
        assert_eq!(
            serde_json::from_str::<SoldOutView>(&text).expect("read"),
            view
        );
        assert_eq!(
            sold_out_poll_params(sold_out_poll(3, 2).split_once('?').map(|(_, q)| q)),
            Some((3, 2))
        );
        assert_eq!(sold_out_poll_params(None), None);
        // An older node's view, without moments, still reads.
        let old: SoldOutView =
            serde_json::from_str(r#"{"sold_out":false,"epoch":1,"released":0}"#).expect("read");
        assert_eq!(old.moments, None);

        let seed = crate::node::store::HolderSeed(5, 6);
        let holders = HoldersView {
            epoch: 3,
            released: 2,
            per_user_limit: 1,
            seed: [5, 6],
            buyers: vec![[seed.hash("b1"), 9]],
            ask: vec![seed.hash("b2")],
        };
        let back = HoldersView::decode(&holders.encode()).expect("read");
        assert_eq!(back.order_of("b1").as_deref(), Some("3-9"));
        assert_eq!(back.order_of("b2"), None);
        assert_eq!(back.order_of("b3"), None);
        assert_eq!(back, holders);
    }

    #[test]
    fn a_quantity_is_read_one_way() {
        let q = |query: &str| quantity_from(Some(query), 4);
        assert_eq!(quantity_from(None, 4), Ok(1));
        assert_eq!(q("user=a"), Ok(1));
        assert_eq!(q("quantity=3&user=a"), Ok(3));
        // Leading zeros, however many, are the same number.
        assert_eq!(q("quantity=002"), Ok(2));
        assert_eq!(q("quantity=0000000002"), Ok(2));
        for bad in [
            "quantity=0",
            "quantity=000",
            "quantity=5",
            "quantity=",
            "quantity",
            "quantity=-1",
            "quantity=1.5",
            "quantity=%31",
            "quantity=1&quantity=1",
            "quantity=99999999999999999999999",
        ] {
            assert_eq!(q(bad), Err(QuantityError::OutOfRange(4)), "{bad}");
        }
    }
}

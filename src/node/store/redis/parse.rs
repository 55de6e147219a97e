//! Redis's replies read into the store's types: the header every script
//! answer starts with (the sale's state), `deduct.lua`'s answers, integers
//! and strings; and fred's errors as [`StoreError`].

use fred::prelude::*;

use crate::node::store::model::{Reply, SaleState, StoreError};

/// One answer of the script, before it is read as a purchase's or a lease's.
pub(super) struct Raw {
    pub(super) code: u64,
    pub(super) order: String,
    pub(super) count: u64,
    /// The payment deadline (0: a final sale).
    pub(super) pay_by: u64,
    /// The order's state ('' when final).
    pub(super) state: String,
}

/// Fields of the sale's state that every script answer starts with.
const HEADER_FIELDS: usize = 11;
/// Fields per entry in `deduct.lua`'s answer.
const ANSWER_FIELDS: usize = 6;

/// The header every script answer starts with (the sale's state), and the
/// `rest` fields after it (`usize::MAX`: any number); `{4}` is
/// [`StoreError::NoSale`].
pub(super) fn header(
    reply: Value,
    rest: usize,
) -> Result<(SaleState, std::vec::IntoIter<Value>), StoreError> {
    let fields = match reply {
        Value::Array(a) => a,
        other => {
            return Err(StoreError::Protocol(format!(
                "a script returned {other:?}, not an array"
            )));
        }
    };
    if fields.len() == 1 {
        return match int(fields.into_iter().next())? {
            4 => Err(StoreError::NoSale),
            other => Err(StoreError::Protocol(format!(
                "a script returned code {other} for the call"
            ))),
        };
    }
    // `usize::MAX`: an answer of any length after the header.
    if rest != usize::MAX && fields.len() != HEADER_FIELDS + rest || fields.len() < HEADER_FIELDS {
        return Err(StoreError::Protocol(format!(
            "a script returned {} fields, not {}",
            fields.len(),
            HEADER_FIELDS.saturating_add(rest)
        )));
    }
    let mut fields = fields.into_iter();
    let _status = int(fields.next())?;
    let epoch = text(fields.next())?;
    let sale = SaleState {
        epoch: epoch
            .parse()
            .map_err(|_| StoreError::Protocol(format!("the sale's epoch is {epoch:?}")))?,
        limit: int(fields.next())?,
        sold: int(fields.next())?,
        total: int(fields.next())?,
        released: int(fields.next())?,
        pay_within_ms: int(fields.next())?,
        moments: crate::protocol::Moments {
            opens_at_ms: int(fields.next())?,
            closes_at_ms: int(fields.next())?,
            paused: int(fields.next())? == 1,
            closed: int(fields.next())? == 1,
        },
    };
    Ok((sale, fields))
}

/// The script's answer: the sale's state, then one answer per entry (see
/// `deduct.lua`).
pub(super) fn answers(reply: Value, entries: usize) -> Result<Vec<Reply<Raw>>, StoreError> {
    let (sale, mut fields) = header(reply, ANSWER_FIELDS * entries)?;
    let mut out = Vec::with_capacity(entries);
    for _ in 0..entries {
        let code = int(fields.next())?;
        let order = text(fields.next())?;
        let count = int(fields.next())?;
        let lease = int(fields.next())?;
        let pay_by = int(fields.next())?;
        let state = text(fields.next())?;
        out.push(Reply {
            answer: Raw {
                code,
                order,
                count,
                pay_by,
                state,
            },
            sale,
            lease,
        });
    }
    Ok(out)
}

/// fred's error as the store's.
pub(super) fn map_error(e: Error) -> StoreError {
    // Redis refuses a write (a script's first one, so nothing of the call
    // was done) while fewer replicas than `min-replicas-to-write` are in
    // reach.
    if e.details().contains("NOREPLICAS") {
        return StoreError::NoReplicas;
    }
    match e.kind() {
        ErrorKind::Timeout => StoreError::Timeout,
        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Backpressure => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Protocol(e.to_string()),
    }
}

/// `v` as an array of `len` values.
pub(super) fn array(v: Value, len: usize) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) if a.len() == len => Ok(a),
        other => Err(StoreError::Protocol(format!(
            "expected an array of {len}, got {other:?}"
        ))),
    }
}

/// A non-negative integer.
pub(super) fn int(v: Option<Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Integer(i)) if i >= 0 => Ok(i as u64),
        other => Err(StoreError::Protocol(format!(
            "expected a non-negative integer, got {other:?}"
        ))),
    }
}

/// A UTF-8 string.
pub(super) fn text(v: Option<Value>) -> Result<String, StoreError> {
    match v {
        Some(v @ (Value::String(_) | Value::Bytes(_))) => v
            .into_string()
            .ok_or_else(|| StoreError::Protocol("a string from Redis is not UTF-8".into())),
        other => Err(StoreError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

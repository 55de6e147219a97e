//! `stock audit` on Redis in one pass over each of the stream and the
//! buyers, page by page, both at once: the stream in `XRANGE` pages
//! counted here as they arrive (nothing kept), the buyers added up inside
//! Redis (`audit.lua`: only the sums cross the network). The stream is
//! counted up to the last id read with the counters (`show.lua audit`), so
//! it is conclusive even while the sale moves; when it moved, the next
//! attempt counts on from that id instead of starting over. The buyers, a
//! hash with no order in time, are conclusive only for a pass during which
//! the sale stood still.

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Resp3Frame};

use super::RedisStore;
use super::parse::{array, int, map_error, text};
use crate::node::store::model::StoreError;
use crate::node::store::snapshot::{Audit, BuyerTally, EventTally, Snapshot};

/// Stream entries one `XRANGE` page reads: about 1 ms of Redis's one
/// thread (measured on the 2-core machine of docs/benchmarks.md), so a
/// sale's buyers wait no longer than for a big batch.
const EVENTS_PAGE: u64 = 2000;
/// Parts of the stream read at once (see `count_events`).
const SLICES: u64 = 4;
/// Buyers one `audit.lua` call adds up (an `HSCAN` COUNT: a hint Redis
/// keeps near): ~2.5 ms of Redis's thread, ~1.2 us a buyer (an `HSCAN` page
/// read here instead would cost Redis ~1.0 us a buyer and send every name).
const BUYERS_PAGE: u64 = 2000;
/// Passes over the buyers before the audit settles for the constant-time
/// checks on a sale that never stood still.
const ATTEMPTS: usize = 5;
/// How long the passes over the buyers may go on, on a sale that does not
/// stand still for them (the stream is checked whatever happens).
const BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

/// A string frame's bytes.
fn frame_bytes(f: &Resp3Frame) -> Option<&[u8]> {
    match f {
        Resp3Frame::BlobString { data, .. } | Resp3Frame::SimpleString { data, .. } => Some(data),
        _ => None,
    }
}

/// The stream as read with a snapshot, in the same step.
struct Mark {
    snap: Snapshot,
    /// The id of the stream's last entry then (`0-0`: none).
    last: String,
    /// Entries this sale appended by then, trimmed ones included (None:
    /// Redis before 7, or a sale that did not record its base).
    added: Option<u64>,
    /// The id after which this sale's events begin.
    from: String,
}

/// The stream counted so far: from `next` on.
struct Counted {
    next: String,
    tally: EventTally,
}

impl Counted {
    fn add(&mut self, t: &EventTally) {
        self.tally.length += t.length;
        self.tally.created += t.created;
        self.tally.paid += t.paid;
        self.tally.released += t.released;
        self.tally.controls += t.controls;
        self.tally.created_tickets += t.created_tickets;
        self.tally.paid_tickets += t.paid_tickets;
        self.tally.released_tickets += t.released_tickets;
    }
}

/// The milliseconds of a stream id (`ms-seq`).
fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// The stream from `next` (where the count stopped; its first entry is in
/// millisecond `from_ms`) up to `last` (in `to_ms`), cut into [`SLICES`]
/// `XRANGE` ranges by time: slice i from ms `cut(i)` to ms `cut(i + 1) -
/// 1`, the first from `next`, the last to `last`. `None` for a span too
/// short to cut: a middle slice's end, an id of milliseconds alone, takes
/// every sequence number of its millisecond, and must end before `last`'s
/// (else entries after `last` were counted, and again by the next count).
fn slices(next: &str, from_ms: u64, to_ms: u64, last: &str) -> Option<[(String, String); 4]> {
    let span = to_ms.checked_sub(from_ms)? + 1;
    // width <= span / 4 + 1, so the third cut (3 widths) is before to_ms
    // once span > 12.
    if span < 4 * SLICES {
        return None;
    }
    let width = span.div_ceil(SLICES);
    let cut = |i: u64| from_ms + i * width;
    let range = |i: u64| {
        let start = if i == 0 {
            next.to_string()
        } else {
            cut(i).to_string()
        };
        let end = if i + 1 == SLICES {
            last.to_string()
        } else {
            (cut(i + 1) - 1).to_string()
        };
        (start, end)
    };
    Some([range(0), range(1), range(2), range(3)])
}

/// A pass over the buyers: the tally, and how many fields it read.
struct BuyerPass {
    tally: BuyerTally,
    fields: u64,
}

/// What must not change while the buyers are read, for their pass to be
/// compared with the counters.
fn still(a: &Mark, b: &Mark) -> bool {
    let key = |m: &Mark| {
        let s = &m.snap;
        (
            s.sold,
            s.tickets_held,
            s.seq,
            s.paid,
            s.released,
            s.buyers,
            s.controls,
        )
    };
    key(a) == key(b) && a.last == b.last
}

impl RedisStore {
    /// The snapshot and where the stream stands, in one step.
    async fn mark(&self) -> Result<Mark, StoreError> {
        let reply = self.eval(&self.show, vec!["audit".into()]).await?;
        let mut f = array(reply, 32)?.into_iter();
        let snap = self.parse_snapshot(&mut f)?;
        let last = text(f.next())?;
        let signed = |v: Option<Value>| match v {
            Some(Value::Integer(i)) if i >= 0 => Ok(Some(i as u64)),
            Some(Value::Integer(_)) => Ok(None),
            other => Err(StoreError::Protocol(format!(
                "show.lua audit: expected an integer, got {other:?}"
            ))),
        };
        let total_added = signed(f.next())?;
        let from = text(f.next())?;
        let base = signed(f.next())?;
        // As `init.lua` wrote it: a sale written before the stream
        // outlived resets has neither, and its stream began with it.
        let (from, base) = if from.is_empty() {
            ("0-0".to_string(), Some(0))
        } else {
            (from, base)
        };
        let added = match (total_added, base) {
            (Some(total), Some(base)) => Some(total.saturating_sub(base)),
            _ => None,
        };
        Ok(Mark {
            snap,
            last,
            added,
            from,
        })
    }

    /// Counts the stream from where `counted` stopped up to `last`
    /// (inclusive), in `XRANGE` pages read here rather than counted in Lua:
    /// Redis only writes the pages out (~0.5 us an entry, where Lua paid
    /// ~1.7 to see the fields), and nothing is kept but the counts. The
    /// range is cut into SLICES by time, read at once, so that Redis writes
    /// one page while this process counts another.
    async fn count_events(&self, counted: &mut Counted, last: &str) -> Result<(), StoreError> {
        let first = self.first_event(&counted.next, last).await?;
        let (Some(from_ms), Some(to_ms)) = (first.as_deref().and_then(id_ms), id_ms(last)) else {
            // Nothing to count (or ids not of Redis's form: one range).
            if first.is_some() {
                let t = self.count_range(counted.next.clone(), last).await?;
                counted.add(&t);
            }
            counted.next = format!("({last}");
            return Ok(());
        };
        let Some([(s0, e0), (s1, e1), (s2, e2), (s3, e3)]) =
            slices(&counted.next, from_ms, to_ms, last)
        else {
            let t = self.count_range(counted.next.clone(), last).await?;
            counted.add(&t);
            counted.next = format!("({last}");
            return Ok(());
        };
        let (a, b, c, d) = tokio::join!(
            self.count_range(s0, &e0),
            self.count_range(s1, &e1),
            self.count_range(s2, &e2),
            self.count_range(s3, &e3)
        );
        for t in [a?, b?, c?, d?] {
            counted.add(&t);
        }
        counted.next = format!("({last}");
        Ok(())
    }

    /// The id of the stream's first entry after `start` and up to `last`.
    async fn first_event(&self, start: &str, last: &str) -> Result<Option<String>, StoreError> {
        let xrange = CustomCommand::new_static("XRANGE", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.link.keys[7].clone().into(),
            start.into(),
            last.into(),
            "COUNT".into(),
            1.into(),
        ];
        let reply: Value = self
            .read()
            .patient()
            .custom(xrange, args)
            .await
            .map_err(|e| self.link.explain(map_error(e)))?;
        match reply {
            Value::Array(entries) => match entries.into_iter().next() {
                Some(entry) => Ok(Some(text(array(entry, 2)?.into_iter().next())?)),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// Counts the stream from `start` (an `XRANGE` start) to `last`, a
    /// page per call.
    async fn count_range(&self, start: String, last: &str) -> Result<EventTally, StoreError> {
        let mut next = start;
        let mut tally = EventTally::default();
        let client = self.read().patient();
        let xrange = CustomCommand::new_static("XRANGE", ClusterHash::FirstKey, false);
        loop {
            let args: Vec<Value> = vec![
                self.link.keys[7].clone().into(),
                next.as_str().into(),
                last.into(),
                "COUNT".into(),
                (EVENTS_PAGE as i64).into(),
            ];
            // The frame as it came, not fred's `Value`: a page of 2,000
            // entries is 34,000 strings, and only one of each entry's is
            // looked at.
            let reply = client
                .custom_raw(xrange.clone(), args)
                .await
                .map_err(|e| self.link.explain(map_error(e)))?;
            let entries = match reply {
                Resp3Frame::Array { data, .. } => data,
                Resp3Frame::Null => return Ok(tally),
                other => {
                    return Err(StoreError::Protocol(format!(
                        "XRANGE returned {other:?}, not an array"
                    )));
                }
            };
            let n = entries.len() as u64;
            let mut read_to = None;
            for entry in entries {
                let Resp3Frame::Array { data: entry, .. } = entry else {
                    return Err(StoreError::Protocol("a stream entry not an array".into()));
                };
                let mut e = entry.into_iter();
                read_to = e.next();
                let Some(Resp3Frame::Array { data: fields, .. }) = e.next() else {
                    return Err(StoreError::Protocol("a stream entry without fields".into()));
                };
                let field = |name: &[u8]| {
                    fields
                        .chunks(2)
                        .find(|f| frame_bytes(&f[0]) == Some(name))
                        .and_then(|f| f.get(1).and_then(frame_bytes))
                };
                let kind = field(b"type");
                // An order of several tickets says how many; one holds one.
                let tickets = || {
                    field(b"quantity")
                        .and_then(|q| std::str::from_utf8(q).ok())
                        .and_then(|q| q.parse::<u64>().ok())
                        .unwrap_or(1)
                };
                let t = &mut tally;
                match kind {
                    Some(b"sold" | b"reserved") => {
                        t.created += 1;
                        t.created_tickets += tickets();
                    }
                    Some(b"paid") => {
                        t.paid += 1;
                        t.paid_tickets += tickets();
                    }
                    Some(b"cancelled" | b"expired") => {
                        t.released += 1;
                        t.released_tickets += tickets();
                    }
                    Some(b"paused" | b"resumed" | b"closed" | b"added") => t.controls += 1,
                    _ => {}
                }
            }
            tally.length += n;
            if read_to.is_none() {
                return Ok(tally);
            }
            // Exclusive: the next page begins after this id.
            let id = read_to
                .as_ref()
                .and_then(frame_bytes)
                .and_then(|id| std::str::from_utf8(id).ok())
                .ok_or_else(|| StoreError::Protocol("a stream entry without an id".into()))?;
            next = format!("({id}");
            if n < EVENTS_PAGE {
                return Ok(tally);
            }
        }
    }

    /// One pass over the buyers, a page per call.
    async fn pass_buyers(&self) -> Result<BuyerPass, StoreError> {
        let mut pass = BuyerPass {
            tally: BuyerTally::default(),
            fields: 0,
        };
        let mut cursor = String::from("0");
        loop {
            let args: Vec<Value> = vec![
                "buyers".into(),
                cursor.as_str().into(),
                (BUYERS_PAGE as i64).into(),
            ];
            let reply = self.read_eval(args).await?;
            let mut f = array(reply, 4)?.into_iter();
            cursor = text(f.next())?;
            pass.fields += int(f.next())?;
            pass.tally.tickets_held += int(f.next())?;
            pass.tally.most_by_one_buyer = pass.tally.most_by_one_buyer.max(int(f.next())?);
            if cursor == "0" {
                return Ok(pass);
            }
        }
    }

    /// `audit.lua`, with a reader's patience (it only reads): its own
    /// timeout and retries, not the pool's, since it queues behind the
    /// stream's pages.
    async fn read_eval(&self, args: Vec<Value>) -> Result<Value, StoreError> {
        let limit = self.timeout.max(std::time::Duration::from_secs(5));
        let options = Options {
            timeout: Some(limit),
            max_attempts: Some(3),
            ..Options::default()
        };
        let client = self.link.pool.next();
        let patient = client.with_options(&options);
        let call = || {
            patient.evalsha::<Value, _, _, _>(
                self.audit.sha1().clone(),
                self.link.keys.clone(),
                args.clone(),
            )
        };
        let reply = match call().await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.audit.load(client).await.map_err(map_error)?;
                call().await
            }
            other => other,
        };
        reply.map_err(|e| self.link.explain(map_error(e)))
    }

    /// See [`Store::audit`](crate::node::store::Store::audit).
    pub async fn audit(&self) -> Result<Audit, StoreError> {
        let mut mark = self.mark().await?;
        let mut counted = Counted {
            next: format!("({}", mark.from),
            tally: EventTally::default(),
        };
        let mut buyers = None;
        let started = std::time::Instant::now();
        for _ in 0..ATTEMPTS {
            let pass_started = std::time::Instant::now();
            // The two passes at once: Redis runs one call at a time, but
            // neither waits for the other's round trips.
            let (events, pass) = tokio::join!(
                self.count_events(&mut counted, &mark.last),
                self.pass_buyers()
            );
            events?;
            let pass = pass?;
            let after = self.mark().await?;
            // A pass that read a field twice (Redis resized the hash) or
            // ran while the sale moved says nothing exact.
            if still(&mark, &after) && pass.fields == mark.snap.buyers {
                buyers = Some(pass.tally);
                break;
            }
            mark = after;
            // A sale that moved through a pass will likely move through
            // the next: one that would end past the budget is not begun.
            if started.elapsed() + pass_started.elapsed() > BUDGET {
                break;
            }
        }
        // The stream up to the last mark, however the passes went.
        self.count_events(&mut counted, &mark.last).await?;
        let events = EventTally {
            added: mark.added,
            ..counted.tally
        };
        Ok(Audit {
            snapshot: mark.snap,
            buyers,
            events: Some(events),
        })
    }

    /// The stream counted up to now (see [`RedisStore::audit`]).
    pub async fn tally_events(&self) -> Result<EventTally, StoreError> {
        let mark = self.mark().await?;
        let mut counted = Counted {
            next: format!("({}", mark.from),
            tally: EventTally::default(),
        };
        self.count_events(&mut counted, &mark.last).await?;
        Ok(EventTally {
            added: mark.added,
            ..counted.tally
        })
    }

    /// Every buyer's tickets added up, counted in Redis a page at a time
    /// (for `stock audit`).
    pub async fn tally_buyers(&self) -> Result<BuyerTally, StoreError> {
        Ok(self.pass_buyers().await?.tally)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slice ends before `last`'s millisecond but the last, which
    /// ends at `last`; the slices follow each other; short spans are one
    /// range (a reviewer saw spans of 1, 2, 3, 5, 6 and 9 ms count entries
    /// past `last` twice).
    #[test]
    fn slices_never_reach_past_last() {
        for from_ms in [1000u64, 1_700_000_000_000] {
            for span in 1..200u64 {
                let to_ms = from_ms + span - 1;
                let last = format!("{to_ms}-1");
                let Some(s) = slices("(999-0", from_ms, to_ms, &last) else {
                    assert!(span < 4 * SLICES, "span {span} not cut");
                    continue;
                };
                assert_eq!(s[0].0, "(999-0");
                assert_eq!(s[3].1, last);
                for i in 0..3 {
                    let end: u64 = s[i].1.parse().expect("ms");
                    assert!(
                        end < to_ms,
                        "span {span}: slice {i} ends at {end}, last in {to_ms}"
                    );
                    let next: u64 = s[i + 1].0.parse().expect("ms");
                    assert_eq!(
                        next,
                        end + 1,
                        "span {span}: a gap or overlap after slice {i}"
                    );
                }
            }
        }
    }
}

//! The store's bulk readers, for a node's holders once
//! sold out: hashes in `HSCAN` pages and the event stream in `XRANGE`
//! pages, on clients that retry (they only read), so that a big sale never
//! holds Redis's single thread.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::time::Instant;

use super::link::Link;
use super::parse::{array, map_error, text};
use super::replicas;
use crate::node::store::holders::{HolderSeed, Holders};
use crate::node::store::model::StoreError;

/// The sale's keys and pool, read with patience: what the readers need of
/// the store.
pub(super) struct Reader<'a> {
    pub(super) link: &'a Link,
    /// `[redis] timeout` (a reader waits at least 5 s).
    pub(super) timeout: Duration,
}

impl Reader<'_> {
    /// Where this sale's events begin in the stream, as `init.lua` wrote
    /// it: the last id before them, and how many events had been appended
    /// by then (None when a Redis before 7 did not say). A sale written
    /// before the stream outlived resets has neither: its stream began
    /// with it (`0-0`, 0).
    async fn events_start(&self) -> Result<(String, Option<u64>), StoreError> {
        let hmget = CustomCommand::new_static("HMGET", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.link.keys[0].clone().into(),
            "events_from".into(),
            "events_base".into(),
        ];
        let reply: Value = self.reader().custom(hmget, args).await.map_err(map_error)?;
        let mut f = match reply {
            Value::Array(f) => f.into_iter(),
            other => {
                return Err(StoreError::Protocol(format!(
                    "HMGET returned {other:?}, not an array"
                )));
            }
        };
        let from = f.next().and_then(|v| v.into_string());
        let base = f.next().and_then(|v| v.into_string());
        Ok(match (from, base) {
            (Some(from), Some(base)) => (from, base.parse().ok()),
            (Some(from), None) => (from, None),
            (None, _) => ("0-0".to_string(), Some(0)),
        })
    }

    /// The events of this sale in its stream, oldest first, in pages (for
    /// `stock audit`): each event's type and order id.
    pub(super) async fn events(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.reader();
        let xrange = CustomCommand::new_static("XRANGE", ClusterHash::FirstKey, false);
        let mut out = Vec::new();
        let (from, _) = self.events_start().await?;
        // Exclusive: the entry at `from` is the last of an older sale.
        let mut start = format!("({from}");
        loop {
            let args: Vec<Value> = vec![
                self.link.keys[7].clone().into(),
                start.as_str().into(),
                "+".into(),
                "COUNT".into(),
                SCAN_PAGE.into(),
            ];
            let reply: Value = client
                .custom(xrange.clone(), args)
                .await
                .map_err(|e| self.link.explain(map_error(e)))?;
            let Value::Array(entries) = reply else {
                return Ok(out);
            };
            let page = entries.len();
            let mut last = None;
            for entry in entries {
                let mut e = array(entry, 2)?.into_iter();
                let id = text(e.next())?;
                let Some(Value::Array(fields)) = e.next() else {
                    return Err(StoreError::Protocol("a stream entry without fields".into()));
                };
                let mut fields = fields.into_iter();
                let (mut kind, mut order) = (String::new(), String::new());
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match text(Some(name))?.as_str() {
                        "type" => kind = text(Some(value))?,
                        "order" => order = text(Some(value))?,
                        _ => {}
                    }
                }
                out.push((kind, order));
                last = Some(id);
            }
            match last {
                // Exclusive start: the next page begins after this id.
                Some(id) if page == SCAN_PAGE as usize => start = format!("({id}"),
                _ => return Ok(out),
            }
        }
    }

    fn reader(&self) -> fred::clients::WithOptions<Client> {
        let options = Options {
            timeout: Some(self.timeout.max(Duration::from_secs(5))),
            max_attempts: Some(3),
            ..Options::default()
        };
        self.link.pool.next().with_options(&options)
    }

    /// See [`Store::holders`](crate::node::store::Store::holders). Hashes read in
    /// `HSCAN` pages, not one script nor `HGETALL`: a bulk read of a field
    /// per buyer must not hold Redis's single thread (other sales on the
    /// same Redis would time out meanwhile). Each page goes into the
    /// compact form at once, so no copy of every holder as strings is ever
    /// built; `wanted` is asked between pages, and a read no longer wanted
    /// (the sale was reset) stops there: `Ok(None)`. Retried, unlike a
    /// deduction: it only reads.
    ///
    /// The read starts at the stream's last event (its cursor): what
    /// changes while it runs is taken in after it from the events since
    /// (`holders.lua`), so the holders it returns are current only once
    /// those are applied.
    ///
    /// With `[redis] replicas`, the holders are kept only once a barrier
    /// after the read is acknowledged: a node answers `already_bought` (or
    /// a replay) from them, and hands them to the balancer's edge, so they
    /// must hold nothing a failover can take back.
    pub(super) async fn holders(
        &self,
        epoch: u64,
        per_user_limit: u64,
        seed: HolderSeed,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Option<Holders>, StoreError> {
        let client = self.reader();
        let holders = self
            .read_holders(&client, epoch, per_user_limit, seed, wanted)
            .await
            .map_err(|e| self.link.explain(e))?;
        if holders.is_some() {
            self.acknowledged(&client).await?;
        }
        Ok(holders)
    }

    /// With `[redis] replicas`: waits until what was read is on the
    /// replicas (a barrier write and `WAIT`).
    pub(super) async fn acknowledged(
        &self,
        client: &fred::clients::WithOptions<Client>,
    ) -> Result<(), StoreError> {
        if self.link.replicas > 0 {
            let acked = replicas::barrier(self.link, client, Instant::now() + self.timeout).await;
            if acked < self.link.replicas {
                return Err(StoreError::NotReplicated {
                    wanted: self.link.replicas,
                    acked,
                    sold: false,
                });
            }
        }
        Ok(())
    }

    /// A client that retries, for reads.
    pub(super) fn patient(&self) -> fred::clients::WithOptions<Client> {
        self.reader()
    }

    /// The id of the stream's last event (`0-0` when it has none).
    async fn last_event<C: ClientLike>(&self, client: &C) -> Result<String, StoreError> {
        let xrevrange = CustomCommand::new_static("XREVRANGE", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.link.keys[7].clone().into(),
            "+".into(),
            "-".into(),
            "COUNT".into(),
            1.into(),
        ];
        let reply: Value = client.custom(xrevrange, args).await.map_err(map_error)?;
        match reply {
            Value::Array(entries) => match entries.into_iter().next() {
                Some(Value::Array(entry)) => text(entry.into_iter().next()),
                _ => Ok("0-0".to_string()),
            },
            _ => Ok("0-0".to_string()),
        }
    }

    async fn read_holders<C: ClientLike>(
        &self,
        client: &C,
        epoch: u64,
        per_user_limit: u64,
        seed: HolderSeed,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Option<Holders>, StoreError> {
        let mut holders = Holders::new(epoch, per_user_limit, seed);
        // Not current until the events since the cursor are applied.
        holders.released = u64::MAX;
        holders.cursor = self.last_event(client).await?;
        let mut pages = HashPages::of(&self.link.keys[5]);
        while let Some(page) = pages.next(client).await? {
            if !wanted() {
                return Ok(None);
            }
            for (key, _) in page {
                holders.put_key(&key);
            }
        }
        if per_user_limit == 0 {
            return Ok(Some(holders));
        }
        // buyer → last order, page by page; each page's counts in one
        // HMGET: only those at the limit are kept.
        let mut pages = HashPages::of(&self.link.keys[3]);
        while let Some(page) = pages.next(client).await? {
            if !wanted() {
                return Ok(None);
            }
            if page.is_empty() {
                continue;
            }
            let hmget = CustomCommand::new_static("HMGET", ClusterHash::FirstKey, false);
            let mut args: Vec<Value> = Vec::with_capacity(page.len() + 1);
            args.push(self.link.keys[1].clone().into());
            args.extend(page.iter().map(|(buyer, _)| Value::from(buyer.as_str())));
            let reply: Value = client.custom(hmget, args).await.map_err(map_error)?;
            let held = array(reply, page.len())?;
            for ((buyer, order), held) in page.iter().zip(held) {
                let held: u64 = match held {
                    Value::Null => 0,
                    v => text(Some(v))?.parse().unwrap_or(0),
                };
                if held >= per_user_limit {
                    holders.put_buyer(buyer, order);
                }
            }
        }
        Ok(Some(holders))
    }
}

/// Fields per `HSCAN` page: Redis's work per call stays small.
pub(super) const SCAN_PAGE: u32 = 1000;

/// A hash read one `HSCAN` page per call: [`HashPages::next`] until `None`.
/// (A field that `HSCAN` returns twice, as it may while Redis rehashes, is
/// in two pages.)
struct HashPages<'a> {
    key: &'a Key,
    cursor: Option<String>,
}

impl<'a> HashPages<'a> {
    fn of(key: &'a Key) -> HashPages<'a> {
        HashPages {
            key,
            cursor: Some(String::from("0")),
        }
    }

    /// The next page; `None` once the scan is done.
    async fn next<C: ClientLike>(
        &mut self,
        client: &C,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let Some(cursor) = self.cursor.take() else {
            return Ok(None);
        };
        let hscan = CustomCommand::new_static("HSCAN", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.key.clone().into(),
            cursor.as_str().into(),
            "COUNT".into(),
            SCAN_PAGE.into(),
        ];
        let reply: Value = client.custom(hscan, args).await.map_err(map_error)?;
        let mut parts = array(reply, 2)?.into_iter();
        let next = text(parts.next())?;
        let Some(Value::Array(pairs)) = parts.next() else {
            return Err(StoreError::Protocol("HSCAN page without fields".into()));
        };
        let mut fields = Vec::with_capacity(pairs.len() / 2);
        let mut pairs = pairs.into_iter();
        while let (Some(field), Some(value)) = (pairs.next(), pairs.next()) {
            fields.push((text(Some(field))?, text(Some(value))?));
        }
        if next != "0" {
            self.cursor = Some(next);
        }
        Ok(Some(fields))
    }
}

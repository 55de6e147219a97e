//! `spike orders tail`: the sale's event stream (every order reserved, paid,
//! cancelled or expired, every final sale with `[sale] stream = true`, and
//! every reset, appended by the same scripts that make the change) printed
//! as JSON lines, for a person watching or a pipe into an order or payment
//! service.
//!
//! It reads as a member of a Redis consumer group and acknowledges each
//! batch only after printing it, so a tail that stops (or is killed) and
//! starts again first prints what it had read but not acknowledged, then
//! goes on with new events. A consumer that dies for good leaves what it
//! had read pending; the others of its group take it over (`XAUTOCLAIM`)
//! once it has been pending for `--claim-after`. Nothing is lost as long as
//! the stream's length bound (`[sale] events_max`) has not trimmed it, and
//! an event may be printed twice (at least once, never lost).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::time::Instant;

use crate::config::Config;
use crate::node::store::SaleKeys;

/// Events read per call.
const BATCH: i64 = 100;

/// How long to wait before asking again when the stream had nothing new.
const IDLE: Duration = Duration::from_millis(200);

/// Why the tail stopped. Each says what happened in words: the URL
/// (without its password), the file it came from, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The file has no `[redis]`: the embedded store has no stream.
    #[error(
        "{0}: no [redis] section: the order stream lives in Redis (the embedded store of `spike up` has none; read orders at GET /orders/ID)"
    )]
    NoRedis(PathBuf),
    /// `[redis] url` is not one fred reads.
    #[error("{path}: [redis] url {url}: {cause}")]
    BadUrl {
        /// The file.
        path: PathBuf,
        /// The URL, password hidden.
        url: String,
        /// What is wrong with it.
        cause: String,
    },
    /// Redis could not be reached (or refused us) at start.
    #[error("cannot reach Redis at {url} ([redis] url in {path}): {cause}")]
    Connect {
        /// The file.
        path: PathBuf,
        /// The URL, password hidden.
        url: String,
        /// What went wrong, in words.
        cause: String,
    },
    /// The sale was never written: there is nothing to follow, and waiting
    /// would look like a quiet sale.
    #[error(
        "the sale {event} is not initialised in Redis at {url}: nothing to follow; run `spike stock init --config {}` first",
        path.display()
    )]
    NotInitialised {
        /// The file.
        path: PathBuf,
        /// The URL, password hidden.
        url: String,
        /// `[sale] event`.
        event: String,
    },
    /// The sale's purchases are final and it does not stream them: no
    /// event will ever come.
    #[error(
        "the sale {event} in Redis at {url} writes no order stream: its purchases are final (no pay_within) and it was initialised without [sale] stream = true; {}",
        if *file_streams {
            format!("{} says it now, but the stored sale is in force: `spike stock init --force` starts a new sale with it (the old one's orders are wiped)", path.display())
        } else {
            format!("set it in {} and run `spike stock init` (with --force once the sale has started)", path.display())
        }
    )]
    NoStream {
        /// The file.
        path: PathBuf,
        /// The URL, password hidden.
        url: String,
        /// `[sale] event`.
        event: String,
        /// The file already says `stream = true` (edited after `stock
        /// init`): the hint is then a new sale, not an edit.
        file_streams: bool,
    },
    /// Redis refused a command the tail cannot do without (a wrong key
    /// type, an ACL), at start.
    #[error("Redis at {url} refused {command}: {cause}")]
    Refused {
        /// The URL, password hidden.
        url: String,
        /// The command.
        command: &'static str,
        /// Redis's answer.
        cause: String,
    },
    /// Redis answered in a shape this version does not read.
    #[error("unexpected answer to {command} from Redis at {url}: {detail}")]
    Protocol {
        /// The URL, password hidden.
        url: String,
        /// The command.
        command: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// Standard output is gone (the reader of the pipe left).
    #[error("standard output: {0}")]
    Output(#[from] std::io::Error),
}

/// Entry point of `spike orders tail`. `claim_after` zero: never take over
/// another consumer's events.
pub fn main(
    config_path: &Path,
    event: Option<&str>,
    group: &str,
    consumer: &str,
    claim_after: Duration,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let sale = config.pick_sale(event)?.clone();
    let Some(redis) = config.redis.clone() else {
        return Err(TailError::NoRedis(config.path.clone()).into());
    };
    let path = config.path.clone();
    let url = crate::redis_client::redacted(&redis.url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // The store's own client config: the same URL forms and the same
        // TLS files (`[redis] tls_*`) as every other command.
        let parsed =
            crate::redis_client::fred_config(&redis.url, redis.tls.as_ref()).map_err(|e| {
                TailError::BadUrl {
                    path: path.clone(),
                    url: url.clone(),
                    cause: cause(&e),
                }
            })?;
        let timeout = redis.timeout.max(Duration::from_secs(1));
        let connect = |e: fred::error::Error| TailError::Connect {
            path: path.clone(),
            url: url.clone(),
            cause: cause(&e),
        };
        let client = Builder::from_config(parsed)
            .with_connection_config(|c| c.connection_timeout = timeout)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            // Redis restarting or failing over is a pause, not the end.
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()
            .map_err(connect)?;
        client.init().await.map_err(connect)?;
        let keys = SaleKeys::new(&sale.event);
        let tail = Tail {
            slot: fred::util::redis_keyslot(keys.events.as_bytes()),
            stock: keys.stock,
            stream: keys.events,
            group: group.to_string(),
            consumer: consumer.to_string(),
            claim_after,
            event: sale.event.clone(),
            file_streams: sale.stream,
            path,
            url,
            client,
        };
        tokio::select! {
            r = tail.run() => r?,
            () = crate::signals::shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

struct Tail {
    client: Client,
    slot: u16,
    stock: String,
    stream: String,
    group: String,
    consumer: String,
    claim_after: Duration,
    event: String,
    /// `[sale] stream` in the file (the stored one is what counts).
    file_streams: bool,
    path: PathBuf,
    url: String,
}

/// One stream entry: its id, and its fields (None when the entry was
/// trimmed from the stream while it was pending).
type Entry = (String, Option<Vec<(String, String)>>);

impl Tail {
    fn command(&self, name: &'static str) -> CustomCommand {
        CustomCommand::new_static(name, ClusterHash::Custom(self.slot), false)
    }

    fn refused(&self, command: &'static str, e: &fred::error::Error) -> TailError {
        TailError::Refused {
            url: self.url.clone(),
            command,
            cause: cause(e),
        }
    }

    fn protocol(&self, command: &'static str, detail: String) -> TailError {
        TailError::Protocol {
            url: self.url.clone(),
            command,
            detail,
        }
    }

    /// Refuses a sale that will never put an event in the stream: one
    /// never initialised, and one of final purchases without `[sale]
    /// stream` (as stored with the sale: what the nodes do, whatever the
    /// file says now).
    async fn check_sale(&self) -> Result<(), TailError> {
        let args: Vec<Value> = vec![
            self.stock.as_str().into(),
            "total".into(),
            "pay_within".into(),
            "stream".into(),
        ];
        let reply: Value = self
            .client
            .custom(self.command("HMGET"), args)
            .await
            .map_err(|e| self.refused("HMGET", &e))?;
        let Value::Array(fields) = reply else {
            return Err(self.protocol("HMGET", format!("a {:?}, not an array", reply.kind())));
        };
        let field = |i: usize| fields.get(i).and_then(|v| v.as_u64());
        if fields.first().is_none_or(|v| v.is_null()) {
            return Err(TailError::NotInitialised {
                path: self.path.clone(),
                url: self.url.clone(),
                event: self.event.clone(),
            });
        }
        if field(1).unwrap_or(0) == 0 && field(2).unwrap_or(0) != 1 {
            return Err(TailError::NoStream {
                path: self.path.clone(),
                url: self.url.clone(),
                event: self.event.clone(),
                file_streams: self.file_streams,
            });
        }
        Ok(())
    }

    /// Makes the group (and the stream, if no order exists yet) unless it
    /// exists. A new group starts at the stream's beginning: everything
    /// still in the stream is printed once.
    async fn create_group(&self) -> Result<(), TailError> {
        let args: Vec<Value> = vec![
            "CREATE".into(),
            self.stream.as_str().into(),
            self.group.as_str().into(),
            "0".into(),
            "MKSTREAM".into(),
        ];
        match self
            .client
            .custom::<Value, _>(self.command("XGROUP"), args)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.refused("XGROUP CREATE", &e)),
        }
    }

    async fn run(&self) -> Result<(), TailError> {
        self.check_sale().await?;
        self.create_group().await?;
        // "0" first: this consumer's events read but never acknowledged
        // (a previous run stopped between printing and acknowledging).
        let mut from = "0";
        // Claims are looked for now (another consumer may have died long
        // ago), then about twice per `claim_after`: an event pending that
        // long waits at most half as long again.
        let claim_every = (self.claim_after / 2).clamp(Duration::from_millis(100), IDLE * 25);
        let mut claiming = !self.claim_after.is_zero();
        let mut next_claim = Instant::now();
        let mut cursor = String::from("0-0");
        loop {
            if claiming && Instant::now() >= next_claim {
                match self.claim(&cursor).await {
                    Ok(reply) => {
                        let (next, entries) = self.claimed(reply)?;
                        // A cursor other than 0-0: more to look at now.
                        if next == "0-0" {
                            next_claim = Instant::now() + claim_every;
                        }
                        cursor = next;
                        if !entries.is_empty() {
                            self.hand_off(entries).await?;
                            continue;
                        }
                    }
                    Err(e) if e.details().contains("NOGROUP") => {
                        self.regroup().await?;
                        from = "0";
                        cursor = String::from("0-0");
                        continue;
                    }
                    Err(e) if e.details().to_ascii_lowercase().contains("unknown command") => {
                        eprintln!(
                            "spike: orders tail: Redis at {} has no XAUTOCLAIM (Redis 6.2 and later): events a dead consumer of group {} had read stay pending until it comes back",
                            self.url, self.group
                        );
                        claiming = false;
                    }
                    Err(e) => {
                        self.pause("claiming", &e).await;
                        continue;
                    }
                }
            }
            let args: Vec<Value> = vec![
                "GROUP".into(),
                self.group.as_str().into(),
                self.consumer.as_str().into(),
                "COUNT".into(),
                BATCH.into(),
                "STREAMS".into(),
                self.stream.as_str().into(),
                from.into(),
            ];
            let reply = match self
                .client
                .custom::<Value, _>(self.command("XREADGROUP"), args)
                .await
            {
                Ok(v) => v,
                Err(e) if e.details().contains("NOGROUP") => {
                    self.regroup().await?;
                    from = "0";
                    continue;
                }
                Err(e) => {
                    // Redis away (restarting, failing over): nothing was
                    // read, so nothing is lost; ask again.
                    self.pause("reading", &e).await;
                    continue;
                }
            };
            let entries = self.read_reply(reply)?;
            if entries.is_empty() {
                if from == "0" {
                    from = ">";
                } else {
                    tokio::time::sleep(IDLE).await;
                }
                continue;
            }
            self.hand_off(entries).await?;
        }
    }

    /// The stream or the group is gone: deleted by hand (a reset keeps
    /// them), or Redis came back without its data. A sale gone with them
    /// ends the tail as at start; otherwise the group is made again.
    async fn regroup(&self) -> Result<(), TailError> {
        self.check_sale().await?;
        eprintln!(
            "spike: orders tail: the stream or group {} is gone from Redis at {}; making it again",
            self.group, self.url
        );
        self.create_group().await
    }

    /// Says that Redis failed `what`, and waits a second before the next try.
    async fn pause(&self, what: &str, e: &fred::error::Error) {
        eprintln!(
            "spike: orders tail: {what} from Redis at {}: {}; retrying in 1s",
            self.url,
            cause(e)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Takes over up to a batch of the group's events pending longer than
    /// `claim_after`, from `cursor` on: `XAUTOCLAIM`'s answer.
    async fn claim(&self, cursor: &str) -> Result<Value, fred::error::Error> {
        let args: Vec<Value> = vec![
            self.stream.as_str().into(),
            self.group.as_str().into(),
            self.consumer.as_str().into(),
            (self.claim_after.as_millis() as i64).into(),
            cursor.into(),
            "COUNT".into(),
            BATCH.into(),
        ];
        self.client.custom(self.command("XAUTOCLAIM"), args).await
    }

    /// Reads an `XAUTOCLAIM` answer: the next cursor and the entries.
    fn claimed(&self, reply: Value) -> Result<(String, Vec<Entry>), TailError> {
        // {next cursor, entries, (Redis 7) ids trimmed while pending,
        // which XAUTOCLAIM has dropped from the pending list itself}.
        let Value::Array(parts) = reply else {
            return Ok(("0-0".into(), Vec::new()));
        };
        let mut parts = parts.into_iter();
        let next = parts
            .next()
            .and_then(|v| v.into_string())
            .unwrap_or_else(|| "0-0".into());
        let entries = match parts.next() {
            Some(Value::Array(list)) => {
                entry_list(list).map_err(|detail| self.protocol("XAUTOCLAIM", detail))?
            }
            _ => Vec::new(),
        };
        if let Some(Value::Array(gone)) = parts.next()
            && !gone.is_empty()
        {
            eprintln!(
                "spike: orders tail: {} pending event(s) were trimmed from the stream (events_max) before any consumer acknowledged them",
                gone.len()
            );
        }
        Ok((next, entries))
    }

    fn read_reply(&self, reply: Value) -> Result<Vec<Entry>, TailError> {
        entries(reply).map_err(|detail| self.protocol("XREADGROUP", detail))
    }

    /// Prints `entries` and then acknowledges them. After a `reset`, the
    /// sale is checked again: a new sale that writes no stream ends the
    /// tail as one found so at start would.
    async fn hand_off(&self, entries: Vec<Entry>) -> Result<(), TailError> {
        let mut out = std::io::stdout().lock();
        let mut ids: Vec<Value> = vec![self.stream.as_str().into(), self.group.as_str().into()];
        let mut reset = false;
        for (id, fields) in entries {
            let Some(fields) = fields else {
                // Acknowledged so that it stops coming back; its content
                // is gone.
                eprintln!(
                    "spike: orders tail: event {id} was trimmed from the stream (events_max) before it was printed"
                );
                ids.push(id.into());
                continue;
            };
            reset |= fields.iter().any(|(n, v)| n == "type" && v == "reset");
            writeln!(out, "{}", line(&id, fields))?;
            ids.push(id.into());
        }
        out.flush()?;
        drop(out);
        // Printed, so acknowledged; should the acknowledgement fail,
        // the events stay pending and print again after a restart or a
        // claim (at least once, never lost).
        let xack = CustomCommand::new_static("XACK", ClusterHash::FirstKey, false);
        while let Err(e) = self
            .client
            .custom::<Value, _>(xack.clone(), ids.clone())
            .await
        {
            self.pause("acknowledging", &e).await;
        }
        if reset {
            self.check_sale().await?;
        }
        Ok(())
    }
}

/// One event as a JSON object: its stream id, then its fields, numbers as
/// numbers and the voided orders of a reset as a list.
fn line(id: &str, fields: Vec<(String, String)>) -> serde_json::Value {
    let mut line = serde_json::Map::new();
    line.insert("id".into(), id.into());
    for (name, value) in fields {
        let v = match (name.as_str(), value.parse::<u64>()) {
            ("at" | "pay_by" | "epoch" | "old_epoch" | "voided" | "quantity", Ok(n)) => {
                serde_json::Value::from(n)
            }
            ("voided_orders", _) => value.split_whitespace().collect::<Vec<_>>().into(),
            _ => serde_json::Value::from(value),
        };
        line.insert(name, v);
    }
    serde_json::Value::Object(line)
}

/// The entries of an `XREADGROUP` answer (one stream).
fn entries(reply: Value) -> Result<Vec<Entry>, String> {
    let streams = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => return Err(format!("a {:?}, not an array", other.kind())),
    };
    let mut out = Vec::new();
    for stream in streams {
        let list = match stream {
            Value::Array(mut pair) if pair.len() == 2 => pair.pop().unwrap_or(Value::Null),
            other => other,
        };
        if let Value::Array(list) = list {
            out.extend(entry_list(list)?);
        }
    }
    Ok(out)
}

/// A list of stream entries, each `[id, [field, value, ...]]` (the fields
/// nil for an entry trimmed while pending).
fn entry_list(list: Vec<Value>) -> Result<Vec<Entry>, String> {
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        let Value::Array(mut e) = entry else {
            return Err("a stream entry is not an array".into());
        };
        if e.len() != 2 {
            return Err(format!("a stream entry of {} parts", e.len()));
        }
        let values = e.pop().unwrap_or(Value::Null);
        let id = e
            .pop()
            .and_then(|v| v.into_string())
            .ok_or_else(|| "a stream entry without an id".to_string())?;
        let fields = match values {
            Value::Array(values) => {
                let mut fields = Vec::with_capacity(values.len() / 2);
                let mut values = values.into_iter();
                while let (Some(n), Some(v)) = (values.next(), values.next()) {
                    fields.push((
                        n.into_string().unwrap_or_default(),
                        v.into_string().unwrap_or_default(),
                    ));
                }
                Some(fields)
            }
            _ => None,
        };
        out.push((id, fields));
    }
    Ok(out)
}

/// A fred error in words. fred keeps an I/O error as its `Debug` form
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection
/// refused" }`); the message inside is what a person reads.
fn cause(e: &fred::error::Error) -> String {
    let details = e.details();
    for marker in ["message: \"", "error: \""] {
        if let Some((_, rest)) = details.split_once(marker)
            && let Some((text, _)) = rest.split_once('"')
        {
            return text.to_string();
        }
    }
    match e.kind() {
        fred::error::ErrorKind::Timeout => "no answer in time".to_string(),
        fred::error::ErrorKind::Auth => format!("authentication failed: {details}"),
        _ if details.is_empty() => format!("{:?} error", e.kind()),
        _ => details.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_is_said_in_words() {
        let e = fred::error::Error::new(
            fred::error::ErrorKind::IO,
            "Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" }",
        );
        assert_eq!(cause(&e), "Connection refused");
        let e = fred::error::Error::new(fred::error::ErrorKind::Auth, "WRONGPASS invalid");
        assert_eq!(cause(&e), "authentication failed: WRONGPASS invalid");
    }

    #[test]
    fn an_event_prints_numbers_as_numbers_and_voided_orders_as_a_list() {
        let fields = [
            ("type", "reset"),
            ("epoch", "20"),
            ("old_epoch", "10"),
            ("at", "21"),
            ("voided", "2"),
            ("voided_orders", "10-2 10-3"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        let v = line("21-0", fields.to_vec());
        assert_eq!(
            v,
            serde_json::json!({"id": "21-0", "type": "reset", "epoch": 20, "old_epoch": 10,
                "at": 21, "voided": 2, "voided_orders": ["10-2", "10-3"]})
        );
    }
}

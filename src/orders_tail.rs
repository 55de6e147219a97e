//! `spike orders tail`: the sale's event stream (every order created, paid,
//! cancelled or expired, appended by the same scripts that make the change)
//! printed as JSON lines, for a person watching or a pipe into an order or
//! payment service.
//!
//! It reads as a member of a Redis consumer group and acknowledges each
//! batch only after printing it, so a tail that stops (or is killed) and
//! starts again first prints what it had read but not acknowledged, then
//! goes on with new events: nothing acknowledged is printed twice, and
//! nothing is lost as long as the stream's length bound (`[sale]
//! events_max`) has not trimmed it.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use crate::config::Config;
use crate::node::store::SaleKeys;

/// Events read per call.
const BATCH: i64 = 100;

/// How long to wait before asking again when the stream had nothing new.
const IDLE: Duration = Duration::from_millis(200);

/// Why the tail stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The file has no `[redis]`: the embedded store has no stream.
    #[error(
        "{0}: no [redis] section: the order stream lives in Redis (the embedded store of `spike up` has none; read orders at GET /orders/ID)"
    )]
    NoRedis(std::path::PathBuf),
    /// Redis refused or failed a command.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis answered in a shape this version does not read.
    #[error("unexpected answer from redis: {0}")]
    Protocol(String),
    /// Standard output is gone (the reader of the pipe left).
    #[error("standard output: {0}")]
    Output(#[from] std::io::Error),
}

/// Entry point of `spike orders tail`.
pub fn main(config_path: &Path, group: &str, consumer: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let sale = config.require_sale()?.clone();
    let Some(redis) = config.redis.clone() else {
        return Err(TailError::NoRedis(config.path.clone()).into());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let url = fred::types::config::Config::from_url(&redis.url).map_err(TailError::Redis)?;
        let timeout = redis.timeout.max(Duration::from_secs(1));
        let client = Builder::from_config(url)
            .with_connection_config(|c| c.connection_timeout = timeout)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            // Redis restarting or failing over is a pause, not the end.
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()?;
        client.init().await?;
        let keys = SaleKeys::new(&sale.event);
        let tail = Tail {
            slot: fred::util::redis_keyslot(keys.events.as_bytes()),
            stream: keys.events,
            group: group.to_string(),
            consumer: consumer.to_string(),
            client,
        };
        tokio::select! {
            r = tail.run() => r?,
            () = crate::server::shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

struct Tail {
    client: Client,
    slot: u16,
    stream: String,
    group: String,
    consumer: String,
}

impl Tail {
    fn command(&self, name: &'static str) -> CustomCommand {
        CustomCommand::new_static(name, ClusterHash::Custom(self.slot), false)
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
            Err(e) => Err(e.into()),
        }
    }

    async fn run(&self) -> Result<(), TailError> {
        self.create_group().await?;
        // "0" first: this consumer's events read but never acknowledged
        // (a previous run stopped between printing and acknowledging).
        let mut from = "0";
        loop {
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
                    // `stock init --force` wiped the stream with the sale.
                    self.create_group().await?;
                    from = "0";
                    continue;
                }
                Err(e) => {
                    // Redis away (restarting, failing over): nothing was
                    // read, so nothing is lost; ask again.
                    eprintln!("spike: orders tail: {e}; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let entries = entries(reply)?;
            if entries.is_empty() {
                if from == "0" {
                    from = ">";
                } else {
                    tokio::time::sleep(IDLE).await;
                }
                continue;
            }
            let mut out = std::io::stdout().lock();
            let mut ids: Vec<Value> = vec![self.stream.as_str().into(), self.group.as_str().into()];
            for (id, fields) in entries {
                let mut line = serde_json::Map::new();
                line.insert("id".into(), id.clone().into());
                for (name, value) in fields {
                    let v = match (name.as_str(), value.parse::<u64>()) {
                        ("at" | "pay_by", Ok(n)) => serde_json::Value::from(n),
                        _ => serde_json::Value::from(value),
                    };
                    line.insert(name, v);
                }
                writeln!(out, "{}", serde_json::Value::Object(line))?;
                ids.push(id.into());
            }
            out.flush()?;
            drop(out);
            // Printed, so acknowledged; should the acknowledgement fail,
            // the events stay pending and print again after a restart
            // (at least once, never lost).
            let xack = CustomCommand::new_static("XACK", ClusterHash::FirstKey, false);
            while let Err(e) = self
                .client
                .custom::<Value, _>(xack.clone(), ids.clone())
                .await
            {
                eprintln!("spike: orders tail: acknowledging: {e}; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

type Fields = Vec<(String, String)>;

/// The entries of an `XREADGROUP` answer (one stream): id and fields.
/// An entry deleted from the stream while pending has no fields.
fn entries(reply: Value) -> Result<Vec<(String, Fields)>, TailError> {
    let streams = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => return Err(TailError::Protocol(format!("{other:?}"))),
    };
    let mut out = Vec::new();
    for stream in streams {
        let list = match stream {
            Value::Array(mut pair) if pair.len() == 2 => pair.pop().unwrap_or(Value::Null),
            other => other,
        };
        let Value::Array(list) = list else {
            continue;
        };
        for entry in list {
            let Value::Array(mut e) = entry else {
                return Err(TailError::Protocol("a stream entry is not an array".into()));
            };
            if e.len() != 2 {
                return Err(TailError::Protocol(format!(
                    "a stream entry of {}",
                    e.len()
                )));
            }
            let values = e.pop().unwrap_or(Value::Null);
            let id = e
                .pop()
                .and_then(|v| v.into_string())
                .ok_or_else(|| TailError::Protocol("a stream entry without an id".into()))?;
            let mut fields = Vec::new();
            if let Value::Array(values) = values {
                let mut values = values.into_iter();
                while let (Some(n), Some(v)) = (values.next(), values.next()) {
                    fields.push((
                        n.into_string().unwrap_or_default(),
                        v.into_string().unwrap_or_default(),
                    ));
                }
            }
            out.push((id, fields));
        }
    }
    Ok(out)
}

//! The key a toml (or serde) error is about. toml's own message does not
//! always name it, and an error must name file, key and line like every other.

use std::ops::Range;

/// Finds the dotted key a toml error is about, from the text around its span,
/// because toml's own message does not always name it.
pub(super) fn key_from_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message();
    // "unknown field `foo`, expected ..." names the key itself.
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        return with_table(text, e.span(), &rest[..end]);
    }
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some(end) = rest.find('`')
    {
        return with_table(text, e.span(), &rest[..end]);
    }
    let Some(span) = e.span() else {
        return "(file)".into();
    };
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) => with_table(text, Some(span), k.trim()),
        None => line.trim().trim_matches(['[', ']']).to_string(),
    }
}

/// `key` prefixed with the table it stands under, unless it already is; an
/// array of tables (`[[node]]`) is named with its index (`node[2]`), as the
/// validation's own messages name it, so that the third of three look-alike
/// entries is the one an operator opens.
fn with_table(text: &str, span: Option<Range<usize>>, key: &str) -> String {
    let upto = span.map(|s| s.start.min(text.len())).unwrap_or(0);
    let before = &text[..upto];
    let Some(header) = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
    else {
        return key.to_string();
    };
    let name = header.trim_matches(['[', ']']).trim();
    if name.is_empty() || key.starts_with(name) {
        return key.to_string();
    }
    if header.starts_with("[[") {
        // This entry is the last of its name's headers before the span.
        let index = before
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("[[") && l.trim_matches(['[', ']']).trim() == name)
            .count()
            .saturating_sub(1);
        return format!("{name}[{index}].{key}");
    }
    format!("{name}.{key}")
}

/// The tables written as arrays (`[[name]]`), each a list of entries.
const ARRAYS_OF_TABLES: [&str; 2] = ["node", "balancer.upstream"];

/// The keys whose values are durations: strings with a unit.
const DURATION_KEYS: [&str; 18] = [
    "pay_within",
    "lease_ttl",
    "idle_after",
    "timeout",
    "max_clock_offset",
    "connect_timeout",
    "response_timeout",
    "keepalive_timeout",
    "read_timeout",
    "send_timeout",
    "body_timeout",
    "queue_timeout",
    "slow_start",
    "fail_timeout",
    "health_interval",
    "health_timeout",
    "header_read_timeout",
    "grace_period",
];

/// A hint for the mistakes toml's own message leaves a newcomer stuck on:
/// `[node]` written for `[[node]]` ("duplicate key"), and a duration
/// written as a bare number ("expected a string").
pub(super) fn hint(key: &str, message: &str) -> Option<String> {
    let table = key.split('[').next().unwrap_or(key);
    if table == "sale" && message.contains("duplicate key") {
        return Some(
            "a file has one [sale] table or a list of [[sale]] tables, not both: write every sale as [[sale]]".into(),
        );
    }
    if message.contains("duplicate key")
        && let Some(array) = ARRAYS_OF_TABLES.iter().find(|a| **a == table)
    {
        return Some(format!(
            "each entry is its own `[[{array}]]` table, with two brackets, not `[{array}]`"
        ));
    }
    let field = key.rsplit('.').next().unwrap_or(key);
    if DURATION_KEYS.contains(&field)
        && let Some(rest) = message.strip_prefix("invalid type: integer `")
        && let Some(end) = rest.find('`')
    {
        let n = &rest[..end];
        return Some(format!(
            "a duration is a string with a unit: `{field} = \"{n}s\"` (or \"500ms\", \"15m\", \"1h\")"
        ));
    }
    None
}

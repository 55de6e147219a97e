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

/// `key` prefixed with the table it stands under, unless it already is.
fn with_table(text: &str, span: Option<Range<usize>>, key: &str) -> String {
    let upto = span.map(|s| s.start.min(text.len())).unwrap_or(0);
    let table = text[..upto]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim().to_string());
    match table {
        Some(t) if !t.is_empty() && !key.starts_with(&t) => format!("{t}.{key}"),
        _ => key.to_string(),
    }
}

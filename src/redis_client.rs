//! How every part of spike names the Redis it reaches: the URL as logs
//! and error messages may print it, without its password.

/// `url` with its password (and a sentinel password in its query) shown
/// as `***`, for logs and error messages.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            // A lone user info is a password to Redis (`AUTH password`).
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("sentinelPassword") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redacted("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("rediss://spike:pa:ss@cache.example:6380"),
            "rediss://spike:***@cache.example:6380"
        );
        assert_eq!(
            redacted("redis://:secret@127.0.0.1"),
            "redis://:***@127.0.0.1"
        );
        assert_eq!(
            redacted("redis://secret@127.0.0.1"),
            "redis://***@127.0.0.1"
        );
        assert_eq!(
            redacted(
                "redis-sentinel://u:p@127.0.0.1:26379/0?sentinelServiceName=s&sentinelPassword=x&node=h:1"
            ),
            "redis-sentinel://u:***@127.0.0.1:26379/0?sentinelServiceName=s&sentinelPassword=***&node=h:1"
        );
    }
}

//! Any text given as config.toml is either a valid Config or a ConfigError
//! that names a line inside the file: never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spike::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            // Validated configs keep their promises.
            let events: std::collections::HashSet<_> =
                config.sales.iter().map(|s| &s.event).collect();
            assert_eq!(events.len(), config.sales.len(), "events are unique");
            for sale in &config.sales {
                assert!(sale.total >= 1);
                // A lease asks for at least one unit and lives at least a second.
                assert!(sale.lease >= 1);
                assert!(sale.lease_ttl >= std::time::Duration::from_secs(1));
                for n in &config.nodes {
                    assert!(n.weight >= 1);
                }
            }
            if let Some(r) = &config.redis {
                assert!(r.timeout >= std::time::Duration::from_millis(1));
            }
            if let Some(b) = &config.balancer {
                assert!(!b.upstreams.is_empty());
            }
        }
        Err(ConfigError::Invalid { line, .. }) => {
            assert!(
                line >= 1 && line <= text.lines().count().max(1) + 1,
                "line {line} outside the file"
            );
        }
        Err(ConfigError::Read { .. }) => unreachable!("parse reads no file"),
        Err(ConfigError::Lacks { .. }) => unreachable!("only a command asks for what a file lacks"),
    }
});

//! The one error type of config loading, so that every caller (the CLI, a
//! reload, the fuzzer) gets the file, the key and the line the same way.

use std::path::PathBuf;

/// Why a config file was refused: where (file, key, line) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read but a key is missing, unknown, or has a bad value.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`node[2].weight`).
        key: String,
        /// The 1-based line the key (or its table) stands on.
        line: usize,
        /// What is wrong, in words a user can act on.
        message: String,
    },
    /// The command asks for something the file does not have (a node named
    /// on the command line, a section the command needs): there is no line
    /// to point at, and blaming line 1 would send the reader to the wrong
    /// place.
    #[error("{path}: {message}")]
    Lacks {
        /// The file.
        path: PathBuf,
        /// What is missing, and what the file has instead.
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, for tests and for logs.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } | ConfigError::Lacks { .. } => None,
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
    /// The line the error is about.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } | ConfigError::Lacks { .. } => None,
            ConfigError::Invalid { line, .. } => Some(*line),
        }
    }
}

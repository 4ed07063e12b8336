//! Log set-up: `tracing` with a level from `RUST_LOG` (else `log.level`), as text for people or
//! JSON (one object a line) for log stores. Secrets never reach it: they are `Secret`s, whose
//! `Debug` redacts, and no code path formats one.

mod filter;
pub mod http;
pub mod metrics;

pub use filter::check_level;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stderr. Safe to call once per process.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for people at a terminal, not for files and log shippers.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

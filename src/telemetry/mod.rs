//! Log set-up: `tracing` with a level from `RUST_LOG` (else `log.level`), as text for people or
//! JSON (one object a line) for log stores, and the job's spans to an OTLP collector when
//! `telemetry.otlp_endpoint` is set ([`otlp`]). Secrets never reach it: they are `Secret`s, whose
//! `Debug` redacts, and no code path formats one.

mod filter;
pub mod http;
pub mod metrics;
pub mod otlp;

pub use filter::check_level;

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stderr; with `export`, the job and attempt spans
/// also go to the OTLP collector, whatever the log level. Safe to call once per process.
pub fn init(log: &LogConfig, export: Option<&otlp::Export>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(export) = export else {
        // Without export, one layer behind a global filter: the fastest form.
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
        return;
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let fmt = match log.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(export.layer())
        .try_init();
}

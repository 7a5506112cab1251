//! Log setup: `tracing` with `RUST_LOG`-style filters, JSON or pretty lines.
//! pingora's `log` records are bridged into the same output.

use tracing_subscriber::EnvFilter;

/// Quiet by default: our own info lines, pingora's warnings.
const DEFAULT_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn,pingora=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

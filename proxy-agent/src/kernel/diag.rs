//! The programs' diagnostics (proxy-ebpf's `diag`: aya-log records of rare
//! paths, such as the error of a helper that failed) into the agent's
//! `tracing` log, target `ebpf`. The level is fixed when the programs load
//! (`--bpf-log-level`): the verifier drops the lines of levels below it.

use std::str::FromStr;

use anyhow::{bail, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// The most detailed level the programs log at (`off`: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLevel(u8);

impl LogLevel {
    pub const OFF: Self = Self(0);
    pub const WARN: Self = Self(aya_log::Level::Warn as u8);
    /// Every level: what a load without the override gets, and what the
    /// verifier test loads.
    pub const ALL: Self = Self(u8::MAX);

    /// The names `--bpf-log-level` takes.
    pub const NAMES: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

    /// The value of aya-log's load-time global, `AYA_LOG_LEVEL`.
    pub fn value(self) -> u8 {
        self.0
    }
}

impl FromStr for LogLevel {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match Self::NAMES.iter().position(|n| *n == s) {
            // aya-log's levels: Error = 1 .. Trace = 5, in this order.
            Some(i) => Ok(Self(i as u8)),
            None => bail!("{s}: one of {}", Self::NAMES.join(", ")),
        }
    }
}

/// aya-log's records as `tracing` events.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ebpf", "{line}"),
            log::Level::Warn => tracing::warn!(target: "ebpf", "{line}"),
            log::Level::Info => tracing::info!(target: "ebpf", "{line}"),
            log::Level::Debug => tracing::debug!(target: "ebpf", "{line}"),
            log::Level::Trace => tracing::trace!(target: "ebpf", "{line}"),
        }
    }

    fn flush(&self) {}
}

/// The reading end of the programs' log, taken from a loaded object.
pub struct Logs(EbpfLogger<Box<dyn log::Log>>);

impl Logs {
    /// Records go to `logger`. None (logged) for an object without the
    /// log's ring buffer, or whose buffer was taken.
    fn take(ebpf: &mut Ebpf, logger: Box<dyn log::Log>) -> Option<Self> {
        match EbpfLogger::init_with_logger(ebpf, logger) {
            Ok(logger) => Some(Self(logger)),
            Err(e) => {
                warn!(error = %e, "the programs' log is not read");
                None
            }
        }
    }

    /// Hands each record on as it comes, until the runtime stops.
    pub fn forward(self) {
        tokio::spawn(async move {
            // SAFETY: the logger owns its ring buffer's descriptor, and
            // moves into the AsyncFd with it: it stays open while registered.
            let mut fd = match unsafe { AsyncFd::register(self.0) } {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "the programs' log is not read");
                    return;
                }
            };
            while let Ok(mut ready) = fd.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
    }

    /// Hands on the records there now.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl super::Dataplane {
    /// The programs' log, its records to `logger` (`ToTracing` for the
    /// agent's log). Takes the log's ring buffer: once per loaded object.
    pub fn logs(&mut self, logger: Box<dyn log::Log>) -> Option<Logs> {
        Logs::take(&mut self.ebpf, logger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_aya_logs_by_name() {
        assert_eq!("off".parse::<LogLevel>().unwrap(), LogLevel::OFF);
        assert_eq!("warn".parse::<LogLevel>().unwrap(), LogLevel::WARN);
        assert_eq!(
            "error".parse::<LogLevel>().unwrap().value(),
            aya_log::Level::Error as u8
        );
        assert_eq!(
            "trace".parse::<LogLevel>().unwrap().value(),
            aya_log::Level::Trace as u8
        );
        assert!("loud".parse::<LogLevel>().is_err());
    }
}

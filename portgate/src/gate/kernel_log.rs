//! The kernel programs' diagnostic lines (aya-log), read into a [`log::Log`] when the
//! daemon's `kernel_log` key asks for them. Off otherwise: nothing reads the ring, and the
//! programs write nothing to it ([`config_flags::KERNEL_LOG`] is clear).
//!
//! The ring is pinned with the other maps, so a restarted daemon that adopts the attached
//! programs (the previous daemon's) reads their lines, and those they wrote in between.

use std::{convert::Infallible, path::Path};

use aya_log::EbpfLogger;
use log::Log;
use portgate_common::{capacity, config_flags, map_names};
use tokio::io::{Interest, unix::AsyncFd};

use super::{Gate, GateError};
use crate::host::HostError;

/// The `log` target of every line (the kernel programs write it into each record).
pub const TARGET: &str = "portgate::kernel";

/// The reader of the kernel programs' lines. Keep it while the [`Gate`] that made it is
/// in use: a program that gate loads afterwards reaches the ring through this reader's
/// file descriptor.
pub struct KernelLog<L: Log> {
    logger: EbpfLogger<L>,
}

impl Gate {
    /// Starts the kernel programs' diagnostic lines: takes their ring (the pinned one), and
    /// tells the programs to write a line for each refusal. Once per [`Gate`];
    /// [`Gate::install`] turns the lines off again, so they are on only while someone
    /// reads them. The lines go to `logger` (the daemon's is [`log::logger`]), with
    /// [`TARGET`], when [`KernelLog::flush`] or [`KernelLog::forward`] reads them.
    pub fn kernel_log<L: Log>(&mut self, logger: L) -> Result<KernelLog<L>, GateError> {
        let name = map_names::KERNEL_LOG;
        let logger = EbpfLogger::init_with_logger(self.ebpf_mut(), logger).map_err(|err| {
            match err {
                aya_log::Error::MapError(err) => {
                    GateError::map("opening", name, capacity::KERNEL_LOG_BYTES, err)
                }
                // Taken already, or absent from the object: nothing else can fail here.
                aya_log::Error::MapNotFound
                | aya_log::Error::ProgramNotFound
                | aya_log::Error::ProgramError(_) => GateError::MissingMap { name },
            }
        })?;
        self.set_config_flag(config_flags::KERNEL_LOG)?;
        Ok(KernelLog { logger })
    }
}

impl<L: Log> KernelLog<L> {
    /// Hands the lines waiting in the ring to the logger, without blocking.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Hands lines to the logger as the programs write them; returns only when the ring
    /// can no longer be waited on. Needs a tokio runtime with I/O enabled.
    pub async fn forward(self) -> Result<Infallible, GateError> {
        let name = Path::new(map_names::KERNEL_LOG);
        // SAFETY: the logger owns the ring's map fd, which stays open and unchanged until
        // the `AsyncFd` (which owns the logger) is dropped.
        let mut ring = unsafe { AsyncFd::register_with_interest(self.logger, Interest::READABLE) }
            .map_err(|err| HostError::io("registering", name)(err.into()))?;
        loop {
            let mut guard = ring
                .readable_mut()
                .await
                .map_err(HostError::io("waiting for", name))?;
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}

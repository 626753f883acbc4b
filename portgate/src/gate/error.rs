//! Errors of the kernel gate.

use std::path::PathBuf;

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

use crate::host::HostError;

/// What went wrong driving the kernel gate.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The host lacks something the gate needs.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A network namespace could not be read or entered.
    #[error(transparent)]
    Netns(#[from] crate::host::netns::NetnsError),
    /// The kernel object could not be loaded (maps created, BTF read).
    #[error("loading the kernel object")]
    Load(#[source] Box<EbpfError>),
    /// Nothing is installed under the pin directory.
    #[error(
        "no portgate maps are pinned under {pin_dir}: the gate is not installed there; pass the --pin-dir it was installed with"
    )]
    NotInstalled {
        /// The directory looked in.
        pin_dir: PathBuf,
    },
    /// A pinned map was made by a build with another layout.
    #[error(
        "the map pinned at {path} has key/value/entries {found:?}, this build needs {expected:?}: \
         it was made by another portgate build; uninstall that one first"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// Key size, value size and capacity of the pinned map.
        found: (u32, u32, u32),
        /// What this build's object declares.
        expected: (u32, u32, u32),
    },
    /// The kernel object lacks a map (a build mismatch).
    #[error("the kernel object has no map {name}: rebuild portgate")]
    MissingMap {
        /// The map's name.
        name: &'static str,
    },
    /// The kernel object lacks a program (a build mismatch).
    #[error("the kernel object has no program {name}: rebuild portgate")]
    MissingProgram {
        /// The program's name.
        name: &'static str,
    },
    /// Loading or attaching a program failed.
    #[error("{op} program {name}")]
    Program {
        /// What was being done.
        op: &'static str,
        /// The program's name.
        name: &'static str,
        /// The cause (a verifier log for load failures).
        #[source]
        source: Box<ProgramError>,
    },
    /// A program's link cannot be pinned (the kernel attached it the legacy way).
    #[error("the link of program {name} cannot be pinned")]
    Link {
        /// The program's name.
        name: &'static str,
        /// The cause.
        #[source]
        source: Box<LinkError>,
    },
    /// Pinning a link failed.
    #[error("pinning link {path}")]
    Pin {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<PinError>,
    },
    /// A map operation failed.
    #[error("{op} in map {map}")]
    Map {
        /// What was being done.
        op: &'static str,
        /// The map's name.
        map: &'static str,
        /// The cause.
        #[source]
        source: Box<MapError>,
    },
    /// A map has no room for another entry.
    #[error("map {map} is full (capacity {capacity} entries): remove entries first")]
    MapFull {
        /// The map's name.
        map: &'static str,
        /// Its capacity.
        capacity: u32,
    },
    /// The port is not in the managed range.
    #[error("port {port} is outside the managed range {min}-{max}")]
    PortOutsideRange {
        /// The port given.
        port: u16,
        /// Lowest managed port.
        min: u16,
        /// Highest managed port.
        max: u16,
    },
    /// The managed range is not usable.
    #[error("invalid managed range {min}-{max}: need 1 <= min <= max <= 65535")]
    InvalidRange {
        /// Lowest port given.
        min: u16,
        /// Highest port given.
        max: u16,
    },
    /// An interface name is unknown in the calling thread's network namespace.
    #[error("no network interface named {name:?}")]
    NoSuchInterface {
        /// The name given.
        name: String,
    },
}

impl GateError {
    /// Wraps a map error, turning a full map into [`GateError::MapFull`].
    pub(crate) fn map(
        op: &'static str,
        map: &'static str,
        capacity: u32,
        source: MapError,
    ) -> Self {
        if let MapError::SyscallError(ref err) = source
            && matches!(
                err.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC)
            )
        {
            return Self::MapFull { map, capacity };
        }
        Self::Map {
            op,
            map,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(op: &'static str, name: &'static str, source: ProgramError) -> Self {
        Self::Program {
            op,
            name,
            source: Box::new(source),
        }
    }
}

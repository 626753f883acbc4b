//! The port manager of the specification.

pub mod error;
pub mod state;

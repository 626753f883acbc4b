//! What the fuzz targets share: the reference reading of a frame ([`frame`]) and the gate
//! the packet target judges frames with ([`harness`]).

pub mod frame;
pub mod harness;

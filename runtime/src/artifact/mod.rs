//! The `.kiln` artifact: its layout, a validating reader and (with `std`) the writer the compiler uses.

pub mod format;
#[cfg(feature = "std")]
mod open;
pub mod read;
#[cfg(feature = "std")]
pub mod write;

pub use format::*;
#[cfg(feature = "std")]
pub use open::Artifact;
pub use read::{parse, tensor_bytes, ArtifactError, Parsed};

//! The `.kiln` artifact: its layout, a validating reader and (with `std`) the writer the compiler uses.

pub mod embed;
pub mod format;
mod load;
#[cfg(feature = "std")]
mod open;
pub mod read;
#[cfg(feature = "std")]
pub mod write;

pub use format::*;
pub use load::read_into;
#[cfg(feature = "std")]
pub use open::{Artifact, Residency};
pub use read::{check_cpu_features, parse, tensor_bytes, ArtifactError, Parsed};

//! What the checkpoint targets ask of an import that succeeds: converting it may be refused
//! with an error, but what converts must write and open as an artifact.

use std::path::Path;

use kiln_runtime::quant::Format;

/// Imports `path`; a checkpoint it gives is converted and written to `out`, which must open.
pub fn import_compiles_and_opens(path: &Path, out: &Path) {
    let Ok(checkpoint) = kiln_compiler::import::import(path) else {
        return;
    };
    let Ok(converted) = kiln_compiler::emit::convert(&checkpoint, Format::F16) else {
        return;
    };
    kiln_compiler::emit::write_artifact(&converted, out).expect("write the artifact");
    kiln_runtime::artifact::Artifact::open(out).expect("an artifact the compiler wrote opens");
}

//! `kilnc fetch onnxruntime`: the `libonnxruntime` that `kiln --backend ort` loads, taken
//! from PyPI's pinned `onnxruntime` wheel for the target's CPU and checked against its sha256.

use std::path::PathBuf;

use anyhow::{bail, Result};
use kiln_models::{CardFile, PypiSource};

use crate::pipeline::{cache, pypi};

/// The pinned release (CPU provider; PyPI carries no GPU providers for aarch64).
pub const VERSION: &str = "1.32.0";

/// One wheel's library: the architecture (as Rust's `std::env::consts::ARCH`), pip's platform
/// tags for it, and the library's sha256.
struct Build {
    arch: &'static str,
    platforms: [&'static str; 2],
    sha256: &'static str,
}

const BUILDS: [Build; 2] = [
    Build {
        arch: "x86_64",
        platforms: ["manylinux_2_27_x86_64", "manylinux_2_28_x86_64"],
        sha256: "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
    },
    Build {
        arch: "aarch64",
        platforms: ["manylinux_2_27_aarch64", "manylinux_2_28_aarch64"],
        sha256: "49852228a93995158b2a813d4df487d47a1b76b0eaa894507ef49e91b6d7954a",
    },
];

/// Makes sure `$KILN_HOME/onnxruntime/<arch>-linux/libonnxruntime.so` is there (the path the
/// runtime looks in) and returns it; `arch` is `x86_64` or `aarch64`.
pub fn ensure(arch: &str) -> Result<PathBuf> {
    let Some(build) = BUILDS.iter().find(|b| b.arch == arch) else {
        let known: Vec<&str> = BUILDS.iter().map(|b| b.arch).collect();
        bail!(
            "no onnxruntime build from PyPI for {arch} (kiln fetches {}); install your board's \
             onnxruntime and pass --ort-lib or ORT_DYLIB_PATH to kiln",
            known.join(", ")
        );
    };
    let dir = cache::kiln_home()?
        .join("onnxruntime")
        .join(format!("{arch}-linux"));
    let dest = dir.join("libonnxruntime.so");
    if dest.is_file() && cache::sha256_file(&dest)? == build.sha256 {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".pip-download-")
        .tempdir_in(&dir)
        .map_err(|e| anyhow::anyhow!("creating a scratch directory in {}: {e}", dir.display()))?;
    let mut extra = vec!["--python-version", "3.12", "--implementation", "cp"];
    for platform in build.platforms {
        extra.extend(["--platform", platform]);
    }
    let source = PypiSource {
        package: "onnxruntime".into(),
        version: VERSION.into(),
    };
    let wheel = pypi::pip_download_for(&pypi::python_from_env(), &source, &extra, scratch.path())?;
    let member = CardFile {
        path: format!("onnxruntime/capi/libonnxruntime.so.{VERSION}"),
        sha256: Some(build.sha256.into()),
    };
    pypi::extract(&wheel, &member, "libonnxruntime.so", &dir)?;
    Ok(dest)
}

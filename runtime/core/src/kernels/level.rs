//! Kernel levels: the reference kernels and one table per x86-64 or aarch64 ISA level, chosen
//! by the CPU or forced with `KILN_KERNELS=<level>` (refused when the CPU lacks the level).

use alloc::string::String;

use crate::layout::Layout;

/// One set of kernels: the portable reference, or the versions compiled for an ISA level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// The portable reference kernels (every CPU).
    Generic,
    /// x86-64 AVX2 + FMA + F16C (Haswell, Zen 1–3).
    Avx2,
    /// AVX2 with AVX-VNNI's 256-bit `vpdpbusd` (Alder Lake and later, Zen 5).
    AvxVnni,
    /// AVX-512 F/BW/VL for the float kernels, AVX2 block products (Skylake-X).
    Avx512,
    /// AVX-512 with VNNI's 512-bit `vpdpbusd` (Ice Lake, Sapphire Rapids, Zen 4).
    Avx512Vnni,
    /// aarch64 NEON (every ARMv8-A core: Cortex-A72 in the Pi 4).
    Neon,
    /// NEON with `sdot` (ARMv8.2-A dotprod: Cortex-A76 in the Pi 5, A78AE in the Jetson Orin).
    Dotprod,
    /// dotprod with `smmla` (ARMv8.6-A i8mm: Cortex-X2, Neoverse V1, Graviton 3).
    I8mm,
}

/// Why a forced level cannot run here.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum LevelError {
    #[error("KILN_KERNELS={name}: unknown kernel level (one of {known})")]
    Unknown { name: String, known: String },
    #[error("KILN_KERNELS={level}: kernels for {arch}, this is a {here} CPU")]
    OtherArch {
        level: &'static str,
        arch: &'static str,
        here: &'static str,
    },
    #[error("KILN_KERNELS={level}: this CPU lacks the feature {feature} (without std: the build does not target it)")]
    MissingFeature {
        level: &'static str,
        feature: &'static str,
    },
    #[error("tensor {tensor}: its weights are packed {layout}, which the {level} kernels do not run (they run {runs}); compile the model for this target, or set KILN_KERNELS=generic")]
    Layout {
        tensor: String,
        layout: &'static str,
        level: &'static str,
        runs: String,
    },
}

/// The architecture this build runs on, by the names of `std::env::consts::ARCH`.
#[cfg(feature = "std")]
const HOST_ARCH: &str = std::env::consts::ARCH;
#[cfg(not(feature = "std"))]
const HOST_ARCH: &str = if cfg!(target_arch = "x86_64") {
    "x86_64"
} else if cfg!(target_arch = "aarch64") {
    "aarch64"
} else {
    "other"
};

impl Level {
    /// Every level, the x86-64 ones then the aarch64 ones, each list from the weakest.
    pub const ALL: [Level; 8] = [
        Level::Generic,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Avx512Vnni,
        Level::Neon,
        Level::Dotprod,
        Level::I8mm,
    ];

    /// The name `KILN_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Generic => "generic",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
            Level::Neon => "neon",
            Level::Dotprod => "dotprod",
            Level::I8mm => "i8mm",
        }
    }

    /// Parses a name as [`Level::name`] writes it.
    pub fn from_name(name: &str) -> Result<Level, LevelError> {
        Level::ALL
            .into_iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| LevelError::Unknown {
                name: name.into(),
                known: Level::ALL.map(Level::name).join(", "),
            })
    }

    /// The architecture the level's kernels are compiled for (`None`: portable).
    pub fn arch(self) -> Option<&'static str> {
        match self {
            Level::Generic => None,
            Level::Avx2 | Level::AvxVnni | Level::Avx512 | Level::Avx512Vnni => Some("x86_64"),
            Level::Neon | Level::Dotprod | Level::I8mm => Some("aarch64"),
        }
    }

    /// The CPU features the level's kernels use, by the names `cpu::has_feature` takes.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            Level::Generic => &[],
            Level::Avx2 => &["avx2", "fma", "f16c"],
            Level::AvxVnni => &["avx2", "fma", "f16c", "avxvnni"],
            Level::Avx512 => &["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"],
            Level::Avx512Vnni => &[
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vnni",
            ],
            Level::Neon => &["neon"],
            Level::Dotprod => &["neon", "dotprod"],
            Level::I8mm => &["neon", "dotprod", "i8mm"],
        }
    }

    /// The layouts this level's block products run natively; the reference runs every one.
    pub fn layouts(self) -> &'static [Layout] {
        match self {
            Level::Generic => &Layout::ALL,
            Level::Avx2 | Level::AvxVnni | Level::Avx512 | Level::Avx512Vnni => {
                &[Layout::Rows, Layout::X16]
            }
            Level::Neon | Level::Dotprod => &[Layout::Rows, Layout::X4],
            Level::I8mm => &[Layout::Rows, Layout::X4, Layout::X8],
        }
    }

    /// The layout this level's products run fastest, which `--target host` packs for.
    pub fn preferred_layout(self) -> Layout {
        match self {
            Level::Generic => Layout::Rows,
            Level::Avx2 | Level::AvxVnni | Level::Avx512 | Level::Avx512Vnni => Layout::X16,
            Level::Neon | Level::Dotprod => Layout::X4,
            Level::I8mm => Layout::X8,
        }
    }

    /// Whether the level runs a tensor `tensor` packed in `layout`, or why not.
    pub fn check_layout(self, tensor: &str, layout: Layout) -> Result<(), LevelError> {
        if self.layouts().contains(&layout) {
            return Ok(());
        }
        Err(LevelError::Layout {
            tensor: tensor.into(),
            layout: layout.name(),
            level: self.name(),
            runs: self
                .layouts()
                .iter()
                .map(|l| l.name())
                .collect::<alloc::vec::Vec<_>>()
                .join(", "),
        })
    }

    /// Whether this CPU (and this build) runs the level, or why not. Without `std` the CPU is
    /// the one the build targets: `-C target-feature=+dotprod` (or a `-C target-cpu`) makes
    /// firmware run the dotprod kernels, and NEON is every aarch64 build's baseline.
    pub fn check(self) -> Result<(), LevelError> {
        let Some(arch) = self.arch() else {
            return Ok(());
        };
        let here = HOST_ARCH;
        if arch != here {
            return Err(LevelError::OtherArch {
                level: self.name(),
                arch,
                here,
            });
        }
        match self.features().iter().find(|f| !crate::cpu::has_feature(f)) {
            Some(feature) => Err(LevelError::MissingFeature {
                level: self.name(),
                feature,
            }),
            None => Ok(()),
        }
    }

    /// The levels this CPU runs, weakest first (the generic one always first).
    pub fn available() -> alloc::vec::Vec<Level> {
        Level::ALL
            .into_iter()
            .filter(|l| l.check().is_ok())
            .collect()
    }

    /// The level this CPU runs best: the last of [`Level::available`].
    pub fn best() -> Level {
        Level::available().last().copied().unwrap_or(Level::Generic)
    }

    /// The level `KILN_KERNELS` forces, else [`Level::best`]; a forced level this CPU cannot
    /// run is an error (std only: without it there is no environment and only `generic`).
    pub fn from_env() -> Result<Level, LevelError> {
        #[cfg(feature = "std")]
        if let Some(name) = std::env::var("KILN_KERNELS").ok().filter(|v| !v.is_empty()) {
            let level = Level::from_name(&name)?;
            level.check()?;
            return Ok(level);
        }
        Ok(Level::best())
    }
}

impl core::fmt::Display for Level {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_levels() {
        for l in Level::ALL {
            assert_eq!(Level::from_name(l.name()), Ok(l));
        }
        let err = Level::from_name("avx9").unwrap_err().to_string();
        assert!(
            err.contains("avx9") && err.contains("avx512vnni, neon"),
            "{err}"
        );
    }

    #[test]
    fn levels_of_another_architecture_are_refused_by_name() {
        let other = if cfg!(target_arch = "x86_64") {
            Level::Dotprod
        } else {
            Level::Avx2
        };
        let err = other.check().unwrap_err().to_string();
        assert!(
            err.contains(other.name()) && err.contains("this is a"),
            "{err}"
        );
        assert_eq!(Level::available()[0], Level::Generic);
        assert!(Level::available().contains(&Level::best()));
    }

    /// Without `std` the build's target features choose the kernels, so firmware runs SIMD
    /// without detecting anything: NEON on every aarch64 build, and whatever level
    /// `KILN_TEST_NO_STD_LEVEL` says the build targets (`.ci/run` builds this test with
    /// `-C target-feature=+avx2,+fma,+f16c` and expects `avx2`).
    #[cfg(not(feature = "std"))]
    #[test]
    fn without_std_the_target_features_choose_the_kernels() {
        let want = match std::env::var("KILN_TEST_NO_STD_LEVEL") {
            Ok(name) => Level::from_name(&name).expect("a level name"),
            Err(_) if cfg!(target_arch = "aarch64") => Level::Neon,
            Err(_) => Level::Generic,
        };
        let best = crate::kernels::Kernels::best();
        eprintln!(
            "without std: {:?}, kernels {}",
            Level::available(),
            best.name
        );
        let rank = |l: Level| Level::ALL.iter().position(|&x| x == l);
        assert!(
            Level::available().contains(&want) && rank(best.level) >= rank(want),
            "{} kernels, want {want} or better",
            best.name
        );
    }
}

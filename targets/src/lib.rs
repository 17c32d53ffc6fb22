//! kiln device descriptors: what a target device is and what the compiler may assume about it.
//!
//! Each descriptor is a TOML file in `targets/descriptors/`, embedded in the binary with
//! `include_str!`, parsed into a typed [`Target`] and validated: an unknown key, a CPU feature
//! the runtime cannot check, a triple kiln has no kernels for, an unknown backend or a zero
//! budget is an error naming the file and the field.

mod descriptor;

pub use descriptor::{Backend, Cpu, Defaults, ExecutionProvider, Memory, Target};

/// The descriptors kiln ships, by name, in the order `cargo xtask targets` lists them.
const SHIPPED: &[(&str, &str)] = &[
    ("host", include_str!("../descriptors/host.toml")),
    ("rpi4", include_str!("../descriptors/rpi4.toml")),
    ("rpi5", include_str!("../descriptors/rpi5.toml")),
    (
        "jetson-orin-nano",
        include_str!("../descriptors/jetson-orin-nano.toml"),
    ),
    (
        "jetson-agx-orin",
        include_str!("../descriptors/jetson-agx-orin.toml"),
    ),
    ("qcs6490", include_str!("../descriptors/qcs6490.toml")),
    (
        "aarch64-linux",
        include_str!("../descriptors/aarch64-linux.toml"),
    ),
    (
        "aarch64-i8mm",
        include_str!("../descriptors/aarch64-i8mm.toml"),
    ),
];

/// CPU feature names kiln's runtime checks on x86-64 (`kiln_runtime::cpu::has_feature`).
pub const X86_64_FEATURES: &[&str] = &[
    "sse4.1",
    "avx",
    "avx2",
    "avxvnni",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
];

/// CPU feature names kiln's runtime checks on aarch64 (`kiln_runtime::cpu::has_feature`).
pub const AARCH64_FEATURES: &[&str] = &["neon", "fp16", "dotprod", "i8mm"];

/// Weight storage names a descriptor's `defaults.quant` may use (`kiln_runtime::quant::Format`).
pub const QUANTS: &[&str] = &["f32", "f16", "q8_0", "q4_0", "q4_1"];

/// The CPU feature names kiln knows for an architecture (`x86_64`, `aarch64`), if it has
/// kernels for it.
pub fn features_for_arch(arch: &str) -> Option<&'static [&'static str]> {
    match arch {
        "x86_64" => Some(X86_64_FEATURES),
        "aarch64" => Some(AARCH64_FEATURES),
        _ => None,
    }
}

/// A descriptor that does not parse or does not validate.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not TOML, or not the descriptor's shape (unknown key, wrong type, unknown backend…);
    /// the TOML error points at the line and key.
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// Well-formed, but a field's value is not acceptable.
    #[error("{file}: field `{field}`: {reason}")]
    Invalid {
        file: String,
        field: &'static str,
        reason: String,
    },
}

/// The names of the shipped descriptors.
pub fn names() -> Vec<&'static str> {
    SHIPPED.iter().map(|(name, _)| *name).collect()
}

/// Every shipped descriptor, parsed and validated.
pub fn all() -> Result<Vec<Target>, TargetError> {
    SHIPPED
        .iter()
        .map(|(name, text)| Target::parse(&shipped_file(name), name, text))
        .collect()
}

/// The shipped descriptor called `name`, or `None` when there is none.
pub fn find(name: &str) -> Result<Option<Target>, TargetError> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| Target::parse(&shipped_file(n), n, text))
        .transpose()
}

fn shipped_file(name: &str) -> String {
    format!("targets/descriptors/{name}.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_descriptor_parses_and_validates() {
        let targets = all().expect("shipped descriptors");
        assert_eq!(targets.len(), SHIPPED.len());
        for target in &targets {
            assert!(!target.description.is_empty(), "{}", target.name);
            assert!(!target.triple.is_empty(), "{}", target.name);
        }
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, super::names());
    }

    #[test]
    fn shipped_descriptors_say_what_the_issue_asks() {
        let get = |name: &str| find(name).expect("parses").expect("shipped");
        let host = get("host");
        assert_eq!(host.triple, env!("KILN_HOST_TRIPLE"));
        assert!(host.cpu.assume.is_empty());
        assert_eq!(host.memory.budget, None);
        assert_eq!(get("rpi4").cpu.assume, ["neon"]);
        assert_eq!(get("rpi5").cpu.assume, ["neon", "dotprod", "fp16"]);
        for name in ["jetson-orin-nano", "jetson-agx-orin"] {
            let t = get(name);
            assert_eq!(t.backend, Backend::Ort);
            assert_eq!(
                t.execution_providers,
                [
                    ExecutionProvider::Cuda,
                    ExecutionProvider::TensorRt,
                    ExecutionProvider::Cpu
                ]
            );
        }
        let qcs = get("qcs6490");
        assert_eq!(qcs.execution_providers[0], ExecutionProvider::Qnn);
        assert_eq!(qcs.memory.budget, Some(2 << 30));
        let generic = get("aarch64-linux");
        assert_eq!(generic.cpu.assume, ["neon"]);
        assert_eq!(generic.triple, "aarch64-unknown-linux-gnu");
        assert!(find("pdp-11").expect("no error").is_none());
    }

    #[test]
    fn the_host_detects_every_feature_of_its_architecture() {
        let host = find("host").expect("parses").expect("shipped");
        let arch = host.arch();
        let known = features_for_arch(arch).unwrap_or(&[]);
        assert_eq!(host.cpu.detect, known);
    }
}

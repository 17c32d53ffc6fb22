//! The typed descriptor ([`Target`]), how its TOML is read, and the checks a parsed descriptor
//! must pass.

use serde::{Deserialize, Serialize};

use kiln_runtime::layout::Layout;

use crate::{features_for_arch, TargetError, QUANTS};

/// One device kiln compiles for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The descriptor's name (its file stem), e.g. `rpi5`.
    #[serde(skip_deserializing)]
    pub name: String,
    /// One line for people: the board and its CPU.
    pub description: String,
    /// The Rust target triple; `host` in the file means the triple this kiln was built for.
    pub triple: String,
    /// What the kernels may assume and what they look for at run time.
    pub cpu: Cpu,
    /// What runs the model on the device.
    pub backend: Backend,
    /// onnxruntime execution providers, in the order they are tried (`ort` backend only).
    pub execution_providers: Vec<ExecutionProvider>,
    /// What the model may use of the device's memory.
    #[serde(default)]
    pub memory: Memory,
    /// What `cargo xtask compile` uses when not told otherwise.
    pub defaults: Defaults,
}

/// CPU features, by the names `kiln_runtime::cpu::has_feature` understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    /// Features the kernels may assume: an artifact for this target *requires* them, and the
    /// runtime refuses it on a CPU that lacks one.
    pub assume: Vec<String>,
    /// Features used when the CPU has them at run time; `["all"]` in the file means every
    /// feature kiln knows for the triple's architecture.
    pub detect: Vec<String>,
    /// How block-quantized matrices are packed for the target's kernels (`kiln_runtime::layout`:
    /// `rows`, `4x4`, `4x8`, `4x16`); absent: ggml's rows, or for `host` the best layout of the
    /// CPU compiling.
    #[serde(default)]
    pub layout: Option<String>,
}

/// What runs the model on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// kiln's own runtime over a `.kiln` artifact.
    Native,
    /// onnxruntime over the exported `model.onnx`, through execution providers; a `.kiln`
    /// artifact still runs on the CPU as the fallback.
    Ort,
}

/// An onnxruntime execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT.
    #[serde(rename = "tensorrt")]
    TensorRt,
    /// Qualcomm AI Engine Direct (Hexagon NPU).
    Qnn,
    /// XNNPACK's optimized CPU kernels (Arm and x86).
    Xnnpack,
    /// Android's Neural Networks API.
    Nnapi,
    /// Apple's Core ML.
    #[serde(rename = "coreml")]
    CoreMl,
    /// Intel OpenVINO.
    #[serde(rename = "openvino")]
    OpenVino,
    /// Arm Compute Library.
    Acl,
    /// onnxruntime's own CPU kernels.
    Cpu,
}

impl ExecutionProvider {
    /// The name onnxruntime gives it, e.g. `TensorRT`.
    pub fn display_name(self) -> &'static str {
        match self {
            ExecutionProvider::Cuda => "CUDA",
            ExecutionProvider::TensorRt => "TensorRT",
            ExecutionProvider::Qnn => "QNN",
            ExecutionProvider::Xnnpack => "XNNPACK",
            ExecutionProvider::Nnapi => "NNAPI",
            ExecutionProvider::CoreMl => "CoreML",
            ExecutionProvider::OpenVino => "OpenVINO",
            ExecutionProvider::Acl => "ACL",
            ExecutionProvider::Cpu => "CPU",
        }
    }

    /// The name in descriptors and on `kiln --ep`, e.g. `tensorrt`.
    pub fn key(self) -> &'static str {
        match self {
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::TensorRt => "tensorrt",
            ExecutionProvider::Qnn => "qnn",
            ExecutionProvider::Xnnpack => "xnnpack",
            ExecutionProvider::Nnapi => "nnapi",
            ExecutionProvider::CoreMl => "coreml",
            ExecutionProvider::OpenVino => "openvino",
            ExecutionProvider::Acl => "acl",
            ExecutionProvider::Cpu => "cpu",
        }
    }
}

impl Backend {
    /// `native` or `ort`, as written in a descriptor.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Ort => "ort",
        }
    }
}

/// What the model may use of the device's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Bytes the model's predicted peak may reach; `None` (absent) is unlimited.
    pub budget: Option<u64>,
}

/// What `cargo xtask compile` and the runtime use when not told otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Weight storage: `f32`, `f16`, `q8_0`, `q4_0` or `q4_1`.
    pub quant: String,
    /// Tokens of context (capped at the model's own).
    pub context: usize,
    /// Worker threads; 0 = every core found at run time.
    pub threads: usize,
}

impl Target {
    /// Parses and validates a descriptor called `name` from its TOML `text`; errors name the
    /// file `{name}.toml` and the field.
    pub fn from_toml(name: &str, text: &str) -> Result<Target, TargetError> {
        Target::parse(&format!("{name}.toml"), name, text)
    }

    /// The layout the descriptor packs matrices in (validated when it was read); `None` when it
    /// names none.
    pub fn layout(&self) -> Option<Layout> {
        self.cpu.layout.as_deref().and_then(Layout::from_name)
    }

    /// The architecture part of the triple, e.g. `aarch64`.
    pub fn arch(&self) -> &str {
        self.triple.split('-').next().unwrap_or_default()
    }

    pub(crate) fn parse(file: &str, name: &str, text: &str) -> Result<Target, TargetError> {
        let mut target: Target = toml::from_str(text).map_err(|source| TargetError::Parse {
            file: file.to_owned(),
            source: Box::new(source),
        })?;
        target.name = name.to_owned();
        let host = target.triple == "host";
        if host {
            target.triple = env!("KILN_HOST_TRIPLE").to_owned();
        }
        let invalid = |field: &'static str, reason: String| TargetError::Invalid {
            file: file.to_owned(),
            field,
            reason,
        };
        check_name(name).map_err(|reason| invalid("name", reason))?;
        if target.description.trim().is_empty() {
            return Err(invalid("description", "is empty".into()));
        }
        check_triple(&target.triple).map_err(|reason| invalid("triple", reason))?;
        let known = match features_for_arch(target.arch()) {
            Some(known) => known,
            // The build host may be an architecture kiln has no optimized kernels for.
            None if host => &[],
            None => {
                return Err(invalid(
                    "triple",
                    format!(
                        "kiln has no kernels for the architecture {:?} (one of x86_64, aarch64)",
                        target.arch()
                    ),
                ))
            }
        };
        if target.cpu.detect == ["all"] {
            target.cpu.detect = known.iter().map(|f| (*f).to_owned()).collect();
        }
        check_features(&target.cpu.assume, known, target.arch())
            .map_err(|reason| invalid("cpu.assume", reason))?;
        check_features(&target.cpu.detect, known, target.arch())
            .map_err(|reason| invalid("cpu.detect", reason))?;
        if let Some(name) = &target.cpu.layout {
            check_layout(name, &target.cpu.assume, target.arch())
                .map_err(|reason| invalid("cpu.layout", reason))?;
        }
        match (target.backend, target.execution_providers.is_empty()) {
            (Backend::Native, false) => return Err(invalid(
                "execution_providers",
                "the `native` backend takes none (they are onnxruntime's; use `backend = \"ort\"`)"
                    .into(),
            )),
            (Backend::Ort, true) => {
                return Err(invalid(
                    "execution_providers",
                    "the `ort` backend needs at least one, in the order to try them".into(),
                ))
            }
            _ => {}
        }
        let providers = &target.execution_providers;
        if let Some(p) = providers
            .iter()
            .enumerate()
            .find(|(i, p)| providers[..*i].contains(p))
        {
            return Err(invalid(
                "execution_providers",
                format!("{} is listed twice", p.1.display_name()),
            ));
        }
        if target.memory.budget == Some(0) {
            return Err(invalid(
                "memory.budget",
                "is 0 bytes (leave it out for no limit)".into(),
            ));
        }
        if !QUANTS.contains(&target.defaults.quant.as_str()) {
            return Err(invalid(
                "defaults.quant",
                format!(
                    "unknown weight storage {:?} (one of {})",
                    target.defaults.quant,
                    QUANTS.join(", ")
                ),
            ));
        }
        if target.defaults.context == 0 {
            return Err(invalid(
                "defaults.context",
                "is 0 tokens (give a context length)".into(),
            ));
        }
        Ok(target)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a target name (lowercase letters, digits and `-`)"
        ))
    }
}

/// `arch-vendor-os[-env]`, each part lowercase letters, digits, `_` or `.`.
fn check_triple(triple: &str) -> Result<(), String> {
    let parts: Vec<&str> = triple.split('-').collect();
    let well_formed = (3..=4).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "{triple:?} is not a Rust target triple (arch-vendor-os[-env], e.g. aarch64-unknown-linux-gnu)"
        ))
    }
}

/// A layout kiln knows, for the target's architecture, whose kernels' features are assumed.
fn check_layout(name: &str, assume: &[String], arch: &str) -> Result<(), String> {
    let Some(layout) = Layout::from_name(name) else {
        let known: Vec<&str> = Layout::ALL.iter().map(|l| l.name()).collect();
        return Err(format!(
            "unknown layout {name:?} (one of {})",
            known.join(", ")
        ));
    };
    if let Some(other) = layout.level().arch().filter(|a| *a != arch) {
        return Err(format!("{name} is packed for {other} kernels, not {arch}"));
    }
    match layout
        .features()
        .iter()
        .find(|f| !assume.iter().any(|a| a == *f))
    {
        Some(f) => Err(format!(
            "{name} needs the CPU feature {f}, which cpu.assume does not list"
        )),
        None => Ok(()),
    }
}

fn check_features(features: &[String], known: &[&str], arch: &str) -> Result<(), String> {
    for (i, feature) in features.iter().enumerate() {
        if !known.contains(&feature.as_str()) {
            return Err(format!(
                "unknown {arch} CPU feature {feature:?} (kiln checks {})",
                if known.is_empty() {
                    "none on this architecture".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        if features[..i].contains(feature) {
            return Err(format!("{feature:?} is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RPI5: &str = include_str!("../descriptors/rpi5.toml");

    fn error(text: &str) -> String {
        match Target::from_toml("board", text) {
            Ok(t) => panic!("accepted: {t:?}"),
            Err(e) => {
                let message = e.to_string();
                assert!(message.starts_with("board.toml: "), "{message}");
                message
            }
        }
    }

    #[test]
    fn a_valid_descriptor_parses() {
        let t = Target::from_toml("board", RPI5).expect("parses");
        assert_eq!(t.name, "board");
        assert_eq!(t.arch(), "aarch64");
        assert_eq!(t.backend, Backend::Native);
        assert_eq!(t.memory.budget, Some(6 << 30));
        assert_eq!(t.defaults.quant, "q4_1");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let e = error(&format!("{RPI5}\n[memory2]\nbudget = 1\n"));
        assert!(e.contains("unknown field `memory2`"), "{e}");
        let e = error(&RPI5.replace("[cpu]", "[cpu]\nturbo = true"));
        assert!(e.contains("unknown field `turbo`"), "{e}");
    }

    #[test]
    fn a_bad_layout_is_named() {
        let with = |layout: &str| RPI5.replace("\"4x4\"", &format!("\"{layout}\""));
        assert!(Target::from_toml("board", &with("4x4")).is_ok());
        let e = error(&with("8x8"));
        assert!(
            e.contains("field `cpu.layout`") && e.contains("one of rows, 4x4"),
            "{e}"
        );
        let e = error(&with("4x16"));
        assert!(e.contains("packed for x86_64 kernels, not aarch64"), "{e}");
        let e = error(&with("4x8"));
        assert!(e.contains("needs the CPU feature i8mm"), "{e}");
    }

    #[test]
    fn a_bad_feature_name_is_named() {
        let e = error(&RPI5.replace("\"dotprod\"", "\"avx2\""));
        assert!(e.contains("field `cpu.assume`"), "{e}");
        assert!(e.contains("\"avx2\""), "{e}");
        let e = error(&RPI5.replace("detect = []", "detect = [\"sve\"]"));
        assert!(e.contains("field `cpu.detect`"), "{e}");
        let e = error(&RPI5.replace("\"fp16\"", "\"neon\""));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn a_bad_triple_is_named() {
        let e = error(&RPI5.replace("aarch64-unknown-linux-gnu", "aarch64 linux"));
        assert!(e.contains("field `triple`"), "{e}");
        let e = error(&RPI5.replace("aarch64-unknown-linux-gnu", "sparc64-unknown-linux-gnu"));
        assert!(e.contains("field `triple`"), "{e}");
        assert!(e.contains("no kernels"), "{e}");
    }

    #[test]
    fn a_bad_backend_is_named() {
        let e = error(&RPI5.replace("backend = \"native\"", "backend = \"gpu\""));
        assert!(e.contains("backend"), "{e}");
        assert!(e.contains("unknown variant `gpu`"), "{e}");
        let e = error(&RPI5.replace(
            "execution_providers = []",
            "execution_providers = [\"cuda\"]",
        ));
        assert!(e.contains("field `execution_providers`"), "{e}");
        let ort = RPI5.replace("backend = \"native\"", "backend = \"ort\"");
        let e = error(&ort);
        assert!(e.contains("field `execution_providers`"), "{e}");
        let e = error(&ort.replace(
            "execution_providers = []",
            "execution_providers = [\"npu\"]",
        ));
        assert!(e.contains("execution_providers"), "{e}");
        assert!(e.contains("unknown variant `npu`"), "{e}");
    }

    #[test]
    fn a_zero_budget_is_named() {
        let e = error(&RPI5.replace("budget = 6442450944", "budget = 0"));
        assert!(e.contains("field `memory.budget`"), "{e}");
    }

    #[test]
    fn bad_defaults_are_named() {
        let e = error(&RPI5.replace("quant = \"q4_1\"", "quant = \"q3_k\""));
        assert!(e.contains("field `defaults.quant`"), "{e}");
        let e = error(&RPI5.replace("context = 4096", "context = 0"));
        assert!(e.contains("field `defaults.context`"), "{e}");
        let e = error(&RPI5.replace("threads = 4", "threads = -1"));
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn missing_fields_are_named() {
        let e = error(&RPI5.replace("triple = \"aarch64-unknown-linux-gnu\"\n", ""));
        assert!(e.contains("missing field `triple`"), "{e}");
        let e = error("not toml = = 1");
        assert!(e.contains("board.toml"), "{e}");
    }
}

//! Execution providers by the names users and target descriptors give them, checked against
//! what the loaded library was built with.

use ::ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};

use super::OrtError;

/// An onnxruntime execution provider kiln knows how to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ep {
    Cpu,
    Xnnpack,
    Cuda,
    TensorRt,
    Qnn,
    Nnapi,
    CoreMl,
    OpenVino,
    Acl,
}

impl Ep {
    pub const ALL: [Ep; 9] = [
        Ep::Cpu,
        Ep::Xnnpack,
        Ep::Cuda,
        Ep::TensorRt,
        Ep::Qnn,
        Ep::Nnapi,
        Ep::CoreMl,
        Ep::OpenVino,
        Ep::Acl,
    ];

    /// Parses `cpu`, `xnnpack`, `cuda`, `tensorrt` (or `trt`), `qnn`, `nnapi`, `coreml`,
    /// `openvino`, `acl`, in any case.
    pub fn parse(name: &str) -> Option<Ep> {
        let lower = name.trim().to_ascii_lowercase();
        let lower = if lower == "trt" { "tensorrt" } else { &lower };
        Ep::ALL.into_iter().find(|e| e.key() == lower)
    }

    /// The short name used on the command line and in target descriptors.
    pub fn key(self) -> &'static str {
        match self {
            Ep::Cpu => "cpu",
            Ep::Xnnpack => "xnnpack",
            Ep::Cuda => "cuda",
            Ep::TensorRt => "tensorrt",
            Ep::Qnn => "qnn",
            Ep::Nnapi => "nnapi",
            Ep::CoreMl => "coreml",
            Ep::OpenVino => "openvino",
            Ep::Acl => "acl",
        }
    }

    /// The display name.
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cpu => "CPU",
            Ep::Xnnpack => "XNNPACK",
            Ep::Cuda => "CUDA",
            Ep::TensorRt => "TensorRT",
            Ep::Qnn => "QNN",
            Ep::Nnapi => "NNAPI",
            Ep::CoreMl => "CoreML",
            Ep::OpenVino => "OpenVINO",
            Ep::Acl => "ACL",
        }
    }

    /// onnxruntime's own name, as `GetAvailableProviders` lists it.
    fn provider_name(self) -> &'static str {
        match self {
            Ep::Cpu => ep::CPU::NAME,
            Ep::Xnnpack => ep::XNNPACK::NAME,
            Ep::Cuda => ep::CUDA::NAME,
            Ep::TensorRt => ep::TensorRT::NAME,
            Ep::Qnn => ep::QNN::NAME,
            Ep::Nnapi => ep::NNAPI::NAME,
            Ep::CoreMl => ep::CoreML::NAME,
            Ep::OpenVino => ep::OpenVINO::NAME,
            Ep::Acl => ep::ACL::NAME,
        }
    }

    /// `ort`'s registration of this provider, failing (not skipping) when it cannot start.
    pub(super) fn dispatch(self) -> ExecutionProviderDispatch {
        let dispatch = match self {
            Ep::Cpu => ep::CPU::default().build(),
            Ep::Xnnpack => ep::XNNPACK::default().build(),
            Ep::Cuda => ep::CUDA::default().build(),
            Ep::TensorRt => ep::TensorRT::default().build(),
            Ep::Qnn => ep::QNN::default().build(),
            Ep::Nnapi => ep::NNAPI::default().build(),
            Ep::CoreMl => ep::CoreML::default().build(),
            Ep::OpenVino => ep::OpenVINO::default().build(),
            Ep::Acl => ep::ACL::default().build(),
        };
        // A provider that is compiled in but cannot start (no GPU, no driver) is an error too:
        // silently running on the CPU is what the user did not ask for.
        dispatch.error_on_failure()
    }
}

/// The providers to register: `wanted` minus those the library lacks, which are an error unless
/// `fallback` (then they are dropped with a note on stderr).
pub fn choose(wanted: &[Ep], available: &[String], fallback: bool) -> Result<Vec<Ep>, OrtError> {
    let mut chosen = Vec::new();
    for &e in wanted {
        if available.iter().any(|a| a == e.provider_name()) {
            if !chosen.contains(&e) {
                chosen.push(e);
            }
            continue;
        }
        let have: Vec<&str> = available
            .iter()
            .map(|a| a.trim_end_matches("ExecutionProvider"))
            .collect();
        let why = format!(
            "not in the loaded onnxruntime (it has: {}); load a build with it (--ort-lib / \
             ORT_DYLIB_PATH){}",
            have.join(", "),
            if fallback {
                ""
            } else {
                " or pass --ep-fallback to run on the CPU"
            }
        );
        if !fallback {
            return Err(OrtError::Provider { ep: e.name(), why });
        }
        eprintln!("note: execution provider {}: {why}; falling back", e.name());
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for e in Ep::ALL {
            assert_eq!(Ep::parse(e.key()), Some(e));
            assert_eq!(Ep::parse(&e.name().to_uppercase()), Some(e));
        }
        assert_eq!(Ep::parse("TRT"), Some(Ep::TensorRt));
        assert_eq!(Ep::parse("gpu"), None);
    }

    #[test]
    fn a_missing_provider_is_an_error_unless_falling_back() {
        let available = vec!["CPUExecutionProvider".to_string()];
        let err = choose(&[Ep::Cuda], &available, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CUDA") && text.contains("it has: CPU"),
            "{text}"
        );
        assert_eq!(
            choose(&[Ep::Cuda, Ep::Cpu], &available, true).unwrap(),
            vec![Ep::Cpu]
        );
    }
}

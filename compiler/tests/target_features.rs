//! An artifact compiled for a target records the CPU features the target's descriptor assumes
//! (and its layout's kernels need), and the runtime refuses it on a CPU that lacks one: the
//! default model compiled for `rpi5` requires NEON, dotprod and fp16 and does not open on
//! x86-64; compiled for `host` it requires only the features of this CPU's kernels and opens.

mod common;

use std::path::Path;

use kiln_runtime::artifact::{parse, Artifact, ArtifactError};
use kiln_runtime::cpu::has_feature;
use kiln_runtime::quant::Format;

/// Compiles the default model (q4_1, its own storage) for the target `name` into `dir`.
fn compile_for(dir: &Path, name: &str) -> (Vec<String>, std::path::PathBuf) {
    let target = kiln_targets::find(name)
        .expect("descriptor parses")
        .expect("shipped target");
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::Q4_1).expect("convert");
    let out = dir.join(format!("smollm2-{name}.kiln"));
    let packing = kiln_compiler::emit::Packing::for_target(&target);
    kiln_compiler::emit::write_artifact_for(&converted, &out, &packing).expect("write artifact");
    (packing.required_features, out)
}

fn recorded_features(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).expect("read artifact");
    parse(&bytes).expect("parses").meta.required_cpu_features
}

/// The error under `Artifact::open`'s "path: …" wrapper.
fn unwrap_file(e: ArtifactError) -> ArtifactError {
    match e {
        ArtifactError::File { source, .. } => *source,
        other => other,
    }
}

#[test]
fn an_rpi5_artifact_requires_its_features_and_is_refused_where_they_are_missing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (assumed, path) = compile_for(dir.path(), "rpi5");
    assert_eq!(assumed, ["neon", "dotprod", "fp16"]);
    assert_eq!(recorded_features(&path), assumed);
    let missing = assumed.iter().find(|f| !has_feature(f));
    #[cfg(target_arch = "x86_64")]
    assert_eq!(missing.map(String::as_str), Some("neon"));
    match (Artifact::open(&path).map_err(unwrap_file), missing) {
        (Err(ArtifactError::MissingCpuFeature { feature }), Some(m)) => assert_eq!(&feature, m),
        (Ok(_), None) => {}
        (Ok(_), Some(m)) => panic!("opened although this CPU lacks {m}"),
        (Err(e), _) => panic!("unexpected error: {e}"),
    }
}

/// The host's artifact is packed for this CPU's best kernels and requires only their
/// features (on x86-64 the 4x16 layout, AVX2's), so it opens here.
#[test]
fn a_host_artifact_requires_its_layouts_kernels_and_opens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (required, path) = compile_for(dir.path(), "host");
    let layout = kiln_runtime::kernels::Level::best().preferred_layout();
    assert_eq!(required, layout.features());
    assert_eq!(recorded_features(&path), required);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(required, ["avx2", "fma", "f16c"]);
    let artifact = Artifact::open(&path).expect("opens on the host");
    assert!(artifact
        .meta()
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .all(|t| t.layout == layout));
}

#[test]
fn every_descriptor_execution_provider_is_one_the_ort_backend_knows() {
    for target in kiln_targets::all().expect("descriptors") {
        for ep in &target.execution_providers {
            assert!(
                kiln_engine::onnxrt::Ep::parse(ep.key()).is_some(),
                "{}: {} is not a `kiln --ep` name",
                target.name,
                ep.key()
            );
        }
    }
}

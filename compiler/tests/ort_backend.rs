//! The onnxruntime backend (`kiln --backend ort`) against kiln's own executor and llama.cpp:
//! the same greedy ids on the golden prompts (float export), perplexity within 1 % (MatMulNBits
//! export), the same logits through a chat-style rewind, and clear errors for a missing or
//! foreign library, a missing execution provider and an ONNX file kiln did not export.

mod common;
mod hf_support;
mod onnx_common;

use std::path::{Path, PathBuf};

use kiln_compiler::onnx::{export, export_quantized, proto, ExportOptions};
use kiln_engine::decoder::Decoder;
use kiln_engine::generate::{generate, GenerateOptions, Model};
use kiln_engine::onnxrt::{Ep, OrtModel, OrtOptions};
use kiln_engine::perplexity::{perplexity, Windows};
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};
use prost::Message;

/// The `capi` directory of `$KILN_PYTHON`'s onnxruntime wheel (a peer `cargo xtask test` installs).
fn wheel_capi_dir() -> PathBuf {
    let out = std::process::Command::new(common::python())
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))",
        ])
        .output()
        .expect("run python to find onnxruntime (set KILN_PYTHON)");
    assert!(
        out.status.success(),
        "no onnxruntime wheel in {} (cargo xtask test installs it): {}",
        common::python(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The onnxruntime library under test: `$KILN_TEST_ORT_DYLIB` (set by `cargo xtask test` to the
/// one `cargo xtask fetch onnxruntime` installs), else the one in the Python wheel.
fn ort_library() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_TEST_ORT_DYLIB") {
        return PathBuf::from(path);
    }
    let dir = wheel_capi_dir();
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("list the wheel's capi directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
        })
        .collect();
    libs.sort();
    libs.pop()
        .unwrap_or_else(|| panic!("no libonnxruntime.so.* in {}", dir.display()))
}

fn ort_options(eps: Vec<Ep>) -> OrtOptions {
    OrtOptions {
        library: Some(ort_library()),
        eps,
        fallback_to_cpu: false,
        threads: 2,
    }
}

/// The default model exported once per test binary: float, and `MatMulNBits` over its q4_1 blocks.
fn smollm2_onnx(quantized: bool) -> PathBuf {
    let path = common::shared_dir().join(if quantized {
        "smollm2-q4_1.onnx"
    } else {
        "smollm2-f32.onnx"
    });
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let checkpoint =
            kiln_compiler::import::import(&common::smollm2_gguf()).expect("import SmolLM2");
        if quantized {
            export_quantized(&checkpoint, &path, &ExportOptions::default()).expect("export");
        } else {
            export(&checkpoint, &path, &ExportOptions::default()).expect("export");
        }
    }
    path
}

fn greedy(model: &Model, decoder: &mut dyn Decoder, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
    let opts = GenerateOptions {
        max_tokens: n,
        stop: vec![],
        cancel: None,
        top_logprobs: None,
    };
    generate(model, decoder, &mut sampler, prompt, &opts, |_| {})
        .expect("generate")
        .ids
}

#[test]
fn float_export_on_onnxruntime_gives_llama_cpp_greedy_ids() {
    let ort = Model::from_ort(
        OrtModel::load(&smollm2_onnx(false), &ort_options(vec![Ep::Cpu])).expect("load"),
    )
    .expect("model");
    let native = Model::open(&common::smollm2_artifact(Format::F32)).expect("open");
    let opts = SessionOptions {
        context: 512,
        threads: 2,
        ..SessionOptions::default()
    };
    for case in common::golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
    {
        let name = case["name"].as_str().expect("name");
        let prompt = common::ids(&case["prompt_ids"]);
        let mut expected = common::ids(&case["F32"]["generated_ids"]);
        if expected
            .last()
            .is_some_and(|id| ort.facts().eog_ids.contains(id))
        {
            expected.pop();
        }
        let n = expected.len().min(32);
        let mut decoder = ort.decoder(opts.clone()).expect("ort decoder");
        let from_ort = greedy(&ort, decoder.as_mut(), &prompt, n);
        let mut session = native.decoder(opts.clone()).expect("native decoder");
        let from_native = greedy(&native, session.as_mut(), &prompt, n);
        println!("{name}: ort {from_ort:?}");
        assert_eq!(from_ort, expected[..n], "{name}: ort vs llama.cpp");
        assert_eq!(from_ort, from_native, "{name}: ort vs kiln");
    }
}

#[test]
fn matmulnbits_export_perplexity_is_within_1_percent_of_native_and_llama_cpp() {
    let golden = common::golden();
    let text =
        std::fs::read_to_string(common::testdata().join("golden/apache-2.0.txt")).expect("text");
    let ctx = golden["perplexity"]["ctx"].as_u64().expect("ctx") as usize;
    let ort = Model::from_ort(
        OrtModel::load(&smollm2_onnx(true), &ort_options(vec![Ep::Cpu])).expect("load"),
    )
    .expect("model");
    let native = Model::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    let tokens = ort.encode_prompt(&text, true);
    let two_threads = common::two_threads();
    let on_ort =
        perplexity(&ort, &tokens, &Windows::of(ctx), &two_threads).expect("ort perplexity");
    let on_native =
        perplexity(&native, &tokens, &Windows::of(ctx), &two_threads).expect("native perplexity");
    let llama_cpp = golden["perplexity"]["ppl"]["Q4_1"].as_f64().expect("ppl");
    println!(
        "q4_1 perplexity: ort {:.4}, kiln {:.4}, llama.cpp {llama_cpp}",
        on_ort.ppl, on_native.ppl
    );
    for (what, other) in [("kiln", on_native.ppl), ("llama.cpp", llama_cpp)] {
        let rel = (on_ort.ppl - other).abs() / other;
        assert!(rel <= 0.01, "ort {:.4} vs {what} {other:.4}", on_ort.ppl);
    }
}

#[test]
fn rewinding_the_ort_cache_keeps_the_prefix() {
    let checkpoint_dir = hf_support::tiny_checkpoint(5);
    let checkpoint = kiln_compiler::import::import(checkpoint_dir.path()).expect("import tiny");
    let work = tempfile::tempdir().expect("temp dir");
    let onnx = work.path().join("tiny.onnx");
    export(&checkpoint, &onnx, &ExportOptions::default()).expect("export");
    let ort = OrtModel::load(&onnx, &ort_options(Vec::new())).expect("load");
    let opts = SessionOptions {
        context: 64,
        batch: 8,
        ..SessionOptions::default()
    };
    let vocab = checkpoint.facts.vocab_size as u32;
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 7919 + 3) % vocab).collect();
    let other: Vec<u32> = (0..5u32).map(|i| (i * 104_729 + 11) % vocab).collect();

    // 20 tokens in chunks of 8, rewound to 12, then 5 other tokens…
    let mut rewound = ort.session(&opts).expect("session");
    rewound.forward(&tokens).expect("forward");
    rewound.rewind(12);
    let after_rewind = rewound.forward(&other).expect("forward").to_vec();
    // …equal the first 12 then the 5 run in a fresh cache.
    let mut fresh = ort.session(&opts).expect("session");
    fresh.forward(&tokens[..12]).expect("forward");
    let straight = fresh.forward(&other).expect("forward").to_vec();
    let diff = onnx_common::max_abs_diff(&[after_rewind], &[straight]);
    println!("rewind vs fresh: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "rewound cache differs by {diff}");
    assert_eq!(rewound.position(), 17);
    let err = rewound.forward(&[0; 48]).expect_err("past the context");
    assert!(err.to_string().contains("context full"), "{err}");
}

fn load_error(path: &Path, opts: &OrtOptions) -> String {
    match OrtModel::load(path, opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_libraries_providers_and_models_are_clear_errors() {
    let model = smollm2_onnx(false);
    let missing = Path::new("/nonexistent/libonnxruntime.so");
    let opts = OrtOptions {
        library: Some(missing.to_path_buf()),
        ..ort_options(Vec::new())
    };
    common::assert_names_file(
        load_error(&model, &opts),
        missing,
        &[
            "cannot load onnxruntime",
            "≥ 1.22",
            "cargo xtask fetch onnxruntime",
        ],
    );

    // A real shared library that is not onnxruntime.
    let foreign = wheel_capi_dir().join("libonnxruntime_providers_shared.so");
    let opts = OrtOptions {
        library: Some(foreign.clone()),
        ..ort_options(Vec::new())
    };
    common::assert_names_file(load_error(&model, &opts), &foreign, &["OrtGetApiBase"]);

    // The PyPI CPU build has no CUDA.
    let text = load_error(&model, &ort_options(vec![Ep::Cuda]));
    assert!(
        text.contains("CUDA") && text.contains("CPU") && text.contains("--ep-fallback"),
        "{text}"
    );

    // An ONNX decoder without kiln's metadata (as another exporter would write it).
    let mut onnx =
        proto::ModelProto::decode(std::fs::read(&model).expect("read").as_slice()).expect("decode");
    onnx.metadata_props
        .retain(|p| p.key.as_deref() != Some("kiln.facts"));
    let work = tempfile::tempdir().expect("temp dir");
    let foreign_model = work.path().join("other.onnx");
    std::fs::write(&foreign_model, onnx.encode_to_vec()).expect("write");
    common::assert_names_file(
        load_error(&foreign_model, &ort_options(Vec::new())),
        &foreign_model,
        &["kiln.facts", "cargo xtask export"],
    );

    let truncated = work.path().join("truncated.onnx");
    let bytes = std::fs::read(&model).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    common::assert_names_file(
        load_error(&truncated, &ort_options(Vec::new())),
        &truncated,
        &["onnxruntime could not load it"],
    );
}

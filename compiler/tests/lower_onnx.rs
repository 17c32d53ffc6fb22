//! `lower::import_onnx`: an ONNX decoder read back through tract and matched into kiln's
//! checkpoint must compile to an artifact that computes what the artifact compiled directly
//! from the same checkpoint computes; what it cannot match is an error naming the node.

mod common;
mod hf_support;
mod onnx_common;

use std::path::{Path, PathBuf};

use kiln_compiler::graph::Checkpoint;
use kiln_compiler::lower::import_onnx;
use kiln_compiler::onnx::proto::ModelProto;
use kiln_compiler::onnx::{export, ExportOptions};
use kiln_engine::generate::{generate, GenerateOptions, Model};
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};
use onnx_common::{kiln_logits, max_abs_diff, temp_dir, Steps};
use prost::Message;

/// Both artifacts hold the same f32 weights and facts: only bit-level differences are allowed.
const TOLERANCE: f32 = 1e-5;

/// The error lowering `path` gives, as text.
fn lower_error(path: &Path) -> String {
    match import_onnx(path) {
        Ok(_) => panic!("{} lowered, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Writes `checkpoint` as an f32 artifact at `path`.
fn compile(checkpoint: &Checkpoint, path: &Path) -> PathBuf {
    let converted = kiln_compiler::emit::convert(checkpoint, Format::F32).expect("convert");
    kiln_compiler::emit::write_artifact(&converted, path).expect("write artifact");
    path.to_path_buf()
}

/// The logits of `steps` on the artifact at `path`.
fn logits(path: &Path, steps: &Steps) -> Vec<Vec<f32>> {
    let artifact = Artifact::open(path).expect("open artifact");
    let mut session = artifact
        .session(SessionOptions {
            context: 512,
            threads: 2,
            // Float references on the other side: no f16 rounding of the cache here.
            kv_type: KvType::F32,
            ..SessionOptions::default()
        })
        .expect("session");
    kiln_logits(&mut session, steps)
}

/// The tiny Llama 3.2-shaped checkpoint (its directory and import) exported by kiln into `dir`.
fn tiny_onnx(dir: &Path) -> (tempfile::TempDir, Checkpoint, PathBuf) {
    let checkpoint_dir = hf_support::tiny_checkpoint(11);
    let checkpoint =
        kiln_compiler::import::import(checkpoint_dir.path()).expect("import tiny checkpoint");
    let onnx = dir.join("tiny.onnx");
    export(&checkpoint, &onnx, &ExportOptions::default()).expect("export");
    (checkpoint_dir, checkpoint, onnx)
}

#[test]
fn tiny_export_lowers_to_the_logits_of_the_direct_artifact() {
    let dir = temp_dir();
    let (_checkpoint_dir, checkpoint, onnx) = tiny_onnx(dir.path());
    let lowered = import_onnx(&onnx).expect("lower");
    assert_eq!(
        lowered.facts, checkpoint.facts,
        "facts survive the round trip"
    );
    assert!(lowered.facts.rope_scaling.is_some());
    assert_eq!(lowered.tokenizer, checkpoint.tokenizer);

    let vocab = checkpoint.facts.vocab_size as u32;
    // Past position 300 llama3's scaled low frequencies matter (see onnx_tiny_kiln.rs).
    let steps = Steps {
        prompt_ids: (0..300u32).map(|i| (i * 7919 + 13) % vocab).collect(),
        next_ids: vec![128_000, 9906, 11, 42, 100_000, 5],
        position_offset: 0,
    };
    let direct = logits(
        &compile(&checkpoint, &dir.path().join("direct.kiln")),
        &steps,
    );
    let through = logits(&compile(&lowered, &dir.path().join("lowered.kiln")), &steps);
    let diff = max_abs_diff(&direct, &through);
    let spread = direct.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!("tiny: max |logit| {spread:.3}, direct vs lowered max abs diff {diff:e}");
    assert!(spread > 1e-2, "logits too small to compare: {spread}");
    assert!(diff <= TOLERANCE, "direct vs lowered: {diff}");
}

/// Without kiln's facts and tokenizer in the metadata, as from another exporter: θ and llama3
/// scaling come from the graph's RoPE tables, the token policy from `tokenizer.json` (and
/// `tokenizer_config.json`) and the sampling from `generation_config.json` beside the model, and
/// the facts are the checkpoint's again.
#[test]
fn tiny_export_without_kiln_metadata_lowers_to_the_same_facts() {
    let dir = temp_dir();
    let (checkpoint_dir, checkpoint, onnx) = tiny_onnx(dir.path());
    let mut model =
        ModelProto::decode(std::fs::read(&onnx).expect("read").as_slice()).expect("decode");
    model
        .metadata_props
        .retain(|e| !e.key.as_deref().is_some_and(|k| k.starts_with("kiln.")));
    std::fs::write(&onnx, model.encode_to_vec()).expect("write");
    common::assert_names_file(lower_error(&onnx), &onnx, &["no tokenizer"]);

    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(checkpoint_dir.path().join(file), dir.path().join(file)).expect("copy");
    }
    let lowered = import_onnx(&onnx).expect("lower");
    assert_eq!(lowered.facts, checkpoint.facts);
}

#[test]
fn smollm2_export_lowers_to_llama_cpp_greedy_ids() {
    let dir = temp_dir();
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let onnx = dir.path().join("smollm2.onnx");
    export(&checkpoint, &onnx, &ExportOptions::default()).expect("export");
    let lowered = import_onnx(&onnx).expect("lower");
    assert_eq!(lowered.facts, checkpoint.facts);

    let case = common::golden_case("p1");
    let generated = common::ids(&case["F32"]["generated_ids"]);
    let steps = Steps {
        prompt_ids: common::ids(&case["prompt_ids"]),
        next_ids: generated[..4].to_vec(),
        position_offset: 0,
    };
    let direct_path = compile(&checkpoint, &dir.path().join("direct.kiln"));
    drop(checkpoint);
    let lowered_path = compile(&lowered, &dir.path().join("lowered.kiln"));
    drop(lowered);
    let diff = max_abs_diff(
        &logits(&direct_path, &steps),
        &logits(&lowered_path, &steps),
    );
    println!("smollm2: direct vs lowered max abs logit diff {diff:e}");
    assert!(diff <= TOLERANCE, "direct vs lowered: {diff}");

    let model = Model::open(&lowered_path).expect("open");
    for case in common::golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
    {
        let name = case["name"].as_str().expect("name");
        let mut expected = common::ids(&case["F32"]["generated_ids"]);
        // llama.cpp lists the end-of-generation id it stopped at; kiln reports it as the stop.
        if expected
            .last()
            .is_some_and(|id| model.facts().eog_ids.contains(id))
        {
            expected.pop();
        }
        let n = expected.len().min(32);
        let mut session = model
            .session(SessionOptions {
                threads: 2,
                ..SessionOptions::default()
            })
            .expect("session");
        let mut sampler = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
        let out = generate(
            &model,
            &mut session,
            &mut sampler,
            &common::ids(&case["prompt_ids"]),
            &GenerateOptions {
                max_tokens: n,
                stop: vec![],
                cancel: None,
                top_logprobs: None,
            },
            |_| {},
        )
        .expect("generate");
        assert_eq!(out.ids[..], expected[..n], "{name}: greedy ids");
    }
}

#[test]
fn unsupported_mlp_activation_names_the_node_and_op() {
    let dir = temp_dir();
    let (_checkpoint_dir, _, onnx) = tiny_onnx(dir.path());
    let mut model =
        ModelProto::decode(std::fs::read(&onnx).expect("read").as_slice()).expect("decode");
    let graph = model.graph.as_mut().expect("graph");
    let sigmoid = graph
        .node
        .iter_mut()
        .find(|n| {
            n.op_type.as_deref() == Some("Sigmoid")
                && n.name
                    .as_deref()
                    .is_some_and(|s| s.contains("layers.0/mlp"))
        })
        .expect("layer 0's SiLU sigmoid");
    sigmoid.op_type = Some("Tanh".into());
    sigmoid.name = sigmoid.name.as_ref().map(|s| s.replace("Sigmoid", "Tanh"));
    let bad = dir.path().join("tanh.onnx");
    std::fs::write(&bad, model.encode_to_vec()).expect("write");

    let err = lower_error(&bad);
    common::assert_names_file(
        err,
        &bad,
        &[r#"node "/model/layers.0/mlp/Tanh" (Tanh)"#, "SiLU"],
    );
}

#[test]
fn truncated_onnx_is_an_error_naming_the_file() {
    let dir = temp_dir();
    let (_checkpoint_dir, _, onnx) = tiny_onnx(dir.path());
    let bytes = std::fs::read(&onnx).expect("read");
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let err = lower_error(&cut);
    common::assert_names_file(err, &cut, &["not a readable ONNX model"]);

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").expect("write");
    common::assert_names_file(lower_error(&empty), &empty, &[]);

    let missing = dir.path().join("missing.onnx");
    let err = lower_error(&missing);
    common::assert_names_file(err, &missing, &[]);
}

/// tract panics on an `Unsqueeze` whose axis lies past its input's rank (the `onnx` fuzz target
/// found it): lowering reports it as an error naming the file, and the process goes on.
#[test]
fn a_model_tract_panics_on_is_an_error_naming_the_file() {
    use kiln_compiler::onnx::proto::{
        attribute_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto, NodeProto,
        OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto, FLOAT,
    };
    let tensor = |name: &str, dims: &[i64]| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(FLOAT),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                        })
                        .collect(),
                }),
            })),
        }),
    };
    let model = ModelProto {
        ir_version: Some(6),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(11),
        }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                name: Some("unsqueeze_far".into()),
                op_type: Some("Unsqueeze".into()),
                domain: None,
                attribute: vec![AttributeProto {
                    name: Some("axes".into()),
                    r#type: Some(attribute_type::INTS),
                    ints: vec![9],
                    ..Default::default()
                }],
            }],
            name: Some("g".into()),
            initializer: Vec::new(),
            input: vec![tensor("x", &[2])],
            output: vec![ValueInfoProto {
                name: Some("y".into()),
                r#type: None,
            }],
        }),
        ..Default::default()
    };
    let dir = temp_dir();
    let path = dir.path().join("unsqueeze.onnx");
    std::fs::write(&path, model.encode_to_vec()).expect("write");
    let err = lower_error(&path);
    common::assert_names_file(
        err,
        &path,
        &["not a readable ONNX model", "tract failed on it"],
    );
}

/// A Llama exported by transformers + torch.onnx (`testdata/onnx/hf-tiny-llama`, see its
/// README): kiln's artifact from the lowered graph must give torch's logits.
#[test]
fn transformers_export_lowers_to_torch_logits() {
    let fixture = common::testdata().join("onnx/hf-tiny-llama");
    let onnx = fixture.join("model.onnx");
    let lowered = import_onnx(&onnx).expect("lower");
    let f = &lowered.facts;
    assert_eq!(
        (
            f.layers,
            f.heads,
            f.kv_heads,
            f.head_dim,
            f.intermediate_size
        ),
        (2, 4, 2, 16, 160)
    );
    assert!(!f.tie_word_embeddings);
    let scaling = f.rope_scaling.expect("llama3 scaling recovered");
    assert_eq!(
        (
            f.rope_theta,
            scaling.factor,
            scaling.original_max_position_embeddings
        ),
        (500_000.0, 8.0, 64)
    );
    assert_eq!(f.eog_ids, [1, 2], "<|end_of_text|> and <|eot_id|>");

    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("reference.json")).expect("reference"))
            .expect("reference JSON");
    let steps = Steps {
        prompt_ids: common::ids(&reference["prompt_ids"]),
        next_ids: common::ids(&reference["next_ids"]),
        position_offset: 0,
    };
    // torch's logits of each step's last position.
    let torch: Vec<Vec<f32>> = reference["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|step| {
            let rows = step.as_array().expect("rows");
            let last = rows.last().expect("a row").as_array().expect("row");
            last.iter()
                .map(|v| v.as_f64().expect("logit") as f32)
                .collect()
        })
        .collect();
    let dir = temp_dir();
    let kiln = logits(&compile(&lowered, &dir.path().join("hf.kiln")), &steps);
    let diff = max_abs_diff(&torch, &kiln);
    let spread = torch.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!("transformers export: max |logit| {spread:.3}, kiln vs torch max abs diff {diff:e}");
    assert!(diff <= 1e-4, "kiln vs torch: {diff}");
}

//! The ONNX exporter on tiny random checkpoints (GQA, `llama3` RoPE scaling, head size ≠ hidden
//! size): onnxruntime, tract and an independent numpy forward pass must agree, with inline and
//! with external weights.

mod onnx_common;

use std::path::Path;

use kiln_compiler::graph::{Checkpoint, LayerWeights, LlamaWeights, Tensor};
use kiln_compiler::onnx::{export, ExportOptions, OnnxError};
use kiln_engine::tokenizer::TokenizerData;
use kiln_runtime::model::{Llama3RopeScaling, ModelFacts};
use onnx_common::{
    argmax, max_abs_diff, ort_logits, run_script, script_logits, temp_dir, tract_logits, Steps,
};
use prost::Message;
use tract_onnx::pb;

const VOCAB: usize = 512;
const HIDDEN: usize = 48;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTERMEDIATE: usize = 96;
const LAYERS: usize = 2;
/// onnxruntime and tract (f32) against each other and against the float64 reference.
const TOLERANCE: f32 = 1e-4;

/// SplitMix64: a few lines, deterministic, good enough for test weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A `[rows, cols]` tensor with values of standard deviation `1/sqrt(cols)`, so activations
    /// stay near unit size through the layers.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Tensor {
        let scale = (3.0 / cols as f32).sqrt();
        let values: Vec<f32> = (0..rows * cols).map(|_| self.uniform() * scale).collect();
        Tensor::from_f32(name, vec![rows, cols], &values)
    }

    /// A norm weight near 1.
    fn norm(&mut self, name: &str) -> Tensor {
        let values: Vec<f32> = (0..HIDDEN).map(|_| 1.0 + 0.2 * self.uniform()).collect();
        Tensor::from_f32(name, vec![HIDDEN], &values)
    }
}

fn tokenizer() -> TokenizerData {
    let json = br#"{
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}
    }"#;
    TokenizerData::from_tokenizer_json(json).expect("a two-token tokenizer")
}

/// A random Llama 3.2-shaped checkpoint (Llama 3.2's `rope_scaling` and θ), in the Hugging
/// Face layout.
fn tiny_checkpoint(seed: u64, tied: bool) -> Checkpoint {
    let mut rng = Rng(seed);
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let embed_values: Vec<f32> = (0..VOCAB * HIDDEN).map(|_| rng.uniform()).collect();
    let embed = Tensor::from_f32("token_embd.weight", vec![VOCAB, HIDDEN], &embed_values);
    let layers = (0..LAYERS)
        .map(|i| LayerWeights {
            attn_norm: rng.norm(&format!("blk.{i}.attn_norm.weight")),
            wq: rng.matrix(&format!("blk.{i}.attn_q.weight"), q, HIDDEN),
            wk: rng.matrix(&format!("blk.{i}.attn_k.weight"), kv, HIDDEN),
            wv: rng.matrix(&format!("blk.{i}.attn_v.weight"), kv, HIDDEN),
            wo: rng.matrix(&format!("blk.{i}.attn_output.weight"), HIDDEN, q),
            ffn_norm: rng.norm(&format!("blk.{i}.ffn_norm.weight")),
            w_gate: rng.matrix(&format!("blk.{i}.ffn_gate.weight"), INTERMEDIATE, HIDDEN),
            w_up: rng.matrix(&format!("blk.{i}.ffn_up.weight"), INTERMEDIATE, HIDDEN),
            w_down: rng.matrix(&format!("blk.{i}.ffn_down.weight"), HIDDEN, INTERMEDIATE),
        })
        .collect();
    let final_norm = rng.norm("output_norm.weight");
    let lm_head = (!tied).then(|| rng.matrix("output.weight", VOCAB, HIDDEN));
    Checkpoint {
        facts: ModelFacts {
            name: "kiln-tiny-gqa".into(),
            vocab_size: VOCAB,
            hidden_size: HIDDEN,
            intermediate_size: INTERMEDIATE,
            layers: LAYERS,
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rms_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            context_length: 131_072,
            tie_word_embeddings: tied,
            bos_id: Some(1),
            add_bos: true,
            eog_ids: vec![1, 3],
            chat_template: None,
            sampling: Default::default(),
        },
        tokenizer: tokenizer(),
        weights: LlamaWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        },
    }
}

/// Positions start far enough out that the smoothed and divided llama3 frequencies move the
/// logits well beyond the tolerance, and near enough that f32 angles (position × frequency,
/// rounded as in Hugging Face's and Meta's code) stay within it of the float64 reference.
fn steps() -> Steps {
    Steps {
        prompt_ids: vec![17, 300, 5, 511, 42, 0, 99],
        next_ids: vec![7, 256, 3, 480, 64, 1],
        position_offset: 1000,
    }
}

/// Writes the checkpoint's weights as raw f32 in the Hugging Face layout, with a manifest, for
/// the numpy reference.
fn write_reference_checkpoint(checkpoint: &Checkpoint, dir: &Path) {
    std::fs::create_dir_all(dir).expect("reference dir");
    let w = &checkpoint.weights;
    let mut named: Vec<(String, &Tensor)> = vec![
        ("model.embed_tokens.weight".into(), &w.embed),
        ("model.norm.weight".into(), &w.final_norm),
    ];
    if let Some(head) = &w.lm_head {
        named.push(("lm_head.weight".into(), head));
    }
    for (i, l) in w.layers.iter().enumerate() {
        for (suffix, t) in [
            ("input_layernorm", &l.attn_norm),
            ("self_attn.q_proj", &l.wq),
            ("self_attn.k_proj", &l.wk),
            ("self_attn.v_proj", &l.wv),
            ("self_attn.o_proj", &l.wo),
            ("post_attention_layernorm", &l.ffn_norm),
            ("mlp.gate_proj", &l.w_gate),
            ("mlp.up_proj", &l.w_up),
            ("mlp.down_proj", &l.w_down),
        ] {
            named.push((format!("model.layers.{i}.{suffix}.weight"), t));
        }
    }
    let mut tensors = serde_json::Map::new();
    for (name, t) in named {
        let file = format!("{name}.f32");
        let bytes: Vec<u8> = t.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(&file), bytes).expect("writing a reference tensor");
        tensors.insert(name, serde_json::json!({ "shape": t.shape, "file": file }));
    }
    let f = &checkpoint.facts;
    let scaling = f.rope_scaling.expect("tiny checkpoints use llama3 scaling");
    let manifest = serde_json::json!({
        "config": {
            "heads": f.heads, "kv_heads": f.kv_heads, "head_dim": f.head_dim, "layers": f.layers,
            "rms_eps": f.rms_eps, "rope_theta": f.rope_theta,
            "rope_scaling": {
                "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
            },
        },
        "tensors": tensors,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("writing the manifest");
}

fn decode_model(path: &Path) -> pb::ModelProto {
    pb::ModelProto::decode(std::fs::read(path).expect("reading the model").as_slice())
        .expect("a valid ModelProto")
}

#[test]
fn tiny_model_agrees_with_onnxruntime_tract_and_numpy_reference() {
    let dir = temp_dir();
    let checkpoint = tiny_checkpoint(7, true);
    let model = dir.path().join("model.onnx");
    let report = export(&checkpoint, &model, &ExportOptions::default()).expect("export");
    assert!(!report.external);
    assert!(!dir.path().join("model.onnx.data").exists());
    assert_eq!(
        report.bytes,
        std::fs::metadata(&model).expect("model file").len()
    );

    let steps = steps();
    let steps_path = dir.path().join("steps.json");
    steps.write(&steps_path);
    let reference_dir = dir.path().join("reference");
    write_reference_checkpoint(&checkpoint, &reference_dir);

    let ort = ort_logits(&model, &steps_path, VOCAB);
    let tract = tract_logits(&model, &steps);
    let reference = script_logits(
        "reference",
        "--checkpoint",
        &reference_dir,
        &steps_path,
        VOCAB,
    );
    assert_eq!(ort.len(), 1 + steps.next_ids.len());
    let ort_tract = max_abs_diff(&ort, &tract);
    let ort_ref = max_abs_diff(&ort, &reference);
    let tract_ref = max_abs_diff(&tract, &reference);
    let spread = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!("tiny: max |logit| {spread:.3}; max abs diff ort-tract {ort_tract:e}, ort-numpy {ort_ref:e}, tract-numpy {tract_ref:e}");
    assert!(
        spread > 1.0,
        "logits too small to compare meaningfully: {spread}"
    );
    assert!(ort_tract <= TOLERANCE, "onnxruntime vs tract: {ort_tract}");
    assert!(
        ort_ref <= TOLERANCE,
        "onnxruntime vs numpy reference: {ort_ref}"
    );
    assert!(
        tract_ref <= TOLERANCE,
        "tract vs numpy reference: {tract_ref}"
    );
    for (o, r) in ort.iter().zip(&reference) {
        assert_eq!(argmax(o), argmax(r));
    }

    // Left padding in a batch: pads are never attended to, whatever their position ids.
    let padding: serde_json::Value = serde_json::from_str(&run_script(&[
        "padding",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--steps",
        steps_path.to_str().expect("utf-8 path"),
    ]))
    .expect("padding JSON");
    println!("tiny: padded batch vs rows alone {padding}");
    for key in ["prefill", "decode"] {
        let diff = padding[key].as_f64().expect("a number");
        assert!(
            diff <= f64::from(TOLERANCE),
            "padded batch {key} differs by {diff}"
        );
    }
}

#[test]
fn rope_scaling_changes_the_logits() {
    // Guards the reference comparison above against a checkpoint where scaling is invisible.
    let dir = temp_dir();
    let scaled = tiny_checkpoint(7, true);
    let mut plain = scaled.clone();
    plain.facts.rope_scaling = None;
    let steps = steps();
    let mut rows = Vec::new();
    for (name, checkpoint) in [("scaled.onnx", &scaled), ("plain.onnx", &plain)] {
        let model = dir.path().join(name);
        export(checkpoint, &model, &ExportOptions::default()).expect("export");
        rows.push(tract_logits(&model, &steps));
    }
    let diff = max_abs_diff(&rows[0], &rows[1]);
    println!("tiny: llama3 scaling moves the logits by up to {diff}");
    assert!(
        diff > 100.0 * TOLERANCE,
        "llama3 scaling moved the logits by only {diff}"
    );
}

#[test]
fn external_data_loads_and_gives_identical_logits() {
    let dir = temp_dir();
    let checkpoint = tiny_checkpoint(11, false);
    let inline = dir.path().join("inline.onnx");
    let external = dir.path().join("model.onnx");
    let inline_report =
        export(&checkpoint, &inline, &ExportOptions::default()).expect("inline export");
    let report = export(
        &checkpoint,
        &external,
        &ExportOptions {
            external_data: true,
        },
    )
    .expect("external export");
    assert!(report.external && !inline_report.external);
    assert_eq!(
        (report.nodes, report.initializers),
        (inline_report.nodes, inline_report.initializers)
    );
    let data = dir.path().join("model.onnx.data");
    let model_len = std::fs::metadata(&external).expect("model").len();
    let data_len = std::fs::metadata(&data).expect("external data").len();
    assert_eq!(report.bytes, model_len + data_len);
    assert!(
        model_len < 64 * 1024,
        "weights left inline: {model_len} bytes"
    );

    // Every weight external, 64-byte aligned, inside the file, named relative to the model.
    let proto = decode_model(&external);
    let graph = proto.graph.expect("graph");
    let mut external_count = 0;
    for t in &graph.initializer {
        if t.data_location != Some(pb::tensor_proto::DataLocation::External as i32) {
            assert!(t.raw_data.len() <= 4096, "{} is large and inline", t.name);
            continue;
        }
        external_count += 1;
        let get = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
                .expect("external data entry")
        };
        assert_eq!(get("location"), "model.onnx.data");
        let offset: u64 = get("offset").parse().expect("offset");
        let length: u64 = get("length").parse().expect("length");
        assert_eq!(offset % 64, 0, "{} at unaligned offset {offset}", t.name);
        assert_eq!(length, 4 * t.dims.iter().product::<i64>() as u64);
        assert!(offset + length <= data_len);
        assert!(t.raw_data.is_empty());
    }
    assert_eq!(external_count, 3 + 9 * LAYERS);

    let steps = steps();
    let steps_path = dir.path().join("steps.json");
    steps.write(&steps_path);
    let from_inline = ort_logits(&inline, &steps_path, VOCAB);
    let from_external = ort_logits(&external, &steps_path, VOCAB);
    assert_eq!(
        from_inline, from_external,
        "onnxruntime gives different logits with external data"
    );
    let tract = tract_logits(&external, &steps);
    let diff = max_abs_diff(&from_external, &tract);
    println!("tiny external data: onnxruntime inline vs external identical; ort-tract {diff:e}");
    assert!(
        diff <= TOLERANCE,
        "tract on external data vs onnxruntime: {diff}"
    );
}

#[test]
fn graph_is_standard_opset_17_with_the_ecosystem_interface() {
    let dir = temp_dir();
    let checkpoint = tiny_checkpoint(3, true);
    let model = dir.path().join("model.onnx");
    let report = export(&checkpoint, &model, &ExportOptions::default()).expect("export");
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, ["model.onnx"], "temporary files left behind");

    let proto = decode_model(&model);
    assert_eq!(proto.opset_import.len(), 1);
    assert_eq!(
        (
            proto.opset_import[0].domain.as_str(),
            proto.opset_import[0].version
        ),
        ("", 17)
    );
    let meta = |key: &str| {
        proto
            .metadata_props
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    assert_eq!(meta("kiln.version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(meta("model.name"), Some("kiln-tiny-gqa"));
    assert_eq!(meta("model.context_length"), Some("131072"));
    assert_eq!(meta("model.eos_token_ids"), Some("1,3"));

    let graph = proto.graph.expect("graph");
    assert_eq!(graph.node.len(), report.nodes);
    assert_eq!(graph.initializer.len(), report.initializers);
    assert!(
        graph.node.iter().all(|n| n.domain.is_empty()),
        "a node outside ai.onnx"
    );
    let dims = |v: &pb::ValueInfoProto| -> Vec<String> {
        let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.clone())
        else {
            panic!("{} is not a tensor", v.name)
        };
        t.shape
            .expect("shape")
            .dim
            .into_iter()
            .map(|d| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) => n.to_string(),
                Some(pb::tensor_shape_proto::dimension::Value::DimParam(s)) => s,
                None => "?".into(),
            })
            .collect()
    };
    let io: Vec<(String, Vec<String>)> = graph
        .input
        .iter()
        .chain(&graph.output)
        .map(|v| (v.name.clone(), dims(v)))
        .collect();
    let expect = |name: &str, d: &[&str]| {
        (
            name.to_owned(),
            d.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        io[0],
        expect("input_ids", &["batch_size", "sequence_length"])
    );
    assert_eq!(
        io[1],
        expect("attention_mask", &["batch_size", "total_sequence_length"])
    );
    assert_eq!(
        io[2],
        expect("position_ids", &["batch_size", "sequence_length"])
    );
    assert_eq!(
        io[3],
        expect(
            "past_key_values.0.key",
            &["batch_size", "2", "past_sequence_length", "16"]
        )
    );
    assert_eq!(
        io[4],
        expect(
            "past_key_values.0.value",
            &["batch_size", "2", "past_sequence_length", "16"]
        )
    );
    let outputs = 3 + 2 * LAYERS;
    assert_eq!(
        io[outputs],
        expect("logits", &["batch_size", "sequence_length", "512"])
    );
    assert_eq!(
        io[outputs + 1],
        expect(
            "present.0.key",
            &["batch_size", "2", "total_sequence_length", "16"]
        )
    );
    assert_eq!(io.len(), 4 + 4 * LAYERS);

    // Tied: the embedding table is stored once and transposed in the graph.
    let tables = graph
        .initializer
        .iter()
        .filter(|t| t.dims.iter().product::<i64>() == (VOCAB * HIDDEN) as i64);
    assert_eq!(tables.count(), 1);
    assert!(graph
        .node
        .iter()
        .any(|n| n.op_type == "Transpose" && n.input == ["model.embed_tokens.weight"]));
}

#[test]
fn bad_checkpoints_and_paths_are_errors_naming_the_file() {
    let dir = temp_dir();
    let mut checkpoint = tiny_checkpoint(5, true);
    checkpoint.weights.layers[1].wk =
        Tensor::from_f32("blk.1.attn_k.weight", vec![8, HIDDEN], &[0.0; 8 * HIDDEN]);
    let model = dir.path().join("model.onnx");
    let err = export(&checkpoint, &model, &ExportOptions::default()).expect_err("a wrong shape");
    assert!(matches!(err, OnnxError::Checkpoint { .. }));
    let message = err.to_string();
    assert!(
        message.contains("model.onnx") && message.contains("blk.1.attn_k.weight"),
        "{message}"
    );

    let mut short = tiny_checkpoint(5, true);
    short.weights.final_norm.data.truncate(10);
    let err = export(&short, &model, &ExportOptions::default()).expect_err("truncated data");
    assert!(err.to_string().contains("output_norm.weight"), "{err}");

    let mut gqa = tiny_checkpoint(5, true);
    gqa.facts.kv_heads = 3;
    assert!(export(&gqa, &model, &ExportOptions::default()).is_err());

    let missing = dir.path().join("no-such-dir").join("model.onnx");
    let err = export(
        &tiny_checkpoint(5, true),
        &missing,
        &ExportOptions::default(),
    )
    .expect_err("missing dir");
    assert!(matches!(err, OnnxError::Io { .. }));
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "files left after failed exports"
    );
}

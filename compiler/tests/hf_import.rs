//! Importing Hugging Face checkpoints: the tiny Llama 3.2-shaped one, its sharded form, token
//! policy variants, and RoPE frequencies against Meta's own `apply_scaling`.

mod hf_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use hf_support::{llama_models, read_raw, tiny_checkpoint, write_raw, Raw};
use kiln_compiler::graph::Checkpoint;
use kiln_compiler::import::{self, hf};
use kiln_engine::tokenizer::Tokenizer;
use kiln_runtime::model::{Llama3RopeScaling, ModelFacts, SamplingDefaults};
use kiln_runtime::quant::Format;
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

const LLAMA_3_2_TEMPLATE: &str = include_str!("../../testdata/chat/llama-3.2-instruct.jinja");

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/hf")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

#[test]
fn tiny_checkpoint_facts() {
    let dir = tiny_checkpoint(1);
    let ckpt = import::import(dir.path()).unwrap();
    let expected = ModelFacts {
        name: "kiln-tiny-llama3".into(),
        vocab_size: 128_256,
        hidden_size: 64,
        intermediate_size: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rms_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: Some(Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        context_length: 131_072,
        tie_word_embeddings: true,
        bos_id: Some(128_000),
        add_bos: true,
        // <|end_of_text|>, <|eom_id|>, <|eot_id|>
        eog_ids: vec![128_001, 128_008, 128_009],
        chat_template: Some(LLAMA_3_2_TEMPLATE.to_owned()),
        // Llama 3.2 Instruct's generation_config.json, which the tiny checkpoint copies.
        sampling: SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..SamplingDefaults::default()
        },
    };
    assert_eq!(ckpt.facts, expected);
    assert_eq!(ckpt.tokenizer.vocab_size(), 128_256);
    assert_eq!(ckpt.tokenizer.bos_id(), Some(128_000));
    assert_eq!(ckpt.tokenizer.eos_id(), Some(128_001));
}

#[test]
fn tiny_checkpoint_shapes() {
    let dir = tiny_checkpoint(2);
    let w = import::import(dir.path()).unwrap().weights;
    let shape = |t: &kiln_compiler::graph::Tensor| (t.name.clone(), t.shape.clone());
    assert_eq!(
        shape(&w.embed),
        ("model.embed_tokens.weight".into(), vec![128_256, 64])
    );
    assert_eq!(shape(&w.final_norm), ("model.norm.weight".into(), vec![64]));
    assert!(
        w.lm_head.is_none(),
        "tied: the output projection is the embedding"
    );
    assert_eq!(w.layers.len(), 2);
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        let expected = [
            ("input_layernorm", vec![64]),
            ("self_attn.q_proj", vec![64, 64]),
            ("self_attn.k_proj", vec![32, 64]),
            ("self_attn.v_proj", vec![32, 64]),
            ("self_attn.o_proj", vec![64, 64]),
            ("post_attention_layernorm", vec![64]),
            ("mlp.gate_proj", vec![128, 64]),
            ("mlp.up_proj", vec![128, 64]),
            ("mlp.down_proj", vec![64, 128]),
        ];
        for (t, (name, dims)) in l.tensors().iter().zip(expected) {
            assert_eq!(shape(t), (format!("{p}{name}.weight"), dims));
        }
    }
    for t in w.tensors() {
        assert_eq!(t.format, Format::F32, "{}", t.name);
        assert_eq!(
            t.data.len(),
            4 * t.shape.iter().product::<usize>(),
            "{}",
            t.name
        );
    }
}

/// Every imported value is its bf16 value widened, bit for bit; norms are near 1, matrices
/// near 0.02 standard deviation.
#[test]
fn bf16_weights_widen_exactly() {
    let dir = tiny_checkpoint(3);
    let ckpt = import::import(dir.path()).unwrap();
    let raw = read_raw(&dir.path().join("model.safetensors"));
    assert_eq!(raw.len(), ckpt.weights.tensors().len());
    for t in ckpt.weights.tensors() {
        let r = raw.iter().find(|r| r.name == t.name).unwrap();
        assert_eq!(r.dtype, Dtype::BF16);
        let widened: Vec<u8> = r
            .data
            .chunks_exact(2)
            .flat_map(|b| (u32::from(u16::from_le_bytes([b[0], b[1]])) << 16).to_le_bytes())
            .collect();
        assert!(widened == t.data, "{} differs from its bf16 source", t.name);
    }
    let values = ckpt.weights.embed.to_f32_vec();
    let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.001, "embedding std {std}");
    let norm = ckpt.weights.final_norm.to_f32_vec();
    assert!(norm.iter().all(|v| (v - 1.0).abs() < 0.2), "{norm:?}");
}

#[test]
fn f16_and_f32_weights_widen_exactly() {
    let dir = tiny_checkpoint(4);
    let path = dir.path().join("model.safetensors");
    let mut raw = read_raw(&path);
    let bf16_values = |r: &Raw| -> Vec<f32> {
        r.data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    };
    let mut expected = Vec::new();
    for r in &mut raw {
        let values = bf16_values(r);
        if r.name.starts_with("model.layers.0.") {
            // f16 holds these values exactly except for rare subnormal underflow, which the
            // comparison below sidesteps by reading back what was written.
            r.data = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            r.dtype = Dtype::F16;
            let written = r
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]));
            expected.push((r.name.clone(), written.map(f16::to_f32).collect::<Vec<_>>()));
        } else if r.name.starts_with("model.layers.1.") {
            r.data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            r.dtype = Dtype::F32;
            expected.push((r.name.clone(), values));
        }
    }
    write_raw(&path, &raw);
    let ckpt = import::import(dir.path()).unwrap();
    assert_eq!(expected.len(), 18);
    for (name, values) in expected {
        let t = ckpt
            .weights
            .tensors()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap();
        let got = t.to_f32_vec();
        assert!(
            got.iter()
                .map(|v| v.to_bits())
                .eq(values.iter().map(|v| v.to_bits())),
            "{name}"
        );
    }
}

#[test]
fn same_seed_same_bytes_and_writes_are_atomic() {
    let (a, b, c) = (tiny_checkpoint(5), tiny_checkpoint(5), tiny_checkpoint(6));
    let files = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let mut listed: Vec<String> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, files, "no temporary files are left behind");
    for f in files {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(f)).unwrap();
        assert!(
            read(&a) == read(&b),
            "{f} differs between two runs with seed 5"
        );
        assert_eq!(
            read(&a) == read(&c),
            f != "model.safetensors",
            "{f} with seeds 5 and 6"
        );
    }
}

/// Splits the tiny checkpoint into two shards and an index, as `save_pretrained` does.
#[test]
fn sharded_checkpoint_imports_identically() {
    let dir = tiny_checkpoint(7);
    let single = import::import(dir.path()).unwrap();

    let path = dir.path().join("model.safetensors");
    let raw = read_raw(&path);
    let (first, second): (Vec<Raw>, Vec<Raw>) = raw
        .into_iter()
        .partition(|r| r.name.starts_with("model.embed") || r.name.contains(".0."));
    assert!(!first.is_empty() && !second.is_empty());
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (shard, name) in [&first, &second].into_iter().zip(names) {
        write_raw(&dir.path().join(name), shard);
        for r in shard {
            weight_map.insert(r.name.clone(), json!(name));
        }
    }
    let total: usize = first.iter().chain(&second).map(|r| r.data.len()).sum();
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &json!({ "metadata": { "total_size": total }, "weight_map": weight_map }),
    );
    std::fs::remove_file(&path).unwrap();

    let sharded = import::import(dir.path()).unwrap();
    assert_eq!(sharded.facts, single.facts);
    assert_eq!(sharded.weights.tensors(), single.weights.tensors());
}

/// Without the post-processor's BOS, only `add_bos_token` turns BOS on; named chat templates
/// resolve to `default`.
#[test]
fn bos_policy_and_named_chat_templates() {
    let dir = tiny_checkpoint(8);
    let tokenizer_json = dir.path().join("tokenizer.json");
    let mut tj = read_json(&tokenizer_json);
    tj["post_processor"] = Value::Null;
    write_json(&tokenizer_json, &tj);
    assert!(!import::import(dir.path()).unwrap().facts.add_bos);

    let tokenizer_config = dir.path().join("tokenizer_config.json");
    let mut tc = read_json(&tokenizer_config);
    tc["add_bos_token"] = json!(true);
    tc["chat_template"] = json!([
        { "name": "tool_use", "template": "tools" },
        { "name": "default", "template": "plain" },
    ]);
    write_json(&tokenizer_config, &tc);
    let facts = import::import(dir.path()).unwrap().facts;
    assert!(facts.add_bos);
    assert_eq!(facts.chat_template.as_deref(), Some("plain"));
}

/// Meta's download layout: no `tokenizer.json`, the tiktoken model under `original/`.
#[test]
fn tiktoken_tokenizer_model_is_read_when_there_is_no_tokenizer_json() {
    let dir = tiny_checkpoint(9);
    let from_json: Checkpoint = import::import(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    std::fs::create_dir(dir.path().join("original")).unwrap();
    std::fs::copy(
        llama_models().join("llama3/tokenizer.model"),
        dir.path().join("original/tokenizer.model"),
    )
    .unwrap();
    let from_tiktoken = import::import(dir.path()).unwrap();
    assert_eq!(from_tiktoken.facts, from_json.facts);
    let text = "<|start_header_id|>user<|end_header_id|>\n\nHello, kiln! 1234 ünïcode<|eot_id|>";
    let encode = |c: &Checkpoint| Tokenizer::new(&c.tokenizer).unwrap().encode(text, true);
    assert_eq!(encode(&from_tiktoken), encode(&from_json));
}

/// Meta's frequencies, from `testdata/hf/meta_rope.py`: `(constants Meta hard-codes, inv_freq)`.
fn meta_inv_freq(facts: &ModelFacts) -> (Value, Vec<f64>) {
    let python = std::env::var_os("KILN_PYTHON").unwrap_or_else(|| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(testdata("meta_rope.py"))
        .arg("--llama-models")
        .arg(llama_models())
        .args(["--head-dim", &facts.head_dim.to_string()])
        .args(["--theta", &facts.rope_theta.to_string()]);
    if let Some(s) = &facts.rope_scaling {
        cmd.args(["--factor", &s.factor.to_string()])
            .args(["--low-freq-factor", &s.low_freq_factor.to_string()])
            .args(["--high-freq-factor", &s.high_freq_factor.to_string()])
            .args([
                "--original-max-position-embeddings",
                &s.original_max_position_embeddings.to_string(),
            ]);
    }
    let out = cmd
        .output()
        .expect("python runs (set KILN_PYTHON to choose one)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let freqs = v["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (v["meta_constants"].clone(), freqs)
}

fn assert_rope_matches_meta(label: &str, facts: &ModelFacts) -> Value {
    let (constants, meta) = meta_inv_freq(facts);
    let ours = facts.rope_inv_freq();
    assert_eq!(ours.len(), facts.head_dim / 2);
    assert_eq!(meta.len(), ours.len());
    for (i, (&o, &m)) in ours.iter().zip(&meta).enumerate() {
        let rel = (f64::from(o) - m).abs() / m.abs();
        assert!(
            rel <= 1e-6,
            "{label}: pair {i}: kiln {o:e}, Meta {m:e}, rel {rel:e}"
        );
    }
    constants
}

#[test]
fn rope_frequencies_match_meta_apply_scaling() {
    let dir = tiny_checkpoint(10);
    assert_rope_matches_meta("tiny", &import::import(dir.path()).unwrap().facts);

    let cases = [
        ("llama-3.2-1b-instruct.config.json", 64, 32.0),
        ("llama-3.2-3b-instruct.config.json", 128, 32.0),
        ("llama-3.1-8b-instruct.config.json", 128, 8.0),
    ];
    for (file, head_dim, factor) in cases {
        let facts = hf::config_facts(&testdata(file)).unwrap();
        assert_eq!(facts.head_dim, head_dim, "{file}");
        assert_eq!(facts.rope_theta, 500_000.0, "{file}");
        assert_eq!(facts.rope_scaling.map(|s| s.factor), Some(factor), "{file}");
        let constants = assert_rope_matches_meta(file, &facts);
        if factor == 8.0 {
            // Meta's reference code hard-codes Llama 3.1's scaling; 3.1's config agrees with it.
            let meta = json!({"scale_factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                              "old_context_len": 8192});
            assert_eq!(constants, meta);
        }
    }
    // Without scaling the same code path gives the plain RoPE frequencies.
    let mut plain = hf::config_facts(&testdata("llama-3.1-8b-instruct.config.json")).unwrap();
    plain.rope_scaling = None;
    assert_rope_matches_meta("unscaled", &plain);
}

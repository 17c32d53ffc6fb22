//! Starting inputs for the fuzz targets whose corpus is still empty: small valid files of each
//! format (a tiny Llama GGUF, a tiny Hugging Face checkpoint, the ONNX test decoder), requests
//! a client sends, and the structured-output schemas of the tests, so that mutations start
//! deep inside each parser instead of at its first magic-number check.

use std::path::Path;

use anyhow::Context;
use kiln_compiler::gguf_write::{self, GgufTensor};
use kiln_compiler::import::gguf::Value;
use kiln_runtime::quant::Format;
use safetensors::tensor::{Dtype, TensorView};

/// The tiny Llama the file seeds describe: one layer, 16 wide, 2 heads of 8 sharing one KV
/// head, an FFN of 32.
const HIDDEN: usize = 16;
const HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 32;
/// The vocabulary of `testdata/onnx/hf-tiny-llama/tokenizer.json`, which the HF seed uses.
const HF_VOCAB: usize = 320;
/// The GGUF seed's own vocabulary: single letters.
const GGUF_VOCAB: usize = 16;

/// Writes `target`'s seeds into `corpus` (which exists and is empty); returns how many.
pub fn write(target: &str, corpus: &Path, repo: &Path) -> anyhow::Result<usize> {
    let seeds: Vec<(String, Vec<u8>)> = match target {
        "gguf" => vec![("tiny-llama".into(), tiny_gguf(corpus)?)],
        "hf_checkpoint" => vec![("tiny-llama".into(), tiny_hf()?)],
        "onnx" => vec![(
            "hf-tiny-llama".into(),
            read(&repo.join("testdata/onnx/hf-tiny-llama/model.onnx"))?,
        )],
        "tokenizer_json" => vec![(
            "hf-tiny-llama".into(),
            read(&repo.join("testdata/onnx/hf-tiny-llama/tokenizer.json"))?,
        )],
        "json_schema" => schemas(repo)?,
        "http" => requests(),
        "chat_request" => requests()
            .into_iter()
            .filter_map(|(name, r)| {
                let body = r.split(|&b| b == b'\n').next_back()?.to_vec();
                (body.starts_with(b"{\"messages\"")).then_some((name, body))
            })
            .collect(),
        _ => Vec::new(),
    };
    for (name, bytes) in &seeds {
        std::fs::write(corpus.join(name), bytes)
            .with_context(|| format!("writing the seed {}", corpus.join(name).display()))?;
    }
    Ok(seeds.len())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Small deterministic weights for a tensor of `n` values.
fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect()
}

/// The tensors of the tiny Llama, named by `name(layer part)`, shapes outermost first.
fn tensors(vocab: usize) -> Vec<(&'static str, Vec<usize>)> {
    let (q, kv) = (HEADS * HEAD_DIM, HEAD_DIM);
    vec![
        ("embed", vec![vocab, HIDDEN]),
        ("attn_norm", vec![HIDDEN]),
        ("q", vec![q, HIDDEN]),
        ("k", vec![kv, HIDDEN]),
        ("v", vec![kv, HIDDEN]),
        ("o", vec![HIDDEN, q]),
        ("ffn_norm", vec![HIDDEN]),
        ("gate", vec![FFN, HIDDEN]),
        ("up", vec![FFN, HIDDEN]),
        ("down", vec![HIDDEN, FFN]),
        ("norm", vec![HIDDEN]),
    ]
}

/// A GGUF v3 Llama of f32 weights and a letter vocabulary, written by kiln's GGUF writer.
fn tiny_gguf(scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let gguf_name = |part: &str| match part {
        "embed" => "token_embd.weight".to_owned(),
        "norm" => "output_norm.weight".to_owned(),
        p => {
            let short = match p {
                "q" => "attn_q",
                "k" => "attn_k",
                "v" => "attn_v",
                "o" => "attn_output",
                "gate" => "ffn_gate",
                "up" => "ffn_up",
                "down" => "ffn_down",
                other => other,
            };
            format!("blk.0.{short}.weight")
        }
    };
    let tensors: Vec<GgufTensor> = tensors(GGUF_VOCAB)
        .into_iter()
        .map(|(part, shape)| {
            let values = weights(shape.iter().product());
            GgufTensor {
                name: gguf_name(part),
                shape,
                format: Format::F32,
                bytes: Box::new(move |out| {
                    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    out.write_all(&bytes)
                }),
            }
        })
        .collect();
    let u = |v: usize| Value::U32(v as u32);
    let letters = (b'a'..)
        .take(GGUF_VOCAB)
        .map(|c| Value::String((c as char).to_string()))
        .collect();
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("kiln fuzz seed".into())),
        ("llama.context_length", u(64)),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FFN)),
        ("llama.block_count", u(1)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", Value::Array(letters)),
        ("tokenizer.ggml.eos_token_id", u(1)),
    ];
    let path = scratch.join(".tiny-llama.gguf");
    gguf_write::write(&path, &metadata, &tensors, |_| {})
        .with_context(|| format!("writing {}", path.display()))?;
    let bytes = read(&path)?;
    std::fs::remove_file(&path)?;
    Ok(bytes)
}

/// The Hugging Face seed: the 4-byte length of `config.json`, `config.json`, then
/// `model.safetensors` (f32), as the `hf_checkpoint` target splits its input.
fn tiny_hf() -> anyhow::Result<Vec<u8>> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": HF_VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 1,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "max_position_embeddings": 64,
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": [1, 2],
    });
    let hf_name = |part: &str| match part {
        "embed" => "model.embed_tokens.weight".to_owned(),
        "norm" => "model.norm.weight".to_owned(),
        p => {
            let short = match p {
                "attn_norm" => "input_layernorm",
                "q" => "self_attn.q_proj",
                "k" => "self_attn.k_proj",
                "v" => "self_attn.v_proj",
                "o" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "gate" => "mlp.gate_proj",
                "up" => "mlp.up_proj",
                "down" => "mlp.down_proj",
                other => other,
            };
            format!("model.layers.0.{short}.weight")
        }
    };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors(HF_VOCAB)
        .into_iter()
        .map(|(part, shape)| {
            let bytes = weights(shape.iter().product())
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (hf_name(part), shape, bytes)
        })
        .collect();
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = safetensors::serialize(views, None)?;
    let config = serde_json::to_vec(&config)?;
    let mut seed = (config.len() as u32).to_le_bytes().to_vec();
    seed.extend_from_slice(&config);
    seed.extend_from_slice(&weights);
    Ok(seed)
}

/// The test schemas (`testdata/structured/schemas.json`) as `json_schema` inputs (kind byte 0),
/// plus a Lark grammar (1) and a regular expression (2).
fn schemas(repo: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = repo.join("testdata/structured/schemas.json");
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&read(&path)?)?;
    let mut seeds: Vec<(String, Vec<u8>)> = cases
        .iter()
        .filter_map(|case| {
            let name = case["name"].as_str()?;
            let mut bytes = vec![0u8];
            bytes.extend(serde_json::to_vec(&case["schema"]).ok()?);
            Some((format!("schema-{name}"), bytes))
        })
        .collect();
    seeds.push((
        "lark-list".into(),
        [
            &[1u8][..],
            br#"start: "[" item ("," item)* "]"
item: /[a-z]+/ | NUMBER
%import common.NUMBER"#,
        ]
        .concat(),
    ));
    seeds.push((
        "regex-date".into(),
        [&[2u8][..], br"\d{4}-\d{2}-\d{2}( [A-Z][a-z]+)?"].concat(),
    ));
    Ok(seeds)
}

/// Requests a client sends `kiln serve`: each the whole bytes of one connection.
fn requests() -> Vec<(String, Vec<u8>)> {
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    vec![
        (
            "health".into(),
            b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        (
            "preflight".into(),
            b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n\r\n".to_vec(),
        ),
        (
            "completion".into(),
            post(
                "/v1/completions",
                r#"{"prompt":"The capital of France is","max_tokens":3,"temperature":0,"logprobs":2,"stop":["\n"]}"#,
            ),
        ),
        (
            "chat-stream".into(),
            post(
                "/v1/chat/completions",
                r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":2,"seed":7}"#,
            ),
        ),
        (
            "chat-schema".into(),
            post(
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"A person?"}],"response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","properties":{"age":{"type":"integer"}},"required":["age"]}}},"max_tokens":4}"#,
            ),
        ),
        (
            "chat-tools".into(),
            post(
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"Weather in Paris?"}],"tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],"tool_choice":"required","max_tokens":4}"#,
            ),
        ),
        (
            "chunked".into(),
            b"POST /completion HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\n{\"prompt\":\"Hi\",\"n_predict\"\r\n4\r\n:2}\n\r\n0\r\n\r\n".to_vec(),
        ),
    ]
}

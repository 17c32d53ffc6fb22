//! The default model against llama.cpp's own outputs (`testdata/golden`, made with llama.cpp
//! build 0c1e57098): greedy ids on the dequantized model, first-step logits on `q4_1`, perplexity.

mod common;

use kiln_engine::generate::{generate, GenerateOptions, Model, StopReason};
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};

fn opts() -> SessionOptions {
    SessionOptions {
        threads: 2,
        ..SessionOptions::default()
    }
}

#[test]
fn f32_greedy_ids_match_llama_cpp() {
    let model = Model::open(&common::smollm2_artifact(Format::F32)).expect("open");
    for case in common::golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
    {
        let name = case["name"].as_str().expect("name");
        let prompt_ids = common::ids(&case["prompt_ids"]);
        assert_eq!(
            model.encode_prompt(case["prompt"].as_str().expect("prompt"), true),
            prompt_ids,
            "{name}: prompt tokenization"
        );
        let mut expected = common::ids(&case["F32"]["generated_ids"]);
        // llama.cpp lists the end-of-generation id it stopped at; kiln reports it as the stop reason.
        let stopped = expected
            .last()
            .is_some_and(|id| model.facts().eog_ids.contains(id));
        if stopped {
            expected.pop();
        }
        let mut session = model.session(opts()).expect("session");
        let mut sampler = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
        let out = generate(
            &model,
            &mut session,
            &mut sampler,
            &prompt_ids,
            &GenerateOptions {
                max_tokens: 32,
                stop: vec![],
                cancel: None,
                top_logprobs: None,
            },
            |_| {},
        )
        .expect("generate");
        let n = expected.len().min(32);
        assert_eq!(
            out.ids[..n.min(out.ids.len())],
            expected[..n],
            "{name}: greedy ids"
        );
        if stopped && expected.len() < 32 {
            assert_eq!(out.ids.len(), expected.len(), "{name}: stop position");
            assert_eq!(out.stop, StopReason::EndOfGeneration, "{name}: stop reason");
        }
    }
}

#[test]
fn q4_1_first_step_logits_match_llama_cpp() {
    let model = Model::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    for case in common::golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
    {
        let name = case["name"].as_str().expect("name");
        let mut session = model.session(opts()).expect("session");
        let logits = session
            .forward(&common::ids(&case["prompt_ids"]))
            .expect("forward")
            .to_vec();
        let top1 = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("logits");
        let theirs: Vec<(usize, f32)> = case["Q4_1"]["first_step_top10"]
            .as_array()
            .expect("top10")
            .iter()
            .map(|e| {
                (
                    e["id"].as_u64().expect("id") as usize,
                    e["logit"].as_f64().expect("logit") as f32,
                )
            })
            .collect();
        assert_eq!(top1, theirs[0].0, "{name}: top-1");
        let gaps: Vec<f32> = theirs
            .iter()
            .map(|&(id, want)| (logits[id] - want).abs())
            .collect();
        let mean = gaps.iter().sum::<f32>() / gaps.len() as f32;
        let max = gaps.iter().copied().fold(0f32, f32::max);
        println!("{name}: q4_1 top-10 logits vs llama.cpp: mean gap {mean:.3}, max gap {max:.3}");
        assert!(
            mean <= 0.3,
            "{name}: mean gap {mean} over llama.cpp's top-10 logits"
        );
    }
}

#[test]
fn f32_perplexity_within_1_percent_of_llama_cpp() {
    common::check_perplexity(Format::F32, "F32");
}

#[test]
fn q4_1_perplexity_within_1_percent_of_llama_cpp() {
    common::check_perplexity(Format::Q4_1, "Q4_1");
}

/// What `kiln chat` relies on between turns: running a prompt in two parts over the KV cache
/// (with a rewind in between, as when a turn's rendering shares a prefix) gives the logits of
/// running it whole.
#[test]
fn kv_cache_reuse_gives_the_logits_of_a_fresh_prefill() {
    let model = Model::open(&common::smollm2_artifact(Format::F32)).expect("open");
    let chat = &common::golden()["greedy"]["cases"][2];
    let prompt = common::ids(&chat["prompt_ids"]);
    let mut fresh = model.session(opts()).expect("session");
    let whole = fresh.forward(&prompt).expect("forward").to_vec();
    let mut reused = model.session(opts()).expect("session");
    let split = prompt.len() / 2;
    reused.forward(&prompt[..split + 3]).expect("first part");
    reused.rewind(split);
    let parts = reused
        .forward(&prompt[split..])
        .expect("second part")
        .to_vec();
    let diff = whole
        .iter()
        .zip(&parts)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-3, "max logit difference {diff}");
}

/// `--quant q4_1` keeps llama.cpp's blocks bit for bit: every matrix of the artifact holds the
/// GGUF's bytes (query/key rows only reordered whole, to undo the converter's permutation).
#[test]
fn q4_1_artifact_keeps_the_gguf_blocks_bit_exact() {
    let gguf = kiln_compiler::import::gguf::GgufFile::open(&common::smollm2_gguf()).expect("gguf");
    let artifact = kiln_runtime::artifact::Artifact::open(&common::smollm2_artifact(Format::Q4_1))
        .expect("artifact");
    let mut compared = 0;
    for entry in &artifact.meta().tensors {
        let Some(info) = gguf.tensors.get(&entry.name) else {
            continue;
        };
        if entry.shape.len() != 2 {
            continue;
        }
        let ours = artifact.tensor(entry);
        let theirs = gguf.tensor_bytes(info);
        assert_eq!(entry.format, info.format, "{}", entry.name);
        if entry.name.contains("attn_q") || entry.name.contains("attn_k") {
            let mut a: Vec<&[u8]> = ours.chunks(ours.len() / entry.rows()).collect();
            let mut b: Vec<&[u8]> = theirs.chunks(theirs.len() / entry.rows()).collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{}: the same rows", entry.name);
        } else {
            assert_eq!(ours, theirs, "{}", entry.name);
        }
        compared += 1;
    }
    assert_eq!(compared, 1 + 30 * 7, "token_embd and 7 matrices per layer");
}

//! Prompt snapshots (`kiln_engine::snapshot`): a conversation's start saved with its KV cache
//! and loaded into a fresh session answers exactly as if it had run (the reference kernels
//! compute a token alike in a batch or alone, so the two must agree id for id); a snapshot is
//! refused, by name, for another artifact, another cache type, a context too short, a wrong
//! version or damaged bytes; `kiln chat --prompt-cache` and `kiln serve --prompt-cache` load
//! what an earlier process saved.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::serve::{post, start_with};
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateOptions, Model};
use kiln_engine::snapshot::SnapshotError;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::kernels::{Kernels, Level};
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};
use serde_json::json;

/// A system prompt long enough that loading it beats computing it.
fn system_prompt() -> String {
    let rules: Vec<String> = (0..12)
        .map(|i| format!("Rule {i}: answer briefly and never invent measurements."))
        .collect();
    format!(
        "You are the assistant of a pair of smart glasses. {}",
        rules.join(" ")
    )
}

fn options(kv_type: KvType, context: usize) -> SessionOptions {
    SessionOptions {
        context,
        kv_type,
        kernels: Some(Kernels::for_level(Level::Generic).expect("the reference kernels")),
        ..SessionOptions::default()
    }
}

fn conversation(model: &Model, kv_type: KvType, context: usize) -> Conversation<'_> {
    Conversation::new(
        model,
        model.decoder(options(kv_type, context)).expect("decoder"),
    )
}

/// Greedy ids after `prompt`.
fn answer(c: &mut Conversation<'_>, model: &Model, prompt: &[u32]) -> Vec<u32> {
    let mut greedy = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
    let opts = GenerateOptions {
        max_tokens: 12,
        stop: Vec::new(),
        cancel: None,
        top_logprobs: None,
    };
    c.generate(prompt, &mut greedy, &opts, |_| {})
        .expect("generate")
        .ids
}

#[test]
fn a_loaded_snapshot_answers_as_the_computed_prefix_does() {
    let model = Model::open(&common::smollm2_artifact(Format::Q8_0)).expect("open");
    let prefix = model.encode_prompt(&system_prompt(), false);
    let mut prompt = prefix.clone();
    prompt.extend(model.encode_prompt(" Question: what is the capital of France? Answer:", false));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("start.kilnsnap");

    let mut saver = conversation(&model, KvType::F16, 512);
    saver.prefill(&prefix).expect("prefill");
    saver.save_snapshot(&path).expect("save");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["start.kilnsnap"], "no temporary file left behind");

    let mut loaded = conversation(&model, KvType::F16, 512);
    assert_eq!(loaded.load_snapshot(&path).expect("load"), prefix.len());
    assert_eq!(loaded.cached(), prefix.as_slice());
    let resumed = answer(&mut loaded, &model, &prompt);
    assert_eq!(
        loaded.reused(),
        prefix.len(),
        "the prefix came from the snapshot"
    );

    let mut fresh = conversation(&model, KvType::F16, 512);
    assert_eq!(resumed, answer(&mut fresh, &model, &prompt));
    assert_eq!(fresh.reused(), 0);
}

/// Loads `path` into a fresh conversation: the error, and that nothing stayed cached.
fn refusal(model: &Model, kv_type: KvType, context: usize, path: &Path) -> String {
    let mut c = conversation(model, kv_type, context);
    let err = c.load_snapshot(path).expect_err("refused");
    assert!(c.cached().is_empty(), "{err}");
    err.to_string()
}

#[test]
fn snapshots_for_something_else_or_damaged_are_refused_by_name() {
    let model = Model::open(&common::smollm2_artifact(Format::Q8_0)).expect("open");
    let other = Model::open(&common::smollm2_artifact(Format::Q4_0)).expect("open");
    let prefix = model.encode_prompt(&system_prompt(), false);
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.kilnsnap");
    let mut saver = conversation(&model, KvType::F16, 512);
    saver.prefill(&prefix).expect("prefill");
    saver.save_snapshot(&good).expect("save");
    let bytes = std::fs::read(&good).expect("read");
    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        edit(&mut b);
        let path = dir.path().join(name);
        std::fs::write(&path, b).expect("write");
        path
    };
    let crc = |b: &mut Vec<u8>| {
        let n = b.len() - 4;
        let c = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
    };
    let cases: Vec<(String, &[&str])> = vec![
        (
            refusal(&other, KvType::F16, 512, &good),
            &["good.kilnsnap", "another artifact"],
        ),
        (
            refusal(&model, KvType::F32, 512, &good),
            &["f16 KV cache", "f32"],
        ),
        (
            refusal(&model, KvType::F16, 16, &good),
            &["16-token context"],
        ),
        (
            refusal(
                &model,
                KvType::F16,
                512,
                &variant("cut.kilnsnap", &|b| b.truncate(b.len() / 2)),
            ),
            &["cut.kilnsnap", "corrupt or truncated"],
        ),
        (
            refusal(
                &model,
                KvType::F16,
                512,
                &variant("flip.kilnsnap", &|b| {
                    let at = b.len() - 100;
                    b[at] ^= 1;
                }),
            ),
            &["flip.kilnsnap", "checksum"],
        ),
        (
            refusal(
                &model,
                KvType::F16,
                512,
                &variant("v9.kilnsnap", &|b| {
                    b[8..12].copy_from_slice(&9u32.to_le_bytes());
                    crc(b);
                }),
            ),
            &["version 9"],
        ),
        (
            refusal(
                &model,
                KvType::F16,
                512,
                &variant("magic.kilnsnap", &|b| b[0] = b'X'),
            ),
            &["not a kiln prompt snapshot"],
        ),
        (
            refusal(
                &model,
                KvType::F16,
                512,
                &dir.path().join("missing.kilnsnap"),
            ),
            &["missing.kilnsnap"],
        ),
    ];
    for (err, phrases) in cases {
        for phrase in phrases {
            assert!(err.contains(phrase), "{phrase:?} not in {err:?}");
        }
    }
    // The onnxruntime backend keeps its cache to itself.
    assert!(SnapshotError::NotNative
        .to_string()
        .contains("kiln's own executor"));
}

#[test]
fn chat_saves_the_start_once_and_loads_it_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("chat.kilnsnap");
    let run = || {
        let mut child = Command::new(common::kiln_binary())
            .arg("chat")
            .arg(common::smollm2_artifact(Format::Q4_1))
            .args([
                "--system-prompt",
                &system_prompt(),
                "-n",
                "16",
                "--temp",
                "0",
                "--prompt-cache",
            ])
            .arg(&cache)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln chat");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("stdin"),
            b"What is the capital of France?\n",
        )
        .expect("write");
        let out = child.wait_with_output().expect("kiln chat");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (first, log) = run();
    assert!(log.contains("tokens saved"), "{log}");
    let (second, log) = run();
    assert!(log.contains("tokens loaded"), "{log}");
    assert_eq!(first, second);
}

#[test]
fn serve_loads_what_an_earlier_server_saved() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = common::smollm2_artifact(Format::Q4_1);
    let body = json!({
        "messages": [{"role": "system", "content": system_prompt()},
                     {"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0,
    });
    let ask = || {
        let server = start_with(
            &model,
            &["--prompt-cache", dir.path().to_str().expect("utf-8")],
        );
        let (status, v) = post(&server.addr, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        v
    };
    let first = ask();
    let snaps: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].ends_with(".kilnsnap"), "{snaps:?}");
    let second = ask();
    assert_eq!(first["choices"], second["choices"]);
    // The second server found the start in the snapshot: only the user turn and after ran.
    let prompt = second["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    let cached = second["kiln"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens");
    assert!(cached > 0 && cached < prompt, "{cached} of {prompt}");
}

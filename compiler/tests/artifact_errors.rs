//! Bad `.kiln` artifacts: every corrupted header field, section and truncation is refused with an
//! error naming the file and the problem, never a panic; a failed write leaves no temporary file
//! and does not touch what is already at the destination.

mod common;

use std::path::{Path, PathBuf};

use kiln_compiler::graph::{Checkpoint, LayerWeights, LlamaWeights, Tensor};
use kiln_engine::tokenizer::TokenizerData;
use kiln_runtime::artifact::{
    Artifact, Metadata, ENDIAN_MARK, FORMAT_VERSION, HEADER_LEN, SECTION_ENTRY_LEN,
};
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::model::ModelFacts;

const VOCAB: usize = 32;
const HIDDEN: usize = 16;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 8;
const FFN: usize = 32;
const LAYERS: usize = 2;

/// Section kinds as stored in the section table.
const META: u32 = 1;
const TOKENIZER: u32 = 2;
const WEIGHTS: u32 = 3;

/// CRC-32 (IEEE, reflected), as `crc32fast` computes it; bitwise, for a few kilobytes.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Deterministic test values in `[-0.5, 0.5)`.
fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5)
        .collect()
}

fn matrix(name: &str, seed: usize, rows: usize, cols: usize) -> Tensor {
    let scale = 1.0 / (cols as f32).sqrt();
    let v: Vec<f32> = values(seed, rows * cols)
        .iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_f32(name, vec![rows, cols], &v)
}

fn norm(name: &str, seed: usize) -> Tensor {
    let v: Vec<f32> = values(seed, HIDDEN).iter().map(|x| 1.0 + 0.2 * x).collect();
    Tensor::from_f32(name, vec![HIDDEN], &v)
}

/// A tiny random Llama with a byte-level BPE vocabulary of 32 letters.
fn tiny_checkpoint() -> Checkpoint {
    let tokens: Vec<String> = (b'a'..=b'z')
        .chain(b'A'..=b'Z')
        .take(VOCAB)
        .map(|c| (c as char).to_string())
        .collect();
    let tokenizer = TokenizerData::from_gguf("gpt2", "gpt-2", &tokens, &[], &[], None, Some(1))
        .expect("tokenizer");
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let layers = (0..LAYERS)
        .map(|i| {
            let s = 10 * (i + 1);
            let n = |t: &str| format!("blk.{i}.{t}.weight");
            LayerWeights {
                attn_norm: norm(&n("attn_norm"), s),
                wq: matrix(&n("attn_q"), s + 1, q, HIDDEN),
                wk: matrix(&n("attn_k"), s + 2, kv, HIDDEN),
                wv: matrix(&n("attn_v"), s + 3, kv, HIDDEN),
                wo: matrix(&n("attn_output"), s + 4, HIDDEN, q),
                ffn_norm: norm(&n("ffn_norm"), s + 5),
                w_gate: matrix(&n("ffn_gate"), s + 6, FFN, HIDDEN),
                w_up: matrix(&n("ffn_up"), s + 7, FFN, HIDDEN),
                w_down: matrix(&n("ffn_down"), s + 8, HIDDEN, FFN),
            }
        })
        .collect();
    Checkpoint {
        facts: ModelFacts {
            name: "kiln-artifact-errors".into(),
            vocab_size: VOCAB,
            hidden_size: HIDDEN,
            intermediate_size: FFN,
            layers: LAYERS,
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            context_length: 64,
            tie_word_embeddings: true,
            bos_id: None,
            add_bos: false,
            eog_ids: vec![1],
            chat_template: None,
            sampling: Default::default(),
        },
        tokenizer,
        weights: LlamaWeights {
            embed: matrix("token_embd.weight", 1, VOCAB, HIDDEN),
            layers,
            final_norm: norm("output_norm.weight", 2),
            lm_head: None,
        },
    }
}

/// Writes the tiny checkpoint as `name` under `dir`.
fn write_tiny(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    kiln_compiler::emit::write_artifact(&tiny_checkpoint(), &path).expect("write artifact");
    path
}

/// A valid artifact's bytes (written once per call into a scratch directory).
fn valid_bytes() -> Vec<u8> {
    let dir = temp_dir();
    std::fs::read(write_tiny(dir.path(), "valid.kiln")).expect("read artifact")
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// One row of the section table.
#[derive(Clone, Copy, Debug)]
struct Section {
    kind: u32,
    offset: usize,
    len: usize,
    /// Byte offset of this row in the file.
    row: usize,
}

fn sections(bytes: &[u8]) -> Vec<Section> {
    (0..le_u32(bytes, 16) as usize)
        .map(|i| {
            let row = HEADER_LEN + i * SECTION_ENTRY_LEN;
            Section {
                kind: le_u32(bytes, row),
                offset: le_u64(bytes, row + 8) as usize,
                len: le_u64(bytes, row + 16) as usize,
                row,
            }
        })
        .collect()
}

fn section(bytes: &[u8], kind: u32) -> Section {
    *sections(bytes)
        .iter()
        .find(|s| s.kind == kind)
        .expect("section present")
}

/// Recomputes the section table's CRC in the header after the table was edited.
fn reseal_table(bytes: &mut [u8]) {
    let end = HEADER_LEN + sections(bytes).len() * SECTION_ENTRY_LEN;
    let crc = crc32(&bytes[HEADER_LEN..end]);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Lays out `bodies` (kind, bytes) as the writer does: header, table, sections on 64-byte
/// boundaries, every checksum valid.
fn assemble(bodies: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let align = |n: usize| n.div_ceil(64) * 64;
    let mut at = align(HEADER_LEN + bodies.len() * SECTION_ENTRY_LEN);
    let mut table = Vec::new();
    let mut starts = Vec::new();
    for (kind, body) in bodies {
        starts.push(at);
        table.extend_from_slice(&kind.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        table.extend_from_slice(&(at as u64).to_le_bytes());
        table.extend_from_slice(&(body.len() as u64).to_le_bytes());
        table.extend_from_slice(&crc32(body).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        at = align(at + body.len());
    }
    let file_len = starts.last().unwrap() + bodies.last().unwrap().1.len();
    let mut out = vec![0u8; file_len];
    out[..8].copy_from_slice(b"KILNART\0");
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&ENDIAN_MARK.to_le_bytes());
    out[16..20].copy_from_slice(&(bodies.len() as u32).to_le_bytes());
    out[24..32].copy_from_slice(&(file_len as u64).to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + table.len()].copy_from_slice(&table);
    for ((_, body), start) in bodies.iter().zip(starts) {
        out[start..start + body.len()].copy_from_slice(body);
    }
    reseal_table(&mut out);
    out
}

/// The artifact's sections with the metadata edited by `edit`, re-laid-out and re-checksummed.
fn with_meta(bytes: &[u8], mut edit: impl FnMut(&mut Metadata)) -> Vec<u8> {
    let bodies: Vec<(u32, Vec<u8>)> = sections(bytes)
        .iter()
        .map(|s| {
            let body = bytes[s.offset..s.offset + s.len].to_vec();
            if s.kind == META {
                let mut meta: Metadata = serde_json::from_slice(&body).expect("meta JSON");
                edit(&mut meta);
                (META, serde_json::to_vec(&meta).expect("meta JSON"))
            } else {
                (s.kind, body)
            }
        })
        .collect();
    assemble(&bodies)
}

/// Writes `bytes` as `name` under `dir`, opens it, and checks the error names the file and
/// holds every phrase; the file must be unchanged. Returns the message.
fn expect_open_error(dir: &Path, name: &str, bytes: &[u8], phrases: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write corrupt artifact");
    let message = open_error(&path, phrases);
    assert!(
        std::fs::read(&path).expect("re-read") == bytes,
        "{name} changed"
    );
    message
}

/// The error of opening `path` (mapped), which must name it and hold every phrase; loading it
/// into memory instead must fail with the same message.
fn open_error(path: &Path, phrases: &[&str]) -> String {
    let message = match Artifact::open(path) {
        Ok(_) => panic!("{} opened but should have been refused", path.display()),
        Err(e) => e.to_string(),
    };
    match Artifact::load(path) {
        Ok(_) => panic!("{} loaded but should have been refused", path.display()),
        Err(e) => assert_eq!(e.to_string(), message, "loading and mapping disagree"),
    }
    common::assert_names_file(message, path, phrases)
}

#[test]
fn tiny_artifact_opens_and_runs() {
    let dir = temp_dir();
    let path = write_tiny(dir.path(), "tiny.kiln");
    let artifact = Artifact::open(&path).expect("open");
    assert_eq!(artifact.meta().facts.vocab_size, VOCAB);
    let mut session = artifact
        .session(SessionOptions {
            context: 16,
            ..SessionOptions::default()
        })
        .expect("session");
    let logits = session.forward(&[3, 1, 4, 1, 5]).expect("forward");
    assert_eq!(logits.len(), VOCAB);
    assert!(logits.iter().all(|v| v.is_finite()), "{logits:?}");
    assert!(logits.iter().any(|&v| v != 0.0));

    // Read into memory rather than mapped: the same bytes, the same logits.
    let loaded = Artifact::load(&path).expect("load");
    assert_eq!(loaded.len(), artifact.len());
    let again = loaded
        .session(SessionOptions {
            context: 16,
            ..SessionOptions::default()
        })
        .expect("session")
        .forward(&[3, 1, 4, 1, 5])
        .expect("forward")
        .to_vec();
    assert_eq!(again, logits);

    // The test's own CRC and layout agree with the writer's, so the re-sealed files below differ
    // from a valid one only where each test says.
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(
        assemble(
            &sections(&bytes)
                .iter()
                .map(|s| (s.kind, bytes[s.offset..s.offset + s.len].to_vec()))
                .collect::<Vec<_>>()
        ),
        bytes
    );
    assert_eq!(with_meta(&bytes, |_| {}), bytes);
}

#[test]
fn wrong_magic() {
    let dir = temp_dir();
    let mut bytes = valid_bytes();
    bytes[..8].copy_from_slice(b"GGUF\0\0\0\0");
    expect_open_error(
        dir.path(),
        "magic.kiln",
        &bytes,
        &["not a kiln artifact (wrong magic)"],
    );
}

#[test]
fn wrong_version_names_both_versions() {
    let dir = temp_dir();
    for found in [0, FORMAT_VERSION + 1, u32::MAX] {
        let mut bytes = valid_bytes();
        bytes[8..12].copy_from_slice(&found.to_le_bytes());
        expect_open_error(
            dir.path(),
            &format!("v{found}.kiln"),
            &bytes,
            &[
                &format!("version {found} is not supported"),
                &format!("it reads versions 1 to {FORMAT_VERSION}"),
            ],
        );
    }
}

/// Version 1 held ggml rows only, which version 2 reads as the `rows` layout.
#[test]
fn version_1_artifacts_still_open() {
    let dir = temp_dir();
    let mut bytes = valid_bytes();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let path = dir.path().join("v1.kiln");
    std::fs::write(&path, &bytes).expect("write");
    let artifact = kiln_runtime::artifact::Artifact::open(&path).expect("a version 1 artifact");
    assert!(artifact
        .meta()
        .tensors
        .iter()
        .all(|t| t.layout == kiln_runtime::layout::Layout::Rows));
}

/// Version 3 stores `q4_0` in the aarch64 layouts XOR 0x88; a version 2 tensor stored there is
/// refused by name rather than read with every nibble wrong.
#[test]
fn version_2_aarch64_q4_0_tensors_are_refused() {
    use kiln_runtime::layout::Layout;
    use kiln_runtime::quant::Format;
    let dir = temp_dir();
    let packed = with_meta(&valid_bytes(), |m| {
        let t = &mut m.tensors[0];
        (t.format, t.layout, t.shape) = (Format::Q4_0, Layout::X4, vec![4, 32]);
        t.len = 4 * Format::Q4_0.block_bytes() as u64;
    });
    let mut v2 = packed.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    expect_open_error(
        dir.path(),
        "v2-4x4.kiln",
        &v2,
        &[
            "q4_0 in layout 4x4 from artifact format 2",
            "compile the model again",
        ],
    );
    let path = dir.path().join("v3-4x4.kiln");
    std::fs::write(&path, &packed).expect("write");
    if let Err(e) = Artifact::open(&path) {
        assert!(!e.to_string().contains("compile the model again"), "{e}");
    }
}

#[test]
fn wrong_endianness_mark() {
    let dir = temp_dir();
    let mut bytes = valid_bytes();
    bytes[12..16].copy_from_slice(&ENDIAN_MARK.to_be_bytes());
    expect_open_error(
        dir.path(),
        "big-endian.kiln",
        &bytes,
        &["different byte order"],
    );
}

#[test]
fn file_length_field_wrong() {
    let dir = temp_dir();
    let bytes = valid_bytes();
    let len = bytes.len() as u64;

    let mut longer = bytes.clone();
    longer[24..32].copy_from_slice(&(len + 64).to_le_bytes());
    expect_open_error(
        dir.path(),
        "claims-longer.kiln",
        &longer,
        &["truncated", &format!("needs bytes up to {}", len + 64)],
    );

    let mut huge = bytes.clone();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_open_error(dir.path(), "claims-huge.kiln", &huge, &["truncated"]);

    let mut shorter = bytes.clone();
    shorter[24..32].copy_from_slice(&(len - 1).to_le_bytes());
    expect_open_error(
        dir.path(),
        "claims-shorter.kiln",
        &shorter,
        &[&format!(
            "header says {} bytes, the file has {len}",
            len - 1
        )],
    );

    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"trailing garbage");
    expect_open_error(dir.path(), "trailing.kiln", &trailing, &["trailing data"]);
}

#[test]
fn section_count_wrong() {
    let dir = temp_dir();
    let mut fewer = valid_bytes();
    fewer[16..20].copy_from_slice(&2u32.to_le_bytes());
    expect_open_error(
        dir.path(),
        "two-sections.kiln",
        &fewer,
        &["section table is corrupt"],
    );
    let mut many = valid_bytes();
    many[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_open_error(
        dir.path(),
        "many-sections.kiln",
        &many,
        &["sections is implausible"],
    );
}

#[test]
fn truncated_everywhere() {
    let dir = temp_dir();
    let bytes = valid_bytes();
    let mut cuts = vec![
        (0, "empty".to_string()),
        (7, "inside the magic".into()),
        (30, "inside the header".into()),
        (HEADER_LEN, "after the header".into()),
        (HEADER_LEN + 40, "inside the section table".into()),
    ];
    for s in sections(&bytes) {
        cuts.push((s.offset, format!("at the start of section {}", s.kind)));
        cuts.push((s.offset + s.len / 2, format!("inside section {}", s.kind)));
        cuts.push((
            s.offset + s.len - 1,
            format!("at the end of section {}", s.kind),
        ));
    }
    for (cut, where_) in cuts {
        println!("cut at {cut} ({where_}):");
        expect_open_error(
            dir.path(),
            &format!("cut-{cut}.kiln"),
            &bytes[..cut],
            &["truncated", &format!("the file has {cut}")],
        );
    }
}

#[test]
fn flipped_byte_in_each_section_fails_its_checksum() {
    let dir = temp_dir();
    let bytes = valid_bytes();
    for (kind, name) in [
        (META, "meta"),
        (TOKENIZER, "tokenizer"),
        (WEIGHTS, "weights"),
    ] {
        let s = section(&bytes, kind);
        for at in [s.offset, s.offset + s.len / 2, s.offset + s.len - 1] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x20;
            expect_open_error(
                dir.path(),
                &format!("flip-{at}.kiln"),
                &corrupt,
                &[&format!("{name} section is corrupt (checksum mismatch)")],
            );
        }
    }
}

#[test]
fn flipped_byte_in_section_table_fails_table_checksum() {
    let dir = temp_dir();
    let bytes = valid_bytes();
    let rows = sections(&bytes).len() * SECTION_ENTRY_LEN;
    for at in [HEADER_LEN, HEADER_LEN + 9, HEADER_LEN + rows - 1] {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0x01;
        expect_open_error(
            dir.path(),
            &format!("table-{at}.kiln"),
            &corrupt,
            &["section table is corrupt (checksum mismatch)"],
        );
    }
    let mut crc = bytes.clone();
    crc[33] ^= 0x80;
    expect_open_error(
        dir.path(),
        "table-crc.kiln",
        &crc,
        &["section table is corrupt"],
    );
}

/// Table rows that pass the checksum but lie about their sections.
#[test]
fn resealed_table_with_bad_rows() {
    let dir = temp_dir();
    let bytes = valid_bytes();
    let weights = section(&bytes, WEIGHTS);

    let mut past_end = bytes.clone();
    past_end[weights.row + 16..weights.row + 24]
        .copy_from_slice(&(weights.len as u64 + 64).to_le_bytes());
    reseal_table(&mut past_end);
    expect_open_error(
        dir.path(),
        "weights-past-end.kiln",
        &past_end,
        &["truncated: the weights section"],
    );

    let mut overflow = bytes.clone();
    overflow[weights.row + 16..weights.row + 24].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal_table(&mut overflow);
    expect_open_error(
        dir.path(),
        "weights-overflow.kiln",
        &overflow,
        &["weights section bounds overflow"],
    );

    let mut unknown = bytes.clone();
    unknown[weights.row..weights.row + 4].copy_from_slice(&77u32.to_le_bytes());
    reseal_table(&mut unknown);
    expect_open_error(
        dir.path(),
        "unknown-kind.kiln",
        &unknown,
        &["unknown section kind 77"],
    );

    let mut duplicate = bytes.clone();
    duplicate[weights.row..weights.row + 4].copy_from_slice(&TOKENIZER.to_le_bytes());
    reseal_table(&mut duplicate);
    expect_open_error(
        dir.path(),
        "two-tokenizers.kiln",
        &duplicate,
        &["two tokenizer sections"],
    );

    let mut misaligned = bytes.clone();
    let meta = section(&bytes, META);
    misaligned[meta.row + 8..meta.row + 16]
        .copy_from_slice(&(meta.offset as u64 + 1).to_le_bytes());
    reseal_table(&mut misaligned);
    expect_open_error(
        dir.path(),
        "misaligned.kiln",
        &misaligned,
        &["meta section is not 64-byte aligned"],
    );
}

#[test]
fn missing_cpu_feature() {
    let dir = temp_dir();
    let bytes = with_meta(&valid_bytes(), |m| {
        m.required_cpu_features = vec!["sve2".into()]
    });
    expect_open_error(dir.path(), "sve2.kiln", &bytes, &["lacks the feature sve2"]);
}

#[test]
fn resealed_meta_that_lies() {
    let dir = temp_dir();
    let valid = valid_bytes();

    let bytes = with_meta(&valid, |m| m.tensors[0].offset += 1 << 40);
    expect_open_error(
        dir.path(),
        "tensor-far.kiln",
        &bytes,
        &[
            "tensor token_embd.weight",
            "past the end of the weights section",
        ],
    );

    let bytes = with_meta(&valid, |m| m.tensors[0].shape = vec![1 << 62, 1 << 62]);
    expect_open_error(
        dir.path(),
        "tensor-huge.kiln",
        &bytes,
        &["tensor token_embd.weight", "do not hold shape"],
    );

    // 2^62 f32 columns are 2^64 bytes: a length of 0 must not pass for them.
    let bytes = with_meta(&valid, |m| {
        m.tensors[0].shape = vec![1 << 62];
        m.tensors[0].len = 0;
    });
    expect_open_error(
        dir.path(),
        "tensor-wraps.kiln",
        &bytes,
        &["tensor token_embd.weight", "do not hold shape"],
    );

    let bytes = with_meta(&valid, |m| m.graph.buffers.clear());
    expect_open_error(dir.path(), "no-buffers.kiln", &bytes, &["does not exist"]);

    let mut not_json = valid.clone();
    let meta = section(&valid, META);
    not_json[meta.offset] = b'[';
    let not_json = assemble(
        &sections(&not_json)
            .iter()
            .map(|s| (s.kind, not_json[s.offset..s.offset + s.len].to_vec()))
            .collect::<Vec<_>>(),
    );
    expect_open_error(dir.path(), "not-json.kiln", &not_json, &["metadata:"]);
}

/// Facts that pass every checksum but could not describe a model: each refused by name at
/// load, before any size is computed from it.
#[test]
fn resealed_facts_out_of_bounds_or_inconsistent() {
    let dir = temp_dir();
    let valid = valid_bytes();
    type Edit = fn(&mut Metadata);
    let cases: [(&str, Edit, &str); 9] = [
        (
            "layers-wrap",
            |m| m.facts.layers = (1 << 45) + 1,
            "layers 35184372088833 is outside",
        ),
        (
            "layers-huge",
            |m| m.facts.layers = 100_000,
            "layers 100000 is outside",
        ),
        (
            "layers-more",
            |m| m.facts.layers = LAYERS + 1,
            "has no attention op",
        ),
        (
            "eps-negative",
            |m| m.facts.rms_eps = -1.0,
            "rms_eps -1 must be a positive number",
        ),
        (
            "theta-zero",
            |m| m.facts.rope_theta = 0.0,
            "rope_theta 0 must be a positive number",
        ),
        (
            "no-ops",
            |m| m.graph.ops.clear(),
            "does not start with an embedding",
        ),
        (
            "no-logits",
            |m| {
                m.graph.ops.pop();
            },
            "must end with its one logits op",
        ),
        (
            "eog-outside",
            |m| m.facts.eog_ids = vec![VOCAB as u32],
            "outside the 32-token vocabulary",
        ),
        ("heads-zero", |m| m.facts.heads = 0, "heads 0 is outside"),
    ];
    for (name, edit, phrase) in cases {
        let bytes = with_meta(&valid, edit);
        expect_open_error(dir.path(), &format!("{name}.kiln"), &bytes, &[phrase]);
    }
}

#[test]
fn missing_file_and_directory() {
    let dir = temp_dir();
    let missing = dir.path().join("missing.kiln");
    open_error(&missing, &["No such file"]);
    open_error(dir.path(), &["is a directory"]);
}

/// Temporary files the writer may have left in `dir` (anything besides `keep`).
fn strays(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn failed_writes_leave_no_temp_files_and_keep_existing_files() {
    let dir = temp_dir();
    let checkpoint = tiny_checkpoint();
    let write = |path: &Path| kiln_compiler::emit::write_artifact(&checkpoint, path);
    let expect_write_error = |path: &Path| {
        let message = match write(path) {
            Ok(_) => panic!("writing {} should have failed", path.display()),
            Err(e) => e.to_string(),
        };
        println!("{message}");
        assert!(
            message.contains(&path.display().to_string()),
            "message does not name {}: {message}",
            path.display()
        );
    };

    // A directory that does not exist.
    let missing = dir.path().join("no-such-dir/model.kiln");
    expect_write_error(&missing);
    assert!(!dir.path().join("no-such-dir").exists());
    assert!(strays(dir.path(), &[]).is_empty());

    // A parent that is a file, not a directory.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"user data").expect("write");
    expect_write_error(&blocker.join("model.kiln"));
    assert_eq!(std::fs::read(&blocker).expect("read"), b"user data");

    // The destination is a directory holding user files: the rename fails after the temporary
    // file was fully written, and that file must be removed.
    let occupied = dir.path().join("occupied.kiln");
    std::fs::create_dir(&occupied).expect("mkdir");
    std::fs::write(occupied.join("keep"), b"user data").expect("write");
    expect_write_error(&occupied);
    assert_eq!(
        std::fs::read(occupied.join("keep")).expect("read"),
        b"user data"
    );
    assert_eq!(
        strays(dir.path(), &["file", "occupied.kiln"]),
        Vec::<String>::new()
    );

    // A read-only directory holding a valid artifact: the write fails and the artifact stays.
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    let existing = write_tiny(&ro, "model.kiln");
    let before = std::fs::read(&existing).expect("read");
    set_read_only(&ro, true);
    let probe = ro.join("probe");
    let privileged = std::fs::write(&probe, b"").is_ok();
    if privileged {
        // Root (as in CI containers) bypasses permission bits: nothing to test here beyond the
        // cases above.
        println!("permission checks are bypassed (running as root); read-only case skipped");
        std::fs::remove_file(&probe).expect("remove probe");
    } else {
        expect_write_error(&existing);
    }
    set_read_only(&ro, false);
    assert_eq!(std::fs::read(&existing).expect("read"), before);
    assert_eq!(strays(&ro, &["model.kiln"]), Vec::<String>::new());
    Artifact::open(&existing).expect("the existing artifact still opens");
}

/// Drops (or restores) write permission on `dir`.
fn set_read_only(dir: &Path, read_only: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if read_only { 0o555 } else { 0o755 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

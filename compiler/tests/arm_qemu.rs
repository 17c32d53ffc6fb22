//! The `kiln` binary cross-built for aarch64 (`cargo xtask build --target rpi5`), run under
//! qemu-user with the CPU models of the Raspberry Pi 5 (Cortex-A76), the Pi 4 (Cortex-A72) and
//! qemu's `max` (i8mm). Both machines score the same windows of the golden text teacher-forced
//! (`kiln perplexity --kl-divergence-base`), batched and token by token: with the reference
//! kernels (`KILN_KERNELS=generic`, the same arithmetic in the same order) the aarch64 logits
//! of the first window must equal the x86-64 ones bit for bit; with the aarch64 machine's own
//! kernels (NEON, dotprod, i8mm) they must stay within the budget the worst tables of the
//! kernel contract set (`common::forced`), as every x86-64 level must (`kernel_levels.rs`).
//! Which x86-64 level this machine has does not matter: the x86-64 side only runs the
//! reference and worst tables.
//!
//! Runs when `KILN_TEST_QEMU_KILN` names the aarch64 `kiln`, else each test says it is skipped
//! and passes (`.ci/arm-lane` sets it). `KILN_TEST_QEMU_ARTIFACT` may name the rpi5 artifact
//! (default: the default model compiled here for rpi5), `KILN_TEST_QEMU` the emulator (default
//! `qemu-aarch64-static`; never give it `-L`, which hangs every thread spawn).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::forced::{self, Budget};
use kiln_engine::generate::Model;
use kiln_engine::logits::LogitsReader;
use kiln_runtime::artifact::{parse, tensor_bytes, TensorEntry};
use kiln_runtime::kernels::Kernels;
use kiln_runtime::layout::Geometry;
use kiln_runtime::quant::Format;
use serde_json::Value;

/// The aarch64 `kiln` from `$KILN_TEST_QEMU_KILN`, or `None` (the test is skipped).
fn arm_kiln(test: &str) -> Option<PathBuf> {
    let Some(path) = std::env::var_os("KILN_TEST_QEMU_KILN").map(PathBuf::from) else {
        println!("{test}: skipped (set KILN_TEST_QEMU_KILN to an aarch64 kiln; see .ci/arm-lane)");
        return None;
    };
    let header = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("KILN_TEST_QEMU_KILN={}: {e}", path.display()));
    // ELF, 64-bit, little-endian, e_machine 183 (EM_AARCH64).
    assert!(
        header.len() > 20 && header[..5] == *b"\x7fELF\x02" && header[18..20] == [183, 0],
        "KILN_TEST_QEMU_KILN={} is not an aarch64 ELF executable (`cargo xtask build --target rpi5` writes one to dist/rpi5/kiln)",
        path.display()
    );
    Some(path)
}

/// Which kernel table the aarch64 side uses.
#[derive(Clone, Copy, PartialEq)]
enum Table {
    /// The machine's best (the default).
    Own,
    /// The reference kernels (`KILN_KERNELS=generic`).
    Generic,
}

impl Table {
    /// Windows scored: all of them with the machine's own kernels, whose budget is derived
    /// over all; the first with the reference kernels, whose logits must be bit-identical (a
    /// bit that differs shows in any window, and emulated reference kernels are the lane's
    /// slowest run: all four windows took 650 s of it).
    fn chunks(self) -> usize {
        match self {
            Table::Own => forced::CHUNKS,
            Table::Generic => 1,
        }
    }
}

/// `kiln perplexity` on a qemu `cpu` over the forced windows in passes of `batch`, saving the
/// scored logits to `out`.
fn qemu_perplexity(
    kiln: &Path,
    cpu: &str,
    artifact: &Path,
    table: Table,
    batch: usize,
    out: &Path,
) -> Output {
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let mut cmd = Command::new(&qemu);
    cmd.args(["-cpu", cpu]).arg(kiln);
    // qemu-user hands its environment to the emulated process.
    match table {
        Table::Generic => cmd.env("KILN_KERNELS", "generic"),
        Table::Own => cmd.env_remove("KILN_KERNELS"),
    };
    cmd.arg("perplexity")
        .arg(artifact)
        .arg("-f")
        .arg(forced::text())
        .args(["--ctx", &forced::CTX.to_string()])
        .args(["--chunks", &table.chunks().to_string()])
        .args(["-b", &batch.to_string(), "-t", "2", "--json"])
        .arg("--kl-divergence-base")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {qemu} (apt-get install qemu-user-static): {e}"))
}

/// The JSON `kiln` printed; a clear failure with its stderr otherwise.
fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: kiln failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not one JSON object on stdout ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The windows' tokens and every scored row of a logits file, row after row.
fn read_logits(path: &Path) -> (Vec<u32>, Vec<f32>) {
    let mut reader = LogitsReader::open(path).expect("the aarch64 logits");
    let h = reader.header();
    let (mut window, mut rows) = (vec![0u32; h.ctx], vec![0f32; h.rows() * h.vocab]);
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..h.chunks {
        reader.chunk(&mut window, &mut rows).expect("a window");
        tokens.extend_from_slice(&window);
        all.extend_from_slice(&rows);
    }
    (tokens, all)
}

/// The x86-64 side: the model, its forced windows' tokens, the reference rows and the budget.
struct Host {
    model: Model,
    tokens: Vec<u32>,
    reference: Vec<f32>,
    budget: Budget,
}

impl Host {
    fn new(artifact: &Path) -> Host {
        let model = Model::open(artifact).expect("open the host artifact");
        let mut tokens = forced::tokens(&model);
        tokens.truncate(forced::CTX * forced::CHUNKS);
        let reference = forced::scored_rows(&model, &tokens, Kernels::generic(), forced::CTX);
        let budget = Budget::derive(&model, &tokens, &reference);
        Host {
            model,
            tokens,
            reference,
            budget,
        }
    }

    /// Runs the aarch64 `kiln` on `cpu` with `table` in passes of `batch` and checks its logits:
    /// bit for bit the reference ones with the generic kernels, within the budget with its own.
    fn check(&self, kiln: &Path, cpu: &str, artifact: &Path, table: Table, batch: usize) {
        let what = format!(
            "aarch64 {cpu}, {} kernels, passes of {batch}",
            if table == Table::Own {
                "its own"
            } else {
                "generic"
            }
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("aarch64.logits");
        let started = std::time::Instant::now();
        let json = json_of(
            &qemu_perplexity(kiln, cpu, artifact, table, batch, &out),
            &what,
        );
        println!(
            "{what}: perplexity {} ({:.1} s under qemu)",
            json["ppl"],
            started.elapsed().as_secs_f64()
        );
        let (tokens, rows) = read_logits(&out);
        let mut window_tokens = self.tokens[..forced::CTX * table.chunks()].to_vec();
        if let (true, Some(bos)) = (self.model.facts().add_bos, self.model.facts().bos_id) {
            for w in window_tokens.chunks_mut(forced::CTX) {
                w[0] = bos;
            }
        }
        assert_eq!(tokens, window_tokens, "{what}: the windows' tokens");
        match table {
            Table::Generic => {
                let reference = &self.reference[..self.reference.len() / forced::CHUNKS];
                let parted = rows
                    .iter()
                    .zip(reference)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(
                    rows.len() == reference.len() && parted.is_none(),
                    "{what}: the logits differ from x86-64's reference kernels (first at value {parted:?})"
                );
            }
            Table::Own => {
                self.budget
                    .check(&what, &self.reference, &rows, self.model.facts().vocab_size);
            }
        }
    }
}

/// The default model compiled for the shipped target `name` (its required CPU features).
fn compile_for(dir: &Path, name: &str) -> PathBuf {
    let target = kiln_targets::find(name)
        .expect("descriptors")
        .expect("shipped target");
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::Q4_1).expect("convert");
    let out = dir.join(format!("smollm2-{name}.q4_1.kiln"));
    let packing = kiln_compiler::emit::Packing::for_target(&target);
    kiln_compiler::emit::write_artifact_for(&converted, &out, &packing).expect("write artifact");
    out
}

/// Asserts two artifacts hold the same model: metadata apart from the required CPU features
/// and the layouts, the same tokenizer, and every tensor's rows byte for byte once unpacked.
fn assert_same_model(device: &Path, host: &Path) {
    let (a, b) = (
        std::fs::read(device).expect("device artifact"),
        std::fs::read(host).expect("host artifact"),
    );
    let (pa, pb) = (
        parse(&a).expect("parse the device artifact"),
        parse(&b).expect("parse the host artifact"),
    );
    let mut meta = pa.meta.clone();
    meta.required_cpu_features
        .clone_from(&pb.meta.required_cpu_features);
    for (t, h) in meta.tensors.iter_mut().zip(&pb.meta.tensors) {
        t.layout = h.layout;
    }
    assert!(
        meta == pb.meta,
        "{} and {} differ beyond the required CPU features and layouts",
        device.display(),
        host.display()
    );
    assert!(
        a[pa.tokenizer.clone()] == b[pb.tokenizer.clone()],
        "different tokenizers"
    );
    let rows = |weights: &[u8], e: &TensorEntry| -> Vec<u8> {
        let g = Geometry {
            format: e.format,
            layout: e.layout,
            rows: e.rows(),
            blocks: e.cols() / e.format.block_len(),
        };
        let bytes = tensor_bytes(weights, e);
        let rb = g.row_bytes();
        let mut out = vec![0u8; bytes.len()];
        for r in 0..e.rows() {
            g.row(bytes, r, &mut out[r * rb..(r + 1) * rb]);
        }
        out
    };
    let (wa, wb) = (&a[pa.weights.clone()], &b[pb.weights.clone()]);
    for (t, h) in pa.meta.tensors.iter().zip(&pb.meta.tensors) {
        assert!(rows(wa, t) == rows(wb, h), "{}: different weights", t.name);
    }
}

#[test]
fn rpi5_on_a_cortex_a76_and_with_i8mm_scores_like_x86_64() {
    let Some(kiln) = arm_kiln("rpi5_on_a_cortex_a76_and_with_i8mm_scores_like_x86_64") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let rpi5 = std::env::var_os("KILN_TEST_QEMU_ARTIFACT")
        .map(PathBuf::from)
        .unwrap_or_else(|| compile_for(dir.path(), "rpi5"));
    // The x86-64 run needs the same model without the rpi5's CPU requirements.
    let host_artifact = common::smollm2_artifact(Format::Q4_1);
    assert_same_model(&rpi5, &host_artifact);
    let host = Host::new(&host_artifact);
    for batch in [forced::CTX, 1] {
        host.check(&kiln, "cortex-a76", &rpi5, Table::Generic, batch);
        // A Cortex-A76 runs the dotprod kernels, qemu's `max` the i8mm ones.
        for cpu in ["cortex-a76", "max"] {
            host.check(&kiln, cpu, &rpi5, Table::Own, batch);
        }
    }
}

#[test]
fn rpi4_runs_on_a_cortex_a72_which_refuses_the_rpi5_artifact() {
    let Some(kiln) = arm_kiln("rpi4_runs_on_a_cortex_a72_which_refuses_the_rpi5_artifact") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let rpi4 = compile_for(dir.path(), "rpi4");
    let host_artifact = common::smollm2_artifact(Format::Q4_1);
    assert_same_model(&rpi4, &host_artifact);
    let host = Host::new(&host_artifact);
    // The reference kernels are checked bit for bit on the Cortex-A76 (the same code runs here).
    for batch in [forced::CTX, 1] {
        host.check(&kiln, "cortex-a72", &rpi4, Table::Own, batch);
    }

    // The Pi 5 artifact assumes dotprod and fp16, which a Cortex-A72 lacks.
    let rpi5 = compile_for(dir.path(), "rpi5");
    let out = qemu_perplexity(
        &kiln,
        "cortex-a72",
        &rpi5,
        Table::Own,
        forced::CTX,
        &dir.path().join("refused.logits"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the rpi5 artifact ran on a cortex-a72"
    );
    assert!(
        stderr.contains("this CPU lacks the feature dotprod") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// An aarch64 `/proc/cpuinfo` of a Cortex-A76: the ARM onnxruntime reads it at load and crashes
/// on the x86-64 host's (qemu-user passes the host's file through).
const CORTEX_A76_CPUINFO: &str = "processor\t: 0\nBogoMIPS\t: 50.00\n\
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n\
CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n";

#[test]
fn the_ort_backend_on_a_cortex_a76_gives_llama_cpp_greedy_ids() {
    let test = "the_ort_backend_on_a_cortex_a76_gives_llama_cpp_greedy_ids";
    let Some(kiln) = arm_kiln(test) else {
        return;
    };
    let library = std::env::var_os("KILN_TEST_QEMU_ORT_DYLIB").map(PathBuf::from).expect(
        "KILN_TEST_QEMU_ORT_DYLIB: the aarch64 libonnxruntime (`cargo xtask fetch onnxruntime --target rpi5`)",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let onnx = dir.path().join("smollm2.onnx");
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    kiln_compiler::onnx::export(&checkpoint, &onnx, &Default::default()).expect("export");
    let cpuinfo = dir.path().join("cpuinfo");
    std::fs::write(&cpuinfo, CORTEX_A76_CPUINFO).expect("write cpuinfo");
    let case = common::golden_case("p1");
    let prompt = case["prompt"].as_str().expect("prompt");
    let expected = common::ids(&case["F32"]["generated_ids"]);
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    // A private mount namespace shows the emulated process an aarch64 cpuinfo (needs root).
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /proc/cpuinfo && exec \"$@\"",
        ])
        .arg(&cpuinfo)
        .args([&qemu, "-cpu", "cortex-a76"])
        .arg(&kiln)
        .arg("run")
        .arg(&onnx)
        .arg("--ort-lib")
        .arg(&library)
        .args(["-p", prompt, "--temp", "0", "-n", "8", "--json"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run unshare (util-linux) as root: {e}"));
    let ids = common::ids(&json_of(&out, "ort under qemu")["ids"]);
    println!("ort under qemu cortex-a76: {ids:?}");
    assert_eq!(ids, expected[..8], "ort on aarch64 vs llama.cpp F32");
}

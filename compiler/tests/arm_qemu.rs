//! The `kiln` binary cross-built for aarch64 (`cargo xtask build --target rpi5`), run under
//! qemu-user with the CPU models of the Raspberry Pi 5 (Cortex-A76) and 4 (Cortex-A72). With the
//! reference kernels on both sides (`KILN_KERNELS=generic`, the same arithmetic in the same
//! order) its greedy ids must equal the x86-64 run's exactly. With each machine's own kernels
//! (NEON/dotprod here, AVX-512 VNNI there: the same integer sums, float sums in another order)
//! the ids must agree with the x86-64 run and with llama.cpp's (`testdata/golden`) up to a
//! position where the reference logits of the two candidates are within [`TIE`] of each other.
//!
//! Runs when `KILN_TEST_QEMU_KILN` names the aarch64 `kiln`, else each test says it is skipped
//! and passes (`.ci/arm-lane` sets it). `KILN_TEST_QEMU_ARTIFACT` may name the rpi5 artifact
//! (default: the default model compiled here for rpi5), `KILN_TEST_QEMU` the emulator (default
//! `qemu-aarch64-static`; never give it `-L`, which hangs every thread spawn).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_runtime::exec::SessionOptions;
use kiln_runtime::generate::Model;
use kiln_runtime::quant::Format;
use serde_json::Value;

/// Tokens generated per prompt, as `kiln run -n 16`.
const TOKENS: usize = 16;

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

/// Which kernel table both sides use.
#[derive(Clone, Copy, PartialEq)]
enum Kernels {
    /// Each machine's best (the default).
    Own,
    /// The reference kernels (`KILN_KERNELS=generic`).
    Generic,
}

/// How far apart (in logits; SmolLM2's top logits are 15–25 and a decided choice leads by
/// whole units) two candidates may be for the choice between them to follow the order of float
/// sums rather than the model. Measured: with NEON/dotprod vs AVX-512 VNNI kernels the q4_1
/// `p1` and `p2` runs part where the two candidates are 0.087 and 0.088 apart; one 8-bit
/// activation that rounds the other way moves logits by about that much.
const TIE: f32 = 0.25;

/// `cmd` (a `kiln`, or qemu with its arguments before the `kiln`) completed to
/// `run ARTIFACT -p PROMPT --temp 0 -n 16 --json` with `kernels`.
fn greedy_run(mut cmd: Command, artifact: &Path, prompt: &str, kernels: Kernels) -> Command {
    // qemu-user hands its environment to the emulated process.
    match kernels {
        Kernels::Generic => cmd.env("KILN_KERNELS", "generic"),
        Kernels::Own => cmd.env_remove("KILN_KERNELS"),
    };
    cmd.arg("run").arg(artifact).args([
        "-p",
        prompt,
        "--temp",
        "0",
        "-n",
        &TOKENS.to_string(),
        "--json",
    ]);
    cmd
}

/// Runs `kiln run ARTIFACT -p PROMPT --temp 0 -n 16 --json` on a qemu `cpu`.
fn qemu_run(kiln: &Path, cpu: &str, artifact: &Path, prompt: &str, kernels: Kernels) -> Output {
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let mut cmd = Command::new(&qemu);
    cmd.args(["-cpu", cpu]).arg(kiln);
    greedy_run(cmd, artifact, prompt, kernels)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {qemu} (apt-get install qemu-user-static): {e}"))
}

/// The JSON `kiln run --json` printed; a clear failure with its stderr otherwise.
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

/// The prompt's ids and the greedy ids of this (x86-64) machine, from the x86-64 `kiln run
/// --temp 0 -n 16 --json` with the given kernels.
fn host_ids(artifact: &Path, prompt: &str, kernels: Kernels) -> (Vec<u32>, Vec<u32>) {
    let out = greedy_run(
        Command::new(common::kiln_binary()),
        artifact,
        prompt,
        kernels,
    )
    .output()
    .expect("running the x86-64 kiln");
    let json = json_of(&out, "x86-64 kiln run");
    (common::ids(&json["prompt_ids"]), common::ids(&json["ids"]))
}

/// Asserts `ours == theirs`, naming the first position where they part.
fn assert_same_ids(ours: &[u32], theirs: &[u32], what: &str) {
    if let Some(at) = parting(ours, theirs) {
        panic!("{what}: the ids part at position {at}\n  aarch64: {ours:?}\n  other:   {theirs:?}");
    }
}

/// The first position where two runs part (a shorter run parts where it ends).
fn parting(ours: &[u32], theirs: &[u32]) -> Option<usize> {
    (ours != theirs).then(|| {
        ours.iter()
            .zip(theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()))
    })
}

/// Asserts `ours` and `theirs` agree up to a near tie: where they part, the x86-64 model's
/// logits (after the prompt and the common prefix) for the two choices are within [`TIE`].
fn assert_ids_agree(host: &Path, prompt_ids: &[u32], ours: &[u32], theirs: &[u32], what: &str) {
    let Some(at) = parting(ours, theirs) else {
        return;
    };
    let (Some(&a), Some(&b)) = (ours.get(at), theirs.get(at)) else {
        panic!("{what}: one run stops at {at}\n  aarch64: {ours:?}\n  other:   {theirs:?}");
    };
    let model = Model::open(host).expect("open the host artifact");
    let mut session = model.decoder(SessionOptions::default()).expect("session");
    let mut context = prompt_ids.to_vec();
    context.extend_from_slice(&ours[..at]);
    let logits = session.forward(&context).expect("forward");
    let gap = (logits[a as usize] - logits[b as usize]).abs();
    println!(
        "{what}: part at {at} ({a} vs {b}), logits {} vs {}, gap {gap}",
        logits[a as usize], logits[b as usize]
    );
    assert!(
        gap <= TIE,
        "{what}: the ids part at position {at} where the logits are {gap} apart (more than a tie)\n  aarch64: {ours:?}\n  other:   {theirs:?}"
    );
}

/// The default model compiled for the shipped target `name` (its required CPU features).
fn compile_for(dir: &Path, name: &str) -> PathBuf {
    let target = kiln_targets::find(name)
        .expect("descriptors")
        .expect("shipped target");
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::Q4_1).expect("convert");
    let out = dir.join(format!("smollm2-{name}.q4_1.kiln"));
    kiln_compiler::emit::write_artifact_for(&converted, &out, &target.cpu.assume)
        .expect("write artifact");
    out
}

/// Asserts two artifacts hold the same model: metadata apart from the required CPU features,
/// tokenizer and weights byte for byte.
fn assert_same_model(device: &Path, host: &Path) {
    let (a, b) = (
        std::fs::read(device).expect("device artifact"),
        std::fs::read(host).expect("host artifact"),
    );
    let (pa, pb) = (
        kiln_runtime::artifact::parse(&a).expect("parse the device artifact"),
        kiln_runtime::artifact::parse(&b).expect("parse the host artifact"),
    );
    let mut meta = pa.meta.clone();
    meta.required_cpu_features
        .clone_from(&pb.meta.required_cpu_features);
    assert!(
        meta == pb.meta,
        "{} and {} differ beyond the required CPU features",
        device.display(),
        host.display()
    );
    assert!(
        a[pa.tokenizer] == b[pb.tokenizer] && a[pa.weights] == b[pb.weights],
        "{} and {} hold different tokenizer or weight bytes",
        device.display(),
        host.display()
    );
}

#[test]
fn rpi5_greedy_ids_on_a_cortex_a76_match_x86_64_and_llama_cpp() {
    let Some(kiln) = arm_kiln("rpi5_greedy_ids_on_a_cortex_a76_match_x86_64_and_llama_cpp") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let rpi5 = std::env::var_os("KILN_TEST_QEMU_ARTIFACT")
        .map(PathBuf::from)
        .unwrap_or_else(|| compile_for(dir.path(), "rpi5"));
    // The x86-64 run needs the same model without the rpi5's CPU requirements.
    let host = common::smollm2_artifact(Format::Q4_1);
    assert_same_model(&rpi5, &host);
    for case in common::golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
    {
        let name = case["name"].as_str().expect("name");
        let prompt = case["prompt"].as_str().expect("prompt");
        let started = std::time::Instant::now();
        let arm = json_of(
            &qemu_run(&kiln, "cortex-a76", &rpi5, prompt, Kernels::Generic),
            name,
        );
        let seconds = started.elapsed().as_secs_f64();
        let (prompt_ids, x86) = host_ids(&host, prompt, Kernels::Generic);
        println!(
            "{name}: aarch64, reference kernels (qemu cortex-a76, {seconds:.1} s) {:?} {}",
            common::ids(&arm["ids"]),
            arm["text"]
        );
        assert_eq!(
            common::ids(&arm["prompt_ids"]),
            prompt_ids,
            "{name}: prompt ids"
        );
        assert_eq!(
            common::ids(&case["prompt_ids"]),
            prompt_ids,
            "{name}: llama.cpp's prompt ids"
        );
        assert_same_ids(
            &common::ids(&arm["ids"]),
            &x86,
            &format!("{name}: aarch64 vs x86-64, reference kernels"),
        );

        let arm = json_of(
            &qemu_run(&kiln, "cortex-a76", &rpi5, prompt, Kernels::Own),
            name,
        );
        let arm_ids = common::ids(&arm["ids"]);
        let (_, x86) = host_ids(&host, prompt, Kernels::Own);
        println!("{name}: aarch64, its own kernels {arm_ids:?}; x86-64 {x86:?}");
        assert_ids_agree(
            &host,
            &prompt_ids,
            &arm_ids,
            &x86,
            &format!("{name}: aarch64 vs x86-64, each machine's kernels"),
        );
        // kiln's q4_1 (8-bit activations, as llama.cpp's Q4_1 × Q8_1) follows llama.cpp's Q4_1
        // greedy run.
        let golden = common::ids(&case["Q4_1"]["generated_ids"]);
        assert_ids_agree(
            &host,
            &prompt_ids,
            &arm_ids,
            &golden[..TOKENS.min(golden.len())],
            &format!("{name}: aarch64 vs llama.cpp Q4_1"),
        );
    }
}

#[test]
fn rpi4_runs_on_a_cortex_a72_which_refuses_the_rpi5_artifact() {
    let Some(kiln) = arm_kiln("rpi4_runs_on_a_cortex_a72_which_refuses_the_rpi5_artifact") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let rpi4 = compile_for(dir.path(), "rpi4");
    let host = common::smollm2_artifact(Format::Q4_1);
    assert_same_model(&rpi4, &host);
    let case = common::golden_case("p1");
    let prompt = case["prompt"].as_str().expect("prompt");
    let arm = qemu_run(&kiln, "cortex-a72", &rpi4, prompt, Kernels::Generic);
    let (prompt_ids, x86) = host_ids(&host, prompt, Kernels::Generic);
    assert_same_ids(
        &common::ids(&json_of(&arm, "rpi4")["ids"]),
        &x86,
        "p1 on a cortex-a72 vs x86-64, reference kernels",
    );
    let arm = qemu_run(&kiln, "cortex-a72", &rpi4, prompt, Kernels::Own);
    let (_, x86) = host_ids(&host, prompt, Kernels::Own);
    assert_ids_agree(
        &host,
        &prompt_ids,
        &common::ids(&json_of(&arm, "rpi4")["ids"]),
        &x86,
        "p1 on a cortex-a72 vs x86-64, each machine's kernels",
    );

    // The Pi 5 artifact assumes dotprod and fp16, which a Cortex-A72 lacks.
    let rpi5 = compile_for(dir.path(), "rpi5");
    let out = qemu_run(&kiln, "cortex-a72", &rpi5, prompt, Kernels::Own);
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
    assert_same_ids(&ids, &expected[..8], "ort on aarch64 vs llama.cpp F32");
}

//! `examples/firmware`: a user's own pipeline (its `cargo xtask model` calls kiln's compiler as
//! a library) and a `no_std` binary that carries the default model compiled for a Raspberry
//! Pi 5, cross-built for aarch64. Under `qemu-aarch64 -cpu cortex-a76` it must answer the
//! golden prompt, tokenized by its build script, with llama.cpp's ids (the reference kernels
//! give them exactly), run its own dotprod kernels (chosen from the build's target features,
//! since nothing is detected without std), and make no `open`/`openat` system call: the
//! model is in the binary.
//!
//! Runs when `KILN_TEST_FIRMWARE` names the aarch64 firmware binary, else says it is skipped
//! and passes (`.ci/arm-lane` builds it and sets it); `KILN_TEST_QEMU` names the emulator
//! (default `qemu-aarch64-static`).

mod common;

use std::process::Command;

/// What one run printed: the kernel table, the prompt ids, the generated ids, and the system
/// calls qemu's `-strace` saw.
struct Run {
    kernels: String,
    prompt: Vec<u64>,
    ids: Vec<u64>,
    syscalls: String,
}

fn run(firmware: &str, args: &[&str]) -> Run {
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let out = Command::new(&qemu)
        .args(["-strace", "-cpu", "cortex-a76", firmware])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {qemu}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let syscalls = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("firmware {args:?}:\n{stdout}");
    assert!(out.status.success(), "{}: {stdout}{syscalls}", out.status);
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} line in {stdout}"))
            .trim()
            .to_owned()
    };
    let numbers = |text: String| -> Vec<u64> {
        text.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("an id"))
            .collect()
    };
    Run {
        kernels: line("kernels:"),
        prompt: numbers(line("prompt:")),
        ids: numbers(line("ids:")),
        syscalls,
    }
}

/// The ids of `case["Q4_1"]` (the default model as shipped), the first `n`.
fn golden_ids(case: &serde_json::Value, n: usize) -> Vec<u64> {
    case["Q4_1"]["generated_ids"].as_array().expect("ids")[..n]
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
}

#[test]
fn the_firmware_answers_the_golden_prompt_without_opening_a_file() {
    let Ok(firmware) = std::env::var("KILN_TEST_FIRMWARE") else {
        println!("skipped: set KILN_TEST_FIRMWARE to examples/firmware's aarch64 binary (see .ci/arm-lane)");
        return;
    };
    let case = common::golden_case("p1");
    let prompt: Vec<u64> = case["prompt_ids"]
        .as_array()
        .expect("prompt ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect();

    let reference = run(&firmware, &["reference"]);
    assert!(
        reference.kernels.starts_with("generic "),
        "{}",
        reference.kernels
    );
    assert_eq!(reference.prompt, prompt, "the build script's tokenization");
    assert_eq!(reference.ids, golden_ids(&case, reference.ids.len()));
    assert_eq!(reference.ids.len(), 8, "eight tokens, no end of generation");

    // Its own kernels may take the other side of a near tie later on (`arm_qemu.rs` holds
    // each level to its budget, teacher-forced); the first token leads by 2.5 in llama.cpp's
    // logits.
    let own = run(&firmware, &[]);
    assert!(
        own.kernels.starts_with("aarch64 dotprod "),
        "no_std picks the build's target features: {}",
        own.kernels
    );
    assert_eq!(own.ids[0], reference.ids[0]);

    for run in [&reference, &own] {
        let opens: Vec<&str> = run
            .syscalls
            .lines()
            .filter(|l| l.contains(" open(") || l.contains(" openat("))
            .collect();
        assert!(opens.is_empty(), "the firmware opened files: {opens:?}");
        assert!(
            run.syscalls.contains(" write("),
            "qemu's -strace reported no system calls: {}",
            run.syscalls
        );
    }
}

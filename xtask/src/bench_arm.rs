//! `cargo xtask bench --arch aarch64`: no ARM board is reachable, so this measures a
//! deterministic proxy for speed: **guest instructions executed per prompt token and per
//! decoded token under qemu-user**, counted by a small TCG plugin (`qemu/insn_count.c`), for
//! kiln cross-built for aarch64 and llama.cpp cross-built for the same instruction set, on the
//! same model, one thread, each level on the qemu CPU model that has it:
//!
//! | level   | kiln artifact (layout)     | qemu `-cpu`  | llama.cpp `GGML_CPU_ARM_ARCH` |
//! | neon    | rpi4 (4x4)                 | cortex-a72   | armv8-a                       |
//! | dotprod | rpi5 (4x4)                 | cortex-a76   | armv8.2-a+dotprod             |
//! | i8mm    | aarch64-i8mm (4x8)         | max          | armv8.6-a+i8mm                |
//!
//! Counts are differences of two runs (`-p P1` vs `-p P2`, `-n N1` vs `-n N2`, no warm-up), so
//! loading and start-up cancel. Instructions are not time — a `sdot` and an `add` count the same
//! and memory stalls count nothing — so the table is a proxy, said so wherever it is printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use kiln_runtime::kernels::Level;
use serde::Serialize;

use crate::llama_bench::{self, Build, LlamaCpp};
use kiln_compiler::pipeline::{build, cache};

/// The plugin's source, compiled once with the host's `gcc`.
const PLUGIN_SOURCE: &str = include_str!("qemu/insn_count.c");
/// Prompt lengths and decode counts whose differences are measured.
const PROMPTS: [usize; 2] = [16, 48];
const DECODES: [usize; 2] = [4, 20];

/// One aarch64 level and how it is run.
struct Setup {
    level: Level,
    target: &'static str,
    cpu: &'static str,
    build: Build,
}

const SETUPS: [Setup; 3] = [
    Setup {
        level: Level::Neon,
        target: "rpi4",
        cpu: "cortex-a72",
        build: Build::Armv8,
    },
    Setup {
        level: Level::Dotprod,
        target: "rpi5",
        cpu: "cortex-a76",
        build: Build::Armv82Dotprod,
    },
    Setup {
        level: Level::I8mm,
        target: "aarch64-i8mm",
        cpu: "max",
        build: Build::Armv86I8mm,
    },
];

/// Instructions per token of one engine at one level.
#[derive(Debug, Serialize)]
pub struct Counted {
    pub prompt: f64,
    pub decode: f64,
}

/// One level's row.
#[derive(Debug, Serialize)]
pub struct ArmRow {
    pub level: &'static str,
    pub qemu_cpu: &'static str,
    pub llama_cpp_build: &'static str,
    pub kiln: Counted,
    pub llama_cpp: Counted,
}

/// The plugin, compiled into the cache (named by a hash of its source) unless there.
pub fn plugin() -> anyhow::Result<PathBuf> {
    let dir = cache::kiln_home()?.join("qemu-plugin");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hash: String = <sha2::Sha256 as sha2::Digest>::digest(PLUGIN_SOURCE)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let lib = dir.join(format!("insn_count-{hash}.so"));
    if lib.is_file() {
        return Ok(lib);
    }
    let src = dir.join(format!("insn_count-{hash}.c"));
    std::fs::write(&src, PLUGIN_SOURCE).with_context(|| format!("writing {}", src.display()))?;
    let tmp = dir.join(format!(".insn_count-{hash}.so"));
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .context("running gcc (apt-get install gcc)")?;
    ensure!(
        status.success(),
        "gcc failed building the qemu plugin ({status})"
    );
    std::fs::rename(&tmp, &lib).with_context(|| format!("writing {}", lib.display()))?;
    Ok(lib)
}

/// Guest instructions `cmd` (an aarch64 program and its arguments) executes on a qemu `cpu`.
pub fn count(plugin: &Path, cpu: &str, program: &Path, args: &[&str]) -> anyhow::Result<u64> {
    let out = tempfile::NamedTempFile::new().context("a file for the count")?;
    let plugin_arg = format!("{},out={}", plugin.display(), out.path().display());
    let qemu = std::env::var("KILN_QEMU_DYNAMIC").unwrap_or_else(|_| "qemu-aarch64".into());
    let run = Command::new(&qemu)
        .args(["-cpu", cpu, "-plugin", &plugin_arg])
        .arg(program)
        .args(args)
        .env_remove("KILN_KERNELS")
        .output()
        .with_context(|| {
            format!("running {qemu} (apt-get install qemu-user: the static one loads no plugins)")
        })?;
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        bail!(
            "{} under qemu -cpu {cpu} failed ({}): {}",
            program.display(),
            run.status,
            stderr.lines().rev().take(4).collect::<Vec<_>>().join(" / ")
        );
    }
    let text = std::fs::read_to_string(out.path()).context("reading the plugin's count")?;
    text.trim()
        .parse()
        .with_context(|| format!("the plugin wrote {text:?}"))
}

/// `(count(b) − count(a)) / (b − a)` for the two sizes of `sizes`, `run(size)` counting.
fn per_token(
    sizes: [usize; 2],
    mut run: impl FnMut(usize) -> anyhow::Result<u64>,
) -> anyhow::Result<f64> {
    let (a, b) = (run(sizes[0])?, run(sizes[1])?);
    ensure!(
        b > a,
        "the longer run executed fewer instructions ({b} vs {a})"
    );
    Ok((b - a) as f64 / (sizes[1] - sizes[0]) as f64)
}

/// Counts kiln and llama.cpp at every level for `model` compiled with `--quant quant` (a
/// format's name, or `copy`); `gguf` is llama.cpp's file at that quantization. `levels` picks
/// some (none: all).
pub fn run(model: &str, quant: &str, gguf: &Path, levels: &[Level]) -> anyhow::Result<Vec<ArmRow>> {
    let plugin = plugin()?;
    let dir = cache::kiln_home()?.join("artifacts/aarch64");
    let mut rows = Vec::new();
    for s in SETUPS
        .iter()
        .filter(|s| levels.is_empty() || levels.contains(&s.level))
    {
        let built = build::build(&build::Args {
            target: s.target.to_owned(),
            model: model.to_owned(),
            quant: Some(quant.to_owned()),
            out_dir: Some(dir.join(s.target)),
            json: true,
        })?;
        let llama: LlamaCpp = llama_bench::ensure(s.build)?;
        let kiln = |p: usize, n: usize| {
            let (p, n) = (p.to_string(), n.to_string());
            let art = built.artifact.to_string_lossy().into_owned();
            count(
                &plugin,
                s.cpu,
                &built.binary,
                &[
                    "bench",
                    &art,
                    "-p",
                    &p,
                    "-n",
                    &n,
                    "-t",
                    "1",
                    "-r",
                    "1",
                    "--no-warmup",
                    "--json",
                ],
            )
        };
        let g = gguf.to_string_lossy().into_owned();
        let llama_run = |p: usize, n: usize| {
            let (p, n) = (p.to_string(), n.to_string());
            count(
                &plugin,
                s.cpu,
                &llama.bench,
                &[
                    "-m",
                    &g,
                    "-p",
                    &p,
                    "-n",
                    &n,
                    "-t",
                    "1",
                    "-r",
                    "1",
                    "--no-warmup",
                ],
            )
        };
        eprintln!(
            "aarch64 {}: counting kiln and llama.cpp {} under qemu -cpu {}",
            s.level,
            s.build.name(),
            s.cpu
        );
        let row = ArmRow {
            level: s.level.name(),
            qemu_cpu: s.cpu,
            llama_cpp_build: s.build.name(),
            kiln: Counted {
                prompt: per_token(PROMPTS, |p| kiln(p, 1))?,
                decode: per_token(DECODES, |n| kiln(1, n))?,
            },
            llama_cpp: Counted {
                prompt: per_token(PROMPTS, |p| llama_run(p, 0))?,
                decode: per_token(DECODES, |n| llama_run(0, n))?,
            },
        };
        eprintln!(
            "  prompt {:.1}M vs {:.1}M, decode {:.1}M vs {:.1}M instructions per token",
            row.kiln.prompt / 1e6,
            row.llama_cpp.prompt / 1e6,
            row.kiln.decode / 1e6,
            row.llama_cpp.decode / 1e6
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The rows as an aligned text table.
pub fn table(rows: &[ArmRow]) -> String {
    let mut out = String::from(
        "| level (qemu -cpu, llama.cpp build) | kiln M instr / prompt token | llama.cpp | ratio | kiln M instr / decoded token | llama.cpp | ratio |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} ({}, {}) | {:.1} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.2}× |\n",
            r.level,
            r.qemu_cpu,
            r.llama_cpp_build,
            r.kiln.prompt / 1e6,
            r.llama_cpp.prompt / 1e6,
            r.kiln.prompt / r.llama_cpp.prompt,
            r.kiln.decode / 1e6,
            r.llama_cpp.decode / 1e6,
            r.kiln.decode / r.llama_cpp.decode
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin counts exactly: a static aarch64 program of `1 + 2N + 3` instructions (a
    /// loop of `N` `subs`/`b.ne` pairs between a load and the exit system call) counts
    /// `2N + 4`. Needs gcc, aarch64-linux-gnu-gcc and qemu-user (the ARM lane has them);
    /// skipped elsewhere unless `KILN_TEST_QEMU_PLUGIN=1` demands them.
    #[test]
    fn the_counting_plugin_counts_a_loop_exactly() {
        let required = std::env::var("KILN_TEST_QEMU_PLUGIN").is_ok_and(|v| v == "1");
        let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
        if !(have("gcc") && have("aarch64-linux-gnu-gcc") && have("qemu-aarch64")) {
            assert!(
                !required,
                "gcc, aarch64-linux-gnu-gcc and qemu-aarch64 are needed"
            );
            println!("skipped: no gcc, aarch64-linux-gnu-gcc or qemu-aarch64 (qemu-user)");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let asm = dir.path().join("loop.S");
        std::fs::write(
            &asm,
            ".global _start\n_start:\n    ldr x0, =COUNT\n1:  subs x0, x0, #1\n    b.ne 1b\n    mov x8, #93\n    mov x0, #0\n    svc #0\n",
        )
        .expect("write");
        let plugin = plugin().expect("the plugin builds");
        for n in [1000u64, 25_000] {
            let exe = dir.path().join(format!("loop{n}"));
            let status = Command::new("aarch64-linux-gnu-gcc")
                .args(["-nostdlib", "-static", &format!("-DCOUNT={n}"), "-o"])
                .arg(&exe)
                .arg(&asm)
                .status()
                .expect("aarch64-linux-gnu-gcc");
            assert!(status.success());
            let counted = count(&plugin, "cortex-a76", &exe, &[]).expect("count");
            assert_eq!(counted, 2 * n + 4, "loop of {n}");
        }
    }
}

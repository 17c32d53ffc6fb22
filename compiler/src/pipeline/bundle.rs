//! `kilnc bundle`: one archive with everything a device needs — the `kiln` binary built
//! for the target, the model compiled for it, a systemd unit serving it, an install script and
//! a manifest with every file's sha256 — for `kilnc flash` to install.
//!
//! The binary and the artifact come from `kilnc build`'s pipeline (so a model over the
//! target's memory budget is refused by the compiler with the numbers), or, with `--binary` and
//! `--artifact`, from files that pipeline already wrote. The archive is a gzip-compressed tar
//! written to a temporary file beside the output and renamed over it when complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use kiln_runtime::exec::{MemoryPlan, SessionOptions};
use kiln_targets::{Backend, ExecutionProvider};
use sha2::{Digest, Sha256};

use crate::pipeline::{build, cache, compile};

/// Package `kiln`, a model and a systemd unit for a device into one archive.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The archive (tar + gzip) holds bin/kiln, models/<model>.<quant>.kiln, \
kiln.service (a systemd unit running `kiln serve` on the model at boot, DynamicUser=yes, \
Restart=on-failure), install.sh (what `kilnc flash` runs on the device), SHA256SUMS and \
manifest.json (kiln version, git commit, target, triple, model, quant, every file's sha256, the \
predicted peak memory and the target's budget). Install it with `kilnc flash --to \
ssh://pi@raspberrypi` or `--to /media/$USER/rootfs`.\n\nExample:\n  kilnc bundle --target \
rpi5 --model smollm2-135m-instruct"
)]
pub struct Args {
    /// The device (`kilnc targets` lists them).
    #[arg(long)]
    pub target: String,
    /// A model card name (fetched on demand), a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Weight storage (default: the target's; see `kilnc compile --help`).
    #[arg(long)]
    pub quant: Option<String>,
    /// The archive to write (default: `dist/<target>/kiln-bundle.tar.gz` in the current directory).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// On a target that reaches an accelerator through onnxruntime (a Jetson's CUDA/TensorRT,
    /// a QCS6490's QNN), bundle the `.kiln` for the CPU anyway. Without it such a bundle is
    /// refused, since the onnxruntime kiln can fetch has no accelerator provider.
    #[arg(long)]
    pub cpu_only: bool,
    /// Package this already built `kiln` binary instead of building one (needs --artifact).
    #[arg(long, requires = "artifact", value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// Package this already compiled `.kiln` artifact instead of compiling (needs --binary).
    #[arg(long, requires = "binary", value_name = "FILE")]
    pub artifact: Option<PathBuf>,
    /// The address the installed server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port the installed server listens on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences the installed server generates at once (`kiln serve --parallel`): each has
    /// its own KV cache and buffers, and all of them must fit the target's memory budget.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Print a JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The default archive of a target: `dist/<target>/kiln-bundle.tar.gz`.
pub fn default_bundle(target: &str) -> PathBuf {
    Path::new("dist").join(target).join("kiln-bundle.tar.gz")
}

/// The commit the workspace is at (`-dirty` with uncommitted changes), when git can say.
fn git_commit() -> Option<String> {
    let root = build::kiln_source();
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// The peak memory the compiler predicts for `artifact` at the target's context, as
/// `kilnc compile` states it.
fn predicted_memory(artifact: &Path, target_context: usize) -> anyhow::Result<MemoryPlan> {
    let bytes =
        std::fs::read(artifact).with_context(|| format!("reading {}", artifact.display()))?;
    let parsed = kiln_runtime::artifact::parse(&bytes)
        .with_context(|| format!("{} is not a valid .kiln artifact", artifact.display()))?;
    let options = SessionOptions {
        context: target_context.min(parsed.meta.facts.context_length),
        ..SessionOptions::default()
    };
    Ok(MemoryPlan::new(&parsed.meta, &options)
        .with_context(|| format!("planning the memory of {}", artifact.display()))?
        .with_tokenizer(parsed.tokenizer.len()))
}

/// Where and how the unit serves: the listening address and what the memory budget was
/// checked with (the context, the threads, 0: every core; the slots).
struct Serving<'a> {
    host: &'a str,
    port: u16,
    context: usize,
    threads: usize,
    parallel: u16,
    budget: Option<u64>,
}

/// The systemd unit that serves `artifact` (a file name under `models/`) at boot, with the
/// context and threads its memory was checked at.
fn service_unit(model: &str, artifact: &str, serving: &Serving<'_>) -> String {
    let memory = serving
        .budget
        .map(|b| format!("MemoryMax={b}\n"))
        .unwrap_or_default();
    let threads = match serving.threads {
        0 => String::new(),
        t => format!(" -t {t}"),
    };
    let parallel = match serving.parallel {
        1 => String::new(),
        n => format!(" --parallel {n}"),
    };
    let (host, port, context) = (serving.host, serving.port, serving.context);
    format!(
        "# Installed by `kilnc flash`: kiln serving {model} over HTTP.\n\
         [Unit]\n\
         Description=kiln LLM server ({model})\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart=/opt/kiln/current/bin/kiln serve /opt/kiln/current/models/{artifact} --host {host} --port {port} --ctx-size {context}{threads}{parallel}\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         DynamicUser=yes\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         {memory}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The script `kilnc flash` runs on the device once the release's files are in place.
pub const INSTALL_SH: &str = include_str!("install.sh");

/// Refuses to bundle a target's model for the CPU alone when the target expects an
/// accelerator through onnxruntime, unless `cpu_only` says so: the message names the library
/// the device needs.
fn check_accelerators(target: &kiln_targets::Target, cpu_only: bool) -> anyhow::Result<()> {
    let accelerators: Vec<&str> = target
        .execution_providers
        .iter()
        .filter(|p| !matches!(p, ExecutionProvider::Cpu | ExecutionProvider::Xnnpack))
        .map(|p| p.key())
        .collect();
    if target.backend != Backend::Ort || accelerators.is_empty() || cpu_only {
        return Ok(());
    }
    bail!(
        "{} reaches its accelerator through onnxruntime's {} provider{}, which the onnxruntime \
         kiln fetches for {} does not have (it is CPU-only): the device needs a libonnxruntime.so \
         built with {} (for a Jetson, JetPack's onnxruntime-gpu; for Qualcomm, the QNN SDK's), \
         with model.onnx from `kilnc export`. Pass --cpu-only to bundle the .kiln for the CPU \
         instead; nothing was written",
        target.name,
        accelerators.join(", "),
        if accelerators.len() == 1 { "" } else { "s" },
        target.triple,
        accelerators.join(" and ")
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = compile::resolve_target(&args.target)?;
    check_accelerators(&target, args.cpu_only)?;
    let quant = args
        .quant
        .clone()
        .unwrap_or_else(|| target.defaults.quant.clone());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_bundle(&target.name));
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    // Built files go beside the archive so nothing large crosses file systems.
    let staging = tempfile::Builder::new()
        .prefix(".kiln-bundle-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;

    let (binary, artifact) = match (&args.binary, &args.artifact) {
        (Some(binary), Some(artifact)) => {
            eprintln!(
                "bundle: packaging {} and {} (already built)",
                binary.display(),
                artifact.display()
            );
            (binary.clone(), artifact.clone())
        }
        _ => {
            eprintln!(
                "bundle: building kiln and compiling {} for {}",
                args.model, target.name
            );
            let built = build::build(&build::Args {
                target: target.name.clone(),
                model: args.model.clone(),
                quant: Some(quant.clone()),
                out_dir: Some(staging.path().join("build")),
                json: true,
            })?;
            (built.binary, built.artifact)
        }
    };
    let artifact_file = artifact
        .file_name()
        .with_context(|| format!("{} names no file", artifact.display()))?
        .to_string_lossy()
        .into_owned();
    let model_name = artifact_file
        .strip_suffix(".kiln")
        .and_then(|s| s.strip_suffix(&format!(".{quant}")))
        .unwrap_or(artifact_file.trim_end_matches(".kiln"))
        .to_owned();

    eprintln!(
        "bundle: checking the predicted memory against the {} budget",
        target.name
    );
    let plan = predicted_memory(&artifact, target.defaults.context)?;
    // The weights are mapped once; every slot has a session of its own.
    let peak = (plan.total() + (usize::from(args.parallel) - 1) * plan.session_bytes()) as u64;
    if let Some(budget) = target.memory.budget {
        if peak > budget {
            bail!(
                "{} needs {:.1} MB at a {}-token context{}, over the {} memory budget of {:.1} \
                 MB; nothing was written (try a smaller --quant{})",
                artifact.display(),
                peak as f64 / 1e6,
                plan.context,
                match args.parallel {
                    1 => String::new(),
                    n => format!(
                        " with {n} slots of {:.1} MB",
                        plan.session_bytes() as f64 / 1e6
                    ),
                },
                target.name,
                budget as f64 / 1e6,
                if args.parallel > 1 {
                    " or --parallel"
                } else {
                    ""
                }
            );
        }
    }

    eprintln!("bundle: writing {}", out.display());
    let service = service_unit(
        &model_name,
        &artifact_file,
        &Serving {
            host: &args.host,
            port: args.port,
            context: plan.context,
            threads: target.defaults.threads,
            parallel: args.parallel,
            budget: target.memory.budget,
        },
    );
    let small = staging.path().join("small");
    std::fs::create_dir_all(&small)?;
    std::fs::write(small.join("kiln.service"), &service)?;
    std::fs::write(small.join("install.sh"), INSTALL_SH)?;
    // (name in the archive, file, executable)
    let files: Vec<(String, PathBuf, bool)> = vec![
        ("bin/kiln".into(), binary.clone(), true),
        (format!("models/{artifact_file}"), artifact.clone(), false),
        ("kiln.service".into(), small.join("kiln.service"), false),
        ("install.sh".into(), small.join("install.sh"), true),
    ];
    let mut sums = serde_json::Map::new();
    let mut sums_text = String::new();
    for (name, path, _) in &files {
        let sum = cache::sha256_file(path)?;
        sums_text.push_str(&format!("{sum}  {name}\n"));
        sums.insert(name.clone(), sum.into());
    }
    let release = format!(
        "{}-{}",
        env!("CARGO_PKG_VERSION"),
        &cache::hex(&Sha256::digest(sums_text.as_bytes()))[..12]
    );
    let manifest = serde_json::json!({
        "format": 1,
        "release": release,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
        "target": target.name,
        "triple": target.triple,
        "model": model_name,
        "quant": quant,
        "artifact": format!("models/{artifact_file}"),
        "listen": format!("{}:{}", args.host, args.port),
        "memory": {
            "predicted_peak_bytes": peak,
            "context": plan.context,
            "parallel": args.parallel,
            "budget_bytes": target.memory.budget,
            "plan": plan,
        },
        "files": sums,
    });
    let manifest_text = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::write(small.join("manifest.json"), &manifest_text)?;
    std::fs::write(small.join("SHA256SUMS"), &sums_text)?;

    let tmp = tempfile::Builder::new()
        .prefix(".kiln-bundle-")
        .suffix(".part")
        .tempfile_in(&parent)?;
    {
        let gz = flate2::write::GzEncoder::new(tmp.as_file(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        let mut all = vec![
            (
                "manifest.json".to_owned(),
                small.join("manifest.json"),
                false,
            ),
            ("SHA256SUMS".to_owned(), small.join("SHA256SUMS"), false),
        ];
        all.extend(files.iter().cloned());
        for (name, path, executable) in &all {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_size(file.metadata()?.len());
            header.set_mode(if *executable { 0o755 } else { 0o644 });
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, &mut file)
                .with_context(|| format!("adding {name} to {}", out.display()))?;
        }
        let gz = tar.into_inner()?;
        gz.finish()?.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&out)
        .with_context(|| format!("renaming the finished archive to {}", out.display()))?;
    let bytes = std::fs::metadata(&out)?.len();
    let line = format!(
        "wrote {} ({:.1} MB): release {release}, {model_name} ({quant}) for {} ({}), peak {:.1} MB{}",
        out.display(),
        bytes as f64 / 1e6,
        target.name,
        target.triple,
        peak as f64 / 1e6,
        target
            .memory
            .budget
            .map(|b| format!(" of a {:.1} MB budget", b as f64 / 1e6))
            .unwrap_or_default()
    );
    if args.json {
        let report = serde_json::json!({
            "bundle": out,
            "bytes": bytes,
            "manifest": manifest,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accelerator_target_is_refused_for_the_cpu_unless_asked() {
        let jetson = compile::resolve_target("jetson-orin-nano").expect("jetson");
        let e = check_accelerators(&jetson, false).expect_err("refused");
        let message = e.to_string();
        for phrase in [
            "cuda, tensorrt providers",
            "libonnxruntime.so",
            "--cpu-only",
        ] {
            assert!(message.contains(phrase), "{phrase}: {message}");
        }
        assert!(check_accelerators(&jetson, true).is_ok());
        let rpi5 = compile::resolve_target("rpi5").expect("rpi5");
        assert!(check_accelerators(&rpi5, false).is_ok());
    }

    #[test]
    fn the_unit_serves_the_installed_model_as_a_dynamic_user() {
        let serving = Serving {
            host: "0.0.0.0",
            port: 8080,
            context: 2048,
            threads: 4,
            parallel: 1,
            budget: Some(6 << 30),
        };
        let unit = service_unit("smollm2", "smollm2.q4_1.kiln", &serving);
        assert!(unit.contains(
            "ExecStart=/opt/kiln/current/bin/kiln serve /opt/kiln/current/models/smollm2.q4_1.kiln --host 0.0.0.0 --port 8080 --ctx-size 2048 -t 4\n"
        ), "{unit}");
        for line in [
            "Restart=on-failure",
            "DynamicUser=yes",
            "MemoryMax=6442450944",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in {unit}");
        }
        let unbudgeted = Serving {
            threads: 0,
            budget: None,
            ..serving
        };
        let unit = service_unit("m", "m.kiln", &unbudgeted);
        assert!(
            !unit.contains("MemoryMax") && !unit.contains(" -t ") && !unit.contains("--parallel"),
            "{unit}"
        );
        let slots = Serving {
            parallel: 3,
            ..serving
        };
        let unit = service_unit("m", "m.kiln", &slots);
        assert!(
            unit.contains("--ctx-size 2048 -t 4 --parallel 3\n"),
            "{unit}"
        );
    }
}

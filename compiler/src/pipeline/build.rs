//! `kilnc build`: what one device needs, in `dist/<target>/` — the `kiln` binary built
//! for the target's Rust triple and the model compiled into a `.kiln` artifact for it.
//!
//! The binary is built by the toolchain `kilnc` runs with when it has the triple's
//! standard library; otherwise by Debian's `rustc-web`, whose `libstd-rust-web-dev:<arch>`
//! packages carry standard libraries that rustup cannot download here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::pipeline::compile;

/// Cross-compile the `kiln` runtime for a device and compile a model for it, into
/// `dist/<target>/`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Writes dist/<target>/kiln and dist/<target>/<model>.<quant>.kiln. \
When the active Rust toolchain has no standard library for the target's triple (rustup cannot \
add targets here), Debian's toolchain builds it: \
`dpkg --add-architecture arm64 && apt-get update && apt-get install -y rustc-web cargo-web \
libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu`. The build directory is target/cross."
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
    /// Where to write the binary and the artifact (default: `dist/<target>` in the current directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Print a JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The Debian packages that cross-build for a triple.
struct DebianCross {
    triple: &'static str,
    /// dpkg's name for the architecture (`libstd-rust-web-dev:<arch>`).
    arch: &'static str,
    /// The cross C toolchain's package and the linker it installs.
    gcc_package: &'static str,
    linker: &'static str,
}

const DEBIAN_CROSS: &[DebianCross] = &[DebianCross {
    triple: "aarch64-unknown-linux-gnu",
    arch: "arm64",
    gcc_package: "gcc-aarch64-linux-gnu",
    linker: "aarch64-linux-gnu-gcc",
}];

/// Debian's Rust (`rustc-web`, `cargo-web`).
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";

/// What `rustc -vV` and `--print target-libdir` say about one compiler.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RustcInfo {
    /// `1.96.0`.
    release: String,
    /// The triple it runs on.
    host: String,
    /// Whether its sysroot holds a standard library for the triple asked about.
    has_std: bool,
}

/// What detection found on this machine for one triple.
#[derive(Debug)]
struct Found {
    /// The compiler `kilnc` runs with (`$RUSTC`, else `rustc`).
    active: RustcInfo,
    /// Debian's `/usr/bin/rustc`, when installed.
    debian: Option<RustcInfo>,
    /// Whether `/usr/bin/cargo` is installed.
    debian_cargo: bool,
    /// Whether `CARGO_TARGET_<TRIPLE>_LINKER` is set.
    linker_configured: bool,
    /// Whether the Debian cross linker for the triple is on `PATH`.
    linker_on_path: bool,
}

/// Which compiler builds the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The toolchain `kilnc` runs with.
    Active,
    /// Debian's `rustc-web`.
    Debian,
}

/// How the binary is built.
#[derive(Debug, PartialEq, Eq)]
struct Toolchain {
    route: Route,
    cargo: OsString,
    rustc: OsString,
    release: String,
    /// The linker cargo is given for the triple (cross builds without one configured).
    linker: Option<&'static str>,
}

impl Toolchain {
    fn describe(&self) -> String {
        let who = match self.route {
            Route::Active => "the active toolchain",
            Route::Debian => "Debian's rustc-web",
        };
        let linker = self
            .linker
            .map(|l| format!(", linked by {l}"))
            .unwrap_or_default();
        format!("rustc {} ({who}){linker}", self.release)
    }
}

/// `CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER` for `aarch64-unknown-linux-gnu`.
fn linker_var(triple: &str) -> String {
    format!(
        "CARGO_TARGET_{}_LINKER",
        triple.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

/// `1.96.0` or `1.92` → `(1, 96, 0)` / `(1, 92, 0)`; `None` if not a version.
fn version(text: &str) -> Option<(u32, u32, u32)> {
    let core = text.split(['-', ' ']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

/// Picks the toolchain for `triple` from what was `found`, or says exactly what to install.
fn choose(triple: &str, found: &Found, rust_version: &str) -> anyhow::Result<Toolchain> {
    let cross = triple != found.active.host;
    let debian = DEBIAN_CROSS.iter().find(|d| d.triple == triple);
    let linker = match (cross && !found.linker_configured, debian) {
        (false, _) => None,
        (true, Some(d)) => Some(d.linker),
        (true, None) => bail!(
            "no cross linker known for {triple}: set {} to a linker for it",
            linker_var(triple)
        ),
    };
    let mut missing: Vec<String> = Vec::new();
    if !found.active.has_std {
        let Some(d) = debian else {
            bail!(
                "the active Rust toolchain (rustc {}) has no standard library for {triple}, and kiln \
                 knows no Debian packages for it: `rustup target add {triple}`",
                found.active.release
            );
        };
        if found.debian.is_none() {
            missing.push("rustc-web".to_owned());
        }
        if !found.debian_cargo {
            missing.push("cargo-web".to_owned());
        }
        if found.debian.as_ref().is_none_or(|info| !info.has_std) {
            missing.push(format!("libstd-rust-web-dev:{}", d.arch));
        }
    }
    if let (Some(d), Some(_)) = (debian, linker) {
        if !found.linker_on_path {
            missing.push(d.gcc_package.to_owned());
        }
    }
    if found.active.has_std && missing.is_empty() {
        return Ok(Toolchain {
            route: Route::Active,
            cargo: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            rustc: std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()),
            release: found.active.release.clone(),
            linker,
        });
    }
    if !missing.is_empty() {
        let foreign = missing
            .iter()
            .find_map(|p| p.split_once(':').map(|(_, arch)| arch));
        let add_arch = foreign
            .map(|arch| format!("dpkg --add-architecture {arch} && "))
            .unwrap_or_default();
        bail!(
            "cannot build kiln for {triple}: the active Rust toolchain (rustc {}) {}, and {} not \
             installed; as root run:\n  {add_arch}apt-get update && apt-get install -y {}",
            found.active.release,
            if found.active.has_std {
                "has its standard library but no linker for it"
            } else {
                "has no standard library for it (rustup cannot add targets here)"
            },
            if missing.len() == 1 {
                format!("the Debian package {} is", missing[0])
            } else {
                format!("the Debian packages {} are", missing.join(", "))
            },
            missing.join(" ")
        );
    }
    let info = found
        .debian
        .as_ref()
        .context("Debian's rustc was found above")?;
    let (have, need) = (version(&info.release), version(rust_version));
    if have < need {
        bail!(
            "Debian's rustc-web is {}, older than the workspace's rust-version {rust_version}; \
             newer builds come from the bookworm-security suite: apt-get update && apt-get \
             install -y rustc-web cargo-web",
            info.release
        );
    }
    Ok(Toolchain {
        route: Route::Debian,
        cargo: DEBIAN_CARGO.into(),
        rustc: DEBIAN_RUSTC.into(),
        release: info.release.clone(),
        linker,
    })
}

/// Asks `rustc` for its release and host, and whether it has a standard library for `triple`;
/// `None` when it cannot be run.
fn probe(rustc: &OsString, triple: &str) -> Option<RustcInfo> {
    let out = Command::new(rustc).arg("-vV").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let (release, host) = (field("release:")?, field("host:")?);
    let has_std = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", triple])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| std::fs::read_dir(String::from_utf8_lossy(&o.stdout).trim()).ok())
        .is_some_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libstd-") && name.ends_with(".rlib")
            })
        });
    Some(RustcInfo {
        release,
        host,
        has_std,
    })
}

/// Whether `program` is an executable file in a `PATH` directory.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Looks at this machine's toolchains and picks one for `triple`.
fn detect(triple: &str) -> anyhow::Result<Toolchain> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let active = probe(&rustc, triple)
        .with_context(|| format!("cannot run {} -vV", rustc.to_string_lossy()))?;
    let found = Found {
        active,
        debian: Path::new(DEBIAN_RUSTC)
            .is_file()
            .then(|| probe(&DEBIAN_RUSTC.into(), triple))
            .flatten(),
        debian_cargo: Path::new(DEBIAN_CARGO).is_file(),
        linker_configured: std::env::var_os(linker_var(triple)).is_some(),
        linker_on_path: DEBIAN_CROSS
            .iter()
            .find(|d| d.triple == triple)
            .is_some_and(|d| on_path(d.linker)),
    };
    choose(triple, &found, env!("CARGO_PKG_RUST_VERSION"))
}

/// The kiln workspace this compiler was built from (the compiler crate's parent): the
/// runtime's source, which `build` cross-compiles, and the commit a bundle records.
pub fn kiln_source() -> &'static Path {
    let compiler = Path::new(env!("CARGO_MANIFEST_DIR"));
    compiler.parent().unwrap_or(compiler)
}

/// The artifact's file name: `<model>.<quant>.kiln`, `<model>` being the card's name or the
/// checkpoint's file or directory name.
fn artifact_name(model: &str, quant: &str) -> anyhow::Result<String> {
    let stem = Path::new(model)
        .file_stem()
        .with_context(|| format!("--model {model:?} names no file or card"))?;
    Ok(format!("{}.{quant}.kiln", stem.to_string_lossy()))
}

/// `cargo build --release -p kiln-cli --bin kiln --target <triple>` into `target_dir`
/// (cargo's output on stderr); returns the binary's path.
fn build_kiln(toolchain: &Toolchain, triple: &str, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new(&toolchain.cargo);
    cmd.args(["build", "--release", "-p", "kiln-cli", "--bin", "kiln"])
        .args(["--target", triple, "--target-dir"])
        .arg(target_dir)
        .current_dir(kiln_source())
        .env("RUSTC", &toolchain.rustc)
        .stdout(Stdio::from(std::io::stderr()));
    if let Some(linker) = toolchain.linker {
        cmd.env(linker_var(triple), linker);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", toolchain.cargo.to_string_lossy()))?;
    if !status.success() {
        bail!(
            "building kiln for {triple} with {} failed ({status})",
            toolchain.describe()
        );
    }
    Ok(target_dir.join(triple).join("release").join("kiln"))
}

/// What [`build`] wrote.
pub struct Built {
    /// The cross-built `kiln`.
    pub binary: PathBuf,
    /// The model compiled for the target.
    pub artifact: PathBuf,
    /// The JSON report `--json` prints.
    pub report: serde_json::Value,
    /// The lines printed without `--json`.
    pub summary: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let built = build(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&built.report)?);
    } else {
        println!("{}", built.summary);
    }
    Ok(())
}

/// Cross-builds `kiln` and compiles the model as `kilnc build` does, with progress on
/// stderr only; the caller prints the result.
pub fn build(args: &Args) -> anyhow::Result<Built> {
    let target = compile::resolve_target(&args.target)?;
    let triple = target.triple.clone();
    let toolchain = detect(&triple)?;
    eprintln!(
        "[1/3] {}: {triple}, built with {}",
        target.name,
        toolchain.describe()
    );
    let quant = args
        .quant
        .clone()
        .unwrap_or_else(|| target.defaults.quant.clone());
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| Path::new("dist").join(&target.name));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let artifact = out_dir.join(artifact_name(&args.model, &quant)?);
    let artifact_path = artifact.clone();

    eprintln!(
        "[2/3] compiling {} ({quant}) for {}",
        args.model, target.name
    );
    let started = Instant::now();
    let compiled = compile::compile(&compile::Args {
        model: args.model.clone(),
        target: target.name.clone(),
        quant: Some(quant),
        overrides: Vec::new(),
        out: artifact,
        ctx: None,
        max_memory: None,
        json: args.json,
        emit: compile::Emit::Kiln,
    })?;
    let compile_s = started.elapsed().as_secs_f64();
    eprintln!("      {} ({compile_s:.1} s)", compiled.summary);

    eprintln!("[3/3] building kiln for {triple}");
    let started = Instant::now();
    let built = build_kiln(&toolchain, &triple, &kiln_source().join("target/cross"))?;
    let binary = out_dir.join("kiln");
    std::fs::copy(&built, &binary)
        .with_context(|| format!("copying {} to {}", built.display(), binary.display()))?;
    let bytes = std::fs::metadata(&binary)?.len();
    let build_s = started.elapsed().as_secs_f64();
    let binary_line = format!(
        "wrote {} ({:.1} MB) for {triple}, built with {}",
        binary.display(),
        bytes as f64 / 1e6,
        toolchain.describe()
    );
    eprintln!("      {binary_line} ({build_s:.1} s)");

    let report = serde_json::json!({
            "target": target.name,
            "triple": triple,
            "dist": out_dir,
            "binary": { "path": binary, "bytes": bytes },
            "toolchain": {
                "route": match toolchain.route { Route::Active => "active", Route::Debian => "debian" },
                "cargo": toolchain.cargo.to_string_lossy(),
                "rustc": toolchain.rustc.to_string_lossy(),
                "release": toolchain.release,
                "linker": toolchain.linker,
            },
            "model": compiled.report,
            "seconds": { "compile": compile_s, "build": build_s },
    });
    Ok(Built {
        binary,
        artifact: artifact_path,
        report,
        summary: format!("{}\n{binary_line}", compiled.summary),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARM: &str = "aarch64-unknown-linux-gnu";

    fn info(release: &str, host: &str, has_std: bool) -> RustcInfo {
        RustcInfo {
            release: release.into(),
            host: host.into(),
            has_std,
        }
    }

    /// An x86-64 machine whose rustup toolchain lacks aarch64, with nothing from apt.
    fn bare() -> Found {
        Found {
            active: info("1.95.0", "x86_64-unknown-linux-gnu", false),
            debian: None,
            debian_cargo: false,
            linker_configured: false,
            linker_on_path: false,
        }
    }

    #[test]
    fn missing_debian_packages_are_named_with_the_exact_apt_line() {
        let e = choose(ARM, &bare(), "1.92").expect_err("nothing installed");
        let message = e.to_string();
        assert!(
            message.contains("cannot build kiln for aarch64-unknown-linux-gnu"),
            "{message}"
        );
        assert!(message.contains("no standard library"), "{message}");
        assert!(
            message.ends_with(
                "dpkg --add-architecture arm64 && apt-get update && apt-get install -y rustc-web \
                 cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu"
            ),
            "{message}"
        );

        let only_std = Found {
            debian: Some(info("1.96.0", "x86_64-unknown-linux-gnu", false)),
            debian_cargo: true,
            linker_on_path: true,
            ..bare()
        };
        let message = choose(ARM, &only_std, "1.92")
            .expect_err("no arm64 std")
            .to_string();
        assert!(
            message.ends_with(
                "the Debian package libstd-rust-web-dev:arm64 is not installed; as root run:\n  \
                 dpkg --add-architecture arm64 && apt-get update && apt-get install -y \
                 libstd-rust-web-dev:arm64"
            ),
            "{message}"
        );

        let only_linker = Found {
            debian: Some(info("1.96.0", "x86_64-unknown-linux-gnu", true)),
            debian_cargo: true,
            ..bare()
        };
        let message = choose(ARM, &only_linker, "1.92")
            .expect_err("no linker")
            .to_string();
        assert!(
            message.ends_with("apt-get update && apt-get install -y gcc-aarch64-linux-gnu")
                && !message.contains("dpkg"),
            "{message}"
        );
    }

    #[test]
    fn debian_rustc_builds_when_rustup_lacks_the_target() {
        let found = Found {
            debian: Some(info("1.96.0", "x86_64-unknown-linux-gnu", true)),
            debian_cargo: true,
            linker_on_path: true,
            ..bare()
        };
        let t = choose(ARM, &found, "1.92").expect("debian route");
        assert_eq!(t.route, Route::Debian);
        assert_eq!(t.cargo, OsString::from("/usr/bin/cargo"));
        assert_eq!(t.rustc, OsString::from("/usr/bin/rustc"));
        assert_eq!(t.linker, Some("aarch64-linux-gnu-gcc"));
        assert_eq!(
            t.describe(),
            "rustc 1.96.0 (Debian's rustc-web), linked by aarch64-linux-gnu-gcc"
        );

        let old = Found {
            debian: Some(info("1.85.0", "x86_64-unknown-linux-gnu", true)),
            ..found
        };
        let message = choose(ARM, &old, "1.92").expect_err("too old").to_string();
        assert!(
            message.contains("rustc-web is 1.85.0, older than the workspace's rust-version 1.92"),
            "{message}"
        );
    }

    #[test]
    fn the_active_toolchain_builds_when_it_has_the_target() {
        let found = Found {
            active: info("1.95.0", "x86_64-unknown-linux-gnu", true),
            linker_configured: true,
            ..bare()
        };
        let t = choose(ARM, &found, "1.92").expect("active route");
        assert_eq!((t.route, t.linker), (Route::Active, None));
        let native = Found {
            active: info("1.95.0", ARM, true),
            ..bare()
        };
        let t = choose(ARM, &native, "1.92").expect("native build");
        assert_eq!((t.route, t.linker), (Route::Active, None));
        let e = choose("riscv64gc-unknown-linux-gnu", &bare(), "1.92").expect_err("unknown");
        assert!(
            e.to_string()
                .contains("CARGO_TARGET_RISCV64GC_UNKNOWN_LINUX_GNU_LINKER"),
            "{e}"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version("1.96.0"), Some((1, 96, 0)));
        assert_eq!(version("1.92"), Some((1, 92, 0)));
        assert_eq!(version("1.100.0-nightly"), Some((1, 100, 0)));
        assert!(version("1.100.0") > version("1.96"));
        assert_eq!(version("x.y"), None);
    }

    #[test]
    fn artifacts_are_named_after_the_model_and_quant() {
        let name = |m| artifact_name(m, "q4_1").expect("name");
        assert_eq!(
            name("smollm2-135m-instruct"),
            "smollm2-135m-instruct.q4_1.kiln"
        );
        assert_eq!(name("/models/tiny.gguf"), "tiny.q4_1.kiln");
        assert_eq!(
            name("models/llama-3.2-1b-instruct.toml"),
            "llama-3.2-1b-instruct.q4_1.kiln"
        );
        assert_eq!(name("/ckpt/tiny-llama/"), "tiny-llama.q4_1.kiln");
        assert!(artifact_name("..", "q4_1").is_err());
    }
}

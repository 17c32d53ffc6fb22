//! Native llama.cpp for `cargo xtask bench --peer llama-bench`: the llama.cpp vendored in PyPI's
//! `llama-cpp-python==0.3.36` sdist (sha256-checked), built with cmake once per instruction
//! set into `$KILN_HOME/llama.cpp/`, and its `llama-bench` and `llama-quantize` run as a user
//! would run them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use sha2::{Digest, Sha256};

use kiln_compiler::pipeline::{cache, source};

/// The sdist and its sha256, as PyPI lists them.
const SDIST: &str = "llama_cpp_python-0.3.36.tar.gz";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// Where pip looks for it (PEP 503); `$KILN_PYPI_SIMPLE` overrides it (a mirror).
const PYPI_SIMPLE: &str = "https://pypi.org/simple/llama-cpp-python/";
/// The llama.cpp commit the sdist vendors.
pub const LLAMA_CPP_COMMIT: &str = "0c1e570";

/// Which instruction set llama.cpp is built for, paired with kiln's kernel levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// `-DGGML_NATIVE=ON`: everything this CPU has (AMX aside, see [`Build::cmake_flags`]).
    Native,
    /// AVX2, FMA, F16C and BMI2 only: what a Zen 3 or Haswell user's native build has.
    Avx2,
    /// AVX2 with AVX-VNNI: an Alder Lake user's native build (no AVX-512).
    AvxVnni,
    /// aarch64, cross-compiled for `-DGGML_CPU_ARM_ARCH=armv8-a` (a Raspberry Pi 4).
    Armv8,
    /// aarch64 `armv8.2-a+dotprod` (a Raspberry Pi 5, Jetson Orin).
    Armv82Dotprod,
    /// aarch64 `armv8.6-a+i8mm`.
    Armv86I8mm,
}

impl Build {
    pub fn name(self) -> &'static str {
        match self {
            Build::Native => "native",
            Build::Avx2 => "avx2",
            Build::AvxVnni => "avxvnni",
            Build::Armv8 => "armv8-a",
            Build::Armv82Dotprod => "armv8.2-a+dotprod",
            Build::Armv86I8mm => "armv8.6-a+i8mm",
        }
    }

    /// cmake flags: AVX2's explicitly; native's by `GGML_NATIVE`, except on CPUs that report
    /// AMX, whose tile instructions this machine's virtual CPUs fault on (`ldtilecfg` SIGSEGV
    /// in llama.cpp's AMX buffer): there the native set is spelled out without AMX.
    fn cmake_flags(self, cpuinfo: &str) -> Vec<String> {
        let on = |f: &str| format!("-D{f}=ON");
        let mut flags = vec!["-DGGML_NATIVE=OFF".to_owned()];
        if self.aarch64() {
            flags.extend(
                [
                    "-DCMAKE_SYSTEM_NAME=Linux",
                    "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
                    "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
                    // Static, so qemu-user needs no aarch64 libstdc++; ggml's own threads.
                    "-DCMAKE_EXE_LINKER_FLAGS=-static",
                    "-DGGML_OPENMP=OFF",
                ]
                .map(str::to_owned),
            );
            flags.push(format!("-DGGML_CPU_ARM_ARCH={}", self.name()));
            return flags;
        }
        let avx2 = [
            "GGML_AVX",
            "GGML_AVX2",
            "GGML_FMA",
            "GGML_F16C",
            "GGML_BMI2",
        ];
        match self {
            Build::Avx2 => flags.extend(avx2.iter().map(|f| on(f))),
            Build::AvxVnni => {
                flags.extend(avx2.iter().map(|f| on(f)));
                flags.push(on("GGML_AVX_VNNI"));
            }
            Build::Armv8 | Build::Armv82Dotprod | Build::Armv86I8mm => {}
            Build::Native => {
                let has = |flag: &str| {
                    cpuinfo
                        .lines()
                        .find(|l| l.starts_with("flags"))
                        .is_some_and(|l| l.split_whitespace().any(|w| w == flag))
                };
                if !has("amx_tile") {
                    return vec!["-DGGML_NATIVE=ON".to_owned()];
                }
                flags.extend(avx2.iter().map(|f| on(f)));
                for (cpu, ggml) in [
                    ("avx_vnni", "GGML_AVX_VNNI"),
                    ("avx512f", "GGML_AVX512"),
                    ("avx512vbmi", "GGML_AVX512_VBMI"),
                    ("avx512_vnni", "GGML_AVX512_VNNI"),
                    ("avx512_bf16", "GGML_AVX512_BF16"),
                ] {
                    if has(cpu) {
                        flags.push(on(ggml));
                    }
                }
            }
        }
        flags
    }
}

impl Build {
    /// Whether the build cross-compiles for aarch64 (run under qemu-user).
    pub fn aarch64(self) -> bool {
        matches!(
            self,
            Build::Armv8 | Build::Armv82Dotprod | Build::Armv86I8mm
        )
    }
}

/// The built tools of one [`Build`].
#[derive(Clone, Debug)]
pub struct LlamaCpp {
    pub build: Build,
    pub bench: PathBuf,
    pub quantize: PathBuf,
}

/// llama.cpp built for `build`, built (once, in about 10 minutes on 2 cores) if missing.
pub fn ensure(build: Build) -> anyhow::Result<LlamaCpp> {
    let root = cache::kiln_home()?.join("llama.cpp");
    let dir = root.join(format!("build-{LLAMA_CPP_COMMIT}-{}", build.name()));
    let tools = LlamaCpp {
        build,
        bench: dir.join("bin/llama-bench"),
        quantize: dir.join("bin/llama-quantize"),
    };
    if tools.bench.is_file() && (build.aarch64() || tools.quantize.is_file()) {
        return Ok(tools);
    }
    let src = ensure_source(&root)?;
    let cmake = cmake()?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&dir)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
        ])
        .args(build.cmake_flags(&cpuinfo));
    run_quiet(&mut configure, "configuring llama.cpp with cmake")?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spinner = source::spinner(&format!(
        "building llama.cpp {LLAMA_CPP_COMMIT} ({}) with {jobs} jobs, about 10 minutes on 2 cores",
        build.name()
    ));
    let mut compile = Command::new(&cmake);
    compile
        .arg("--build")
        .arg(&dir)
        .args(["-j", &jobs.to_string(), "--target", "llama-bench"]);
    // Quantizing happens on the host; a cross build needs only the benchmark.
    if !build.aarch64() {
        compile.arg("llama-quantize");
    }
    let built = run_quiet(&mut compile, "building llama.cpp");
    spinner.finish_and_clear();
    built?;
    ensure!(
        tools.bench.is_file(),
        "the llama.cpp build left no {}",
        tools.bench.display()
    );
    Ok(tools)
}

/// Runs `cmd`, showing the end of its output if it fails.
fn run_quiet(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run it"))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// `cmake` on the PATH, else installed from PyPI (`pip install --user cmake`).
fn cmake() -> anyhow::Result<PathBuf> {
    if Command::new("cmake")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(PathBuf::from("cmake"));
    }
    let python = kiln_compiler::pipeline::pypi::python_from_env();
    eprintln!("cmake is missing: installing it from PyPI");
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--user", "cmake"])
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    ensure!(status.success(), "pip install cmake failed ({status})");
    let out = Command::new(&python)
        .args([
            "-c",
            "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))",
        ])
        .output()
        .context("locating cmake")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The vendored llama.cpp, unpacked from the sdist (downloaded and sha256-checked) once.
fn ensure_source(root: &Path) -> anyhow::Result<PathBuf> {
    let src = root.join(format!("src-{LLAMA_CPP_COMMIT}"));
    if src.join("CMakeLists.txt").is_file() {
        return Ok(src);
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let sdist = download_sdist(root)?;
    let scratch = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(root)
        .with_context(|| format!("creating a scratch directory in {}", root.display()))?;
    let file =
        std::fs::File::open(&sdist).with_context(|| format!("opening {}", sdist.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let prefix = Path::new("llama_cpp_python-0.3.36/vendor/llama.cpp");
    for entry in archive.entries().context("reading the sdist")? {
        let mut entry = entry.context("reading the sdist")?;
        let path = entry.path().context("an sdist entry's path")?.into_owned();
        if let Ok(rest) = path.strip_prefix(prefix) {
            if rest.as_os_str().is_empty() {
                continue;
            }
            let dest = scratch.path().join(rest);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            entry
                .unpack(&dest)
                .with_context(|| format!("unpacking {}", path.display()))?;
        }
    }
    ensure!(
        scratch.path().join("CMakeLists.txt").is_file(),
        "{} holds no vendor/llama.cpp",
        sdist.display()
    );
    let unpacked = scratch.keep();
    std::fs::rename(&unpacked, &src)
        .with_context(|| format!("moving the sources to {}", src.display()))?;
    Ok(src)
}

/// The sdist in `root`, downloaded from PyPI's simple index when missing, checked against
/// [`SDIST_SHA256`] before it is renamed into place. Python's `urllib` fetches it, so it goes
/// through the same certificates (and `SSL_CERT_FILE`) as pip.
fn download_sdist(root: &Path) -> anyhow::Result<PathBuf> {
    let path = root.join(SDIST);
    if path.is_file() && sha256_of(&path)? == SDIST_SHA256 {
        return Ok(path);
    }
    let index = std::env::var("KILN_PYPI_SIMPLE").unwrap_or_else(|_| PYPI_SIMPLE.to_owned());
    let page = String::from_utf8_lossy(&fetch(&index)?).into_owned();
    let url = sdist_url(&page, &index).with_context(|| format!("{index} lists no {SDIST}"))?;
    eprintln!("downloading {url}");
    let bytes = fetch(&url)?;
    let got = hex(&Sha256::digest(&bytes));
    ensure!(
        got == SDIST_SHA256,
        "{url}: sha256 {got}, expected {SDIST_SHA256}; not using it"
    );
    let mut tmp = tempfile::NamedTempFile::new_in(root)?;
    std::io::Write::write_all(&mut tmp, &bytes)?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The body of `url`, through Python's `urllib`.
fn fetch(url: &str) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(kiln_compiler::pipeline::pypi::python_from_env())
        .args([
            "-c",
            "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=120).read())",
            url,
        ])
        .output()
        .context("running python to download")?;
    ensure!(
        out.status.success(),
        "fetching {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    Ok(out.stdout)
}

/// The sdist's link on a PEP 503 page (relative links resolved against `index`).
fn sdist_url(page: &str, index: &str) -> Option<String> {
    let at = page.find(&format!("/{SDIST}"))?;
    let start = page[..at].rfind("href=\"")? + 6;
    let end = start + page[start..].find(['"', '#'])?;
    let link = &page[start..end];
    Some(if link.starts_with("http") {
        link.to_owned()
    } else {
        let base = index.split('/').take(3).collect::<Vec<_>>().join("/");
        format!(
            "{base}{}",
            if link.starts_with('/') {
                link.to_owned()
            } else {
                format!("/{link}")
            }
        )
    })
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `llama-quantize` from `source` to `out` at `quant` (`q4_0`, `q4_1`, `q8_0`, `f16`), keeping
/// the token embedding and output head at q8_0 for the 4-bit types, as kiln stores them.
pub fn quantize(tools: &LlamaCpp, source: &Path, out: &Path, quant: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(&tools.quantize);
    cmd.arg("--allow-requantize");
    if quant.starts_with("q4") {
        cmd.args([
            "--token-embedding-type",
            "q8_0",
            "--output-tensor-type",
            "q8_0",
        ]);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Absolute paths: llama-quantize reads an argument that starts with a digit as a type.
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    cmd.arg(abs(source))
        .arg(abs(out))
        .arg(quant)
        .arg(threads.to_string());
    run_quiet(&mut cmd, "llama-quantize")
}

/// What one `llama-bench` process measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_mb: f64,
}

/// `llama-bench -m GGUF -t T -p P -n N -d D -r 1 -o json` with its defaults otherwise
/// (repacked weights on, f16 KV cache), under `/usr/bin/time` for the peak RSS.
pub fn bench(
    tools: &LlamaCpp,
    gguf: &Path,
    [threads, n_prompt, n_gen, depth]: [usize; 4],
) -> anyhow::Result<Measured> {
    let time = Path::new("/usr/bin/time");
    let mut cmd = if time.is_file() {
        let mut c = Command::new(time);
        c.args(["-f", "kiln-peak-rss-kb %M"]).arg(&tools.bench);
        c
    } else {
        Command::new(&tools.bench)
    };
    cmd.arg("-m").arg(gguf);
    for (flag, v) in [
        ("-t", threads),
        ("-p", n_prompt),
        ("-n", n_gen),
        ("-d", depth),
    ] {
        cmd.args([flag, &v.to_string()]);
    }
    let out = cmd
        .args(["-r", "1", "-o", "json"])
        .output()
        .context("running llama-bench")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        bail!(
            "llama-bench failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let rss_kb = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kiln-peak-rss-kb "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    parse(&String::from_utf8_lossy(&out.stdout), rss_kb)
}

/// The prompt and generation tests of `llama-bench -o json`.
fn parse(json: &str, rss_kb: Option<f64>) -> anyhow::Result<Measured> {
    let tests: Vec<serde_json::Value> =
        serde_json::from_str(json).with_context(|| format!("llama-bench printed {json:?}"))?;
    let speed = |prompt: bool| {
        tests
            .iter()
            .find(|t| {
                let (p, g) = (
                    t["n_prompt"].as_u64().unwrap_or(0),
                    t["n_gen"].as_u64().unwrap_or(0),
                );
                if prompt {
                    p > 0 && g == 0
                } else {
                    g > 0 && p == 0
                }
            })
            .and_then(|t| t["avg_ts"].as_f64())
            .with_context(|| {
                format!(
                    "llama-bench reported no {} test",
                    if prompt { "prompt" } else { "generation" }
                )
            })
    };
    Ok(Measured {
        prompt_tokens_per_s: speed(true)?,
        decode_tokens_per_s: speed(false)?,
        peak_rss_mb: rss_kb.map_or(f64::NAN, |kb| kb / 1024.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_bench_json_gives_both_speeds() {
        let json = r#"[{"n_prompt": 128, "n_gen": 0, "avg_ts": 482.5},
                       {"n_prompt": 0, "n_gen": 64, "avg_ts": 105.25}]"#;
        let m = parse(json, Some(2048.0)).expect("parses");
        assert_eq!(
            (m.prompt_tokens_per_s, m.decode_tokens_per_s, m.peak_rss_mb),
            (482.5, 105.25, 2.0)
        );
        assert!(
            parse(r#"[{"n_prompt": 128, "n_gen": 0, "avg_ts": 1}]"#, None)
                .unwrap_err()
                .to_string()
                .contains("no generation test")
        );
    }

    #[test]
    fn the_sdist_link_is_found_on_an_index_page() {
        let page =
            r#"<a href="https://files.example/ab/llama_cpp_python-0.3.36.tar.gz#sha256=83">x</a>"#;
        assert_eq!(
            sdist_url(page, PYPI_SIMPLE).as_deref(),
            Some("https://files.example/ab/llama_cpp_python-0.3.36.tar.gz")
        );
        let relative = r#"<a href="/packages/llama_cpp_python-0.3.36.tar.gz">x</a>"#;
        assert_eq!(
            sdist_url(relative, "https://mirror.example/simple/llama-cpp-python/").as_deref(),
            Some("https://mirror.example/packages/llama_cpp_python-0.3.36.tar.gz")
        );
    }

    /// AMX CPUs get the native set spelled out without AMX; others plain `GGML_NATIVE`.
    #[test]
    fn native_builds_leave_amx_out() {
        let amx = "flags\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n";
        let flags = Build::Native.cmake_flags(amx);
        assert!(flags.contains(&"-DGGML_NATIVE=OFF".to_owned()));
        assert!(flags.contains(&"-DGGML_AVX512_VNNI=ON".to_owned()));
        assert!(!flags.iter().any(|f| f.contains("AMX")));
        assert_eq!(
            Build::Native.cmake_flags("flags\t: avx2\n"),
            ["-DGGML_NATIVE=ON"]
        );
        assert!(Build::Avx2
            .cmake_flags(amx)
            .contains(&"-DGGML_AVX2=ON".to_owned()));
        assert!(!Build::Avx2
            .cmake_flags(amx)
            .iter()
            .any(|f| f.contains("512")));
    }
}

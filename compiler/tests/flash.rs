//! `cargo xtask flash` into a root file system directory and over ssh: the release layout, the
//! atomic `current` switch, keeping the previous release, rolling back when the installed
//! binary fails its smoke check, and (in the ARM lane) the installed aarch64 `kiln` answering a
//! prompt under `qemu-aarch64-static -cpu cortex-a76`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kiln_runtime::quant::Format;
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `cargo xtask`, built once per test binary with the cargo running the tests.
fn xtask() -> Command {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let bin = BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-q", "-p", "xtask"])
            .current_dir(workspace())
            .status()
            .expect("running cargo build -p xtask");
        assert!(status.success(), "building xtask failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"));
        target.join("release/xtask")
    });
    let mut cmd = Command::new(bin);
    cmd.current_dir(workspace());
    cmd
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(path: &Path) -> String {
    let out = ok(
        Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("sha256sum"),
        "sha256sum",
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a sum")
        .to_owned()
}

/// A bundle for this machine, as `cargo xtask bundle` lays it out, whose `bin/kiln` is a shell
/// script printing `version` (or failing, with `exit 1`) and whose model is the bundle's name.
fn fake_bundle(dir: &Path, name: &str, kiln_script: &str) -> PathBuf {
    bundle_with_model(dir, name, kiln_script, name.as_bytes())
}

/// [`fake_bundle`] with `model` as the model's bytes.
fn bundle_with_model(dir: &Path, name: &str, kiln_script: &str, model: &[u8]) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(src.join("bin")).expect("bin");
    std::fs::create_dir_all(src.join("models")).expect("models");
    let write = |rel: &str, text: &str, mode: u32| {
        let path = src.join(rel);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    };
    write("bin/kiln", &format!("#!/bin/sh\n{kiln_script}\n"), 0o755);
    std::fs::write(src.join("models/fake.q4_1.kiln"), model).expect("model");
    write(
        "kiln.service",
        "[Service]\nExecStart=/opt/kiln/current/bin/kiln serve\n",
        0o644,
    );
    let installer = workspace().join("compiler/src/pipeline/install.sh");
    std::fs::copy(&installer, src.join("install.sh")).expect("install.sh");
    let files = [
        "bin/kiln",
        "models/fake.q4_1.kiln",
        "kiln.service",
        "install.sh",
    ];
    let mut sums = String::new();
    let mut map = serde_json::Map::new();
    for f in files {
        let sum = sha256(&src.join(f));
        sums.push_str(&format!("{sum}  {f}\n"));
        map.insert(f.to_owned(), sum.into());
    }
    write("SHA256SUMS", &sums, 0o644);
    let manifest = serde_json::json!({
        "format": 1,
        "release": format!("0.1.0-{name}"),
        "target": "host",
        "triple": format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        "model": "fake",
        "quant": "q4_1",
        "files": map,
    });
    write("manifest.json", &manifest.to_string(), 0o644);
    let bundle = dir.join(format!("{name}.tar.gz"));
    ok(
        Command::new("tar")
            .arg("czf")
            .arg(&bundle)
            .arg("-C")
            .arg(&src)
            .args(["manifest.json", "SHA256SUMS"])
            .args(files)
            .output()
            .expect("tar"),
        "tar",
    );
    bundle
}

fn flash(bundle: &Path, to: &str, extra: &[&str]) -> Output {
    xtask()
        .args(["flash", "--json", "--bundle"])
        .arg(bundle)
        .args(["--to", to])
        .args(extra)
        .output()
        .expect("running cargo xtask flash")
}

fn current(root: &Path) -> String {
    std::fs::read_link(root.join("opt/kiln/current"))
        .expect("current is a symlink")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_second_flash_switches_current_keeps_the_previous_release_and_a_bad_one_rolls_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root).expect("root");
    let to = root.to_str().expect("utf-8 path");
    let one = fake_bundle(dir.path(), "one", "echo kiln 0.1.0 one");
    let two = fake_bundle(dir.path(), "two", "echo kiln 0.1.0 two");
    let bad = fake_bundle(dir.path(), "bad", "echo broken >&2; exit 1");

    let out = ok(flash(&one, to, &["--target", "host"]), "first flash");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["release"], "0.1.0-one");
    assert_eq!(current(&root), "releases/0.1.0-one");
    let unit = root.join("etc/systemd/system/kiln.service");
    assert!(std::fs::read_to_string(&unit)
        .expect("unit")
        .contains("ExecStart"));

    ok(flash(&two, to, &[]), "second flash");
    assert_eq!(current(&root), "releases/0.1.0-two");
    assert!(root.join("opt/kiln/releases/0.1.0-one/bin/kiln").is_file());
    let installed = ok(
        Command::new(root.join("opt/kiln/current/bin/kiln"))
            .arg("--version")
            .output()
            .expect("installed kiln"),
        "installed kiln",
    );
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout),
        "kiln 0.1.0 two\n"
    );

    let out = flash(&bad, to, &[]);
    assert!(
        !out.status.success(),
        "a failing smoke check must fail the flash"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rolled back to releases/0.1.0-two"),
        "{stderr}"
    );
    assert!(stderr.contains("`current` was switched back"), "{stderr}");
    assert_eq!(current(&root), "releases/0.1.0-two");
    assert!(root.join("opt/kiln/releases/0.1.0-one").is_dir());
    // No temporary names are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(root.join("opt/kiln"))
        .expect("opt/kiln")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A release whose real kiln cannot load its model (a truncated artifact) rolls back too.
    let kiln = common::kiln_binary();
    let mut torn_model = std::fs::read(common::smollm2_artifact(Format::Q4_1)).expect("artifact");
    torn_model.truncate(torn_model.len() / 2);
    let unloadable = bundle_with_model(
        dir.path(),
        "unloadable",
        &format!("exec {} \"$@\"", kiln.display()),
        &torn_model,
    );
    let out = flash(&unloadable, to, &[]);
    assert!(
        !out.status.success(),
        "a model that cannot load must fail the flash"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not load fake.q4_1.kiln and generate a token")
            && stderr.contains("rolled back to releases/0.1.0-two"),
        "{stderr}"
    );
    assert_eq!(current(&root), "releases/0.1.0-two");

    // A bundle for another device is refused before anything changes.
    let out = flash(&one, to, &["--target", "rpi5"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a bundle for \"host\", not \"rpi5\""),
        "{stderr}"
    );
    assert_eq!(current(&root), "releases/0.1.0-two");

    // A damaged archive is refused with a clear error.
    let torn = dir.path().join("torn.tar.gz");
    let bytes = std::fs::read(&two).expect("bundle");
    std::fs::write(&torn, &bytes[..bytes.len() / 2]).expect("torn");
    let out = flash(&torn, to, &[]);
    assert!(!out.status.success());
    assert_eq!(current(&root), "releases/0.1.0-two");
}

/// The ARM lane's cross-built `kiln` and default model (see arm_qemu.rs), when it runs.
fn qemu_inputs() -> Option<(PathBuf, PathBuf)> {
    let kiln = std::env::var_os("KILN_TEST_QEMU_KILN").map(PathBuf::from);
    let artifact = std::env::var_os("KILN_TEST_QEMU_ARTIFACT").map(PathBuf::from);
    match (kiln, artifact) {
        (Some(k), Some(a)) => Some((k, a)),
        _ => {
            eprintln!(
                "skipped: set KILN_TEST_QEMU_KILN and KILN_TEST_QEMU_ARTIFACT (.ci/arm-lane does)"
            );
            None
        }
    }
}

#[test]
fn the_installed_aarch64_kiln_answers_a_prompt_under_qemu() {
    let Some((kiln, artifact)) = qemu_inputs() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("rpi5.tar.gz");
    let out = ok(
        xtask()
            .args(["bundle", "--target", "rpi5", "--json", "--binary"])
            .arg(&kiln)
            .arg("--artifact")
            .arg(&artifact)
            .arg("-o")
            .arg(&bundle)
            .output()
            .expect("cargo xtask bundle"),
        "bundle",
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let manifest = &report["manifest"];
    assert_eq!(manifest["triple"], "aarch64-unknown-linux-gnu");
    assert!(manifest["memory"]["predicted_peak_bytes"].as_u64() > Some(0));
    assert_eq!(manifest["memory"]["budget_bytes"], 6_442_450_944u64);

    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root).expect("root");
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let runner = format!("{qemu} -cpu cortex-a76");
    ok(
        flash(
            &bundle,
            root.to_str().expect("utf-8"),
            &["--target", "rpi5", "--runner", &runner],
        ),
        "flash",
    );
    let current = root.join("opt/kiln/current");
    let model = current.join(manifest["artifact"].as_str().expect("artifact"));
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/kiln.service")).expect("unit");
    // The unit serves at the context the memory budget was checked at.
    assert!(
        unit.contains(&format!(
            "/opt/kiln/current/bin/kiln serve /opt/kiln/current/{} --host 127.0.0.1 --port 8080 \
             --ctx-size {}",
            manifest["artifact"].as_str().expect("artifact"),
            manifest["memory"]["context"]
        )),
        "{unit}"
    );

    let case = common::golden()["greedy"]["cases"][0].clone();
    let out = ok(
        Command::new(&qemu)
            // The reference kernels give llama.cpp's ids exactly; the device's own kernels may
            // take the other side of a near tie (`arm_qemu.rs` checks those).
            .env("KILN_KERNELS", "generic")
            .args(["-cpu", "cortex-a76"])
            .arg(current.join("bin/kiln"))
            .arg("run")
            .arg(&model)
            .args(["-p", case["prompt"].as_str().expect("prompt")])
            .args(["-n", "8", "--temp", "0", "--json"])
            .output()
            .expect("qemu"),
        "the installed kiln under qemu",
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("kiln run --json");
    let want: Vec<Value> = case["Q4_1"]["generated_ids"].as_array().expect("ids")[..8].to_vec();
    assert_eq!(v["ids"].as_array().expect("ids"), &want, "{v}");
    assert!(
        v["text"].as_str().expect("text").starts_with(" Paris"),
        "{v}"
    );
}

/// An sshd on a free loopback port with throwaway host and user keys, killed when dropped.
struct Sshd {
    child: std::process::Child,
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `/usr/sbin/sshd` as root, or says why it cannot (not root, not installed).
fn sshd(dir: &Path) -> Option<Sshd> {
    let sshd = Path::new("/usr/sbin/sshd");
    let uid = Command::new("id").arg("-u").output().ok()?;
    if !sshd.is_file() || String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("skipped: needs root and /usr/sbin/sshd (apt-get install -y openssh-server)");
        return None;
    }
    let keygen = |path: &Path| {
        ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .output()
                .expect("ssh-keygen"),
            "ssh-keygen",
        );
    };
    let (host_key, key) = (dir.join("host_key"), dir.join("user_key"));
    keygen(&host_key);
    keygen(&key);
    let authorized = dir.join("authorized_keys");
    std::fs::copy(dir.join("user_key.pub"), &authorized).expect("authorized_keys");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .expect("sshd_config");
    // sshd refuses to start without its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .args(["-p", &port.to_string()])
        .stderr(std::fs::File::create(dir.join("sshd.log")).expect("log"))
        .spawn()
        .expect("starting sshd");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Some(Sshd {
        child,
        port,
        key,
        known_hosts: dir.join("known_hosts"),
    })
}

#[test]
fn flashing_over_ssh_installs_checks_and_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(sshd) = sshd(dir.path()) else {
        return;
    };
    let device_root = dir.path().join("device");
    std::fs::create_dir_all(&device_root).expect("device root");
    let to = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port,
        device_root.display()
    );
    let known = format!("UserKnownHostsFile={}", sshd.known_hosts.display());
    let key = sshd.key.to_str().expect("utf-8").to_owned();
    let ssh_flash = |bundle: &Path| {
        flash(
            bundle,
            &to,
            &["--target", "host", "-i", &key, "--ssh-option", &known],
        )
    };
    let log = || std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default();
    let one = fake_bundle(dir.path(), "one", "echo kiln 0.1.0 one");
    let out = ssh_flash(&one);
    assert!(
        out.status.success(),
        "{}\nsshd: {}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(
        report["copied"].as_array().map(Vec::len),
        Some(5),
        "{report}"
    );
    assert_eq!(current(&device_root), "releases/0.1.0-one");
    let release = device_root.join("opt/kiln/releases/0.1.0-one");
    for f in [
        "bin/kiln",
        "models/fake.q4_1.kiln",
        "kiln.service",
        "install.sh",
        "manifest.json",
    ] {
        assert!(release.join(f).is_file(), "{f} missing on the device");
    }
    assert!(device_root
        .join("etc/systemd/system/kiln.service")
        .is_file());

    // Resumable: only what is missing or damaged on the device is copied again.
    std::fs::remove_file(release.join("models/fake.q4_1.kiln")).expect("remove");
    std::fs::write(release.join("kiln.service"), "damaged").expect("damage");
    let out = ok(ssh_flash(&one), "second ssh flash");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let mut copied: Vec<&str> = report["copied"]
        .as_array()
        .expect("copied")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    copied.sort_unstable();
    // manifest.json (not in SHA256SUMS, a few hundred bytes) is always sent.
    assert_eq!(
        copied,
        ["kiln.service", "manifest.json", "models/fake.q4_1.kiln"]
    );

    // A release whose binary fails on the device is rolled back there.
    let bad = fake_bundle(dir.path(), "bad", "exit 1");
    let out = ssh_flash(&bad);
    assert!(!out.status.success());
    assert_eq!(current(&device_root), "releases/0.1.0-one");
}

/// `bundle --parallel N`: every slot's session counts against the target's budget (the
/// weights once), the unit starts `kiln serve --parallel N`, and too many slots are refused
/// with the numbers before anything is written.
#[test]
fn bundle_counts_every_parallel_slot_against_the_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let artifact = common::smollm2_artifact(Format::Q4_1);
    let bundle = |parallel: u16| {
        let out = dir.path().join(format!("aarch64-{parallel}.tar.gz"));
        let output = xtask()
            .args(["bundle", "--target", "aarch64-linux", "--json", "--binary"])
            .arg(common::kiln_binary())
            .arg("--artifact")
            .arg(&artifact)
            .args(["--parallel", &parallel.to_string(), "-o"])
            .arg(&out)
            .output()
            .expect("cargo xtask bundle");
        (out, output)
    };
    let manifest = |output: &Output| -> Value {
        let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
        report["manifest"].clone()
    };

    let (_, one) = bundle(1);
    let one = manifest(&ok(one, "bundle --parallel 1"));
    let (three_path, three) = bundle(3);
    let three = manifest(&ok(three, "bundle --parallel 3"));
    let plan = &one["memory"]["plan"];
    let session: u64 = ["kv_cache", "buffers", "scratch", "logits"]
        .iter()
        .map(|k| plan[k].as_u64().expect(k))
        .sum();
    let peak = |m: &Value| m["memory"]["predicted_peak_bytes"].as_u64().expect("peak");
    assert_eq!(peak(&three), peak(&one) + 2 * session);
    assert_eq!(three["memory"]["parallel"], 3);
    let unit = ok(
        Command::new("tar")
            .arg("xzf")
            .arg(&three_path)
            .args(["-O", "kiln.service"])
            .output()
            .expect("tar"),
        "tar",
    );
    let unit = String::from_utf8(unit.stdout).expect("utf-8");
    assert!(
        unit.contains(&format!(
            "--ctx-size {} -t 4 --parallel 3\n",
            three["memory"]["context"]
        )),
        "{unit}"
    );

    let (refused_path, refused) = bundle(64);
    assert!(!refused.status.success(), "64 slots fit a 2 GiB budget?");
    let message = String::from_utf8_lossy(&refused.stderr);
    for phrase in [
        "with 64 slots of",
        "aarch64-linux memory budget",
        "--parallel",
    ] {
        assert!(message.contains(phrase), "{phrase}: {message}");
    }
    assert!(!refused_path.exists(), "a refused bundle was written");
}

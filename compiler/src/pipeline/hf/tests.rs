//! Tests of the Hugging Face downloader against a fake Hub on 127.0.0.1: the resolve
//! layout, LFS redirects with `X-Linked-Etag`, `Range` requests, a bearer token, and a mode
//! that drops the connection halfway through a file.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kiln_models::Source;

use super::*;
use crate::pipeline::cache::MANIFEST;

const REPO: &str = "test-org/tiny-llama";
const TOKEN: &str = "hf_test_token";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// One request as the fake Hub saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    /// Bearer token required on `/resolve/` requests.
    token: Option<String>,
    /// File name → byte offset after which the next GET of it is cut off (once).
    drop_once: HashMap<String, usize>,
    /// Files whose announced sha256 is wrong.
    wrong_sha: HashSet<String>,
    seen: Vec<Seen>,
}

/// A fake Hub serving `root/<owner>/<name>/<file>` at revision `main`.
struct FakeHub {
    addr: SocketAddr,
    root: tempfile::TempDir,
    state: Arc<Mutex<Behaviour>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(token: Option<&str>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let root = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(Behaviour {
            token: token.map(str::to_string),
            ..Behaviour::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (root, state, stop) = (root.path().to_path_buf(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        // A client that hangs up early is its own business.
                        let _ = serve(conn, &root, &state);
                    }
                }
            })
        };
        FakeHub {
            addr,
            root,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hub(&self, token: Option<&str>, attempts: u32) -> Hub {
        let options = HubOptions {
            timeout: Duration::from_secs(5),
            attempts,
            retry_delay: Duration::from_millis(10),
        };
        Hub::new(&self.endpoint(), token.map(str::to_string), options)
    }

    fn put(&self, file: &str, bytes: &[u8]) {
        let path = self.root.path().join(REPO).join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    fn behaviour(&self) -> std::sync::MutexGuard<'_, Behaviour> {
        self.state.lock().unwrap()
    }

    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.behaviour().seen)
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request and closes the connection.
fn serve(conn: TcpStream, root: &Path, state: &Mutex<Behaviour>) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    state.lock().unwrap().seen.push(seen.clone());
    let mut conn = conn;
    let head_only = method == "HEAD";

    if let Some(rest) = path.strip_prefix("/cdn/") {
        let Ok(data) = fs::read(root.join(rest)) else {
            return respond(&mut conn, "404 Not Found", &[], b"", head_only);
        };
        let file = rest.rsplit('/').next().unwrap_or(rest).to_string();
        return serve_bytes(&mut conn, &data, &file, &seen, state);
    }

    // /<owner>/<name>/resolve/<revision>/<file>
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", revision, file] = segments[..] else {
        return respond(&mut conn, "404 Not Found", &[], b"", head_only);
    };
    let required = state.lock().unwrap().token.clone();
    if let Some(token) = required {
        if seen.auth.as_deref() != Some(&format!("Bearer {token}")) {
            let headers = [
                ("X-Error-Code", "GatedRepo".to_string()),
                (
                    "X-Error-Message",
                    "Access to this model is restricted.".to_string(),
                ),
            ];
            return respond(&mut conn, "401 Unauthorized", &headers, b"", head_only);
        }
    }
    if revision != "main" {
        let headers = [("X-Error-Code", "RevisionNotFound".to_string())];
        return respond(&mut conn, "404 Not Found", &headers, b"", head_only);
    }
    if !root.join(owner).join(name).is_dir() {
        let headers = [("X-Error-Code", "RepoNotFound".to_string())];
        return respond(&mut conn, "401 Unauthorized", &headers, b"", head_only);
    }
    let Ok(data) = fs::read(root.join(owner).join(name).join(file)) else {
        let headers = [("X-Error-Code", "EntryNotFound".to_string())];
        return respond(&mut conn, "404 Not Found", &headers, b"", head_only);
    };
    let commit = (
        "X-Repo-Commit",
        "0123456789abcdef0123456789abcdef01234567".to_string(),
    );
    if file.ends_with(".safetensors") {
        // LFS: the resolve URL redirects to storage and names the sha256.
        let mut sha = cache::hex(&Sha256::digest(&data));
        if state.lock().unwrap().wrong_sha.contains(file) {
            sha = "0".repeat(64);
        }
        let headers = [
            ("Location", format!("/cdn/{owner}/{name}/{file}")),
            ("X-Linked-Etag", format!("\"{sha}\"")),
            ("X-Linked-Size", data.len().to_string()),
            commit,
        ];
        return respond(&mut conn, "302 Found", &headers, b"", head_only);
    }
    // A git file: its ETag is a git blob id, not a sha256.
    let etag = (
        "ETag",
        format!("\"{}\"", &cache::hex(&Sha256::digest(&data))[..40]),
    );
    if head_only {
        let headers = [etag, commit, ("Content-Length", data.len().to_string())];
        return respond_raw(&mut conn, "200 OK", &headers, b"");
    }
    serve_bytes(&mut conn, &data, file, &seen, state)
}

/// Serves `data`, honouring `Range: bytes=N-` and the drop-once setting.
fn serve_bytes(
    conn: &mut TcpStream,
    data: &[u8],
    file: &str,
    seen: &Seen,
    state: &Mutex<Behaviour>,
) -> io::Result<()> {
    let head_only = seen.method == "HEAD";
    let start = match seen.range.as_deref() {
        None => 0,
        Some(range) => {
            let n = range
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            match n {
                Some(n) if n < data.len() => n,
                _ => {
                    let headers = [("Content-Range", format!("bytes */{}", data.len()))];
                    return respond(conn, "416 Range Not Satisfiable", &headers, b"", head_only);
                }
            }
        }
    };
    let (status, mut headers) = if seen.range.is_some() {
        let range = format!("bytes {start}-{}/{}", data.len() - 1, data.len());
        ("206 Partial Content", vec![("Content-Range", range)])
    } else {
        ("200 OK", Vec::new())
    };
    headers.push(("Accept-Ranges", "bytes".to_string()));
    let drop_at = if head_only {
        None
    } else {
        state.lock().unwrap().drop_once.remove(file)
    };
    match drop_at {
        Some(at) if at > start && at < data.len() => {
            // Announce the whole body, send part of it, hang up.
            headers.push(("Content-Length", (data.len() - start).to_string()));
            write_head(conn, status, &headers)?;
            conn.write_all(&data[start..at])?;
            conn.flush()?;
            conn.shutdown(Shutdown::Both)
        }
        _ => respond(conn, status, &headers, &data[start..], head_only),
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut headers = headers.to_vec();
    headers.push(("Content-Length", body.len().to_string()));
    respond_raw(conn, status, &headers, if head_only { b"" } else { body })
}

fn respond_raw(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> io::Result<()> {
    write_head(conn, status, headers)?;
    conn.write_all(body)?;
    conn.flush()
}

fn write_head(conn: &mut TcpStream, status: &str, headers: &[(&str, String)]) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())
}

/// Deterministic filler bytes.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The fake repository's files: git files, an index and two LFS shards.
fn repo_files() -> Vec<(&'static str, Vec<u8>)> {
    let index = format!(
        r#"{{"metadata": {{"total_size": 350000}}, "weight_map": {{
            "model.embed_tokens.weight": "{SHARD1}",
            "model.layers.0.mlp.up_proj.weight": "{SHARD1}",
            "model.layers.1.mlp.up_proj.weight": "{SHARD2}",
            "lm_head.weight": "{SHARD2}"}}}}"#
    );
    vec![
        (
            "config.json",
            br#"{"model_type": "llama", "vocab_size": 128256}"#.to_vec(),
        ),
        (
            "generation_config.json",
            br#"{"eos_token_id": [128001, 128009]}"#.to_vec(),
        ),
        ("tokenizer.json", br#"{"model": {"type": "BPE"}}"#.to_vec()),
        (
            "tokenizer_config.json",
            br#"{"chat_template": "{{ messages }}"}"#.to_vec(),
        ),
        (INDEX, index.into_bytes()),
        (SHARD1, noise(200_000, 1)),
        (SHARD2, noise(150_000, 2)),
    ]
}

fn tiny_card(extra_file: Option<&str>) -> ModelCard {
    let mut text = format!(
        r#"
name = "tiny-test"
description = "a fake sharded Llama"
family = "llama"
format = "safetensors"
license = "apache-2.0"
tokenizer = "hf-json"

[model]
default_quant = "q4_0"
context_length = 128
chat_template = "checkpoint"

[source.huggingface]
repo = "{REPO}"
revision = "main"
gated = true
weight_index = "{INDEX}"
"#
    );
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        INDEX,
    ]
    .into_iter()
    .chain(extra_file)
    {
        text.push_str(&format!("\n[[files]]\npath = \"{f}\"\n"));
    }
    ModelCard::parse("tiny-test.toml", &text).unwrap()
}

fn source_of(card: &ModelCard) -> &HfSource {
    match &card.source {
        Source::Huggingface(src) => src,
        Source::Pypi(_) => unreachable!("the tiny card is a Hugging Face card"),
    }
}

/// A fake Hub with the tiny repository, requiring [`TOKEN`].
fn hub_with_repo() -> FakeHub {
    let server = FakeHub::start(Some(TOKEN));
    for (name, bytes) in repo_files() {
        server.put(name, &bytes);
    }
    server
}

fn fetch_into(hub: &Hub, dir: &Path) -> Result<(Vec<FileRecord>, usize)> {
    let card = tiny_card(None);
    fetch(hub, &card, source_of(&card), dir, false)
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part") || n.starts_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn downloads_a_sharded_repository() {
    let server = hub_with_repo();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let (records, downloaded) = fetch_into(&server.hub(Some(TOKEN), 1), &dir).unwrap();

    let expected = repo_files();
    assert_eq!(downloaded, expected.len());
    let paths: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
    let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        paths, names,
        "card files first, then the shards the index names"
    );
    for ((name, bytes), record) in expected.iter().zip(&records) {
        assert_eq!(&fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        assert_eq!(record.sha256, cache::hex(&Sha256::digest(bytes)), "{name}");
        assert_eq!(record.size, bytes.len() as u64);
        let lfs = name.ends_with(".safetensors");
        assert_eq!(
            record.checked,
            if lfs { Checked::Hub } else { Checked::None }
        );
    }
    let manifest: Manifest =
        serde_json::from_str(&fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest.files, records);
    assert_eq!(manifest.source, format!("huggingface:{REPO}@main"));
    assert_eq!(
        manifest.commit.as_deref(),
        Some("0123456789abcdef0123456789abcdef01234567")
    );
    assert!(leftovers(&dir).is_empty());

    let seen = server.take_seen();
    for s in seen.iter().filter(|s| s.path.contains("/resolve/")) {
        assert_eq!(
            s.auth.as_deref(),
            Some(&*format!("Bearer {TOKEN}")),
            "{s:?}"
        );
    }
    for shard in [SHARD1, SHARD2] {
        let head = seen
            .iter()
            .position(|s| s.method == "HEAD" && s.path.ends_with(shard));
        let get = seen
            .iter()
            .position(|s| s.method == "GET" && s.path == format!("/cdn/{REPO}/{shard}"));
        assert!(head.is_some() && get.is_some() && head < get, "{seen:?}");
    }
}

#[test]
fn second_fetch_makes_no_request() {
    let server = hub_with_repo();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let hub = server.hub(Some(TOKEN), 1);
    let (first, _) = fetch_into(&hub, &dir).unwrap();
    server.take_seen();

    let (again, downloaded) = fetch_into(&hub, &dir).unwrap();
    assert_eq!(downloaded, 0);
    assert_eq!(again, first);
    assert!(
        server.take_seen().is_empty(),
        "a cached card makes no request"
    );

    // A shard that went missing is fetched again, and only it.
    fs::remove_file(dir.join(SHARD2)).unwrap();
    let (_, downloaded) = fetch_into(&hub, &dir).unwrap();
    assert_eq!(downloaded, 1);
    let seen = server.take_seen();
    assert!(seen.iter().all(|s| s.path.ends_with(SHARD2)), "{seen:?}");
}

#[test]
fn resumes_after_a_dropped_connection() {
    let server = hub_with_repo();
    server.behaviour().drop_once.insert(SHARD1.into(), 120_000);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let hub = server.hub(Some(TOKEN), 1);

    let err = format!("{:#}", fetch_into(&hub, &dir).unwrap_err());
    assert!(err.contains(SHARD1), "{err}");
    assert!(!dir.join(SHARD1).exists());
    let part = part_path(&dir.join(SHARD1));
    assert_eq!(
        fs::metadata(&part).unwrap().len(),
        120_000,
        "the bytes received are kept"
    );
    server.take_seen();

    let (records, _) = fetch_into(&hub, &dir).unwrap();
    let seen = server.take_seen();
    // The resolve request and the storage request it redirects to both ask for the rest.
    let resumed: Vec<&Seen> = seen.iter().filter(|s| s.range.is_some()).collect();
    assert!(
        resumed
            .iter()
            .any(|s| s.path == format!("/cdn/{REPO}/{SHARD1}")),
        "{seen:?}"
    );
    for s in resumed {
        assert_eq!(s.range.as_deref(), Some("bytes=120000-"), "{s:?}");
        assert!(s.path.ends_with(SHARD1), "{s:?}");
    }

    let original = &repo_files()[5].1;
    assert_eq!(&fs::read(dir.join(SHARD1)).unwrap(), original);
    let record = records.iter().find(|r| r.path == SHARD1).unwrap();
    assert_eq!(record.sha256, cache::hex(&Sha256::digest(original)));
    assert!(!part.exists());
}

#[test]
fn retries_and_resumes_within_one_fetch() {
    let server = hub_with_repo();
    server.behaviour().drop_once.insert(SHARD2.into(), 70_000);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    fetch_into(&server.hub(Some(TOKEN), 3), &dir).unwrap();
    let seen = server.take_seen();
    assert!(
        seen.iter()
            .any(|s| s.range.as_deref() == Some("bytes=70000-")),
        "{seen:?}"
    );
    assert_eq!(fs::read(dir.join(SHARD2)).unwrap(), repo_files()[6].1);
}

#[test]
fn wrong_sha256_from_the_hub_leaves_no_file() {
    let server = hub_with_repo();
    server.behaviour().wrong_sha.insert(SHARD2.into());
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let hub = server.hub(Some(TOKEN), 1);

    let err = format!("{:#}", fetch_into(&hub, &dir).unwrap_err());
    assert!(
        err.contains("sha256 mismatch") && err.contains(SHARD2),
        "{err}"
    );
    assert!(!dir.join(SHARD2).exists());
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    assert!(dir.join(SHARD1).exists(), "files checked before stay");
}

#[test]
fn wrong_sha256_keeps_the_existing_file() {
    let server = hub_with_repo();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let hub = server.hub(Some(TOKEN), 1);
    fetch_into(&hub, &dir).unwrap();
    let good = fs::read(dir.join(SHARD2)).unwrap();

    // The manifest is gone (so everything is fetched again) and the Hub now lies.
    fs::remove_file(dir.join(MANIFEST)).unwrap();
    server.put(SHARD2, &noise(150_000, 99));
    server.behaviour().wrong_sha.insert(SHARD2.into());
    let err = format!("{:#}", fetch_into(&hub, &dir).unwrap_err());
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert_eq!(fs::read(dir.join(SHARD2)).unwrap(), good);
    assert!(leftovers(&dir).is_empty());
}

#[test]
fn unauthorized_explains_the_token() {
    let server = hub_with_repo();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");

    let err = format!("{:#}", fetch_into(&server.hub(None, 3), &dir).unwrap_err());
    assert!(err.contains("HTTP 401") && err.contains(REPO), "{err}");
    assert!(
        err.contains("HF_TOKEN is not set") && err.contains("accept the license"),
        "{err}"
    );
    assert!(err.contains("Access to this model is restricted."), "{err}");
    assert_eq!(server.take_seen().len(), 1, "a 401 is not retried");
    assert!(!dir.join("config.json").exists() && !dir.join(MANIFEST).exists());

    let err = format!(
        "{:#}",
        fetch_into(&server.hub(Some("hf_wrong"), 1), &dir).unwrap_err()
    );
    assert!(err.contains("HF_TOKEN is set"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let server = hub_with_repo();
    let cache = tempfile::tempdir().unwrap();
    let card = tiny_card(Some("special_tokens_map.json"));
    let hub = server.hub(Some(TOKEN), 1);
    let err = fetch(&hub, &card, source_of(&card), cache.path(), false).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("`special_tokens_map.json` not found in test-org/tiny-llama"),
        "{err}"
    );
}

#[test]
fn missing_repository_is_named() {
    let server = FakeHub::start(None);
    let cache = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        fetch_into(&server.hub(None, 1), cache.path()).unwrap_err()
    );
    assert!(
        err.contains("no repository test-org/tiny-llama on http://127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn hostile_index_is_rejected() {
    let server = hub_with_repo();
    server.put(
        INDEX,
        br#"{"weight_map": {"w": "../../escape.safetensors"}}"#,
    );
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny-test");
    let err = format!(
        "{:#}",
        fetch_into(&server.hub(Some(TOKEN), 1), &dir).unwrap_err()
    );
    assert!(err.contains("is not a file inside the repository"), "{err}");
}

#[test]
fn url_helpers() {
    let hub = Hub::new(
        "https://hub.example/",
        Some("t".into()),
        HubOptions::default(),
    );
    assert_eq!(
        hub.resolve_url("o/n", "refs/pr/1", "original/params v1.json"),
        "https://hub.example/o/n/resolve/refs%2Fpr%2F1/original/params%20v1.json"
    );
    assert_eq!(
        hub.authorization("https://hub.example/o/n").as_deref(),
        Some("Bearer t")
    );
    assert_eq!(hub.authorization("https://hub.example.evil/o"), None);
    assert_eq!(hub.authorization("https://cdn.example/x"), None);
    assert_eq!(
        join_location("https://a.b/o/n/resolve/main/f", "/x/y"),
        "https://a.b/x/y"
    );
    assert_eq!(
        join_location("https://a.b/o/n/resolve/main/f", "g"),
        "https://a.b/o/n/resolve/main/g"
    );
    assert_eq!(
        join_location("https://a.b/f", "https://c.d/e"),
        "https://c.d/e"
    );
    assert_eq!(range_start("bytes 100-199/200"), Some(100));
    assert_eq!(range_start("bytes */200"), None);
    assert_eq!(
        part_path(Path::new("/c/m.safetensors")),
        Path::new("/c/m.safetensors.part")
    );
}

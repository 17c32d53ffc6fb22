//! Typed reading of a checkpoint's JSON files (`config.json` and friends) with errors that name
//! the file and the field.

use std::path::{Path, PathBuf};

use kiln_runtime::model::{Llama3RopeScaling, ModelFacts, SamplingDefaults};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::import::ImportError;

/// A JSON file whose top level is an object.
pub(super) struct JsonFile {
    path: PathBuf,
    root: Map<String, Value>,
}

impl JsonFile {
    /// Reads and parses `path`; a missing file is an I/O error.
    pub(super) fn read(path: &Path) -> Result<JsonFile, ImportError> {
        let bytes = std::fs::read(path).map_err(|e| ImportError::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Like [`JsonFile::read`], but a missing file is `None`.
    pub(super) fn read_optional(path: &Path) -> Result<Option<JsonFile>, ImportError> {
        super::read_optional(path)?
            .map(|bytes| Self::parse(path, &bytes))
            .transpose()
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<JsonFile, ImportError> {
        let corrupt = |what: String| ImportError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(root)) => Ok(JsonFile {
                path: path.to_path_buf(),
                root,
            }),
            Ok(_) => Err(corrupt("the top level is not a JSON object".into())),
            Err(e) => Err(corrupt(format!("malformed JSON: {e}"))),
        }
    }

    /// The top-level object's fields.
    pub(super) fn fields(&self) -> Fields<'_> {
        Fields {
            path: &self.path,
            prefix: String::new(),
            map: &self.root,
        }
    }
}

/// The fields of one JSON object inside a file; `prefix` locates it for error messages.
pub(super) struct Fields<'a> {
    path: &'a Path,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(super) fn corrupt(&self, what: impl Into<String>) -> ImportError {
        ImportError::Corrupt {
            path: self.path.to_path_buf(),
            what: what.into(),
        }
    }

    fn full_name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    /// The raw value of `field`; absent and `null` are both `None`, as in Hugging Face configs.
    pub(super) fn raw(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// `field` as a `T`, or `None` when absent or `null`.
    pub(super) fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, ImportError> {
        self.raw(field)
            .map(|v| {
                T::deserialize(v)
                    .map_err(|e| self.corrupt(format!("field `{}`: {e}", self.full_name(field))))
            })
            .transpose()
    }

    /// `field` as a `T`; absence is an error.
    pub(super) fn require<T: DeserializeOwned>(&self, field: &str) -> Result<T, ImportError> {
        self.get(field)?
            .ok_or_else(|| self.corrupt(format!("field `{}` is missing", self.full_name(field))))
    }

    /// `field` as a nested object, or `None` when absent or `null`.
    pub(super) fn object(&self, field: &str) -> Result<Option<Fields<'a>>, ImportError> {
        match self.raw(field) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                path: self.path,
                prefix: format!("{}.", self.full_name(field)),
                map,
            })),
            Some(other) => Err(self.corrupt(format!(
                "field `{}`: expected an object, found {other}",
                self.full_name(field)
            ))),
        }
    }

    /// A token id or a list of them (how `eos_token_id` is written); `[]` when absent.
    pub(super) fn token_ids(&self, field: &str) -> Result<Vec<u32>, ImportError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(u32),
            Many(Vec<u32>),
        }
        match self.raw(field).map(OneOrMany::deserialize) {
            None => Ok(Vec::new()),
            Some(Ok(OneOrMany::One(id))) => Ok(vec![id]),
            Some(Ok(OneOrMany::Many(ids))) => Ok(ids),
            // serde's untagged error does not say what was expected.
            Some(Err(_)) => Err(self.corrupt(format!(
                "field `{}`: expected a token id or a list of token ids",
                self.full_name(field)
            ))),
        }
    }
}

/// The Hugging Face architecture kiln imports.
const ARCHITECTURE: &str = "LlamaForCausalLM";

/// Model facts from `config.json` alone.
///
/// Token policy that lives elsewhere is left for the caller: `eog_ids` holds only the
/// config's `eos_token_id`s, `add_bos` is false and there is no chat template.
pub fn config_facts(config_path: &Path) -> Result<ModelFacts, ImportError> {
    let file = JsonFile::read(config_path)?;
    let f = file.fields();
    check_architecture(&f, config_path)?;

    let hidden_size: usize = f.require("hidden_size")?;
    let heads: usize = f.require("num_attention_heads")?;
    let kv_heads: usize = f.get("num_key_value_heads")?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(f.corrupt(format!(
            "inconsistent attention shape: {heads} heads, {kv_heads} KV heads"
        )));
    }
    let head_dim = match f.get::<usize>("head_dim")? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(heads) => hidden_size / heads,
        None => {
            return Err(f.corrupt(format!(
                "no `head_dim`, and hidden_size {hidden_size} is not a multiple of {heads} heads"
            )))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(f.corrupt(format!("head_dim {head_dim} is not a positive even number")));
    }

    Ok(ModelFacts {
        name: model_name(&f, config_path)?,
        vocab_size: f.require("vocab_size")?,
        hidden_size,
        intermediate_size: f.require("intermediate_size")?,
        layers: f.require("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        rms_eps: f.require("rms_norm_eps")?,
        rope_theta: f.get("rope_theta")?.unwrap_or(10_000.0),
        rope_scaling: rope_scaling(&f)?,
        context_length: f.require("max_position_embeddings")?,
        tie_word_embeddings: f.get("tie_word_embeddings")?.unwrap_or(false),
        bos_id: f.get("bos_token_id")?,
        add_bos: false,
        eog_ids: f.token_ids("eos_token_id")?,
        chat_template: None,
        sampling: SamplingDefaults::default(),
    })
}

fn check_architecture(f: &Fields, config_path: &Path) -> Result<(), ImportError> {
    let unsupported = |architecture: String| ImportError::UnsupportedArchitecture {
        path: config_path.to_path_buf(),
        architecture,
    };
    let model_type: Option<String> = f.get("model_type")?;
    match f.get::<Vec<String>>("architectures")? {
        Some(archs) if archs != [ARCHITECTURE] => return Err(unsupported(archs.join(", "))),
        None if model_type.is_none() => {
            return Err(f.corrupt("neither `architectures` nor `model_type` is set"))
        }
        _ => {}
    }
    match model_type {
        Some(t) if t != "llama" => Err(unsupported(format!("model_type {t}"))),
        _ => Ok(()),
    }
}

/// `_name_or_path`'s last component (a hub id such as `meta-llama/Llama-3.2-1B`), else the
/// checkpoint directory's name.
fn model_name(f: &Fields, config_path: &Path) -> Result<String, ImportError> {
    let from_config: Option<String> = f.get("_name_or_path")?;
    let from_config = from_config
        .as_deref()
        .and_then(|p| p.trim_end_matches('/').rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let from_dir = || {
        config_path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
    };
    Ok(from_config
        .or_else(from_dir)
        .unwrap_or_else(|| "unnamed".to_owned()))
}

/// `rope_scaling`: `llama3` (Llama 3.1 / 3.2) is read; other schemes change positions in ways
/// the graph does not implement, so they are refused rather than silently ignored.
fn rope_scaling(f: &Fields) -> Result<Option<Llama3RopeScaling>, ImportError> {
    let Some(s) = f.object("rope_scaling")? else {
        return Ok(None);
    };
    // transformers wrote `type` before 4.43 and `rope_type` since.
    let kind: Option<String> = match s.get("rope_type")? {
        Some(kind) => Some(kind),
        None => s.get("type")?,
    };
    match kind.as_deref() {
        Some("llama3") => {
            let scaling = Llama3RopeScaling {
                factor: s.require("factor")?,
                low_freq_factor: s.require("low_freq_factor")?,
                high_freq_factor: s.require("high_freq_factor")?,
                original_max_position_embeddings: s.require("original_max_position_embeddings")?,
            };
            // The smoothing band divides by `high - low` and by the factor.
            let ok = scaling.factor > 0.0
                && scaling.low_freq_factor > 0.0
                && scaling.high_freq_factor > scaling.low_freq_factor
                && scaling.original_max_position_embeddings > 0;
            if !ok {
                return Err(f.corrupt(format!("rope_scaling {scaling:?} is out of range")));
            }
            Ok(Some(scaling))
        }
        Some("default") => Ok(None),
        Some(other) => Err(f.corrupt(format!(
            "rope_scaling type {other:?} is not supported (kiln implements \"llama3\")"
        ))),
        None => Err(f.corrupt("field `rope_scaling.rope_type` is missing")),
    }
}

/// The sampling `generation_config.json` recommends: `temperature`, `top_k`, `top_p`, `min_p`;
/// `do_sample: false` means greedy whatever the temperature says (as in transformers).
pub(super) fn sampling_defaults(f: &Fields) -> Result<SamplingDefaults, ImportError> {
    let greedy = f.get::<bool>("do_sample")? == Some(false);
    let sampling = SamplingDefaults {
        temperature: if greedy {
            Some(0.0)
        } else {
            f.get("temperature")?
        },
        top_k: f.get("top_k")?,
        top_p: f.get("top_p")?,
        min_p: f.get("min_p")?,
    };
    sampling.check().map_err(|what| f.corrupt(what))?;
    Ok(sampling)
}

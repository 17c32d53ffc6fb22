//! Bad Hugging Face checkpoints: each is a typed error that names the file and the problem.

mod hf_support;

use std::path::Path;

use hf_support::{llama_models, read_raw, tiny_checkpoint, write_raw, Raw};
use kiln_compiler::import::{self, ImportError};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

/// The error importing `dir` (`Checkpoint` has no `Debug`, so no `unwrap_err`).
fn import_err(dir: &Path) -> ImportError {
    match import::import(dir) {
        Ok(_) => panic!("{} imported although it is broken", dir.display()),
        Err(e) => e,
    }
}

/// Edits the JSON file `name` of a fresh tiny checkpoint and returns the import error.
fn import_with_json(name: &str, edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, ImportError) {
    let dir = tiny_checkpoint(11);
    let path = dir.path().join(name);
    let mut value: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let err = import_err(dir.path());
    (dir, err)
}

/// Edits the tensors of a fresh tiny checkpoint and returns the import error.
fn import_with_tensors(edit: impl FnOnce(&mut Vec<Raw>)) -> (tempfile::TempDir, ImportError) {
    let dir = tiny_checkpoint(12);
    let path = dir.path().join("model.safetensors");
    let mut raw = read_raw(&path);
    edit(&mut raw);
    write_raw(&path, &raw);
    let err = import_err(dir.path());
    (dir, err)
}

/// The error's message names `file` (inside `dir`) and says each of `words`.
fn assert_message(err: &ImportError, dir: &Path, file: &str, words: &[&str]) {
    let message = err.to_string();
    let path = dir.join(file);
    assert!(
        message.starts_with(&format!("{}: ", path.display())),
        "{message}"
    );
    for w in words {
        assert!(message.contains(w), "{message:?} does not say {w:?}");
    }
}

#[test]
fn malformed_config_json() {
    let dir = tiny_checkpoint(13);
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": 64,").unwrap();
    let err = import_err(dir.path());
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert_message(&err, dir.path(), "config.json", &["malformed JSON", "EOF"]);
}

#[test]
fn mistyped_and_missing_config_fields() {
    let (dir, err) = import_with_json("config.json", |c| c["hidden_size"] = json!("64"));
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["`hidden_size`", "invalid type: string"],
    );

    let (dir, err) = import_with_json("config.json", |c| {
        c.as_object_mut().unwrap().remove("vocab_size");
    });
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["field `vocab_size` is missing"],
    );

    let (dir, err) = import_with_json("config.json", |c| c["rope_scaling"]["factor"] = json!([]));
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["`rope_scaling.factor`", "invalid type"],
    );

    let (dir, err) = import_with_json("generation_config.json", |c| c["eos_token_id"] = json!("x"));
    assert_message(
        &err,
        dir.path(),
        "generation_config.json",
        &["`eos_token_id`", "token id"],
    );

    let (dir, err) = import_with_json("config.json", |c| c["eos_token_id"] = json!([128_256]));
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["128256", "outside the vocabulary"],
    );
}

#[test]
fn unsupported_architecture() {
    let (dir, err) = import_with_json("config.json", |c| {
        c["architectures"] = json!(["MistralForCausalLM"]);
        c["model_type"] = json!("mistral");
    });
    assert!(
        matches!(&err, ImportError::UnsupportedArchitecture { architecture, .. }
            if architecture == "MistralForCausalLM"),
        "{err:?}"
    );
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["MistralForCausalLM", "not supported"],
    );
}

#[test]
fn unsupported_rope_scaling_type() {
    let (dir, err) = import_with_json("config.json", |c| {
        c["rope_scaling"] = json!({ "rope_type": "yarn", "factor": 4.0 });
    });
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert_message(
        &err,
        dir.path(),
        "config.json",
        &["rope_scaling", "\"yarn\"", "not supported"],
    );
}

#[test]
fn missing_tensor() {
    let name = "model.layers.1.mlp.up_proj.weight";
    let (dir, err) = import_with_tensors(|raw| raw.retain(|r| r.name != name));
    assert!(
        matches!(&err, ImportError::MissingTensor { name: n, .. } if n == name),
        "{err:?}"
    );
    assert_message(&err, dir.path(), "model.safetensors", &[name, "missing"]);
}

#[test]
fn wrong_shape() {
    let name = "model.layers.0.self_attn.k_proj.weight";
    let (dir, err) = import_with_tensors(|raw| {
        let r = raw.iter_mut().find(|r| r.name == name).unwrap();
        r.shape = vec![16, 64];
        r.data.truncate(16 * 64 * 2);
    });
    assert!(matches!(err, ImportError::Shape { .. }), "{err:?}");
    assert_message(
        &err,
        dir.path(),
        "model.safetensors",
        &[name, "[16, 64]", "expected [32, 64]"],
    );
}

#[test]
fn unsupported_dtype() {
    let name = "model.norm.weight";
    let (dir, err) = import_with_tensors(|raw| {
        let r = raw.iter_mut().find(|r| r.name == name).unwrap();
        r.dtype = Dtype::I16;
    });
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert_message(&err, dir.path(), "model.safetensors", &[name, "dtype I16"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_checkpoint(14);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = import_err(dir.path());
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert_message(&err, dir.path(), "model.safetensors", &["truncated"]);

    // Cut inside the header too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(20)
        .unwrap();
    let err = import_err(dir.path());
    assert_message(&err, dir.path(), "model.safetensors", &["truncated"]);
}

#[test]
fn bad_shard_index() {
    let dir = tiny_checkpoint(15);
    let index = dir.path().join("model.safetensors.index.json");
    let write_index = |map: Value| {
        std::fs::write(
            &index,
            serde_json::to_vec(&json!({ "weight_map": map })).unwrap(),
        )
        .unwrap()
    };

    write_index(json!({ "model.norm.weight": "../model.safetensors" }));
    let err = import_err(dir.path());
    assert_message(
        &err,
        dir.path(),
        "model.safetensors.index.json",
        &["not a file beside"],
    );

    // Every tensor but one is listed.
    let listed: serde_json::Map<String, Value> = read_raw(&dir.path().join("model.safetensors"))
        .into_iter()
        .filter(|r| r.name != "model.norm.weight")
        .map(|r| (r.name, json!("model.safetensors")))
        .collect();
    write_index(Value::Object(listed));
    let err = import_err(dir.path());
    assert!(matches!(err, ImportError::MissingTensor { .. }), "{err:?}");
    assert_message(
        &err,
        dir.path(),
        "model.safetensors.index.json",
        &["model.norm.weight"],
    );

    write_index(json!({ "model.norm.weight": "model-00001-of-00002.safetensors" }));
    let err = import_err(dir.path());
    assert!(matches!(err, ImportError::Io { .. }), "{err:?}");
    assert_message(&err, dir.path(), "model-00001-of-00002.safetensors", &[]);
}

#[test]
fn missing_tokenizer() {
    let dir = tiny_checkpoint(16);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = import_err(dir.path());
    assert!(matches!(err, ImportError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("no tokenizer"), "{err}");
    assert!(
        err.to_string()
            .starts_with(&dir.path().display().to_string()),
        "{err}"
    );
    // The tiktoken fallback needs only the model file.
    std::fs::copy(
        llama_models().join("llama3/tokenizer.model"),
        dir.path().join("tokenizer.model"),
    )
    .unwrap();
    import::import(dir.path()).unwrap();
}

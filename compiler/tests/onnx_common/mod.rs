//! Shared by the ONNX parity tests: running an exported decoder in onnxruntime (through
//! `testdata/onnx/ort_run.py`) and in tract, step by step with a KV cache.
// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use tract_onnx::prelude::*;

/// A prefill of `prompt_ids`, then one decode step per id of `next_ids`.
pub struct Steps {
    pub prompt_ids: Vec<u32>,
    pub next_ids: Vec<u32>,
    /// Added to every position id: moves RoPE angles, not the mask.
    pub position_offset: usize,
}

impl Steps {
    /// The ids of each run: the prompt, then one id per decode step.
    fn chunks(&self) -> Vec<Vec<u32>> {
        std::iter::once(self.prompt_ids.clone())
            .chain(self.next_ids.iter().map(|&i| vec![i]))
            .collect()
    }

    /// Writes the JSON `ort_run.py` reads.
    pub fn write(&self, path: &Path) {
        let json = serde_json::json!({
            "prompt_ids": self.prompt_ids,
            "next_ids": self.next_ids,
            "position_offset": self.position_offset,
        });
        std::fs::write(path, json.to_string()).expect("writing steps.json");
    }
}

/// Runs `ort_run.py` with `args` under `$KILN_PYTHON` (else `python3`); returns its stdout.
pub fn run_script(args: &[&str]) -> String {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/onnx/ort_run.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python} (set KILN_PYTHON to a Python with onnxruntime and numpy): {e}"
            )
        });
    assert!(
        out.status.success(),
        "{python} {} {args:?} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `mode` (`ort` or `reference`) of `ort_run.py` and reads back its rows of logits.
pub fn script_logits(
    mode: &str,
    source_flag: &str,
    source: &Path,
    steps: &Path,
    vocab: usize,
) -> Vec<Vec<f32>> {
    let out = steps.with_file_name(format!("{mode}-logits.f32"));
    run_script(&[
        mode,
        source_flag,
        source.to_str().expect("utf-8 path"),
        "--steps",
        steps.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    let bytes = std::fs::read(&out).expect("reading the script's logits");
    assert_eq!(
        bytes.len() % (4 * vocab),
        0,
        "{} is not rows of {vocab} f32",
        out.display()
    );
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

/// onnxruntime's logits of the last position of every step.
pub fn ort_logits(model: &Path, steps: &Path, vocab: usize) -> Vec<Vec<f32>> {
    script_logits("ort", "--model", model, steps, vocab)
}

/// tract's logits of the last position of every step, feeding each step's `present.*` back
/// as the next step's `past_key_values.*`.
pub fn tract_logits(model: &Path, steps: &Steps) -> Vec<Vec<f32>> {
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|e| panic!("tract cannot load {}: {e:?}", model.display()));
    let past_shapes: Vec<(usize, usize)> = plan
        .model()
        .input_outlets()
        .expect("inputs")
        .iter()
        .skip(3)
        .map(|&o| {
            let shape = &plan.model().outlet_fact(o).expect("input fact").shape;
            let dim = |i: usize| shape[i].as_i64().expect("fixed KV dims") as usize;
            (dim(1), dim(3))
        })
        .collect();
    let mut past: Vec<Tensor> = past_shapes
        .iter()
        .map(|&(heads, head_dim)| {
            Tensor::zero::<f32>(&[1, heads, 0, head_dim]).expect("empty past")
        })
        .collect();
    let mut rows = Vec::new();
    let mut done = 0;
    for chunk in steps.chunks() {
        let n = chunk.len();
        let ids: Vec<i64> = chunk.iter().map(|&i| i64::from(i)).collect();
        let first = (steps.position_offset + done) as i64;
        let positions: Vec<i64> = (first..first + n as i64).collect();
        let mask = vec![1i64; done + n];
        let mut inputs: TVec<TValue> = tvec![
            Tensor::from_shape(&[1, n], &ids).expect("ids").into(),
            Tensor::from_shape(&[1, done + n], &mask)
                .expect("mask")
                .into(),
            Tensor::from_shape(&[1, n], &positions)
                .expect("positions")
                .into(),
        ];
        inputs.extend(past.drain(..).map(TValue::from));
        let outputs = plan
            .run(inputs)
            .unwrap_or_else(|e| panic!("tract run failed: {e:?}"));
        let logits = outputs[0]
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
            .expect("f32 logits");
        let vocab = logits.len() / n;
        rows.push(logits[(n - 1) * vocab..].to_vec());
        past = outputs
            .iter()
            .skip(1)
            .map(|v| v.clone().into_tensor())
            .collect();
        done += n;
    }
    rows
}

/// The largest absolute difference between two equally shaped sets of rows.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "different numbers of steps");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "different vocab sizes");
            // NaN must fail the comparison, not vanish in `max`.
            x.iter().zip(y).map(|(p, q)| {
                if (p - q).is_nan() {
                    f32::INFINITY
                } else {
                    (p - q).abs()
                }
            })
        })
        .fold(0.0, f32::max)
}

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// A fresh directory under the system temp dir, removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-onnx-")
        .tempdir()
        .expect("temp dir")
}

/// kiln's logits of the last position of every step: the prefill, then each decode id.
pub fn kiln_logits(session: &mut kiln_runtime::exec::Session<'_>, steps: &Steps) -> Vec<Vec<f32>> {
    let mut rows = vec![session
        .forward(&steps.prompt_ids)
        .expect("prefill")
        .to_vec()];
    for &id in &steps.next_ids {
        rows.push(session.forward(&[id]).expect("decode").to_vec());
    }
    rows
}

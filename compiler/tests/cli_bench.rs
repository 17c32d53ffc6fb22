//! `cargo xtask bench` as a user runs it, kiln alone (`--no-llama-cpp`) on the default model at
//! `q4_1` with the smallest counts: the JSON report holds every figure, each positive, and the
//! bandwidth bound it is set against. The artifact is compiled into a scratch `$KILN_HOME`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, what: &str) {
    assert!(v.as_f64().is_some_and(|x| x > 0.0), "{what}: {v}");
}

#[test]
fn bench_json_reports_every_figure_with_its_spread_and_bound() {
    let home = tempfile::tempdir().expect("scratch KILN_HOME");
    let kiln = common::kiln_binary();
    let out = Command::new(common::binary("xtask", "cargo build --release -p xtask"))
        .arg("bench")
        .arg("--model")
        .arg(common::smollm2_gguf())
        .args(["--no-llama-cpp", "--quant", "q4_1", "-p", "8", "-n", "4"])
        .args(["--reps", "1", "--threads", "1", "--json", "--kiln"])
        .arg(&kiln)
        .env("KILN_HOME", home.path())
        .output()
        .expect("running xtask bench");
    assert!(
        out.status.success(),
        "xtask bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");

    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "one configuration, kiln only: {v}");
    let r = &results[0];
    let level = r["engine"]
        .as_str()
        .and_then(|e| e.strip_prefix("kiln "))
        .expect("engine names kiln and the kernel level it ran");
    assert!(
        r["backend"].as_str().is_some_and(|b| b.ends_with(level)),
        "the backend names the same level: {r}"
    );
    assert_eq!(r["quant"], "q4_1", "{r}");
    assert_eq!(
        (r["threads"].as_u64(), r["depth"].as_u64()),
        (Some(1), Some(0))
    );
    for key in [
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "ttft_ms",
        "peak_rss_mb",
    ] {
        for stat in ["median", "min", "max"] {
            positive(&r[key][stat], &format!("{key}.{stat}"));
        }
        assert!(r[key]["stddev"].as_f64().is_some(), "{key}.stddev: {r}");
        assert_eq!(r[key]["samples"].as_array().map(Vec::len), Some(1), "{r}");
    }
    for key in [
        "bytes_per_token",
        "bound_tokens_per_s",
        "decode_of_bound_pct",
    ] {
        positive(&r[key], key);
    }
    let bandwidth = v["bandwidth"].as_array().expect("bandwidth");
    assert_eq!(bandwidth.len(), 1, "{v}");
    positive(&bandwidth[0]["gb_per_s"], "bandwidth");
    let inputs = &v["inputs"][0];
    positive(&inputs["weight_bytes_per_token"], "weight bytes per token");
    let artifact = inputs["artifact"].as_str().expect("artifact path");
    assert!(
        PathBuf::from(artifact).starts_with(home.path().join("artifacts")),
        "cached under $KILN_HOME/artifacts: {artifact}"
    );
    assert!(v["ratios"].as_array().is_some_and(Vec::is_empty), "{v}");
    assert!(v["llama_cpp_python"].is_null(), "{v}");
}

//! `kiln serve` as a client sees it, on the default model compiled to `q4_1`: a greedy
//! completion equal to `kiln run --temp 0`'s, a chat completion, the same chat streamed as
//! Server-Sent Events, and bad requests answered with 400 while the server keeps serving.

mod common;

use std::process::Command;

use common::serve::{events, post, request, start};
use kiln_runtime::quant::Format;
use serde_json::{json, Value};

const PROMPT: &str = "The capital of France is";

#[test]
fn serve_answers_like_kiln_run_streams_and_survives_bad_requests() {
    let model = common::smollm2_artifact(Format::Q4_1);
    let run = Command::new(common::kiln_binary())
        .arg("run")
        .arg(&model)
        .args(["-p", PROMPT, "-n", "12", "--temp", "0", "--json", "-t", "2"])
        .output()
        .expect("kiln run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let want: Value = serde_json::from_slice(&run.stdout).expect("kiln run --json");

    let server = start(&model);
    let addr = server.addr.as_str();
    let (status, health) = request(addr, "GET", "/health", "");
    assert_eq!((status, health.as_str()), (200, r#"{"status":"ok"}"#));

    // A greedy completion: the ids and text of `kiln run --temp 0`.
    let (status, v) = post(
        addr,
        "/v1/completions",
        &json!({ "prompt": PROMPT, "max_tokens": 12, "temperature": 0 }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["kiln"]["prompt_ids"], want["prompt_ids"], "{v}");
    assert_eq!(v["kiln"]["ids"], want["ids"], "{v}");
    assert_eq!(v["choices"][0]["text"], want["text"], "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);

    // The same prompt again reuses the KV cache and gives the same answer.
    let (_, again) = post(
        addr,
        "/v1/completions",
        &json!({ "prompt": PROMPT, "max_tokens": 12, "temperature": 0 }),
    );
    assert_eq!(again["kiln"]["ids"], want["ids"], "{again}");
    assert!(again["kiln"]["cached_tokens"].as_u64() > Some(0), "{again}");

    // A chat completion, then the same request streamed: the chunks make the same text.
    let chat = json!({
        "messages": [{ "role": "user", "content": "What is the capital of France?" }],
        "max_tokens": 16,
        "temperature": 0,
    });
    let (status, v) = post(addr, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(!text.is_empty(), "{v}");

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, body) = request(addr, "POST", "/v1/chat/completions", &streamed.to_string());
    assert_eq!(status, 200, "{body}");
    let events = events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON event"))
        .collect();
    assert!(chunks.len() > 2, "{body}");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);
    assert_eq!(
        chunks.last().expect("last")["kiln"]["ids"],
        v["kiln"]["ids"]
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // Bad requests: 400 with a JSON message, and the server still answers.
    let (status, text) = request(addr, "POST", "/v1/completions", "{not json");
    assert_eq!(status, 400, "{text}");
    let e: Value = serde_json::from_str(&text).expect("a JSON error");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a valid request")),
        "{e}"
    );
    let (status, e) = post(addr, "/v1/completions", &json!({ "max_tokens": 4 }));
    assert_eq!(status, 400);
    assert!(e["error"]["message"].to_string().contains("prompt"), "{e}");
    let (status, e) = post(addr, "/v1/chat/completions", &json!({ "prompt": "hi" }));
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"].to_string().contains("messages"),
        "{e}"
    );
    let long = "word ".repeat(10_000);
    let (status, e) = post(addr, "/v1/completions", &json!({ "prompt": long }));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].to_string().contains("context"), "{e}");
    let (status, _) = request(addr, "GET", "/nowhere", "");
    assert_eq!(status, 404);
    let (status, health) = request(addr, "GET", "/health", "");
    assert_eq!((status, health.as_str()), (200, r#"{"status":"ok"}"#));

    // After the errors, greedy completions are still those of `kiln run`.
    let (_, v) = post(
        addr,
        "/v1/completions",
        &json!({ "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": false }),
    );
    assert_eq!(v["kiln"]["ids"], want["ids"], "{v}");
}

//! Structured output and tool calls through `kiln serve`, on the default model (far too small
//! to choose tools well on its own, which is the point: the constraint does the work). Every
//! reply with `response_format: json_schema` over the schemas of
//! `testdata/structured/schemas.json` (nested objects, arrays with bounds, enums, integer and
//! number ranges, required and optional fields, strings with `pattern` and `format`), greedy
//! and not, streamed and not, and the arguments of every required or named tool call, must
//! validate with Python `jsonschema` (`testdata/structured/validate.py`), a validator kiln did
//! not write.

mod common;

use common::serve::{events, post, request, start};
use kiln_runtime::quant::Format;
use serde_json::{json, Value};

/// The text and finish reason of a streamed chat answer.
fn streamed(addr: &str, body: &Value) -> (Value, String) {
    let (status, raw) = request(addr, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{raw}");
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut finish = String::new();
    for event in events(&raw) {
        if event == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&event).unwrap_or_else(|e| panic!("{e}: {event}"));
        let choice = &v["choices"][0];
        if let Some(piece) = choice["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(c) = choice["delta"]["tool_calls"].as_array() {
            calls.extend(c.iter().cloned());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    let message = if calls.is_empty() {
        json!({ "content": text })
    } else {
        json!({ "content": null, "tool_calls": calls })
    };
    (message, finish)
}

/// One answer, streamed or not: the message and the finish reason.
fn ask(addr: &str, body: &Value, stream: bool) -> (Value, String) {
    if stream {
        let mut body = body.clone();
        body["stream"] = json!(true);
        return streamed(addr, &body);
    }
    let (status, v) = post(addr, "/v1/chat/completions", body);
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    (
        choice["message"].clone(),
        choice["finish_reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[test]
fn json_schema_replies_validate_greedy_and_sampled_streamed_and_not() {
    let server = start(&common::smollm2_artifact(Format::Q4_1));
    let schemas: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::testdata().join("structured/schemas.json"))
            .expect("schemas"),
    )
    .expect("schemas JSON");
    assert!(schemas.len() >= 30, "{} schemas", schemas.len());
    let mut cases = Vec::new();
    for (i, case) in schemas.iter().enumerate() {
        for (stream, temperature) in [(false, 0.0), (true, 0.8)] {
            let body = json!({
                "messages": [{"role": "user", "content": case["prompt"]}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": case["name"], "schema": case["schema"], "strict": true}},
                "max_tokens": 400,
                "temperature": temperature,
                "seed": i,
            });
            let (message, finish) = ask(&server.addr, &body, stream);
            let name = format!(
                "{} (stream {stream}, temperature {temperature})",
                case["name"]
            );
            assert_eq!(finish, "stop", "{name}: {message}");
            cases.push(json!({
                "name": name,
                "schema": case["schema"],
                "text": message["content"].as_str().unwrap_or_default(),
            }));
        }
    }
    common::assert_schemas_hold(&cases);
}

/// Tools a smart-glasses assistant offers.
fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": false}}}),
        json!({"type": "function", "function": {"name": "set_timer",
            "description": "Start a timer on the glasses",
            "parameters": {"type": "object", "properties": {
                "minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                "label": {"type": "string", "maxLength": 20}},
                "required": ["minutes"], "additionalProperties": false}}}),
        json!({"type": "function", "function": {"name": "translate",
            "description": "Translate text shown on the glasses",
            "parameters": {"type": "object", "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": 60},
                "to": {"type": "string", "pattern": "^[a-z]{2}$"}},
                "required": ["text", "to"], "additionalProperties": false}}}),
        json!({"type": "function", "function": {"name": "take_photo",
            "description": "Take a photo with the camera",
            "parameters": {"type": "object", "properties": {
                "zoom": {"type": "number", "minimum": 1, "maximum": 10},
                "flash": {"type": "boolean"}},
                "required": ["zoom"], "additionalProperties": false}}}),
    ]
}

#[test]
fn required_and_named_tool_calls_validate_and_results_go_back() {
    let server = start(&common::smollm2_artifact(Format::Q4_1));
    let tools = tools();
    let prompts = [
        "What's the weather like in Lyon?",
        "Remind me in ten minutes to take the pasta off.",
        "What does this sign say in English: 'Sortie de secours'?",
        "Take a picture of that cathedral.",
    ];
    let mut cases = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut choices = vec![json!("required")];
        choices.extend(
            tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t["function"]["name"]}})),
        );
        for (j, choice) in choices.iter().enumerate() {
            let stream = (i + j) % 2 == 1;
            let body = json!({
                "messages": [{"role": "user", "content": prompt}],
                "tools": tools,
                "tool_choice": choice,
                "max_tokens": 200,
                "temperature": 0,
            });
            let (message, finish) = ask(&server.addr, &body, stream);
            let what = format!("{prompt:?}, tool_choice {choice}, stream {stream}");
            assert_eq!(finish, "tool_calls", "{what}: {message}");
            let calls = message["tool_calls"].as_array().expect("tool_calls");
            assert_eq!(calls.len(), 1, "{what}: {message}");
            let call = &calls[0];
            assert_eq!(call["type"], "function", "{what}");
            assert!(
                call["id"].as_str().is_some_and(|id| !id.is_empty()),
                "{what}"
            );
            let name = call["function"]["name"].as_str().expect("a name");
            if let Some(want) = choice.pointer("/function/name") {
                assert_eq!(name, want, "{what}");
            }
            let tool = tools
                .iter()
                .find(|t| t["function"]["name"] == name)
                .unwrap_or_else(|| panic!("{what}: calls {name}, not offered"));
            cases.push(json!({
                "name": what,
                "schema": tool["function"]["parameters"],
                "text": call["function"]["arguments"].as_str().expect("arguments as a string"),
            }));
        }
    }
    common::assert_schemas_hold(&cases);

    // The call and its result go back as OpenAI clients send them, and the model answers.
    let body = json!({
        "messages": [
            {"role": "user", "content": prompts[0]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 11, \"sky\": \"rain\"}"},
        ],
        "tools": tools,
        "tool_choice": "none",
        "max_tokens": 24,
        "temperature": 0,
    });
    let (message, finish) = ask(&server.addr, &body, false);
    assert!(
        matches!(finish.as_str(), "stop" | "length"),
        "{finish}: {message}"
    );
    assert!(
        !message["content"].as_str().unwrap_or_default().is_empty(),
        "{message}"
    );
}

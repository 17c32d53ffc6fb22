//! Tool conversations rendered by kiln must equal what transformers renders
//! (`render_jinja_template`, behind `apply_chat_template(messages, tools=…, **kwargs)`;
//! `testdata/chat/render_hf.py`), with Meta's own templates: Llama 3.1 (whose template Llama
//! 3.3 ships byte for byte) and Llama 3.2. Tools offered in the first user turn or in the
//! system turn, a call and its result, built-in tools, JSON-string and mapping results, and the
//! template's own refusal of two calls in one turn.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kiln_engine::chat::{ChatError, ChatMessage, ChatTemplate, RenderOptions, ToolCall};
use serde_json::{json, Value};

fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(path)
}

const BOS: &str = "<|begin_of_text|>";
const EOS: &str = "<|eot_id|>";

/// What transformers renders: `Ok(prompt)` or `Err(message)` from `raise_exception`.
fn transformers(
    template: &str,
    messages: &[ChatMessage],
    opts: &RenderOptions<'_>,
) -> Result<String, String> {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let extra: serde_json::Map<String, Value> = opts
        .extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let request = json!({
        "template": template,
        "messages": messages,
        "tools": opts.tools,
        "add_generation_prompt": opts.add_generation_prompt,
        "bos_token": BOS,
        "eos_token": EOS,
        "extra": extra,
    });
    let mut child = Command::new(&python)
        .arg(testdata("chat/render_hf.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write request");
    let out = child.wait_with_output().expect("render_hf.py");
    assert!(
        out.status.success(),
        "render_hf.py (needs transformers; `cargo xtask test` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("render_hf.py output");
    match (v["ok"].as_str(), v["raised"].as_str()) {
        (Some(ok), _) => Ok(ok.to_owned()),
        (_, Some(raised)) => Err(raised.to_owned()),
        _ => panic!("render_hf.py: {v}"),
    }
}

fn weather_tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["city"]}
        }}),
        json!({"type": "function", "function": {
            "name": "set_timer",
            "description": "Start a timer on the glasses",
            "parameters": {"type": "object", "properties": {
                "minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                "label": {"type": "string"}
            }, "required": ["minutes"]}
        }}),
    ]
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn call(name: &str, arguments: Value) -> ChatMessage {
    ChatMessage {
        tool_calls: vec![ToolCall::function(Some("call_1".into()), name, arguments)],
        ..msg("assistant", "")
    }
}

fn result(content: &str) -> ChatMessage {
    ChatMessage {
        tool_call_id: Some("call_1".into()),
        ..msg("tool", content)
    }
}

#[test]
fn tool_conversations_render_as_transformers_renders_them() {
    let tools = weather_tools();
    let date = ("date_string", json!("07 Dec 2026"));
    let conversations: Vec<(&str, Vec<ChatMessage>)> = vec![
        ("offered", vec![msg("user", "Weather in Lyon?")]),
        (
            "offered with a system turn",
            vec![
                msg("system", "You are terse."),
                msg("user", "Weather in Lyon?"),
            ],
        ),
        (
            "called and answered",
            vec![
                msg("user", "Weather in Lyon?"),
                call("get_weather", json!({"city": "Lyon", "unit": "celsius"})),
                result(r#"{"temperature": 11, "sky": "rain"}"#),
                msg("assistant", "11 °C and rain."),
                msg("user", "Set a timer for 5 minutes."),
            ],
        ),
        (
            "two calls in one turn",
            vec![
                msg("user", "Weather in Lyon and a timer"),
                ChatMessage {
                    tool_calls: vec![
                        ToolCall::function(None, "get_weather", json!({"city": "Lyon"})),
                        ToolCall::function(None, "set_timer", json!({"minutes": 5})),
                    ],
                    ..msg("assistant", "")
                },
            ],
        ),
    ];
    for template_file in [
        "chat/llama-3.1-instruct.jinja",
        "chat/llama-3.2-instruct.jinja",
    ] {
        let source = std::fs::read_to_string(testdata(template_file)).expect("template");
        let template = ChatTemplate::new(&source, BOS, EOS).expect("compile");
        for (name, messages) in &conversations {
            for in_user in [true, false] {
                for add_generation_prompt in [true, false] {
                    let opts = RenderOptions {
                        add_generation_prompt,
                        tools: Some(&tools),
                        extra: vec![date.clone(), ("tools_in_user_message", json!(in_user))],
                    };
                    let ours = template.render_with(messages, &opts);
                    let theirs = transformers(&source, messages, &opts);
                    let what = format!("{template_file}, {name}, tools in user turn {in_user}, add_generation_prompt {add_generation_prompt}");
                    match (ours, theirs) {
                        (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "{what}"),
                        (Err(ChatError::Raised(ours)), Err(theirs)) => {
                            assert_eq!(ours, theirs, "{what}")
                        }
                        (ours, theirs) => {
                            panic!("{what}: kiln {ours:?} vs transformers {theirs:?}")
                        }
                    }
                }
            }
        }
    }
}

/// Llama 3.1's built-in tools: the system turn lists them, a call to one is written as
/// `<|python_tag|>brave_search.call(query="…")` and ends with `<|eom_id|>`.
#[test]
fn built_in_tools_render_as_transformers_renders_them() {
    let source =
        std::fs::read_to_string(testdata("chat/llama-3.1-instruct.jinja")).expect("template");
    let template = ChatTemplate::new(&source, BOS, EOS).expect("compile");
    let messages = vec![
        msg("user", "Who won the 2024 Tour de France?"),
        call(
            "brave_search",
            json!({"query": "2024 Tour de France winner"}),
        ),
        ChatMessage {
            tool_call_id: Some("call_1".into()),
            ..msg("ipython", "Tadej Pogačar won the 2024 Tour de France.")
        },
    ];
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: None,
        extra: vec![
            ("date_string", json!("07 Dec 2026")),
            (
                "builtin_tools",
                json!(["brave_search", "wolfram_alpha", "code_interpreter"]),
            ),
        ],
    };
    let ours = template
        .render_with(&messages, &opts)
        .expect("kiln renders");
    assert_eq!(
        ours,
        transformers(&source, &messages, &opts).expect("renders")
    );
    assert!(
        ours.contains("Tools: brave_search, wolfram_alpha\n"),
        "{ours}"
    );
    assert!(
        ours.contains(
            "<|python_tag|>brave_search.call(query=\"2024 Tour de France winner\")<|eom_id|>"
        ),
        "{ours}"
    );
}

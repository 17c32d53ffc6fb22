//! Chat templates rendered by kiln must equal what transformers' Jinja setup renders: real model
//! templates are checked against Python jinja2 (`testdata/chat/render.py`) and llama.cpp's
//! golden prompt.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kiln_engine::chat::{ChatError, ChatMessage, ChatTemplate};

/// 2024-07-26 00:00:00 UTC, so `strftime_now` gives the same date on both sides.
const NOW: i64 = 1_721_952_000;

fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(testdata(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// What Python jinja2 renders: `Ok(prompt)` or `Err(message)` from `raise_exception`.
fn reference(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String, String> {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    // Serialized from structs, not `serde_json::Value`, so each message keeps the key order
    // (`role`, `content`) a Python dict would have.
    #[derive(serde::Serialize)]
    struct Request<'a> {
        template: &'a str,
        messages: &'a [ChatMessage],
        add_generation_prompt: bool,
        bos_token: &'a str,
        eos_token: &'a str,
        now: i64,
    }
    let request = serde_json::to_string(&Request {
        template,
        messages,
        add_generation_prompt,
        bos_token: bos,
        eos_token: eos,
        now: NOW,
    })
    .expect("serialize request");
    let mut child = Command::new(&python)
        .arg(testdata("chat/render.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python} (set KILN_PYTHON): {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(request.as_bytes())
        .expect("write request");
    let out = child.wait_with_output().expect("wait for render.py");
    assert!(
        out.status.success(),
        "render.py failed (it needs `pip install jinja2`; KILN_PYTHON picks the interpreter):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("render.py JSON");
    match (reply["ok"].as_str(), reply["raised"].as_str()) {
        (Some(ok), _) => Ok(ok.to_owned()),
        (_, Some(raised)) => Err(raised.to_owned()),
        _ => panic!("unexpected reply from render.py: {reply}"),
    }
}

/// Renders every conversation with and without the generation prompt on both sides.
fn check_against_python(template_path: &str, bos: &str, eos: &str) {
    let source = read(template_path);
    let template = ChatTemplate::new(&source, bos, eos)
        .unwrap()
        .with_fixed_time(NOW);
    let conversations = [
        vec![msg("user", "Hello!")],
        vec![msg("system", "You are terse."), msg("user", "What is 2+2?")],
        vec![
            msg("system", "  You answer in French.\n"),
            msg("user", "Name a colour."),
            msg("assistant", "Bleu."),
            msg(
                "user",
                "  Another one, with \"quotes\", <tags> & unicode: é 日本 🙂\n\n",
            ),
        ],
        vec![
            msg("user", "first"),
            msg("assistant", "second"),
            msg("user", "\tthird\r\n"),
        ],
    ];
    for messages in &conversations {
        for add_generation_prompt in [true, false] {
            let ours = template.render(messages, add_generation_prompt);
            let theirs = reference(&source, messages, add_generation_prompt, bos, eos);
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) => assert_eq!(
                    ours, theirs,
                    "{template_path}, add_generation_prompt={add_generation_prompt}, {messages:?}"
                ),
                (ours, theirs) => panic!("{template_path}: kiln {ours:?} vs jinja2 {theirs:?}"),
            }
        }
    }
}

#[test]
fn smollm2_template_matches_jinja2() {
    check_against_python("chat/smollm2-instruct.jinja", "<|im_start|>", "<|im_end|>");
}

#[test]
fn llama_3_2_template_matches_jinja2() {
    check_against_python(
        "chat/llama-3.2-instruct.jinja",
        "<|begin_of_text|>",
        "<|eot_id|>",
    );
}

#[test]
fn llama_3_2_template_dates_the_system_prompt() {
    let template = ChatTemplate::new(
        &read("chat/llama-3.2-instruct.jinja"),
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    .unwrap()
    .with_fixed_time(NOW);
    let prompt = template.render(&[msg("user", "Hi")], true).unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

/// A made-up template that leans on what HF templates use beyond plain Jinja: Python methods,
/// `tojson`, loop controls, undefined-safe tests, `raise_exception`.
#[test]
fn python_compat_features_match_jinja2() {
    let source = r#"{{- bos_token }}
{%- if tools is not defined or tools is none %}{% set tools = none %}{% endif %}
{%- for message in messages %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
    {%- if message.role == 'assistant' and message.content.strip().startswith('skip') %}{% continue %}{% endif %}
    {%- if message.tool_calls is defined %}{{ raise_exception('no tools') }}{% endif %}
    <{{ message.role | upper }}>{{ message.content.strip() | tojson }} {{ message | tojson }}
    {%- if message.content.endswith('?') %} Q{% endif %} {{ message['content'].split(',') | length }}
{% endfor %}
{{- {"b": [1, 2.5, none, true], "a": {}} | tojson(indent=4) }}
{{ tools }} {{ add_generation_prompt }} {{ date_string }}|{{ eos_token }}
{%- if messages | length > 4 %}{{ raise_exception('at most ' ~ 4 ~ ' turns, got ' ~ messages | length) }}{% endif %}"#;
    let short = vec![
        msg("user", "  a, b, c? "),
        msg("assistant", " skip me"),
        msg("user", "é \"x\"\n"),
        msg("assistant", "never shown"),
    ];
    let long = [short.clone(), vec![msg("user", "fifth")]].concat();
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    for messages in [&short, &long] {
        let theirs = reference(source, messages, true, "<s>", "</s>");
        match (template.render(messages, true), theirs) {
            (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs),
            (Err(ChatError::Raised(ours)), Err(theirs)) => assert_eq!(ours, theirs),
            (ours, theirs) => panic!("kiln {ours:?} vs jinja2 {theirs:?}"),
        }
    }
}

/// llama.cpp's golden "chat" case was prompted with SmolLM2's own template.
#[test]
fn smollm2_golden_chat_prompt() {
    let golden: serde_json::Value =
        serde_json::from_str(&read("golden/smollm2-135m-instruct.json")).unwrap();
    let case = golden["greedy"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chat")
        .expect("golden case \"chat\"");
    let template = ChatTemplate::new(
        &read("chat/smollm2-instruct.jinja"),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let messages = [
        msg(
            "system",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        ),
        msg("user", "What is the tallest mountain in the world?"),
    ];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        case["prompt"].as_str().unwrap()
    );
}

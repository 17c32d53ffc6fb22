//! OpenAI's chat-completions conventions for tools and structured output, independent of the
//! transport: a request's `messages` (with `tool_calls` and `role: "tool"` turns), `tools`,
//! `tool_choice` and `response_format` become the rendered prompt and the constraint on the
//! reply; a reply's tool calls become the `tool_calls` an answer carries.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{ChatError, ChatMessage, ChatTemplate, RenderOptions, ToolCall};
use crate::constrain::Constraint;
use crate::tools::ParsedCall;

/// A request's chat turn.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// Text, or an array of text parts (`[{"type": "text", "text": …}]`, joined); `null` (or
    /// absent) for an assistant turn that only calls tools.
    #[serde(default, deserialize_with = "content_text")]
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<RequestToolCall>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A message's `content`: a string, `null`, or OpenAI's content parts, of which kiln takes
/// text parts only (an image or audio part is an error that names its type).
fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Value>),
    }
    let Some(content) = Option::<Content>::deserialize(d)? else {
        return Ok(None);
    };
    let parts = match content {
        Content::Text(text) => return Ok(Some(text)),
        Content::Parts(parts) => parts,
    };
    let mut text = String::new();
    for part in &parts {
        match (part["type"].as_str(), part["text"].as_str()) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some("text"), None) => {
                return Err(serde::de::Error::custom(
                    "a text content part has no `text`",
                ))
            }
            (kind, _) => {
                return Err(serde::de::Error::custom(format!(
                    "content parts of type `{}` are not supported (text only)",
                    kind.unwrap_or("(none)")
                )))
            }
        }
    }
    Ok(Some(text))
}

/// A call in an earlier assistant turn, as the client sends it back.
#[derive(Debug, Deserialize)]
pub struct RequestToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub function: RequestFunction,
}

/// Its function: arguments are a string of JSON in OpenAI's API (an object is taken too).
#[derive(Debug, Deserialize)]
pub struct RequestFunction {
    pub name: String,
    pub arguments: Value,
}

/// The parts of a chat request this module reads.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
}

impl ChatRequest {
    /// The tools offered and how the reply may use them: `tool_choice` as given, else `auto`
    /// when there are tools and `none` when there are not (OpenAI's defaults).
    fn tools_offered(&self) -> Result<(&[Value], ToolChoice), RequestError> {
        let offered = self.tools.as_deref().unwrap_or(&[]);
        let choice = match &self.tool_choice {
            Some(c) => ToolChoice::parse(c)?,
            None if offered.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
        };
        Ok((offered, choice))
    }
}

/// Why a request cannot be answered (a 400 for the client).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("rendering the chat template: {0}")]
    Template(#[from] ChatError),
}

fn invalid(message: impl Into<String>) -> RequestError {
    RequestError::Invalid(message.into())
}

/// How the reply is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Text only.
    Text,
    /// Text or tool calls (`tool_choice: "auto"`): calls are recognised in the finished reply.
    TextOrCalls,
    /// Tool calls only (`"required"` or a named function): the reply is constrained to one.
    Calls,
}

/// A chat request made ready to run.
#[derive(Debug)]
pub struct PreparedChat {
    /// The prompt text, rendered with the model's template.
    pub prompt: String,
    /// What the reply must match, if anything.
    pub constraint: Option<Constraint>,
    pub expect: Expect,
}

/// A tool's name and argument schema, from `{"type": "function", "function": {…}}`.
struct Tool<'a> {
    name: &'a str,
    parameters: Value,
    strict: bool,
}

fn tools_of(tools: &[Value]) -> Result<Vec<Tool<'_>>, RequestError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid(format!(
                    "tools[{i}]: only `\"type\": \"function\"` tools are supported"
                )));
            }
            let f = t
                .get("function")
                .ok_or_else(|| invalid(format!("tools[{i}]: missing `function`")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| invalid(format!("tools[{i}]: missing `function.name`")))?;
            let parameters = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            if !parameters.is_object() {
                return Err(invalid(format!(
                    "tools[{i}] ({name}): `parameters` must be a JSON Schema object"
                )));
            }
            let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Ok(Tool {
                name,
                parameters,
                strict,
            })
        })
        .collect()
}

/// The schema of one call in the format Llama 3's templates teach (`{"name", "parameters"}`).
fn call_schema(tool: &Tool<'_>) -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "parameters": tool.parameters,
        },
        "required": ["name", "parameters"],
        "additionalProperties": false,
    })
}

/// A call of any of `tools`.
fn any_call_schema(tools: &[Tool<'_>]) -> Value {
    match tools {
        [one] => call_schema(one),
        _ => json!({"anyOf": tools.iter().map(call_schema).collect::<Vec<_>>()}),
    }
}

/// Which tools the reply may call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

impl ToolChoice {
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": …}}`.
    pub fn parse(value: &Value) -> Result<ToolChoice, RequestError> {
        match value {
            Value::String(s) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                other => Err(invalid(format!(
                    "unknown `tool_choice` {other:?} (none, auto, required, or a function)"
                ))),
            },
            named => named
                .pointer("/function/name")
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Named(n.to_owned()))
                .ok_or_else(|| invalid("`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}")),
        }
    }
}

/// Turns a request into the prompt and the reply's constraint (see [`prepare`]).
pub fn prepare_chat(
    template: &ChatTemplate,
    template_source: &str,
    request: &ChatRequest,
    extra: Vec<(&str, Value)>,
) -> Result<PreparedChat, RequestError> {
    if request.messages.is_empty() {
        return Err(invalid("`messages` is empty"));
    }
    let messages = request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let (offered, choice) = request.tools_offered()?;
    let format = response_format(request.response_format.as_ref())?;
    prepare(
        template,
        template_source,
        messages,
        offered,
        &choice,
        format,
        extra,
    )
}

/// The prompt for `messages` with `tools` offered as `choice` says, and what the reply must
/// match: a call of a tool when one is required, `format` otherwise. `template_source` tells
/// whether the template knows tools; one that does not (a ChatML model, say) gets them in a
/// system turn that teaches the JSON format Llama 3.1's template does.
pub fn prepare(
    template: &ChatTemplate,
    template_source: &str,
    mut messages: Vec<ChatMessage>,
    offered: &[Value],
    choice: &ToolChoice,
    format: Option<Constraint>,
    extra: Vec<(&str, Value)>,
) -> Result<PreparedChat, RequestError> {
    let tools = tools_of(offered)?;
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(invalid("`tool_choice` needs `tools`"));
    }
    let (expect, called): (Expect, Vec<&Tool<'_>>) = match choice {
        _ if tools.is_empty() => (Expect::Text, Vec::new()),
        ToolChoice::None => (Expect::Text, Vec::new()),
        ToolChoice::Auto => (Expect::TextOrCalls, Vec::new()),
        ToolChoice::Required => (Expect::Calls, tools.iter().collect()),
        ToolChoice::Named(name) => {
            let tool = tools.iter().find(|t| t.name == name).ok_or_else(|| {
                invalid(format!(
                    "`tool_choice` names {name:?}, which is not among `tools`"
                ))
            })?;
            (Expect::Calls, vec![tool])
        }
    };
    if format.is_some() && expect == Expect::Calls {
        return Err(invalid(
            "`response_format` and a required tool call cannot both shape the reply",
        ));
    }
    let tools_in_prompt = expect != Expect::Text;
    let template_knows_tools = template_source.contains("tools");
    if tools_in_prompt && !template_knows_tools {
        teach_tools(&mut messages, offered);
    }
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: (tools_in_prompt && template_knows_tools).then_some(offered),
        extra,
    };
    let prompt = template.render_with(&messages, &opts)?;
    let constraint = match expect {
        Expect::Calls => {
            let owned: Vec<Tool<'_>> = called
                .iter()
                .map(|t| Tool {
                    name: t.name,
                    parameters: t.parameters.clone(),
                    strict: t.strict,
                })
                .collect();
            Some(Constraint::JsonSchema(any_call_schema(&owned)))
        }
        Expect::TextOrCalls if tools.iter().any(|t| t.strict) => {
            // A strict tool's arguments must match its schema even when the model chooses to
            // call it: the reply is either a call of a tool or text that cannot start one.
            let call = serde_json::to_string(&any_call_schema(&tools))
                .map_err(|e| invalid(e.to_string()))?;
            Some(Constraint::Lark(format!(
                "start: call | text\ncall: %json {call}\ntext: /[^{{\\[<\\s][\\s\\S]*/\n"
            )))
        }
        _ => format,
    };
    Ok(PreparedChat {
        prompt,
        constraint,
        expect,
    })
}

/// The token ids every conversation that opens with `head` (its system turns) shares,
/// whatever its first user turn says: the system prompt and the tools, as the template lays
/// them out (in the system turn or, as Llama 3.1's does, before the user's text). Found as the
/// common start of two renderings that differ in the user's text only; what a prompt snapshot
/// holds.
pub fn shared_prefix(
    template: &ChatTemplate,
    template_source: &str,
    head: &[ChatMessage],
    tools: &[Value],
    choice: &ToolChoice,
    encode: impl Fn(&str) -> Vec<u32>,
) -> Result<Vec<u32>, RequestError> {
    let render = |user: &str| -> Result<Vec<u32>, RequestError> {
        let mut messages = head.to_vec();
        messages.push(ChatMessage::new("user", user));
        let prepared = prepare(
            template,
            template_source,
            messages,
            tools,
            choice,
            None,
            Vec::new(),
        )?;
        Ok(encode(&prepared.prompt))
    };
    let (a, b) = (render("A")?, render("Z")?);
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    Ok(a[..common].to_vec())
}

/// [`shared_prefix`] of a request: its leading system turns, with its tools.
pub fn request_prefix(
    template: &ChatTemplate,
    template_source: &str,
    request: &ChatRequest,
    encode: impl Fn(&str) -> Vec<u32>,
) -> Result<Vec<u32>, RequestError> {
    let head = request
        .messages
        .iter()
        .take_while(|m| m.role == "system")
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let (offered, choice) = request.tools_offered()?;
    shared_prefix(template, template_source, &head, offered, &choice, encode)
}

/// `response_format`: text (none), `json_object` or `json_schema`.
pub fn response_format(format: Option<&Value>) -> Result<Option<Constraint>, RequestError> {
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .ok_or_else(|| invalid("`response_format.json_schema.schema` is missing"))?;
            if !schema.is_object() {
                return Err(invalid(
                    "`response_format.json_schema.schema` must be an object",
                ));
            }
            Ok(Some(Constraint::JsonSchema(schema.clone())))
        }
        other => Err(invalid(format!(
            "unknown `response_format.type` {other:?} (text, json_object, json_schema)"
        ))),
    }
}

/// A request turn as the template sees it.
fn message(i: usize, m: &Message) -> Result<ChatMessage, RequestError> {
    let tool_calls = m
        .tool_calls
        .iter()
        .map(|c| {
            let arguments = match &c.function.arguments {
                Value::String(s) => serde_json::from_str(s).map_err(|e| {
                    invalid(format!(
                        "messages[{i}]: the arguments of {} are not JSON: {e}",
                        c.function.name
                    ))
                })?,
                other => other.clone(),
            };
            Ok(ToolCall::function(
                c.id.clone(),
                c.function.name.clone(),
                arguments,
            ))
        })
        .collect::<Result<Vec<_>, RequestError>>()?;
    if m.content.is_none() && tool_calls.is_empty() {
        return Err(invalid(format!("messages[{i}]: `content` is missing")));
    }
    Ok(ChatMessage {
        tool_calls,
        tool_call_id: m.tool_call_id.clone(),
        ..ChatMessage::new(m.role.clone(), m.content.clone().unwrap_or_default())
    })
}

/// For a template that does not render tools: the tools and the call format in the system
/// turn (added, or prefixed to the one there is), as Llama 3.1's template words it.
fn teach_tools(messages: &mut Vec<ChatMessage>, tools: &[Value]) {
    let mut text = String::from(
        "You have access to the following functions. To call a function, respond with JSON for a \
         function call, in the format {\"name\": function name, \"parameters\": dictionary of \
         argument name and its value}. Do not use variables.\n\n",
    );
    for t in tools {
        text.push_str(&serde_json::to_string_pretty(t).unwrap_or_default());
        text.push_str("\n\n");
    }
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{text}{}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", text.trim_end())),
    }
}

/// The `tool_calls` of an answer: ids `call_<serial>_<i>`, arguments as a string of JSON.
pub fn tool_calls_json(calls: &[ParsedCall], serial: u64) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": format!("call_{serial}_{i}"),
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": Value::Object(c.arguments.clone()).to_string(),
                    },
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> (ChatTemplate, String) {
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if tools %}[{{ tools | length }} tools]{% endif %}";
        (
            ChatTemplate::new(source, "", "").expect("compiles"),
            source.to_owned(),
        )
    }

    fn request(value: Value) -> ChatRequest {
        serde_json::from_value(value).expect("a request")
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "strict": false,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn text_content_parts_are_joined_and_others_refused_by_type() {
        let parts = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]});
        let r: ChatRequest = serde_json::from_value(parts).expect("text parts");
        assert_eq!(r.messages[0].content.as_deref(), Some("Hello, world"));
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]});
        let e = serde_json::from_value::<ChatRequest>(image).expect_err("an image part");
        assert!(e.to_string().contains("`image_url`"), "{e}");
    }

    #[test]
    fn tool_choice_decides_what_the_reply_may_be() {
        let (t, src) = template();
        let base = json!({"messages": [{"role": "user", "content": "Weather in Lyon?"}], "tools": [weather()]});
        let prepared = |choice: Value| {
            let mut r = base.clone();
            r["tool_choice"] = choice;
            prepare_chat(&t, &src, &request(r), Vec::new()).expect("prepared")
        };
        let auto = prepared(json!("auto"));
        assert_eq!(auto.expect, Expect::TextOrCalls);
        assert!(auto.constraint.is_none());
        assert!(auto.prompt.ends_with("[1 tools]"), "{}", auto.prompt);
        let none = prepared(json!("none"));
        assert_eq!(none.expect, Expect::Text);
        assert!(!none.prompt.contains("tools]"), "{}", none.prompt);
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ] {
            let p = prepared(choice);
            assert_eq!(p.expect, Expect::Calls);
            let Some(Constraint::JsonSchema(schema)) = p.constraint else {
                panic!("{:?}", p.constraint)
            };
            assert_eq!(schema["properties"]["name"]["const"], "get_weather");
        }
    }

    #[test]
    fn a_strict_tool_constrains_an_automatic_choice() {
        let (t, src) = template();
        let mut tool = weather();
        tool["function"]["strict"] = json!(true);
        let r = request(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}));
        let p = prepare_chat(&t, &src, &r, Vec::new()).expect("prepared");
        assert!(matches!(p.constraint, Some(Constraint::Lark(ref g)) if g.contains("%json")));
    }

    #[test]
    fn a_template_without_tools_is_taught_them_in_the_system_turn() {
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(source, "", "").expect("compiles");
        let r =
            request(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [weather()]}));
        let p = prepare_chat(&t, source, &r, Vec::new()).expect("prepared");
        assert!(
            p.prompt
                .starts_with("<system>You have access to the following functions."),
            "{}",
            p.prompt
        );
        assert!(p.prompt.contains("\"get_weather\""), "{}", p.prompt);
    }

    #[test]
    fn tool_turns_come_back_to_the_template() {
        let (t, src) = template();
        let r = request(json!({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "11 C"}
        ], "tools": [weather()]}));
        let p = prepare_chat(&t, &src, &r, Vec::new()).expect("prepared");
        assert!(p.prompt.contains("<tool>11 C"), "{}", p.prompt);
    }

    #[test]
    fn bad_requests_are_named() {
        let (t, src) = template();
        for (body, phrase) in [
            (json!({"messages": []}), "`messages` is empty"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
                "needs `tools`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "not among `tools`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]}),
                "only `\"type\": \"function\"`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
                "unknown `response_format.type`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}),
                "schema` is missing",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}),
                "not JSON",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "`content` is missing",
            ),
        ] {
            let err =
                prepare_chat(&t, &src, &request(body.clone()), Vec::new()).expect_err("refused");
            assert!(err.to_string().contains(phrase), "{body}: {err}");
        }
    }

    #[test]
    fn the_shared_prefix_ends_where_the_user_text_begins() {
        let (t, src) = template();
        let head = [ChatMessage::new("system", "Be brief.")];
        let bytes = |text: &str| text.bytes().map(u32::from).collect::<Vec<u32>>();
        let prefix =
            shared_prefix(&t, &src, &head, &[weather()], &ToolChoice::Auto, bytes).expect("prefix");
        let text: String = prefix.iter().map(|&b| b as u8 as char).collect();
        assert_eq!(text, "<system>Be brief.<user>");
    }

    #[test]
    fn calls_become_openai_tool_calls() {
        let calls = vec![ParsedCall {
            name: "get_weather".into(),
            arguments: serde_json::from_value(json!({"city": "Lyon"})).expect("object"),
            builtin: false,
        }];
        let v = tool_calls_json(&calls, 7);
        assert_eq!(v[0]["id"], "call_7_0");
        assert_eq!(v[0]["function"]["name"], "get_weather");
        assert_eq!(v[0]["function"]["arguments"], "{\"city\":\"Lyon\"}");
    }
}

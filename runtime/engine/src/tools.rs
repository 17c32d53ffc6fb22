//! Tool calls in what a Llama 3.1/3.2/3.3 model writes, in the formats Meta's prompt guides
//! define: a JSON call (`{"name": …, "parameters": {…}}`, with or without `<|python_tag|>`,
//! several separated by `;`), Llama 3.2's pythonic list (`[f(a=1), g(b="x")]`) and the built-in
//! tools (`<|python_tag|>brave_search.call(query="…")`, code for `code_interpreter`). A reply
//! is a call only when all of it is one: prose that merely contains braces stays text.

use serde_json::{Map, Number, Value};

/// The marker Llama 3.1+ writes before a tool call (a special token, decoded as text).
pub const PYTHON_TAG: &str = "<|python_tag|>";
/// The end-of-message marker after a built-in tool call, when it was decoded as text.
const END_MARKERS: [&str; 2] = ["<|eom_id|>", "<|eot_id|>"];
/// Llama 3.1's built-in tools called as `name.call(…)`.
pub const BUILTIN_TOOLS: [&str; 2] = ["brave_search", "wolfram_alpha"];

/// One call found in a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments, as a JSON object.
    pub arguments: Map<String, Value>,
    /// A built-in tool (`brave_search`, `wolfram_alpha`, `code_interpreter`): the turn ends with
    /// `<|eom_id|>` and the tool's output comes back as an `ipython` turn.
    pub builtin: bool,
}

/// What a reply is: text, or the calls it makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Text(String),
    Calls(Vec<ParsedCall>),
}

/// Reads a whole reply as tool calls if it is one, else as text (returned as it was).
pub fn parse_reply(text: &str) -> Reply {
    let mut body = text.trim();
    for end in END_MARKERS {
        body = body.strip_suffix(end).unwrap_or(body).trim_end();
    }
    let (tagged, body) = match body.strip_prefix(PYTHON_TAG) {
        Some(rest) => (true, rest.trim()),
        None => (false, body),
    };
    let calls = json_calls(body)
        .or_else(|| pythonic_calls(body))
        .or_else(|| builtin_call(body))
        .or_else(|| (tagged && !body.is_empty()).then(|| vec![code_interpreter(body)]));
    match calls {
        Some(calls) if !calls.is_empty() => Reply::Calls(calls),
        _ => Reply::Text(text.to_owned()),
    }
}

/// Whether `text`, a reply still being generated, may yet turn out to be a call: it is empty
/// so far or starts the way every call format starts. A streaming server holds such text back
/// until the reply ends.
pub fn may_become_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty()
        || PYTHON_TAG.starts_with(t)
        || t.starts_with(PYTHON_TAG)
        || t.starts_with('{')
        || t.starts_with('[')
        || BUILTIN_TOOLS
            .iter()
            .any(|b| b.starts_with(t) || t.starts_with(&format!("{b}.")))
}

/// `{"name": …, "parameters": {…}}` (or `"arguments"`, an object or a string of one), one or
/// more, separated by whitespace or `;`.
fn json_calls(body: &str) -> Option<Vec<ParsedCall>> {
    let mut rest = body;
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        calls.push(json_call(value)?);
        rest = rest[stream.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some(calls)
}

fn json_call(value: Value) -> Option<ParsedCall> {
    let Value::Object(mut obj) = value else {
        return None;
    };
    // Llama 3.2 sometimes writes `"type": "function"` too; anything else is not a call.
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "name" | "parameters" | "arguments" | "type"))
    {
        return None;
    }
    if obj.get("type").is_some_and(|t| t != "function") {
        return None;
    }
    let name = obj.remove("name")?.as_str()?.to_owned();
    let arguments = match obj
        .remove("parameters")
        .or_else(|| obj.remove("arguments"))?
    {
        Value::Object(args) => args,
        Value::String(s) => match serde_json::from_str(&s).ok()? {
            Value::Object(args) => args,
            _ => return None,
        },
        _ => return None,
    };
    valid_name(&name).then_some(ParsedCall {
        name,
        arguments,
        builtin: false,
    })
}

/// `[f(a=1, b="x"), g()]`: Llama 3.2's pythonic calls, keyword arguments with Python literals.
fn pythonic_calls(body: &str) -> Option<Vec<ParsedCall>> {
    let mut p = Py::new(body.strip_prefix('[')?.strip_suffix(']')?);
    let mut calls = Vec::new();
    loop {
        p.space();
        if p.done() {
            break;
        }
        let (name, arguments) = p.call()?;
        calls.push(ParsedCall {
            name,
            arguments,
            builtin: false,
        });
        p.space();
        if !p.eat(',') {
            p.space();
            if !p.done() {
                return None;
            }
        }
    }
    Some(calls)
}

/// `brave_search.call(query="…")` or `wolfram_alpha.call(query="…")`.
fn builtin_call(body: &str) -> Option<Vec<ParsedCall>> {
    let mut p = Py::new(body);
    let (name, arguments) = p.call()?;
    p.space();
    let tool = name.strip_suffix(".call")?;
    (p.done() && BUILTIN_TOOLS.contains(&tool)).then(|| {
        vec![ParsedCall {
            name: tool.to_owned(),
            arguments,
            builtin: true,
        }]
    })
}

/// Code after `<|python_tag|>` that is no other call: for Llama 3.1's `code_interpreter`.
fn code_interpreter(code: &str) -> ParsedCall {
    let mut arguments = Map::new();
    arguments.insert("code".to_owned(), Value::String(code.to_owned()));
    ParsedCall {
        name: "code_interpreter".to_owned(),
        arguments,
        builtin: true,
    }
}

/// A function name: letters, digits, `_`, `-` and `.`, not starting with a digit.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A reader of the Python literals and calls models write.
struct Py<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Py<'a> {
    fn new(s: &'a str) -> Self {
        Py { s, at: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }

    fn done(&self) -> bool {
        self.at == self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.at += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// An identifier, dotted names allowed (`brave_search.call`).
    fn name(&mut self) -> Option<String> {
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(self.rest().len());
        let name = &self.rest()[..len];
        if !valid_name(name) {
            return None;
        }
        self.at += len;
        Some(name.to_owned())
    }

    /// `name(key=value, …)`.
    fn call(&mut self) -> Option<(String, Map<String, Value>)> {
        self.space();
        let name = self.name()?;
        self.space();
        if !self.eat('(') {
            return None;
        }
        let mut args = Map::new();
        loop {
            self.space();
            if self.eat(')') {
                return Some((name, args));
            }
            let key = self.name()?;
            self.space();
            if !self.eat('=') {
                return None;
            }
            let value = self.value()?;
            args.insert(key, value);
            self.space();
            if !self.eat(',') {
                self.space();
                return self.eat(')').then_some((name, args));
            }
        }
    }

    /// A Python literal as JSON: strings, numbers, `True`/`False`/`None`, lists, tuples, dicts.
    fn value(&mut self) -> Option<Value> {
        self.space();
        match self.peek()? {
            '"' | '\'' => self.string().map(Value::String),
            '[' => self.items('[', ']'),
            '(' => self.items('(', ')'),
            '{' => self.dict(),
            c if c == '-' || c == '+' || c.is_ascii_digit() || c == '.' => self.number(),
            _ => {
                for (word, value) in [
                    ("True", Value::Bool(true)),
                    ("False", Value::Bool(false)),
                    ("None", Value::Null),
                    ("true", Value::Bool(true)),
                    ("false", Value::Bool(false)),
                    ("null", Value::Null),
                ] {
                    if let Some(after) = self.rest().strip_prefix(word) {
                        if !after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                            self.at += word.len();
                            return Some(value);
                        }
                    }
                }
                None
            }
        }
    }

    fn items(&mut self, open: char, close: char) -> Option<Value> {
        self.eat(open);
        let mut items = Vec::new();
        loop {
            self.space();
            if self.eat(close) {
                return Some(Value::Array(items));
            }
            items.push(self.value()?);
            self.space();
            if !self.eat(',') {
                self.space();
                return self.eat(close).then_some(Value::Array(items));
            }
        }
    }

    fn dict(&mut self) -> Option<Value> {
        self.eat('{');
        let mut map = Map::new();
        loop {
            self.space();
            if self.eat('}') {
                return Some(Value::Object(map));
            }
            let key = match self.value()? {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.space();
            if !self.eat(':') {
                return None;
            }
            map.insert(key, self.value()?);
            self.space();
            if !self.eat(',') {
                self.space();
                return self.eat('}').then_some(Value::Object(map));
            }
        }
    }

    fn number(&mut self) -> Option<Value> {
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E' | '_')))
            .unwrap_or(self.rest().len());
        let text: String = self.rest()[..len].chars().filter(|&c| c != '_').collect();
        self.at += len;
        if let Ok(i) = text.parse::<i64>() {
            return Some(Value::Number(i.into()));
        }
        let x: f64 = text.parse().ok()?;
        Number::from_f64(x).map(Value::Number)
    }

    /// A quoted string with Python's common escapes.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek()?;
        self.at += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.at += i + 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, e) = chars.next()?;
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' => {
                            let hex: String = (0..4)
                                .filter_map(|_| chars.next().map(|(_, h)| h))
                                .collect();
                            out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn calls(text: &str) -> Vec<(String, Value, bool)> {
        match parse_reply(text) {
            Reply::Calls(calls) => calls
                .into_iter()
                .map(|c| (c.name, Value::Object(c.arguments), c.builtin))
                .collect(),
            Reply::Text(t) => panic!("read as text: {t:?}"),
        }
    }

    fn one(name: &str, args: Value) -> Vec<(String, Value, bool)> {
        vec![(name.to_owned(), args, false)]
    }

    #[test]
    fn json_calls_with_and_without_the_python_tag() {
        let want = one("get_weather", json!({"city": "Lyon", "unit": "celsius"}));
        for text in [
            r#"{"name": "get_weather", "parameters": {"city": "Lyon", "unit": "celsius"}}"#,
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Lyon\", \"unit\": \"celsius\"}}",
            "\n  {\"name\":\"get_weather\",\"parameters\":{\"city\":\"Lyon\",\"unit\":\"celsius\"}}<|eot_id|>\n",
            r#"{"type": "function", "name": "get_weather", "parameters": {"city": "Lyon", "unit": "celsius"}}"#,
            r#"{"name": "get_weather", "arguments": "{\"city\": \"Lyon\", \"unit\": \"celsius\"}"}"#,
        ] {
            assert_eq!(calls(text), want, "{text}");
        }
    }

    #[test]
    fn several_json_calls_separated_by_semicolons() {
        let got = calls(
            r#"{"name": "get_weather", "parameters": {"city": "Lyon"}}; {"name": "set_timer", "parameters": {"minutes": 5}}"#,
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], one("set_timer", json!({"minutes": 5}))[0]);
    }

    #[test]
    fn pythonic_lists_of_calls() {
        let got = calls(
            r#"[get_weather(city="Lyon", unit='celsius'), set_timer(minutes=5, label=None, loud=True, ratio=-0.5, tags=["a", 'b'], opts={"k": (1, 2)})]"#,
        );
        assert_eq!(
            got,
            vec![
                one("get_weather", json!({"city": "Lyon", "unit": "celsius"}))[0].clone(),
                one(
                    "set_timer",
                    json!({"minutes": 5, "label": null, "loud": true, "ratio": -0.5,
                           "tags": ["a", "b"], "opts": {"k": [1, 2]}})
                )[0]
                .clone(),
            ]
        );
        assert_eq!(calls("[now()]"), one("now", json!({})));
        assert_eq!(
            calls(r#"[translate(text="Il pleut, n'est-ce pas ?\n", to="en")]"#),
            one(
                "translate",
                json!({"text": "Il pleut, n'est-ce pas ?\n", "to": "en"})
            )
        );
    }

    #[test]
    fn built_in_tools() {
        assert_eq!(
            calls("<|python_tag|>brave_search.call(query=\"Tour de France 2024\")<|eom_id|>"),
            vec![(
                "brave_search".to_owned(),
                json!({"query": "Tour de France 2024"}),
                true
            )]
        );
        assert_eq!(
            calls("<|python_tag|>wolfram_alpha.call(query=\"integrate x^2\")"),
            vec![(
                "wolfram_alpha".to_owned(),
                json!({"query": "integrate x^2"}),
                true
            )]
        );
        let code = "import math\nprint(math.sqrt(2))";
        assert_eq!(
            calls(&format!("<|python_tag|>{code}<|eom_id|>")),
            vec![("code_interpreter".to_owned(), json!({"code": code}), true)]
        );
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_text() {
        for text in [
            "Sure! In JSON that is {\"name\": \"Lyon\"}.",
            r#"{"name": "Lyon", "population": 522250}"#,
            r#"{"name": "get_weather"}"#,
            r#"{"name": "get_weather", "parameters": [1, 2]}"#,
            r#"{"name": "get_weather", "parameters": {"city": "Lyon"}} and then I will set a timer"#,
            r#"{"name": "get_weather", "parameters": {"city": "Lyon""#,
            "[1, 2, 3]",
            "[get_weather(city=Lyon)]",
            "[get_weather(city=\"Lyon\")",
            "Use brave_search.call(query=\"x\") to search.",
            "python_search.call(query=\"x\")",
            "{}",
            "",
            "The set {1, 2} has two elements.",
        ] {
            assert_eq!(parse_reply(text), Reply::Text(text.to_owned()), "{text}");
        }
    }

    #[test]
    fn a_reply_in_progress_may_become_a_call_until_it_cannot() {
        for text in [
            "",
            " ",
            "<|py",
            "<|python_tag|>",
            "{\"na",
            "[get_",
            "brave",
            "brave_search.ca",
        ] {
            assert!(may_become_call(text), "{text:?}");
        }
        for text in ["Sure", "The weather", "x{", " Hello ["] {
            assert!(!may_become_call(text), "{text:?}");
        }
    }
}

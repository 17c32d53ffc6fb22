//! Chat prompts rendered with the model's own Jinja chat template, set up like Hugging Face
//! transformers' `apply_chat_template` so the prompt matches what the model was trained on.
//!
//! The template comes from GGUF `tokenizer.chat_template` or `tokenizer_config.json`. Like
//! transformers, blocks use `trim_blocks` + `lstrip_blocks`, missing attributes are undefined
//! rather than errors, and `raise_exception`, `strftime_now`, a `json.dumps`-style `tojson`,
//! `break`/`continue` and Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, …)
//! are available.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{
    escape_formatter, AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value,
};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, with the fields OpenAI's chat API and transformers' templates
/// use for tools: an assistant turn's `tool_calls`, a `tool` turn's `tool_call_id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, `ipython`, … as the template expects.
    pub role: String,
    /// The turn's text, passed to the template as is.
    pub content: String,
    /// The calls an assistant turn made (absent from the template's view when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Which call a `tool` turn answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A turn from anything string-like.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function call in an assistant turn, as transformers' templates read it
/// (`tool_call.function.name`, `tool_call.function.arguments` as a mapping).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] names and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object (OpenAI sends it as a string of JSON; it is parsed before rendering).
    pub arguments: serde_json::Value,
}

impl ToolCall {
    /// A call of function `name` with `arguments`.
    pub fn function(
        id: Option<String>,
        name: impl Into<String>,
        arguments: serde_json::Value,
    ) -> Self {
        ToolCall {
            id,
            kind: "function".to_owned(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

/// What a template sees beside the messages: transformers passes `tools` (JSON schemas, or
/// none) and `documents` (none here) to every template, and keyword arguments such as
/// Llama 3's `date_string`, `builtin_tools` or `tools_in_user_message`.
#[derive(Debug, Default, Clone)]
pub struct RenderOptions<'a> {
    /// End where the assistant's reply starts.
    pub add_generation_prompt: bool,
    /// The tools offered, as `{"type": "function", "function": {...}}` JSON schemas.
    pub tools: Option<&'a [serde_json::Value]>,
    /// More template variables.
    pub extra: Vec<(&'a str, serde_json::Value)>,
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template syntax error at line {line}: {message}")]
    Syntax { line: usize, message: String },
    /// The template itself refused the conversation through `raise_exception(msg)`.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template failed at line {line}: {message}")]
    Render { line: usize, message: String },
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` once; `bos_token`/`eos_token` are the vocabulary's special-token texts.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // Prompts are plain text: nothing may be HTML-escaped.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Print `none` and booleans as Python does ("None", "True"), like transformers' Jinja.
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::None => Ok(out.write_str("None")?),
            ValueKind::Bool => Ok(out.write_str(if value.is_true() { "True" } else { "False" })?),
            _ => escape_formatter(out, state, value),
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: &str| strftime(fmt, now_unix()));
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::Syntax {
                line: e.line().unwrap_or(0),
                message: message_of(&e),
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Makes `strftime_now` read this instant (seconds since the Unix epoch) instead of the
    /// clock, for reproducible prompts.
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Self {
        self.env
            .add_function("strftime_now", move |fmt: &str| strftime(fmt, unix_seconds));
        self
    }

    /// Renders `messages`; with `add_generation_prompt` the prompt ends where the assistant's
    /// reply starts.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..RenderOptions::default()
            },
        )
    }

    /// Renders `messages` with tools and more variables, as transformers'
    /// `apply_chat_template(messages, tools=…, **kwargs)` does.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions<'_>,
    ) -> Result<String, ChatError> {
        let mut vars: BTreeMap<&str, Value> = opts
            .extra
            .iter()
            .map(|(k, v)| (*k, Value::from_serialize(v)))
            .collect();
        vars.insert("messages", Value::from_serialize(messages));
        vars.insert("tools", Value::from_serialize(opts.tools));
        vars.insert("documents", Value::from(()));
        vars.insert(
            "add_generation_prompt",
            Value::from(opts.add_generation_prompt),
        );
        vars.insert("bos_token", Value::from(self.bos_token.as_str()));
        vars.insert("eos_token", Value::from(self.eos_token.as_str()));
        let render = || self.env.get_template(TEMPLATE_NAME)?.render(&vars);
        render().map_err(|e| match raised_message(&e) {
            Some(msg) => ChatError::Raised(msg.to_owned()),
            None => ChatError::Render {
                line: e.line().unwrap_or(0),
                message: message_of(&e),
            },
        })
    }
}

fn message_of(e: &Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// Marks an error as coming from the template's own `raise_exception`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

fn raised_message(e: &Error) -> Option<&str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(Raised(msg)) = err.downcast_ref::<Raised>() {
            return Some(msg);
        }
        cur = err.source();
    }
    None
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// A UTC calendar date and time of day.
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    /// 0 = Sunday
    weekday: u32,
    /// 1..=366
    yday: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let secs = seconds.rem_euclid(86_400) as u32;
        // Count from 0000-03-01 so that the leap day falls at the end of each year; the
        // Gregorian calendar repeats every 400 years (146 097 days).
        let shifted = days + 719_468;
        let era = shifted.div_euclid(146_097);
        let day_of_era = shifted.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        // Months from March, each of 30.6 days on average.
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);

        const DAYS_BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let leap_shift = u32::from(month > 2 && is_leap(year));
        Self {
            year,
            month,
            day,
            weekday: (days + 4).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
            yday: DAYS_BEFORE[month as usize - 1] + day + leap_shift,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
        }
    }
}

/// Python's `datetime.strftime` for the C-locale directives chat templates use, in UTC
/// (transformers uses local time; a device's clock usually has no time zone anyway).
fn strftime(fmt: &str, unix_seconds: i64) -> Result<String, Error> {
    let t = DateTime::from_unix(unix_seconds);
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month = MONTHS[t.month as usize - 1];
        let weekday = WEEKDAYS[t.weekday as usize];
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{}", t.year),
            Some('y') => write!(out, "{:02}", t.year.rem_euclid(100)),
            Some('m') => write!(out, "{:02}", t.month),
            Some('d') => write!(out, "{:02}", t.day),
            Some('e') => write!(out, "{:2}", t.day),
            Some('j') => write!(out, "{:03}", t.yday),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{:02}", t.hour),
            Some('I') => write!(out, "{:02}", (t.hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{:02}", t.minute),
            Some('S') => write!(out, "{:02}", t.second),
            Some('%') => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        };
    }
    Ok(out)
}

/// `json.dumps` as transformers exposes it: `ensure_ascii=False` by default, `indent`,
/// `separators`, `sort_keys`, and Python's spacing (`", "` and `": "`).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item_separator, key_separator)",
            ))
        }
        // Python drops the space after ',' when indenting (it would end each line).
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut w = JsonWriter {
        out: String::new(),
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    w.value(value, 0)?;
    Ok(Value::from(w.out))
}

struct JsonWriter {
    out: String,
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonWriter {
    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v),
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, |w, i| {
                    w.value(&items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container('{', '}', keys.len(), depth, |w, i| {
                    let key = &keys[i];
                    // JSON keys are strings; Python converts numbers and booleans the same way.
                    match key.as_str() {
                        Some(s) => w.string(s),
                        None => w.string(&key.to_string()),
                    }
                    w.out.push_str(&w.key_sep.clone());
                    w.value(&v.get_item(key)?, depth + 1)
                })?;
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of type {kind}"),
                ))
            }
        }
        Ok(())
    }

    fn container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                self.out.push_str(&self.item_sep.clone());
            }
            self.newline(depth + 1);
            item(self, i)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(width) = self.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', width * depth));
        }
    }

    fn number(&mut self, v: &Value) {
        if v.is_integer() {
            let _ = write!(self.out, "{v}");
            return;
        }
        let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
        if x.is_nan() {
            self.out.push_str("NaN");
        } else if x.is_infinite() {
            self.out
                .push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            // Rust's `{:?}` picks the same shortest digits and the same switch to exponent
            // notation as Python's repr; only the exponent is spelled differently.
            let repr = format!("{x:?}");
            match repr.split_once('e') {
                Some((mantissa, exp)) => {
                    let (sign, digits) = match exp.strip_prefix('-') {
                        Some(d) => ('-', d),
                        None => ('+', exp),
                    };
                    let _ = write!(self.out, "{mantissa}e{sign}{digits:0>2}");
                }
                None => self.out.push_str(&repr),
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, ChatError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true)
    }

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", content)]
    }

    #[test]
    fn strftime_matches_known_dates() {
        let f = |fmt, t| strftime(fmt, t).unwrap();
        assert_eq!(f("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(f("%A %a %j", 0), "Thursday Thu 001");
        assert_eq!(f("%d %b %Y", 1_721_952_000), "26 Jul 2024");
        // 2024-02-29 12:34:56, a leap day.
        assert_eq!(
            f("%Y-%m-%d %H:%M:%S %j %B %y %I %p %e %%", 1_709_210_096),
            "2024-02-29 12:34:56 060 February 24 12 PM 29 %"
        );
        assert_eq!(f("%j %d %b %Y", 978_220_800), "366 31 Dec 2000");
        assert_eq!(f("%Y-%m-%d %H:%M:%S %a", -1), "1969-12-31 23:59:59 Wed");
        // 1900 is not a leap year; 2000 is.
        assert_eq!(f("%Y-%m-%d %j", -2_203_891_200), "1900-03-01 060");
        assert_eq!(f("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert!(strftime("%Q", 0).is_err());
        assert!(strftime("%", 0).is_err());
        assert!(strftime("%Y", i64::MAX).is_ok());
        assert!(strftime("%Y", i64::MIN).is_ok());
    }

    #[test]
    fn syntax_error_reports_the_line() {
        let err = ChatTemplate::new("line one\n{% if x %}\n{{ y }\n", "", "").unwrap_err();
        match err {
            ChatError::Syntax { line, .. } => assert_eq!(line, 3, "{err}"),
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system turn') }}{% endif %}";
        match render(src, &user("hi")) {
            Err(ChatError::Raised(msg)) => assert_eq!(msg, "need a system turn"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn other_render_errors_are_render_errors() {
        match render("a\n{{ messages[0].content + 1 }}", &user("hi")) {
            Err(ChatError::Render { line: 2, .. }) => {}
            other => panic!("expected a render error at line 2, got {other:?}"),
        }
    }

    #[test]
    fn lenient_undefined_and_python_methods() {
        let src =
            "{{ bos_token }}{% for m in messages %}{{ m.tool_calls is defined }}|{{ m.missing }}|\
                   {{ m.content.strip().upper() }}|{{ m.content.startswith(' he') }}{% endfor %}\
                   {% if tools %}T{% endif %}{{ date_string }}{{ none }}{{ eos_token }}";
        assert_eq!(
            render(src, &user(" hello ")).unwrap(),
            "<s>False||HELLO|TrueNone</s>"
        );
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages[0].content | tojson }}|\
                   {{ [1, 2.5, none, true, {'b': 1, 'a': []}] | tojson }}|\
                   {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|\
                   {{ {'k': [1]} | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}|\
                   {{ [1e20, 1e-7] | tojson }}";
        assert_eq!(
            render(src, &user("say \"<hi>\"\n\té")).unwrap(),
            "{\"role\": \"user\", \"content\": \"say \\\"<hi>\\\"\\n\\t\u{e9}\"}|\
             \"say \\\"<hi>\\\"\\n\\t\u{e9}\"|\
             [1, 2.5, null, true, {\"b\": 1, \"a\": []}]|\
             {\"a\": 2, \"b\": 1}|\
             {\n  \"k\": [\n    1\n  ]\n}|\"\\u00e9\"|\
             [1e+20, 1e-07]"
        );
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        assert_eq!(render(src, &user("x")).unwrap(), "[x]\n");
    }
}

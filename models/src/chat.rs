//! Chat templates with Hugging Face `apply_chat_template` semantics, on minijinja.
//!
//! As transformers does: `trim_blocks` and `lstrip_blocks` on, `raise_exception(msg)`,
//! a `tojson` filter that writes Python's `json.dumps` output (`ensure_ascii=False`,
//! `", "`/`": "` separators, optional `indent`), `strftime_now(fmt)`, Python string and
//! dict methods (`.strip()`, `.startswith()`, `.items()`...), and the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and
//! any extra keyword arguments.
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat message. `content` is a string, OpenAI-style content parts
/// (`[{"type":"text","text":...}]`) or null; see [`ChatTemplate::apply`] for how each
/// reaches the template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: Value,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: Value::String(content.to_string()),
            extra: Default::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// The template loops over a message's content parts (multimodal-aware templates such
    /// as Gemma 3's); else it expects content to be a string.
    takes_parts: bool,
}

/// Whether a template iterates over message content (`{% for p in message['content'] %}`),
/// vLLM's "openai" content format; templates that only concatenate content take strings.
fn iterates_content(source: &str) -> bool {
    static RE: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r#"\{%-?\s*for\s+\w+\s+in\s+[^%]*(\[\s*['"]content['"]\s*\]|\.content\b)[^%]*%\}"#).ok())
        .as_ref()
        .is_some_and(|re| re.is_match(source))
}

/// A message's content as the template gets it: null becomes `""`; content parts must all
/// be text (these are text-only models) and are joined with newlines unless the template
/// takes parts (as vLLM does); anything else is an error naming the message and part.
fn template_content(i: usize, content: &Value, takes_parts: bool) -> Result<Value> {
    let parts = match content {
        Value::Null => return Ok(Value::String(String::new())),
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        other => {
            let kind = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "an object",
            };
            return Err(Error::Template(format!("messages[{i}].content must be a string, an array of content parts or null, not {kind}")));
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, part.get("text").and_then(Value::as_str)) {
            ("text", Some(t)) => texts.push(t),
            ("text", None) => return Err(Error::Template(format!("messages[{i}].content[{j}] is a text part without a string `text`"))),
            ("", _) => return Err(Error::Template(format!("messages[{i}].content[{j}] has no `type`"))),
            (other, _) => return Err(Error::Template(format!("messages[{i}].content[{j}] has type `{other}`: this model takes text only"))),
        }
    }
    Ok(if takes_parts { content.clone() } else { Value::String(texts.join("\n")) })
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`.
pub fn python_json(v: &Value, indent: Option<usize>) -> String {
    fn esc(s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    fn go(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
        let nl = |out: &mut String, lvl: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * lvl));
            }
        };
        let sep = if indent.is_some() { "," } else { ", " };
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => esc(s, out),
            Value::Array(a) => {
                if a.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    nl(out, level + 1);
                    go(x, indent, level + 1, out);
                }
                nl(out, level);
                out.push(']');
            }
            Value::Object(o) => {
                if o.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push('{');
                for (i, (k, x)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    nl(out, level + 1);
                    esc(k, out);
                    out.push_str(": ");
                    go(x, indent, level + 1, out);
                }
                nl(out, level);
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    go(v, indent, 0, &mut out);
    out
}

fn tojson(v: JValue, kwargs: Kwargs) -> std::result::Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| JError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JValue::from_safe_string(python_json(&json, indent)))
}

fn raise_exception(msg: String) -> std::result::Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> std::result::Result<JValue, JError> {
    // No timezone database is needed for the formats chat templates use (dates).
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let out = fmt
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3]);
    Ok(JValue::from(out))
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let t = Self {
            takes_parts: iterates_content(&source),
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        };
        // Compile once so a broken template fails at load time, not on the first request.
        t.env()?;
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn env(&self) -> Result<Environment<'static>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| Error::Template(format!("cannot compile the chat template: {e:#}")))?;
        Ok(env)
    }

    /// Render `messages` (`add_generation_prompt`: end with the assistant turn's header).
    /// Null content renders as an empty string. Content parts must be text; a template
    /// that iterates over content gets them as they are, any other gets their texts
    /// joined with newlines (vLLM's two content formats).
    pub fn apply(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.apply_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    pub fn apply_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let env = self.env()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let mut m = serde_json::to_value(m).map_err(|e| Error::Template(e.to_string()))?;
            if let Some(obj) = m.as_object_mut() {
                let content = template_content(i, obj.get("content").unwrap_or(&Value::Null), self.takes_parts)?;
                obj.insert("content".into(), content);
            }
            msgs.push(m);
        }
        ctx.insert("messages".into(), Value::Array(msgs));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        ctx.entry("tools").or_insert(Value::Null);
        tmpl.render(JValue::from_serialize(&ctx))
            .map_err(|e| Error::Template(format!("{e:#}")))
    }
}

/// The template used when a model ships none: ChatML.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, "<s>", "</s>").unwrap()
    }

    #[test]
    fn chatml_with_generation_prompt() {
        let out = t(CHATML_TEMPLATE)
            .apply(&[Message::new("system", "S"), Message::new("user", "Привіт")], true)
            .unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nПривіт<|im_end|>\n<|im_start|>assistant\n");
        let out = t(CHATML_TEMPLATE).apply(&[Message::new("user", "x")], false).unwrap();
        assert!(!out.ends_with("assistant\n"));
    }

    #[test]
    fn bos_eos_and_trim_blocks() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\n[U]{{ m.content }}{{ eos_token }}\n  {% endif %}\n{% endfor %}";
        let out = t(src).apply(&[Message::new("user", "a"), Message::new("assistant", "b")], false).unwrap();
        assert_eq!(out, "<s>[U]a</s>\n");
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok";
        let e = t(src).apply(&[Message::new("assistant", "a")], false).unwrap_err();
        assert!(e.to_string().contains("Conversation roles must alternate"), "{e}");
        assert_eq!(t(src).apply(&[Message::new("user", "a")], false).unwrap(), "ok");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ {'a': [1, 2], 'b': 'ї<>'} | tojson(indent=2) }}";
        let out = t(src).apply(&[Message::new("user", "Дія \"quoted\"\n")], false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"Дія \\\"quoted\\\"\\n\"}|{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"ї<>\"\n}"
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% if m.content.startswith(' h') %}!{% endif %}{% endfor %}";
        let out = t(src)
            .apply(&[Message::new("user", " hi "), Message::new("user", "yo"), Message::new("user", "zz")], false)
            .unwrap();
        assert_eq!(out, "HI!YO");
    }

    #[test]
    fn content_parts_and_null_content() {
        let parts = |texts: &[&str]| Value::Array(texts.iter().map(|t| serde_json::json!({"type": "text", "text": t})).collect());
        let msg = |role: &str, content: Value| Message { role: role.into(), content, extra: Default::default() };
        // A template that concatenates content gets the texts joined with newlines, the
        // same prompt as the joined string; null content is empty.
        let chatml = t(CHATML_TEMPLATE);
        let out = chatml.apply(&[msg("user", parts(&["Як отримати", "довідку?"])), msg("assistant", Value::Null)], false).unwrap();
        assert_eq!(out, chatml.apply(&[Message::new("user", "Як отримати\nдовідку?"), Message::new("assistant", "")], false).unwrap());
        assert!(!iterates_content(CHATML_TEMPLATE) && !iterates_content(GEMMA_TEMPLATE));
        // A template that loops over parts gets them unchanged.
        let src = "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{%- for p in m['content'] -%}[{{ p.text }}]{% endfor %}{% endif %}{% endfor %}";
        assert!(iterates_content(src));
        assert_eq!(t(src).apply(&[msg("user", parts(&["a", "b"])), Message::new("user", "c")], false).unwrap(), "[a][b]c");
        // Non-text parts and other content types are errors naming the message and part.
        let image = Value::Array(vec![serde_json::json!({"type": "text", "text": "x"}), serde_json::json!({"type": "image_url", "image_url": {"url": "data:"}})]);
        let e = chatml.apply(&[Message::new("system", "s"), msg("user", image)], false).unwrap_err().to_string();
        assert!(e.contains("messages[1].content[1]") && e.contains("image_url"), "{e}");
        let e = chatml.apply(&[msg("user", serde_json::json!(5))], false).unwrap_err().to_string();
        assert!(e.contains("messages[0].content") && e.contains("a number"), "{e}");
        let e = chatml.apply(&[msg("user", serde_json::json!([{"type": "text"}]))], false).unwrap_err().to_string();
        assert!(e.contains("without a string `text`"), "{e}");
    }

    #[test]
    fn broken_template_fails_at_load() {
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
    }
}

/// Gemma's turn format, for Gemma checkpoints that ship no template (the GGUF of Gemma 3
/// 270M): `<start_of_turn>user ... <end_of_turn>`, the assistant's role named `model`, a
/// system message folded into the first user turn, content trimmed.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' + ((first_user_prefix if loop.first else '') + message['content']) | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"#;

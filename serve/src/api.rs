//! OpenAI request and response shapes, and validation: every bad request becomes an
//! [`ApiError`] with an HTTP status and OpenAI's error JSON, never a panic.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hromada_models::chat::Message;
use hromada_models::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
            retry_after: None,
        }
    }
    pub fn with_status(mut self, status: StatusCode, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }
    pub fn auth(msg: &str) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: msg.into(), kind: "authentication_error", param: None, code: Some("invalid_api_key"), retry_after: None }
    }
    pub fn overloaded(msg: String, retry_after: u64) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, message: msg, kind: "rate_limit_error", param: None, code: Some("rate_limit_exceeded"), retry_after: Some(retry_after) }
    }
    pub fn unavailable(msg: &str) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: msg.into(), kind: "server_error", param: None, code: Some("unavailable"), retry_after: Some(5) }
    }
    pub fn internal(msg: String) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: msg, kind: "server_error", param: None, code: None, retry_after: None }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        r
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Token id (as a string, OpenAI's form) -> bias in [-100, 100].
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
}

/// Whether an optional JSON field is absent in effect: missing, null, `[]` or `{}`.
fn unset(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

impl ChatRequest {
    /// Refuses what this server cannot honour instead of ignoring it: a client asking for
    /// JSON output or tool calls must not get free text that looks like success.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if let Some(f) = self.response_format.as_ref().filter(|f| !f.is_null()) {
            let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "text" {
                return Err(ApiError::bad(format!("response_format of type `{kind}` is not supported: this server has no structured output (only `text`)"), Some("response_format")));
            }
        }
        let tool_choice_none = self.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
        if !unset(&self.tools) && !tool_choice_none {
            return Err(ApiError::bad("tool calling is not supported by this server; send tool_choice \"none\" to have the tools ignored", Some("tools")));
        }
        if !unset(&self.functions) {
            return Err(ApiError::bad("function calling is not supported by this server", Some("functions")));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(flatten)]
    pub common: Common,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

/// Parse a JSON body into `T`, turning serde's message into a 400 that names the problem.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = if e.is_syntax() || e.is_eof() { "malformed JSON" } else { "invalid request" };
        ApiError::bad(format!("{kind}: {e}"), None)
    })
}

pub const MAX_N: i64 = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;

impl Common {
    /// Sampling parameters after range checks; `default_max` applies when no max is set.
    /// `vocab`: the model's vocabulary size (logit_bias keys must be below it).
    pub fn sampling(&self, default_max: usize, vocab: usize) -> Result<(SamplingParams, usize), ApiError> {
        let logit_bias = self.logit_bias(vocab)?;
        let max = self.max_completion_tokens.or(self.max_tokens);
        let max_tokens = match max {
            None => default_max,
            Some(m) if m < 1 => {
                let p = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
                return Err(ApiError::bad(format!("{p} must be at least 1, got {m}"), Some(p)));
            }
            Some(m) => m as usize,
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad(format!("n must be between 1 and {MAX_N}, got {n}"), Some("n")));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k < 0 => return Err(ApiError::bad(format!("top_k must be -1 (off) or positive, got {k}"), Some("top_k"))),
            Some(k) => Some(k as usize),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 8 {
            return Err(ApiError::bad("at most 8 stop sequences are allowed", Some("stop")));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed,
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos,
            stop_token_ids: vec![],
            logit_bias,
        };
        p.validate().map_err(|e| {
            let msg = e.to_string();
            let field = ["temperature", "top_p", "min_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "logit_bias"]
                .into_iter()
                .find(|f| msg.contains(f));
            ApiError::bad(msg.trim_start_matches("invalid argument: ").to_string(), field)
        })?;
        Ok((p, n as usize))
    }

    /// `logit_bias` as (token, bias) pairs: an object whose keys are token ids in decimal
    /// and whose values are numbers; the bias range is checked by `validate`.
    fn logit_bias(&self, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let bad = |m: String| ApiError::bad(m, Some("logit_bias"));
        match &self.logit_bias {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| {
                    let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
                    let id = id.ok_or_else(|| bad(format!("logit_bias keys must be token ids below the vocabulary size {vocab}, got `{k}`")))?;
                    let b = v.as_f64().ok_or_else(|| bad(format!("logit_bias values must be numbers, got {v} for token {k}")))?;
                    Ok((id, b as f32))
                })
                .collect(),
            Some(other) => Err(bad(format!("logit_bias must be an object of token ids to biases, got {other}"))),
        }
    }
}

//! The HTTP server: OpenAI-compatible routes over the engine thread.
//!
//! One OS thread owns the [`Engine`] (and so the model); HTTP handlers talk to it through
//! a command channel. Each choice of a request gets its own token channel and a task that
//! detokenizes, applies stop strings and forwards deltas; when the client goes away the
//! task notices the closed channel and cancels the sequence, which frees its blocks.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use hromada_models::generate::{DecodeStream, FinishReason};
use hromada_models::sampling::{SamplingParams, StopStrings};
use hromada_models::LoadedModel;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::sync::mpsc;

use crate::api::{parse, ApiError, ChatRequest, CompletionRequest, PromptField, MAX_TOP_LOGPROBS};
use crate::engine::{Engine, EngineConfig, TokenOut};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// sha256 hex digests of accepted API keys; `None`: no authentication.
    pub api_keys: Option<HashSet<String>>,
    /// Requests in flight (running + waiting) before new ones get 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// Concurrent requests per API key (0: unlimited).
    pub per_key_concurrency: usize,
    pub request_timeout: Duration,
    pub engine: EngineConfig,
    pub default_max_tokens: usize,
    pub served_model_name: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: None,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            per_key_concurrency: 0,
            request_timeout: Duration::from_secs(600),
            engine: EngineConfig::default(),
            default_max_tokens: 256,
            served_model_name: None,
        }
    }
}

/// Read an API key file: one sha256 hex digest per line (`#` comments allowed).
pub fn read_key_file(path: &std::path::Path) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.len() != 64 || !l.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{}:{}: expected a sha256 hex digest (64 hex characters)", path.display(), i + 1));
        }
        keys.insert(l.to_ascii_lowercase());
    }
    if keys.is_empty() {
        return Err(format!("{}: no keys", path.display()));
    }
    Ok(keys)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

enum Cmd {
    Add {
        id: u64,
        prompt: Vec<u32>,
        params: Box<SamplingParams>,
        top: usize,
        prompt_lp: Option<usize>,
        tx: mpsc::UnboundedSender<Result<TokenOut, String>>,
    },
    Cancel(u64),
}

struct AppState {
    model: Arc<LoadedModel>,
    model_name: String,
    tx: std::sync::mpsc::Sender<Cmd>,
    metrics: Arc<Metrics>,
    cfg: ServeConfig,
    next_id: AtomicU64,
    in_flight: AtomicU64,
    ready: AtomicBool,
    per_key: Mutex<HashMap<String, usize>>,
}

fn engine_loop(mut engine: Engine, rx: std::sync::mpsc::Receiver<Cmd>, metrics: Arc<Metrics>) {
    let mut senders: HashMap<u64, mpsc::UnboundedSender<Result<TokenOut, String>>> = HashMap::new();
    let handle = |engine: &mut Engine, senders: &mut HashMap<u64, _>, cmd: Cmd| match cmd {
        Cmd::Add { id, prompt, params, top, prompt_lp, tx } => {
            let n = prompt.len() as u64;
            match engine.add_with_prompt_logprobs(id, prompt, *params, top, prompt_lp) {
                Ok(()) => {
                    metrics.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                    senders.insert(id, tx);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        }
        Cmd::Cancel(id) => {
            engine.cancel(id);
            senders.remove(&id);
        }
    };
    loop {
        if !engine.has_work() {
            match rx.recv() {
                Ok(cmd) => handle(&mut engine, &mut senders, cmd),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut engine, &mut senders, cmd);
        }
        let stepped = engine.step();
        // Publish the engine's state before the tokens, so a client that reacts to a token
        // reads metrics at least as new as it.
        metrics.running.store(engine.sched.num_running() as u64, Ordering::Relaxed);
        metrics.waiting.store(engine.sched.num_waiting() as u64, Ordering::Relaxed);
        metrics.kv_usage_ppm.store((engine.blocks.usage() * 1e6) as u64, Ordering::Relaxed);
        metrics.kv_blocks_used.store(engine.blocks.num_used() as u64, Ordering::Relaxed);
        metrics.prefix_hits.store(engine.blocks.prefix_hits_tokens, Ordering::Relaxed);
        metrics.prefix_queries.store(engine.blocks.prefix_queries_tokens, Ordering::Relaxed);
        metrics.preemptions.store(engine.sched.preemptions, Ordering::Relaxed);
        match stepped {
            Ok(outs) => {
                for t in outs {
                    metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    let id = t.id;
                    let done = t.finished.is_some();
                    let gone = senders.get(&id).is_none_or(|s| s.send(Ok(t)).is_err());
                    if done || gone {
                        senders.remove(&id);
                        if !done {
                            engine.cancel(id);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing the running requests");
                for (id, s) in senders.drain() {
                    let _ = s.send(Err(format!("engine error: {e}")));
                    engine.cancel(id);
                }
            }
        }
    }
}

/// What a choice task reports.
enum Delta {
    Text { index: usize, text: String, logprobs: Vec<Value> },
    Done { index: usize, finish: &'static str, completion_tokens: usize },
    Error(String),
}

struct Guard {
    state: Arc<AppState>,
    key: Option<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(k) = &self.key {
            if let Ok(mut m) = self.state.per_key.lock() {
                if let Some(c) = m.get_mut(k) {
                    *c = c.saturating_sub(1);
                }
            }
        }
    }
}

fn check_auth(state: &Arc<AppState>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(keys) = &state.cfg.api_keys else { return Ok(None) };
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::auth("missing API key: send `Authorization: Bearer KEY`"))?;
    let h = sha256_hex(token.trim());
    if keys.contains(&h) {
        Ok(Some(h))
    } else {
        Err(ApiError::auth("invalid API key"))
    }
}

/// Admission: readiness, queue depth (429) and the per-key limit (429).
fn admit(state: &Arc<AppState>, key: Option<String>, choices: usize) -> Result<Guard, ApiError> {
    if !state.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = Guard { state: state.clone(), key: None };
    let queued = state.metrics.running.load(Ordering::Relaxed) + state.metrics.waiting.load(Ordering::Relaxed);
    if in_flight as usize + choices > state.cfg.max_queue || queued as usize + choices > state.cfg.max_queue {
        return Err(ApiError::overloaded(format!("the server is at capacity ({} requests in flight); retry later", state.cfg.max_queue), 1));
    }
    let mut guard = guard;
    if let (Some(k), true) = (key, state.cfg.per_key_concurrency > 0) {
        let mut m = state.per_key.lock().map_err(|_| ApiError::internal("lock poisoned".into()))?;
        let c = m.entry(k.clone()).or_insert(0);
        if *c >= state.cfg.per_key_concurrency {
            return Err(ApiError::overloaded(format!("this API key already has {} requests in flight", *c), 1));
        }
        *c += 1;
        guard.key = Some(k);
    }
    Ok(guard)
}

fn check_model(state: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &state.model_name => Err(ApiError::bad(format!("the model `{m}` does not exist; this server serves `{}`", state.model_name), Some("model"))
            .with_status(StatusCode::NOT_FOUND, "model_not_found")),
        _ => Ok(()),
    }
}

fn check_length(state: &AppState, prompt: usize, max_tokens: usize, explicit_max: bool) -> Result<usize, ApiError> {
    let ctx = state.model.context_length;
    if prompt == 0 {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if prompt >= ctx || (explicit_max && prompt + max_tokens > ctx) {
        return Err(ApiError::bad(
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the prompt, {max_tokens} for the completion).",
                prompt + max_tokens
            ),
            Some("messages"),
        )
        .with_status(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    Ok(max_tokens.min(ctx - prompt))
}

/// Start the choices of a request; returns the merged delta stream.
#[allow(clippy::too_many_arguments)]
fn launch(
    state: &Arc<AppState>,
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
    n: usize,
    top: usize,
    want_logprobs: bool,
    chat_logprobs: bool,
    prompt_lp: Option<usize>,
    start: Instant,
) -> mpsc::UnboundedReceiver<Delta> {
    let (dtx, drx) = mpsc::unbounded_channel();
    for (pi, prompt) in prompts.into_iter().enumerate() {
        for j in 0..n {
            let index = pi * n + j;
            let id = state.next_id.fetch_add(1, Ordering::SeqCst);
            let mut p = params.clone();
            p.seed = params.seed.map(|s| s.wrapping_add(index as u64));
            let (ttx, mut trx) = mpsc::unbounded_channel();
            let stops = p.stop.clone();
            let first = prompt.first().copied().unwrap_or(0);
            if state.tx.send(Cmd::Add { id, prompt: prompt.clone(), params: Box::new(p), top, prompt_lp, tx: ttx }).is_err() {
                let _ = dtx.send(Delta::Error("the engine has stopped".into()));
                continue;
            }
            let (st, dtx) = (state.clone(), dtx.clone());
            tokio::spawn(async move {
                let tok = &st.model.tokenizer;
                let mut detok = DecodeStream::new(true);
                let mut stop = StopStrings::new(stops);
                let mut count = 0usize;
                let mut last = Instant::now();
                let deadline = tokio::time::Instant::now() + st.cfg.request_timeout;
                loop {
                    let msg = match tokio::time::timeout_at(deadline, trx.recv()).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => {
                            let _ = dtx.send(Delta::Error(format!("request timed out after {:?}", st.cfg.request_timeout)));
                            break;
                        }
                    };
                    let t = match msg {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = dtx.send(Delta::Error(e));
                            break;
                        }
                    };
                    let now = Instant::now();
                    if count == 0 {
                        st.metrics.ttft.observe(now.duration_since(start).as_secs_f64());
                    } else {
                        st.metrics.itl.observe(now.duration_since(last).as_secs_f64());
                    }
                    last = now;
                    if let Some(pl) = &t.prompt_logprobs {
                        // echo + logprobs: the prompt's own tokens first (the first has none).
                        let piece = |id: u32| st.model.tokenizer.decode(&[id], false).unwrap_or_default();
                        let mut entries = vec![json!({"token": piece(first), "logprob": null, "top": null})];
                        for e in pl {
                            let mut top = serde_json::Map::new();
                            for (id, lp) in &e.top {
                                top.insert(piece(*id), json!(lp));
                            }
                            entries.push(json!({"token": piece(e.token), "logprob": e.logprob, "top": top}));
                        }
                        if dtx.send(Delta::Text { index, text: String::new(), logprobs: entries }).is_err() {
                            break;
                        }
                    }
                    let is_eos = t.finished == Some(FinishReason::Stop);
                    let mut text = String::new();
                    let mut hit = false;
                    if !is_eos {
                        count += 1;
                        if let Ok(Some(piece)) = detok.step(tok, t.token) {
                            let (emit, h) = stop.push(&piece);
                            text = emit;
                            hit = h;
                        }
                    }
                    let finish = if hit || is_eos {
                        Some("stop")
                    } else if t.finished == Some(FinishReason::Length) {
                        text.push_str(&stop.flush());
                        Some("length")
                    } else {
                        None
                    };
                    let logprobs = if want_logprobs && !is_eos { vec![logprob_entry(&st.model, &t, chat_logprobs)] } else { vec![] };
                    if (!text.is_empty() || !logprobs.is_empty()) && dtx.send(Delta::Text { index, text, logprobs }).is_err() {
                        break; // client gone
                    }
                    if let Some(f) = finish {
                        let _ = dtx.send(Delta::Done { index, finish: f, completion_tokens: count });
                        break;
                    }
                }
                // Stop-string hits, timeouts and disconnects end the sequence early; for a
                // sequence the engine already finished this is a no-op.
                let _ = st.tx.send(Cmd::Cancel(id));
                st.metrics.e2e.observe(start.elapsed().as_secs_f64());
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
    drx
}

fn logprob_entry(model: &LoadedModel, t: &TokenOut, chat: bool) -> Value {
    let piece = |id: u32| model.tokenizer.decode(&[id], false).unwrap_or_default();
    if chat {
        let top: Vec<Value> = t
            .top
            .iter()
            .map(|(id, lp)| {
                let s = piece(*id);
                json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
            })
            .collect();
        let s = piece(t.token);
        json!({"token": s, "logprob": t.logprob, "bytes": s.as_bytes(), "top_logprobs": top})
    } else {
        let mut m = serde_json::Map::new();
        for (id, lp) in &t.top {
            m.insert(piece(*id), json!(lp));
        }
        json!({"token": piece(t.token), "logprob": t.logprob, "top": m})
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Read the body up to the limit. A larger body is still drained (up to 64 MiB, without
/// keeping it) so the client can read the 413 instead of a broken pipe.
async fn read_body(state: &AppState, body: axum::body::Body) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let limit = state.cfg.max_body_bytes;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("cannot read the request body: {e}"), None))?;
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > limit.max(64 << 20) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::bad(format!("the request body ({seen} bytes) exceeds the limit of {limit} bytes"), None)
            .with_status(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"));
    }
    Ok(Bytes::from(buf))
}

async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Body) -> Response {
    match chat_inner(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(state: Arc<AppState>, headers: HeaderMap, body: axum::body::Body) -> Result<Response, ApiError> {
    let start = Instant::now();
    let key = check_auth(&state, &headers)?;
    let body = read_body(&state, body).await?;
    let req: ChatRequest = parse(&body)?;
    check_model(&state, &req.common.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("`messages` must contain at least one message", Some("messages")));
    }
    req.check_supported()?;
    let (params, n) = req.common.sampling(state.cfg.default_max_tokens, state.model.model.vocab_size())?;
    let top = match req.top_logprobs {
        None => 0,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => k as usize,
        Some(k) => return Err(ApiError::bad(format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"), Some("top_logprobs"))),
    };
    let prompt = state
        .model
        .encode_chat(&req.messages, true)
        .map_err(|e| ApiError::bad(format!("cannot apply the chat template: {e}"), Some("messages")))?;
    let explicit = req.common.max_tokens.is_some() || req.common.max_completion_tokens.is_some();
    let max_tokens = check_length(&state, prompt.len(), params.max_tokens, explicit)?;
    let params = SamplingParams { max_tokens, ..params };
    let guard = admit(&state, key, n)?;
    let prompt_tokens = prompt.len();
    let rx = launch(&state, vec![prompt], params, n, top, req.logprobs, true, None, start);
    let id = format!("chatcmpl-{:x}", state.next_id.fetch_add(1, Ordering::SeqCst) ^ now_secs());
    let created = now_secs();
    let model = state.model_name.clone();
    if req.common.stream {
        let usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let s = sse_stream(rx, guard, n, prompt_tokens, usage, move |index, delta, finish, logprobs| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        }, true);
        return Ok(Sse::new(s).into_response());
    }
    let (texts, finishes, logprobs, completion) = collect(rx, n).await?;
    drop(guard);
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let lp = if req.logprobs { json!({"content": logprobs[i]}) } else { Value::Null };
            json!({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp, "finish_reason": finishes[i]})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": created, "model": state.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}}))
    .into_response())
}

type Collected = (Vec<String>, Vec<&'static str>, Vec<Vec<Value>>, usize);

async fn collect(mut rx: mpsc::UnboundedReceiver<Delta>, total: usize) -> Result<Collected, ApiError> {
    let mut texts = vec![String::new(); total];
    let mut finishes = vec!["length"; total];
    let mut lps = vec![Vec::new(); total];
    let mut completion = 0;
    let mut done = 0;
    while done < total {
        match rx.recv().await {
            Some(Delta::Text { index, text, logprobs }) => {
                texts[index].push_str(&text);
                lps[index].extend(logprobs);
            }
            Some(Delta::Done { index, finish, completion_tokens }) => {
                finishes[index] = finish;
                completion += completion_tokens;
                done += 1;
            }
            Some(Delta::Error(e)) => {
                return Err(if e.contains("timed out") {
                    ApiError::internal(e).with_status(StatusCode::GATEWAY_TIMEOUT, "timeout")
                } else {
                    ApiError::bad(e, None)
                })
            }
            None => return Err(ApiError::internal("generation ended unexpectedly".into())),
        }
    }
    Ok((texts, finishes, lps, completion))
}

fn sse_stream(
    mut rx: mpsc::UnboundedReceiver<Delta>,
    guard: Guard,
    total: usize,
    prompt_tokens: usize,
    include_usage: bool,
    chunk: impl Fn(usize, Value, Option<&str>, Value) -> Value + Send + 'static,
    chat: bool,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let (tx, out) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let _guard = guard;
        // A failed send means the client went away: returning drops `rx`, so the choice
        // tasks see a closed channel and cancel their sequences.
        macro_rules! emit {
            ($v:expr) => {
                if tx.send($v).await.is_err() {
                    return;
                }
            };
        }
        if chat {
            for i in 0..total {
                emit!(chunk(i, json!({"role": "assistant", "content": ""}), None, Value::Null).to_string());
            }
        }
        let mut done = 0;
        let mut completion = 0;
        while done < total {
            match rx.recv().await {
                Some(Delta::Text { index, text, logprobs }) => {
                    let lp = if logprobs.is_empty() {
                        Value::Null
                    } else if chat {
                        json!({"content": logprobs})
                    } else {
                        completion_logprobs(&logprobs, 0)
                    };
                    let delta = if chat { json!({"content": text}) } else { json!(text) };
                    emit!(chunk(index, delta, None, lp).to_string());
                }
                Some(Delta::Done { index, finish, completion_tokens }) => {
                    done += 1;
                    completion += completion_tokens;
                    let delta = if chat { json!({}) } else { json!("") };
                    emit!(chunk(index, delta, Some(finish), Value::Null).to_string());
                }
                Some(Delta::Error(e)) => {
                    emit!(json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}}).to_string());
                    break;
                }
                None => break,
            }
        }
        if include_usage {
            let mut u = chunk(0, Value::Null, None, Value::Null);
            if let Some(o) = u.as_object_mut() {
                o.insert("choices".into(), json!([]));
                o.insert("usage".into(), json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}));
            }
            emit!(u.to_string());
        }
        emit!("[DONE]".to_string());
    });
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(out), |s| Ok(Event::default().data(s)))
}

fn completion_logprobs(entries: &[Value], offset0: usize) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut off = offset0;
    for e in entries {
        let t = e["token"].as_str().unwrap_or("").to_string();
        offsets.push(off);
        off += t.len();
        tokens.push(t);
        lps.push(e["logprob"].clone());
        tops.push(e["top"].clone());
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Body) -> Response {
    match completions_inner(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(state: Arc<AppState>, headers: HeaderMap, body: axum::body::Body) -> Result<Response, ApiError> {
    let start = Instant::now();
    let key = check_auth(&state, &headers)?;
    let body = read_body(&state, body).await?;
    let req: CompletionRequest = parse(&body)?;
    check_model(&state, &req.common.model)?;
    let (params, n) = req.common.sampling(16, state.model.model.vocab_size())?;
    let top = match req.logprobs {
        None => 0,
        Some(k) if (0..=5).contains(&k) => k as usize,
        Some(k) => return Err(ApiError::bad(format!("logprobs must be between 0 and 5, got {k}"), Some("logprobs"))),
    };
    let tok = &state.model.tokenizer;
    let enc = |s: &str| tok.encode(s, true).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")));
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptField::Text(s) => vec![enc(s)?],
        PromptField::Texts(v) => v.iter().map(|s| enc(s)).collect::<Result<_, _>>()?,
        PromptField::Ids(v) => vec![v.clone()],
        PromptField::IdLists(v) => v.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad("`prompt` must not be empty", Some("prompt")));
    }
    let vocab = state.model.model.vocab_size() as u32;
    if prompts.iter().flatten().any(|&t| t >= vocab) {
        return Err(ApiError::bad(format!("prompt token ids must be below the vocabulary size {vocab}"), Some("prompt")));
    }
    let explicit = req.common.max_tokens.is_some() || req.common.max_completion_tokens.is_some();
    let mut max_tokens = params.max_tokens;
    for p in &prompts {
        max_tokens = max_tokens.min(check_length(&state, p.len(), params.max_tokens, explicit)?);
    }
    let params = SamplingParams { max_tokens, ..params };
    let total = prompts.len() * n;
    let guard = admit(&state, key, total)?;
    let prompt_tokens: usize = prompts.iter().map(|p| p.len() * n).sum();
    let echo_texts: Vec<String> = if req.echo {
        prompts.iter().map(|p| tok.decode(p, true).unwrap_or_default()).collect()
    } else {
        vec![]
    };
    let prompt_lp = (req.echo && req.logprobs.is_some()).then_some(top);
    let rx = launch(&state, prompts, params, n, top, req.logprobs.is_some(), false, prompt_lp, start);
    let id = format!("cmpl-{:x}", state.next_id.fetch_add(1, Ordering::SeqCst) ^ now_secs());
    let created = now_secs();
    let model = state.model_name.clone();
    if req.common.stream {
        let usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let s = sse_stream(rx, guard, total, prompt_tokens, usage, move |index, text, finish, logprobs| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
        }, false);
        return Ok(Sse::new(s).into_response());
    }
    let (texts, finishes, lps, completion) = collect(rx, total).await?;
    drop(guard);
    let choices: Vec<Value> = (0..total)
        .map(|i| {
            let prefix = if req.echo { echo_texts[i / n].clone() } else { String::new() };
            // With echo the prompt's tokens lead the log-probs, so offsets start at 0.
            let off = if prompt_lp.is_some() { 0 } else { prefix.len() };
            let lp = if req.logprobs.is_some() { completion_logprobs(&lps[i], off) } else { Value::Null };
            json!({"index": i, "text": format!("{prefix}{}", texts[i]), "logprobs": lp, "finish_reason": finishes[i]})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}}))
    .into_response())
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_auth(&state, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now_secs(),
        "owned_by": "hromada", "max_model_len": state.model.context_length}]}))
    .into_response()
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

async fn not_found() -> Response {
    ApiError::bad("no such route", None).with_status(StatusCode::NOT_FOUND, "not_found").into_response()
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// Run the server until SIGTERM/SIGINT, then drain: stop accepting, finish running
/// requests, exit.
pub async fn serve(model: LoadedModel, cfg: ServeConfig) -> Result<(), String> {
    if cfg.api_keys.is_none() && !is_loopback(&cfg.host) {
        return Err(format!("binding to {} (not loopback) requires --api-key-file", cfg.host));
    }
    let model = Arc::new(model);
    let model_name = cfg.served_model_name.clone().unwrap_or_else(|| model.id.clone());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = Engine::new(model.clone(), cfg.engine.clone()).map_err(|e| format!("cannot create the paged K/V cache: {e}"))?;
    let m2 = metrics.clone();
    let engine_thread = std::thread::Builder::new()
        .name("hromada-engine".into())
        .spawn(move || engine_loop(engine, rx, m2))
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port)
        .parse()
        .or_else(|_| format!("127.0.0.1:{}", cfg.port).parse().map_err(|e| format!("bad address: {e}")))?;
    let state = Arc::new(AppState {
        model,
        model_name,
        tx,
        metrics,
        cfg,
        next_id: AtomicU64::new(1),
        in_flight: AtomicU64::new(0),
        ready: AtomicBool::new(true),
        per_key: Mutex::new(HashMap::new()),
    });
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // The line tests and scripts wait for.
    println!("hromada serve: listening on http://{local} (model `{}`)", state.model_name);
    let st = state.clone();
    let shutdown = async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
        tracing::info!("shutdown signal: draining");
        st.ready.store(false, Ordering::SeqCst);
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())?;
    drop(state);
    let _ = engine_thread.join();
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

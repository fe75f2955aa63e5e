//! The OpenAPI 3.1 description served at `/openapi.json`.
use serde_json::{json, Value};

pub fn document() -> Value {
    let err = json!({"description": "OpenAI-style error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let sampling = json!({
        "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0}, "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer"}, "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 8}]},
        "seed": {"type": "integer", "minimum": 0}, "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "user": {"type": "string"}, "ignore_eos": {"type": "boolean"},
        "logit_bias": {"type": "object", "description": "token id -> bias added to its logit", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
    });
    let mut chat_props = sampling.clone();
    let mut cmpl_props = sampling;
    if let (Some(c), Some(p)) = (chat_props.as_object_mut(), cmpl_props.as_object_mut()) {
        c.insert("messages".into(), json!({"type": "array", "minItems": 1, "items": {"type": "object",
            "required": ["role", "content"], "properties": {"role": {"type": "string"}, "content": {"oneOf": [
                {"type": "string"}, {"type": "null"},
                {"type": "array", "description": "content parts; text only (other types get 400)", "items": {"type": "object",
                    "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}}));
        c.insert("response_format".into(), json!({"type": "object", "description": "only `{\"type\": \"text\"}`; other types get 400",
            "properties": {"type": {"const": "text"}}}));
        c.insert("tools".into(), json!({"type": "array", "description": "accepted only with tool_choice \"none\" (ignored); tool calls are not supported"}));
        c.insert("tool_choice".into(), json!({}));
        c.insert("logprobs".into(), json!({"type": "boolean"}));
        c.insert("top_logprobs".into(), json!({"type": "integer", "minimum": 0, "maximum": 20}));
        p.insert("prompt".into(), json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
            {"type": "array", "items": {"type": "integer"}}, {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}));
        p.insert("logprobs".into(), json!({"type": "integer", "minimum": 0, "maximum": 5}));
        p.insert("echo".into(), json!({"type": "boolean"}));
    }
    let post = |summary: &str, props: Value, required: &str| json!({"post": {"summary": summary,
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": [required], "properties": props}}}},
        "responses": {"200": {"description": "A completion (JSON), or server-sent events when `stream` is true"},
            "400": err.clone(), "401": err.clone(), "404": err.clone(), "413": err.clone(), "429": err.clone(), "503": err.clone()}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "hromada serve", "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible inference API with continuous batching and a paged KV cache."},
        "paths": {
            "/v1/chat/completions": post("Chat completion", chat_props, "messages"),
            "/v1/completions": post("Text completion", cmpl_props, "prompt"),
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "Model list"}, "401": err.clone()}}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "Readiness: model loaded and not draining", "responses": {"200": {"description": "ready"}, "503": {"description": "draining"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format 0.0.4"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}
        }
    })
}

//! `hromada serve` as a real process over real HTTP on loopback.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(extra: &[&str]) -> Server {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hromada"))
        .args(["serve", "--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "server did not start: {line}");
    Server { child, base: format!("http://127.0.0.1:{port}") }
}

/// (status, body) for a POST; 4xx/5xx are values, not errors.
fn post(base: &str, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut r = ureq::post(&format!("{base}{path}")).set("Content-Type", "application/json").timeout(Duration::from_secs(300));
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    match r.send_string(body) {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn get(base: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn bad_requests_get_4xx_and_the_server_stays_healthy() {
    let s = start(&["--max-body-bytes", "1000000"]);
    let chat = "/v1/chat/completions";
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "malformed JSON"),
        (r#"{"messages": "hi"}"#.into(), 400, "invalid type"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#.into(), 400, "max_tokens"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}"#.into(), 400, "invalid type"),
        (r#"{"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}"#.into(), 404, "does not exist"),
        (r#"{"messages": []}"#.into(), 400, "at least one message"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "temperature": -1}"#.into(), 400, "temperature"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "n": 1000}"#.into(), 400, "n must be"),
        (r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}"#.into(), 400, "messages[0].content[0] has type `image_url`"),
        (r#"{"messages": [{"role": "user", "content": 5}]}"#.into(), 400, "messages[0].content must be"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}"#.into(), 400, "response_format"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#.into(), 400, "tool calling"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}"#.into(), 400, "logit_bias keys must be token ids"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}}"#.into(), 400, "below the vocabulary size"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"15": 1000}}"#.into(), 400, "logit_bias values must be in [-100, 100]"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": [1]}"#.into(), 400, "logit_bias must be an object"),
        (format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#, "a".repeat(10 << 20)), 413, "exceeds the limit"),
        (format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}], "max_tokens": 10}}"#, "слово ".repeat(9000)), 400, "maximum context length"),
    ];
    for (body, status, needle) in cases {
        let (code, text) = post(&s.base, chat, &body, None);
        assert_eq!(code, status, "{needle}: {text}");
        let v = json(&text);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "expected `{needle}` in `{msg}`");
        assert!(v["error"]["type"].is_string());
    }
    let (code, text) = post(&s.base, "/v1/completions", r#"{"prompt": [999999999]}"#, None);
    assert_eq!(code, 400, "{text}");
    assert_eq!(get(&s.base, "/health").0, 200);
    assert_eq!(get(&s.base, "/ready").0, 200);
    let (code, text) = post(&s.base, chat, r#"{"messages": [{"role": "user", "content": "Привіт"}], "max_tokens": 3}"#, None);
    assert_eq!(code, 200, "{text}");
    // Accepted: text content parts, null assistant content, tools with tool_choice "none",
    // response_format `text`, an empty logit_bias.
    let ok = r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Привіт"}]}, {"role": "assistant", "content": null}, {"role": "user", "content": "?"}],
        "max_tokens": 2, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}}"#;
    let (code, text) = post(&s.base, chat, ok, None);
    assert_eq!(code, 200, "{text}");
    // logit_bias: +100 on one token makes greedy decoding repeat it; echoing that token id
    // as a prompt shows it is the same token.
    let (code, text) = post(&s.base, "/v1/completions", r#"{"prompt": [504, 3458], "max_tokens": 3, "temperature": 0, "logprobs": 1, "logit_bias": {"1234": 100}}"#, None);
    assert_eq!(code, 200, "{text}");
    let toks = json(&text)["choices"][0]["logprobs"]["tokens"].clone();
    let (code, echo) = post(&s.base, "/v1/completions", r#"{"prompt": [1234], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true}"#, None);
    assert_eq!(code, 200, "{echo}");
    let want = json(&echo)["choices"][0]["logprobs"]["tokens"][0].clone();
    assert!(want.is_string());
    assert_eq!(toks, serde_json::json!([want, want, want]), "{text}");
    let (code, doc) = get(&s.base, "/openapi.json");
    assert_eq!(code, 200);
    let doc = json(&doc);
    for p in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the OpenAPI document");
    }
}

#[test]
fn api_keys_are_required_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    // sha256("secret-key-1")
    let out = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
        c.stdin.take().unwrap().write_all(b"secret-key-1")?;
        c.wait_with_output()
    });
    let digest = String::from_utf8(out.unwrap().stdout).unwrap().split_whitespace().next().unwrap().to_string();
    std::fs::write(&keys, format!("# ops team\n{digest}\n")).unwrap();
    let s = start(&["--api-key-file", keys.to_str().unwrap(), "--per-key-concurrency", "1"]);
    let body = r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}"#;
    let (code, text) = post(&s.base, "/v1/chat/completions", body, None);
    assert_eq!(code, 401, "{text}");
    let (code, _) = post(&s.base, "/v1/chat/completions", body, Some("wrong"));
    assert_eq!(code, 401);
    let (code, text) = post(&s.base, "/v1/chat/completions", body, Some("secret-key-1"));
    assert_eq!(code, 200, "{text}");
    // One request at a time per key: a second concurrent one gets 429.
    let base = s.base.clone();
    let long = std::thread::spawn(move || {
        let b = r#"{"prompt": "Count:", "max_tokens": 60, "ignore_eos": true}"#;
        post(&base, "/v1/completions", b, Some("secret-key-1"))
    });
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = post(&s.base, "/v1/chat/completions", body, Some("secret-key-1"));
    assert_eq!(code, 429, "{text}");
    assert!(text.contains("in flight"), "{text}");
    assert_eq!(long.join().unwrap().0, 200);
    // A request that runs past --request-timeout-s gets 504, and its blocks are freed.
    let t = start(&["--request-timeout-s", "1"]);
    let b = r#"{"prompt": "Count:", "max_tokens": 5000, "ignore_eos": true}"#;
    let (code, text) = post(&t.base, "/v1/completions", b, None);
    assert_eq!(code, 504, "{text}");
    assert!(text.contains("timed out"), "{text}");
    let since = Instant::now();
    while metric(&t.base, "hromada:kv_cache_blocks_used") > 0.0 {
        assert!(since.elapsed() < Duration::from_secs(30), "blocks not freed after the timeout");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not loopback and no key file: refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_hromada")).args(["serve", "--host", "0.0.0.0", "--port", "1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-key-file"));
}

#[test]
fn concurrent_greedy_requests_equal_sequential_ones() {
    let s = start(&["--dtype", "f32", "--max-num-batched-tokens", "256"]);
    let topics = ["Київ", "Diia", "Верховна Рада ухвалила", "The capital of France is", "Шевченко народився у", "1 2 3 4", "Конституція України", "Hello"];
    let bodies: Vec<String> = (0..32)
        .map(|i| {
            let prompt = format!("{} {}", topics[i % topics.len()], "і ще ".repeat(i % 5));
            serde_json::json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}).to_string()
        })
        .collect();
    let text = |r: &str| json(r)["choices"][0]["text"].as_str().unwrap().to_string();
    let sequential: Vec<String> = bodies.iter().map(|b| {
        let (c, r) = post(&s.base, "/v1/completions", b, None);
        assert_eq!(c, 200, "{r}");
        text(&r)
    }).collect();
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let base = s.base.clone();
            std::thread::spawn(move || post(&base, "/v1/completions", &b, None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (c, r) = h.join().unwrap();
        assert_eq!(c, 200, "{r}");
        assert_eq!(text(&r), sequential[i], "request {i}: concurrent != sequential");
    }
}

#[test]
fn prefix_cache_hits_disconnect_frees_blocks_and_overload_gets_429() {
    let s = start(&["--max-queue", "4"]);
    let system = "Ти — помічник порталу державних послуг «Дія». Відповідай українською, коротко і ввічливо. ".repeat(6);
    for q in ["Як отримати паспорт?", "Як змінити адресу?"] {
        let body = serde_json::json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "max_tokens": 2});
        assert_eq!(post(&s.base, "/v1/chat/completions", &body.to_string(), None).0, 200);
    }
    assert!(metric(&s.base, "hromada:prefix_cache_hits_total") >= 64.0, "shared system prompt hit the prefix cache");
    let idle = metric(&s.base, "hromada:kv_cache_blocks_used");
    assert_eq!(idle, 0.0);
    // Disconnect mid-stream: the sequence is cancelled and its blocks return.
    let port = s.base.rsplit(':').next().unwrap();
    let mut sock = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    let body = serde_json::json!({"prompt": "Розкажи довгу історію про Київ.", "max_tokens": 2000, "stream": true, "ignore_eos": true}).to_string();
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("data:") {
        let n = sock.read(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(metric(&s.base, "hromada:kv_cache_blocks_used") > 0.0, "the stream holds blocks: {got}");
    drop(sock);
    let t = Instant::now();
    while metric(&s.base, "hromada:kv_cache_blocks_used") > idle {
        assert!(t.elapsed() < Duration::from_secs(30), "blocks not freed after the disconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Overload: more concurrent requests than the queue holds.
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let base = s.base.clone();
            std::thread::spawn(move || {
                let b = serde_json::json!({"prompt": format!("Number {i}:"), "max_tokens": 24, "ignore_eos": true}).to_string();
                post(&base, "/v1/completions", &b, None)
            })
        })
        .collect();
    let results: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!busy.is_empty(), "no 429 under overload");
    assert!(ok >= 1 && ok + busy.len() == 16, "every accepted request completes: {results:?}");
    assert!(json(&busy[0].1)["error"]["message"].as_str().unwrap().contains("capacity"));
    for r in results.iter().filter(|r| r.0 == 200) {
        assert_eq!(json(&r.1)["usage"]["completion_tokens"], 24);
    }
}

#[test]
fn sigterm_drains_running_requests_then_exits() {
    let mut s = start(&[]);
    let base = s.base.clone();
    let h = std::thread::spawn(move || {
        let b = serde_json::json!({"prompt": "Count:", "max_tokens": 48, "ignore_eos": true}).to_string();
        post(&base, "/v1/completions", &b, None)
    });
    std::thread::sleep(Duration::from_millis(400));
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (code, body) = h.join().unwrap();
    assert_eq!(code, 200, "the running request finished during the drain: {body}");
    assert_eq!(json(&body)["usage"]["completion_tokens"], 48);
    let t = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "did not exit after draining");
        std::thread::sleep(Duration::from_millis(50));
    }
}

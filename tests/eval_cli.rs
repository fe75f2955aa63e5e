//! `hromada eval` as a process: zno_uk end to end (acc with stderr, per subject), the
//! same task in process and against `hromada serve` over HTTP picking the same choice
//! for every item, rolling perplexity, `eval compare`, and task/data errors that name the
//! file and the line.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hromada"))
}

#[path = "support/tmpdir.rs"]
mod tmpdir;

fn tmpdir(name: &str) -> tmpdir::TmpDir {
    tmpdir::tmpdir(&format!("eval-cli-{name}"))
}

fn eval(args: &[&str]) -> std::process::Output {
    bin().arg("eval").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = eval(args);
    assert!(o.status.success(), "eval {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn samples(dir: &Path, task: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(format!("samples_{task}.jsonl"))).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn zno_in_process_and_over_http_pick_the_same_choices() {
    let dir = tmpdir("zno");
    let a = dir.join("inproc");
    // Few-shot prompts run (2 items, 1 shot each).
    let fs = ok(&["run", "--model", "smollm2-135m", "--tasks", "zno_uk", "--limit", "2", "--num-fewshot", "1"]);
    assert!(fs.contains("| zno_uk | 2 | acc |"), "{fs}");
    let table = ok(&["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", "zno_uk", "--limit", "4", "--output", a.to_str().unwrap()]);
    assert!(table.contains("| zno_uk | 4 | acc |") && table.contains("| zno_uk:history | | acc |"), "{table}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("results.json")).unwrap()).unwrap();
    let acc = r["results"]["zno_uk"]["acc"].as_f64().unwrap();
    let se = r["results"]["zno_uk"]["acc_stderr"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc) && (0.0..0.5).contains(&se), "acc {acc} ± {se}");
    assert_eq!(r["config"]["model_sha256"].as_str().map(|s| s.len()), Some(64));
    let sa = samples(&a, "zno_uk");
    assert_eq!(sa.len(), 4);

    // The same over HTTP: hromada serve, f32, log-likelihoods by echo + logprobs.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = bin().args(["serve", "--dtype", "f32", "--port", &port.to_string()]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _server = Server(child);
    assert!(line.contains("listening"), "server did not start: {line}");
    let b = dir.join("http");
    let url = format!("http://127.0.0.1:{port}/v1");
    ok(&["run", "--endpoint", &url, "--tokenizer", "smollm2-135m", "--tasks", "zno_uk", "--limit", "4", "--output", b.to_str().unwrap()]);
    let sb = samples(&b, "zno_uk");
    for (x, y) in sa.iter().zip(&sb) {
        assert_eq!(x["pred"], y["pred"], "item {} picks differ", x["doc_id"]);
        let (lx, ly) = (x["loglikelihoods"].as_array().unwrap(), y["loglikelihoods"].as_array().unwrap());
        for (p, q) in lx.iter().zip(ly) {
            let d = (p.as_f64().unwrap() - q.as_f64().unwrap()).abs();
            assert!(d <= 5e-3, "item {}: in-process {p} vs HTTP {q}", x["doc_id"]);
        }
    }
    // Generation over HTTP (plain completions, and chat completions with
    // --apply-chat-template) gives the same greedy text as in process.
    std::fs::write(dir.join("gen.jsonl"), "{\"q\": \"Київ — столиця\", \"a\": \"України\"}\n{\"q\": \"1, 2, 3, 4,\", \"a\": \"5\"}\n").unwrap();
    let gen = dir.join("gen.yaml");
    std::fs::write(&gen, "task: gen\ndataset: {path: gen.jsonl, format: jsonl}\noutput_type: generate_until\ndoc_to_text: \"{{ q }}\"\ndoc_to_target: \"a\"\nuntil: [\"\\n\\n\", \".\"]\nmax_gen_toks: 8\n").unwrap();
    for chat in [false, true] {
        let (gi, gh) = (dir.join(format!("gen-inproc-{chat}")), dir.join(format!("gen-http-{chat}")));
        let mut a1 = vec!["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", gen.to_str().unwrap(), "--output", gi.to_str().unwrap()];
        let mut a2 = vec!["run", "--endpoint", &url, "--tasks", gen.to_str().unwrap(), "--output", gh.to_str().unwrap()];
        if chat {
            a1.push("--apply-chat-template");
            a2.push("--apply-chat-template");
        }
        ok(&a1);
        ok(&a2);
        let (si, sh) = (samples(&gi, "gen"), samples(&gh, "gen"));
        assert_eq!(si.len(), 2);
        for (x, y) in si.iter().zip(&sh) {
            let out = x["output"].as_str().unwrap();
            assert!(!out.trim().is_empty(), "chat={chat}: empty greedy output in process: {x}");
            assert_eq!(x["output"], y["output"], "chat={chat}: in process vs HTTP for item {}", x["doc_id"]);
        }
    }
    // compare: identical picks give a zero delta.
    let cmp = ok(&["compare", a.join("results.json").to_str().unwrap(), b.join("results.json").to_str().unwrap()]);
    assert!(cmp.contains("| zno_uk | acc | 4 |") && cmp.contains("+0.0000"), "{cmp}");
    // Without a tokenizer, log-likelihoods over HTTP are refused clearly.
    let o = eval(&["run", "--endpoint", &format!("http://127.0.0.1:{port}"), "--tasks", "zno_uk", "--limit", "1"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--tokenizer"));
}

#[test]
fn perplexity_tasks_and_errors() {
    let dir = tmpdir("ppl");
    // A task of our own: two short documents, small windows so several are needed.
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    let shared = std::env::var("HROMADA_SHARED").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let src = shared.join("data/uk/brown-uk/data/good");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.iter().filter(|f| std::fs::metadata(f).unwrap().len() < 4000).take(2) {
        std::fs::copy(f, dir.join("docs").join(f.file_name().unwrap())).unwrap();
    }
    let task = dir.join("tiny_ppl.yaml");
    std::fs::write(&task, "task: tiny_ppl\ndataset: {path: docs, format: text}\noutput_type: loglikelihood_rolling\ndoc_to_text: \"{{ text }}\"\ngroup_by: \"file[:1]\"\nrolling: {max_length: 256, stride: 128}\n").unwrap();
    let out = dir.join("out");
    ok(&["run", "--model", "smollm2-135m", "--tasks", task.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let bpb = r["results"]["tiny_ppl"]["bits_per_byte"].as_f64().unwrap();
    let wp = r["results"]["tiny_ppl"]["word_perplexity"].as_f64().unwrap();
    assert!(bpb > 0.1 && bpb < 3.0 && wp > 1.0, "bits/byte {bpb}, word perplexity {wp}");
    let s = samples(&out, "tiny_ppl");
    assert!(s.iter().all(|x| x["windows"].as_u64().unwrap() >= 2), "documents should need several windows");
    // The shipped task runs too (provisions of the first act).
    let t = ok(&["run", "--model", "smollm2-135m", "--tasks", "ppl_laws_uk", "--limit", "3"]);
    assert!(t.contains("ppl_laws_uk | 3 | bits_per_byte"), "{t}");

    // A generation task: greedy until a stop string, exact match / F1 / chrF.
    std::fs::write(dir.join("gen.jsonl"), "{\"q\": \"Київ — столиця\", \"a\": \"України\"}\n{\"q\": \"1, 2, 3, 4,\", \"a\": \"5\"}\n").unwrap();
    let gen = dir.join("gen.yaml");
    std::fs::write(&gen, "task: gen\ndataset: {path: gen.jsonl, format: jsonl}\noutput_type: generate_until\ndoc_to_text: \"{{ q }}\"\ndoc_to_target: \"a\"\nuntil: [\"\\n\", \".\", \",\"]\nmax_gen_toks: 6\n").unwrap();
    let gout = dir.join("gen-out");
    let t = ok(&["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", gen.to_str().unwrap(), "--output", gout.to_str().unwrap()]);
    assert!(t.contains("| gen | 2 | chrf |") && t.contains("| gen | 2 | exact_match |") && t.contains("| gen | 2 | f1 |"), "{t}");
    let gs = samples(&gout, "gen");
    assert!(gs.iter().all(|x| !x["output"].as_str().unwrap().contains('\n')), "stop strings not applied: {gs:?}");
    assert_eq!(gs[1]["output"].as_str().unwrap().trim(), "5", "greedy SmolLM2 continues 1, 2, 3, 4, with 5");
    assert_eq!(gs[1]["exact_match"].as_f64(), Some(1.0));

    // A malformed task file: the file and the line.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "task: bad\ndataset: {path: docs, format: text}\noutput_type: [oops\n").unwrap();
    let o = eval(&["run", "--model", "smollm2-135m", "--tasks", bad.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("bad.yaml:3"), "{e}");
    // An unknown output type and a missing field are named.
    std::fs::write(&bad, "task: bad\ndataset: {path: docs, format: text}\noutput_type: ranking\ndoc_to_text: x\n").unwrap();
    let e = String::from_utf8_lossy(&eval(&["run", "--model", "smollm2-135m", "--tasks", bad.to_str().unwrap()]).stderr).to_string();
    assert!(e.contains("bad.yaml") && e.contains("ranking"), "{e}");
    // A broken data line: the data file and its line.
    std::fs::write(dir.join("items.jsonl"), "{\"q\": \"Столиця України?\", \"c\": [\"Київ\", \"Львів\"], \"a\": 0}\n{\"q\": \"broken\n").unwrap();
    let mc = dir.join("mc.yaml");
    std::fs::write(&mc, "task: mc\ndataset: {path: items.jsonl, format: jsonl}\noutput_type: multiple_choice\ndoc_to_text: \"{{ q }}\"\ndoc_to_choice: \"c\"\ndoc_to_target: \"a\"\n").unwrap();
    let e = String::from_utf8_lossy(&eval(&["run", "--model", "smollm2-135m", "--tasks", mc.to_str().unwrap()]).stderr).to_string();
    assert!(e.contains("items.jsonl:2") && e.contains("invalid JSON"), "{e}");
    // A template that refers to a missing field names the document's line.
    std::fs::write(dir.join("items.jsonl"), "{\"q\": \"Столиця України?\", \"c\": [\"Київ\", \"Львів\"], \"a\": 0}\n{\"c\": [\"x\", \"y\"], \"a\": 1}\n").unwrap();
    let e = String::from_utf8_lossy(&eval(&["run", "--model", "smollm2-135m", "--tasks", mc.to_str().unwrap()]).stderr).to_string();
    assert!(e.contains("items.jsonl:2") && e.contains("doc_to_text"), "{e}");
}

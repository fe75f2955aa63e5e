//! `hromada data` as a real process: kill -9 in the middle of a run and run again gives
//! byte-identical output; the Slurm scripts, run stage by stage with the array variable
//! set as Slurm sets it, give the same output as a local run; `data stats` reads a run.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hromada"))
}

fn shared() -> PathBuf {
    std::env::var("HROMADA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

#[path = "support/tmpdir.rs"]
mod tmpdir;

fn tmpdir(name: &str) -> tmpdir::TmpDir {
    tmpdir::tmpdir(&format!("data-cli-{name}"))
}

/// 240 brown-uk documents copied into `dir/in`.
fn corpus(dir: &Path) {
    let src = shared().join("data/uk/brown-uk/data/good");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for f in files.iter().take(240) {
        std::fs::copy(f, dir.join("in").join(f.file_name().unwrap())).unwrap();
    }
}

fn pipeline(dir: &Path, name: &str, out: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "input: {{path: in, format: text}}\noutput: {{path: {out}, rejected: true}}\ntasks: 12\nsteps:\n  - normalise: {{}}\n  - langid: {{}}\n  - quality: {{}}\n  - pii: {{}}\n  - dedup: {{}}\n  - tokenize: {{tokenizer: smollm2-135m}}\n"
        ),
    )
    .unwrap();
    p
}

/// Every output file (relative path -> bytes), without the run's stats and reports.
fn outputs(root: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(d: &Path, root: &Path, v: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, v);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                if rel.ends_with(".json") || rel.ends_with(".html") || rel.ends_with(".tmp") {
                    continue;
                }
                v.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut v = Vec::new();
    for sub in ["docs", "rejected", "tokens", "dedup"] {
        let d = root.join(sub);
        if d.exists() {
            walk(&d, root, &mut v);
        }
    }
    v.sort();
    v
}

fn run_ok(p: &Path, extra: &[&str]) -> String {
    let out = bin().args(["data", "run"]).arg(p).args(extra).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn kill_9_then_rerun_gives_identical_output() {
    let dir = tmpdir("resume");
    corpus(&dir);
    let clean = pipeline(&dir, "clean.yaml", "clean");
    let stdout = run_ok(&clean, &["--no-progress"]);
    assert!(stdout.contains("documents: 240 in"), "{stdout}");
    let want = outputs(&dir.join("clean"));
    assert!(want.iter().any(|(n, _)| n.starts_with("tokens/")) && want.len() > 40, "{}", want.len());

    let resumed = pipeline(&dir, "resumed.yaml", "resumed");
    let mut child = bin().args(["data", "run"]).arg(&resumed).arg("--no-progress").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill as soon as some, not all, of the first stage's tasks have finished.
    let markers = dir.join("resumed/dedup/stats");
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_dir(&markers).map(|r| r.count()).unwrap_or(0);
        if n >= 2 || t0.elapsed() > Duration::from_secs(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let done = std::fs::read_dir(&markers).map(|r| r.count()).unwrap_or(0);
    assert!((2..12).contains(&done), "killed after {done} of 12 tasks");
    assert!(!dir.join("resumed/stats.json").exists());
    let stdout = run_ok(&resumed, &["--no-progress"]);
    assert!(stdout.contains("documents: 240 in"), "{stdout}");
    let got = outputs(&dir.join("resumed"));
    assert_eq!(got.len(), want.len());
    for ((n1, b1), (n2, b2)) in want.iter().zip(&got) {
        assert_eq!(n1, n2);
        assert!(b1 == b2, "{n1} differs after kill -9 and resume");
    }
    // A third run finds everything done and changes nothing.
    run_ok(&resumed, &["--no-progress"]);
    assert!(outputs(&dir.join("resumed")) == got);
    // `data stats` reads the run.
    let out = bin().args(["data", "stats"]).arg(dir.join("resumed")).output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("documents: 240 in") && s.contains("token shards: 12 files"), "{s}");
    // A changed pipeline refuses to resume into the same directory.
    let out = bin().args(["data", "run"]).arg(&resumed).args(["--set", "steps.1.langid.threshold=0.5"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("different pipeline"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn slurm_scripts_run_the_stages_like_a_local_run() {
    let dir = tmpdir("slurm");
    corpus(&dir);
    let local = pipeline(&dir, "local.yaml", "local");
    run_ok(&local, &["--no-progress"]);
    let want = outputs(&dir.join("local"));

    let cluster = pipeline(&dir, "cluster.yaml", "cluster");
    let sdir = dir.join("slurm");
    let out = bin().args(["data", "slurm"]).arg(&cluster).args(["--tasks", "4", "--partition", "cpu", "--sbatch", "--account=nlp"]).arg("--out").arg(&sdir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&sdir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "sbatch")).collect();
    scripts.sort();
    let names: Vec<String> = scripts.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["0-signatures.sbatch", "1-buckets.sbatch", "2-clusters.sbatch", "3-filter.sbatch", "4-report.sbatch"]);
    let submit = std::fs::read_to_string(sdir.join("submit.sh")).unwrap();
    assert!(submit.contains("--dependency=afterok"));
    for s in &scripts {
        let text = std::fs::read_to_string(s).unwrap();
        assert!(text.contains("#SBATCH --partition=cpu") && text.contains("#SBATCH --account=nlp"));
        assert!(Command::new("bash").arg("-n").arg(s).status().unwrap().success());
        // Run it as Slurm would: once per array index.
        let array: usize = text.lines().find_map(|l| l.strip_prefix("#SBATCH --array=0-")).map(|n| n.trim().parse::<usize>().unwrap() + 1).unwrap_or(0);
        let ids: Vec<Option<usize>> = if array == 0 { vec![None] } else { (0..array).map(Some).collect() };
        for id in ids {
            let mut c = Command::new("bash");
            c.arg(s).env("SLURM_CPUS_PER_TASK", "1");
            if let Some(i) = id {
                c.env("SLURM_ARRAY_TASK_ID", i.to_string());
            }
            let o = c.output().unwrap();
            assert!(o.status.success(), "{} #{id:?}: {}", s.display(), String::from_utf8_lossy(&o.stderr));
        }
    }
    let got = outputs(&dir.join("cluster"));
    assert_eq!(got.len(), want.len());
    for ((n1, b1), (n2, b2)) in want.iter().zip(&got) {
        assert_eq!(n1, n2);
        assert!(b1 == b2, "{n1} differs between the Slurm stages and a local run");
    }
    assert!(dir.join("cluster/stats.json").exists() && dir.join("cluster/report.html").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

//! `hromada`: the one command line of the stack. It parses arguments and calls into the
//! crates; the work itself lives there.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hromada_models::chat::Message;
use hromada_models::model::{DEFAULT_MODEL, resolve};
use hromada_models::sampling::SamplingParams;
use hromada_models::{DTypeChoice, DeviceChoice, LoadOptions, LoadedModel};

#[derive(Parser)]
#[command(name = "hromada", version, about = "A sovereign LLM stack: data, train, serve, eval")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming the new text to stdout.
    Generate(GenerateArgs),
    /// Write a GGUF model as a Hugging Face model directory (dequantized safetensors).
    Convert(ConvertArgs),
    /// Download a model directory from the Hugging Face Hub or a mirror (HF_ENDPOINT).
    Pull(PullArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// The data pipeline: clean corpora into training shards.
    #[command(subcommand)]
    Data(DataCmd),
    /// Fine-tune a model: LoRA or full, chat SFT or continued pretraining.
    #[command(subcommand)]
    Train(TrainCmd),
    /// Evaluate a model (in process) or a server (OpenAI-compatible) on tasks.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Run tasks (tasks/*.yaml, or paths to task files) and write results.
    Run(EvalRunArgs),
    /// Per-task deltas of two results.json files with paired-bootstrap 95% intervals.
    Compare(EvalCompareArgs),
}

#[derive(Args)]
struct EvalRunArgs {
    /// The model to evaluate in process (a GGUF, a HF directory, a short name).
    #[arg(long, conflicts_with = "endpoint")]
    model: Option<String>,
    /// Weights for --model: auto, f32, bf16, quantized.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// A PEFT LoRA adapter for --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Where --model runs: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// An OpenAI-compatible server (http://host:port or .../v1).
    #[arg(long)]
    endpoint: Option<String>,
    /// The served model name (default: the first of GET /v1/models).
    #[arg(long)]
    endpoint_model: Option<String>,
    /// API key for --endpoint.
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Tokenizer for --endpoint log-likelihoods (the served model: a GGUF, directory or short name).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Context length of the endpoint's model (rolling windows).
    #[arg(long, default_value_t = 2048)]
    max_length: usize,
    /// Comma-separated task names or YAML paths.
    #[arg(long)]
    tasks: String,
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    num_fewshot: usize,
    /// Generation tasks: send the prompt as a chat user turn.
    #[arg(long)]
    apply_chat_template: bool,
    /// Write results.json and samples_*.jsonl here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Items per backend call (and per packed forward pass in process).
    #[arg(long, default_value_t = 32)]
    batch_items: usize,
}

#[derive(Args)]
struct EvalCompareArgs {
    a: PathBuf,
    b: PathBuf,
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
}

#[derive(Subcommand)]
enum TrainCmd {
    /// Supervised fine-tuning on chat JSONL (`messages`, or `prompt`/`completion`).
    Sft(TrainArgs),
    /// Continued pretraining on token shards from `hromada data run`.
    Pretrain(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// The run's config (TOML); see configs/ for examples.
    config: PathBuf,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set lora.rank=16
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest checkpoint in run.output.
    #[arg(long)]
    resume: bool,
    /// No progress bar (log lines instead).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Run a pipeline file (YAML): all stages, or one stage of one slice.
    Run(DataRunArgs),
    /// Summarise a run's output directory (stats.json; rewrites report.html) or token shards.
    Stats(DataStatsArgs),
    /// Write sbatch scripts that run the pipeline's slices as Slurm job arrays.
    Slurm(DataSlurmArgs),
}

#[derive(Args)]
struct DataRunArgs {
    pipeline: PathBuf,
    /// Override a config key, e.g. --set tasks=8 --set steps.1.langid.threshold=0.8
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run only slice i of N (i from 0), e.g. --shard 3/16.
    #[arg(long)]
    shard: Option<String>,
    /// all, signatures, buckets, clusters, filter or report.
    #[arg(long, default_value = "all")]
    stage: String,
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct DataStatsArgs {
    /// A run's output directory, or a token shard / directory of shards.
    path: PathBuf,
}

#[derive(Args)]
struct DataSlurmArgs {
    pipeline: PathBuf,
    /// Number of slices (array elements) per stage.
    #[arg(long)]
    tasks: usize,
    /// Where to write the scripts.
    #[arg(long, default_value = "slurm")]
    out: PathBuf,
    /// The hromada binary as the cluster nodes see it (default: this one).
    #[arg(long)]
    binary: Option<String>,
    #[arg(long)]
    partition: Option<String>,
    #[arg(long, default_value_t = 4)]
    cpus_per_task: usize,
    #[arg(long, default_value = "8G")]
    mem: String,
    #[arg(long, default_value = "04:00:00")]
    time: String,
    /// Extra #SBATCH lines, e.g. --sbatch=--account=nlp.
    #[arg(long = "sbatch", allow_hyphen_values = true)]
    extra: Vec<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// File with one sha256 hex digest of an accepted API key per line. Required when
    /// --host is not a loopback address.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// The model id clients use (default: the short name or file stem).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV-cache memory budget in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// KV-cache element type: auto (CPU: q8 for quantized models where AVX-512 VNNI runs
    /// its integer attention, else f16; f16 for half-precision ones, f32 for f32 ones;
    /// GPU: the model's precision), f32, f16, or q8 (CPU: 8-bit values with a scale per
    /// token and K/V head, half of f16's memory).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: hromada_serve::paged::KvCacheDType,
    /// Requests in flight before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Concurrent requests per API key (0: unlimited).
    #[arg(long, default_value_t = 0)]
    per_key_concurrency: usize,
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// max_tokens of a chat request that sets none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file, a HF model directory, a short name (smollm2-135m, gemma3-270m) or a
    /// Hub repo id already pulled.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Weights: auto (GGUF stays quantized), f32 (reference path), bf16, f16, quantized.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// A LoRA adapter directory in PEFT's format (adapter_config.json,
    /// adapter_model.safetensors), applied on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Where to run: auto (the GPU when this binary has CUDA and one answers, else the
    /// CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ModelArgs {
    fn load(&self) -> Result<LoadedModel> {
        let dtype: DTypeChoice = self.dtype.parse()?;
        let device = self.device.parse::<DeviceChoice>()?.device()?;
        let t = std::time::Instant::now();
        let m = LoadedModel::load(&self.model, &LoadOptions { dtype, device })
            .with_context(|| format!("loading model `{}`", self.model))?;
        let mut m = m;
        if let Some(dir) = &self.adapter {
            let (_, n) = hromada_models::lora::load_peft_adapter(&mut m.model, dir)
                .with_context(|| format!("loading the adapter {}", dir.display()))?;
            tracing::info!(adapter = %dir.display(), modules = n, "LoRA adapter applied");
        }
        tracing::info!(model = %m.path.display(), secs = t.elapsed().as_secs_f64(), "model loaded");
        Ok(m)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (implies --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f64,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file (or any model hromada loads).
    input: String,
    #[arg(long)]
    out: PathBuf,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct PullArgs {
    /// OWNER/NAME
    repo_id: String,
    #[arg(long)]
    revision: Option<String>,
    /// Also download *.gguf files.
    #[arg(long)]
    include_gguf: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prompt (ppN) and decode (tgN) tok/s at batch 1, optionally beside llama-bench.
    Generate(BenchGenerateArgs),
    /// Load-test any OpenAI-compatible server (vLLM's metrics: TTFT, TPOT, ITL, E2EL).
    Serve(BenchServeArgs),
    /// The data pipeline's full chain on real corpora: docs/s and MB/s per core.
    Data(BenchDataArgs),
    /// Tokenizer fertility (tokens per word, characters per token) on a corpus.
    Fertility(BenchFertilityArgs),
    /// Training tokens/s and peak memory (LoRA and full), optionally beside PyTorch + PEFT.
    Train(BenchTrainArgs),
    /// The CPU paged attention of one decode step alone, per KV-cache element type.
    Attention(BenchAttentionArgs),
    /// The CPU quantized matmul (Q4_1, Q8_0) alone, per kernel and row count.
    Gemm(BenchGemmArgs),
}

#[derive(Args)]
struct BenchGemmArgs {
    /// Output columns (default: SmolLM2-135M's gate and up projections together).
    #[arg(long, default_value_t = 3072)]
    n: usize,
    /// Reduction length (SmolLM2-135M's hidden size).
    #[arg(long, default_value_t = 576)]
    k: usize,
    /// Comma-separated activation row counts (1: batch-1 decode; 16: a decode step of 16
    /// sequences; 512: a prefill chunk).
    #[arg(long, default_value = "1,4,16,64,512")]
    rows: String,
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

#[derive(Args)]
struct BenchAttentionArgs {
    /// Comma-separated KV-cache element types to measure (f32, f16, q8).
    #[arg(long, default_value = "f16,q8")]
    kv_cache_dtype: String,
    /// Tokens of context per sequence (the decode token attends to these and itself).
    #[arg(long, default_value_t = 160)]
    context: usize,
    /// Sequences in the step.
    #[arg(long, default_value_t = 16)]
    seqs: usize,
    /// Model shape (defaults: SmolLM2-135M's).
    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 9)]
    heads: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Cache size: the sequences' blocks are scattered over all of it.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Each sequence's blocks side by side in memory instead of scattered.
    #[arg(long)]
    contiguous: bool,
}

#[derive(Args)]
struct BenchTrainArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Text files (*.txt) to cut into rows (default: ../shared's brown-uk).
    #[arg(long)]
    corpus: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value = "lora,full")]
    modes: String,
    /// Recompute activations in the backward pass (hromada only).
    #[arg(long)]
    activation_checkpointing: bool,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// no, bf16 or fp16 compute with f32 master weights (default: bf16 on a GPU, no on the
    /// CPU; PyTorch's script autocasts to bf16 on CUDA likewise).
    #[arg(long)]
    mixed_precision: Option<String>,
    /// A Python with torch, transformers and peft: run scripts/bench_train_torch.py on the
    /// same model (converted to a HF directory), data and config in the same run.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchFertilityArgs {
    /// Models whose tokenizers to compare (paths, short names or Hub ids).
    #[arg(long = "model", default_values_t = ["smollm2-135m".to_string(), "gemma3-270m".to_string()])]
    models: Vec<String>,
    /// A directory of text files (one document each).
    #[arg(long, default_value = "../shared/data/uk/brown-uk/data/good")]
    input: PathBuf,
}

#[derive(Args)]
struct BenchDataArgs {
    /// Input directories or files (default: brown-uk and the legal acts in ../shared/data).
    #[arg(long)]
    input: Vec<PathBuf>,
    /// Threads (the figures are per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also run datatrove's equivalent pipeline with this Python (a venv with datatrove).
    #[arg(long)]
    datatrove_python: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Working directory for outputs (default: a temporary directory).
    #[arg(long)]
    work: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchServeArgs {
    /// Base URL, e.g. http://127.0.0.1:8000
    #[arg(long)]
    endpoint: String,
    /// Model id to request (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    #[arg(long, default_value_t = 16)]
    max_concurrency: usize,
    /// Poisson request rate (req/s); default: all at once.
    #[arg(long)]
    request_rate: Option<f64>,
    /// random (token-id prompts of --input-len) or a JSONL file with a `prompt` per line.
    #[arg(long, default_value = "random")]
    dataset: String,
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Goodput SLOs in ms, e.g. --goodput-ttft-ms 500 --goodput-tpot-ms 100.
    #[arg(long)]
    goodput_ttft_ms: Option<f64>,
    #[arg(long)]
    goodput_tpot_ms: Option<f64>,
    /// Sampling temperature of the requests (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// top_p of the requests (default: not sent).
    #[arg(long)]
    top_p: Option<f64>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchGenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pp: usize,
    #[arg(long, default_value_t = 128)]
    tg: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Path to llama.cpp's llama-bench: run it on the same GGUF in the same run.
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    // candle asks the OS for the core count on every op unless RAYON_NUM_THREADS is set
    // (a cgroup file read per op); set it once, here, before any thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Convert(a) => convert(a),
        Cmd::Pull(a) => {
            let dir = hromada_models::hub::pull(&a.repo_id, a.revision.as_deref(), a.include_gguf, atty_stderr())?;
            println!("{}", dir.display());
            Ok(())
        }
        Cmd::Serve(a) => serve(a),
        Cmd::Eval(EvalCmd::Run(a)) => eval_run(a),
        Cmd::Eval(EvalCmd::Compare(a)) => {
            print!("{}", hromada_eval::run::compare(&a.a, &a.b, a.bootstrap)?);
            Ok(())
        }
        Cmd::Train(TrainCmd::Sft(a)) => train(hromada_train::Task::Sft, a),
        Cmd::Train(TrainCmd::Pretrain(a)) => train(hromada_train::Task::Pretrain, a),
        Cmd::Bench(BenchCmd::Generate(a)) => bench_generate(a),
        Cmd::Bench(BenchCmd::Serve(a)) => bench_serve(a),
        Cmd::Bench(BenchCmd::Data(a)) => bench_data(a),
        Cmd::Bench(BenchCmd::Train(a)) => bench_train(a),
        Cmd::Bench(BenchCmd::Attention(a)) => bench_attention(a),
        Cmd::Bench(BenchCmd::Gemm(a)) => {
            let rows: Vec<usize> = a.rows.split(',').map(|r| r.trim().parse::<usize>().with_context(|| format!("--rows: {r:?} is not a row count"))).collect::<Result<_>>()?;
            let threads = hromada_models::kernels::pool().current_num_threads();
            println!("| format | kernel | rows | n x k | threads | best ms | median ms | G MAC/s |\n|---|---|---|---|---|---|---|---|");
            for r in hromada_models::kernels::q4_1::bench(a.n, a.k, &rows, a.reps) {
                println!("| {} | {} | {} | {} x {} | {threads} | {:.3} | {:.3} | {:.1} |", r.format, r.kernel, r.rows, a.n, a.k, r.best_ms, r.median_ms, r.gmacs);
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Fertility(a)) => {
            let rows = hromada_data::bench::fertility(&a.models, &a.input)?;
            println!("| tokenizer | vocab | docs | words | chars | tokens | tokens/word | chars/token |\n|---|---|---|---|---|---|---|---|");
            for r in rows {
                println!("| {} | {} | {} | {} | {} | {} | {:.3} | {:.3} |", r.tokenizer, r.vocab_size, r.docs, r.words, r.chars, r.tokens, r.tokens_per_word(), r.chars_per_token());
            }
            Ok(())
        }
        Cmd::Data(DataCmd::Run(a)) => data_run(a),
        Cmd::Data(DataCmd::Stats(a)) => data_stats(a),
        Cmd::Data(DataCmd::Slurm(a)) => data_slurm(a),
    }
}

fn atty_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn generate(a: GenerateArgs) -> Result<()> {
    let m = a.model.load()?;
    let ids = if a.chat || a.system.is_some() {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        m.encode_chat(&msgs, true)?
    } else {
        m.tokenizer.encode(&a.prompt, true)?
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let res = hromada_models::generate::generate(&m, &ids, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | finish: {:?}",
        res.prompt_tokens,
        res.prompt_tok_per_s(),
        res.ids.len(),
        res.decode_tok_per_s(),
        res.finish_reason
    );
    Ok(())
}

fn eval_run(a: EvalRunArgs) -> Result<()> {
    use hromada_eval::backend::{Backend, Http, InProcess};
    let dirs = vec![PathBuf::from("tasks"), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tasks")];
    let mut tasks = Vec::new();
    for name in a.tasks.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let f = hromada_eval::task::find(name, &dirs)?;
        tasks.push(hromada_eval::task::Task::load(&f)?);
    }
    let t0 = std::time::Instant::now();
    let (mut backend, sha): (Box<dyn Backend>, Option<String>) = match (&a.model, &a.endpoint) {
        (Some(m), None) => {
            let lm = ModelArgs { model: m.clone(), dtype: a.dtype.clone(), adapter: a.adapter.clone(), device: a.device.clone() }.load()?;
            let sha = hromada_eval::run::model_sha256(&lm.path);
            (Box::new(InProcess { model: lm, batch_tokens: 4096 }), sha)
        }
        (None, Some(url)) => {
            let tok = match &a.tokenizer {
                Some(t) => Some(hromada_models::model::load_tokenizer(t)?),
                None => None,
            };
            (Box::new(Http::new(url, a.endpoint_model.clone(), a.api_key.clone(), tok, a.max_length)?), None)
        }
        _ => bail!("give --model or --endpoint"),
    };
    let opts = hromada_eval::run::RunOptions {
        limit: a.limit,
        num_fewshot: a.num_fewshot,
        apply_chat_template: a.apply_chat_template,
        batch_items: a.batch_items,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let mut results = Vec::new();
    for t in &tasks {
        let s = std::time::Instant::now();
        let r = hromada_eval::run::run_task(t, backend.as_mut(), &opts)?;
        let secs = s.elapsed().as_secs_f64();
        eprintln!("{}: {} items in {secs:.1} s ({:.2} items/s)", r.task, r.n, r.n as f64 / secs.max(1e-9));
        results.push(r);
    }
    print!("{}", hromada_eval::run::markdown(&results));
    if let Some(out) = &a.output {
        let config = serde_json::json!({"backend": backend.describe(), "model_sha256": sha, "tasks": a.tasks, "limit": a.limit,
            "num_fewshot": a.num_fewshot, "apply_chat_template": a.apply_chat_template, "seconds": t0.elapsed().as_secs_f64()});
        hromada_eval::run::write_results(out, &results, config)?;
        eprintln!("results: {}", out.join("results.json").display());
    }
    Ok(())
}

fn train(task: hromada_train::Task, a: TrainArgs) -> Result<()> {
    let cfg = hromada_train::TrainConfig::load(&a.config, &a.set)?;
    eprintln!("# effective config ({:?}; saved as {}/config.toml)\n{}", task, cfg.run.output, cfg.to_toml());
    let stop = hromada_train::recipe::stop_flag()?;
    let progress = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let o = hromada_train::recipe::run(task, &cfg, &a.config, a.resume, stop, progress)?;
    if o.interrupted {
        eprintln!(
            "stopped after step {}: checkpoint {}; continue with --resume",
            o.steps,
            o.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        );
        std::process::exit(143);
    }
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    eprintln!(
        "done: {} steps, train loss {}, validation loss {} -> {}; outputs in {}",
        o.steps,
        f(o.final_train_loss),
        f(o.first_val_loss),
        f(o.final_val_loss),
        o.output.display()
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let api_keys = match &a.api_key_file {
        Some(p) => Some(hromada_serve::server::read_key_file(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let m = a.model.load()?;
    let cfg = hromada_serve::server::ServeConfig {
        host: a.host,
        port: a.port,
        api_keys,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        per_key_concurrency: a.per_key_concurrency,
        request_timeout: std::time::Duration::from_secs(a.request_timeout_s),
        engine: hromada_serve::engine::EngineConfig {
            block_size: a.block_size,
            kv_cache_bytes: a.kv_cache_mib << 20,
            kv_cache_dtype: a.kv_cache_dtype,
            scheduler: hromada_serve::scheduler::SchedulerConfig {
                max_num_seqs: a.max_num_seqs,
                max_num_batched_tokens: a.max_num_batched_tokens,
            },
        },
        default_max_tokens: a.default_max_tokens,
        served_model_name: a.served_model_name,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(hromada_serve::server::serve(m, cfg)).map_err(anyhow::Error::msg)
}

fn convert(a: ConvertArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" | "float32" => candle_core::DType::F32,
        "bf16" | "bfloat16" => candle_core::DType::BF16,
        other => bail!("--dtype must be f32 or bf16, got `{other}`"),
    };
    let m = LoadedModel::load(&a.input, &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() })
        .with_context(|| format!("loading `{}`", a.input))?;
    hromada_models::convert::write_hf_dir(&m, &a.out, dtype)?;
    println!("{}", a.out.display());
    Ok(())
}

fn bench_attention(a: BenchAttentionArgs) -> Result<()> {
    use hromada_serve::bench_attention::{run, AttnBenchConfig};
    let cfg = AttnBenchConfig {
        layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        seqs: a.seqs,
        context: a.context,
        block_size: a.block_size,
        kv_cache_mib: a.kv_cache_mib,
        reps: a.reps,
        contiguous: a.contiguous,
    };
    let threads = hromada_models::kernels::pool().current_num_threads();
    let blocks = if a.contiguous { "contiguous" } else { "scattered" };
    println!("| KV cache | seqs x context | layers | threads | blocks | best ms/step | median ms/step | K/V GB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for name in a.kv_cache_dtype.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind: hromada_serve::paged::KvCacheDType = name.parse().map_err(anyhow::Error::msg)?;
        let r = run(kind, &cfg).map_err(anyhow::Error::msg).with_context(|| format!("bench attention ({name})"))?;
        println!("| {} | {} x {} | {} | {threads} | {blocks} | {:.3} | {:.3} | {:.1} |", r.kv_cache_dtype, a.seqs, a.context, a.layers, r.best_ms, r.median_ms, r.gb_per_s);
    }
    Ok(())
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    let cfg = hromada_serve::bench::BenchConfig {
        endpoint: a.endpoint,
        model: a.model,
        api_key: a.api_key,
        num_prompts: a.num_prompts,
        max_concurrency: a.max_concurrency,
        request_rate: a.request_rate,
        input_len: a.input_len,
        output_len: a.output_len,
        dataset_path: (a.dataset != "random").then(|| PathBuf::from(&a.dataset)),
        seed: a.seed,
        goodput_ttft_ms: a.goodput_ttft_ms,
        goodput_tpot_ms: a.goodput_tpot_ms,
        temperature: a.temperature,
        top_p: a.top_p,
    };
    let r = hromada_serve::bench::run(&cfg).map_err(anyhow::Error::msg)?;
    let v = serde_json::to_value(&r)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    eprintln!(
        "completed {}/{} | output {:.1} tok/s | total {:.1} tok/s | TTFT median {:.0} ms | TPOT median {:.1} ms",
        r.completed, r.num_prompts, r.output_throughput, r.total_token_throughput, r.ttft.median_ms, r.tpot.median_ms
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))?;
    }
    if r.completed == 0 {
        bail!("no request completed: {:?}", r.errors);
    }
    Ok(())
}

fn bench_generate(a: BenchGenerateArgs) -> Result<()> {
    let m = a.model.load()?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!("hromada: {} ({}), dtype {}, {} threads", a.model.model, m.path.display(), a.model.dtype, threads);
    let ours = hromada_models::bench::bench_generate(&m, a.pp, a.tg, a.reps)?;
    let theirs = match &a.llama_bench {
        Some(bin) => {
            let gguf = resolve(&a.model.model)?;
            Some(hromada_models::bench::run_llama_bench(bin, &gguf, a.pp, a.tg, a.reps, threads)?)
        }
        None => None,
    };
    println!("| test | hromada tok/s | llama.cpp tok/s | ratio |");
    println!("| --- | --- | --- | --- |");
    for s in &ours {
        let other = theirs.as_ref().and_then(|t| t.iter().find(|x| x.test == s.test));
        match other {
            Some(o) => println!(
                "| {} | {:.1} ± {:.1} | {:.1} ± {:.1} | {:.2}x |",
                s.test, s.tok_per_s, s.stddev, o.tok_per_s, o.stddev, s.tok_per_s / o.tok_per_s
            ),
            None => println!("| {} | {:.1} ± {:.1} | - | - |", s.test, s.tok_per_s, s.stddev),
        }
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({"model": a.model.model, "dtype": a.model.dtype, "threads": threads,
            "hromada": ours, "llama_cpp": theirs});
        std::fs::write(p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').context("--shard must be i/N, e.g. 0/4")?;
    let i: usize = i.trim().parse().context("--shard: i is not a number")?;
    let n: usize = n.trim().parse().context("--shard: N is not a number")?;
    if n == 0 || i >= n {
        bail!("--shard {s}: need 0 <= i < N");
    }
    Ok((i, n))
}

fn data_run(a: DataRunArgs) -> Result<()> {
    let cfg = hromada_data::PipelineConfig::load(&a.pipeline, &a.set)?;
    eprintln!("# effective pipeline\n{}", cfg.to_yaml());
    let opts = hromada_data::exec::RunOptions {
        shard: a.shard.as_deref().map(parse_shard).transpose()?,
        stage: a.stage.parse().map_err(anyhow::Error::msg)?,
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let stats = hromada_data::exec::run(&cfg, &opts)?;
    print_stats(&stats);
    if cfg.output.path.join("stats.json").exists() && opts.shard.is_none() {
        println!("stats: {}", cfg.output.path.join("stats.json").display());
        if cfg.output.report {
            println!("report: {}", cfg.output.path.join("report.html").display());
        }
    }
    Ok(())
}

fn print_stats(s: &hromada_data::RunStats) {
    println!(
        "documents: {} in, {} out, {} dropped ({} files, {:.1} MB, {:.1} s){}",
        s.docs_in,
        s.docs_out,
        s.dropped_total(),
        s.files,
        s.bytes_read as f64 / 1e6,
        s.elapsed_s,
        if s.balanced() { "" } else { " [NOT BALANCED]" }
    );
    for st in &s.steps {
        let reasons: Vec<String> = st.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  {:<12} in {:>9}  kept {:>9}  modified {:>9}  dropped {:>9}  {}",
            st.name,
            st.docs_in,
            st.kept,
            st.modified,
            st.dropped_total(),
            reasons.join(" ")
        );
        let counters: Vec<String> = st.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !counters.is_empty() {
            println!("  {:<12} {}", "", counters.join(" "));
        }
    }
    if s.problems_total > 0 {
        println!("problems: {} (first: {})", s.problems_total, s.problems.first().map(|p| format!("{}:{} {} {}", p.file, p.line, p.kind, p.message)).unwrap_or_default());
    }
}

fn data_stats(a: DataStatsArgs) -> Result<()> {
    let stats_path = a.path.join("stats.json");
    if stats_path.exists() {
        let bytes = std::fs::read(&stats_path).with_context(|| format!("reading {}", stats_path.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", stats_path.display()))?;
        let stats: hromada_data::RunStats = serde_json::from_value(v.clone()).with_context(|| format!("{} is not a stats file", stats_path.display()))?;
        print_stats(&stats);
        if let Some(cfg) = v.get("config").and_then(|c| serde_json::from_value::<hromada_data::PipelineConfig>(c.clone()).ok()) {
            let html = hromada_data::report::html(&stats, &cfg);
            let out = a.path.join("report.html");
            std::fs::write(&out, html).with_context(|| format!("writing {}", out.display()))?;
            println!("report: {}", out.display());
        }
    }
    let shard_dir = if a.path.join("tokens").is_dir() { a.path.join("tokens") } else { a.path.clone() };
    if shard_dir.is_file() || shard_dir.join("00000.bin").exists() || shard_dir.extension().is_some_and(|e| e == "bin") {
        let (mut docs, mut tokens, mut sha) = (0u64, 0u64, std::collections::BTreeSet::new());
        let shards = hromada_data::shards::list_shards(&shard_dir)?;
        for p in &shards {
            let s = hromada_data::shards::TokenShard::open(p)?;
            docs += s.num_docs;
            tokens += s.num_tokens;
            sha.insert(s.tokenizer_sha256_hex());
        }
        println!("token shards: {} files, {docs} documents, {tokens} tokens, tokenizer sha256 {}", shards.len(), sha.into_iter().collect::<Vec<_>>().join(", "));
    } else if !stats_path.exists() {
        bail!("{}: neither a run directory (stats.json) nor token shards", a.path.display());
    }
    Ok(())
}

fn data_slurm(a: DataSlurmArgs) -> Result<()> {
    let cfg = hromada_data::PipelineConfig::load(&a.pipeline, &a.set)?;
    let binary = match a.binary {
        Some(b) => b,
        None => std::env::current_exe()?.to_string_lossy().to_string(),
    };
    let opts = hromada_data::slurm::SlurmOptions {
        tasks: a.tasks,
        binary,
        partition: a.partition,
        cpus_per_task: a.cpus_per_task,
        mem: a.mem,
        time: a.time,
        extra: a.extra,
    };
    let paths = hromada_data::slurm::write_scripts(&a.pipeline, &cfg, &opts, &a.out)?;
    for p in &paths {
        println!("{}", p.display());
    }
    if cfg.tasks.is_some_and(|t| t < a.tasks) {
        eprintln!("note: the pipeline has tasks: {:?} < --tasks {}; some array elements will have no work (set tasks: in the pipeline to at least --tasks)", cfg.tasks, a.tasks);
    }
    Ok(())
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    let corpus = a.corpus.clone().unwrap_or_else(|| {
        let shared = std::env::var("HROMADA_SHARED").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("../shared"));
        shared.join("data/uk/brown-uk/data/good")
    });
    let device = a.device.parse::<hromada_models::DeviceChoice>()?.device()?;
    let mixed = a.mixed_precision.clone().unwrap_or_else(|| if device.is_cpu() { "no".into() } else { "bf16".into() });
    let mut rows = Vec::new();
    for mode in a.modes.split(',') {
        let opts = hromada_train::bench::BenchOptions {
            model: a.model.clone(),
            mode: mode.to_string(),
            corpus: corpus.clone(),
            seq_len: a.seq_len,
            batch: a.batch,
            steps: a.steps,
            warmup: a.warmup,
            rank: a.rank,
            recompute: a.activation_checkpointing,
            device: device.clone(),
            mixed_precision: mixed.clone(),
        };
        let r = hromada_train::bench::run(&opts)?;
        println!(
            "hromada {mode}{}: {:.1} tokens/s, peak RSS {:.2} GiB, loss {:.3} -> {:.3} ({} trainable)",
            if a.activation_checkpointing { " (activation checkpointing)" } else { "" },
            r.tokens_per_s, r.peak_rss_gib, r.loss_first, r.loss_last, r.trainable_parameters
        );
        rows.push(serde_json::to_value(&r)?);
    }
    if let Some(py) = &a.torch_python {
        let dir = std::env::temp_dir().join(format!("hromada-bench-train-{}", std::process::id()));
        let m = LoadedModel::load(&a.model, &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() })?;
        hromada_models::convert::write_hf_dir(&m, &dir, candle_core::DType::F32)?;
        drop(m);
        // The repository the binary runs in (a carried binary), else the one it was built in.
        let script = [PathBuf::from("scripts/bench_train_torch.py"), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_train_torch.py")]
            .into_iter()
            .find(|p| p.exists())
            .context("scripts/bench_train_torch.py not found (run from the repository root)")?;
        for mode in a.modes.split(',') {
            let o = std::process::Command::new(py)
                .arg(&script)
                .arg(&dir)
                .arg(&corpus)
                .args(["--seq", &a.seq_len.to_string(), "--batch", &a.batch.to_string(), "--steps", &a.steps.to_string()])
                .args(["--warmup", &a.warmup.to_string(), "--rank", &a.rank.to_string(), "--modes", mode])
                .output()
                .with_context(|| format!("running {}", py.display()))?;
            if !o.status.success() {
                bail!("bench_train_torch.py failed: {}", String::from_utf8_lossy(&o.stderr));
            }
            for line in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with('{')) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                println!(
                    "pytorch+peft {mode}: {:.1} tokens/s, peak RSS {:.2} GiB, loss {:.3} -> {:.3}",
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                    v["peak_gib"].as_f64().unwrap_or(0.0),
                    v["loss_first"].as_f64().unwrap_or(0.0),
                    v["loss_last"].as_f64().unwrap_or(0.0)
                );
                rows.push(v);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

fn bench_data(a: BenchDataArgs) -> Result<()> {
    let inputs = if a.input.is_empty() {
        vec![PathBuf::from("../shared/data/uk/brown-uk/data/good"), PathBuf::from("../shared/data/uk/laws/seed")]
    } else {
        a.input.clone()
    };
    let cfg = hromada_data::bench::BenchConfig {
        inputs,
        threads: a.threads,
        datatrove_python: a.datatrove_python.clone(),
        reps: a.reps,
        work: a.work.clone(),
    };
    let report = hromada_data::bench::run_bench(&cfg)?;
    println!("{}", report.markdown());
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&report.json())?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

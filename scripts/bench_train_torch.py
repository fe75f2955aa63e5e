#!/usr/bin/env python3
"""PyTorch + PEFT training throughput beside `hromada bench train`: the same model file,
data (brown-uk rows of SEQ tokens, every token a target), LoRA config (r, alpha 2r, all
linear layers but the head) and AdamW. On CPU in f32; on CUDA with bf16 autocast, as
../shared/anchors/peftbench.py measured the H100 anchor.

    python3 scripts/bench_train_torch.py MODEL_DIR CORPUS_DIR [--seq 512] [--batch 1]
        [--steps 3] [--warmup 1] [--rank 16] [--modes lora,full]

MODEL_DIR is a Hugging Face directory (`hromada convert smollm2-135m --out DIR --dtype f32`).
Prints one JSON line per mode.
"""
import argparse, glob, json, os, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("corpus")
ap.add_argument("--seq", type=int, default=512); ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--steps", type=int, default=3); ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--rank", type=int, default=16); ap.add_argument("--modes", default="lora,full")
a = ap.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(a.model)
text = "".join(open(p, encoding="utf-8").read() + "\n\n" for p in sorted(glob.glob(os.path.join(a.corpus, "*.txt")))[:200])
ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
n = (len(ids) // a.seq) * a.seq
data = ids[:n].view(-1, a.seq)

def peak_gib():
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    # VmHWM, not ru_maxrss: the latter is inherited from the process that spawned us.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")

for mode in a.modes.split(","):
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
        m = get_peft_model(m, cfg)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    losses = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if dev == "cuda": torch.cuda.synchronize()
            t = time.time()
        s = (i * a.batch) % (data.shape[0] - a.batch + 1)
        b = data[s:s + a.batch].to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = m(input_ids=b, labels=b)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    if dev == "cuda": torch.cuda.synchronize()
    dt = time.time() - t
    print(json.dumps({"tool": f"pytorch {torch.__version__} + peft", "device": dev, "mode": mode, "seq_len": a.seq, "batch": a.batch, "steps": a.steps,
                      "tokens_per_s": a.steps * a.batch * a.seq / dt, "peak_gib": peak_gib(), "loss_first": losses[0], "loss_last": losses[-1],
                      "trainable_parameters": sum(p.numel() for p in m.parameters() if p.requires_grad)}), flush=True)
    del m, opt

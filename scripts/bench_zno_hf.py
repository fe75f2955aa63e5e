#!/usr/bin/env python3
"""A plain Hugging Face transformers loop scoring ZNO items with the same prompts and
continuations as hromada's task files, one item (all its choices padded into one batch)
per forward pass, as ../shared/anchors/znobench.py does; prints items/s and accuracy.

    python3 scripts/bench_zno_hf.py MODEL_DIR [--task zno_uk|zno_uk_text] [--limit N]

MODEL_DIR: a HF directory (`hromada convert smollm2-135m --out DIR --dtype f32`).
"""
import argparse, json, os, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("--task", default="zno_uk"); ap.add_argument("--limit", type=int, default=0)
a = ap.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
shared = os.environ.get("HROMADA_SHARED", os.path.join(here, "..", "..", "shared"))
items = [json.loads(l) for l in open(os.path.join(shared, "data/eval/zno/data/zno.test.jsonl"), encoding="utf-8")]
if a.limit:
    items = items[: a.limit]
dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(a.model)
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev).eval()

def prompt(it):
    if a.task == "zno_uk":
        return "Питання: " + it["question"] + "\n" + "".join(f"{x['marker']}. {x['text']}\n" for x in it["answers"]) + "Відповідь:", [" " + x["marker"] for x in it["answers"]]
    return it["question"] + "\nВідповідь:", [" " + x["text"] for x in it["answers"]]

def score(ctx, conts):
    c = tok(ctx).input_ids
    seqs = [c + tok(x, add_special_tokens=False).input_ids for x in conts]
    L = max(map(len, seqs))
    x = torch.full((len(seqs), L), tok.eos_token_id or 0, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        lp = torch.log_softmax(m(x.to(dev)).logits.float(), -1)
    return [sum(lp[i, j - 1, s[j]].item() for j in range(len(c), len(s))) for i, s in enumerate(seqs)]

t = time.time(); correct = 0
for it in items:
    ctx, conts = prompt(it)
    sc = score(ctx, conts)
    correct += it["answers"][max(range(len(sc)), key=sc.__getitem__)]["marker"] in it["correct_answers"]
dt = time.time() - t
print(json.dumps({"tool": f"transformers loop ({dev}, f32)", "task": a.task, "items": len(items), "items_per_s": len(items) / dt, "acc": correct / len(items)}), flush=True)

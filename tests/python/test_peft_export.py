"""`hromada train` exports load in the Python ecosystem: the LoRA adapter in PEFT (on the
base model as transformers loads it) and the merged directory in transformers, and the
two compute the same logits; PEFT's own merge gives the same weights as ours."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
HROMADA = os.environ.get("HROMADA_BIN", str(ROOT / "target" / "debug" / "hromada"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    base = d / "base"
    subprocess.run([HROMADA, "convert", "smollm2-135m", "--out", str(base), "--dtype", "f32"], check=True)
    data = d / "laws.jsonl"
    subprocess.run(["python3", str(ROOT / "scripts" / "make_sft_uk.py"), "--out", str(data), "--max", "40"], check=True)
    cfg = d / "sft.toml"
    cfg.write_text(f"""
[model]
path = "{base}"
[data]
train = "{data}"
seq_len = 96
val_fraction = 0.0
max_samples = 8
[lora]
rank = 4
alpha = 16
target_modules = ["q_proj", "v_proj", "down_proj"]
[optim]
lr = 1e-2
warmup_steps = 0
[run]
output = "{d / 'run'}"
max_steps = 2
""")
    subprocess.run([HROMADA, "train", "sft", str(cfg), "--no-progress"], check=True)
    return base, d / "run"


def test_adapter_config_has_pefts_fields(trained):
    _, run = trained
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    names = load_file(run / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.29.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 30 * 3 * 2


def test_peft_adapter_and_merged_dir_give_the_same_logits(trained):
    from peft import PeftModel

    base_dir, run = trained
    ids = torch.tensor([[1, 504, 3023, 28, 2374, 30, 1046, 11492, 314, 6205]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
    assert (adapted - plain).abs().max().item() > 1e-3, "the adapter changes nothing"
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = merged(ids).logits
    assert (ours - adapted).abs().max().item() <= 1e-4
    # PEFT's merge_and_unload equals our merged weights.
    pm = peft_model.merge_and_unload()
    mine = load_file(run / "merged" / "model.safetensors")
    w = pm.state_dict()["model.layers.3.self_attn.q_proj.weight"]
    assert (w - mine["model.layers.3.self_attn.q_proj.weight"]).abs().max().item() <= 1e-6

"""`hromada convert` writes a directory that Hugging Face transformers loads, and the
loaded model reproduces the golden reference (tokens and logits)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("HROMADA_SHARED", ROOT.parent / "shared"))
HROMADA = os.environ.get("HROMADA_BIN", str(ROOT / "target" / "debug" / "hromada"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-hf")
    subprocess.run([HROMADA, "convert", "smollm2-135m", "--out", str(out), "--dtype", "f32"], check=True)
    return out


def test_transformers_loads_converted_dir_and_matches_reference(converted):
    ref = json.loads((SHARED / "golden" / "smollm2-135m-instruct-reference.json").read_text())
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    model.eval()
    for p in ref["prompts"]:
        if p["kind"] == "chat":
            text = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
            assert text == p["text"], p["id"]
        ids = tok(p["text"], add_special_tokens=p["add_special_tokens"])["input_ids"]
        assert ids == p["input_ids"], p["id"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        for t in p["last"]["top20"]:
            assert abs(logits[t["id"]].item() - t["logit"]) <= 2e-3, (p["id"], t["id"])
    for t in ref["tokenization"]:
        assert tok(t["text"])["input_ids"] == t["ids"], t["id"]
        assert tok.decode(t["ids_no_special"]) == t["decoded"], t["id"]


@pytest.fixture(scope="module")
def converted_gemma(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3-hf")
    subprocess.run([HROMADA, "convert", "gemma3-270m", "--out", str(out), "--dtype", "f32"], check=True)
    return out


def test_transformers_loads_converted_gemma3_and_matches_reference(converted_gemma):
    """Gemma 3: the exported norms (HF stores w, not 1+w), QK-norms, layer types and
    RoPE bases must be what transformers expects, or the logits drift."""
    ref = json.loads((SHARED / "golden" / "gemma-3-270m-reference.json").read_text())
    cfg = json.loads((converted_gemma / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["layer_types"][5] == "full_attention"
    tok = AutoTokenizer.from_pretrained(converted_gemma)
    model = AutoModelForCausalLM.from_pretrained(converted_gemma, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for p in ref["prompts"]:
        ids = tok(p["text"], add_special_tokens=p["add_special_tokens"])["input_ids"]
        assert ids == p["input_ids"], p["id"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        for t in p["last"]["top20"]:
            assert abs(logits[t["id"]].item() - t["logit"]) <= 2e-3, (p["id"], t["id"])

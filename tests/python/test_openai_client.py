"""`hromada serve` with the official `openai` Python client: chat, streaming chat,
completions, and the error for a bad key."""
import hashlib
import os
import subprocess
import socket
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
HROMADA = os.environ.get("HROMADA_BIN", str(ROOT / "target" / "debug" / "hromada"))
KEY = "test-key-for-openai-client"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(hashlib.sha256(KEY.encode()).hexdigest() + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([HROMADA, "serve", "--port", str(port), "--api-key-file", str(keys)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def client(base, key=KEY):
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0)


def test_models_and_chat(server):
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Як отримати довідку про доходи?"}],
                                  max_tokens=12, temperature=0, seed=1)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_matches_non_streaming(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Відповідай українською."}, {"role": "user", "content": "Що таке Дія?"}]
    full = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=0)
    stream = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_completions_logprobs_seed_and_n(server):
    c = client(server)
    r = c.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    assert r.choices[0].text.startswith(" Paris")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    a = c.completions.create(model="smollm2-135m", prompt="Київ —", max_tokens=8, temperature=0.9, seed=7, n=2)
    b = c.completions.create(model="smollm2-135m", prompt="Київ —", max_tokens=8, temperature=0.9, seed=7, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len(a.choices) == 2
    # logit_bias: +100 on one token id makes greedy decoding repeat that token.
    r = c.completions.create(model="smollm2-135m", prompt="Київ —", max_tokens=3, temperature=0, logprobs=1, logit_bias={"1234": 100})
    toks = r.choices[0].logprobs.tokens
    assert len(toks) == 3 and len(set(toks)) == 1, toks


def test_content_parts_equal_the_joined_string(server):
    c = client(server)
    parts = [{"type": "text", "text": "Як отримати"}, {"type": "text", "text": "довідку про доходи?"}]
    a = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": parts}], max_tokens=10, temperature=0)
    b = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Як отримати\nдовідку про доходи?"}],
                                  max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2-135m", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    assert "image_url" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2-135m", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "json_object"})
    assert "response_format" in str(e.value)


def test_bad_key_and_bad_request(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key").chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_completions_echo_scores_the_prompt(server):
    c = client(server)
    # ASCII, so every token decodes on its own (byte-level pieces of Cyrillic letters do not).
    prompt = "The capital of Ukraine is Kyiv."
    r = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 1
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[0] == 0

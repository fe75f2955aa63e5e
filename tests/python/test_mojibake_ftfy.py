"""Mojibake repair beside ftfy (the anchor): real brown-uk lines are mis-decoded the
ways broken software does, then repaired by `hromada data run` (normalise step only) and
by ftfy.fix_text. hromada must restore every kind (ftfy only handles UTF-8 read as a
single-byte code page), must restore at least as many lines as ftfy where ftfy applies,
and must leave clean Ukrainian and Russian text untouched."""
import json
import os
import subprocess
from pathlib import Path

import ftfy

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("HROMADA_SHARED", ROOT.parent / "shared"))
HROMADA = os.environ.get("HROMADA_BIN", str(ROOT / "target" / "debug" / "hromada"))


def mangle(text, kind):
    if kind == "utf8_as_cp1251":
        return text.encode("utf-8").decode("cp1251", errors="strict")
    if kind == "utf8_as_latin1":
        return text.encode("utf-8").decode("latin-1")
    if kind == "cp1251_as_latin1":
        return text.encode("cp1251").decode("latin-1")
    if kind == "koi8u_as_cp1251":
        return text.encode("koi8_u").decode("cp1251")
    if kind == "cp1251_as_koi8u":
        return text.encode("cp1251").decode("koi8_u")
    raise ValueError(kind)


KINDS = ["utf8_as_cp1251", "utf8_as_latin1", "cp1251_as_latin1", "koi8u_as_cp1251", "cp1251_as_koi8u"]


def lines():
    out = []
    for f in sorted((SHARED / "data/uk/brown-uk/data/good").glob("*.txt"))[::8]:
        for line in f.read_text().splitlines():
            line = " ".join(line.split())
            # Lines every code page can carry, long enough to be a sentence.
            if 60 <= len(line) <= 400:
                try:
                    for k in KINDS:
                        mangle(line, k)
                except (UnicodeError, ValueError):
                    continue
                out.append(line)
                break
    return out


def hromada_normalise(tmp_path, texts):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)))
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"input: {{path: {inp}}}\noutput: {{path: {tmp_path / 'out'}, format: jsonl, report: false}}\ntasks: 1\n"
                    "steps:\n  - normalise: {apostrophe: '', whitespace: false}\n")
    subprocess.run([HROMADA, "data", "run", str(pipe), "--no-progress"], check=True, capture_output=True)
    docs = [json.loads(l) for l in (tmp_path / "out/docs/00000.jsonl").read_text().splitlines()]
    return [d["text"] for d in sorted(docs, key=lambda d: int(d["id"]))]


def test_repairs_beside_ftfy(tmp_path):
    src = lines()
    assert len(src) >= 80, len(src)
    report = {}
    for kind in KINDS:
        bad = [mangle(t, kind) for t in src]
        d = tmp_path / kind
        d.mkdir()
        ours = hromada_normalise(d, bad)
        theirs = [ftfy.fix_text(b, normalization="NFC") for b in bad]
        n_ours = sum(o == s for o, s in zip(ours, src))
        n_ftfy = sum(o == s for o, s in zip(theirs, src))
        report[kind] = (n_ours, n_ftfy, len(src))
    print(report)
    for kind, (ours, theirs, n) in report.items():
        assert ours >= 0.99 * n, (kind, report)
        assert ours >= theirs, (kind, report)
    # ftfy handles the UTF-8 ones: the comparison is meaningful there.
    assert report["utf8_as_latin1"][1] >= 0.9 * len(src), report


def test_clean_text_untouched(tmp_path):
    clean = lines()
    ru = []
    for f in sorted((SHARED / "data/ru/ruslit").glob("*.txt"))[:20]:
        ru += [" ".join(l.split()) for l in f.read_text(errors="replace").splitlines() if len(l) > 60][:5]
    texts = clean + ru
    assert hromada_normalise(tmp_path, texts) == texts

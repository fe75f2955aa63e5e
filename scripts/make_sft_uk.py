#!/usr/bin/env python3
"""Build a small Ukrainian chat SFT set from the legal acts in ../shared/data/uk/laws.

Each example asks, in Ukrainian, what an article of an act says and answers with the
article's own text (the official wording): real Ukrainian legal language, no ZNO items
(those are eval's test set). Deterministic: acts in file order, provisions in order.

    python3 scripts/make_sft_uk.py [--laws DIR] [--out FILE] [--max N]
"""
import argparse, glob, json, os, re

QUESTIONS = [
    "Що передбачає {art} документа «{act}»?",
    "Перекажи зміст: {act}, {art}.",
    "Яка норма закріплена в {art_loc} документа «{act}»?",
]

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.environ.get("HROMADA_SHARED", os.path.join(here, "..", "..", "shared"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--laws", default=os.path.join(shared, "data", "uk", "laws", "seed"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--max", type=int, default=3000)
    ap.add_argument("--min-chars", type=int, default=60)
    ap.add_argument("--max-chars", type=int, default=700)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.laws, "*.json")))
    if not files:
        raise SystemExit(f"no legal acts under {a.laws}")
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w", encoding="utf-8") as out:
        for f in files:
            act = json.load(open(f, encoding="utf-8"))
            title = (act.get("title") or act.get("short_name") or "").strip()
            for i, p in enumerate(act.get("provisions") or []):
                content = re.sub(r"\s+", " ", (p.get("content") or "")).strip()
                ptitle = (p.get("title") or "").strip()
                m = re.match(r"(Стаття\s+[\w\-]+)", ptitle)
                if not title or not m or not (a.min_chars <= len(content) <= a.max_chars):
                    continue
                art = m.group(1)
                q = QUESTIONS[(n + i) % len(QUESTIONS)].format(act=title, art=art, art_loc=art.replace("Стаття", "статті"))
                heading = ptitle[len(art):].strip(" .")
                answer = (heading + ". " if heading else "") + content
                out.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
                n += 1
                if n >= a.max:
                    break
            if n >= a.max:
                break
    os.replace(a.out + ".tmp", a.out)
    print(f"{n} examples -> {a.out}")

if __name__ == "__main__":
    main()

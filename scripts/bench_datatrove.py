#!/usr/bin/env python3
"""datatrove's side of `hromada bench data`: the equivalent chain on the same JSONL.

Steps, in hromada's order, and where they differ:
  normalise  -> FTFYFormatter (ftfy: UTF-8 mojibake, NFC, control chars; hromada also
                repairs legacy cp1251/KOI8-U mojibake and Ukrainian apostrophes)
  langid     -> a LambdaFilter calling lingua (the Python package of the same Rust
                library, same languages, same 10,000-character prefix and 0.9 threshold;
                FineWeb-2 itself uses GlotLID/fastText, whose model cannot be fetched here).
                hromada additionally identifies up to 16 lines per document (surzhyk share).
  quality    -> GopherRepetitionFilter + GopherQualityFilter + FineWebQualityFilter with
                FineWeb-2's ukr_Cyrl thresholds
  pii        -> PIIFormatter (e-mails and IPs only: datatrove has no Ukrainian PII)
  dedup      -> MinhashDedupSignature/Buckets/Cluster/Filter, 5-grams, 14x8 (no exact-dedup
                stage; datatrove does not verify candidate pairs)
  tokenize   -> DocumentTokenizer with the same tokenizer.json (SmolLM2)
Prints one JSON line: {"seconds", "kept", "note"}.
"""
import argparse
import json
import os
import shutil
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="one JSONL file")
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokenizer", required=True, help="path to tokenizer.json")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-langid", action="store_true", help="leave language ID out")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter, LambdaFilter
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.typeshelper import Languages
    from lingua import IsoCode639_1, LanguageDetectorBuilder, Language

    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c)) for c in ["UK", "RU", "BE", "EN", "PL", "BG"]]
    detector = LanguageDetectorBuilder.from_languages(*langs).with_preloaded_language_models().build()
    uk = Language.from_iso_code_639_1(IsoCode639_1.UK)

    def is_uk(doc):
        vals = detector.compute_language_confidence_values(doc.text[:10000])
        if not vals:
            return False
        top = vals[0]
        doc.metadata["language"] = top.language.iso_code_639_1.name.lower()
        doc.metadata["language_score"] = top.value
        threshold = 0.9 if len(doc.text) >= 250 else 0.5
        return top.language == uk and top.value >= threshold

    lang = Languages.ukrainian if hasattr(Languages, "ukrainian") else "uk"
    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    w = a.work
    src_dir, src_name = os.path.split(os.path.abspath(a.input))
    t0 = time.perf_counter()
    stage1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(src_dir, glob_pattern=src_name),
            FTFYFormatter(),
            *([] if a.no_langid else [LambdaFilter(is_uk)]),
            GopherRepetitionFilter(dup_line_frac=0.333, top_n_grams=((2, 0.086), (3, 0.108), (4, 0.129)),
                                   dup_n_grams=((5, 0.176), (6, 0.157), (7, 0.139), (8, 0.125), (9, 0.113), (10, 0.102)), language=lang),
            GopherQualityFilter(min_avg_word_length=3, max_avg_word_length=11, max_non_alpha_words_ratio=0.694,
                                stop_words=["у", "в", "на", "і", "з", "та", "до", "року", "за", "що"], min_stop_words=2, language=lang),
            FineWebQualityFilter(line_punct_thr=0.308, new_line_ratio=0.211, language=lang),
            PIIFormatter(),
            JsonlWriter(f"{w}/filtered"),
            MinhashDedupSignature(output_folder=f"{w}/sigs", config=mh, language=lang),
        ],
        tasks=1, workers=1, logging_dir=f"{w}/logs/1",
    )
    stage1.run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{w}/sigs", output_folder=f"{w}/buckets", config=mh)],
                          tasks=mh.num_buckets, workers=a.workers, logging_dir=f"{w}/logs/2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{w}/buckets", output_folder=f"{w}/clusters", config=mh)],
                          tasks=1, workers=1, logging_dir=f"{w}/logs/3").run()
    kept = {"n": 0}

    def count(doc):
        kept["n"] += 1
        return True

    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(f"{w}/filtered"),
            MinhashDedupFilter(input_folder=f"{w}/clusters"),
            LambdaFilter(count),
            JsonlWriter(f"{w}/out"),
            DocumentTokenizer(output_folder=f"{w}/tokens", tokenizer_name_or_path=a.tokenizer, save_final_metadata=False),
        ],
        tasks=1, workers=1, logging_dir=f"{w}/logs/4",
    ).run()
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "kept": kept["n"],
                      "note": "ftfy, lingua (doc only), gopher+fineweb, PII e-mail/IP, minhash 14x8, tokenizer"}))


if __name__ == "__main__":
    main()

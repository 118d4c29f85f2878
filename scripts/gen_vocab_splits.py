#!/usr/bin/env python3
"""Writes the reference pre-tokenizer splits of the vocabularies that ship without a GGUF.

llama.cpp's tokenizer tests have .inp/.out cases for Llama-3 (llama-bpe) and Qwen2, but their
GGUF vocabularies are not in tests/data/vocab, so tests/test_vocab.cpp checks their pre-tokenizers
by the splits: the words that the models' own pre-tokenizer regex (from their tokenizer.json, the
one Hugging Face's tokenizers ran to produce the .out ids) cuts each .inp case into. The regexes
are run here with the `regex` package (Unicode properties, as Hugging Face's Oniguruma-based
splitter), independently of the C++ scanners:

    python3 -m pip install regex   # or: apt-get install python3-regex
    scripts/gen_vocab_splits.py    # rewrites tests/data/vocab/ggml-vocab-{llama-bpe,qwen2}.gguf.splits.json
"""
import json
import os

import regex

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "vocab")
SEPARATOR = "\n__ggml_vocab_test__\n"

REGEXES = {
    # meta-llama/Meta-Llama-3-8B tokenizer.json, pre_tokenizer Split pattern
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # Qwen/Qwen2 tokenizer.json, pre_tokenizer Split pattern
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def main():
    for name, pattern in REGEXES.items():
        base = os.path.join(ROOT, f"ggml-vocab-{name}.gguf")
        with open(base + ".inp", encoding="utf-8", newline="") as f:
            cases = f.read().split(SEPARATOR)[:-1]  # every case ends with the separator
        splits = []
        for text in cases:
            words = regex.findall(pattern, text)
            assert "".join(words) == text, text  # this regex matches everywhere: no gaps
            splits.append(words)
        with open(base + ".splits.json", "w", encoding="utf-8") as f:
            # One case a line: {"generated_by": ..., "regex": ..., "cases": [[words of case 0], ...]}
            f.write('{"generated_by": "scripts/gen_vocab_splits.py",\n"regex": ' + json.dumps(pattern) +
                    ',\n"cases": [\n' + ",\n".join(json.dumps(words) for words in splits) + "\n]}\n")
        print(f"{name}: {len(cases)} cases, {sum(map(len, splits))} words")


if __name__ == "__main__":
    main()

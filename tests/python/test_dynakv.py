#!/usr/bin/python3
"""Tests of the dynakv Python module against the dynakv CLI (same numbers, same text).

Run by ctest as the test `Python`, with PYTHONPATH at the build's module (build/python), DYNAKV_CLI
the built CLI and DYNAKV_TEST_DATA tests/data; by hand:

  PYTHONPATH=build/python /usr/bin/python3 tests/python/test_dynakv.py [-v] [TestClass.test_name]
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import numpy as np

import dynakv

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("DYNAKV_TEST_DATA", os.path.join(HERE, "..", "data"))
CLI = os.environ.get("DYNAKV_CLI", os.path.join(HERE, "..", "..", "build", "dynakv"))
MODEL = os.path.join(DATA, "brown-kjv-llama-6M-f32.gguf")
VALID = os.path.join(DATA, "valid.txt")
CALIB = os.path.join(DATA, "calib.txt")
THREADS = 2  # the CLI gets the same -t: the numbers are compared exactly


def cli(*args):
    """Runs the CLI; returns (stdout, stderr), failing the test on a non-zero exit."""
    r = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"dynakv {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr}")
    return r.stdout, r.stderr


def line(text, prefix):
    """The first line of text starting with prefix."""
    for ln in text.splitlines():
        if ln.startswith(prefix):
            return ln
    raise AssertionError(f"no line starting with {prefix!r} in:\n{text}")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def dynakv_bytes_from_ranks(ranks):
    """BytesUsed of an f16 DynaKV cache from its ranks (docs/kv_layout.md, 'Bytes'; D <= 256)."""
    total = 0
    for layer in ranks:
        n = layer.shape[0]
        total += int(2 * layer.sum()) + n * 2 + math.ceil(n / 64) * 4
    return total


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m = dynakv.Model(MODEL)
        cls.valid = read_bytes(VALID)

    @classmethod
    def profile(cls):
        """A small DynaKV profile (10 chunks of 512 tokens), made once for every test class."""
        if Base._profile is None:
            Base._tmp = tempfile.mkdtemp(prefix="dynakv_py_")
            Base._profile = os.path.join(Base._tmp, "small.dkv")
            Base._calibration = dynakv.calibrate(cls.m, read_bytes(CALIB), Base._profile, ctx=512, chunks=10,
                                                 threads=THREADS)
        return Base._profile

    _profile = None
    _tmp = None
    _calibration = None


def tearDownModule():
    if Base._tmp:
        shutil.rmtree(Base._tmp, ignore_errors=True)


class ModelTest(Base):
    def test_module_is_the_build_one(self):
        # With PYTHONPATH set (ctest), the module under test is the freshly built one, not an installed one.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if paths:
            here = os.path.realpath(os.path.dirname(dynakv.__file__))
            self.assertIn(here, [os.path.realpath(p) for p in paths])

    def test_properties(self):
        m = self.m
        self.assertEqual((m.n_layer, m.n_head, m.n_head_kv, m.head_dim), (6, 4, 2, 64))
        self.assertEqual((m.n_vocab, m.n_ctx_train, m.arch), (4096, 1024, "llama"))
        self.assertEqual(m.kv_dim, m.n_head_kv * m.head_dim)
        self.assertEqual(m.kv_bytes_per_token, m.n_layer * 2 * m.kv_dim * 2)
        self.assertEqual(m.name, "brown-kjv-llama-6M")
        self.assertEqual((m.bos_id, m.eos_id), (1, 2))

    def test_tokenize_matches_llama_cpp(self):
        with open(os.path.join(DATA, "reference", "brown-kjv-llama-6M-f32", "tokenize.txt"), "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        checked = 0
        for ln in lines:
            if "\t" not in ln:
                continue
            text, ids = ln.rsplit("\t", 1)
            expected = [int(x) for x in ids.strip("[] ").split(",") if x.strip()]
            self.assertEqual(self.m.tokenize(text), expected, text)
            self.assertEqual(self.m.tokenize(text, bos=False), expected[1:], text)
            self.assertEqual(self.m.detokenize(expected), "<s> " + text, text)
            checked += 1
        self.assertEqual(checked, 10)
        self.assertEqual(self.m.token_to_piece(1), "<s>")
        self.assertEqual(self.m.token_to_piece(1, special=False), "")
        self.assertEqual(self.m.detokenize(expected, special=False), " " + text)
        # "é" is two byte tokens: half of it is not UTF-8 and comes out replaced.
        ids = self.m.tokenize("café", bos=False)
        self.assertEqual(self.m.detokenize(ids), " café")
        self.assertEqual(self.m.detokenize(ids[:-1]), " caf\ufffd")


class GenerateTest(Base):
    PROMPT = "In the beginning"

    def test_greedy_matches_cli(self):
        out, _ = cli("generate", "-m", MODEL, "-p", self.PROMPT, "-n", 24, "--temp", 0, "-t", THREADS)
        r = dynakv.generate(self.m, self.PROMPT, n_predict=24, threads=THREADS)
        prompt_text = self.m.detokenize(self.m.tokenize(self.PROMPT), special=False)  # the CLI prints no "<s>"
        self.assertEqual(out, prompt_text + r["text"] + "\n")
        self.assertEqual(len(r["tokens"]), 24)
        self.assertEqual(r["n_prompt"], len(self.m.tokenize(self.PROMPT)))
        self.assertEqual(r["stop_reason"], "length")
        self.assertGreater(r["prefill_seconds"], 0.0)
        self.assertGreater(r["decode_seconds"], 0.0)
        # Token ids as the prompt give the same result.
        self.assertEqual(dynakv.generate(self.m, self.m.tokenize(self.PROMPT), n_predict=24)["tokens"], r["tokens"])

    def test_dynakv_cache_matches_cli(self):
        p = self.profile()
        out, err = cli("generate", "-m", MODEL, "-p", self.PROMPT, "-n", 16, "--temp", 0, "-t", THREADS,
                       "--kv", "dynakv", "--profile", p, "--rank-policy", "energy", "--tau", 0.9)
        c = dynakv.Cache(self.m, kv="dynakv", profile=p, rank_policy="energy", tau=0.9)
        r = dynakv.generate(self.m, self.PROMPT, cache=c, n_predict=16, threads=THREADS)
        self.assertEqual(out, self.m.detokenize(self.m.tokenize(self.PROMPT), special=False) + r["text"] + "\n")
        kv = line(err, "kv cache: ")
        self.assertIn(f"{c.bytes_used} bytes used for {c.n_tokens} tokens", kv)
        self.assertIn(f"{c.bytes_reserved} reserved", kv)
        self.assertIn(c.name, kv)

    def test_stream_joins_to_generate(self):
        c = dynakv.Cache(self.m, kv="q8_0", capacity=128)
        whole = dynakv.generate(self.m, self.PROMPT, cache=c, n_predict=20, threads=THREADS)
        n_tokens = c.n_tokens
        s = dynakv.generate_stream(self.m, self.PROMPT, cache=c, n_predict=20, threads=THREADS)
        self.assertIsNone(s.stop_reason)
        pieces = list(s)
        self.assertEqual("".join(pieces), whole["text"])
        self.assertEqual(s.tokens, whole["tokens"])
        self.assertEqual(s.stop_reason, "length")
        self.assertEqual(c.n_tokens, n_tokens)
        # A stream owns its cache until it ends or is closed.
        s = dynakv.generate_stream(self.m, self.PROMPT, cache=c, n_predict=20, threads=THREADS)
        first = next(s)
        self.assertEqual(first, pieces[0])
        with self.assertRaisesRegex(RuntimeError, "generate_stream"):
            dynakv.generate(self.m, self.PROMPT, cache=c, n_predict=2)
        with self.assertRaisesRegex(RuntimeError, "generate_stream"):
            c.clear()
        self.assertGreater(c.bytes_used, 0)  # reads are fine between steps
        s.close()
        self.assertEqual(s.stop_reason, "closed")
        self.assertEqual(list(s), [])
        self.assertEqual(dynakv.generate(self.m, self.PROMPT, cache=c, n_predict=20)["text"], whole["text"])

    def test_special_tokens_are_not_text(self):
        # A random-weight model of 259 tokens samples control tokens often: with this seed, BOS and
        # <unk> among 300 tokens. Generated text (here, streamed, and the CLI's) shows neither as
        # "<s>"/"<unk>"; they printed as such.
        tmp = tempfile.mkdtemp(prefix="dynakv_py_tiny_")
        try:
            tiny_path = os.path.join(tmp, "tiny.gguf")
            cli("make-gguf", "-o", tiny_path, "--shape", "custom", "--layers", 1, "--n-embd", 64, "--n-ff", 128,
                "--n-head", 2, "--n-vocab", 259, "--type", "f32")
            tiny = dynakv.Model(tiny_path)
            args = dict(n_predict=300, temperature=1.0, seed=7, threads=1)
            r = dynakv.generate(tiny, "hello", **args)
            self.assertIn(tiny.bos_id, r["tokens"])
            self.assertIn(0, r["tokens"])  # <unk>
            for text in [r["text"], "".join(dynakv.generate_stream(tiny, "hello", **args))]:
                self.assertNotIn("<s>", text)
                self.assertNotIn("<unk>", text)
                self.assertIn("\u2585", text)  # <unk> as llama.cpp shows it
            self.assertEqual(r["text"], tiny.detokenize(r["tokens"], special=False))
            run = subprocess.run([CLI, "generate", "-m", tiny_path, "-p", "hello", "-n", "300", "--temp", "1.0",
                                  "--seed", "7", "-t", "1"], capture_output=True, check=True)
            out = run.stdout.decode("utf-8", errors="replace")  # random bytes: not all UTF-8
            self.assertNotIn("<s>", out)
            self.assertEqual(out, tiny.detokenize(tiny.tokenize("hello"), special=False) + r["text"] + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_capacity_and_sampling(self):
        c = dynakv.Cache(self.m, capacity=8)
        r = dynakv.generate(self.m, self.PROMPT, cache=c, n_predict=20)
        self.assertEqual(r["stop_reason"], "capacity")
        self.assertEqual(c.n_tokens, 8)
        a = dynakv.generate(self.m, self.PROMPT, n_predict=16, temperature=0.8, seed=7, threads=THREADS)
        b = dynakv.generate(self.m, self.PROMPT, n_predict=16, temperature=0.8, seed=7, threads=THREADS)
        self.assertEqual(a["tokens"], b["tokens"])
        out, _ = cli("generate", "-m", MODEL, "-p", self.PROMPT, "-n", 16, "--temp", 0.8, "--seed", 7, "-t", THREADS)
        self.assertEqual(out, self.m.detokenize(self.m.tokenize(self.PROMPT), special=False) + a["text"] + "\n")

    def test_threads_run_side_by_side(self):
        prompts = ["In the beginning", "The jury said", "Once upon a time"]
        serial = [dynakv.generate(self.m, p, n_predict=12, threads=1)["tokens"] for p in prompts]
        results = [None] * len(prompts)

        def run(i):
            results[i] = dynakv.generate(self.m, prompts[i], n_predict=12, threads=1)["tokens"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results, serial)


class PerplexityTest(Base):
    def test_matches_cli(self):
        out, _ = cli("perplexity", "-m", MODEL, "-f", VALID, "-c", 128, "--chunks", 4, "-t", THREADS, "-q")
        r = dynakv.perplexity(self.m, self.valid, ctx=128, chunks=4, threads=THREADS)
        self.assertEqual(line(out, "PPL = "), "PPL = %.4f +/- %.5f" % (r["ppl"], r["ppl_err"]))
        self.assertEqual(line(out, "KV fraction = "), "KV fraction = %.4f" % r["kv_fraction"])
        self.assertIsNone(r["kl"])
        self.assertEqual((r["n_chunks"], r["n_scored"]), (4, 4 * 63))
        self.assertGreater(r["tokens_per_s"], 0)
        # The text as str gives the same tokens.
        self.assertEqual(dynakv.perplexity(self.m, self.valid.decode(), ctx=128, chunks=4, threads=THREADS)["ppl"],
                         r["ppl"])

    def test_kl_matches_cli(self):
        out, _ = cli("perplexity", "-m", MODEL, "-f", VALID, "-c", 128, "--chunks", 3, "-t", THREADS, "-q",
                     "--kv", "kivi", "--kivi-bits", 2, "--kl-divergence")
        c = dynakv.Cache(self.m, kv="kivi", kivi_bits=2, capacity=128)
        r = dynakv.perplexity(self.m, self.valid, cache=c, ctx=128, chunks=3, kl=True, threads=THREADS)
        self.assertEqual(line(out, "PPL = "), "PPL = %.4f +/- %.5f" % (r["ppl"], r["ppl_err"]))
        self.assertEqual(line(out, "KL = "), "KL = %.6f +/- %.6f" % (r["kl"], r["kl_err"]))
        self.assertEqual(line(out, "same top-1 = "), "same top-1 = %.4f" % r["top1"])
        self.assertEqual(line(out, "KV fraction = "), "KV fraction = %.4f" % r["kv_fraction"])

    def test_dynakv_with_eviction_matches_cli(self):
        p = self.profile()
        flags = ["--kv", "dynakv", "--profile", p, "--rank-policy", "energy", "--kv-budget", 0.3,
                 "--evict", "snapkv", "--evict-keep", 0.5]
        out, _ = cli("perplexity", "-m", MODEL, "-f", VALID, "-c", 128, "--chunks", 2, "-t", THREADS, "-q", *flags)
        c = dynakv.Cache(self.m, kv="dynakv", evict="snapkv", profile=p, rank_policy="energy", kv_budget=0.3,
                         evict_keep=0.5)
        self.assertEqual(c.config, "dynakv + snapkv --evict-keep 0.5 --kv-budget 0.3 --profile %s --rank-policy energy"
                         % p)
        r = dynakv.perplexity(self.m, self.valid, cache=c, ctx=128, chunks=2, threads=THREADS)
        self.assertEqual(line(out, "PPL = "), "PPL = %.4f +/- %.5f" % (r["ppl"], r["ppl_err"]))
        self.assertEqual(line(out, "KV fraction (prompt) = "), "KV fraction (prompt) = %.4f" % r["kv_fraction_prompt"])
        # After eviction the layers keep fewer tokens than were seen.
        self.assertLess(c.stored(0), c.n_tokens)
        self.assertEqual(c.ranks(0).shape, (c.stored(0), 2))


class DynaKvTest(Base):
    def test_calibration_matches_cli(self):
        p = self.profile()
        cal = Base._calibration
        self.assertEqual(cal["n_calib_tokens"], 10 * 512)
        self.assertEqual(cal["levels"][-1], self.m.kv_dim)
        self.assertEqual(len(cal["explained_variance_k"]), self.m.n_layer)
        self.assertEqual(len(cal["explained_variance_v"][0]), len(cal["levels"]))
        self.assertAlmostEqual(cal["explained_variance_k"][0][-1], 1.0, places=6)
        self.assertEqual(cal["bytes"], os.path.getsize(p))
        cli_path = os.path.join(Base._tmp, "cli.dkv")
        out, _ = cli("calibrate", "-m", MODEL, "-f", CALIB, "-c", 512, "--chunks", 10, "-t", THREADS, "-q",
                     "-o", cli_path)
        self.assertIn(cal["table"], out)
        self.assertEqual(read_bytes(cli_path), read_bytes(p))

    def test_ranks_and_bytes(self):
        p = self.profile()
        c = dynakv.Cache(self.m, kv="dynakv", profile=p, rank_policy="uniform", rank=16, capacity=256)
        self.assertEqual((c.n_tokens, c.bytes_used, c.fraction), (0, 0, 0.0))
        self.assertEqual(c.ranks().shape, (self.m.n_layer, 0, 2))
        dynakv.generate(self.m, "In the beginning God created", cache=c, n_predict=20, threads=THREADS)
        ranks = c.ranks()
        self.assertEqual(ranks.dtype, np.int32)
        self.assertEqual(ranks.shape, (self.m.n_layer, c.n_tokens, 2))
        self.assertTrue((ranks == 16).all())
        self.assertEqual(c.bytes_used, dynakv_bytes_from_ranks(ranks))
        self.assertAlmostEqual(c.fraction, c.bytes_used / (c.n_tokens * self.m.kv_bytes_per_token))
        self.assertEqual(c.stored(3), c.n_tokens)

        # Energy with a budget: ranks differ by token, and the bytes still follow from them.
        e = dynakv.Cache(self.m, kv="dynakv", profile=p, rank_policy="energy", kv_budget=0.25)
        dynakv.generate(self.m, "In the beginning God created", cache=e, n_predict=40, threads=THREADS)
        ranks = e.ranks()
        self.assertGreater(len(np.unique(ranks)), 1)
        self.assertEqual(e.bytes_used, dynakv_bytes_from_ranks(ranks))
        self.assertLessEqual(e.fraction, 0.25 + 1e-3)

        c.clear()
        self.assertEqual((c.n_tokens, c.bytes_used), (0, 0))

    def test_keys_at_full_rank_match_the_full_cache(self):
        p = self.profile()
        full = dynakv.Cache(self.m, kv="full", kv_dtype="f32", capacity=64)
        dyna = dynakv.Cache(self.m, kv="dynakv", profile=p, rank=self.m.kv_dim, kv_dtype="f32", capacity=64)
        for c in (full, dyna):
            dynakv.generate(self.m, "The jury said", cache=c, n_predict=8, threads=THREADS)
        for layer in (0, self.m.n_layer - 1):
            k, kd = full.keys(layer), dyna.keys(layer)
            self.assertEqual(k.dtype, np.float32)
            self.assertEqual(k.shape, (full.n_tokens, self.m.kv_dim))
            np.testing.assert_allclose(kd, k, rtol=0, atol=1e-3 * max(1.0, float(np.abs(k).max())))
            self.assertEqual(full.values(layer).shape, k.shape)


class MethodsTest(Base):
    # Simple flags for the methods that need some; any other registered method is tried without flags
    # (an eviction wrapper with evict_keep=0.5 over the full cache).
    FLAGS = {"dynakv": lambda p: dict(profile=p, rank_policy="uniform", rank=8),
             "kivi": lambda p: dict(kivi_bits=2)}

    def test_every_registered_method(self):
        p = self.profile()
        methods = dynakv.methods()
        names = [m["name"] for m in methods]
        for expected in ("full", "dynakv", "q8_0", "q4_0", "kivi", "snapkv", "streamingllm", "h2o"):
            self.assertIn(expected, names)
        for m in methods:
            self.assertIn(m["kind"], ("kv", "evict"))
            self.assertTrue(m["summary"])
            for f in m["flags"]:
                self.assertEqual("--" + f["keyword"].replace("_", "-"), f["name"])
            flags = self.FLAGS.get(m["name"], lambda _: {})(p)
            with self.subTest(method=m["name"]):
                if m["kind"] == "kv":
                    c = dynakv.Cache(self.m, kv=m["name"], capacity=128, **flags)
                else:
                    c = dynakv.Cache(self.m, evict=m["name"], capacity=128, evict_keep=0.5, **flags)
                r = dynakv.generate(self.m, "In the beginning God created", cache=c, n_predict=6, threads=THREADS)
                self.assertEqual(c.n_tokens, r["n_prompt"] + 5)
                self.assertGreater(c.bytes_used, 0)
                self.assertGreater(c.bytes_reserved, 0)
                self.assertGreater(c.fraction, 0.0)
                self.assertLessEqual(c.fraction, 1.0 + 1e-9)
                self.assertEqual(c.method, m["name"] if m["kind"] == "kv" else "full")
                if m["kind"] == "evict":
                    self.assertLess(c.stored(0), c.n_tokens)
                    self.assertEqual(c.keys(0).shape, (c.stored(0), self.m.kv_dim))
                if m["name"] != "dynakv":
                    with self.assertRaisesRegex(ValueError, "not a DynaKV cache"):
                        c.ranks()

    def test_passkey_matches_cli(self):
        out, _ = cli("passkey", "-m", MODEL, "-f", VALID, "--lengths", 60, "--depths", "0.3,0.7", "--per-cell", 1,
                     "-t", THREADS, "-q", "--kv", "q4_0")
        c = dynakv.Cache(self.m, kv="q4_0")
        r = dynakv.passkey(self.m, self.valid, cache=c, lengths=[60], depths=[0.3, 0.7], per_cell=1, threads=THREADS)
        self.assertEqual(line(out, "accuracy = "), "accuracy = %.4f (%d of %d)" % (r["accuracy"], r["correct"], r["n"]))
        self.assertEqual(line(out, "KV fraction = "), "KV fraction = %.4f" % r["kv_fraction"])
        self.assertEqual(len(r["cases"]), 2)


class ErrorTest(Base):
    def assertRaisesWith(self, exc, text, fn, *args, **kwargs):
        with self.assertRaises(exc) as ctx:
            fn(*args, **kwargs)
        self.assertIn(text, str(ctx.exception))

    def test_cache_flags_are_named(self):
        p = self.profile()
        m = self.m
        self.assertRaisesWith(ValueError, "--kv-budget", dynakv.Cache, m, kv="full", kv_budget=0.25)
        self.assertRaisesWith(ValueError, "--rank", dynakv.Cache, m, kv="dynakv", profile=p, rank_policy="uniform",
                              rank=0)
        self.assertRaisesWith(ValueError, "--tau", dynakv.Cache, m, kv="dynakv", profile=p, rank_policy="energy",
                              tau="lots")
        self.assertRaisesWith(ValueError, "--kv", dynakv.Cache, m, kv="nope")
        self.assertRaisesWith(ValueError, "--evict", dynakv.Cache, m, evict="nope")
        self.assertRaisesWith(ValueError, "--bogus-flag", dynakv.Cache, m, bogus_flag=1)
        self.assertRaisesWith(ValueError, "--kivi-bits", dynakv.Cache, m, kv="kivi", kivi_bits=3)
        self.assertRaisesWith(ValueError, "--hadamard", dynakv.Cache, m, kv="q8_0", hadamard="yes")
        self.assertRaisesWith(ValueError, "--evict-keep", dynakv.Cache, m, evict="h2o", evict_keep=1.5)
        self.assertRaisesWith(ValueError, "capacity", dynakv.Cache, m, capacity=0)
        # Flags given with their dashes, and None for "not given", work too.
        c = dynakv.Cache(m, kv="q8_0", hadamard=True, **{"--kv-dtype": None})
        self.assertEqual(c.flags, {"--hadamard": "1"})

    def test_files(self):
        self.assertRaisesWith(OSError, "/nonexistent/model.gguf", dynakv.Model, "/nonexistent/model.gguf")
        self.assertRaisesWith(OSError, "/nonexistent/p.dkv", dynakv.Cache, self.m, kv="dynakv",
                              profile="/nonexistent/p.dkv")
        with self.assertRaises((RuntimeError, OSError)) as ctx:
            dynakv.Model(VALID)
        self.assertIn(VALID, str(ctx.exception))
        self.assertRaisesWith(OSError, "/nonexistent/dir/x.dkv", dynakv.calibrate, self.m, read_bytes(CALIB)[:20000],
                              "/nonexistent/dir/x.dkv", ctx=64, chunks=1, threads=THREADS)

    def test_arguments(self):
        m = self.m
        full = dynakv.Cache(m, capacity=16)
        self.assertRaisesWith(ValueError, "not a DynaKV cache", full.ranks)
        self.assertRaisesWith(ValueError, "layer", full.stored, 6)
        self.assertRaisesWith(ValueError, "layer", full.keys, -1)
        self.assertRaisesWith(ValueError, "ctx", dynakv.perplexity, m, "too short", ctx=128)
        self.assertRaisesWith(ValueError, "chunks", dynakv.perplexity, m, self.valid, ctx=128, chunks=0)
        self.assertRaisesWith(ValueError, "KV cache smaller", dynakv.perplexity, m, self.valid, cache=full, ctx=128,
                              chunks=1)
        self.assertRaisesWith(ValueError, "4096", dynakv.generate, m, [1, 4096])
        self.assertRaisesWith(ValueError, "context holds", dynakv.generate, m, "word " * 40, cache=full)
        self.assertRaisesWith(ValueError, "context holds", dynakv.generate_stream, m, "word " * 40, cache=full)
        self.assertRaisesWith(ValueError, "temperature", dynakv.generate, m, "x", temperature=-1)
        self.assertRaisesWith(ValueError, "threads", dynakv.generate, m, "x", threads=-2)
        self.assertRaisesWith(ValueError, "--levels", dynakv.calibrate, m, "text", None, levels=[8, 4])
        self.assertRaisesWith(ValueError, "--depths", dynakv.passkey, m, self.valid, depths=[1.5])
        self.assertRaisesWith(ValueError, "ids", m.detokenize, [-1])

    def test_hostile_arguments(self):
        m = self.m
        # None for the model: each call once crashed the interpreter (only Cache checked).
        calls = [
            lambda: dynakv.generate(None, "x", n_predict=2),
            lambda: dynakv.generate_stream(None, "x", n_predict=2),
            lambda: dynakv.perplexity(None, self.valid, ctx=64, chunks=1),
            lambda: dynakv.calibrate(None, read_bytes(CALIB)[:20000], None, ctx=64, chunks=1),
            lambda: dynakv.passkey(None, self.valid, per_cell=1),
            lambda: dynakv.Cache(None),
        ]
        for call in calls:
            self.assertRaisesWith(TypeError, "model: expected a dynakv.Model, got None", call)
        # The CLI's bound on -t (100000 threads aborted the interpreter).
        for fn, args in [(dynakv.generate, (m, "x")), (dynakv.generate_stream, (m, "x")),
                         (dynakv.perplexity, (m, self.valid)), (dynakv.passkey, (m, self.valid))]:
            self.assertRaisesWith(ValueError, "threads: must be 0 (all cores) or 1..1024, found 100000", fn, *args,
                                  threads=100000)
        self.assertRaisesWith(ValueError, "1..1024", dynakv.calibrate, m, "text", None, threads=1025)
        self.assertEqual(len(dynakv.generate(m, "x", n_predict=2, threads=1024)["tokens"]), 2)
        # A path with a NUL in it is refused, as open() refuses it (it loaded the file its prefix names).
        with self.assertRaises(ValueError):
            open(MODEL + "\0.txt", "rb")
        self.assertRaisesWith(ValueError, "embedded null character", dynakv.Model, MODEL + "\0.txt")
        self.assertRaisesWith(ValueError, "embedded null character", dynakv.Model, os.fsencode(MODEL) + b"\0")
        out = os.path.join(tempfile.mkdtemp(prefix="dynakv_py_nul_"), "p.dkv")
        self.assertRaisesWith(ValueError, "out_path: embedded null", dynakv.calibrate, m, read_bytes(CALIB)[:20000],
                              out + "\0x", ctx=64, chunks=1)
        self.assertFalse(os.path.exists(out))
        self.assertRaisesWith(ValueError, "--profile: embedded null", dynakv.Cache, m, kv="dynakv",
                              profile=self.profile() + "\0")


class InterruptTest(Base):
    """Ctrl-C (SIGINT) stops a long call within moments, as it stops Python code; before, generate and
    perplexity ran to their end (seconds to hours) and only then raised KeyboardInterrupt."""

    def interrupted_after(self, fn, delay=0.3):
        """Sends SIGINT to this process after delay seconds; returns the seconds fn ran until it raised."""
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        try:
            with self.assertRaises(KeyboardInterrupt):
                fn()
            return time.monotonic() - t0
        finally:
            timer.cancel()

    def test_ctrl_c_stops_long_calls(self):
        m = self.m
        # Each takes well over 10 s uninterrupted on 2 cores: the whole valid.txt at ctx 1024 (about
        # 50 s), and greedy decoding of the v3 model until its 4096-token context is full (about 17 s).
        v3 = dynakv.Model(os.path.join(DATA, "eval-llama-27M-v3-f16.gguf"))
        calls = {
            "perplexity": lambda: dynakv.perplexity(m, self.valid, ctx=1024, threads=1),
            "generate": lambda: dynakv.generate(v3, "And it came to pass", n_predict=100000, ctx=4096, threads=1),
            "calibrate": lambda: dynakv.calibrate(m, self.valid, None, ctx=512, threads=1),
            "passkey": lambda: dynakv.passkey(m, self.valid, per_cell=20, threads=1),
        }
        for name, call in calls.items():
            with self.subTest(name):
                self.assertLess(self.interrupted_after(call), 3.0)
        # The model is fine afterwards.
        self.assertEqual(len(dynakv.generate(m, "In the beginning", n_predict=4)["tokens"]), 4)


if __name__ == "__main__":
    unittest.main(verbosity=2)

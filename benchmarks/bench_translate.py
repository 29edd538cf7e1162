"""Translation throughput and latency at batch 1 and batch 16, per backend, plus server memory.

Each backend runs as a real server process; requests carry real Tatoeba en->fr sentences (short,
conversational: the length a speech segment has). "Batch 16" is 16 sentences in one Translate request.

Backends measured:

* ``ctranslate2`` with the tiny random model of ``tests/fixtures/tiny_ct2.py`` (2 layers, d_model 64,
  NLLB layout). Its end-of-sentence is suppressed, so every sentence decodes exactly
  ``CT2_DECODE_TOKENS`` tokens: the figures show the serving path's overhead (gRPC, SentencePiece,
  CTranslate2 batching), not NLLB-200's speed.
* ``llm`` with the bundled Gemma 3 270M Q4_K_M in llama.cpp (the CPU default), greedy, one sentence per
  prompt.

Memory: VmRSS of the server process after loading (idle) and after the run, and its peak (VmHWM).
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.harness import SHARED_DATA, start_server
from tests.fixtures.tiny_ct2 import build_tiny_model

CT2_DECODE_TOKENS = 32
# (requests at batch 1, requests at batch 16) per backend.
ROUNDS = {"ctranslate2": (48, 6), "llm": (12, 2)}


def sentences(n: int) -> list[str]:
    """The first ``n`` English sentences of Tatoeba en-fr."""
    with (SHARED_DATA / "text" / "tatoeba-test.en-fr.tsv").open(encoding="utf-8", newline="") as f:
        return [r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]


def rss_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def run_batches(stub, texts: list[str], batch: int, requests: int) -> dict[str, float]:
    """Sends ``requests`` Translate calls of ``batch`` sentences one after another (after one warm-up)."""
    stub.Translate(
        translate_pb2.TranslateRequest(texts=texts[:batch], source_language="en", target_language="fr"),
        timeout=600,
    )
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        request = translate_pb2.TranslateRequest(texts=chunk, source_language="en", target_language="fr")
        t0 = time.perf_counter()
        response = stub.Translate(request, timeout=600)
        latencies.append(time.perf_counter() - t0)
        assert len(response.translations) == batch
    total_s = time.perf_counter() - started
    latencies.sort()
    return {
        "sent_per_s": batch * requests / total_s,
        "p50_ms": statistics.median(latencies) * 1000,
        "p90_ms": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))] * 1000,
    }


def bench(name: str, flags: list[str], texts: list[str]) -> dict[str, object]:
    started = time.perf_counter()
    server = start_server("translate", *flags, timeout_s=300)
    load_s = time.perf_counter() - started
    try:
        idle = rss_mib(server.process.pid)
        b1_requests, b16_requests = ROUNDS[name]
        with grpc.insecure_channel(server.address) as channel:
            stub = translate_pb2_grpc.TranslationStub(channel)
            b1 = run_batches(stub, texts, 1, b1_requests)
            b16 = run_batches(stub, texts, 16, b16_requests)
        after = rss_mib(server.process.pid)
    finally:
        server.terminate()
    return {"load_s": load_s, "idle": idle, "after": after, "b1": b1, "b16": b16}


def main() -> None:
    text_dir = SHARED_DATA / "text"
    if not text_dir.is_dir():
        print(f"skipped: {text_dir} is missing")
        return
    texts = sentences(200)
    results = {}
    with tempfile.TemporaryDirectory(prefix="parley-bench-translate-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny-nllb", text_dir, "nllb")
        results["ctranslate2 (tiny random model)"] = bench(
            "ctranslate2",
            [
                "--backend=ctranslate2",
                f"--model-path={model_dir}",
                f"--max-decoding-length={CT2_DECODE_TOKENS}",
                "--beam-size=1",
            ],
            texts,
        )
    results["llm embedded (gemma-3-270m Q4_K_M)"] = bench("llm", ["--backend=llm"], texts)

    print("Tatoeba en->fr sentences, sequential requests, one server process each; ct2 decodes")
    print(f"{CT2_DECODE_TOKENS} tokens per sentence (EOS suppressed), the llm stops at its line break.\n")
    header = (
        f"{'backend':36} {'load s':>7} {'b1 sent/s':>10} {'b1 p50 ms':>10} {'b1 p90 ms':>10} "
        f"{'b16 sent/s':>11} {'b16 p50 ms':>11} {'RSS idle MiB':>13} {'RSS after':>10} {'peak':>8}"
    )
    print(header)
    for name, r in results.items():
        b1, b16, idle, after = r["b1"], r["b16"], r["idle"], r["after"]
        print(
            f"{name:36} {r['load_s']:7.1f} {b1['sent_per_s']:10.2f} {b1['p50_ms']:10.1f} "
            f"{b1['p90_ms']:10.1f} "
            f"{b16['sent_per_s']:11.2f} {b16['p50_ms']:11.1f} {idle['VmRSS']:13.0f} {after['VmRSS']:10.0f} "
            f"{after['VmHWM']:8.0f}"
        )


if __name__ == "__main__":
    main()

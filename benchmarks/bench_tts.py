"""Text-to-speech: real-time factor and time to first chunk for Piper (en) and espeak-ng (fr, tr), the
cache-hit latency, and the server's resident memory.

Starts ``python -m services.tts`` as a process (CPU, default config) and calls it over gRPC on loopback:
- RTF: unary Synthesize wall time / audio duration, per FLEURS reference sentence (en with Piper; fr with
  espeak-ng; tr, the FLEURS Turkish translations, with espeak-ng), each text synthesized once (cache misses).
- Time to first chunk: SynthesizeStream of a four-sentence paragraph, time to its first response, versus
  the unary Synthesize of the same paragraph.
- Cache hit: a repeated Synthesize, median over 20 calls.
- VmRSS of the server process (``/proc/<pid>/status``) after the runs.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import grpc

from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from services.harness import start_server

FLEURS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "fleurs"
PARAGRAPHS = {
    "en": "The train leaves at eight. Please be on the platform ten minutes early. "
    "Tickets can be bought at the machine near the entrance. Have a pleasant journey.",
    "fr": "Le train part à huit heures. Soyez sur le quai dix minutes avant. "
    "Les billets sont en vente au distributeur près de l'entrée. Bon voyage.",
    "tr": "Tren saat sekizde kalkıyor. Lütfen on dakika önce peronda olun. "
    "Biletler girişteki makineden alınabilir. İyi yolculuklar.",
}


def _texts() -> dict[str, list[str]]:
    with (FLEURS / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {
        "en": [r["reference_text"] for r in rows if r["language"] == "en"],
        "fr": [r["reference_text"] for r in rows if r["language"] == "fr"],
        "tr": [r["translation_tr"] for r in rows if r["language"] == "en"],
    }


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    started = time.perf_counter()
    server = start_server("tts")
    ready_s = time.perf_counter() - started
    print(
        f"server ready in {ready_s:.1f} s (load + warm-up), VmRSS {_vm_rss_mib(server.process.pid):.0f} MiB"
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = tts_pb2_grpc.SpeechSynthesisStub(channel)
            header = f"{'language':<9}{'voice':<19}{'texts':>6}{'audio s':>9}{'RTF':>7}"
            print(header + f"{'TTFC ms':>9}{'unary ms':>10}")
            for language, texts in _texts().items():
                wall, audio, voice = 0.0, 0.0, ""
                for text in texts:
                    t0 = time.perf_counter()
                    response = stub.Synthesize(tts_pb2.SynthesizeRequest(text=text, language=language))
                    wall += time.perf_counter() - t0
                    audio += response.duration_s
                    voice = response.voice
                paragraph = PARAGRAPHS[language]
                t0 = time.perf_counter()
                first_s = None
                for _ in stub.SynthesizeStream(tts_pb2.SynthesizeRequest(text=paragraph, language=language)):
                    first_s = first_s if first_s is not None else time.perf_counter() - t0
                t0 = time.perf_counter()
                stub.Synthesize(tts_pb2.SynthesizeRequest(text=paragraph, language=language))
                unary_s = time.perf_counter() - t0
                print(
                    f"{language:<9}{voice:<19}{len(texts):>6}{audio:>9.1f}{wall / audio:>7.3f}"
                    f"{first_s * 1000:>9.0f}{unary_s * 1000:>10.0f}"
                )
            request = tts_pb2.SynthesizeRequest(text=PARAGRAPHS["en"], language="en")
            stub.Synthesize(request)
            hits = []
            for _ in range(20):
                t0 = time.perf_counter()
                stub.Synthesize(request)
                hits.append(time.perf_counter() - t0)
            median_ms, max_ms = statistics.median(hits) * 1000, max(hits) * 1000
            print(
                f"cache hit (en paragraph, {len(hits)} calls): median {median_ms:.2f} ms, max {max_ms:.2f} ms"
            )
            print(f"server VmRSS after the runs: {_vm_rss_mib(server.process.pid):.0f} MiB")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()

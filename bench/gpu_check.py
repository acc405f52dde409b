"""Pieces of `bench/gpu.sh run check` that are Python: Voxtral's single path (one reply,
the path engine.mode = "single", long prompts and transcription take), and the summary
of the check's `voice-agent say` runs.

    python3 bench/gpu_check.py voxtral-single [SOURCE]   one reply, JSON on stdout
    python3 bench/gpu_check.py summary OUT_DIR           the side-by-side table, JSON on stdout

SOURCE defaults to random:voxtral-mini (Voxtral Mini's architecture, random weights made
on the device); on a CPU the tiny profile's checkpoint checks the script itself.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAY_RUNS = ("graphs", "eager", "single")  # say_<name>.json / say_<name>.log in OUT_DIR
GRAPH_LINES = re.compile(r"captured \d+ decode graphs.*|decode graphs match.*|CUDA graphs cannot be used.*")


def voxtral_single(source: str) -> dict:
    import numpy as np
    import torch

    from agent.models.memory import resolve_device, resolve_dtype
    from agent.models.tiny import load_voxtral, resolve_source
    from agent.models.voxtral import ReplyParams

    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    t0 = time.perf_counter()
    model = load_voxtral(resolve_source(source, "voxtral"), device, dtype)
    loaded = time.perf_counter() - t0
    tone = (0.3 * np.sin(2 * np.pi * 220.0 * np.arange(32000) / 16000)).astype(np.float32)  # 2 s
    stream = model.reply_stream(tone, [], "Answer in one sentence.", ReplyParams(max_new_tokens=12), seed=0)
    t0 = time.perf_counter()
    first = None
    while stream.step() is not None:
        first = first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"voxtral_single": {"source": source, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                               "load_s": round(loaded, 2), "tokens": len(stream.token_ids),
                               "first_token_ms": round(1000 * (first or 0), 1), "seconds": round(elapsed, 3)}}


def summary(out: Path) -> dict:
    """say's metrics with graphs on, off and on the single path, and the engine's log
    lines about its graphs; `ok` is False when a run is missing or failed."""
    result: dict = {"say": {}, "ok": True}
    for name in SAY_RUNS:
        report, log = out / f"say_{name}.json", out / f"say_{name}.log"
        try:
            metrics = json.loads(report.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            result["say"][name] = {"error": "no JSON report (see the log)"}
            result["ok"] = False
            continue
        row = {k: metrics.get(k) for k in ("rtf", "tokens", "tokens_per_s", "ttfa_ms", "audio_s")}
        text = log.read_text(errors="replace") if log.exists() else ""
        row["graph_log"] = GRAPH_LINES.findall(text)
        result["say"][name] = row
    rows = result["say"]
    if all("rtf" in rows.get(n, {}) and rows[n]["rtf"] for n in ("graphs", "eager")):
        result["eager_rtf_over_graphs_rtf"] = round(rows["eager"]["rtf"] / rows["graphs"]["rtf"], 2)
    return result


def main(argv: list[str]) -> int:
    if argv[:1] == ["voxtral-single"]:
        print(json.dumps(voxtral_single(argv[1] if len(argv) > 1 else "random:voxtral-mini")))
        return 0
    if argv[:1] == ["summary"] and len(argv) == 2:
        result = summary(Path(argv[1]))
        print(json.dumps(result))
        for name, row in result["say"].items():
            print(f"say {name:7} " + ("  ".join(f"{k}={v}" for k, v in row.items() if k != "graph_log")),
                  file=sys.stderr)
            for line in row.get("graph_log", []):
                print(f"          {line}", file=sys.stderr)
        return 0 if result["ok"] else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

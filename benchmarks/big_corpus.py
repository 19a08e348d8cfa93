"""Corpora larger than memory: peak memory and seconds to the first step of `rnnkit train`, cold and warm.

For each corpus size (default 0.25 / 0.5 / 1 / 2 GB) a text is built in a
temporary folder (the texts of ../shared/corpora repeated, else synthetic
words), and for each level (char, word, BPE) `rnnkit train` runs as a
subprocess with a tiny model for one step: first with an empty run folder
(cold: both passes over the text), then three times on the same run folder
(warm: the cached ids are mapped; the median is reported, each run listed).
The corpus is synced to disk before the first run, so the kernel's writeback
of it is not timed. While it runs, /proc/PID/status is polled for
``RssAnon`` (memory the process itself holds: the ids' memory map is file
pages, which belong to the page cache) and ``VmRSS``. Seconds to the first step
are counted from the launch to the reporter's ``step 1`` line. Last,
`rnnkit eval --text` runs on the largest corpus up to 1 GB with the char
checkpoint: the whole text is streamed into a memory-mapped ids file and the
model scores its first ``--eval-tokens`` tokens (the model's time is not the
data's).

Targets (2 cores): peak RssAnon < 1.0 GB at every size and flat as the corpus
grows; cold char <= 25 s per GB, word and BPE <= 60 s per GB; warm <= 3 s.

    .venv/bin/python benchmarks/big_corpus.py            # ~15-30 min on 2 cores, ~3.8 GB of disk at most
    .venv/bin/python benchmarks/big_corpus.py --quick    # a few MB: a smoke test

One JSON object on stdout; progress on stderr. The corpora are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_average, log  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
GB = 1 << 30
TARGETS = {"anon_gb": 1.0, "cold_s_per_gb": {"char": 25.0, "word": 60.0, "bpe": 60.0}, "warm_s": 3.0}
TINY = ["--hidden", "16", "--layers", "1", "--seq-len", "32", "--batch-size", "8", "--max-steps", "1",
        "--log-every", "1", "--eval-every", "1000", "--eval-max-tokens", "1000", "--sample-length", "5"]
LEVEL_FLAGS = {"char": [], "word": ["--max-vocab", "20000"], "bpe": ["--vocab-size", "2000"]}


def rnnkit_command() -> list[str]:
    exe = Path(sys.executable).with_name("rnnkit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "rnnkit"]


def source_block() -> tuple[bytes, str]:
    """The text that is repeated: ../shared/corpora's .txt files joined, or synthetic words."""
    texts = sorted(SHARED.glob("*.txt")) if SHARED.is_dir() else []
    if texts:
        return b"".join(p.read_bytes().rstrip(b"\n") + b"\n" for p in texts), "../shared/corpora/*.txt repeated"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    lines = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + rng.choice(".,;!?") for _ in range(50000))
    return ("\n".join(lines) + "\n").encode(), "synthetic words"


def write_corpus(path: Path, size: int, block: bytes) -> int:
    written = 0
    with open(path, "wb") as f:
        while written + len(block) <= size:
            f.write(block)
            written += len(block)
        rest = block[: size - written]
        rest = rest[: rest.rfind(b"\n") + 1]  # whole lines, so that no UTF-8 sequence is cut
        f.write(rest)
        written += len(rest)
        # On disk before any run is timed: otherwise the kernel writes the corpus back during the first run.
        f.flush()
        os.fsync(f.fileno())
    return written


def _status(pid: int) -> tuple[int, int] | None:
    """(RssAnon, VmRSS) in bytes, or None once the process is gone."""
    try:
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields.get("RssAnon", 0), fields.get("VmRSS", 0)
    except (OSError, ValueError):
        return None


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def measure(argv: list[str], *, env: dict[str, str], timeout: float, first_line: str) -> dict[str, Any]:
    """Run ``argv``, polling its memory; seconds to the first stderr line starting with ``first_line``.

    CPU seconds are reported beside wall-clock seconds: on a shared machine
    the wall clock also counts the time other processes held the cores.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(first_line) and "first" not in marks:
                marks["first"] = time.perf_counter() - start
                cpu = _cpu_seconds(proc.pid)
                if cpu is not None:
                    marks["first_cpu"] = cpu

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    peak_anon = peak_rss = 0
    status, usage = 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        got = _status(proc.pid)
        if got:
            peak_anon, peak_rss = max(peak_anon, got[0]), max(peak_rss, got[1])
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read() if proc.stdout else ""
    reader.join(timeout=5)
    total = time.perf_counter() - start
    passes = [line for line in lines if line.startswith(("pass ", "checking", "encoding"))]
    result = {"rc": proc.returncode, "seconds_total": round(total, 2),
              "seconds_to_first_step": round(marks["first"], 2) if "first" in marks else None,
              "cpu_seconds_to_first_step": round(marks["first_cpu"], 2) if "first_cpu" in marks else None,
              "cpu_seconds_total": round(usage.ru_utime + usage.ru_stime, 2) if usage else None,
              "peak_rss_anon_mb": round(peak_anon / 2**20, 1), "peak_rss_mb": round(peak_rss / 2**20, 1),
              "passes": passes}
    if proc.returncode != 0:
        result["stderr_tail"] = lines[-5:]
    result["stdout"] = stdout.strip()[-300:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="corpus sizes in GB, comma-separated (default 0.25,0.5,1,2; quick: tiny)")
    parser.add_argument("--levels", default="char,word,bpe", help="tokenization levels (default: char,word,bpe)")
    parser.add_argument("--eval-gb", type=float, default=None, help="size of the eval text in GB (default 1; 0: skip)")
    parser.add_argument("--eval-tokens", type=int, default=100_000,
                        help="tokens the model scores in the eval run (the whole text is still encoded; default 100k)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the trained model (default 2)")
    parser.add_argument("--dir", help="where to build the corpora (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per command before it is killed")
    parser.add_argument("--warm-runs", type=int, default=3,
                        help="warm starts per corpus and level; the median is reported (default 3)")
    args = parser.parse_args()
    sizes_gb = [float(s) for s in (args.sizes or ("0.004" if args.quick else "0.25,0.5,1,2")).split(",")]
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    eval_gb = args.eval_gb if args.eval_gb is not None else (0.004 if args.quick else 1.0)
    block, origin = source_block()
    base = Path(tempfile.mkdtemp(prefix="rnnkit-big-corpus-", dir=args.dir))
    env = {**os.environ, "RNNKIT_CACHE": str(base / "cache"), "PYTHONUNBUFFERED": "1"}
    rows: list[dict[str, Any]] = []
    evaluation: dict[str, Any] | None = None
    try:
        eval_done = False
        for size_gb in sizes_gb:
            corpus = base / f"corpus-{size_gb:g}gb.txt"
            size = write_corpus(corpus, int(size_gb * GB), block)
            log(f"{corpus.name}: {size / 1e6:,.0f} MB ({origin})")
            # A file modified within 2 s of being hashed is checked by its bytes on every warm start
            # (its mtime cannot be trusted yet); a corpus is normally older than that.
            time.sleep(2.5)
            for level in levels:
                run = base / f"run-{level}-{size_gb:g}"
                argv = [*rnnkit_command(), "train", "--text", str(corpus), "--out", str(run), "--level", level,
                        "--threads", str(args.threads), *TINY, *LEVEL_FLAGS.get(level, [])]
                cold = measure(argv, env=env, timeout=args.timeout, first_line="step 1 ")
                warms = [measure([*argv, "--overwrite"], env=env, timeout=args.timeout, first_line="step 1 ")
                         for _ in range(args.warm_runs)]
                # The median warm run: a start-up of 2-3 s is as long as the host's hiccups.
                order = sorted(range(len(warms)), key=lambda k: warms[k]["seconds_to_first_step"] or 1e9)
                warm = dict(warms[order[len(order) // 2]])
                warm["seconds_to_first_step_each"] = [w["seconds_to_first_step"] for w in warms]
                warm["peak_rss_anon_mb"] = max(w["peak_rss_anon_mb"] for w in warms)
                warm["rc"] = max((w["rc"] for w in warms), key=abs)
                row = {"size_gb": round(size / GB, 3), "bytes": size, "level": level, "cold": cold, "warm": warm}
                if cold["seconds_to_first_step"] is not None:
                    row["cold_s_per_gb"] = round(cold["seconds_to_first_step"] / (size / GB), 1)
                rows.append(row)
                log(f"  {level}: cold {cold['seconds_to_first_step']} s, anon {cold['peak_rss_anon_mb']} MB, "
                    f"rss {cold['peak_rss_mb']} MB; warm {warm['seconds_to_first_step_each']} s, "
                    f"anon {warm['peak_rss_anon_mb']} MB")
                if level == "char" and not eval_done and eval_gb and size >= eval_gb * GB * 0.99 and cold["rc"] == 0:
                    evaluation = measure([*rnnkit_command(), "eval", "--checkpoint", str(run), "--text", str(corpus),
                                          "--json", "--threads", str(args.threads), "--batch-size", "64",
                                          "--seq-len", "64", "--max-tokens", str(args.eval_tokens)],
                                         env=env, timeout=args.timeout, first_line="encoding evaluation text:")
                    evaluation["size_gb"] = round(size / GB, 3)
                    eval_done = True
                    log(f"  eval --text: {evaluation['seconds_total']} s, anon {evaluation['peak_rss_anon_mb']} MB")
                shutil.rmtree(run, ignore_errors=True)
            corpus.unlink()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    ok = [r for r in rows if r["cold"]["rc"] == 0 and r["warm"]["rc"] == 0]
    anon = [max(r["cold"]["peak_rss_anon_mb"], r["warm"]["peak_rss_anon_mb"]) for r in ok]
    meets = {
        "anon_below_1gb": bool(ok) and all(a < TARGETS["anon_gb"] * 1024 for a in anon),
        "cold_s_per_gb": bool(ok) and all(r.get("cold_s_per_gb", 1e9) <= TARGETS["cold_s_per_gb"].get(r["level"], 60)
                                          for r in ok),
        "warm_s": bool(ok) and all((r["warm"]["seconds_to_first_step"] or 1e9) <= TARGETS["warm_s"] for r in ok),
        "all_runs_succeeded": len(ok) == len(rows),
    }
    emit({"corpus": origin, "sizes_gb": sizes_gb, "levels": levels, "threads": args.threads,
          "cpu_count": os.cpu_count(), "load_average_at_end": load_average(), "targets": TARGETS,
          "meets_target": meets, "max_peak_rss_anon_mb": max(anon) if anon else None, "rows": rows,
          "eval": evaluation})


if __name__ == "__main__":
    main()

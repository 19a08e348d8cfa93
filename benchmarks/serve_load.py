"""Load on `rnnkit serve`: concurrent clients on loopback, and what a session continuation costs as history grows.

* The checkpoint: a char-level LSTM with random weights (the work per token
  does not depend on the weights), written to a temporary folder.
* The server: ``python -m rnnkit serve --port 0`` in a subprocess, loaded once.
* Load: ``--clients`` threads, each with one keep-alive connection, send
  ``--requests`` requests in all: ``POST /generate`` (a 40-character prime,
  ``--length`` new tokens, temperature 0.8, a seed per request), every fourth
  one as ``POST /generate/stream`` read to its ``done`` event. Latency is
  measured per request on the client; an error is any status but 200, a
  broken connection or a stream without its ``done`` event.
* Memory: the server's resident set size (``/proc/PID/status``) after start-up,
  after a warm-up of ``--warmup`` requests, and after the load. The growth
  target compares the end with the warm-up (allocator pools and kernel
  caches are filled by the first requests and then reused).
* Sessions: for each history length, a session is fed that many tokens, then
  continued ``--continuations`` times by ``--session-length`` tokens
  (``POST /sessions/{id}/generate``); next to it, the stateless way, a
  ``POST /generate`` whose prime is the whole history (re-read every time).

Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python benchmarks/serve_load.py            # full run (~1.5-2 min on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --quick    # smoke run (~10 s)
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import string
import tempfile
import threading
from pathlib import Path

import _common as common

from rnnkit.checkpoint import write_checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.models.language_model import LanguageModel

TARGET_RSS_GROWTH_PCT = 10.0
ALPHABET = string.ascii_letters + string.digits + " .,;:!?'-\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few requests: a smoke run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server worker")
    p.add_argument("--workers", type=int, default=2, help="server worker threads (rnnkit serve --workers)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 32; quick 4)")
    p.add_argument("--requests", type=int, default=None, help="requests in all (default 2000; quick 80)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests before the load (default 100; quick 8)")
    p.add_argument("--length", type=int, default=None, help="tokens per request (default 50; quick 10)")
    p.add_argument("--hidden", type=int, default=None, help="hidden units per layer (default 256; quick 64)")
    p.add_argument("--layers", type=int, default=None, help="stacked LSTM layers (default 2; quick 1)")
    p.add_argument("--histories", type=int, nargs="+", default=None,
                   help="session history lengths in tokens (default 100 1000 10000 50000; quick 100 1000)")
    p.add_argument("--session-length", type=int, default=20, help="tokens per session continuation")
    p.add_argument("--continuations", type=int, default=None,
                   help="timed continuations per history length (default 20; quick 3)")
    p.add_argument("--reprime-repeats", type=int, default=None,
                   help="timed whole-history /generate calls per history length (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, text and sampling")
    args = p.parse_args(argv)
    defaults = {"clients": (32, 4), "requests": (2000, 80), "warmup": (100, 8), "length": (50, 10),
                "hidden": (256, 64), "layers": (2, 1), "histories": ([100, 1000, 10_000, 50_000], [100, 1000]),
                "continuations": (20, 3), "reprime_repeats": (3, 1)}  # (full, quick)
    return common.fill_defaults(args, defaults)


def build_checkpoint(folder: Path, *, hidden: int, layers: int) -> Path:
    config = RunConfig()
    config.model.hidden, config.model.layers = hidden, layers
    tokenizer = CharTokenizer(chars=sorted(ALPHABET))
    model = LanguageModel(config=config.model, vocab_size=tokenizer.vocab_size)
    return write_checkpoint(folder / "checkpoint", model=model, tokenizer=tokenizer, task="language_model",
                            run_config=config, state={"step": 0, "default_prime": "\n"})


class Server(common.ServeProcess):
    """One checkpoint, with the limits the load needs."""

    def __init__(self, checkpoint: Path, *, workers: int, threads: int, max_request_bytes: int, clients: int) -> None:
        # Every client here shares one address: the per-client limit must leave room for all of them.
        super().__init__(["--checkpoint", str(checkpoint), "--workers", str(workers), "--threads", str(threads),
                          "--log-level", "warning", "--max-request-bytes", str(max_request_bytes),
                          "--max-length", "1000", "--max-client-requests", str(clients)], name="serve_load")


class Client(common.KeepAliveClient):
    """One keep-alive connection; a failed request is status 0."""

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        return self.send("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def post_json(self, path: str, body: dict) -> dict:
        status, data = self.post(path, body)
        if status not in (200, 201):
            raise SystemExit(f"serve_load: {path} answered {status}: {data[:300]!r}")
        return json.loads(data)


def jobs(n: int, *, text: str, length: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(len(text) - 40)
        body = {"prime": text[start:start + 40], "length": length, "temperature": 0.8, "seed": seed + i}
        out.append(("/generate/stream" if i % 4 == 3 else "/generate", body))
    return out


def run_load(port: int, work: list[tuple[str, dict]], clients: int) -> tuple[list[float], list[int], float]:
    """Send every job from ``clients`` threads; latencies (ms), statuses (0: error) and wall seconds."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for job in work:
        todo.put(job)
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client_loop() -> None:
        client = Client(port)
        while True:
            try:
                path, body = todo.get_nowait()
            except queue.Empty:
                return
            t0 = common.now()
            status, data = client.post(path, body)
            ms = (common.now() - t0) * 1000
            complete = b"event: done" in data if path.endswith("stream") else b'"texts"' in data
            with lock:
                latencies.append(ms)
                statuses.append(status if complete else 0)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = common.now()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, common.now() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 2)


def session_costs(port: int, args: argparse.Namespace, text: str, chunk: int) -> dict:
    """Per history length: the median milliseconds of a session continuation and of re-reading the history."""
    client = Client(port)
    rows = []
    for history in args.histories:
        body = (text * (history // len(text) + 1))[:history]
        sid = client.post_json("/sessions", {})["id"]
        for start in range(0, history, chunk):  # feeds stay under the request size limit
            client.post_json(f"/sessions/{sid}/feed", {"text": body[start:start + chunk]})
        sampling = {"length": args.session_length, "temperature": 0.8}
        times = []
        for i in range(args.continuations):
            t0 = common.now()
            client.post_json(f"/sessions/{sid}/generate", {**sampling, "seed": i})
            times.append((common.now() - t0) * 1000)
        reprime = []
        for i in range(args.reprime_repeats):
            t0 = common.now()
            client.post_json("/generate", {**sampling, "prime": body, "seed": i})
            reprime.append((common.now() - t0) * 1000)
        client.conn.request("DELETE", f"/sessions/{sid}")
        client.conn.getresponse().read()
        rows.append({"history_tokens": history, "session_ms": round(common.median(times), 2),
                     "reprime_ms": round(common.median(reprime), 2)})
        common.log(f"  history {history:>6,} tokens: continuation {rows[-1]['session_ms']:.1f} ms, "
                   f"re-reading the history {rows[-1]['reprime_ms']:.1f} ms")
    session = [r["session_ms"] for r in rows]
    return {"tokens_per_continuation": args.session_length, "per_history": rows,
            "session_ms_longest_over_shortest": round(session[-1] / session[0], 2),
            "reprime_ms_longest_over_shortest": round(rows[-1]["reprime_ms"] / rows[0]["reprime_ms"], 2)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    text = "".join(random.Random(args.seed).choice(ALPHABET) for _ in range(5000))
    chunk = 60_000  # characters per feed; the server is started with room for them
    with tempfile.TemporaryDirectory(prefix="rnnkit-serve-load-") as tmp:
        checkpoint = build_checkpoint(Path(tmp), hidden=args.hidden, layers=args.layers)
        common.log(f"serve_load: {args.layers}x{args.hidden} LSTM, {args.workers} workers x {args.threads} "
                   f"threads; {args.clients} clients, {args.requests} requests of {args.length} tokens")
        # Room for a feed of `chunk` characters even if each were sent \u-escaped (the schema's string limits).
        server = Server(checkpoint, workers=args.workers, threads=args.threads, max_request_bytes=12 * chunk + 1024,
                        clients=args.clients)
        try:
            rss_start = server.rss_mib()
            run_load(server.port, jobs(args.warmup, text=text, length=args.length, seed=10**6), args.clients)
            rss_warm = server.rss_mib()
            load_before = common.load_average()
            latencies, statuses, seconds = run_load(
                server.port, jobs(args.requests, text=text, length=args.length, seed=args.seed), args.clients)
            rss_end = server.rss_mib()
            errors = sum(1 for s in statuses if s != 200)
            common.log(f"  load: {len(latencies) / seconds:.1f} requests/s, p50 {percentile(latencies, 50)} ms, "
                       f"p99 {percentile(latencies, 99)} ms, errors {errors}")
            sessions = session_costs(server.port, args, text, chunk)
            rss_after_sessions = server.rss_mib()
        finally:
            server.stop()
    growth = round(100 * (rss_end - rss_warm) / rss_warm, 2) if rss_warm else None
    common.emit({
        "benchmark": "serve_load",
        "quick": args.quick,
        **common.environment(args.threads),
        "server": {"workers": args.workers, "threads_per_worker": args.threads, "cell": "lstm",
                   "layers": args.layers, "hidden": args.hidden, "vocab": len(ALPHABET)},
        "clients": args.clients,
        "requests": len(latencies),
        "tokens_per_request": args.length,
        "stream_share": 0.25,
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": percentile(latencies, 100),
        "errors": errors,
        "server_tracebacks": sum("Traceback" in line for line in server.log),
        "server_rss_mib": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end,
                           "after_sessions": rss_after_sessions},
        "rss_growth_pct": growth,
        "rss_growth_from_start_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start else None,
        "target_rss_growth_pct": TARGET_RSS_GROWTH_PCT,
        "meets_target": bool(errors == 0 and growth is not None and growth < TARGET_RSS_GROWTH_PCT),
        "session_continuation": sessions,
        "load_average_before_after": [load_before, common.load_average()],
    })


if __name__ == "__main__":
    main()

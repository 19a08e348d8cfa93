"""Soak `rnnkit serve`: minutes of mixed traffic on loopback; no 5xx, no surprise statuses, memory that stays put.

* The server: ``python -m rnnkit serve`` in a subprocess with two models of
  random weights (a 1x128 char LSTM language model ``lm`` and a 1x64 word GRU
  classifier ``cls``), two API keys from a key file, at most ``--max-sessions``
  sessions, on a free port of 127.0.0.1.
* The traffic: ``--clients`` threads, each with its own keep-alive connection
  and its own seeded random stream, send requests until ``--seconds`` have
  passed (or ``--max-requests`` each, whichever comes first). Each request is
  one of: ``/generate`` (1-3 samples), ``/generate/stream`` read to its
  ``done`` event, a session's life (create with text, feed, continue, look
  up, and nine times in ten delete: the others are left for the server to
  evict), ``/classify`` (1-8 texts), a bad request (malformed JSON,
  out-of-range or unknown fields, an unknown model or session: each must get
  its 4xx), a wrong or missing key (401), ``/health``.
* Counted: every request's status and client-side latency; ``server_errors``
  are 5xx answers, ``unexpected`` any answer but the one expected for the
  kind (a broken connection or a stream without ``done`` included).
* Memory: the server's resident set size after start-up, after the warm-up
  (the first ``--warmup`` seconds of traffic: allocator pools and caches fill
  then), every ``--sample-every`` seconds, and at the end. ``rss_drift_pct``
  compares the end with the warm-up (target < 5%); ``rss_drift_from_start_pct``
  compares it with the idle server.

Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python benchmarks/serve_soak.py            # 10 minutes
    .venv/bin/python benchmarks/serve_soak.py --quick    # 20 s smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import _common as common
import torch

from rnnkit.checkpoint import write_checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import CharTokenizer, WordTokenizer
from rnnkit.models.classifier import Classifier
from rnnkit.models.language_model import LanguageModel

TARGET_RSS_DRIFT_PCT = 5.0
ALPHABET = string.ascii_letters + string.digits + " .,;:!?'-\n"
WORDS = tuple("a good film great acting dull plot bad script fine score slow start strong end the and but "
              "not very".split())
KEYS = ["soak-key-one-0123456789abcdef", "soak-key-two-0123456789abcdef"]
# The mix, by weight: what each kind of request is and the statuses it must get.
MIX = {"generate": 20, "stream": 15, "session": 15, "classify": 20, "bad": 15, "wrong_key": 10, "health": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 s, 4 clients: a smoke run")
    p.add_argument("--seconds", type=float, default=None, help="traffic duration (default 600; quick 20)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of traffic before the warm RSS (default 60; quick 5)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 8; quick 4)")
    p.add_argument("--max-requests", type=int, default=200_000, help="most requests per client (a bound on the loop)")
    p.add_argument("--sample-every", type=float, default=None, help="seconds between RSS samples (default 30; quick 5)")
    p.add_argument("--max-sessions", type=int, default=64, help="the server's --max-sessions")
    p.add_argument("--workers", type=int, default=2, help="server worker threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server worker")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and traffic")
    args = p.parse_args(argv)
    defaults = {"seconds": (600.0, 20.0), "warmup": (60.0, 5.0), "clients": (8, 4), "sample_every": (30.0, 5.0)}
    return common.fill_defaults(args, defaults)


def build_checkpoints(folder: Path, seed: int) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    config = RunConfig()
    config.model.hidden, config.model.layers = 128, 1
    tok = CharTokenizer(chars=sorted(ALPHABET))
    lm = write_checkpoint(folder / "lm", model=LanguageModel(config=config.model, vocab_size=tok.vocab_size),
                          tokenizer=tok, task="language_model", run_config=config,
                          state={"step": 0, "default_prime": "\n"})
    config = RunConfig(task="classify")
    config.data.level = "word"
    config.model.cell, config.model.hidden, config.model.layers = "gru", 64, 1
    words = WordTokenizer.fit(" ".join(WORDS))
    model = Classifier(config=config.model, vocab_size=words.vocab_size, num_classes=2)
    cls = write_checkpoint(folder / "cls", model=model, tokenizer=words, task="classify", run_config=config,
                           state={"step": 0}, extra={"labels": ["neg", "pos"]})
    return lm, cls


class Server(common.ServeProcess):
    """The two models behind keys, with room for every client's requests at once."""

    def __init__(self, lm: Path, cls: Path, keyfile: Path, args: argparse.Namespace) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RNNKIT_API_KEY"}
        super().__init__(["--checkpoint", f"lm={lm}", "--checkpoint", f"cls={cls}", "--api-key-file", str(keyfile),
                          "--workers", str(args.workers), "--threads", str(args.threads), "--log-level", "warning",
                          "--max-length", "200", "--max-sessions", str(args.max_sessions),
                          "--max-client-requests", str(2 * args.clients)], name="serve_soak", env=env)


class Client(common.KeepAliveClient):
    """One keep-alive connection that sends a key (or a given wrong one, or none); a failure is status 0."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(port, timeout=120)
        self.key = key

    def call(self, method: str, path: str, body: object = None, *, raw: bytes | None = None,
             key: str | None = "") -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        key = self.key if key == "" else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        return self.send(method, path, data, headers)


class Tally:
    """Statuses and latencies of every request, by kind (shared by the client threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {kind: [] for kind in MIX}
        self.statuses: Counter = Counter()
        self.unexpected: Counter = Counter()
        self.examples: list[str] = []
        self.crashes: list[str] = []

    def add(self, kind: str, status: int, ms: float, ok: bool, what: str) -> None:
        with self.lock:
            self.latencies[kind].append(ms)
            self.statuses[status] += 1
            if not ok:
                self.unexpected[kind] += 1
                if len(self.examples) < 10:
                    self.examples.append(f"{what}: {status}")


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS + ("zebra", "!")) for _ in range(rng.randint(1, 12)))


def one_request(client: Client, kind: str, rng: random.Random, tally: Tally) -> None:
    """Send one request (a session's life is several) and record each answer against what it must be."""

    def timed(what: str, method: str, path: str, body=None, *, expect=(200,), check=None, **kw) -> bytes:
        t0 = common.now()
        status, data = client.call(method, path, body, **kw)
        ms = (common.now() - t0) * 1000
        ok = status in expect and (check is None or check(data))
        tally.add(kind, status, ms, ok, what)
        return data if ok else b""

    if kind == "generate":
        body = {"prime": text(rng, rng.randint(0, 40)), "length": rng.randint(10, 60), "temperature": 0.8,
                "num_samples": rng.randint(1, 3), "seed": rng.randrange(2**31)}
        timed("generate", "POST", "/generate", body, check=lambda d: b'"texts"' in d)
    elif kind == "stream":
        body = {"prime": text(rng, rng.randint(1, 40)), "length": rng.randint(10, 60), "top_k": rng.choice([0, 5])}
        timed("stream", "POST", "/generate/stream", body, check=lambda d: b"event: done" in d)
    elif kind == "session":
        data = timed("session create", "POST", "/sessions", {"text": text(rng, rng.randint(0, 200))}, expect=(201,))
        if not data:
            return
        sid = json.loads(data)["id"]
        # Another client's new sessions may evict this one (LRU): 404 is then the right answer.
        timed("session feed", "POST", f"/sessions/{sid}/feed", {"text": text(rng, rng.randint(1, 300))},
              expect=(200, 404))
        timed("session generate", "POST", f"/sessions/{sid}/generate", {"length": rng.randint(5, 40)},
              expect=(200, 404))
        timed("session info", "GET", f"/sessions/{sid}", expect=(200, 404))
        if rng.random() < 0.9:  # the rest are left behind for the server to evict
            timed("session delete", "DELETE", f"/sessions/{sid}", expect=(204, 404))
    elif kind == "classify":
        body = {"texts": [sentence(rng) for _ in range(rng.randint(1, 8))], "model": "cls"}
        timed("classify", "POST", "/classify", body, check=lambda d: b'"results"' in d)
    elif kind == "bad":
        case = rng.randrange(6)
        if case == 0:
            timed("malformed JSON", "POST", "/generate", raw=b'{"length": 5', expect=(422,))
        elif case == 1:
            timed("length out of range", "POST", "/generate", {"length": 10_000}, expect=(422,))
        elif case == 2:
            timed("unknown field", "POST", "/classify", {"texts": ["a"], "lenght": 3}, expect=(422,))
        elif case == 3:
            timed("unknown model", "POST", "/generate", {"model": "cls"}, expect=(422,))
        elif case == 4:
            timed("unknown session", "POST", "/sessions/AAAAAAAAAAAAAAAA/feed", {"text": "a"}, expect=(404,))
        else:
            timed("wrong method", "PUT", "/generate", {}, expect=(405,))
    elif kind == "wrong_key":
        key = None if rng.random() < 0.5 else "not-a-key-" + text(rng, 16).replace("\n", "x").replace(" ", "x")
        timed("wrong key", "POST", "/generate", {"length": 5}, expect=(401,), key=key)
    else:
        timed("health", "GET", "/health", key=None)


def client_loop(port: int, index: int, args: argparse.Namespace, end: float, tally: Tally) -> None:
    rng = random.Random(args.seed * 1000 + index)
    client = Client(port, KEYS[index % len(KEYS)])
    kinds, weights = list(MIX), list(MIX.values())
    try:
        for _ in range(args.max_requests):
            if time.monotonic() >= end:
                break
            one_request(client, rng.choices(kinds, weights)[0], rng, tally)
    except Exception as exc:  # a bug here must not pass for a quiet client
        with tally.lock:
            tally.crashes.append(f"client {index}: {exc!r}")
        raise
    finally:
        client.conn.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="rnnkit-serve-soak-") as tmp:
        lm, cls = build_checkpoints(Path(tmp), args.seed)
        keyfile = Path(tmp) / "keys"
        keyfile.write_text("# soak keys\n" + "\n".join(KEYS) + "\n", encoding="utf-8")
        server = Server(lm, cls, keyfile, args)
        common.log(f"serve_soak: {args.seconds:g} s of mixed traffic from {args.clients} clients on port "
                   f"{server.port} ({args.workers} workers x {args.threads} threads)")
        try:
            rss_start = server.rss_mib()
            t0 = time.monotonic()
            end = t0 + args.seconds
            threads = [threading.Thread(target=client_loop, args=(server.port, i, args, end, tally))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            samples, rss_warm = [], None
            next_sample = t0 + args.warmup
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
                if time.monotonic() >= next_sample:
                    rss = server.rss_mib()
                    samples.append([round(time.monotonic() - t0, 1), rss])
                    rss_warm = rss if rss_warm is None else rss_warm
                    next_sample += args.sample_every
                    with tally.lock:
                        done = sum(len(v) for v in tally.latencies.values())
                    common.log(f"  {samples[-1][0]:>6.1f} s: {done:,} requests, RSS {rss} MiB")
            for t in threads:
                t.join()
            seconds = time.monotonic() - t0
            rss_end = server.rss_mib()
        finally:
            exit_code = server.stop()
    everything = [ms for values in tally.latencies.values() for ms in values]
    requests = len(everything)
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    unexpected = sum(tally.unexpected.values())
    drift = round(100 * (rss_end - rss_warm) / rss_warm, 2) if rss_warm and rss_end else None
    common.emit({
        "benchmark": "serve_soak",
        "quick": args.quick,
        **common.environment(args.threads),
        "server": {"models": {"lm": "char LSTM 1x128", "cls": "word GRU 1x64, 2 labels"}, "keys": len(KEYS),
                   "workers": args.workers, "threads_per_worker": args.threads, "max_sessions": args.max_sessions},
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "requests": requests,
        "requests_per_s": round(requests / seconds, 1),
        "by_kind": {kind: len(values) for kind, values in tally.latencies.items()},
        "statuses": {str(status): n for status, n in sorted(tally.statuses.items())},
        "server_errors": server_errors,
        "unexpected": unexpected,
        "unexpected_by_kind": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "p50_ms": percentile(everything, 50),
        "p99_ms": percentile(everything, 99),
        "latency_ms_by_kind": {kind: {"p50": percentile(v, 50), "p99": percentile(v, 99)}
                               for kind, v in tally.latencies.items()},
        "server_rss_mib": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end,
                           "max": max((r for _, r in samples if r), default=None)},
        "rss_samples": samples,
        "rss_drift_pct": drift,
        "rss_drift_from_start_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start else None,
        "target_rss_drift_pct": TARGET_RSS_DRIFT_PCT,
        "client_crashes": tally.crashes,
        "server_tracebacks": sum("Traceback" in line for line in server.log),
        "server_exit_code": exit_code,
        "meets_target": bool(server_errors == 0 and unexpected == 0 and not tally.crashes and drift is not None
                             and abs(drift) < TARGET_RSS_DRIFT_PCT and exit_code == 0),
        "load_average_end": common.load_average(),
    })


if __name__ == "__main__":
    main()

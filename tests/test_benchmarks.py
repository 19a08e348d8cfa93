"""The benchmark scripts still run: each --quick run prints one JSON object with its headline keys.

Their figures are not asserted (speed is measured, never tested); only that the scripts work.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = {
    "train_throughput.py": {"rnnkit_tokens_per_s", "baseline_tokens_per_s", "ratio"},
    "generate_throughput.py": {"stateful_chars_per_s", "refeed_chars_per_s", "speedup", "batched64_chars_per_s"},
    "scratch_vs_fused.py": {"ratio"},
    "crash_resume.py": {"kills", "resumes", "steps"},
    "export_step.py": {"rnnkit_step_chars_per_s", "onnx_step_chars_per_s", "onnx_step_int8_chars_per_s",
                       "float32_loss", "int8_loss"},
    "ddp_scaling.py": {"one_process_two_threads_tokens_per_s", "two_processes_one_thread_tokens_per_s",
                       "ratio_two_processes_vs_one"},
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_quick_run_prints_json(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert CASES[script] <= set(result)
    assert all(result[key] > 0 for key in CASES[script])


@pytest.mark.slow
def test_adaptive_softmax_benchmark_runs_on_synthetic_words():
    proc = subprocess.run([sys.executable, str(BENCH / "adaptive_softmax.py"), "--quick", "--synthetic", "--threads",
                           "1", "--seconds", "2", "--hidden", "32", "--batch", "8", "--eval-tokens", "500"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["vocab_size"] > 10_000 and result["ratio"] > 0
    for side in ("full", "adaptive"):
        assert result[side]["steps"] > 0 and result[side]["held_out_perplexity"] > 1
    assert result["adaptive"]["head_parameters"] < result["full"]["head_parameters"]


@pytest.mark.slow
def test_sentiment_benchmark_quick_run(shared_corpora):
    proc = subprocess.run([sys.executable, str(BENCH / "sentiment.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    for name in ("classic", "best"):
        assert 0 <= result[name]["test_accuracy"] <= 1 and result[name]["seconds"] > 0


@pytest.mark.slow
def test_serve_load_quick_run_answers_every_request():
    """The load script drives a real `rnnkit serve`: every request must succeed (the speed is not tested)."""
    pytest.importorskip("fastapi", reason="the serve benchmark needs the serve extra")
    proc = subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["requests"] == 80 and result["errors"] == 0 and result["server_tracebacks"] == 0
    assert all(result[key] > 0 for key in ("requests_per_s", "p50_ms", "p99_ms"))
    rows = result["session_continuation"]["per_history"]
    assert [r["history_tokens"] for r in rows] == [100, 1000] and all(r["session_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_serve_soak_quick_run_gets_only_the_answers_it_expects():
    """The soak script's mixed traffic (good, bad, unauthenticated) on a real server: no 5xx, no surprise status."""
    pytest.importorskip("fastapi", reason="the serve benchmark needs the serve extra")
    proc = subprocess.run([sys.executable, str(BENCH / "serve_soak.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["server_errors"] == 0 and result["unexpected"] == 0, result["unexpected_examples"]
    assert result["client_crashes"] == [] and result["server_tracebacks"] == 0 and result["server_exit_code"] == 0
    assert all(n > 0 for n in result["by_kind"].values()) and result["statuses"]["401"] > 0
    assert all(result["server_rss_mib"][key] > 0 for key in ("start", "after_warmup", "end"))


@pytest.mark.slow
def test_reproductions_quick_run_covers_every_tutorial(shared_corpora):
    """Each tutorial's recipe runs a few steps on the shared stand-ins; the figures are only checked for shape."""
    proc = subprocess.run([sys.executable, str(BENCH / "reproductions.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    tutorials = ("nietzsche-tf2", "belling-the-cat", "imdb-simple-rnn", "lyrics-scratch-rnn", "echo")
    assert all(result[name]["seconds"] > 0 for name in tutorials)
    assert set(result["nietzsche-tf2"]["samples"]) == {"0.2", "0.5", "1", "1.2"}
    assert all(s.startswith("supposing that truth") for s in result["nietzsche-tf2"]["samples"].values())
    assert result["belling-the-cat"]["story"].startswith("had a general")
    assert 0 <= result["imdb-simple-rnn"]["test_accuracy"] <= 1 and result["imdb-simple-rnn"]["test_examples"] > 0
    assert {"random", "sequential"} <= set(result["lyrics-scratch-rnn"])
    assert 0 <= result["echo"]["val_accuracy"] <= 1


@pytest.mark.slow
def test_big_corpus_quick_run_measures_every_level():
    """Tiny corpora through `rnnkit train` cold and warm and `rnnkit eval`: every run succeeds and is measured."""
    proc = subprocess.run([sys.executable, str(BENCH / "big_corpus.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [row["level"] for row in result["rows"]] == ["char", "word", "bpe"]
    assert result["meets_target"]["all_runs_succeeded"]
    for row in result["rows"]:
        for run in (row["cold"], row["warm"]):
            assert run["seconds_to_first_step"] > 0 and run["peak_rss_anon_mb"] > 0
        assert any(line.startswith("pass 2/2") for line in row["cold"]["passes"])
        assert not any(line.startswith("pass ") for line in row["warm"]["passes"])  # the cached ids, mapped
    assert result["eval"]["rc"] == 0 and json.loads(result["eval"]["stdout"])["tokens"] > 0


@pytest.mark.slow
def test_train_throughput_times_every_cell_asked_for():
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--quick", "--threads", "1",
                           "--repeats", "1", "--cells", "lstm,mingru,minlstm", "--scan", "parallel"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert CASES["train_throughput.py"] <= set(result)  # the LSTM-vs-bare-loop keys stay
    assert result["cells"] == ["lstm", "mingru", "minlstm"] and result["scan"] == "parallel"
    assert set(result["cells_tokens_per_s"]) == {"lstm", "mingru", "minlstm"}
    assert result["cells_tokens_per_s"]["lstm"] == result["rnnkit_tokens_per_s"]
    assert result["mingru_vs_lstm"] == round(result["cells_tokens_per_s"]["mingru"] / result["rnnkit_tokens_per_s"], 4)
    assert result["minlstm_vs_lstm"] > 0


@pytest.mark.slow
def test_time_to_quality_quick_run_scores_every_side(shared_corpora):
    if not (shared_corpora.parent / "peers" / "nanoGPT").is_dir():
        pytest.skip("the nanoGPT peer is not available beside the corpora")
    proc = subprocess.run([sys.executable, str(BENCH / "time_to_quality.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    tiny = result["tiny_shakespeare"]
    assert tiny["nanogpt"]["val_chars"] == 111_539  # every position of val.bin but the last is scored
    for side in ("lstm_at_nanogpt_time", "fast_at_nanogpt_time", "lstm_at_long", "fast_at_long"):
        assert 0 < tiny[side]["val_nats_per_char"] < 5 and tiny[side]["tokens"] > 0
    shakes = result["shakespeare_300s"]
    assert shakes["plain_loop"]["tokens"] > 0 and shakes["rnnkit"]["tokens_per_s"] > 0
    assert set(result["targets"]) == {"fast_at_nanogpt_time", "fast_at_long", "plain_loop_bits_ratio",
                                      "plain_loop_tokens_ratio"}

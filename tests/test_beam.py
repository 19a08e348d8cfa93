"""Beam search: exact on a tiny model, the same scores as one row at a time, deterministic; its CLI and server."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rnnkit.beam import beam_search, repeated_ngrams
from rnnkit.config import ModelConfig
from rnnkit.errors import RnnkitError
from rnnkit.models.language_model import LanguageModel

CELLS = ["lstm", "gru", "rnn", "mingru", "minlstm"]


def tiny(cell="lstm", vocab=3, *, seed=0, layers=2):
    torch.manual_seed(seed)
    model = LanguageModel(config=ModelConfig(cell=cell, hidden=8, layers=layers), vocab_size=vocab)
    # Spread the weights so that the continuations' probabilities differ clearly.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


@torch.inference_mode()
def teacher_forced(model, prime, ids) -> float:
    """log p(ids | prime) from one forward pass over the whole text (no stepping, no beam)."""
    x = torch.tensor([list(prime) + list(ids)])
    logp = torch.log_softmax(model(x)[0].double(), dim=-1)[0]  # (T, V)
    return sum(float(logp[len(prime) - 1 + i, tok]) for i, tok in enumerate(ids))


@pytest.mark.parametrize("cell", CELLS)
def test_a_wide_enough_beam_finds_the_exhaustive_best(cell):
    model, prime, vocab, length = tiny(cell, vocab=3), [0, 2, 1], 3, 4
    everything = sorted(((teacher_forced(model, prime, seq), seq) for seq in
                         itertools.product(range(vocab), repeat=length)), key=lambda x: -x[0])
    beam = vocab ** length
    found = beam_search(model, prime, length=length, beam=beam, num_return=beam)
    assert len(found) == beam
    assert found[0].ids == list(everything[0][1])
    assert found[0].log_prob == pytest.approx(everything[0][0], abs=1e-5)
    # The whole ranking, not only the first: every hypothesis is a distinct sequence in the right order.
    assert [h.log_prob for h in found] == pytest.approx([lp for lp, _ in everything], abs=1e-5)
    assert len({tuple(h.ids) for h in found}) == beam


def test_a_beam_of_v_to_the_l_minus_one_is_already_exact():
    """Keeping every prefix of length L-1 is enough: the last step scores all their extensions."""
    model, prime = tiny("gru", vocab=4, seed=3), [1]
    best = max(itertools.product(range(4), repeat=3), key=lambda seq: teacher_forced(model, prime, seq))
    assert beam_search(model, prime, length=3, beam=16)[0].ids == list(best)


@pytest.mark.parametrize("cell", ["lstm", "minlstm"])
def test_each_beam_scores_as_its_own_run(cell):
    """N hypotheses advanced as one batch get the log-probability one forward pass over each gives."""
    model = tiny(cell, vocab=7, seed=1)
    prime = [3, 1, 4, 1, 5]
    found = beam_search(model, prime, length=12, beam=5, num_return=5)
    assert len(found) == 5 and len({tuple(h.ids) for h in found}) == 5
    for h in found:
        assert len(h.ids) == 12
        assert h.log_prob == pytest.approx(teacher_forced(model, prime, h.ids), abs=1e-5)
    scores = [h.score for h in found]
    assert scores == sorted(scores, reverse=True)


def test_beam_one_is_greedy():
    model, prime = tiny("gru", vocab=5, seed=2), [0, 1]
    ids, x = [], list(prime)
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(model(torch.tensor([x]))[0][0, -1].argmax()))
            x.append(ids[-1])
    assert beam_search(model, prime, length=8, beam=1)[0].ids == ids


def test_ties_go_to_the_lower_row_and_token():
    """With every parameter 0 each token has probability 1/V: the search keeps the lowest ids."""
    model = tiny("gru", vocab=4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    found = beam_search(model, [1], length=2, beam=3, num_return=3)
    assert [h.ids for h in found] == [[0, 0], [0, 1], [0, 2]]
    assert all(h.log_prob == pytest.approx(2 * torch.log(torch.tensor(0.25)).item()) for h in found)


def test_deterministic_and_windowed_models_search_too():
    model = tiny("lstm", vocab=6, seed=4)
    runs = [beam_search(model, [2, 3], length=10, beam=4, num_return=4) for _ in range(2)]
    assert runs[0] == runs[1]
    windowed = beam_search(model, [2, 3], length=6, beam=3, num_return=3, window=2)
    for h in windowed:  # a windowed model reads only the last 2 tokens from a zero state, each prediction
        ids = [2, 3, *h.ids]
        total = 0.0
        with torch.inference_mode():
            for i in range(6):
                context = ids[max(0, 2 + i - 2):2 + i]
                logp = torch.log_softmax(model(torch.tensor([context]))[0][0, -1].double(), -1)
                total += float(logp[ids[2 + i]])
        assert h.log_prob == pytest.approx(total, abs=1e-5)


def ngrams(ids, k):
    return [tuple(ids[i:i + k]) for i in range(len(ids) - k + 1)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_no_repeat_ngram_holds(k):
    model = tiny("lstm", vocab=5, seed=5)
    plain = beam_search(model, [1, 2], length=12, beam=3, num_return=3)
    assert any(len(set(ngrams(h.ids, k))) < len(ngrams(h.ids, k)) for h in plain)  # the constraint has work to do
    for h in beam_search(model, [1, 2], length=12, beam=3, num_return=3, no_repeat_ngram=k):
        assert len(set(ngrams(h.ids, k))) == len(ngrams(h.ids, k)), h.ids
        assert h.log_prob == pytest.approx(teacher_forced(model, [1, 2], h.ids), abs=1e-5)


def test_repeated_ngrams_mask():
    seqs = torch.tensor([[0, 1, 2, 0], [3, 3, 3, 3]])
    assert repeated_ngrams(seqs, 2, 4).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert repeated_ngrams(seqs, 1, 4).tolist() == [[True, True, True, False], [False, False, False, True]]
    assert not repeated_ngrams(seqs, 5, 4).any()


def test_a_hypothesis_with_no_allowed_token_ends_and_the_length_penalty_ranks_it():
    """Vocabulary 3 and no repeated token: every hypothesis ends after 3 tokens, however long the request."""
    model = tiny("gru", vocab=3, seed=6)
    found = beam_search(model, [0], length=10, beam=6, num_return=6, no_repeat_ngram=1)
    assert sorted(tuple(h.ids) for h in found) == sorted(itertools.permutations(range(3)))
    for h in beam_search(model, [0], length=10, beam=2, num_return=2, no_repeat_ngram=1, length_penalty=1.0):
        assert h.score == pytest.approx(h.log_prob / len(h.ids))


def test_bad_searches_are_refused():
    model = tiny()
    for kwargs, match in [({"beam": 0}, "at least 1"), ({"beam": 2, "num_return": 3}, "at most 2"),
                          ({"beam": 2, "no_repeat_ngram": -1}, "no-repeat"),
                          ({"beam": 2, "length_penalty": -1.0}, "length penalty")]:
        with pytest.raises(RnnkitError, match=match):
            beam_search(model, [0], length=3, **kwargs)
    with pytest.raises(RnnkitError, match="prime is empty"):
        beam_search(model, [], length=3, beam=2)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An untrained char-level LM, a classifier and an echo model, saved as checkpoints (random weights suffice)."""
    from rnnkit.config import RunConfig
    from rnnkit.training.echo import echo_tokenizer
    from test_server import _classifier, _lm, _save

    root = tmp_path_factory.mktemp("beam")
    torch.manual_seed(0)
    echo = RunConfig(task="echo")
    echo.model.hidden, echo.model.layers = 4, 1
    tok = echo_tokenizer(2)
    _save(root / "echo", LanguageModel(config=echo.model, vocab_size=tok.vocab_size), tok, echo)
    return {"lm": _lm(root / "lm"), "cls": _classifier(root / "cls"), "echo": root / "echo"}


def cli(argv, capsys):
    from rnnkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_beam_json_matches_the_library(checkpoints, capsys):
    from rnnkit.checkpoint import load_checkpoint

    argv = ["generate", "--checkpoint", checkpoints["lm"], "--prime", "ROMEO", "--length", "12", "--beam", "4",
            "--num-samples", "3", "--no-repeat-ngram", "2", "--length-penalty", "1", "--json"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert (result["beam"], result["no_repeat_ngram"], result["length_penalty"]) == (4, 2, 1.0)
    ckpt = load_checkpoint(checkpoints["lm"])
    tok, prime = ckpt.tokenizer, ckpt.tokenizer.encode("ROMEO").tolist()
    expected = beam_search(ckpt.model, prime, length=12, beam=4, num_return=3, no_repeat_ngram=2, length_penalty=1)
    assert [h["text"] for h in result["hypotheses"]] == [tok.decode(prime + h.ids) for h in expected]
    for shown, h in zip(result["hypotheses"], expected, strict=True):
        assert shown["text"].startswith("ROMEO") and shown["tokens"] == len(h.ids) == 12
        assert shown["log_prob"] == pytest.approx(teacher_forced(ckpt.model, prime, h.ids), abs=1e-5)
        assert shown["score"] == pytest.approx(shown["log_prob"] / 12)
    assert cli(argv, capsys)[1] == out  # deterministic, with no seed


def test_cli_beam_text(checkpoints, capsys):
    base = ["generate", "--checkpoint", checkpoints["lm"], "--prime", "JULIET", "--length", "8", "--beam", "3"]
    code, out, err = cli([*base, "--continuation-only"], capsys)
    assert code == 0, err
    code, several, err = cli([*base, "--num-samples", "2"], capsys)
    assert code == 0, err
    headers = [line for line in several.splitlines() if line.startswith("----- beam 3, hypothesis")]
    assert len(headers) == 2 and "log-prob" in headers[0]
    first = several.splitlines()[1]
    assert first == "JULIET" + out.rstrip("\n")  # the best hypothesis, with the prime unless --continuation-only


def bad(argv, capsys, match):
    code, out, err = cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnkit: error: ") and match in lines[0], err
    assert out == "" and "Traceback" not in err


def test_cli_beam_bad_input(checkpoints, capsys):
    lm = ["generate", "--checkpoint", checkpoints["lm"], "--length", "5"]
    bad([*lm, "--beam", "0"], capsys, "--beam must be >= 1")
    bad([*lm, "--beam", "-3"], capsys, "--beam must be >= 1")
    bad([*lm, "--beam", "2", "--num-samples", "3"], capsys, "--num-samples 3 asks for more hypotheses than --beam 2")
    bad([*lm, "--beam", "2", "--temperature", "0.5"], capsys, "drop --temperature")
    bad([*lm, "--beam", "2", "--top-k", "3"], capsys, "--top-k")
    bad([*lm, "--beam", "2", "--length-penalty", "-1"], capsys, "--length-penalty")
    bad([*lm, "--beam", "2", "--no-repeat-ngram", "-1"], capsys, "--no-repeat-ngram")
    bad([*lm, "--no-repeat-ngram", "2"], capsys, "add --beam N")
    bad([*lm, "--json"], capsys, "add --beam N")
    for kind in ("cls", "echo"):
        bad(["generate", "--checkpoint", checkpoints[kind], "--beam", "2"], capsys, "needs a language model")
        bad(["generate", "--checkpoint", checkpoints[kind], "--beam", "2", "--json"], capsys, "needs a language model")


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def client(checkpoints):
    pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install 'rnnkit[serve]'")
    from fastapi.testclient import TestClient

    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.config import ServeLimits
    from rnnkit.server import create_app

    limits = ServeLimits(max_length=60, max_samples=4)
    return TestClient(create_app({"lm": load_checkpoint(checkpoints["lm"])}, limits=limits))


def test_server_beam_matches_the_library(client, checkpoints):
    from rnnkit.checkpoint import load_checkpoint

    body = {"prime": "ROMEO", "length": 10, "beam": 4, "num_samples": 2, "no_repeat_ngram": 3, "length_penalty": 0.5}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    got = response.json()
    ckpt = load_checkpoint(checkpoints["lm"])
    prime = ckpt.tokenizer.encode("ROMEO").tolist()
    expected = beam_search(ckpt.model, prime, length=10, beam=4, num_return=2, no_repeat_ngram=3, length_penalty=0.5)
    assert got["texts"] == [ckpt.tokenizer.decode(h.ids) for h in expected]
    assert [h["text"] for h in got["hypotheses"]] == got["texts"]
    assert [h["log_prob"] for h in got["hypotheses"]] == pytest.approx([h.log_prob for h in expected])
    assert [h["score"] for h in got["hypotheses"]] == pytest.approx([h.log_prob / 10 ** 0.5 for h in expected])
    assert got["tokens"] == 10 and got["prime"] == "ROMEO"
    # Deterministic: another seed (not used by the search) gives the same hypotheses.
    again = client.post("/generate", json={**body, "seed": 12345, "temperature": 2.0}).json()
    assert again["hypotheses"] == got["hypotheses"]
    # Sampling answers say no hypotheses.
    assert client.post("/generate", json={"prime": "ROMEO", "length": 3}).json()["hypotheses"] is None


@pytest.mark.parametrize("body, status, match", [
    ({"beam": 0}, 422, "beam"),
    ({"beam": 5}, 422, "beam"),  # over the server's max_samples (4)
    ({"beam": 2, "no_repeat_ngram": -1}, 422, "no_repeat_ngram"),
    ({"beam": 2, "length_penalty": 11}, 422, "length_penalty"),
])
def test_server_beam_bad_requests(client, body, status, match):
    response = client.post("/generate", json={"prime": "ROMEO", "length": 4, **body})
    assert response.status_code == status, response.text
    assert match in response.json()["error"] and "\n" not in response.json()["error"]


def test_server_returns_at_most_what_the_beam_holds(client):
    """Valid by the schema, so not refused (the CLI refuses it: there the user can be told before any work)."""
    got = client.post("/generate", json={"prime": "ROMEO", "length": 4, "beam": 2, "num_samples": 3}).json()
    assert len(got["texts"]) == len(got["hypotheses"]) == 2


def test_a_beam_that_runs_past_its_time_gets_504(checkpoints):
    from fastapi.testclient import TestClient

    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.config import ServeLimits
    from rnnkit.server import create_app
    from test_server_door import Ticking

    limits = ServeLimits(max_length=60, max_request_seconds=10.5)
    client = TestClient(create_app(load_checkpoint(checkpoints["lm"]), limits=limits, clock=Ticking()))
    response = client.post("/generate", json={"prime": "ROMEO", "length": 60, "beam": 2})
    assert response.status_code == 504 and "--max-request-seconds" in response.json()["error"]


def test_streaming_refuses_a_beam(client):
    response = client.post("/generate/stream", json={"prime": "ROMEO", "length": 4, "beam": 2})
    assert response.status_code == 422
    assert "only POST /generate searches with a beam" in response.json()["error"]

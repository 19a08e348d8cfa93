"""Classification end to end: a separable data set is learned, the CLI classifies and evaluates."""

import json
import random

import pytest

from rnnkit.cli import main

GOOD = ["wonderful", "great", "superb", "delightful", "moving", "brilliant"]
BAD = ["awful", "boring", "dreadful", "dull", "terrible", "clumsy"]
FILLER = ["the", "film", "was", "a", "plot", "and", "acting", "really", "quite", "story"]


def write_tsv(path, n=400, seed=0):
    rng = random.Random(seed)
    rows = ["label\ttext"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label == "pos" else BAD))
        rows.append(f"{label}\t{' '.join(words)}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    write_tsv(folder / "reviews.tsv")
    code = main(["train", "--task", "classify", "--data", str(folder / "reviews.tsv"), "--out", str(folder / "run"),
                 "--model", "gru", "--hidden", "16", "--layers", "1", "--embedding-dim", "16", "--batch-size", "16",
                 "--epochs", "6", "--lr", "0.01", "--val-fraction", "0.1", "--test-fraction", "0.1",
                 "--pooling", "max", "--threads", "1", "--quiet"])
    assert code == 0
    return folder


def test_a_separable_data_set_is_learned(trained):
    metrics = json.loads((trained / "run" / "test_metrics.json").read_text())
    assert metrics["accuracy"] == 1.0
    assert metrics["examples"] == 40


def test_classify_texts_and_file(trained, capsys):
    assert main(["classify", "--checkpoint", str(trained / "run"), "what a wonderful film", "a dull story"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert all(0.5 < float(line.split("\t")[1]) <= 1 for line in lines)
    texts = trained / "texts.txt"
    texts.write_text("the plot was brilliant\n\nthe acting was terrible\n", encoding="utf-8")
    assert main(["classify", "--checkpoint", str(trained / "run"), "--file", str(texts)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[2]) for r in rows] == [("pos", "the plot was brilliant"), ("neg", "the acting was terrible")]


def test_eval_reports_per_class_metrics_and_confusion(trained, capsys):
    write_tsv(trained / "test.tsv", n=60, seed=5)
    assert main(["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "test.tsv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == 1.0 and report["examples"] == 60
    assert set(report["per_class"]) == {"neg", "pos"} and report["per_class"]["pos"]["f1"] == 1.0
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == [[30, 0], [0, 30]]


def _bad(argv, capsys, match):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1, err


def test_classification_bad_input(trained, tmp_path, capsys):
    one_class = tmp_path / "one.tsv"
    one_class.write_text("label\ttext\npos\tgood\npos\tfine\n", encoding="utf-8")
    _bad(["train", "--task", "classify", "--data", one_class, "--out", tmp_path / "o"], capsys, "only one class")
    cols = tmp_path / "cols.tsv"
    cols.write_text("y\tsentence\npos\tgood\nneg\tbad\n", encoding="utf-8")
    _bad(["train", "--task", "classify", "--data", cols, "--out", tmp_path / "o"], capsys, "--label-column")
    assert not (tmp_path / "o").exists()
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("label\ttext\nmeh\tthe film\npos\tgreat film\n", encoding="utf-8")
    _bad(["eval", "--checkpoint", trained / "run", "--data", unseen], capsys, "meh")
    _bad(["classify", "--checkpoint", trained / "run"], capsys, "--file")
    lm = trained / "lm.txt"
    lm.write_text("abc abc abc\n" * 50)
    assert main(["train", "--text", str(lm), "--out", str(tmp_path / "lm"), "--hidden", "8", "--layers", "1",
                 "--seq-len", "8", "--batch-size", "2", "--max-steps", "1", "--quiet"]) == 0
    _bad(["classify", "--checkpoint", tmp_path / "lm", "good"], capsys, "classifier")


def test_without_a_validation_split_the_last_epoch_is_kept_and_tested(tmp_path, capsys):
    write_tsv(tmp_path / "reviews.tsv", n=80)
    code = main(["train", "--task", "classify", "--data", str(tmp_path / "reviews.tsv"), "--out", str(tmp_path / "run"),
                 "--hidden", "8", "--layers", "1", "--epochs", "1", "--val-fraction", "0", "--test-fraction", "0.2",
                 "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "(no validation split); details in" in err
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["examples"] == 16

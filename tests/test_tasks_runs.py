"""Task shapes end to end (real runs, real processes): class weights exact under any split, sentence pairs
that need their second text, multi-label with a sigmoid pipeline, and verify_equivalence for each."""

import csv
import json

import pytest

from conftest import ROOT, TINY, launch, load_params, max_abs_diff, read_metrics, run_script
from dist_gacc.data import rotten_tomatoes_pool, unique_examples

pytestmark = pytest.mark.slow
VERIFY = ROOT / "scripts" / "verify_equivalence.py"


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Real Rotten Tomatoes snippets, 30 rotten : 7 fresh for training (37 rows: ragged windows), 10 : 10
    for validation."""
    texts, labels = unique_examples(*rotten_tomatoes_pool()[:2])
    by_label = {name: [t for t, label in zip(texts, labels) if label == name] for name in ("rotten", "fresh")}
    folder = tmp_path_factory.mktemp("imbalanced")
    train = [{"text": t, "label": "rotten"} for t in by_label["rotten"][:30]] + \
            [{"text": t, "label": "fresh"} for t in by_label["fresh"][:7]]
    validation = [{"text": t, "label": "rotten"} for t in by_label["rotten"][30:40]] + \
                 [{"text": t, "label": "fresh"} for t in by_label["fresh"][7:17]]
    return [*TINY, "data=csv", f"data.train_file={write_csv(folder / 'train.csv', train)}",
            f"data.validation_file={write_csv(folder / 'validation.csv', validation)}"]


@pytest.fixture(scope="module")
def weighted_runs(tmp_path_factory, imbalanced):
    runs = {}
    for name, processes, micro, n, weights in [("2x4x3", 2, 4, 3, "balanced"), ("1x24x1", 1, 24, 1, "balanced"),
                                               ("unweighted", 1, 24, 1, "none")]:
        runs[name] = tmp_path_factory.mktemp(f"weights-{name}")
        launch(runs[name], *imbalanced, f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={n}",
               f"trainer.class_weights={weights}", "trainer.epochs=2", processes=processes)
    return runs


def test_class_weights_two_ranks_equal_one_process_and_differ_from_unweighted(weighted_runs):
    a, b = read_metrics(weighted_runs["2x4x3"]), read_metrics(weighted_runs["1x24x1"])
    # balanced: n / (k * count) = 37 / (2 * 30) and 37 / (2 * 7), stored by label name
    assert a["class_weights"] == pytest.approx({"rotten": 37 / 60, "fresh": 37 / 14}, abs=1e-6)
    assert a["class_weights_setting"] == "balanced" and a["train_window_examples"] == [24, 13, 24, 13]
    assert a["train_losses"] == pytest.approx(b["train_losses"], abs=1e-5)  # weighted means, same windows
    assert max_abs_diff(load_params(weighted_runs["2x4x3"]), load_params(weighted_runs["1x24x1"])) <= 1e-5
    assert max_abs_diff(load_params(weighted_runs["1x24x1"]), load_params(weighted_runs["unweighted"])) > 1e-4
    assert read_metrics(weighted_runs["unweighted"])["class_weights"] is None


def test_report_names_every_label_and_draws_the_confusion_matrix(weighted_runs):
    run = weighted_runs["1x24x1"]
    m = read_metrics(run)
    rows = list(csv.DictReader(open(run / "validation_predictions.csv", encoding="utf-8")))
    # The per-label report, recomputed by hand from the predictions file
    for name in ("rotten", "fresh"):
        tp = sum(r["label"] == name and r["prediction"] == name for r in rows)
        predicted, true = sum(r["prediction"] == name for r in rows), sum(r["label"] == name for r in rows)
        report = m["eval"]["per_label"][name]
        assert report["support"] == true == 10
        assert report["precision"] == pytest.approx(tp / predicted if predicted else 0.0)
        assert report["recall"] == pytest.approx(tp / true)
    assert m["label_names"] == ["fresh", "rotten"]  # a csv's labels sort by name
    assert m["eval"]["f1"] == pytest.approx(m["eval"]["per_label"]["rotten"]["f1"])  # binary: F1 of label id 1
    png = (run / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_verify_equivalence_with_class_weights_on_two_ranks(tmp_path, imbalanced):
    """Against torch's weighted mean of each whole window (float64): dividing by the window's count
    instead of its sum of weights would fail here, though 1 and 2 processes would still agree."""
    proc = launch(tmp_path / "v", *imbalanced, "trainer.micro_batch_size=4", "trainer.grad_accum_steps=3",
                  "trainer.class_weights=balanced", "verify.updates=2", processes=2, script=VERIFY)
    assert "windows of 24, 13 examples" in proc.stdout and "class weights {'fresh': 2.642857, 'rotten': 0.616667}" in proc.stdout
    assert "packed micro-batches; float64" in proc.stdout  # packed training against the padded definition
    assert proc.stdout.strip().endswith("PASS")
    naive = launch(tmp_path / "n", *imbalanced, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                   "trainer.class_weights=balanced", "trainer.loss_normalisation=naive", script=VERIFY, check=False)
    assert naive.returncode == 1 and naive.stdout.strip().endswith("FAIL")


def test_balanced_weights_with_a_label_left_out_by_max_train_samples_stop_before_training(tmp_path):
    """A training file with one 'mixed' row among 40; data.max_train_samples=10 leaves it out (seed 42): a
    balanced weight for 'mixed' would divide by 0 (scikit-learn raised ValueError, a traceback). Exit 2 names it."""
    texts, labels = unique_examples(*rotten_tomatoes_pool()[:2])
    rows = [{"text": texts[39], "label": "mixed"}] + [{"text": t, "label": label}
                                                      for t, label in zip(texts[:39], labels[:39])]
    train = write_csv(tmp_path / "train.csv", rows)
    validation = write_csv(tmp_path / "validation.csv", [{"text": t, "label": label}
                                                         for t, label in zip(texts[40:60], labels[40:60])])
    run = tmp_path / "run"
    proc = launch(run, *TINY, "data=csv", f"data.train_file={train}", f"data.validation_file={validation}",
                  "data.max_train_samples=10", "trainer.class_weights=balanced", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: trainer.class_weights=balanced: label(s) ['mixed'] have no row in the training split" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "metrics.json").exists()


# --- sentence pairs and multi-label, on crafted data whose answer is known ------------------------------

FILLER = ("the a film plot story scene actor music long short slow quiet bright night city road house "
          "window paper train river stone garden letter winter summer morning").split()
COLORS = ("red", "green", "blue")


def _filler(rng, n=6):
    return " ".join(rng.choice(FILLER) for _ in range(n))


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """The label is carried by the second text only: the first is noise, the second says apple or pear."""
    import random

    rng, folder = random.Random(0), tmp_path_factory.mktemp("pairs")
    rows = []
    for _ in range(300):
        fruit = rng.choice(["apple", "pear"])
        rows.append({"first": _filler(rng), "second": f"{_filler(rng, 3)} {fruit} {_filler(rng, 3)}", "label": fruit})
    return write_csv(folder / "train.csv", rows[:240]), write_csv(folder / "validation.csv", rows[240:])


def test_pair_task_needs_and_uses_the_second_text(tmp_path, pair_files):
    train, validation = pair_files
    run = tmp_path / "pairs"
    launch(run, *TINY, "data=csv", f"data.train_file={train}", f"data.validation_file={validation}",
           "data.text_column=first", "data.text_pair_column=second", "data.max_train_samples=240", "data.max_eval_samples=60",
           "trainer.micro_batch_size=16", "trainer.epochs=4")
    m = read_metrics(run)
    # A trainer that dropped the second text would score at chance (the first text is unrelated noise).
    assert m["eval"]["f1"] >= 0.9 and m["eval"]["num_examples"] == 60
    rows = list(csv.DictReader(open(run / "validation_predictions.csv", encoding="utf-8")))
    assert list(rows[0]) == ["text", "text_pair", "label", "prediction"]
    assert all(r["label"] in r["text_pair"] and r["label"] not in r["text"] for r in rows)
    # The saved model/ answers transformers' pipeline with {"text", "text_pair"}.
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run / "model"))
    out = [classify({"text": r["text"], "text_pair": r["text_pair"]}) for r in rows[:10]]
    assert [o["label"] if isinstance(o, dict) else o[0]["label"] for o in out] == [r["prediction"] for r in rows[:10]]


@pytest.fixture(scope="module")
def multi_label_files(tmp_path_factory):
    """Each row names some of red/green/blue in its first or second text (maybe none): its label set.
    In a csv the set is a string split on data.label_separator."""
    import random

    rng, folder = random.Random(1), tmp_path_factory.mktemp("multi")
    rows = []
    for _ in range(700):
        colors = [c for c in COLORS if rng.random() < 0.4]
        first, second = [c for c in colors if rng.random() < 0.5], []
        second = [c for c in colors if c not in first]
        rows.append({"text": f"{_filler(rng, 4)} {' '.join(first)} {_filler(rng, 2)}",
                     "text_pair": f"{_filler(rng, 2)} {' '.join(second)} {_filler(rng, 4)}", "tags": "|".join(colors)})
    return write_csv(folder / "train.csv", rows[:600]), write_csv(folder / "validation.csv", rows[600:])


def _multi_label(files):
    train, validation = files
    return ["data=csv", f"data.train_file={train}", f"data.validation_file={validation}", "data.label_column=tags",
            "data.text_pair_column=text_pair", "data.multi_label=true", "data.label_separator='|'"]


def test_multi_label_run_reports_micro_f1_and_saves_a_sigmoid_pipeline_model(tmp_path, multi_label_files):
    run = tmp_path / "multi"
    # (the default tiny size: at hidden size 32 this task plateaus near F1 0.7)
    launch(run, *TINY, *_multi_label(multi_label_files), "data.max_train_samples=600", "data.max_eval_samples=100",
           "model.from_scratch.hidden_size=128", "model.from_scratch.intermediate_size=256",
           "trainer.micro_batch_size=16", "trainer.epochs=5", "optim.lr=2e-3", "optim.warmup_ratio=0.1")
    m = read_metrics(run)
    assert m["problem_type"] == "multi_label_classification" and m["label_names"] == ["blue", "green", "red"]
    assert m["eval"]["average"] == "micro" and m["multi_label_threshold"] == 0.5
    # micro-F1 by hand from the predictions file: sets of names joined by data.label_separator
    rows = list(csv.DictReader(open(run / "validation_predictions.csv", encoding="utf-8")))
    sets = lambda value: set(value.split("|")) - {""}  # noqa: E731
    tp = sum(len(sets(r["label"]) & sets(r["prediction"])) for r in rows)
    fp = sum(len(sets(r["prediction"]) - sets(r["label"])) for r in rows)
    fn = sum(len(sets(r["label"]) - sets(r["prediction"])) for r in rows)
    assert m["eval"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert m["eval"]["f1"] >= 0.9 and any(not sets(r["label"]) for r in rows)  # empty sets occur
    assert set(m["eval"]["per_label"]) == set(COLORS) and "f1_macro" in m["eval"]
    assert (run / "per_label_f1.png").stat().st_size > 5000

    config = json.loads((run / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    # transformers' pipeline applies a sigmoid per label (from problem_type), not a softmax
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    classify = pipeline("text-classification", model=str(run / "model"), top_k=None)
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    pair = {"text": rows[0]["text"], "text_pair": rows[0]["text_pair"]}
    scores = {o["label"]: o["score"] for o in classify(pair)}
    with torch.no_grad():
        logits = model(**tokenizer(pair["text"], pair["text_pair"], return_tensors="pt")).logits[0]
    expected = dict(zip(["blue", "green", "red"], torch.sigmoid(logits).tolist()))
    assert scores == pytest.approx(expected, abs=1e-5) and abs(sum(scores.values()) - 1) > 1e-3
    # scripts/predict.py prints the set above the threshold and every score
    proc = run_script(ROOT / "scripts" / "predict.py", f"model={run / 'model'}", f"{pair['text']}\t{pair['text_pair']}")
    chosen, listed, *_ = proc.stdout.strip().split("\t")
    assert set(filter(None, chosen.split(","))) == {n for n, s in expected.items() if s >= 0.5}
    assert listed.count("=") == 3


def test_verify_equivalence_multi_label_pairs_with_positive_weights_on_two_ranks(tmp_path, multi_label_files):
    ragged = [*TINY, *_multi_label(multi_label_files), "data.max_train_samples=37", "trainer.class_weights=balanced"]
    proc = launch(tmp_path / "v", *ragged, "trainer.micro_batch_size=4", "trainer.grad_accum_steps=3",
                  "verify.updates=2", processes=2, script=VERIFY)
    assert "windows of 24, 13 examples" in proc.stdout and "multi_label_classification, text pairs" in proc.stdout
    assert "packed micro-batches; float64" in proc.stdout
    assert proc.stdout.strip().endswith("PASS")
    naive = launch(tmp_path / "n", *ragged, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                   "trainer.loss_normalisation=naive", script=VERIFY, check=False)
    assert naive.returncode == 1 and naive.stdout.strip().endswith("FAIL")

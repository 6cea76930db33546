"""Task shapes end to end (real runs, real processes): class weights exact under any split, sentence pairs
that need their second text, multi-label with a sigmoid pipeline, and verify_equivalence for each."""

import csv

import pytest

from conftest import ROOT, TINY, launch, load_params, max_abs_diff, read_metrics
from dist_gacc.data import dedupe, rotten_tomatoes_pool

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
    texts, labels = dedupe(*rotten_tomatoes_pool()[:2])
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
    assert proc.stdout.strip().endswith("PASS")
    naive = launch(tmp_path / "n", *imbalanced, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                   "trainer.class_weights=balanced", "trainer.loss_normalisation=naive", script=VERIFY, check=False)
    assert naive.returncode == 1 and naive.stdout.strip().endswith("FAIL")

"""Gradients are all-reduced once per update: ranks differ mid-window and agree at the boundary."""

import json

import pytest

from conftest import ROOT, launch_script

pytestmark = pytest.mark.slow


def test_gradients_sync_only_at_window_boundaries(tmp_path):
    out = tmp_path / "records.json"
    launch_script(ROOT / "tests" / "dist" / "check_sync.py", str(out), str(tmp_path / "run"))
    records = json.loads(out.read_text())
    assert [r["sync"] for r in records] == [False, False, True] * 3  # 3 updates of 3 micro-batches
    for r in records:
        if r["sync"]:
            assert r["max_abs_diff"] == 0.0
        else:
            assert r["max_abs_diff"] > 1e-6  # each rank still holds only its own gradients

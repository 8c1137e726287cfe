"""The worked examples in examples/ run at smoke size, write their plots, and show what they claim.

The examples need scikit-learn and matplotlib (``pip install -e '.[examples]'``); without them their tests
skip, saying so. CI installs them. The README's training example needs torch only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # (the torch extra; CI has it)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), EXAMPLES / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, tmp_path, capsys) -> tuple[dict, str]:
    pytest.importorskip("sklearn", reason="the examples need scikit-learn: pip install -e '.[examples]'")
    pytest.importorskip("matplotlib", reason="the examples need matplotlib: pip install -e '.[examples]'")
    out = tmp_path / (name.replace(".py", "") + ".png")
    result = _load(name).main(["--smoke", "--out", str(out)])
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5_000
    return result, capsys.readouterr().out


def test_every_example_has_a_test():
    assert sorted(p.name for p in EXAMPLES.glob("0[1-3]_*.py")) == [
        "01_pos_weight_digits.py", "02_multilabel_missing_labels.py", "03_segmentation_focal.py",
    ]  # fmt: skip


def test_01_pos_weight_trades_precision_for_recall(tmp_path, capsys):
    result, out = _run("01_pos_weight_digits.py", tmp_path, capsys)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # pos_weight_from_targets against a count made here: negatives / positives of the training split
    _, labels = load_digits(return_X_y=True)
    y = (labels == 8).astype(np.float32)
    _, _, y_tr, _ = train_test_split(y, y, test_size=0.25, stratify=y, random_state=0)
    assert result["balancing"] == pytest.approx((len(y_tr) - y_tr.sum()) / y_tr.sum(), rel=1e-6)
    assert 7 < result["balancing"] < 11  # about 1:9
    # the seeds' claim: recall rises and precision falls as pos_weight grows
    weights = sorted(result["results"])
    precision = [result["results"][w][0] for w in weights]
    recall = [result["results"][w][1] for w in weights]
    assert recall == sorted(recall) and recall[-1] > recall[0] + 0.3
    assert precision == sorted(precision, reverse=True) and precision[0] > precision[-1] + 0.2
    assert "pos_weight_from_targets" in out


def test_02_ignore_index_recovers_what_filling_with_zero_loses(tmp_path, capsys):
    result, out = _run("02_multilabel_missing_labels.py", tmp_path, capsys)
    runs = result["results"]
    for attribute in runs["every label known"]:
        recall_zero, f1_zero = runs["missing filled with 0"][attribute]
        recall_ignored, f1_ignored = runs["missing -> ignore_index=-1"][attribute]
        assert recall_ignored > recall_zero + 0.2 and f1_ignored > f1_zero + 0.1
        assert f1_ignored > runs["every label known"][attribute][1] - 0.1  # close to full labels
    assert "labels hidden" in out


def test_03_segmentation_runs_with_class_dim_and_focal(tmp_path, capsys):
    result, out = _run("03_segmentation_focal.py", tmp_path, capsys)
    assert set(result["iou"]) == {"plain BCE", "pos_weight, class_dim=1", "pos_weight + focal_gamma=2"}
    for iou in result["iou"].values():
        assert iou.shape == (10,) and np.all((iou >= 0) & (iou <= 1))
    # at smoke size (60 steps) plain BCE still predicts background only for the rare classes (~4 % of the
    # pixels each); with pos_weight along class_dim=1 every class is found
    plain = result["iou"]["plain BCE"]
    for name in ("pos_weight, class_dim=1", "pos_weight + focal_gamma=2"):
        assert np.all(result["iou"][name] > 0) and result["iou"][name].mean() > plain.mean() + 0.05
    assert "held-out IoU" in out


def test_readme_training_example_runs_and_learns(capsys):
    """The README's complete training step is code a user copies: it must run and the loss must fall."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A complete training step", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 10 <= len(code.strip().splitlines()) <= 20
    exec(compile(code, "README.md", "exec"), {})
    final = float(capsys.readouterr().out.split("final loss")[1])
    assert final < 0.5

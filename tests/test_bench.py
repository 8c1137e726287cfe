"""``bcelogits bench`` on tiny tensors: rows, table, CSV, plot, memory subprocess, CUDA refusal."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from bcelogits import bench

TINY = [(64, 32), (2, 3, 4, 5)]


def _args(**kw):
    base = dict(
        quick=False,
        device="cpu",
        plot=None,
        csv=None,
        repeats=2,
        shapes=[(32, 16)],
        memory=False,
        progress=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def result():
    return bench.run(bench.make_cells(TINY), repeats=3, memory=False, progress=False)


def test_rows_are_sane(result):
    rows = result.rows
    assert len(rows) == len(TINY) * len(bench.CONFIGS) * len(bench.MODES)
    assert not result.interrupted
    for r in rows:
        assert r.rounds == 3
        assert r.torch_ms > 0 and r.bcelogits_ms > 0
        assert math.isfinite(r.speedup) and r.speedup_min <= r.speedup <= r.speedup_max
        assert r.backend in ("plain", "cpu")
        assert r.threads == torch.get_num_threads()
        assert r.dtype == "float32" and r.device == "cpu"
        # float32 against float64: a handful of ulps of the loss / of the largest gradient
        assert 0 <= r.torch_loss_err < 1e-5 and 0 <= r.bcelogits_loss_err < 1e-5
        assert r.floor_ms > 0 and r.bcelogits_over_floor > 0  # fwd+bwd: a fresh tensor; fwd: a read
        if r.mode == "fwd+bwd":
            assert 0 <= r.torch_grad_err < 1e-5 and 0 <= r.bcelogits_grad_err < 1e-5
        else:
            assert r.torch_grad_err is None
        assert r.torch_mem is None  # memory=False
    labels = {r.config for r in rows}
    assert {"no weights", "weight (full)", "pos_weight (32)", "pos_weight (3, dim 1)"} <= labels


def test_table_lists_every_row(result):
    table = bench.format_table(result.rows)
    lines = table.splitlines()
    assert lines[0].startswith("| size | config | mode | torch ms | bcelogits ms | speed-up |")
    assert len(lines) == 2 + len(result.rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    text = bench.report(result, "cpu", "title")
    assert "machine: " in text and "torch " in text and "bcelogits backend:" in text


def test_main_prints_table_and_writes_csv(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    assert bench.main(_args(csv=str(path))) == 0
    out = capsys.readouterr().out
    assert "| size | config | mode |" in out
    assert "machine: " in out and "cores" in out
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(bench.CONFIGS) * len(bench.MODES)
    assert {r["mode"] for r in rows} == set(bench.MODES)
    assert all(float(r["speedup"]) > 0 and r["machine"] for r in rows)


def test_main_writes_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedup.png"
    assert bench.main(_args(plot=str(path), shapes=[(16, 8), (2, 3, 2, 2)])) == 0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_without_matplotlib_fails_only_for_plot(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_have_matplotlib", lambda: False)
    assert bench.main(_args(plot="never.png")) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert bench.main(_args()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_returns_2(capsys):
    assert bench.main(_args(device="cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_arguments(capsys):
    assert bench.main(_args(repeats=0)) == 2
    assert bench.main(_args(shapes="12 apples")) == 2
    assert "cannot read size" in capsys.readouterr().err


def test_parse_shapes():
    assert bench._parse_shapes("16M, 2**20,1000") == [(15625, 1024), (1024, 1024), (1000,)]
    assert bench._parse_shapes([(3, 4), 2048]) == [(3, 4), (2, 1024)]
    assert bench._parse_shapes("1e6,1.5K,1x16777216,64x80x128x128") == [
        (1_000_000,), (1500,), (1, 16777216), (64, 80, 128, 128),
    ]  # fmt: skip


@pytest.mark.parametrize("spec", ["0", "0K", "1.5", ",", "", "1x0", "-5", "2**"])
def test_parse_shapes_rejects_sizes_that_are_not_element_counts(spec):
    with pytest.raises(ValueError, match="size|shape"):
        bench._parse_shapes(spec)


def test_unwritable_outputs_are_refused_before_measuring(capsys, tmp_path):
    missing = tmp_path / "no such folder"
    for flag in ("csv", "plot"):
        assert bench.main(_args(**{flag: str(missing / f"out.{flag}")})) == 2
        err = capsys.readouterr().err
        assert f"--{flag}" in err and "does not exist" in err
    assert bench.main(_args(csv=str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err


def test_memory_subprocesses_count_the_gradient():
    # after fwd+bwd both libraries hold at least the gradient: one input-sized tensor (2 MB here)
    (row,) = bench.run(
        [bench.Cell((512, 1024), "none", "fwd+bwd")], repeats=1, memory=True, progress=False
    ).rows
    assert row.mem_method in ("VmHWM", "ru_maxrss")
    assert 0.9 <= row.torch_mem < 12 and 0.9 <= row.bcelogits_mem < 12


def test_cells_and_labels():
    cells = bench.make_cells([(64, 80, 128, 128)], ["pos_weight"], ["fwd"])
    (c,) = cells
    assert c.size == "83.9M" and c.class_dim == 1 and c.config_label == "pos_weight (80, dim 1)"
    inp = bench.make_inputs(bench.Cell((2, 3, 4, 5), "pos_weight"))
    assert inp.kw_torch["pos_weight"].shape == (3, 1, 1) and inp.kw_ours == {
        "pos_weight": inp.kw_ours["pos_weight"],
        "class_dim": 1,
    }
    assert bench.bytes_moved(bench.Cell((10, 10), "weight", "fwd+bwd")) == 4 * 100 * 4
    assert bench._small_shape((1, 2**24), 2**20) == (1, 2**20)
    with pytest.raises(ValueError):
        bench.Cell((3,), "bogus")


def test_min_time_adds_rounds_up_to_the_cap(monkeypatch):
    cells = [bench.Cell((64, 32), "none", "fwd")]
    monkeypatch.setattr(bench, "MAX_ROUNDS", 7)
    # a minimum time never reached: rounds stop at the cap
    (row,) = bench.run(cells, repeats=2, min_s=1e9, memory=False, progress=False).rows
    assert row.rounds == 7
    # a minimum time already reached after the required rounds: exactly those
    (row,) = bench.run(cells, repeats=2, min_s=1e-9, memory=False, progress=False).rows
    assert row.rounds == 2


def test_default_full_cpu_run_measures_cells_for_a_minimum_time(monkeypatch):
    seen = []

    def fake_run(cells, repeats, **kw):
        seen.append((repeats, kw["min_s"], kw["budget_s"]))
        return bench.RunResult([], [], False)

    monkeypatch.setattr(bench, "run", fake_run)
    assert bench.main(_args(repeats=None)) == 0
    assert bench.main(_args(repeats=None, quick=True)) == 0
    assert bench.main(_args(repeats=4)) == 0
    assert seen == [
        (bench.DEFAULT_REPEATS["full"], bench.CELL_MIN_S, bench.CELL_BUDGET_S),
        (bench.DEFAULT_REPEATS["quick"], None, None),
        (4, None, None),
    ]


def test_small_calls_script_prints_one_row_per_shape(capsys):
    """benchmarks/small_calls.py (the README's small-input numbers) runs and prints its table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "small_calls.py"
    spec = importlib.util.spec_from_file_location("small_calls", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "4x3,2x5x7", "--calls", "2", "--rounds", "1"]) == 0
    rows = [
        r for r in capsys.readouterr().out.splitlines() if r.startswith("| 4x3") or r.startswith("| 2x5x7")
    ]
    assert [r.split("|")[2].strip() for r in rows] == ["12", "70"]
    assert all(float(c) > 0 for r in rows for c in r.strip("|").split("|")[2:])
    assert mod.main(["--shapes", "4x3", "--calls", "2", "--rounds", "1", "--evict", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 MiB written before each call" in out and "| 4x3 | 12 |" in out


def test_kernel_micro_script_runs_every_case(capsys, tmp_path):
    """benchmarks/kernel_cpu_micro.py (the kernel-alone numbers of docs/performance.md) runs every case on
    NumPy arrays and on tensors torch allocated, with eviction, and writes its rows."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "kernel_cpu_micro.py"
    spec = importlib.util.spec_from_file_location("kernel_cpu_micro", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for extra in ([], ["--torch-memory"]):
        out = tmp_path / "rows.json"
        mod.main(["--sizes", "5000", "--reps", "1", "--evict", "1", "--json", str(out), *extra])
        rows = json.loads(out.read_text())
        assert {r["case"] for r in rows} >= {"kernel loss-only (sum)", "kernel loss+grad (full weight)"}
        assert all(r["n"] == 5000 and r["median_ms"] > 0 for r in rows)
        text = capsys.readouterr().out
        assert "1 MiB written before each call" in text
        assert ("arrays allocated by torch" in text) == bool(extra)


# --------------------------------------------------------------------------------- what a reader can trust
def test_median_round_is_a_real_round():
    assert bench.median_round([3.0, 1.0, 2.0]) == 2  # the round with ratio 2
    assert bench.median_round([4.0, 1.0, 3.0, 2.0]) == 3  # even count: the lower middle one (ratio 2)
    assert bench.median_round([5.0]) == 0


def test_times_ratio_and_floor_of_a_row_come_from_one_round(result):
    """torch ms / bcelogits ms is the speed-up shown, and ours / floor is bcelogits ms / floor ms: the
    numbers of a row cannot contradict each other (they did when times and ratios were medians of
    different rounds)."""
    for r in result.rows:
        assert r.torch_ms / r.bcelogits_ms == pytest.approx(r.speedup, rel=1e-12)
        assert r.bcelogits_ms / r.floor_ms == pytest.approx(r.bcelogits_over_floor, rel=1e-12)
        assert r.speedup_min <= r.speedup <= r.speedup_max
    # and so do the printed cells, to their rounding
    for line in bench.format_table(result.rows).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        torch_ms, ours_ms, speedup = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
        # (times to 3 significant digits: up to 1.1 % between them; the speed-up to 2 decimals: 0.005)
        assert abs(torch_ms / ours_ms - speedup) <= 0.011 * speedup + 0.0051
        low, high = (float(v) for v in cells[6].rstrip("x").split("-"))
        assert low <= speedup <= high


def test_quick_mode_says_what_it_skips(capsys):
    assert bench.main(_args(quick=True, repeats=None, memory=None, shapes=[(32, 16)])) == 0
    out = capsys.readouterr().out
    assert "note: quick mode: sizes 512 only" in out and "3 rounds per cell" in out
    assert "peak memory not measured in this run (quick mode" in out
    header = next(line for line in out.splitlines() if line.startswith("| size |"))
    assert "mem" not in header  # no empty column: left out, and the note says why


def test_memory_column_is_shown_when_measured(result):
    import dataclasses

    rows = [dataclasses.replace(r, torch_mem=2.0, bcelogits_mem=1.0) for r in result.rows]
    table = bench.format_table(rows)
    assert "peak extra mem (torch / ours)" in table.splitlines()[0]
    assert "| 2.0 / 1.0 |" in table
    text = bench.report(bench.RunResult(rows, []), "cpu", "t")
    assert "peak memory not measured" not in text


def test_forward_below_its_floor_is_marked_as_noise(result):
    import dataclasses

    fwd = next(r for r in result.rows if r.mode == "fwd")
    fb = next(r for r in result.rows if r.mode == "fwd+bwd")
    assert bench._floor_ratio(dataclasses.replace(fwd, bcelogits_over_floor=0.8)) == "0.80x*"
    assert bench._floor_ratio(dataclasses.replace(fwd, bcelogits_over_floor=1.5)) == "1.50x"
    # fwd+bwd's floor is a reference (torch.add into a fresh tensor), not a bound: no mark below 1
    assert bench._floor_ratio(dataclasses.replace(fb, bcelogits_over_floor=0.8)) == "0.80x"
    assert "marked *" in bench.FOOTNOTES_CPU and "A reference, not a bound" in bench.FOOTNOTES_CPU


def test_chart_legend_names_every_mark(result, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.legend

    def record(self, handles, labels, **kw):
        seen["labels"] = list(labels)
        return real(self, handles, labels, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", record)
    bench.plot(result.rows, str(tmp_path / "c.png"), "title")
    labels = seen["labels"]
    assert {"bar: no weights", "bar: weight", "bar: pos_weight"} <= set(labels)
    assert any(lab.startswith("whisker:") for lab in labels)
    assert any("floor" in lab and "torch ms / floor ms" in lab for lab in labels)
    assert "1x: as fast as torch" in labels
    assert any("bcelogits faster" in lab for lab in labels) and any("torch faster" in lab for lab in labels)

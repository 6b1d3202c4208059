"""benchmark/speed.py --quick writes its table (its figures are measured, never asserted: tests don't time)."""

import csv
import subprocess
import sys

from benchmark.scripts import ROOT
from benchmark.speed import COLUMNS


def test_quick_speed_table(tmp_path):
    scripts = ["rainbow_impala_gap", "der_atari100k_gap"]  # the flagship does not evaluate by default, DER does
    result = subprocess.run(
        [sys.executable, "benchmark/speed.py", "--quick", "--no-cuda", "--scripts", *scripts, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    all_rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert list(all_rows[0]) == COLUMNS
    rows = [row for row in all_rows if row["script"] == "rainbow_impala_gap"]
    der_rows = [row for row in all_rows if row["script"] == "der_atari100k_gap"]
    assert [(row["scale"], row["pooling"]) for row in rows] == [("1", "flatten"), ("1", "gap")]
    assert [(row["scale"], row["pooling"]) for row in der_rows] == [("1", "flatten"), ("1", "gap")]
    for row in all_rows:
        for column in ["env_sps", "act_ms", "sample_ms", "update_ms", "floor_sps", "loop_sps", "efficiency"]:
            assert float(row[column]) > 0, column
    for row in rows:  # the flagship does not evaluate by default (eval_episodes 0): no evaluation step to time
        assert row["eval_act_ms"] == "" and row["eval_env_ms"] == ""
    for row in der_rows:  # DER evaluates 100 games after each iteration
        assert float(row["eval_act_ms"]) > 0 and float(row["eval_env_ms"]) > 0
    assert float(rows[0]["update_vs_flatten"]) == 1.0  # flatten against itself
    gap_ratio = float(rows[1]["update_ms"]) / float(rows[0]["update_ms"])  # GAP's update over flatten's, same scale
    assert abs(float(rows[1]["update_vs_flatten"]) - gap_ratio) <= 1e-9 * gap_ratio
    assert int(rows[0]["params_bottleneck"]) == 11 * 11 * 32 * 512 and int(rows[1]["params_bottleneck"]) == 32 * 512
    assert (tmp_path / "speed.md").read_text().splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert "| gap |" in result.stdout

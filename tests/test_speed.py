"""benchmark/speed.py --quick writes its table (its figures are measured, never asserted: tests don't time)."""

import csv
import subprocess
import sys

from benchmark.scripts import ROOT
from benchmark.speed import COLUMNS


def test_quick_speed_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmark/speed.py", "--quick", "--no-cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert list(rows[0]) == COLUMNS
    assert [(row["scale"], row["pooling"]) for row in rows] == [("1", "flatten"), ("1", "gap")]
    for row in rows:
        for column in ["env_sps", "act_ms", "sample_ms", "update_ms", "floor_sps", "loop_sps", "efficiency"]:
            assert float(row[column]) > 0, column
    assert float(rows[0]["update_vs_flatten"]) == 1.0  # flatten against itself
    gap_ratio = float(rows[1]["update_ms"]) / float(rows[0]["update_ms"])  # GAP's update over flatten's, same scale
    assert abs(float(rows[1]["update_vs_flatten"]) - gap_ratio) <= 1e-9 * gap_ratio
    assert int(rows[0]["params_bottleneck"]) == 11 * 11 * 32 * 512 and int(rows[1]["params_bottleneck"]) == 32 * 512
    assert (tmp_path / "speed.md").read_text().splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert "| gap |" in result.stdout

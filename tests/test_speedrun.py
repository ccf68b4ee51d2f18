"""The whole pipeline at CI size: every stage runs, is evaluated and reported; a rerun skips finished stages."""

from __future__ import annotations

import json
import subprocess
import sys

STAGES = ("base", "sft", "grpo", "rejection-sft", "student-distill", "student-grpo")


def test_tiny_speedrun_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "speedrun"
    first = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| stage | pass@1 (%) | cons@2 (%) | tokens/s | wall time")
    assert [row.split("|")[1].strip() for row in table[1:]] == list(STAGES)
    for stage in STAGES:
        result = json.loads((out / f"{stage}.json").read_text())
        assert 0 <= result["pass@1"] <= 100 and result["wall_s"] > 0
    assert (out / "losses.png").stat().st_size > 0 and (out / "grpo.png").stat().st_size > 0
    assert "Cost projection" in report and "nanoseek serve --model" in first.stdout
    traces = (out / "rejection.jsonl").read_text().splitlines()
    assert traces and json.loads((out / "rejection.stats.json").read_text())["kept"] == len(traces)
    (out / "student-grpo.json").unlink()  # as if the run had stopped before its last stage
    again = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line.split()[1].rstrip(":") for line in again.stdout.splitlines() if "done before, skipped" in line]
    assert skipped == ["base", "sft", "grpo", "grpo-seed1", "rejection-sft", "student-base", "student-distill"]
    assert "with 2 seeds: pass@1" in (out / "report.md").read_text()

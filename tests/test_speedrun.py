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
    assert f"sft: {len(traces) + 32} conversations" in (out / "rejection-sft.log").read_text()  # traces + the mix
    assert "$ nanoseek eval" in (out / "sft.log").read_text()

    # A stage that fails stops the run with a message naming it and keeps every finished stage.
    (out / "student-grpo.json").unlink()
    config = out / "student-base" / "latest" / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    failed = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert failed.returncode == 1
    assert "stopped: stage student-grpo: `nanoseek grpo" in failed.stdout and "config.json" in failed.stdout
    assert not (out / "student-grpo.json").exists() and (out / "student-distill.json").exists()

    config.write_text(good)  # a rerun skips the finished stages and completes the rest
    again = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [line.split()[1].rstrip(":") for line in again.stdout.splitlines() if "done before, skipped" in line]
    assert skipped == ["base", "sft", "student-base", "grpo", "rejection", "rejection-sft", "student-distill",
                       "grpo-seed1"]
    assert "with 2 seeds: pass@1" in (out / "report.md").read_text()

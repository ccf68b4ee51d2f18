"""The whole pipeline at CI size: every stage runs, is evaluated and reported, the R1-Zero summary is written
by the run; a failed stage stops it, and a rerun skips finished stages."""

from __future__ import annotations

import json
import subprocess
import sys

ZERO_ROWS = ["base", "zero", "zero-seed1", "zero-random", "base-nothink", "zero-nothink"]
R1_ROWS = ["base", "sft", "grpo", "rejection-sft", "student-distill", "student-grpo"]
SUMMARY_KEYS = ("eval_problems", "distinct_questions", "base_pass1", "zero_pass1", "base_reasoning_share",
                "zero_reasoning_share", "base_mean_length", "zero_mean_length", "random_reward_pass1",
                "no_reasoning_corpus_pass1", "start_checkpoint_sha256", "base_checkpoint_sha256")


def speedrun(out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)


def tables(report: str) -> list[list[str]]:
    """The stage names of each table in the report, in order."""
    found, current = [], None
    for line in report.splitlines():
        if line.startswith("| stage "):
            current = []
            found.append(current)
        elif line.startswith("| ") and current is not None and not line.startswith("|---"):
            current.append(line.split("|")[1].strip())
        elif not line.startswith("|"):
            current = None
    return found


def test_tiny_speedrun_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "speedrun"
    first = speedrun(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert tables(report) == [ZERO_ROWS, R1_ROWS]
    assert "| stage | pass@1 (%) | cons@2 (%) | reasoning (%) | length |" in report
    for stage in set(ZERO_ROWS + R1_ROWS):
        result = json.loads((out / f"{stage}.json").read_text())
        assert 0 <= result["pass@1"] <= 100 and 0 <= result["reasoning_share"] <= 100 and result["wall_s"] > 0
    for stage in ("base", "zero"):  # pass@k at temperature 1, k = 1, 2, 4
        assert list(json.loads((out / f"{stage}.json").read_text())["curve"]) == ["1", "2", "4"]
    summary = json.loads((out / "r1-zero" / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert len(summary["zero_pass1"]) == 2 and summary["distinct_questions"] >= 10 ** 6
    assert summary["start_checkpoint_sha256"] == summary["base_checkpoint_sha256"]  # no SFT before zero
    for plot in ("r1-zero.png", "pass-at-k.png", "losses.png", "grpo.png"):
        assert (out / plot).stat().st_size > 0, plot
    assert "Cost projection" in report and "nanoseek serve --model" in first.stdout
    traces = (out / "rejection.jsonl").read_text().splitlines()
    assert json.loads((out / "rejection.stats.json").read_text())["kept"] == len(traces)
    assert f"sft: {len(traces) + 16} conversations" in (out / "rejection-sft.log").read_text()  # traces + the mix
    assert "--template zero" in (out / "zero.log").read_text() and "$ nanoseek eval" in (out / "sft.log").read_text()

    # A stage that fails stops the run with a message naming it and keeps every finished stage.
    (out / "student-grpo.json").unlink()
    config = out / "student-base" / "latest" / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    failed = speedrun(out)
    assert failed.returncode == 1
    assert "stopped: stage student-grpo: `nanoseek grpo" in failed.stdout and "config.json" in failed.stdout
    assert not (out / "student-grpo.json").exists() and (out / "student-distill.json").exists()

    config.write_text(good)  # a rerun skips the finished stages and completes the rest
    again = speedrun(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [line.split()[1].rstrip(":") for line in again.stdout.splitlines() if "done before, skipped" in line]
    assert skipped == ["trunk", "student-base", "base", "base-nothink", "zero", "sft", "grpo", "rejection",
                       "rejection-sft", "student-distill", "zero-random", "zero-nothink", "zero-seed1"]
    assert "with 2 seeds: pass@1" in (out / "report.md").read_text()

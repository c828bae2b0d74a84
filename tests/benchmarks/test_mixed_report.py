"""The mixed-traffic report (``benchmarks.mixed``): W4 and S2 beside LMDeploy against #24's targets,
and the device script's dry run on the CPU (checkpoint, W4, our server under S2, the report)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import mixed
from tests.serve.serve_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def point(req_per_s: float, ttft_p99: float, out_tok: float | None = None) -> dict:
    return {"requests": 128, "failed": 0, "req_per_s": req_per_s,
            "output_tok_per_s": out_tok if out_tok is not None else req_per_s * 300,
            "ttft_p50_ms": ttft_p99 / 2, "ttft_p99_ms": ttft_p99, "tpot_p50_ms": 20.0,
            "tpot_p99_ms": 40.0}


W4 = {"date": "2026-12-08", "time_utc": "01:02:03", "commit": "abc1234",
      "device": "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04; torch 2.11.0+cu130",
      "model_shape": "InternVL3.5-8B",
      "w4": {"requests": 256, "requests_per_s": 6.5, "output_tokens_per_s": 2000.0,
             "input_tokens_per_s": 9000.0}}
LM_W4 = {"system": "lmdeploy 0.18.0",
         "w4": {"requests": 256, "requests_per_s": 5.0, "output_tokens_per_s": 1600.0,
                "input_tokens_per_s": 7000.0}}
# LMDeploy saturates at 4/s (8 and inf are within 5% of its best); we keep rising to inf
LM_S2 = {"curve": {"2.0": point(1.9, 900.0), "4.0": point(3.9, 2000.0), "8.0": point(4.0, 9000.0),
                   "inf": point(3.95, 20000.0)}}
S2 = {"curve": {"2.0": point(2.0, 300.0), "4.0": point(4.0, 800.0), "8.0": point(6.0, 3000.0),
                "inf": point(6.4, 9000.0, out_tok=1900.0)}}


def test_knee_is_the_lowest_rate_near_the_best():
    assert mixed.knee(LM_S2["curve"]) == "4.0"
    assert mixed.knee(S2["curve"]) == "inf"
    assert mixed.knee({}) is None


def test_checks_against_the_targets():
    got = {what: (v, met) for what, v, _, met in
           mixed.checks(W4["w4"], LM_W4["w4"], S2["curve"], LM_S2["curve"])}
    assert got["W4 requests/s / LMDeploy's"] == (pytest.approx(1.3), True)
    assert got["W4 output tokens/s / LMDeploy's"] == (pytest.approx(1.25), False)
    assert got["S2 TTFT p99 / LMDeploy's at its knee (4.0/s)"] == (pytest.approx(0.4), True)
    assert got["S2 saturation requests/s / LMDeploy's"] == (pytest.approx(1.6), True)
    assert got["S2 best output tokens/s / offline W4's"] == (pytest.approx(0.95), True)


def test_missing_numbers_are_not_judged():
    got = mixed.checks(W4["w4"], {}, S2["curve"], {})
    assert [met for *_, met in got] == [None, None, None, None, True]


def test_markdown_and_rows(tmp_path):
    table = mixed.markdown(W4, LM_W4, S2, LM_S2)
    assert "2026-12-08 01:02:03 UTC, commit abc1234" in table
    assert "Device: NVIDIA H100 80GB HBM3" in table and "InternVL3.5-8B" in table
    assert "| requests/s | 6.50 | 5.00 | 1.30 |" in table
    assert "| 4.0 | LMDeploy | 3.90 | 1,170 | 1,000 | 2,000 | 20.00 | 40.00 | 0 |" in table
    assert "| inf | vlmdeploy | 6.40 | 1,900 |" in table
    s2_table = table.split("| S2 rate /s |")[1].split("| target |")[0]
    rates = [row.split(" | ")[0][2:] for row in s2_table.splitlines() if " | vlmdeploy | " in row]
    assert rates == ["2.0", "4.0", "8.0", "inf"]
    assert "| W4 output tokens/s / LMDeploy's | 1.25 | ≥ 1.3 | no |" in table
    assert "ran on the same checkpoint in the same call" in table
    assert "LMDeploy was not measured" in mixed.markdown(W4, {}, S2, {})
    rows = mixed.w4_rows(W4, LM_W4)
    assert {(r["system"], r["metric"]) for r in rows} == {
        (s, m) for s in ("vlmdeploy", "lmdeploy-0.18")
        for m in ("requests_per_s", "output_tokens_per_s", "input_tokens_per_s")}
    assert all(r["workload"] == "W4" and r["commit"] == "abc1234" for r in rows)
    assert mixed.w4_rows({}, LM_W4) == []  # LMDeploy's rows only beside ours


def test_main_reads_what_exists(tmp_path):
    (tmp_path / "w4.json").write_text(json.dumps(W4))
    (tmp_path / "s2.json").write_text(json.dumps(S2))
    text = mixed.main(["--w4", str(tmp_path / "w4.json"), "--s2", str(tmp_path / "s2.json"),
                       "--lmdeploy-w4", str(tmp_path / "absent.json"),
                       "--out", str(tmp_path / "m.md"), "--csv", str(tmp_path / "r.csv")])
    assert (tmp_path / "m.md").read_text() == text
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert {r["system"] for r in rows} == {"vlmdeploy"}


def test_device_script_dry_run(tiny_ckpts, tmp_path):
    """W4 and S2 on the tiny shape through the script, ours alone (no LMDeploy on the CPU), at a
    2,048-token session (W4 scaled down to fit). The script finds the tiny -HF checkpoint complete
    and keeps it (the MoE script's dry run in test_engine_bench.py writes one)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpts["hf"], ckpt, copy_function=os.link)
    (ckpt / ".vlmdeploy-complete").touch()
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PRESET": "tiny", "CKPT": str(ckpt),
           "SYSTEMS": "vlmdeploy", "STAGES": "w4,s2", "N4": "2", "S2_N": "2", "RATES": "inf",
           "SESSION_LEN": "2048", "PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "benchmarks/mixed_device.sh"], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True, timeout=600)
    assert "exists; not rewritten" in proc.stdout
    w4 = json.loads((out / "w4.json").read_text())
    assert w4["w4"]["requests"] == 2 and w4["settings"]["session_len"] == 2048
    assert json.loads((out / "s2.json").read_text())["curve"]["inf"]["failed"] == 0
    table = (out / "mixed.md").read_text()
    assert "| inf | vlmdeploy |" in table and "LMDeploy was not measured" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["workload"] for r in rows} == {"W4", "S2@inf"}

"""The engine benchmark runs end to end (tiny checkpoint, CPU, a handful of requests), writes its
table and appends its rows to the results CSV, so a device call spends its time measuring, not
debugging the harness."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import engine as bench
from benchmarks import engine_report as report
from benchmarks import results, step_stats

ROOT = Path(__file__).resolve().parents[2]


def fake_results(**extra) -> dict:
    res = {
        "date": "2026-11-28",
        "time_utc": "10:11:12",
        "commit": "abc1234",
        "device": "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04; torch 2.11.0+cu130",
        "model_shape": "InternVL3.5-8B",
        "model": "/tmp/ivl8b-hf",
        "load_format": "auto",
        "settings": {
            "session_len": 8192,
            "enable_prefix_caching": True,
            "cache_max_entry_count": 0.8,
            "n2": 256,
            "n3": 256,
        },
        "init_s": 41.0,
        "kv_tokens": 352_000,
        "peak_gib": 66.5,
        "peak_reserved_gib": 68.25,
        "w1": {"ttft_ms": 25.0, "tpot_ms": 5.5, "output_tokens": 512},
        "chat2": {"ttft1_ms": 200.0, "ttft2_ms": 40.0, "ratio": 0.2, "cached_tokens": 2688},
        "w2": {"requests": 256, "requests_per_s": 11.5},
        "w3": {"error": "RuntimeError: CUDA out of memory"},
        "transformers_w1": {"ttft_ms": 150.0, "tpot_ms": 27.0},
    }
    res.update(extra)
    return res


def test_engine_benchmark_smoke(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_COMMIT", "feedbee")
    monkeypatch.setattr(bench, "decode_bandwidth", lambda: 1e9)  # a GPU's copy bandwidth, say
    out, raw, csv = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "results.csv"
    lmdeploy = tmp_path / "results.json"  # the reference harness's result format
    lmdeploy.write_text(
        json.dumps(
            {
                "w1": {"ttft_ms": 100.0, "tpot_ms": 6.7},
                "w2": {"req_per_s": 7.8},
                "w3": {"output_tok_per_s": 9300.0},
            }
        )
    )
    # W3 is W2's batch runner at other sizes (512 tokens a request): the MoE script's dry run
    # below runs it end to end, rows included
    args = (f"--model {tiny_ckpts['hf']} --n2 2 --session-len 4096 --baseline "
            "--repeats 2 --workloads w1,chat2,w2")
    bench.main([*args.split(), "--out", str(out), "--json", str(raw), "--csv", str(csv),
                "--lmdeploy", str(lmdeploy)])
    res = json.loads(raw.read_text())
    assert res["commit"] == "feedbee" and res["model_shape"] == Path(tiny_ckpts["hf"]).name
    assert res["w1"]["output_tokens"] == 512 and res["w1"]["tpot_ms"] > 0
    # W1's decode step against the time to read the tiny model's weights at that bandwidth
    assert res["w1"]["tpot_over_floor"] == pytest.approx(
        res["w1"]["tpot_ms"] / res["w1"]["tpot_floor_ms"], rel=1e-2)
    assert res["w2"]["requests"] == 2 and res["w2"]["output_tokens_per_s"] > 0
    assert res["transformers_w1"]["tpot_ms"] > 0
    # repeated runs each bring their own images: every run encodes all of its tiles (no cache hit)
    runs = res["w2"]["run_timelines"]
    assert len(res["w2"]["runs"]) == len(runs) == 2
    assert runs[0]["tiles"] == runs[1]["tiles"] > 0 and runs[0]["steps"] > 0
    assert runs[0]["prefill_steps"] >= 1 and runs[0]["decode_steps"] >= 1
    first = runs[0]["first_steps"]  # the ramp, step by step, in order
    assert 1 <= len(first) <= step_stats.FIRST_STEPS and all(len(r) == 7 for r in first)
    assert all(0 <= r[2] <= r[1] for r in first)  # a step's launch is part of it
    assert first[0][4] > 0 and first[0][5] > 0  # the first step prefills and encodes
    assert 0 < runs[0]["prefill_launch_s"] <= runs[0]["prefill_steps_s"]
    assert [r[0] for r in first] == sorted(r[0] for r in first)
    chat = res["chat2"]
    assert chat["ttft1_ms"] > 0 and chat["ttft2_ms"] > 0 and chat["output_tokens"] == [64, 64]
    assert chat["ratio"] == pytest.approx(chat["ttft2_ms"] / chat["ttft1_ms"])
    # prefix caching is on by default: turn 2 reuses at least the full blocks of turn 1's prompt
    assert res["settings"]["enable_prefix_caching"] is True
    assert chat["cached_tokens"] >= chat["turn1_input_tokens"] // 64 * 64 > 0
    assert chat["turn2_input_tokens"] > chat["turn1_input_tokens"]
    table = out.read_text()
    assert "| W1 TPOT ms |" in table and "| 6.70 |" in table and "| 9,300 |" in table
    assert "| W1 TPOT / weight-read floor |" in table and "W1 TPOT floor: " in table
    assert "| chat2 TTFT turn 2 / turn 1 |" in table and "LMDeploy (this call)" in table
    assert "commit feedbee" in table.splitlines()[0]
    # the run's rows, every one stamped alike; LMDeploy ran "in the same call" here
    rows = results.read(csv)
    assert {(r["date"], r["time_utc"], r["commit"], r["device"]) for r in rows} == {
        (res["date"], res["time_utc"], "feedbee", res["device"])}
    got = {(r["system"], r["workload"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("vlmdeploy", "W1", "tpot_ms")] == pytest.approx(res["w1"]["tpot_ms"], rel=1e-3)
    assert got[("vlmdeploy", "W2", "requests_per_s")] == pytest.approx(
        res["w2"]["requests_per_s"], rel=1e-3)
    assert got[("vlmdeploy", "chat2", "ttft_ratio")] == pytest.approx(chat["ratio"], rel=1e-3)
    assert got[("vlmdeploy", "engine", "kv_cache_tokens")] == res["kv_tokens"]
    assert got[("lmdeploy-0.18", "W3", "output_tokens_per_s")] == 9300
    assert got[("transformers", "W1", "ttft_ms")] > 0
    assert not list(tmp_path.glob("*.svg"))  # history is data: no dated plot beside the table


def test_prefix_caching_off_caches_nothing(tiny_ckpts, tmp_path):
    raw = tmp_path / "bench.json"
    args = f"--model {tiny_ckpts['hf']} --workloads chat2 --no-prefix-caching --session-len 4096"
    bench.main([*args.split(), "--json", str(raw)])
    res = json.loads(raw.read_text())
    assert res["settings"]["enable_prefix_caching"] is False
    assert res["chat2"]["cached_tokens"] == 0 and "w1" not in res


def test_markdown_quoted_lmdeploy_targets_and_errors():
    note = "quoted from the 2026-11-27 anchor run"
    table = report.markdown(fake_results(), report.LMDEPLOY_QUOTED, note=note)
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("| metric |"))
    assert "LMDeploy 0.18 (quoted, not this call)" in head and "| target | met |" in head
    row = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert row["W1 TPOT ms"] == "| W1 TPOT ms | 5.50 | ≤ 5.6 | yes | 6.69 | 27.00 |"
    assert row["W1 TTFT ms"] == "| W1 TTFT ms | 25.00 | ≤ 30 | yes | 112 | 150 |"
    assert row["W2 requests/s"] == "| W2 requests/s | 11.50 | ≥ 11 | yes | 7.81 | – |"
    assert row["W3 output tokens/s"] == "| W3 output tokens/s | error | ≥ 14,000 | – | 9,317 | – |"
    assert row["chat2 TTFT turn 2 / turn 1"].startswith(
        "| chat2 TTFT turn 2 / turn 1 | 0.20 | < 0.3 | yes"
    )
    assert row["chat2 turn-2 cached tokens"].startswith("| chat2 turn-2 cached tokens | 2,688 |")
    assert row["KV cache tokens"] == "| KV cache tokens | 352,000 | ≥ 340,000 | yes | 347,648 | – |"
    assert row["peak GPU memory reserved GiB"].startswith(
        "| peak GPU memory reserved GiB | 68.25 |"
    )
    assert f"LMDeploy column: {note}" in table
    assert "- w3: RuntimeError: CUDA out of memory" in table
    assert "prefix caching on" in table and "KV cache 352,000 tokens" in table
    assert "2026-11-28 10:11:12 UTC" in lines[0] and "commit abc1234" in lines[0]
    assert "Device: NVIDIA H100 80GB HBM3" in table and "InternVL3.5-8B" in table


def test_markdown_target_missed_and_skipped():
    res = fake_results(w1={"ttft_ms": 45.0, "tpot_ms": 7.0}, chat2={"skipped": "time limit"})
    table = report.markdown(res)
    assert "| W1 TPOT ms | 7.00 | ≤ 5.6 | no | – | 27.00 |" in table
    assert "| chat2 TTFT turn 1 ms | skipped |" in table and "- chat2: time limit" in table
    assert "| metric | vlmdeploy | target | met | LMDeploy | transformers |" in table


def test_markdown_targets_follow_the_shape_and_formats():
    """The 8B targets apply to the 8B shape only; fp8+kv8 has its own; other shapes are held to
    LMDeploy's numbers from the same call, and have none without them."""
    lm = {"w1": {"ttft_ms": 90.0, "tpot_ms": 8.0}, "w2": {"req_per_s": 8.0},
          "w3": {"output_tok_per_s": 10_000.0}}
    w3 = {"output_tokens_per_s": 12_000.0}
    big = fake_results(model_shape="InternVL3.5-14B", w3=w3)
    table = report.markdown(big, lm)
    assert "| W1 TPOT ms | 5.50 | ≤ 0.85× LMDeploy | yes | 8.00 |" in table
    assert "| W2 requests/s | 11.50 | ≥ 1.3× LMDeploy | yes | 8.00 |" in table
    assert "| W3 output tokens/s | 12,000 | ≥ 1.3× LMDeploy | no | 10,000 |" in table
    assert "| W1 TTFT ms | 25.00 |  |  |" in table and "340,000" not in table
    alone = report.markdown(big)
    assert "| W2 requests/s | 11.50 |  |  |" in alone
    assert "| chat2 TTFT turn 2 / turn 1 | 0.20 | < 0.3 | yes" in alone
    quoted = report.markdown(big, lm, note="quoted")  # not the same call: no relative target
    assert "| W2 requests/s | 11.50 |  |  |" in quoted
    quant = fake_results(w3=w3, settings={**fake_results()["settings"], "model_format": "fp8",
                                          "quant_policy": 8})
    table = report.markdown(quant, lm)
    assert "| W1 TPOT ms | 5.50 | ≤ 3.2 | no |" in table
    assert "| W3 output tokens/s | 12,000 | ≥ 18,000 | no |" in table
    assert "| W1 TTFT ms | 25.00 |  |  |" in table


def test_w3s_is_held_to_within_5_percent_of_w3_and_recorded():
    """Constrained requests mixed into W3 may cost the batch at most 5% of W3's throughput; the
    ratio is a row of the table and of the history, and missing where W3s did not run."""
    res = fake_results(w3={"output_tokens_per_s": 12_000.0},
                       w3s={"output_tokens_per_s": 11_500.0})
    table = report.markdown(res)
    assert "| W3s output tokens/s | 11,500 |  |  |" in table
    assert "| W3s / W3 output tokens/s | 0.96 | ≥ 0.95 | yes |" in table
    slow = fake_results(w3={"output_tokens_per_s": 12_000.0},
                        w3s={"output_tokens_per_s": 9_000.0})
    assert "| W3s / W3 output tokens/s | 0.75 | ≥ 0.95 | no |" in report.markdown(slow)
    rows = {(r["workload"], r["metric"]): r["value"] for r in report.history_rows(res)}
    assert rows[("W3s", "over_w3")] == "0.9583"
    assert ("W3s", "over_w3") not in {
        (r["workload"], r["metric"]) for r in report.history_rows(fake_results())}


def test_lmdeploy_harness_results():
    """The anchor harness's results.json: medians, engine_config blocks, torch peak in MiB."""
    lm = {
        "w1": {"ttft_ms": 113.0, "tpot_ms": 6.69, "ttft_ms_median_of_runs": 112.3},
        "w2": {"req_per_s": 7.5},
        "w3": {"output_tok_per_s": 9109.0},
        "engine_config": {"num_gpu_blocks": 5432, "block_size": 64},
        "torch_max_memory_allocated_mib": 66226.0,
        "torch_max_memory_reserved_mib": 68248.0,
    }
    v = report.lmdeploy_values(lm)
    assert v["W1 TTFT ms"] == 112.3 and v["KV cache tokens"] == 347_648
    assert v["peak GPU memory allocated GiB"] == pytest.approx(64.67, abs=0.01)
    assert report.lmdeploy_values(None)["W2 requests/s"] is None


def test_render_saved_results(tmp_path):
    saved, out, csv = tmp_path / "engine.json", tmp_path / "engine.md", tmp_path / "results.csv"
    saved.write_text(json.dumps(fake_results()))
    bench.main(["--render", str(saved), "--out", str(out), "--csv", str(csv),
                "--lmdeploy-note", "quoted"])
    table = out.read_text()
    assert "LMDeploy 0.18 (quoted, not this call)" in table and "LMDeploy column: quoted" in table
    rows = results.read(csv)
    # a quoted baseline is not a measurement of this run: only our and transformers' numbers
    assert {r["system"] for r in rows} == {"vlmdeploy", "transformers"}
    assert all(r["commit"] == "abc1234" and r["time_utc"] == "10:11:12" for r in rows)


def test_table_says_which_baselines_ran():
    res = fake_results()
    text = report.markdown(res, None, None, None)
    assert "transformers column was measured in the same call" in text
    del res["transformers_w1"]
    text = report.markdown(res, None, None, None)
    assert "transformers was not measured" in text and "LMDeploy was not measured" in text

def test_history_rows_of_saved_results():
    res = fake_results(w2={"requests": 256, "requests_per_s": 11.5, "runs": [11.5, 11.75]},
                       w1={"ttft_ms": 25.0, "tpot_ms": 5.5, "ttft_runs": 11, "ttft_min_ms": 20.0,
                           "ttft_max_ms": 31.25})
    lm = {"w1": {"ttft_ms": 100.0, "tpot_ms": 6.7}, "w2": {"req_per_s": 7.8}}
    rows = {(r["system"], r["workload"], r["metric"]): r for r in report.history_rows(res, lm)}
    assert rows[("vlmdeploy", "W2", "requests_per_s")]["value"] == "11.5"
    assert rows[("vlmdeploy", "W2", "requests_per_s")]["note"] == "runs 11.5, 11.75"
    assert rows[("vlmdeploy", "W1", "ttft_ms")]["note"] == "median of 11, 20.0–31.2"
    assert rows[("lmdeploy-0.18", "W1", "tpot_ms")]["value"] == "6.7"
    assert rows[("vlmdeploy", "engine", "start_s")]["unit"] == "s"
    # W3 failed: no number, no row; LMDeploy's missing W3 and chat2 neither
    assert not any(w == "W3" for _, w, _ in rows)
    assert ("lmdeploy-0.18", "chat2", "ttft_ratio") not in rows
    assert all(r["model_shape"] == "InternVL3.5-8B" for r in rows.values())



@pytest.mark.parametrize("settings, system", [
    ({"model_format": "fp8", "quant_policy": 8}, "vlmdeploy fp8+kv8"),
    ({"model_format": "hf", "quant_policy": 4}, "vlmdeploy kv4"),
    ({"model_format": "awq", "quant_policy": 0}, "vlmdeploy awq"),
    ({"model_format": None, "quant_policy": 0}, "vlmdeploy"),
])
def test_quantised_runs_have_their_own_system_in_the_history(settings, system):
    res = fake_results(w1={"ttft_ms": 25.0, "tpot_ms": 3.1, "ttft_runs": 1, "ttft_min_ms": 25.0,
                           "ttft_max_ms": 25.0})
    res["settings"] |= settings
    rows = report.history_rows(res, {"w1": {"tpot_ms": 4.3}})
    assert {r["system"] for r in rows} - {"transformers"} == {system, "lmdeploy-0.18"}
    ours = next(r for r in rows if r["system"] == system and r["metric"] == "tpot_ms")
    assert ("quant_policy" in ours["note"]) == bool(settings["quant_policy"])

@pytest.mark.parametrize(
    "script",
    ["device_run.sh", "s1_device.sh", "device_lib.sh", "quant_device.sh", "mixed_device.sh"],
)
def test_device_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_moe_device_script_runs_a_moe_shape_end_to_end(tmp_path):
    """The MoE device call's dry run on the CPU: checkpoint, our run, the table and its rows."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PRESET": "tiny-moe",
           "CKPT": str(tmp_path / "ckpt"), "WITH_LMDEPLOY": "0", "WORKLOADS": "w2,w3",
           "ENGINE_ARGS": "--n2 2 --n3 2", "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", "benchmarks/moe_device.sh"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    table = (tmp_path / "out" / "engine.md").read_text()
    assert "InternVL3.5-tiny-moe" in table
    res = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert res["w3"]["requests"] == 2 and res["w3"]["output_tokens_per_s"] > 0
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert {r["workload"] for r in rows} >= {"W2", "W3"}
    assert all(r["model_shape"] == "InternVL3.5-tiny-moe" for r in rows)


def test_gc_pauses_count_full_collections():
    import gc

    with step_stats.GcPauses() as pauses:
        gc.collect(0)
        gc.collect()  # a full collection
    s = pauses.summary()
    assert s["gc_full"] == 1 and 0 < s["gc_full_s"] <= s["gc_s"]
    assert pauses not in gc.callbacks


def test_w4_runs_its_mix_through_the_engine(tiny_ckpts, tmp_path):
    raw = tmp_path / "bench.json"
    bench.main(f"--model {tiny_ckpts['hf']} --workloads w4 --n4 4 --session-len 2048 "
               f"--json {raw}".split())
    w4 = json.loads(raw.read_text())["w4"]
    assert w4["requests"] == 4 and w4["output_tokens_per_s"] > 0
    assert w4["short_outputs"] == 0  # every request ran to its own length
    assert w4["mix"]["requests"] == 4 and w4["mix"]["output_tokens"] > 0


def test_w3s_mixes_constrained_requests_into_w3(tiny_ckpts, tmp_path):
    raw = tmp_path / "bench.json"
    bench.main(f"--model {tiny_ckpts['hf']} --workloads w3s --n3 8 --session-len 2048 "
               f"--json {raw}".split())
    w3s = json.loads(raw.read_text())["w3s"]
    assert w3s["requests"] == 8 and w3s["guided_requests"] == 2
    assert w3s["short_outputs"] == 0  # the constrained ones too ran to 512 tokens
    assert w3s["unconstrained_output_tokens_per_s"] == pytest.approx(
        w3s["output_tokens_per_s"] * 6 / 8)


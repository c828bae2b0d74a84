"""The host sampler runs a small batch on the CPU and reports the engine thread's stacks beside the
step records."""

from __future__ import annotations

from tools.diagnostics import host_sampler


def test_host_sampler_reports_steps_and_stacks(tiny_ckpts, tmp_path):
    out = tmp_path / "host.md"
    text = host_sampler.main(["--model", str(tiny_ckpts["hf"]), "--device-type", "cpu", "--n", "4",
                        "--n-out", "4", "--seconds", "2", "--prep-workers", "1", "--out", str(out)])
    assert out.read_text() == text and "1 preparation threads" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms |" not in line]
    steps = [r for r in rows if r.split("|")[1].strip().replace(".", "").isdigit()]
    assert steps and all(float(r.split("|")[3]) <= float(r.split("|")[2]) for r in steps)
    header = next(line for line in text.splitlines() if line.startswith("| start ms"))
    cols = [c.strip() for c in header.split("|")[1:-1]]
    run = cols.index("ModelRunner.forward ms (wall/CPU)")
    vision = cols.index("VisionStage.attach_embeddings ms (wall/CPU)")
    cells = [[float(c.split("/")[0]) for c in r.split("|")[1:-1]] for r in steps]
    cpu = [[float(c.split("/")[-1]) for c in r.split("|")[1:-1]] for r in steps]
    # CPU time within the wall, up to the clocks' granularity and the reads around the call
    assert all(c[run] <= w[run] * 1.05 + 2.0 for c, w in zip(cpu, cells))
    # each step with work ran a forward, timed within the step's launch time
    worked = [c for c in cells if c[3] + c[4] > 0]
    assert worked and all(0 < c[run] <= c[2] + 1.0 for c in worked)
    assert all(c[vision] <= c[2] for c in cells) and any(c[vision] > 0 for c in cells)
    loop_rows = [line for line in text.splitlines()
                 if line.startswith("| vlmdeploy/engine/engine_loop.py ")]
    assert any(line.endswith("| 100.0% |") for line in loop_rows)  # every sample: the loop
    assert "vlmdeploy/engine/llm_engine.py _launch" in text  # where a step's launch spends time

"""The preparation benchmark runs on the CPU and reports a request's thread time and GIL time."""

from __future__ import annotations

from tools.diagnostics import prep_gil


def test_prep_gil_reports_thread_and_gil_time(tiny_ckpts, capsys):
    res = prep_gil.main(["--model", str(tiny_ckpts["hf"]), "--side", "448", "--n", "6",
                       "--n-text", "30", "--threads", "2"])
    assert res["requests"] == 6 and res["threads"] == 2
    assert res["ms_per_request"] > 0 and res["gil_ms_per_request"] >= 0
    assert res["longest_wait_ms"] > 0
    assert "448x448 JPEG + 30 text tokens, 2 thread(s)" in capsys.readouterr().out

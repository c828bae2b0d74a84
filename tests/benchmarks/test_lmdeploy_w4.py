"""The LMDeploy W4 runner sends LMDeploy's pipeline the request list vlmdeploy's W4 runs (same
seed, same session), with each request's GenerationConfig, and reports what our W4 reports. A
stand-in ``lmdeploy`` module records what the runner asks of it (LMDeploy is only on the GPU
machine)."""

from __future__ import annotations

import json

from benchmarks import lmdeploy_w4
from benchmarks.w4 import W4Spec, w4_requests


def test_lmdeploy_gets_the_requests_our_w4_runs(fake_lmdeploy, tiny_ckpts, tmp_path):
    out = tmp_path / "lm.json"
    lmdeploy_w4.main(["--model", tiny_ckpts["hf"], "--n4", "12", "--json", str(out)])
    calls = fake_lmdeploy
    assert calls["engine"] == {"session_len": 8192, "cache_max_entry_count": 0.8,
                               "enable_prefix_caching": True}
    assert calls["closed"] and len(calls["batches"]) == 2  # the warm-up, then the timed batch
    # what benchmarks.engine's run_w4 builds with vlmdeploy's tokenizer (ids without specials)
    from vlmdeploy.frontend.tokenizer import Tokenizer

    ours = w4_requests(Tokenizer(tiny_ckpts["hf"]),
                       lmdeploy_w4.SEED, W4Spec.for_session(8192, 12))
    prompts, configs = calls["batches"][1]
    assert prompts == [m for m, _ in ours] and configs == [g for _, g in ours]
    w4 = json.loads(out.read_text())["w4"]
    assert w4["requests"] == 12 and w4["short_outputs"] == 0
    assert w4["output_tokens_per_s"] > 0 and w4["mix"]["requests"] == 12

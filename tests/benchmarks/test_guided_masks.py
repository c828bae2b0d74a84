"""benchmarks.guided_masks replays guided rows on the host: a step's masks made on this thread by
pools of different sizes, or on the mask thread beside running Python, are the same masks, so the
same tokens; each way reports its cost."""

from __future__ import annotations

import json

from benchmarks import guided_masks


def test_every_way_gives_the_same_tokens_and_reports_its_cost(tmp_path):
    out = tmp_path / "masks.json"
    result = guided_masks.main(["--preset", "tiny", "--rows", "3", "--steps", "16",
                                "--busy-ms", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    ways = [result[k] for k in ("one_thread", "pool", "beside_python")]
    for r in ways:
        assert 0 < r["ready_ms_median"] <= r["ready_ms_p90"] and r["advance_ms_mean"] > 0
    assert len({r["tokens_sha256"] for r in ways}) == 1
    assert result["beside_python"]["ready_ms_median"] >= 1.0  # it waited for the Python
    assert result["one_after_the_other_ms"] == 1.0 + result["one_thread"]["ready_ms_median"]
    other = guided_masks.replay("tiny", 3, 16, threads=2, seed=1)
    assert other["tokens_sha256"] != ways[0]["tokens_sha256"]  # the digest sees the tokens

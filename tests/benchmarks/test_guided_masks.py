"""benchmarks.guided_masks replays guided rows on the host: a step's masks filled one row after
another and on llguidance's pool are the same masks, so the same tokens; each reports its cost."""

from __future__ import annotations

import json

from benchmarks import guided_masks


def test_both_ways_give_the_same_tokens_and_report_their_cost(tmp_path):
    out = tmp_path / "masks.json"
    result = guided_masks.main(["--preset", "tiny", "--rows", "3", "--steps", "16",
                                "--json", str(out)])
    assert json.loads(out.read_text()) == result
    one, together = result["one_at_a_time"], result["pool"]
    for r in (one, together):
        assert 0 < r["fill_ms_median"] <= r["fill_ms_p90"] and r["advance_ms_mean"] > 0
    assert one["tokens_sha256"] == together["tokens_sha256"]
    other = guided_masks.replay("tiny", 3, 16, threads=2, seed=1)
    assert other["tokens_sha256"] != together["tokens_sha256"]  # the digest sees the tokens

"""A video prompt on our engine against transformers' InternVLForConditionalGeneration on the same
weights (fp32, CPU), one test per checkpoint layout: with the same frames (tiles) and the card's
token layout, greedy tokens are identical and last-token logits agree within 1e-4 (relative)."""

from __future__ import annotations

import pytest

pytest.importorskip("av")

import torch  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402
from video_samples import make_video  # noqa: E402

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline  # noqa: E402
from vlmdeploy.vl import load_video  # noqa: E402
from vlmdeploy.vl.tiling import as_pixel_values  # noqa: E402

STEPS = 8


@pytest.mark.slow
@pytest.mark.parametrize("ours,ref", [("original", "hf"), ("hf", "hf")])
def test_video_greedy_tokens_match_transformers(tiny_ckpts, ours, ref):
    model = InternVLForConditionalGeneration.from_pretrained(
        tiny_ckpts[ref], dtype=torch.float32).eval()
    video = load_video(make_video(30, fps=10, size=(96, 64)), num_frames=4)
    prompt = ("What happens in the video?", video)
    with pipeline(tiny_ckpts[ours],
                  backend_config=PytorchEngineConfig(session_len=4096, block_size=16)) as pipe:
        seen: list[torch.Tensor] = []
        runner = pipe.engine.core.runner
        run = runner.forward

        def spy(batch, rows, *args):
            logits = run(batch, rows, *args)
            seen.append(logits[0].clone())
            return logits

        gen = GenerationConfig(max_new_tokens=STEPS, min_new_tokens=STEPS)
        req = pipe.prepare_sync(prompt, gen)
        runner.forward = spy
        try:
            tokens = pipe(prompt, gen_config=gen).token_ids
        finally:
            runner.forward = run
    assert len(req.images) == 4 and req.prompt.count("Frame") == 4
    pixels = torch.cat([as_pixel_values(im.pixel_values) for im in req.images])  # (4, 3, 448, 448)
    out = model.generate(input_ids=torch.tensor([req.token_ids]),
                         attention_mask=torch.ones(1, len(req.token_ids), dtype=torch.long),
                         pixel_values=pixels, do_sample=False, max_new_tokens=STEPS,
                         min_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True)
    assert tokens == out.sequences[0, len(req.token_ids):].tolist()
    for ours_logits, ref_logits in zip(seen, out.logits, strict=True):
        ref_logits = ref_logits[0].float()
        err = float((ours_logits - ref_logits).abs().max() / ref_logits.abs().max())
        assert err <= 1e-4

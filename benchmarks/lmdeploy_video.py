"""The video workload through LMDeploy's pipeline, to set beside ``benchmarks/video.py`` from one
device call: the same videos, questions and output lengths (the same seeds and tokenizer), the
same engine settings (``session_len`` 16384, ``cache_max_entry_count`` 0.8, prefix caching on),
greedy, ``ignore_eos``.

LMDeploy 0.18 takes no video for InternVL, so each video goes as its sampled frames, numbered
images: the frames are sampled and decoded by vlmdeploy's own sampler (``vlmdeploy.vl.load_video``,
the model card's rule), so both engines see the same frames, once, before the clock starts, and
each is sent as a JPEG ``data:`` URL (``--jpeg-quality``). LMDeploy's InternVL prompt builder
writes each image part as ``<img><IMG_CONTEXT></img>\\n`` and joins it with the text parts in
order, so the parts ``Frame1: ``, frame, ``Frame2: ``, frame, ..., question give the model card's
video prompt, the text vlmdeploy renders for a ``video_url`` part. The frames are 448×448, one
tile each for LMDeploy's tiling as for ours.

Reported as ``benchmarks/video.py`` reports: the batch's requests/s and output tokens/s (decoding
the JPEGs and tiling inside the timed region, as for every image LMDeploy is sent), and the TTFT
of a first and a second question on one video (``stream_infer``, submit → first chunk with a
token). It runs where LMDeploy is importable (``benchmarks/video_device.sh``):

    PYTHONPATH=/tmp/site:anchors/.site:. python3 -m benchmarks.lmdeploy_video \\
        --model /tmp/ivl35-8b --json $OUT/lmdeploy_video.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.lmdeploy_w4 import _Encoder
from benchmarks.video import (
    VideoRequest,
    add_workload_args,
    chat_case,
    follow_up,
    run_parts,
    settings,
    stamp_fields,
    video_requests,
)


def frame_urls(video: bytes, num_frames: int, quality: int) -> list[str]:
    """The video's ``num_frames`` frames as vlmdeploy samples them, each a JPEG ``data:`` URL."""
    from vlmdeploy.vl import load_video

    urls = []
    for frame in load_video(video, num_frames=num_frames).frames:
        buf = io.BytesIO()
        frame.save(buf, "JPEG", quality=quality)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def frames_message(urls: list[str], question: str) -> list[dict]:
    """One user turn: ``Frame{i}: `` before each frame, then the question."""
    content: list[dict] = []
    for i, url in enumerate(urls, 1):
        content += [{"type": "text", "text": f"Frame{i}: "},
                    {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def messages_of(reqs: list[VideoRequest], args: argparse.Namespace) -> list[list[dict]]:
    """The requests as LMDeploy takes them; the frames decoded and encoded in parallel."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        urls = pool.map(lambda r: frame_urls(r.video, args.frames, args.jpeg_quality), reqs)
        return [frames_message(u, r.question) for u, r in zip(urls, reqs)]


def run_batch(pipe, tok, gen, args: argparse.Namespace) -> dict:
    warm = video_requests(tok, 1, args.text_tokens, args.seed + 1000)
    pipe(messages_of(warm, args), gen_config=[gen])
    reqs = video_requests(tok, args.requests, args.text_tokens, args.seed)
    t = time.perf_counter()
    prompts = messages_of(reqs, args)
    frames_s = time.perf_counter() - t
    t0 = time.perf_counter()
    out = pipe(prompts, gen_config=[gen] * len(prompts))
    wall = time.perf_counter() - t0
    n_in = sum(r.input_token_len for r in out)
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "input_tokens_per_s": n_in / wall,
        "output_tokens_per_s": sum(r.generate_token_len for r in out) / wall,
        "input_tokens_mean": n_in / len(prompts),
        "short_outputs": sum(r.generate_token_len != gen.max_new_tokens for r in out),
        "frames_untimed_s": round(frames_s, 2),  # sampling and JPEG encoding, before the clock
    }


def chat_turn(pipe, messages: list[dict], gen) -> dict:
    """One streamed turn: TTFT (submit → first chunk with a token) and the answer."""
    t0, first, parts, last = time.perf_counter(), None, [], None
    for out in pipe.stream_infer([messages], gen_config=gen):
        if first is None and out.generate_token_len >= 1:
            first = time.perf_counter()
        parts.append(out.text or "")
        last = out
    if first is None or last is None:
        raise RuntimeError("the chat turn streamed no token")
    return {"ttft_ms": (first - t0) * 1e3, "text": "".join(parts),
            "input_tokens": last.input_token_len, "output_tokens": last.generate_token_len}


def run_chat(pipe, tok, gen, args: argparse.Namespace) -> dict:
    def two_questions(seed: int) -> tuple[dict, dict]:
        req, question = chat_case(tok, args.text_tokens, seed)
        (first,) = messages_of([req], args)
        t1 = chat_turn(pipe, first, gen)
        return t1, chat_turn(pipe, follow_up(first, t1["text"], question), gen)

    two_questions(args.chat_seed + 1000)  # warm-up on another video
    t1, t2 = two_questions(args.chat_seed)
    return {"ttft1_ms": t1["ttft_ms"], "ttft2_ms": t2["ttft_ms"],
            "ratio": t2["ttft_ms"] / t1["ttft_ms"], "turn1_input_tokens": t1["input_tokens"],
            "turn2_input_tokens": t2["input_tokens"],
            "output_tokens": [t1["output_tokens"], t2["output_tokens"]]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (-HF format)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    add_workload_args(ap)
    args = ap.parse_args(argv)
    if not args.json:
        ap.error("--json is needed")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import lmdeploy
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
    from transformers import AutoTokenizer

    tok = _Encoder(AutoTokenizer.from_pretrained(args.model))
    gen = GenerationConfig(max_new_tokens=args.out_tokens, ignore_eos=True, do_sample=False)
    cfg = PytorchEngineConfig(session_len=args.session_len,
                              cache_max_entry_count=args.cache_max_entry_count,
                              enable_prefix_caching=args.prefix_caching)
    res: dict = stamp_fields() | {
        "system": f"LMDeploy {lmdeploy.__version__}", "model": args.model,
        "settings": settings(args) | {"jpeg_quality": args.jpeg_quality}}

    def save() -> None:
        Path(args.json).write_text(json.dumps(res, indent=1))

    t = time.perf_counter()
    pipe = pipeline(args.model, backend_config=cfg)
    res["init_s"] = round(time.perf_counter() - t, 1)
    try:
        run_parts(res, {"video": lambda: run_batch(pipe, tok, gen, args),
                        "video_chat": lambda: run_chat(pipe, tok, gen, args)},
                  args.workloads, save)
    finally:
        pipe.close()
    save()
    return res


if __name__ == "__main__":
    main()

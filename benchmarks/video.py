"""The video workload: many requests of one video each, and a second question on the same video.

* video batch: ``--requests`` (64) requests at once, each its own synthetic video (an H.264 MP4
  of moving shapes over a seeded background, 448×448, 3 s at 24 fps) sent as a base64
  ``data:video/mp4`` URL in a ``video_url`` part with ``num_frames`` ``--frames`` (32), then
  ~``--text-tokens`` (30) text tokens; ``--out-tokens`` (128) output tokens, greedy, ``ignore_eos``
  → requests/s, output tokens/s. Decoding, sampling and tiling the frames are inside the timed
  region.
* video chat: one video and a question, then the conversation + the answer + a second question
  on the same video, each streamed → TTFT of both (submit → first chunk with a token) and their
  ratio: the second question finds the frames' embeddings and the prompt's prefix cached.

Frames are 448×448 so that each is one tile for every engine: LMDeploy, which takes a video only
as numbered images (``benchmarks/lmdeploy_video.py`` sends it the same frames), tiles an image of
another shape by its own rules. The workload is a pure function of the seed and the tokenizer,
so the LMDeploy runner builds the very same videos and texts.

    python -m benchmarks.video --preset 8b --json video.json          # dummy weights
    python -m benchmarks.video --model /tmp/ivl35-8b --lmdeploy lmdeploy_video.json \\
        --json video.json --csv results.csv --out video.md             # beside LMDeploy
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import results
from benchmarks.engine_report import LMDEPLOY
from benchmarks.workloads import text_of

# benchmarks.engine and vlmdeploy's pipeline are imported where they are used: the LMDeploy
# runner builds its workload from this module without them.

SIDE, SECONDS, FPS = 448, 3.0, 24
SEED, CHAT_SEED = 60, 70  # the timed batch's and the video chat's; warm-ups use others
TARGET_SPEEDUP, TARGET_RATIO = 1.3, 0.3  # requests/s against LMDeploy's; TTFT question 2 / 1


# ---- the workload --------------------------------------------------------------------------


def make_video(seed: int, side: int = SIDE, seconds: float = SECONDS, fps: int = FPS) -> bytes:
    """An H.264 MP4 of 3–5 discs and squares moving over a background of coloured blocks, all
    drawn from ``seed``. Encoded as cameras' files are (B-frames, one keyframe), so decoding a
    sampled frame means decoding the frames before it."""
    import av

    rng = np.random.default_rng(seed)
    blocks = rng.integers(40, 216, (8, 8, 3), dtype=np.uint8)
    background = np.repeat(np.repeat(blocks, side // 8, 0), side // 8, 1)  # (side, side, 3)
    shapes = [(int(rng.integers(side // 11, side // 4)), rng.uniform(0, side * 0.75, 2),
               rng.uniform(-6, 6, 2), rng.integers(0, 256, 3, dtype=np.uint8),
               bool(rng.integers(2))) for _ in range(int(rng.integers(3, 6)))]
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        # a fixed quantiser and one thread: x264's rate control and its thread count both make
        # the bytes vary from run to run, and both runners must see the same videos
        stream.options = {"preset": "veryfast", "qp": "23", "threads": "1"}
        for t in range(round(seconds * fps)):
            frame = background.copy()
            for size, pos, vel, colour, disc in shapes:
                y, x = ((pos + vel * t) % (side - size)).astype(int)  # wraps around the edges
                patch = frame[y:y + size, x:x + size]  # a view: drawing on it draws the frame
                if disc:
                    yy, xx = np.ogrid[:size, :size]
                    patch[(yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2
                          <= (size / 2) ** 2] = colour
                else:
                    patch[:] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@dataclass(frozen=True)
class VideoRequest:
    """One request of the workload: the video (its MP4 bytes) and the question about it."""

    video: bytes
    question: str

    @property
    def url(self) -> str:
        return video_url(self.video)


def video_requests(tok, n: int, n_text: int, seed: int) -> list[VideoRequest]:
    """``n`` requests, each its own video (made in parallel: x264 lets go of the GIL) and text."""
    with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
        videos = list(pool.map(make_video, [seed * 100_000 + i for i in range(n)]))
    rng = np.random.default_rng(seed)
    return [VideoRequest(v, text_of(tok, n_text, rng)) for v in videos]


def chat_case(tok, n_text: int, seed: int) -> tuple[VideoRequest, str]:
    """The video chat's video and first question, and its second question."""
    (first,) = video_requests(tok, 1, n_text, seed)
    return first, text_of(tok, n_text, np.random.default_rng(seed + 1))


def video_message(req: VideoRequest, num_frames: int) -> list[dict]:
    """The request as vlmdeploy takes it: a ``video_url`` part with its frame count, then the
    text (rendered ``Frame1: <image>\\n...Frame{n}: <image>\\n`` + text, the model card's
    prompt)."""
    part = {"type": "video_url", "video_url": {"url": req.url, "num_frames": num_frames}}
    return [{"role": "user", "content": [part, {"type": "text", "text": req.question}]}]


def follow_up(first: list[dict], answer: str, question: str) -> list[dict]:
    """The second question's conversation: the first turn (its video included), the answer."""
    return [*first, {"role": "assistant", "content": answer},
            {"role": "user", "content": question}]


# ---- running on vlmdeploy ------------------------------------------------------------------


def run_batch(pipe, tok, args: argparse.Namespace) -> dict:
    from benchmarks.engine import timed_batch
    from benchmarks.workloads import gen

    warm = video_requests(tok, 1, args.text_tokens, args.seed + 1000)
    pipe([video_message(warm[0], args.frames)], gen_config=gen(args.out_tokens))
    reqs = video_requests(tok, args.requests, args.text_tokens, args.seed)
    prompts = [video_message(r, args.frames) for r in reqs]
    res = timed_batch(pipe, prompts, [gen(args.out_tokens)] * len(prompts))
    return res | {"input_tokens_mean": res["input_tokens_per_s"] * res["wall_s"] / len(reqs),
                  "video_bytes_mean": float(np.mean([len(r.video) for r in reqs]))}


def run_chat(pipe, tok, args: argparse.Namespace) -> dict:
    from benchmarks.engine import chat_turn, two_turn_summary
    from benchmarks.workloads import sync
    from vlmdeploy.vl.constants import IMAGE_TOKEN

    def two_questions(seed: int) -> tuple[dict, dict]:
        req, question = chat_case(tok, args.text_tokens, seed)
        first = video_message(req, args.frames)
        t1 = chat_turn(pipe, first, args.out_tokens)
        answer = t1["text"].replace(IMAGE_TOKEN, "")  # random text must not look like a marker
        return t1, chat_turn(pipe, follow_up(first, answer, question), args.out_tokens)

    two_questions(args.chat_seed + 1000)  # warm-up on another video
    sync()
    return two_turn_summary(*two_questions(args.chat_seed))


# ---- the report ----------------------------------------------------------------------------

# (label, part, key, workload, metric, unit) of the table and the history rows
METRICS = [
    ("video requests/s", "video", "requests_per_s", "video", "requests_per_s", "req/s"),
    ("video output tokens/s", "video", "output_tokens_per_s", "video", "output_tokens_per_s",
     "tok/s"),
    ("video input tokens per request", "video", "input_tokens_mean", "video",
     "input_tokens_per_request", "tokens"),
    ("video chat TTFT question 1 ms", "video_chat", "ttft1_ms", "video-chat2", "ttft_turn1_ms",
     "ms"),
    ("video chat TTFT question 2 ms", "video_chat", "ttft2_ms", "video-chat2", "ttft_turn2_ms",
     "ms"),
    ("video chat TTFT question 2 / 1", "video_chat", "ratio", "video-chat2", "ttft_ratio",
     "turn 2 / turn 1"),
]


def _num(res: dict | None, part: str, key: str) -> float | None:
    v = ((res or {}).get(part) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def verdicts(res: dict, lm: dict | None) -> dict[str, tuple[str, bool | None]]:
    """The two targets: requests/s ≥ 1.3 × LMDeploy's (in the same call), TTFT ratio < 0.3."""
    ours, theirs = _num(res, "video", "requests_per_s"), _num(lm, "video", "requests_per_s")
    speedup = ours / theirs if ours and theirs else None
    ratio = _num(res, "video_chat", "ratio")
    return {
        "video requests/s": (f"≥ {TARGET_SPEEDUP} × LMDeploy"
                             + (f" ({speedup:.2f}×)" if speedup else ""),
                             None if speedup is None else speedup >= TARGET_SPEEDUP),
        "video chat TTFT question 2 / 1": (f"< {TARGET_RATIO}",
                                           None if ratio is None else ratio < TARGET_RATIO),
    }


def _cell(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def markdown(res: dict, lm: dict | None) -> str:
    checks = verdicts(res, lm)
    lines = [
        f"Video workload, {res['date']} {res['time_utc']} UTC, commit {res['commit'] or '?'}; "
        f"{res['model_shape']}{' (dummy weights)' if res['load_format'] == 'dummy' else ''}; "
        f"device: {res['device']}",
        "",
        f"| metric | vlmdeploy | {lm.get('system', 'LMDeploy') if lm else 'LMDeploy'} "
        "| target | met |",
        "|---|---:|---:|---|:-:|",
    ]
    for label, part, key, *_ in METRICS:
        target, met = checks.get(label, ("", None))
        ok = "" if not target else "–" if met is None else "yes" if met else "no"
        lines.append(f"| {label} | {_cell(_num(res, part, key))} | {_cell(_num(lm, part, key))} "
                     f"| {target} | {ok} |")
    s = res["settings"]
    lines += ["", f"{s['requests']} requests of {s['frames']} frames + ~{s['text_tokens']} text "
              f"tokens, {s['out_tokens']} output tokens, session_len {s['session_len']}, prefix "
              f"caching {'on' if s['enable_prefix_caching'] else 'off'}."]
    errors = [f"- {side} {k}: {v['error']}" for side, r in (("vlmdeploy", res), ("LMDeploy", lm))
              for k, v in (r or {}).items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + (["", "Errors:", *errors] if errors else [])) + "\n"


def history_rows(res: dict, lm: dict | None) -> list[dict[str, str]]:
    """The run's rows for the results history; LMDeploy's ran in the same call, so they share
    its stamp."""
    st = results.Stamp(res["date"], res["time_utc"], res["commit"], res["device"])
    rows = []
    for system, r in (("vlmdeploy", res), (LMDEPLOY, lm)):
        for _, part, key, workload, metric, unit in METRICS:
            value = _num(r, part, key)
            if value is not None:
                rows.append(results.row(st, res["model_shape"], workload, metric, system, value,
                                        unit))
    return rows


# ---- the command ---------------------------------------------------------------------------


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The workload's shape and the engine settings, the same flags for both runners."""
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--frames", type=int, default=32, help="frames sampled per video")
    ap.add_argument("--text-tokens", type=int, default=30)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--chat-seed", type=int, default=CHAT_SEED)
    ap.add_argument("--session-len", type=int, default=16384,
                    help="32 frames are 8,192 image tokens: more than the 8,192 of W1–W4")
    ap.add_argument("--cache-max-entry-count", type=float, default=0.8)
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--workloads", default="video,video_chat", help="of video,video_chat")
    ap.add_argument("--json", help="write the results here (rewritten after each part)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--preset", help="write config + tokenizer of this size and use dummy weights")
    ap.add_argument("--model-shape", help="the architecture's name in the results history "
                    "(default: from --preset, else the checkpoint folder's name)")
    add_workload_args(ap)
    ap.add_argument("--lmdeploy", help="benchmarks.lmdeploy_video's JSON from the same call")
    ap.add_argument("--csv", help="append the run's rows (and LMDeploy's) to this results CSV")
    ap.add_argument("--out", help="write the table (markdown) here")
    args = ap.parse_args(argv)
    if not (args.model or args.preset):
        ap.error("one of --model, --preset is needed")
    return args


def settings(args: argparse.Namespace) -> dict:
    keys = ("requests", "frames", "text_tokens", "out_tokens", "seed", "chat_seed", "session_len",
            "cache_max_entry_count")
    return {k: getattr(args, k) for k in keys} | {
        "enable_prefix_caching": args.prefix_caching,
        "video": {"side": SIDE, "seconds": SECONDS, "fps": FPS, "codec": "h264"}}


def stamp_fields() -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.date().isoformat(), "time_utc": now.strftime("%H:%M:%S")}


def run_parts(res: dict, parts: dict, todo: str, save) -> None:
    """Run the parts named in ``todo`` in order; one that fails records its error."""
    for name, fn in parts.items():
        if name not in todo.split(","):
            continue
        t = time.perf_counter()
        try:
            res[name] = fn() | {"stage_s": round(time.perf_counter() - t, 1)}
        except Exception as exc:  # the other part and the report still run
            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[video] {name}: {json.dumps(res[name])[:300]}", flush=True)
        save()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from benchmarks.engine import kv_cache_tokens
    from benchmarks.workloads import model_source, shape_name
    from vlmdeploy import PytorchEngineConfig, pipeline

    model, load_format = model_source(args.model, args.preset)
    res: dict = stamp_fields() | {
        "commit": results.current_commit(), "device": results.device_line(), "model": model,
        "model_shape": args.model_shape
        or (shape_name(args.preset) if args.preset else Path(model).name),
        "load_format": load_format, "settings": settings(args)}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    cfg = PytorchEngineConfig(session_len=args.session_len, load_format=load_format,
                              enable_prefix_caching=args.prefix_caching,
                              cache_max_entry_count=args.cache_max_entry_count)
    t = time.perf_counter()
    with pipeline(model, backend_config=cfg) as pipe:
        res["init_s"], res["kv_tokens"] = round(time.perf_counter() - t, 1), kv_cache_tokens(pipe)
        save()
        tok = pipe.tokenizer
        run_parts(res, {"video": lambda: run_batch(pipe, tok, args),
                        "video_chat": lambda: run_chat(pipe, tok, args)}, args.workloads, save)
    lm = json.loads(Path(args.lmdeploy).read_text()) if args.lmdeploy else None
    table = markdown(res, lm)
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table)
    if args.csv:
        results.append(args.csv, history_rows(res, lm))
    if any(isinstance(v, dict) and "error" in v for v in res.values()):
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()

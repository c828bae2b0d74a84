"""The video benchmark: vlmdeploy's side runs end to end on a tiny checkpoint (CPU, 2 requests of 4
frames), the second question reusing the first's frames; LMDeploy's side, against a stand-in
``lmdeploy`` module that records what it is asked (LMDeploy is only on the GPU machine), gets the
frames vlmdeploy's prompt holds for the same request (each JPEG it is sent is, byte for byte, the
JPEG of that frame), labelled as the model card labels them, with the same questions and output
lengths; the report checks both targets."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")

from benchmarks import lmdeploy_video, results  # noqa: E402
from benchmarks import video as bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--requests", "2", "--frames", "4", "--text-tokens", "10", "--out-tokens", "3"]


def decoded(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload(url))))


def jpeg_of(frame: Image.Image) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=90)  # the runner's default quality
    return buf.getvalue()


def payload(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def vlmdeploy_frames(tok, req: bench.VideoRequest, frames: int) -> tuple[str, list]:
    """The prompt text and the frames vlmdeploy's prompt path takes from the benchmark's own
    message for ``req``."""
    from vlmdeploy.frontend.prompt import PromptEncoder
    from vlmdeploy.vl.media_policy import MediaPolicy

    text, refs = PromptEncoder(tok).render(bench.video_message(req, frames), None, True,
                                           MediaPolicy().video)
    return text, [ref.source.image(MediaPolicy()) for ref in refs]


def test_lmdeploy_gets_the_frames_and_questions_vlmdeploy_gets(fake_lmdeploy, tiny_ckpts,
                                                               tmp_path):
    from vlmdeploy.frontend.tokenizer import Tokenizer
    from vlmdeploy.vl.constants import IMAGE_TOKEN

    out = tmp_path / "lm.json"
    lmdeploy_video.main(["--model", tiny_ckpts["hf"], *SMALL, "--json", str(out)])
    calls = fake_lmdeploy
    assert calls["engine"] == {"session_len": 16384, "cache_max_entry_count": 0.8,
                               "enable_prefix_caching": True}
    assert calls["closed"] and len(calls["batches"]) == 2  # the warm-up, then the timed batch
    same_length = {"max_new_tokens": 3, "ignore_eos": True, "do_sample": False}
    prompts, configs = calls["batches"][1]
    assert configs == [same_length] * 2
    tok = Tokenizer(tiny_ckpts["hf"])
    ours = bench.video_requests(tok, 2, 10, bench.SEED)
    for req, (message,) in zip(ours, prompts, strict=True):
        text, frames = vlmdeploy_frames(tok, req, 4)
        parts = message["content"]
        assert [p["text"] for p in parts[0:-1:2]] == [f"Frame{i}: " for i in range(1, 5)]
        images = [p["image_url"]["url"] for p in parts[1:-1:2]]
        assert len(images) == 4 and parts[-1] == {"type": "text", "text": req.question}
        for url, frame in zip(images, frames, strict=True):  # the same frame, JPEG-encoded
            assert payload(url) == jpeg_of(frame)
        assert len({decoded(u).tobytes() for u in images}) == 4  # four distinct frames
        # LMDeploy writes an image part as <img><IMG_CONTEXT></img>\n where it stands: the text
        # around our image blocks, the model card's video prompt
        theirs = "".join(p["text"] if p["type"] == "text" else IMAGE_TOKEN + "\n" for p in parts)
        assert theirs in text
    # the second question on one video: its conversation, the same frames, the same lengths
    assert len(calls["streams"]) == 4  # warm-up chat, then the measured one: two turns each
    (first,), _ = calls["streams"][2]
    (second,), gen2 = calls["streams"][3]
    chat_req, question = bench.chat_case(tok, 10, bench.CHAT_SEED)
    _, chat_frames = vlmdeploy_frames(tok, chat_req, 4)
    assert gen2 == same_length and second[:1] == [first[0]]
    assert second[1:] == [{"role": "assistant", "content": " w0 w1 w2"},
                          {"role": "user", "content": question}]
    for part, frame in zip(first[0]["content"][1:-1:2], chat_frames, strict=True):
        assert payload(part["image_url"]["url"]) == jpeg_of(frame)
    res = json.loads(out.read_text())
    assert res["video"]["requests"] == 2 and res["video"]["short_outputs"] == 0
    assert res["video_chat"]["output_tokens"] == [3, 3]
    assert res["video_chat"]["ratio"] == pytest.approx(
        res["video_chat"]["ttft2_ms"] / res["video_chat"]["ttft1_ms"])


def test_video_workload_end_to_end(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_COMMIT", "feedbee")
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps({"system": "LMDeploy 0.18.0",
                              "video": {"requests_per_s": 1e-6, "output_tokens_per_s": 1e-4},
                              "video_chat": {"ttft1_ms": 900.0, "ttft2_ms": 850.0,
                                             "ratio": 850 / 900}}))
    raw, csv, table = tmp_path / "v.json", tmp_path / "results.csv", tmp_path / "v.md"
    res = bench.main(["--model", tiny_ckpts["hf"], *SMALL, "--session-len", "4096",
                      "--json", str(raw), "--csv", str(csv), "--out", str(table),
                      "--lmdeploy", str(lm)])
    assert json.loads(raw.read_text())["video_chat"] == res["video_chat"]
    batch, chat = res["video"], res["video_chat"]
    assert batch["requests"] == 2 and batch["short_outputs"] == 0
    assert batch["output_tokens_per_s"] > 0 and batch["timeline"]["tiles"] == 8  # 4 frames each
    assert batch["input_tokens_mean"] > 4 * 256  # four frames' image tokens and the text
    assert chat["output_tokens"] == [3, 3]
    assert chat["turn2_tiles_encoded"] == 0  # the follow-up re-sends the video: nothing encoded
    assert chat["cached_tokens"] >= chat["turn1_input_tokens"] // 64 * 64 >= 4 * 256
    assert chat["ratio"] == pytest.approx(chat["ttft2_ms"] / chat["ttft1_ms"])
    rows = results.read(csv)
    assert {(r["commit"], r["device"]) for r in rows} == {("feedbee", res["device"])}
    got = {(r["system"], r["workload"], r["metric"]) for r in rows}
    assert ("vlmdeploy", "video", "requests_per_s") in got
    assert ("lmdeploy-0.18", "video-chat2", "ttft_ratio") in got
    text = table.read_text()
    assert "| video requests/s |" in text and "≥ 1.3 × LMDeploy" in text
    assert "commit feedbee" in text


def test_the_targets():
    res = {"date": "2026-12-08", "time_utc": "10:00:00", "commit": "abc", "device": "H100",
           "model_shape": "InternVL3.5-8B", "load_format": "auto",
           "settings": {"requests": 64, "frames": 32, "text_tokens": 30, "out_tokens": 128,
                        "session_len": 16384, "enable_prefix_caching": True},
           "video": {"requests_per_s": 3.0}, "video_chat": {"ratio": 0.31}}
    lm = {"system": "LMDeploy 0.18.0", "video": {"requests_per_s": 2.0},
          "video_chat": {"error": "RuntimeError: out of memory"}}
    rows = {line.split(" | ")[0][2:]: line for line in bench.markdown(res, lm).splitlines()
            if line.startswith("| video")}
    assert rows["video requests/s"] == (
        "| video requests/s | 3.00 | 2.00 | ≥ 1.3 × LMDeploy (1.50×) | yes |")
    assert rows["video chat TTFT question 2 / 1"].endswith("| 0.31 | – | < 0.3 | no |")
    assert bench.verdicts(res, None)["video requests/s"][1] is None  # no baseline, no verdict
    assert "- LMDeploy video_chat: RuntimeError" in bench.markdown(res, lm)


def test_videos_are_seeded_and_distinct():
    a, b = bench.make_video(1, seconds=0.5), bench.make_video(2, seconds=0.5)
    assert a == bench.make_video(1, seconds=0.5) and a != b


def test_device_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "video_device.sh")], check=True)

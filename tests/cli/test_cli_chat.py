"""`vlmdeploy chat`: multi-turn history, `/image`, `/reset`, `/exit`, streamed output.

The conversation logic runs against the FakePipeline test double (scripted answers, recorded
prompts); one test pipes stdin into `python -m vlmdeploy chat` on the real tiny checkpoint.
"""

from __future__ import annotations

import io
import subprocess
import sys

from fake_pipeline import FakePipeline
from PIL import Image

from vlmdeploy.cli.chat import ChatSession, chat_loop
from vlmdeploy.messages import GenerationConfig

ANSWER = "Hello, world!"


def run_chat(lines: list[str], pipe: FakePipeline | None = None) -> tuple[FakePipeline, str, str]:
    pipe = pipe or FakePipeline()
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(pipe, GenerationConfig(max_new_tokens=16), out, err)
    assert chat_loop(session, [line + "\n" for line in lines]) == 0
    return pipe, out.getvalue(), err.getvalue()


def test_multi_turn_history(tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    pipe, out, _ = run_chat(["hello", f"/image {image}", "what is this?"])
    assert out == f"{ANSWER}\n{ANSWER}\n"
    first, second = (p.prompt for p in pipe.prepared)
    assert first == [{"role": "user", "content": "hello"}]
    assert second[:2] == [{"role": "user", "content": "hello"},
                          {"role": "assistant", "content": ANSWER}]
    assert second[2]["content"] == [
        {"type": "image_url", "image_url": {"url": str(image)}},
        {"type": "text", "text": "what is this?"}]


def test_image_is_sent_once(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    pipe, _, _ = run_chat([f"/image {image}", "one", "two"])
    assert pipe.prepared[-1].prompt[-1] == {"role": "user", "content": "two"}


def test_reset_and_exit():
    pipe, out, err = run_chat(["first", "/reset", "second", "/exit", "never asked"])
    assert [p.prompt for p in pipe.prepared] == [[{"role": "user", "content": "first"}],
                                                [{"role": "user", "content": "second"}]]
    assert out.count(ANSWER) == 2 and "new conversation" in err


def test_missing_image_and_unknown_command_are_reported():
    pipe, out, err = run_chat(["/image /no/such/file.png", "/frobnicate", "hi"])
    assert "no such file" in err and "/image PATH" in err
    assert pipe.prepared[0].prompt == [{"role": "user", "content": "hi"}]
    assert out == f"{ANSWER}\n"


def test_refused_turn_keeps_the_history():
    pipe = FakePipeline(session_len=20)  # a 16-token answer budget: long prompts do not fit
    _, out, err = run_chat(["short", "word " * 50, "again"], pipe)
    assert "error:" in err and out.count(ANSWER) == 2
    assert pipe.prepared[-1].prompt[:2] == [{"role": "user", "content": "short"},
                                            {"role": "assistant", "content": ANSWER}]


def test_answers_are_streamed_token_by_token():
    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    out = Recorder()
    session = ChatSession(FakePipeline(), GenerationConfig(), out, io.StringIO())
    chat_loop(session, ["hi\n"])
    assert out.writes == ["Hello", ",", " world", "!", "\n"]


def test_python_dash_m_chat_reads_stdin(tiny_checkpoint, tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (448, 448), "blue").save(image)
    stdin = f"hello\n/image {image}\ndescribe it\n/reset\nbye\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "vlmdeploy", "chat", str(tiny_checkpoint), "--device", "cpu",
         "--session-len", "1024", "--max-new-tokens", "4"],
        input=stdin, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count("\n") >= 3  # three answers, each ended by a newline
    assert "image attached" in result.stderr and "new conversation" in result.stderr


def test_chat_without_a_model_runs_the_embedded_default():
    """`vlmdeploy chat` with no model answers with the embedded default model: asked to describe
    the bundled sample image, it gives the generator's description of that scene."""
    import os
    import random
    from pathlib import Path

    from vlmdeploy.assets import sample_image_path
    from vlmdeploy.synthetic.questions import describe
    from vlmdeploy.synthetic.scene import sample_scene

    want = describe(sample_scene(random.Random("sample/25"), n_objects=3, size=(640, 480)))
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    stdin = f"/image {sample_image_path()}\nDescribe this image.\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "vlmdeploy", "chat", "--device", "cpu", "--max-new-tokens", "32"],
        input=stdin, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert want in result.stdout.splitlines()

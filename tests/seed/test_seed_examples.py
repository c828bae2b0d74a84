"""The Python snippets of the InternVL3.5 deployment guide that vlmdeploy was built from run
verbatim, with only the import name, the model path and the image locations changed (the embedded
default model and local image files stand in for the hub model and the web images).

The snippets are kept in ``snippets/`` exactly as the guide prints them, so the test runs anywhere;
where the guide itself is present (``shared/seeds/`` beside the repository), a test checks the
copies still match it. Its HTTP client snippet is exercised against a real server in
``tests/serve/test_serve_openai_e2e.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlmdeploy.assets import default_model_path, sample_image_path

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"
SNIPPETS = Path(__file__).resolve().parent / "snippets"
ORDER = ["hello_world", "multi_image", "batch", "multi_turn"]  # as in the guide


def seed_snippets() -> list[str]:
    return [(SNIPPETS / f"{name}.py.txt").read_text() for name in ORDER]


def localise(snippet: str, image: str) -> str:
    code = snippet.replace("lmdeploy", "vlmdeploy")
    code = re.sub(r"model = '[^']+'", f"model = {str(default_model_path())!r}", code)
    return re.sub(r"""(['"])https?://[^'"]+\.(?:jpe?g|png)\1""", repr(image), code)


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the guide itself is not beside this checkout")
def test_the_copies_match_the_guide():
    text = "\n".join(p.read_text() for p in sorted(SEEDS.glob("*.txt")))
    in_guide = [s for s in re.findall(r"```python\n(.*?)```", text, re.S) if "pipeline" in s]
    assert in_guide == seed_snippets()


@pytest.mark.parametrize("index", range(4))
def test_seed_snippet_runs(index, capsys):
    snippet = seed_snippets()[index]
    code = localise(snippet, str(sample_image_path()))
    assert "vlmdeploy" in code and "https://" not in code
    exec(compile(code, f"seed-snippet-{index}", "exec"), {"__name__": "__seed__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet printed nothing"
    if "describe this image" in snippet and "sess" not in snippet and "image_urls" not in snippet:
        assert "star" in printed or "circle" in printed or "triangle" in printed  # about the image

"""Split a model's `<think>…</think>` block out of its answer (`--reasoning-parser`).

Text before `<think>` and after `</think>` is `content`; text between is `reasoning_content`. The
splitter works on streamed deltas: a delta that ends in the first characters of a tag is held back
until the next delta decides whether it is a tag, so no tag fragment ever reaches the client.

Parser names are LMDeploy's (and vLLM's) so existing launch scripts work. InternVL3.5, Qwen3 and
Intern-S1 emit the opening tag themselves, so those parsers start in answer mode. DeepSeek-R1 and
QwQ templates end the prompt with `<think>`, so their output starts inside the reasoning block
(unless thinking was switched off).

GPT-OSS writes no tags: its reasoning is harmony's ``analysis`` channel. Its parser names
(:data:`HARMONY_PARSERS`) hand each answer to the harmony parser of
:mod:`vlmdeploy.serve.tool_parsers`, which splits the channels (and reads any calls), with the
special tokens that mark them kept in the decoded text.
"""

from __future__ import annotations

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

# name -> whether the generated text starts inside the reasoning block
REASONING_PARSERS: dict[str, bool] = {
    "default": False,
    "intern-s1": False,
    "qwen3": False,
    "deepseek-v3": False,
    "deepseek-r1": True,
    "qwen-qwq": True,
    "deepseek-v32": False,
    "deepseek-v3.2": False,
    "deepseek-v4": False,
    "gpt-oss": False,  # harmony: see HARMONY_PARSERS
    "openai_gptoss": False,
}
HARMONY_PARSERS = ("gpt-oss", "openai_gptoss")  # LMDeploy's and vLLM's names


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Stateful splitter of one choice's text into (reasoning, content) deltas."""

    def __init__(self, starts_in_reasoning: bool = False):
        self._in_reasoning = starts_in_reasoning
        self._closed = False  # one reasoning block per answer; later tags are plain text
        self._buf = ""
        self._at_block_start = starts_in_reasoning  # drop the newline a model writes after a tag

    @classmethod
    def for_parser(cls, name: str, enable_thinking: bool | None) -> ReasoningSplitter:
        return cls(REASONING_PARSERS[name] and enable_thinking is not False)

    def feed(self, text: str) -> tuple[str, str]:
        """Consume a delta; return the (reasoning, content) text that is now certain."""
        self._buf += text
        reasoning, content = [], []
        while self._buf:
            if self._in_reasoning:
                if not self._take_reasoning(reasoning):
                    break
            elif not self._closed:
                if not self._take_plain(content):
                    break
            else:
                content.append(self._emit(self._buf))
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of text: whatever is held back belongs to the current block."""
        rest, self._buf = self._buf, ""
        return (rest, "") if self._in_reasoning else ("", rest)

    def _take_reasoning(self, out: list[str]) -> bool:
        if self._at_block_start and not out:  # a model that repeats the opening tag
            if self._buf.startswith(OPEN_TAG):
                self._buf = self._buf[len(OPEN_TAG):]
                return True
            if OPEN_TAG.startswith(self._buf):
                return False
        idx = self._buf.find(CLOSE_TAG)
        if idx >= 0:
            out.append(self._emit(self._buf[:idx]))
            self._buf = self._buf[idx + len(CLOSE_TAG):]
            self._in_reasoning, self._closed, self._at_block_start = False, True, True
            return True
        keep = partial_suffix(self._buf, CLOSE_TAG)
        out.append(self._emit(self._buf[:len(self._buf) - keep]))
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _take_plain(self, out: list[str]) -> bool:
        idx = self._buf.find(OPEN_TAG)
        if idx >= 0:
            out.append(self._emit(self._buf[:idx]))
            self._buf = self._buf[idx + len(OPEN_TAG):]
            self._in_reasoning, self._at_block_start = True, True
            return True
        keep = partial_suffix(self._buf, OPEN_TAG)
        out.append(self._emit(self._buf[:len(self._buf) - keep]))
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _emit(self, text: str) -> str:
        if self._at_block_start:
            text = text.lstrip("\n")
            self._at_block_start = not text
        return text


def split_all(splitter: ReasoningSplitter, text: str) -> tuple[str | None, str]:
    """Whole-text form for non-streaming responses: (reasoning or None, content)."""
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return (r1 + r2) or None, c1 + c2

"""What a prompt may hold before any expensive work is done on it: its size in characters, its
number of messages, and only text that can be encoded.

Tokenising is the first expensive step (one 60 MB prompt once took 98 s of CPU and 10 GB of
memory), so these checks run on the prompt as given, before the chat template, the tokenizer or
any image fetch:

* **Characters.** A prompt whose text (every message's text, system prompts included) exceeds
  ``max_prompt_chars`` is refused with :class:`ContextLengthExceeded`. The default is
  ``PROMPT_CHARS_PER_TOKEN`` × ``session_len``: text averages about 4 characters a token (English
  prose; code about 3.5; a few tokens of Qwen3's vocabulary are runs of up to a few dozen spaces
  or symbols), so a prompt that fits ``session_len`` tokens lies far below the cap, while the
  tokenizer's work on any accepted prompt is bounded by it.
* **Messages and parts.** Every message costs tokens of the template, and a conversation whose
  messages and content parts number ``session_len`` or more is refused before anything walks,
  renders or fetches them (its structure would otherwise cost work with no text at all).
* **Encodable text.** A lone UTF-16 surrogate (``"\\ud800"``, which JSON's ``\\ud800`` escape and
  Python strings can carry) has no UTF-8 form: the tokenizer, the file system and URLs all fail
  on it. A prompt, image source, stop word or bad word holding one is refused with
  :class:`InvalidRequestError` (code ``invalid_encoding``) naming where it is. Checked after the
  size checks, so the walk is bounded too.
"""

from __future__ import annotations

import re
from typing import Any

from vlmdeploy.errors import ContextLengthExceeded, InvalidRequestError
from vlmdeploy.frontend.prompt import to_messages

# The default character cap is this many times session_len (see the module docstring).
PROMPT_CHARS_PER_TOKEN = 16

_SURROGATE = re.compile("[\ud800-\udfff]")


def default_max_prompt_chars(session_len: int) -> int:
    return PROMPT_CHARS_PER_TOKEN * session_len


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (an ASCII string is known not to in O(1))."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def find_unencodable(value: Any, param: str) -> str | None:
    """The place (``messages[0].content[1].text``) of the first string inside ``value`` (strings,
    lists, tuples, dict values) that holds a lone surrogate, or None. A first pass only looks; a
    second one, taken only when something was found, names the place."""
    if not _holds_unencodable(value):
        return None
    stack: list[tuple[Any, str]] = [(value, param)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if has_surrogate(item):
                return where
        elif isinstance(item, dict):
            stack.extend((sub, f"{where}.{key}") for key, sub in reversed(item.items()))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{where}[{i}]") for i, sub in reversed(list(enumerate(item))))
    return None


def _holds_unencodable(value: Any) -> bool:
    stack = [value]  # an explicit stack: values may nest deeper than the recursion limit
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def unencodable(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{param} holds text that cannot be encoded as UTF-8 (a lone UTF-16 surrogate)",
        code="invalid_encoding",
        param=param,
    )


def check_encodable(value: Any, param: str) -> None:
    """Raise :class:`InvalidRequestError` if any string inside ``value`` holds a lone
    surrogate."""
    where = find_unencodable(value, param)
    if where is not None:
        raise unencodable(where)


def text_size(prompt: Any) -> tuple[int, int]:
    """(characters of text, messages and content parts) of a prompt in any accepted form: a
    string, a ``(text, images)`` tuple, a message list, or a list of strings (a batch of raw
    prompts, whose characters add up). Malformed parts count as nothing: validation reports them
    later."""
    if isinstance(prompt, str):
        return len(prompt), 1
    if isinstance(prompt, tuple):  # (text, images) or (images, text): count the text only
        try:
            return text_size(to_messages(prompt))
        except InvalidRequestError:
            return 0, 0
    if not isinstance(prompt, list):
        return 0, 0
    chars = pieces = 0
    for item in prompt:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            content = item.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p["text"]) for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
                pieces += len(content)
            calls = item.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():  # an earlier turn's calls
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    chars += sum(len(v) for v in fn.values() if isinstance(v, str))
                pieces += 1
            pieces += 1
    return chars, pieces


def check_prompt_size(prompt: Any, max_chars: int, session_len: int, param: str) -> None:
    """Refuse a prompt that is too large to be worth templating or tokenising."""
    chars, pieces = text_size(prompt)
    if chars > max_chars:
        raise ContextLengthExceeded(
            f"the prompt has {chars} characters of text; at most {max_chars} are accepted "
            f"(max_prompt_chars)",
            param=param,
        )
    if pieces >= session_len:
        raise ContextLengthExceeded(
            f"the prompt has {pieces} messages and content parts, more than "
            f"session_len={session_len} tokens could hold",
            param=param,
        )

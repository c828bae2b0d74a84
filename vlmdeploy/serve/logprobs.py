"""Engine logprobs (`{token_id: logprob}` per generated token, the sampled token included) in
OpenAI's
chat and legacy-completions shapes."""

from __future__ import annotations

import math
from typing import Any

# JSON has no -inf; vLLM uses the same stand-in.
_NEG_INF = -9999.0


def _value(logprob: float | None) -> float:
    if logprob is None or not math.isfinite(logprob):
        return _NEG_INF
    return float(logprob)


def _text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(tokenizer: Any, table: dict[int, float], k: int) -> list[tuple[str, float]]:
    ranked = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:k]
    return [(_text(tokenizer, tid), _value(lp)) for tid, lp in ranked]


def chat_logprobs(tokenizer: Any, token_ids: list[int], tables: list[dict[int, float]],
                  k: int) -> dict[str, list[dict[str, Any]]]:
    """`choices[i].logprobs` of a chat completion (or chunk)."""
    content = []
    for token_id, table in zip(token_ids, tables, strict=False):
        text = _text(tokenizer, token_id)
        content.append({
            "token": text, "logprob": _value(table.get(token_id)), "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in _top(tokenizer, table, k)],
        })
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: list[int], tables: list[dict[int, float]],
                        k: int, offset: int = 0) -> dict[str, list[Any]]:
    """`choices[i].logprobs` of a legacy completion: tokens, their logprobs, top-k maps, offsets."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, table in zip(token_ids, tables, strict=False):
        text = _text(tokenizer, token_id)
        tokens.append(text)
        values.append(_value(table.get(token_id)))
        tops.append(dict(_top(tokenizer, table, k)))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}

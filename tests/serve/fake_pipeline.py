"""FakePipeline: a test double of the pipeline contract the server is written against
(`vlmdeploy.serve.contract.ServedPipeline`, every member of it).

It scripts the model's output (a fixed list of token strings), so tests can assert exact text, stop
strings, reasoning splits and token counts, and it records what the server asked of it (prepare
calls, generation configs, started and aborted sessions). Images go through the real
`vlmdeploy.vl.load_image` with the server's media policy, so media limits are exercised even with
the fake.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from vlmdeploy.errors import ContextLengthExceeded, EngineDeadError, InvalidRequestError
from vlmdeploy.messages import GenerationConfig
from vlmdeploy.vl.media import load_image

REPLY = ("Hello", ",", " world", "!")
TOKENS_PER_IMAGE = 256
CACHED_TOKENS = 3


class FakeTokenizer:
    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.vocab[i] for i in ids)


@dataclass
class FakePrepared:
    prompt: Any
    gen_config: GenerationConfig
    input_token_len: int
    media_policy: Any
    chat_template_kwargs: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeOut:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_tokens: int = CACHED_TOKENS


def _texts(prompt: Any) -> tuple[str, list[str]]:
    if isinstance(prompt, str):
        return prompt, []
    text, urls = [], []
    for message in prompt:
        content = message["content"]
        if isinstance(content, str):
            text.append(content)
            continue
        for part in content:
            if part["type"] == "text":
                text.append(part["text"])
            elif part["type"] == "image_url":
                urls.append(part["image_url"]["url"])  # video parts: taken, never decoded
    return " ".join(text), urls


class FakePipeline:
    model_name = "fake-model"

    def __init__(self, reply: tuple[str, ...] = REPLY, session_len: int = 4096,
                 token_delay: float = 0.0, fail_after: int | None = None):
        self.reply = list(reply)
        self.vocab = sorted(set(self.reply) | {"<alt>"})
        self.tokenizer = FakeTokenizer(self.vocab)
        self.session_len = session_len
        self.token_delay = token_delay
        self.fail_after = fail_after  # finish_reason 'error' after this many tokens
        self.dead = False
        self.prepared: list[FakePrepared] = []
        self.started: list[int] = []
        self.aborted: list[int] = []
        self.live: set[int] = set()
        self.closed = False
        self._ids = itertools.count(1)

    async def prepare(self, prompt: Any, gen_config: GenerationConfig | None = None,
                      media_policy: Any = None,
                      chat_template_kwargs: dict[str, Any] | None = None,
                      do_preprocess: bool = True) -> FakePrepared:
        gen_config = gen_config or GenerationConfig()
        text, urls = _texts(prompt)
        for url in urls:
            await asyncio.to_thread(load_image, url, media_policy)
        tokens = max(1, len(text.split())) + TOKENS_PER_IMAGE * len(urls)
        self._check_fits(tokens, gen_config)
        item = FakePrepared(prompt, gen_config, tokens, media_policy, chat_template_kwargs,
                            {"do_preprocess": do_preprocess})
        self.prepared.append(item)
        return item

    def reconfigure(self, req: FakePrepared, gen_config: GenerationConfig) -> FakePrepared:
        self._check_fits(req.input_token_len, gen_config)
        item = dataclasses.replace(req, gen_config=gen_config)
        self.prepared.append(item)
        return item

    def _check_fits(self, tokens: int, gen_config: GenerationConfig) -> None:
        if tokens + (gen_config.max_new_tokens or 0) > self.session_len:
            raise ContextLengthExceeded("The prompt and max_tokens exceed the context length.")
        room = min(gen_config.max_new_tokens or self.session_len, self.session_len - tokens)
        if (gen_config.min_new_tokens or 0) > room:  # the real preparer's check and name
            raise InvalidRequestError("min_new_tokens exceeds what fits.", param="min_new_tokens")

    def new_session_id(self) -> int:
        return next(self._ids)

    def _token(self, step: int) -> int:
        return self.vocab.index(self.reply[step % len(self.reply)])

    def _logprobs(self, req: FakePrepared, token: int) -> list[dict[int, float]] | None:
        if req.gen_config.logprobs is None:
            return None
        return [{token: -0.25, self.vocab.index("<alt>"): -1.5}]

    async def generate_prepared(self, req: FakePrepared, session_id: int):
        if self.dead:
            raise EngineDeadError("the engine has stopped")
        self.started.append(session_id)
        self.live.add(session_id)
        cfg = req.gen_config
        limit = cfg.max_new_tokens or (self.session_len - req.input_token_len)
        try:
            for step in range(limit):
                await asyncio.sleep(self.token_delay)
                if session_id in self.aborted:
                    yield FakeOut("", [], None, "abort", req.input_token_len, step)
                    return
                if self.fail_after is not None and step == self.fail_after:
                    yield FakeOut("", [], None, "error", req.input_token_len, step)
                    return
                token = self._token(step)
                end = step + 1 == limit
                eos = not cfg.ignore_eos and step + 1 == len(self.reply)
                reason = "length" if end and not eos else ("stop" if eos else None)
                yield FakeOut(self.vocab[token], [token], self._logprobs(req, token), reason,
                              req.input_token_len, step + 1)
                if reason:
                    return
        finally:
            self.live.discard(session_id)

    def abort(self, session_id: int) -> None:
        self.aborted.append(session_id)

    def stats(self) -> dict[str, Any]:
        if self.dead:
            raise EngineDeadError("the engine has stopped")
        return {"num_running": len(self.live), "num_waiting": 0,
                "kv_cache_usage": len(self.live) / 10, "num_preemptions": 2}

    def close(self) -> None:
        self.closed = True

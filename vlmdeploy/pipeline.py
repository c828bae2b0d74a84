"""The LMDeploy-compatible Python API: ``pipeline(...)`` returns a :class:`Pipeline`.

A request goes: prompt form → messages → images loaded and tiled → chat template → token ids with
image blocks (:meth:`Pipeline.prepare`, which also validates everything) → engine
(:class:`EngineLoop`) → token stream → incremental detokenization and stop words →
:class:`~vlmdeploy.messages.Response` / :class:`GenOut` deltas. The synchronous API (``__call__``,
``infer``, ``stream_infer``, ``chat``) and the asynchronous one used by the HTTP server (``prepare``
+ ``generate_prepared``) share this path.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import gc
import hashlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.engine_loop import EngineLoop, Subscription
from vlmdeploy.engine.llm_engine import LLMEngine, StepOutput
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.engine.sequence import ImageInput, Sequence
from vlmdeploy.errors import ContextLengthExceeded, EngineDeadError, ImageError, InvalidRequestError
from vlmdeploy.messages import GenerationConfig, PytorchEngineConfig, Response, VisionConfig
from vlmdeploy.prompt import ChatTemplate, build_conversation, to_messages, tokenize_with_images
from vlmdeploy.stop_words import StopMatcher
from vlmdeploy.tokenizer import IncrementalDetokenizer, Tokenizer
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.media import MediaPolicy, load_image
from vlmdeploy.vl.source_memo import SourceMemo, source_key
from vlmdeploy.vl.tiling import num_tiles, raw_tiles

logger = logging.getLogger("vlmdeploy")

# A request's images together may take this many times the per-image fetch timeout.
REQUEST_MEDIA_BUDGET = 2.0
# Threads that fetch, decode, hash and tile images. Two prepare ~30 requests/s of 1024² JPEGs and
# ~350/s of 448² ones, more than the GPU consumes. More threads starve the engine thread: it gives
# the GIL up at every Triton launch (an eager prefill step makes ~1,500 launches) and must win it
# back from them. On one H200, 16 threads left the GPU idle for 2.2 s of W2's first 3 s, 4 threads
# for 0.17 s; and W3's second step (its first requests, while the rest are prepared) took the host
# 780 ms with 4 threads, 160 ms with 2: W3 9.22 s against 9.74, W2 unchanged (24.86 against
# 24.85 s). A slow image host holds a thread for at most its request's media deadline.
PREP_THREADS = 2


@dataclass
class PreparedRequest:
    """A validated request, ready for the engine."""

    token_ids: list[int]
    images: list[ImageInput]
    sampling: SamplingParams
    gen_config: GenerationConfig
    prompt: str

    @property
    def input_token_len(self) -> int:
        return len(self.token_ids)


@dataclass
class GenOut:
    """One streamed delta (the server's unit)."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_tokens: int = 0
    error: str | None = None  # why the request failed, when finish_reason is 'error'


@dataclass
class Session:
    """A multi-turn conversation for :meth:`Pipeline.chat`; ``response`` is the last turn's
    answer."""

    session_id: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    response: Response | None = None
    step: int = 0


class Pipeline:
    def __init__(
        self,
        model_path: str,
        backend_config: PytorchEngineConfig | None = None,
        model_name: str | None = None,
        **kwargs: Any,
    ):
        if kwargs.pop("backend", "pytorch") not in ("pytorch", "turbomind"):
            raise ValueError("backend must be 'pytorch'")
        vision = kwargs.pop("vision_config", None)
        if vision is not None and vision != VisionConfig():
            raise NotImplementedError(
                "vision_config is not supported yet: the vision stage batches up to 64 tiles of "
                "many requests per encoder call on its own"
            )
        for name in ("chat_template_config", "log_level", "max_log_len"):  # handled by pipeline()
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"pipeline() got unexpected arguments: {', '.join(sorted(kwargs))}")
        self.model_path = str(model_path)
        self.model_name = model_name or Path(self.model_path).name
        self.backend_config = backend_config or PytorchEngineConfig()
        self.model_cfg = ModelConfig.from_pretrained(self.model_path)
        self.tokenizer = Tokenizer(self.model_path)
        self.template = ChatTemplate(
            self.tokenizer.chat_template, self.tokenizer.hf.special_tokens_map
        )
        self.engine = LLMEngine(
            self.model_path,
            self.backend_config,
            self.tokenizer.image_ids["img_context"],
            self.model_cfg,
        )
        self.loop = EngineLoop(self.engine)
        self.session_len = self.engine.session_len
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopChannel] = (
            weakref.WeakKeyDictionary()
        )
        self._pool = ThreadPoolExecutor(
            max_workers=PREP_THREADS, thread_name_prefix="vlmdeploy-prep"
        )
        self._text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmdeploy-text")
        self._sources = SourceMemo()  # inline images already decoded: their hash and tile count
        # What is built by now (model, tokenizer, compiled kernels: some 10^5-10^6 objects) lives
        # as long as the pipeline. A full collection walks every tracked object: 0.32 s in which
        # no thread runs, once per W2 run on the GPU machine. Frozen, the start-up heap is left
        # out of collections, which then walk only what serving creates.
        gc.collect()
        gc.freeze()

    # ---- preprocessing ---------------------------------------------------------------------------
    def prepare_sync(
        self,
        prompt: Any,
        gen_config: GenerationConfig | None = None,
        media_policy: MediaPolicy | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
        cancel: threading.Event | None = None,
    ) -> PreparedRequest:
        """Validate and preprocess one prompt; raises :class:`InvalidRequestError` on bad input.
        With ``do_preprocess=False`` a string prompt is used as is, without the chat template."""
        gen = gen_config or GenerationConfig()
        if do_preprocess:
            conv = build_conversation(to_messages(prompt))
            text = self.template.render(conv.messages, **(chat_template_kwargs or {}))
            tiles = self._tile_all(conv.images, media_policy, cancel)
        else:
            text, tiles = _raw_prompt(prompt), []
        per_tile = self.model_cfg.tokens_per_tile
        ids = tokenize_with_images(
            text,
            [t.num_tiles * per_tile for t in tiles],
            self.tokenizer.encode,
            self.tokenizer.image_ids,
        )
        images = _image_inputs(ids, tiles, per_tile, self.tokenizer.image_ids["img_context"])
        if not ids:
            raise InvalidRequestError("the prompt is empty", code="empty_prompt", param="prompt")
        sampling = self._sampling(gen, len(ids))
        if sampling.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be at least 1", param="max_new_tokens")
        reason = self.engine.check_fits(len(ids), sampling.max_new_tokens)
        if reason:
            raise ContextLengthExceeded(reason)
        return PreparedRequest(ids, images, sampling, gen, text)

    async def prepare(
        self,
        prompt: Any,
        gen_config: GenerationConfig | None = None,
        media_policy: MediaPolicy | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> PreparedRequest:
        """:meth:`prepare_sync` off the caller's event loop. Prompts with images use the media
        pool and text-only prompts their own, so slow image hosts never delay text requests; a
        cancelled caller stops its job between images."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        pool = self._pool if _has_images(prompt) else self._text_pool
        job = loop.run_in_executor(
            pool,
            lambda: self.prepare_sync(
                prompt, gen_config, media_policy, chat_template_kwargs, do_preprocess, cancel
            ),
        )
        try:
            return await job
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _tile_all(
        self, refs: list, policy: MediaPolicy | None, cancel: threading.Event | None = None
    ) -> list[_Tiled]:
        """Load every image, check that their tokens fit ``session_len`` (known from the sizes
        alone), and only then tile them: a request that cannot fit never allocates its tiles.
        All of a request's images share one deadline of ``REQUEST_MEDIA_BUDGET`` × the policy's
        per-image ``timeout_s``, so many slow images cannot hold a worker for long."""
        policy = policy or MediaPolicy()
        deadline = time.monotonic() + REQUEST_MEDIA_BUDGET * policy.timeout_s
        loaded, n_tokens = [], 0
        for ref in refs:
            if cancel is not None and cancel.is_set():
                raise InvalidRequestError("the request was cancelled", code="cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(
                    "fetching the request's images took too long",
                    code="image_fetch_timeout",
                    param=ref.param,
                )
            params = self._params(ref)
            key = source_key(ref.source, policy, params)
            known = self._sources.get(key)
            vision = self.engine.vision  # None once the pipeline is closed
            if known is not None and vision is not None and known[0] in vision.cache:
                # seen before and its embedding is held: neither decoded nor tiled now
                digest, n = known
                item: tuple = (None, params, n, (digest, ref.source, policy))
            else:
                limited = dataclasses.replace(policy, timeout_s=min(policy.timeout_s, remaining))
                image = self._load(ref, limited)
                n = num_tiles(
                    image.width,
                    image.height,
                    max_num=params[0],
                    min_num=params[1],
                    image_size=params[2],
                    use_thumbnail=params[3],
                )
                item = (image, params, n, key)
            n_tokens += n * self.model_cfg.tokens_per_tile
            if n_tokens >= self.session_len:
                raise ContextLengthExceeded(
                    f"the images alone need {n_tokens} tokens or more, which does not fit "
                    f"session_len={self.session_len}"
                )
            loaded.append(item)
        tiled = []
        for image, params, n, extra in loaded:
            if image is None:
                digest, source, policy = extra
                make = functools.partial(_tiles_of_source, source, policy, params)
                tiled.append(_Tiled(None, n, digest, make))
            else:
                tiled.append(self._tile(image, params, n))
                self._sources.put(extra, tiled[-1].content_hash, n)
        return tiled

    def _load(self, ref, policy: MediaPolicy | None) -> Any:
        try:
            return load_image(ref.source, policy)
        except ImageError as exc:
            exc.param = exc.param or ref.param  # name the offending part: messages[i].content[j]…
            raise

    def _params(self, ref) -> tuple:
        """Tiling parameters of one image: (max_num, min_num, image_size, use_thumbnail)."""
        cfg = self.model_cfg
        return (
            ref.max_dynamic_patch or cfg.max_dynamic_patch,
            cfg.min_dynamic_patch,
            cfg.vision.image_size,
            cfg.use_thumbnail,
        )

    def _tile(self, image: Any, params: tuple, n: int) -> _Tiled:
        """One image's ``n`` tiles (uint8 (n, 448, 448, 3): they are normalised on the device) and
        content hash (pixels, size, tiling).
        When the engine already holds the image's embedding (a follow-up turn, a repeated image),
        tiling is deferred: the engine makes the tiles only if that entry is gone when needed."""
        key = hashlib.sha256(image.tobytes())  # twice blake2b's speed with SHA instructions
        key.update(repr((image.mode, image.size, params)).encode())
        digest = key.hexdigest()[:32]
        vision = self.engine.vision  # None once the pipeline is closed
        if vision is not None and digest in vision.cache:
            return _Tiled(None, n, digest, functools.partial(_tiles_of, image, params))
        return _Tiled(_tiles_of(image, params), n, digest, None)

    def reconfigure(self, req: PreparedRequest, gen_config: GenerationConfig) -> PreparedRequest:
        """The same prepared prompt and images under another generation config (no re-fetch)."""
        sampling = self._sampling(gen_config, req.input_token_len)
        reason = self.engine.check_fits(req.input_token_len, sampling.max_new_tokens)
        if reason:
            raise ContextLengthExceeded(reason)
        return dataclasses.replace(req, sampling=sampling, gen_config=gen_config)

    def _sampling(self, gen: GenerationConfig, prompt_len: int) -> SamplingParams:
        stop = set(gen.stop_token_ids or [])
        if not gen.ignore_eos:
            stop |= self.tokenizer.stop_ids
        greedy = not gen.do_sample or gen.temperature == 0.0
        max_new = (
            gen.max_new_tokens if gen.max_new_tokens is not None else self.session_len - prompt_len
        )
        return SamplingParams(
            greedy=greedy,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            min_p=gen.min_p,
            repetition_penalty=gen.repetition_penalty,
            presence_penalty=gen.presence_penalty,
            frequency_penalty=gen.frequency_penalty,
            seed=gen.random_seed,
            max_new_tokens=max_new,
            min_new_tokens=gen.min_new_tokens or 0,
            stop_token_ids=frozenset(stop),
            bad_token_ids=tuple(self._bad_ids(gen)),
            logprobs=gen.logprobs,
        )

    def _bad_ids(self, gen: GenerationConfig) -> list[int]:
        ids = list(gen.bad_token_ids or [])
        for word in gen.bad_words or []:
            enc = self.tokenizer.encode(word)
            if len(enc) != 1:
                raise InvalidRequestError(
                    f"bad word {word!r} is not a single token",
                    code="invalid_bad_words",
                    param="bad_words",
                )
            ids += enc
        return ids

    # ---- generation ------------------------------------------------------------------------------
    def _submit(self, req: PreparedRequest, session_id: int, put) -> Sequence:
        seq = Sequence(session_id, list(req.token_ids), copy.copy(req.sampling), images=req.images)
        self.loop.add(seq, put)
        return seq

    async def generate_prepared(
        self, req: PreparedRequest, session_id: int
    ) -> AsyncIterator[GenOut]:
        """Stream the deltas of a prepared request; leaving early (or being cancelled) aborts it."""
        q: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._submit(req, session_id, Subscription(self._async_channel(), q))
        proc = _OutputProcessor(self.tokenizer, req)
        try:
            while proc.finish_reason is None:
                yield proc.process(await q.get())
        finally:
            if not proc.engine_done:
                self.loop.abort(session_id)

    def _async_channel(self) -> _LoopChannel:
        """The running event loop's channel: all its requests' outputs of a step arrive in one
        callback on the loop."""
        loop = asyncio.get_running_loop()
        with self._ids_lock:
            channel = self._channels.get(loop)
            if channel is None:
                channel = self._channels[loop] = _LoopChannel(loop)
        return channel

    def abort(self, session_id: int) -> None:
        self.loop.abort(session_id)

    def stats(self) -> dict[str, float | int]:
        """Engine load; raises :class:`EngineDeadError` once the engine has failed."""
        if not self.loop.alive:
            raise EngineDeadError("the engine has stopped after an internal error")
        return self.engine.stats()

    # ---- the LMDeploy API ------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Any,
        gen_config: GenerationConfig | list | None = None,
        use_tqdm: bool = False,
        **kwargs: Any,
    ) -> Response | list[Response]:
        return self.infer(prompts, gen_config=gen_config, use_tqdm=use_tqdm, **kwargs)

    def infer(
        self,
        prompts: Any,
        gen_config: GenerationConfig | list | None = None,
        use_tqdm: bool = False,
        do_preprocess: bool = True,
        **kwargs: Any,
    ) -> Response | list[Response]:
        _reject_kwargs(kwargs)
        single, items = _as_batch(prompts)
        responses: list[Response | None] = [None] * len(items)
        bar = _progress(len(items)) if use_tqdm else None
        for r in self._stream(items, gen_config, do_preprocess, incremental=False):
            acc = responses[r.index]
            responses[r.index] = r if acc is None else _merge(acc, r)
            if bar is not None and r.finish_reason is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return responses[0] if single else responses

    def stream_infer(
        self,
        prompts: Any,
        gen_config: GenerationConfig | list | None = None,
        do_preprocess: bool = True,
        **kwargs: Any,
    ) -> Iterator[Response]:
        """Yields incremental ``Response`` objects (``text`` is the new text, ``index`` the prompt's
        position) for all prompts concurrently, in the order outputs arrive."""
        _reject_kwargs(kwargs)
        _, items = _as_batch(prompts)
        yield from self._stream(items, gen_config, do_preprocess, incremental=True)

    def _stream(
        self, items: list[Any], gen_config: Any, do_preprocess: bool, incremental: bool
    ) -> Iterator[Response]:
        """``stream_infer`` over a list of prompts. Without ``incremental``, text is decoded once
        at the end of each request (unless stop words need it earlier): for callers that only
        want the whole response."""
        gens = gen_config if isinstance(gen_config, list) else [gen_config] * len(items)
        if len(gens) != len(items):
            raise ValueError("gen_config list must have one entry per prompt")
        # Prompts are preprocessed (images decoded and tiled) on the pool and each goes to the
        # engine as soon as it is ready, so preprocessing overlaps generation.
        q: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        futures = [
            self._pool.submit(self.prepare_sync, item, g, None, None, do_preprocess)
            for item, g in zip(items, gens)
        ]
        for i, fut in enumerate(futures):
            fut.add_done_callback(lambda f, i=i: q.put(("ready", i, f)))
        procs: dict[int, tuple[int, _OutputProcessor]] = {}
        channel = _QueueChannel(q)  # one hand-over per engine step for all these prompts
        waiting = len(items)
        try:
            while waiting or any(p.finish_reason is None for _, p in procs.values()):
                kind, key, value = q.get()
                if kind == "ready":
                    req = value.result()  # bad input raises here; the finally clause cleans up
                    waiting -= 1
                    sid = self.new_session_id()
                    procs[sid] = (key, _OutputProcessor(self.tokenizer, req, incremental))
                    self._submit(req, sid, Subscription(channel, sid))
                    continue
                for sid, out in value:
                    i, proc = procs[sid]
                    if proc.finish_reason is None:
                        yield _response(proc.process(out), i)
                        if proc.finish_reason is not None and not proc.engine_done:
                            self.loop.abort(sid)  # stopped by a stop word: free its blocks
        finally:
            for fut in futures:
                fut.cancel()
            for sid, (_, proc) in procs.items():
                if not proc.engine_done:
                    self.loop.abort(sid)

    def chat(
        self,
        prompt: Any,
        session: Session | None = None,
        gen_config: GenerationConfig | None = None,
        stream_response: bool = False,
        **kwargs: Any,
    ) -> Session | Iterator[Response]:
        """One turn of a multi-turn conversation. Returns the session with ``response`` set, or,
        with ``stream_response=True``, an iterator of ``Response`` deltas that updates the session
        when it is exhausted (LMDeploy's behaviour). A turn that fails leaves the session as it
        was."""
        _reject_kwargs(kwargs)
        session = session or self.session()
        turn = self._chat_turn(session, [*session.messages, *to_messages(prompt)], gen_config)
        if stream_response:
            return turn
        for _ in turn:
            pass
        return session

    def _chat_turn(
        self, session: Session, messages: list[dict[str, Any]], gen_config: GenerationConfig | None
    ) -> Iterator[Response]:
        response = None
        for out in self.stream_infer(messages, gen_config=gen_config):
            response = dataclasses.replace(out) if response is None else _merge(response, out)
            yield out
        session.messages = [*messages, {"role": "assistant", "content": response.text}]
        session.response, session.step = response, session.step + 1

    def session(self) -> Session:
        return Session(session_id=self.new_session_id())

    def new_session_id(self) -> int:
        """A request id no other request of this pipeline uses (thread-safe)."""
        with self._ids_lock:
            return next(self._ids)

    def close(self) -> None:
        """Stop the engine thread and release the model and KV cache (GPU memory included)."""
        self.loop.close()
        self._pool.shutdown(wait=False)
        self._text_pool.shutdown(wait=False)
        if not self.loop.running:  # never pull the model from under a step still in progress
            self.engine.release()
        gc.unfreeze()  # this pipeline's objects can be collected again once unreferenced

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _OutputProcessor:
    """Per-request engine outputs → text deltas: detokenizes, applies stop words, drops stop
    tokens."""

    def __init__(self, tokenizer: Tokenizer, req: PreparedRequest, incremental: bool = True):
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer, req.gen_config.skip_special_tokens)
        self.stops = StopMatcher(
            req.gen_config.stop_words or [], include=req.gen_config.include_stop_str_in_output
        )
        # Stop words are matched on text as it grows, so they need the incremental decode.
        self.incremental = incremental or bool(req.gen_config.stop_words)
        self.finish_reason: str | None = None
        self.engine_done = False  # the engine has released the request
        self.generated = self.cached = 0

    def process(self, out: StepOutput) -> GenOut:
        self.engine_done = out.finish_reason is not None
        ids, text, lps = [], "", None
        is_stop_token = (
            out.finish_reason == "stop" and out.token_id in self.req.sampling.stop_token_ids
        )
        if out.token_id is not None and not is_stop_token:
            ids, lps = [out.token_id], ([out.logprobs] if out.logprobs is not None else None)
            if self.incremental:
                text = self.detok.add(out.token_id)
            else:
                self.detok.append(out.token_id)  # decoded once, by flush() at the end
        if out.finish_reason:
            text += self.detok.flush()
        text, hit = self.stops.feed(text)
        reason = "stop" if hit else out.finish_reason
        if reason is not None and not hit:
            text += self.stops.flush()  # held-back text that turned out not to be a stop string
        self.finish_reason = reason
        # a final error/abort output carries no counts: keep what earlier outputs reported
        self.generated = max(self.generated, out.num_output_tokens)
        self.cached = max(self.cached, out.num_cached_tokens)
        return GenOut(
            text, ids, lps, reason, self.req.input_token_len, self.generated, self.cached, out.error
        )


class _QueueChannel:
    """Outputs of many requests into one thread-safe queue, as one item per engine step."""

    def __init__(self, q: queue.SimpleQueue):
        self.q = q

    def send(self, items: list[tuple[Any, StepOutput]]) -> None:
        self.q.put(("outs", None, items))


class _LoopChannel:
    """Outputs of an event loop's requests, handed to the loop once per engine step; each key is
    the request's ``asyncio.Queue``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # weak: the pipeline's loop-keyed cache must not keep it

    def send(self, items: list[tuple[Any, StepOutput]]) -> None:
        loop = self.loop()
        if loop is not None and not loop.is_closed():  # the consumer's loop may be gone
            loop.call_soon_threadsafe(_dispatch, items)


def _dispatch(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _tiles_of(image: Any, params: tuple) -> torch.Tensor:
    max_num, min_num, image_size, use_thumbnail = params
    return raw_tiles(
        image, max_num=max_num, min_num=min_num, image_size=image_size, use_thumbnail=use_thumbnail
    )


def _tiles_of_source(source: Any, policy: MediaPolicy, params: tuple) -> torch.Tensor:
    """Tiles of an inline source that was memoised: decoded again only if its embedding has left
    the cache by the time the engine needs it (no network: the source holds its bytes)."""
    return _tiles_of(load_image(source, policy), params)


@dataclass
class _Tiled:
    """A prepared image: its tiles (None when deferred, see ``Pipeline._tile``), their number,
    its content hash and, when deferred, how to make the tiles."""

    pixel_values: torch.Tensor | None
    num_tiles: int
    content_hash: str
    tile: Any


def _image_inputs(
    ids: list[int], tiles: list[_Tiled], per_tile: int, ctx_id: int
) -> list[ImageInput]:
    images, pos = [], 0
    for t in tiles:
        pos = ids.index(ctx_id, pos)
        n = t.num_tiles * per_tile
        images.append(ImageInput(t.pixel_values, pos, n, t.content_hash, t.tile))
        pos += n
    return images


def _has_images(prompt: Any) -> bool:
    try:
        return bool(build_conversation(to_messages(prompt)).images)
    except InvalidRequestError:
        return False  # prepare_sync reports it


def _raw_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            "do_preprocess=False needs a string prompt", code="invalid_prompt", param="prompt"
        )
    if IMAGE_TOKEN in prompt:
        raise InvalidRequestError(
            f"a raw prompt cannot hold {IMAGE_TOKEN}", code="invalid_prompt", param="prompt"
        )
    return prompt


def _as_batch(prompts: Any) -> tuple[bool, list[Any]]:
    single = isinstance(prompts, (str, tuple)) or (
        isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict)
    )
    if single:
        return True, [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise InvalidRequestError(
            f"unsupported prompt form {type(prompts).__name__}: expected a str, a (text, image) "
            "tuple, an OpenAI-style message list, or a non-empty list of those",
            code="invalid_prompt",
            param="prompts",
        )
    return False, prompts


def _response(d: GenOut, index: int) -> Response:
    return Response(
        text=d.text,
        generate_token_len=d.generate_token_len,
        input_token_len=d.input_token_len,
        finish_reason=d.finish_reason,
        token_ids=d.token_ids,
        logprobs=d.logprobs,
        index=index,
        cached_tokens=d.cached_tokens,
        error_message=d.error,
    )


def _merge(acc: Response, r: Response) -> Response:
    """Fold a delta into the accumulated response (``acc`` owns its lists: the first delta's
    lists are fresh per output, so extending them in place is safe)."""
    acc.text += r.text
    acc.token_ids.extend(r.token_ids)
    if r.logprobs is not None:
        if acc.logprobs is None:
            acc.logprobs = []
        acc.logprobs.extend(r.logprobs)
    acc.generate_token_len, acc.finish_reason = r.generate_token_len, r.finish_reason
    acc.cached_tokens = r.cached_tokens
    acc.error_message = r.error_message
    return acc


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="prompt")


def _reject_kwargs(kwargs: dict[str, Any]) -> None:
    allowed = {"do_preprocess", "adapter_name", "sequence_start", "sequence_end"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
    if kwargs.get("adapter_name") is not None:
        raise NotImplementedError("adapter_name is not supported by vlmdeploy yet")

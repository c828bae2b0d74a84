"""Preparing a request: validation, media, template, tokens and sampling, before any engine work.

:meth:`Preparer.prepare_sync` turns one prompt and its :class:`GenerationConfig` into a
:class:`PreparedRequest` — token ids with each image's block in place, the images' tiles (or
deferred :class:`~vlmdeploy.engine.io.TileSource`\\ s) and content hashes, and the engine's
:class:`SamplingParams` — or raises :class:`InvalidRequestError` (``ContextLengthExceeded``,
``ImageError``) naming what is wrong. Everything that can refuse a request happens here, so the
HTTP server answers bad input with a plain error before its first byte.

The order puts the cheap refusals first (:mod:`~vlmdeploy.frontend.limits`): text that cannot be
encoded and prompts over ``max_prompt_chars`` before the template; the text's tokens against
``session_len`` before any image is fetched; the images' tokens from their sizes before any tiling.

Preparation runs on thread pools: prompts with images on the media pool (``PREP_THREADS``), text
prompts on their own pool, so a slow image host never delays a text request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.engine_loop import EngineLoop
from vlmdeploy.engine.io import ImageInput
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.errors import ContextLengthExceeded, InvalidRequestError
from vlmdeploy.frontend.guided import GuidedDecoding
from vlmdeploy.frontend.images import ImagePreparer, PreparedImage
from vlmdeploy.frontend.limits import check_encodable, check_prompt_size, default_max_prompt_chars
from vlmdeploy.frontend.prompt import ImageRef, PromptEncoder, has_images, image_offsets
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.messages import GenerationConfig
from vlmdeploy.vl.media import MediaPolicy
from vlmdeploy.vl.tiling import TilingParams
from vlmdeploy.vl.video import VideoFrame

# Threads that fetch, decode, hash and tile images. Two keep up with the GPU on every workload
# measured (docs/results.csv). More starve the engine thread: it gives the GIL up at every
# Triton launch (an eager prefill step makes ~1,500 launches) and must win it back from them, so
# the GPU idles while prompts are prepared. A slow image host holds a thread for at most its
# request's media deadline.
PREP_THREADS = 2
# Text-only prompts: no I/O, a template and a tokenizer call each.
TEXT_THREADS = 2


@dataclass
class PreparedRequest:
    """A validated request, ready for the engine. It is only read once made: the choices of one
    prompt submit the same one."""

    token_ids: list[int]
    images: list[ImageInput]
    sampling: SamplingParams
    gen_config: GenerationConfig
    prompt: str  # the rendered text, image markers included

    @property
    def input_token_len(self) -> int:
        return len(self.token_ids)


class Preparer:
    """Prompts → :class:`PreparedRequest`, on the calling thread or on the preparation pools."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_cfg: ModelConfig,
        engine: EngineLoop,
        max_prompt_chars: int | None = None,
        chat_template: tuple[str, dict[str, Any]] | None = None,
        template_stop_words: list[str] | None = None,
    ):
        """``chat_template`` replaces the checkpoint's template; ``template_stop_words`` (a
        ChatTemplateConfig's) are added to every request's stop words."""
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, chat_template)
        self.template_stop_words = list(template_stop_words or [])
        self.engine = engine
        self.session_len = engine.session_len
        self.max_prompt_chars = max_prompt_chars or default_max_prompt_chars(self.session_len)
        self.tokens_per_tile = model_cfg.tokens_per_tile
        self.guided = GuidedDecoding(tokenizer.hf, model_cfg.text.vocab_size)
        tiling = TilingParams(
            max_num=model_cfg.max_dynamic_patch,
            min_num=model_cfg.min_dynamic_patch,
            image_size=model_cfg.vision.image_size,
            use_thumbnail=model_cfg.use_thumbnail,
        )
        self.images = ImagePreparer(
            tiling, self.tokens_per_tile, self.session_len, engine.has_cached_image
        )
        self.pool = ThreadPoolExecutor(
            max_workers=PREP_THREADS, thread_name_prefix="vlmdeploy-prep"
        )
        self.text_pool = ThreadPoolExecutor(
            max_workers=TEXT_THREADS, thread_name_prefix="vlmdeploy-text"
        )

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
        gen = self._with_template_stops(gen_config or GenerationConfig())
        param = "messages" if isinstance(prompt, list) else "prompt"
        check_prompt_size(prompt, self.max_prompt_chars, self.session_len, param)
        check_encodable(prompt, param)
        check_encodable(gen.stop_words, "stop_words")
        check_encodable(gen.bad_words, "bad_words")
        policy = media_policy or MediaPolicy()
        text, refs = self.prompts.render(prompt, chat_template_kwargs, do_preprocess, policy.video)
        segments = self.prompts.encode_text(text, len(refs), param)
        text_tokens = sum(map(len, segments)) + 2 * len(refs)  # + each image's <img>, </img>
        if text_tokens >= self.session_len:
            raise ContextLengthExceeded(
                f"the prompt's text has {text_tokens} tokens, which does not fit "
                f"session_len={self.session_len}",
                param=param,
            )
        self._check_video_room(refs, text_tokens)
        images = self.images.prepare(refs, policy, cancel, text_tokens)
        sizes = [im.num_tiles * self.tokens_per_tile for im in images]
        ids = self.prompts.join(segments, sizes)
        inputs = _image_inputs(ids, images, sizes, self.tokenizer.image_ids["img_context"])
        if not ids:
            raise InvalidRequestError("the prompt is empty", code="empty_prompt", param="prompt")
        sampling = self.sampling(gen, len(ids))
        self._check_lengths(len(ids), sampling)
        return PreparedRequest(ids, inputs, sampling, gen, text)

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
        pool = self.pool if has_images(prompt) else self.text_pool
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

    def submit(
        self, prompt: Any, gen_config: GenerationConfig | None, do_preprocess: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Future[PreparedRequest]:
        """:meth:`prepare_sync` on the media pool (the Python API's batches)."""
        return self.pool.submit(self.prepare_sync, prompt, gen_config, None,
                                chat_template_kwargs, do_preprocess)

    def reconfigure(self, req: PreparedRequest, gen_config: GenerationConfig) -> PreparedRequest:
        """The same prepared prompt and images under another generation config (no re-fetch)."""
        gen_config = self._with_template_stops(gen_config)
        check_encodable(gen_config.stop_words, "stop_words")
        sampling = self.sampling(gen_config, req.input_token_len)
        self._check_lengths(req.input_token_len, sampling)
        return dataclasses.replace(req, sampling=sampling, gen_config=gen_config)

    def _with_template_stops(self, gen: GenerationConfig) -> GenerationConfig:
        if not self.template_stop_words:
            return gen
        words = [*(gen.stop_words or []),
                 *(w for w in self.template_stop_words if w not in (gen.stop_words or []))]
        return dataclasses.replace(gen, stop_words=words)

    def sampling(self, gen: GenerationConfig, prompt_len: int) -> SamplingParams:
        """The engine's sampling parameters for ``gen``; without ``max_new_tokens``, up to
        ``session_len``."""
        stop = set(gen.stop_token_ids or [])
        if not gen.ignore_eos:
            stop |= self.tokenizer.stop_ids
        greedy = not gen.do_sample or gen.temperature == 0.0
        # LMDeploy's greedy decoding (do_sample=False) turns the repetition penalty off; a
        # sampling config at temperature 0 (the server's) decodes greedily with its penalties.
        repetition_penalty = gen.repetition_penalty if gen.do_sample else 1.0
        max_new = (
            gen.max_new_tokens if gen.max_new_tokens is not None else self.session_len - prompt_len
        )
        return SamplingParams(
            greedy=greedy,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            min_p=gen.min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=gen.presence_penalty,
            frequency_penalty=gen.frequency_penalty,
            seed=gen.random_seed,
            max_new_tokens=max_new,
            min_new_tokens=gen.min_new_tokens or 0,
            stop_token_ids=frozenset(stop),
            bad_token_ids=tuple(self._bad_ids(gen)),
            logprobs=gen.logprobs,
            # its own grammar state for every request; a grammar's end allows the turn's end
            guide=self.guided.guide(gen.response_format, frozenset(stop | self.tokenizer.stop_ids)),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.text_pool.shutdown(wait=False)

    def _check_lengths(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        """The output's bounds: at least one new token, ``min_new_tokens`` within both
        ``max_new_tokens`` and the room ``session_len`` leaves, and a request that fits."""
        if sampling.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be at least 1", param="max_new_tokens")
        self._check_fits(num_prompt_tokens, sampling)
        room = min(sampling.max_new_tokens, self.session_len - num_prompt_tokens)
        if sampling.min_new_tokens > room:
            raise InvalidRequestError(
                f"min_new_tokens={sampling.min_new_tokens} exceeds the {room} new tokens this "
                f"request may have (max_new_tokens, and session_len={self.session_len} less the "
                f"prompt's {num_prompt_tokens})",
                param="min_new_tokens",
            )

    def _check_video_room(self, refs: list[ImageRef], text_tokens: int) -> None:
        """Refuse, before any video is fetched or decoded, a prompt whose video frames (a tile
        each at least) cannot fit ``session_len`` beside its text."""
        frames = sum(isinstance(ref.source, VideoFrame) for ref in refs)
        need = text_tokens + frames * self.tokens_per_tile
        if frames and need >= self.session_len:
            raise ContextLengthExceeded(
                f"the prompt's text and {frames} video frames need {need} tokens or more, which "
                f"does not fit session_len={self.session_len}; ask for fewer frames (num_frames)"
            )

    def _check_fits(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        reason = self.engine.check_fits(num_prompt_tokens, sampling.max_new_tokens)
        if reason:
            raise ContextLengthExceeded(reason)

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


def _image_inputs(
    ids: list[int], images: list[PreparedImage], sizes: list[int], ctx_id: int
) -> list[ImageInput]:
    offsets = image_offsets(ids, sizes, ctx_id)
    return [
        ImageInput(im.pixel_values, offset, n, im.content_hash, im.deferred)
        for im, offset, n in zip(images, offsets, sizes, strict=True)
    ]

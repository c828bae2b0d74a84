"""The LMDeploy-compatible Python API: ``pipeline(...)`` returns a :class:`Pipeline`.

A request goes: prompt form → messages → chat template, images loaded and tiled → token ids with
image blocks (:mod:`~vlmdeploy.frontend.prepare`, which also validates everything) → the engine
(:class:`~vlmdeploy.engine.engine_loop.EngineLoop`, the only engine object the front end holds) →
token stream (:mod:`~vlmdeploy.frontend.stream`) → incremental detokenization and stop words
(:mod:`~vlmdeploy.frontend.output`) → :class:`~vlmdeploy.messages.Response` or ``GenOut`` deltas.
The synchronous API (``__call__``, ``infer``, ``stream_infer``, ``chat``) and the asynchronous one
the HTTP server uses (``prepare`` + ``generate_prepared``) share this path. This module is glue: it
builds the parts and maps LMDeploy's call shapes onto them.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine import start_engine
from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.output import GenOut, merge_response
from vlmdeploy.frontend.prepare import PreparedRequest, Preparer
from vlmdeploy.frontend.prompt import to_messages
from vlmdeploy.frontend.stream import Streamer
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.messages import GenerationConfig, PytorchEngineConfig, Response, VisionConfig
from vlmdeploy.vl.media import MediaPolicy

logger = logging.getLogger("vlmdeploy")


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
        max_prompt_chars: int | None = None,
        **kwargs: Any,
    ):
        """``max_prompt_chars`` (a vlmdeploy extension) caps a prompt's text before it is
        templated or tokenised; the default is 16 × ``session_len`` (see
        :mod:`vlmdeploy.frontend.limits`)."""
        if kwargs.pop("backend", "pytorch") not in ("pytorch", "turbomind"):
            raise ValueError("backend must be 'pytorch'")
        vision = kwargs.pop("vision_config", None)
        if vision is not None and vision != VisionConfig():
            raise NotImplementedError(
                "vision_config is not supported yet: the vision stage batches up to 64 tiles of "
                "many requests per encoder call on its own"
            )
        template_config = kwargs.pop("chat_template_config", None)
        for name in ("log_level", "max_log_len"):  # handled by pipeline()
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"pipeline() got unexpected arguments: {', '.join(sorted(kwargs))}")
        self.model_path = str(model_path)
        self.model_name = model_name or Path(self.model_path).name
        self.backend_config = backend_config or PytorchEngineConfig()
        self.model_cfg = ModelConfig.from_pretrained(self.model_path)
        self.tokenizer = Tokenizer(self.model_path)
        self.engine = start_engine(
            self.model_path,
            self.backend_config,
            self.model_cfg,
            self.tokenizer.image_ids["img_context"],
        )
        self.session_len = self.engine.session_len
        self.preparer = Preparer(
            self.tokenizer, self.model_cfg, self.engine, max_prompt_chars,
            chat_template=template_config.jinja() if template_config is not None else None,
            template_stop_words=getattr(template_config, "stop_words", None))
        self.streamer = Streamer(self.engine, self.tokenizer, self.preparer)
        # What is built by now (model, tokenizer, compiled kernels: some 10^5-10^6 objects) lives
        # as long as the pipeline, and a full collection walks every tracked object with no thread
        # running. Frozen, the start-up heap is left out of collections, which then walk only what
        # serving creates.
        gc.collect()
        gc.freeze()
        atexit.unregister(gc.unfreeze)  # once, however many pipelines (see close)
        atexit.register(gc.unfreeze)

    # ---- the server's interface (see vlmdeploy.serve.contract) -----------------------------------
    def prepare_sync(
        self,
        prompt: Any,
        gen_config: GenerationConfig | None = None,
        media_policy: MediaPolicy | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> PreparedRequest:
        """Validate and preprocess one prompt on the calling thread (see :class:`Preparer`)."""
        return self.preparer.prepare_sync(
            prompt, gen_config, media_policy, chat_template_kwargs, do_preprocess
        )

    async def prepare(
        self,
        prompt: Any,
        gen_config: GenerationConfig | None = None,
        media_policy: MediaPolicy | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> PreparedRequest:
        """:meth:`prepare_sync` on the preparation pools; cancelling stops it between images."""
        return await self.preparer.prepare(
            prompt, gen_config, media_policy, chat_template_kwargs, do_preprocess
        )

    def reconfigure(self, req: PreparedRequest, gen_config: GenerationConfig) -> PreparedRequest:
        """The same prepared prompt and images under another generation config (no re-fetch)."""
        return self.preparer.reconfigure(req, gen_config)

    def generate_prepared(self, req: PreparedRequest, session_id: int) -> AsyncIterator[GenOut]:
        """Stream the deltas of a prepared request; leaving early (or being cancelled) aborts it."""
        return self.streamer.generate(req, session_id)

    def abort(self, session_id: int) -> None:
        self.engine.abort(session_id)

    def stats(self) -> dict[str, float | int]:
        """Engine load; raises :class:`EngineDeadError` once the engine has failed."""
        return self.engine.stats()

    def new_session_id(self) -> int:
        """A request id no other request of this pipeline uses (thread-safe)."""
        return self.streamer.new_id()

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
        """Whole responses of one prompt or a list. As in LMDeploy, ``tools`` (OpenAI's function
        tools), ``enable_thinking`` and ``chat_template_kwargs`` reach the chat template; the
        text comes back as the model wrote it (``vlmdeploy.serve.tools`` parses tool calls)."""
        template = _template_kwargs(kwargs)
        single, items = _as_batch(prompts)
        responses: list[Response | None] = [None] * len(items)
        bar = _progress(len(items)) if use_tqdm else None
        gens = _per_prompt(gen_config, len(items))
        for r in self.streamer.stream(items, gens, do_preprocess, incremental=False,
                                      chat_template_kwargs=template):
            acc = responses[r.index]
            responses[r.index] = r if acc is None else merge_response(acc, r)
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
        position) for all prompts concurrently, in the order outputs arrive. Takes what
        :meth:`infer` takes."""
        template = _template_kwargs(kwargs)
        _, items = _as_batch(prompts)
        gens = _per_prompt(gen_config, len(items))
        yield from self.streamer.stream(items, gens, do_preprocess, incremental=True,
                                        chat_template_kwargs=template)

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
        was. Takes what :meth:`infer` takes."""
        template = _template_kwargs(kwargs)
        session = session or self.session()
        turn = self._chat_turn(session, [*session.messages, *to_messages(prompt)], gen_config,
                               template)
        if stream_response:
            return turn
        for _ in turn:
            pass
        return session

    def _chat_turn(
        self, session: Session, messages: list[dict[str, Any]],
        gen_config: GenerationConfig | None, template: dict[str, Any] | None,
    ) -> Iterator[Response]:
        response = None
        for out in self.stream_infer(messages, gen_config=gen_config,
                                     chat_template_kwargs=template):
            response = (
                dataclasses.replace(out) if response is None else merge_response(response, out)
            )
            yield out
        session.messages = [*messages, {"role": "assistant", "content": response.text}]
        session.response, session.step = response, session.step + 1

    def session(self) -> Session:
        return Session(session_id=self.new_session_id())

    def close(self) -> None:
        """Stop the engine thread and release the model and KV cache (GPU memory included).

        A pipeline never closed is unfrozen at interpreter exit (an ``atexit`` hook): the
        interpreter's last collection must reach the frozen heap, or the objects in its cycles
        (Triton's compiled-kernel objects among them) outlive their extension modules, and
        nanobind prints hundreds of "leaked" lines on stderr."""
        gc.unfreeze()  # first: the engine's collection must be able to reach the frozen heap
        self.engine.close()
        self.preparer.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pipeline(
    model_path: str | None = None,
    backend_config: PytorchEngineConfig | None = None,
    chat_template_config: Any = None,
    log_level: str = "WARNING",
    max_log_len: int | None = None,
    **kwargs: Any,
) -> Pipeline:
    """Load a model and return a :class:`Pipeline` (LMDeploy's signature).

    ``model_path`` is a local checkpoint directory (original or -HF InternVL3.5 format) or a
    Hugging Face model id (``OpenGVLab/InternVL3_5-8B``: the local cache first, then a download
    into ``backend_config.download_dir`` at ``backend_config.revision``, see
    :mod:`vlmdeploy.hub`); when omitted, the embedded default model shipped with the package is
    used. ``backend_config`` may be LMDeploy's ``TurbomindEngineConfig``: it runs on vlmdeploy's
    engine (:meth:`~vlmdeploy.messages.TurbomindEngineConfig.to_pytorch`).
    ``chat_template_config`` (:class:`~vlmdeploy.model.ChatTemplateConfig`) replaces the
    checkpoint's template. ``log_level`` sets the level of the ``vlmdeploy`` loggers (the CLI
    passes its ``--log-level`` here).
    """
    from vlmdeploy.hub import resolve_model_path
    from vlmdeploy.messages import TurbomindEngineConfig
    from vlmdeploy.model import ChatTemplateConfig

    logger.setLevel(log_level)
    if chat_template_config is not None:
        if not isinstance(chat_template_config, ChatTemplateConfig):
            raise TypeError("chat_template_config must be a ChatTemplateConfig")
        chat_template_config.jinja()  # refuses what it cannot render before the model loads
    if isinstance(backend_config, TurbomindEngineConfig):
        backend_config = backend_config.to_pytorch()
    if backend_config is not None and not isinstance(backend_config, PytorchEngineConfig):
        raise NotImplementedError(
            f"{type(backend_config).__name__} is not supported: vlmdeploy runs its "
            "PyTorch engine; pass a PytorchEngineConfig"
        )
    resolved = resolve_model_path(model_path, backend_config)  # ids go through the HF hub
    if model_path is not None and resolved != model_path and kwargs.get("model_name") is None:
        kwargs["model_name"] = model_path  # a model id is served under its own name
    model_path = resolved
    return Pipeline(model_path, backend_config=backend_config,
                    chat_template_config=chat_template_config, **kwargs)


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


def _per_prompt(gen_config: Any, n: int) -> list[GenerationConfig | None]:
    gens = gen_config if isinstance(gen_config, list) else [gen_config] * n
    if len(gens) != n:
        raise ValueError("gen_config list must have one entry per prompt")
    return gens


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="prompt")


# What the chat template takes (vlmdeploy.frontend.chat_template.ChatTemplate.render).
TEMPLATE_KWARGS = ("enable_thinking", "tools")


def _template_kwargs(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The chat template's arguments among LMDeploy's generate() keywords (``tools``,
    ``enable_thinking``, ``chat_template_kwargs``); anything unknown is a TypeError."""
    kwargs = dict(kwargs)
    template = dict(kwargs.pop("chat_template_kwargs", None) or {})
    for name in TEMPLATE_KWARGS:
        if kwargs.get(name) is not None:
            template[name] = kwargs.pop(name)
        kwargs.pop(name, None)
    unknown = set(template) - set(TEMPLATE_KWARGS)
    if unknown:
        raise TypeError(f"chat_template_kwargs: unexpected {', '.join(sorted(unknown))} "
                        f"(the template takes {', '.join(TEMPLATE_KWARGS)})")
    tools = template.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise TypeError("tools must be a list of OpenAI function tools (dicts)")
    _reject_kwargs(kwargs)
    return template or None


def _reject_kwargs(kwargs: dict[str, Any]) -> None:
    allowed = {"do_preprocess", "adapter_name", "sequence_start", "sequence_end"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
    if kwargs.get("adapter_name") is not None:
        raise NotImplementedError("adapter_name is not supported by vlmdeploy yet")

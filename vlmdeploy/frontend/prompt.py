"""From user prompts to token ids: prompt forms → messages → chat template → tokens with image
blocks.

Accepted prompt forms (LMDeploy's): a string; a ``(text, image)`` or ``(text, [images])`` tuple (or
the same with the image first); an OpenAI-style message list whose user contents may hold
``text``, ``image_url`` and ``image`` parts. Videos: a :class:`~vlmdeploy.vl.video.Video` (from
``load_video``) in place of an image in the tuple forms, or ``video_url`` / ``video`` parts. Each
video becomes ``Frame{i}: IMAGE_TOKEN\n`` per frame (i from 1) where it stands, its frames
ordinary images of ``max_dynamic_patch`` tiles each (1 unless asked), as the model card prompts
videos. Placement rules:

* if any user text contains ``IMAGE_TOKEN``, each occurrence takes the next image, in order, and
  image parts only supply the images;
* otherwise every image part becomes its own block followed by a newline, where the part stands;
  the tuple forms put their images before the text, as the reference ``model.chat()`` does.

The checkpoint's own chat template renders the conversation (ChatML when it has none), with
``IMAGE_TOKEN`` left in the text; the rendered prompt is then split there and each image becomes
``<img>`` + ``<IMG_CONTEXT>`` × (256 · tiles) + ``</img>``. Splitting at these special tokens
tokenizes exactly like the expanded string would. Text that itself spells one of those three image
tokens is refused: it would take embeddings meant for a real image.

:class:`PromptEncoder` is the front end's use of all this: ``render`` (prompt → text with markers
and the images to load) and ``token_ids`` (text + each image's token count → ids). With
``do_preprocess=False`` a string prompt is taken as the model's raw input: no template, no images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.chat_template import ChatTemplate
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.media_policy import VideoLimits
from vlmdeploy.vl.video import Video, VideoClip, VideoFrame, check_sampling

if TYPE_CHECKING:
    from vlmdeploy.frontend.tokenizer import Tokenizer

_ROLES = ("system", "user", "assistant", "tool")
# keys of a message that a chat template may read besides role and content (tool calls and results)
_TOOL_KEYS = ("tool_calls", "tool_call_id", "name")

# Upper bound on a request's per-image max_dynamic_patch (InternVL's "high" detail is 24): tiling
# and encoding cost grow with it, so a request must not pick an arbitrary number.
MAX_TILES_PER_IMAGE = 64


@dataclass
class ImageRef:
    """An image as the user gave it (PIL image, path, URL, data URL, bytes) and its tiling limit."""

    source: Any
    max_dynamic_patch: int | None = None
    param: str = "messages"


@dataclass
class Conversation:
    """Messages with string contents (images replaced by ``IMAGE_TOKEN``) and the images in
    order."""

    messages: list[dict[str, Any]]
    images: list[ImageRef] = field(default_factory=list)


def to_messages(prompt: Any) -> list[dict[str, Any]]:
    """Normalise one prompt of any accepted form into an OpenAI-style message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple) and len(prompt) == 2 and _text_first(*prompt) is not None:
        text, images = prompt if _text_first(*prompt) else prompt[::-1]
        images = images if isinstance(images, list) else [images]
        parts = [_media_part(im) for im in images]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise InvalidRequestError(
        f"unsupported prompt form {type(prompt).__name__}: expected a str, a (text, image) or "
        "(text, [images]) tuple, or a list of OpenAI-style message dicts",
        code="invalid_prompt",
        param="prompts",
    )


def _media_part(item: Any) -> dict[str, Any]:
    """A tuple prompt's image or :class:`~vlmdeploy.vl.video.Video` as a content part."""
    if isinstance(item, Video):
        return {"type": "video", "video": item}
    return {"type": "image", "image": item}


def _text_first(a: Any, b: Any) -> bool | None:
    """Which element of a 2-tuple prompt is the text: True for ``(text, image)``, False for
    ``(image, text)`` (LMDeploy accepts both), None when neither is."""
    if isinstance(a, str) and isinstance(b, str):  # a URL or data URL is the image
        return not _looks_like_image_url(a) or _looks_like_image_url(b)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str)
    return None


def _looks_like_image_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "data:image", "file://"))


def build_conversation(
    messages: list[dict[str, Any]], video: VideoLimits | None = None
) -> Conversation:
    """Flatten message contents to strings, collecting images and placing ``IMAGE_TOKEN``
    markers. ``video``: how many frames a video part gets by default and may ask for."""
    if not messages:
        raise InvalidRequestError(
            "messages must not be empty", code="empty_array", param="messages"
        )
    explicit = any(
        IMAGE_TOKEN in _text_of(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
    )
    if explicit and _has_video_parts(messages):
        raise InvalidRequestError(
            f"a prompt with videos cannot place images with {IMAGE_TOKEN} in its text; use "
            "image parts where the images go",
            code="invalid_prompt",
            param="messages",
        )
    conv = Conversation(messages=[])
    video = video or VideoLimits()
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in _ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}",
                code="invalid_role",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is None and (role == "assistant" and msg.get("tool_calls")):
            content = ""  # an assistant turn that only called tools
        text = _flatten(content, conv.images, explicit, f"messages[{i}].content", video)
        conv.messages.append({"role": role, "content": text,
                              **{k: msg[k] for k in _TOOL_KEYS if msg.get(k) is not None}})
    placed = sum(m["content"].count(IMAGE_TOKEN) for m in conv.messages)
    if placed != len(conv.images):
        raise InvalidRequestError(
            f"the prompt has {placed} {IMAGE_TOKEN} placeholders but {len(conv.images)} images",
            code="image_count_mismatch",
            param="messages",
        )
    return conv


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _flatten(
    content: Any, images: list[ImageRef], explicit: bool, param: str, video: VideoLimits
) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{param} must be a string or a list of content parts",
            code="invalid_content",
            param=param,
        )
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(str(part.get("text", "")))
        elif kind in ("image_url", "image"):
            images.append(_image_ref(part, f"{param}[{j}]"))
            if not explicit:
                out.append(IMAGE_TOKEN + "\n")
        elif kind in VIDEO_PART_TYPES:
            frames = _video_frames(part, f"{param}[{j}]", video)
            images.extend(frames)
            out.extend(f"Frame{k}: {IMAGE_TOKEN}\n" for k in range(1, len(frames) + 1))
        else:
            raise InvalidRequestError(
                f"unsupported content part type {kind!r}",
                code="unsupported_content_type",
                param=f"{param}[{j}].type",
            )
    return "".join(out)


VIDEO_PART_TYPES = ("video_url", "video")


def _has_video_parts(messages: list[Any]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") in VIDEO_PART_TYPES
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
    )


def _video_frames(part: dict[str, Any], param: str, limits: VideoLimits) -> list[ImageRef]:
    """A video part's frames as images: a loaded :class:`~vlmdeploy.vl.video.Video`'s frames,
    or frames of a :class:`~vlmdeploy.vl.video.VideoClip` decoded when first needed.

    Forms: ``{"type": "video_url", "video_url": {"url": ..., "num_frames": 8, "start": 0.0,
    "end": 12.5, "max_dynamic_patch": 1}}`` (or ``"video_url": url``), and ``{"type": "video",
    "video": Video | source, ...}`` with the same options beside ``video``."""
    if part["type"] == "video":
        spec, source, where = part, part.get("video"), param
    else:
        spec = part.get("video_url")
        spec = {"url": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or "url" not in spec:
            raise InvalidRequestError(
                "video_url must be a string or an object with a 'url'",
                code="invalid_video_url",
                param=f"{param}.video_url",
            )
        source, where = spec["url"], f"{param}.video_url"
    tiles = _tile_limit(spec.get("max_dynamic_patch"), f"{where}.max_dynamic_patch")
    if isinstance(source, Video):
        if not 1 <= len(source) <= limits.max_frames:
            raise InvalidRequestError(
                f"a video may have 1 to {limits.max_frames} frames", code="invalid_video_params",
                param=where,
            )
        return [ImageRef(frame, tiles or source.max_dynamic_patch, where)
                for frame in source.frames]
    n = check_sampling(spec.get("num_frames"), spec.get("start"), spec.get("end"), limits, where)
    clip = VideoClip(source, n, spec.get("start"), spec.get("end"), where)
    url_param = where if part["type"] == "video" else f"{where}.url"
    return [ImageRef(VideoFrame(clip, k), tiles or 1, url_param) for k in range(n)]


def _image_ref(part: dict[str, Any], param: str) -> ImageRef:
    if part["type"] == "image":
        limit = _tile_limit(part.get("max_dynamic_patch"), f"{param}.max_dynamic_patch")
        return ImageRef(part.get("image"), limit, param)
    spec = part.get("image_url")
    if isinstance(spec, str):
        return ImageRef(spec, None, f"{param}.image_url")
    if not isinstance(spec, dict) or "url" not in spec:
        raise InvalidRequestError(
            "image_url must be a string or an object with a 'url'",
            code="invalid_image_url",
            param=f"{param}.image_url",
        )
    limit = _tile_limit(spec.get("max_dynamic_patch"), f"{param}.image_url.max_dynamic_patch")
    detail = spec.get("detail")
    if limit is None and isinstance(detail, str):
        from vlmdeploy.vl.tiling import DETAIL_MAX_NUM

        # low/medium/high are fixed counts; anything else ("auto") keeps the checkpoint's limit
        limit = DETAIL_MAX_NUM.get(detail)
    return ImageRef(spec["url"], limit, f"{param}.image_url.url")


def _tile_limit(value: Any, param: str) -> int | None:
    """A per-image ``max_dynamic_patch``: None, or an int in [1, MAX_TILES_PER_IMAGE]."""
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_TILES_PER_IMAGE:
        raise InvalidRequestError(
            f"max_dynamic_patch must be an integer from 1 to {MAX_TILES_PER_IMAGE}",
            code="invalid_max_dynamic_patch",
            param=param,
        )
    return value


def tokenize_with_images(
    prompt: str, image_tokens: list[int], encode: Callable[[str], list[int]], ids: dict[str, int]
) -> list[int]:
    """Token ids of ``prompt`` with the i-th ``IMAGE_TOKEN`` replaced by an image block of
    ``image_tokens[i]`` context tokens. ``encode(text) -> list[int]`` must not add special
    tokens."""
    segments = encode_segments(prompt, len(image_tokens), encode, ids)
    return join_segments(segments, image_tokens, ids)


def encode_segments(
    prompt: str,
    num_images: int,
    encode: Callable[[str], list[int]],
    ids: dict[str, int],
    param: str = "messages",
) -> list[list[int]]:
    """The token ids of the text between ``prompt``'s ``IMAGE_TOKEN`` markers (one more segment
    than images): the text's tokens, known before any image is loaded. ``param`` names the
    request field the text came from in errors (``prompt`` for a raw prompt)."""
    segments = prompt.split(IMAGE_TOKEN)
    if len(segments) - 1 != num_images:  # e.g. a chat template that drops a message
        raise InvalidRequestError(
            f"the rendered prompt has {len(segments) - 1} {IMAGE_TOKEN} placeholders but "
            f"{num_images} images",
            code="image_count_mismatch",
            param=param,
        )
    out: list[list[int]] = []
    for seg in segments:
        enc = encode(seg) if seg else []
        # A typed <IMG_CONTEXT> would take embeddings meant for the real image blocks (a typed
        # <img> or </img> takes none, so text about HTML tags stays allowed).
        if ids["img_context"] in enc:
            raise InvalidRequestError(
                "the prompt text contains the reserved image token <IMG_CONTEXT>; place "
                f"images with image parts or {IMAGE_TOKEN}",
                code="invalid_prompt",
                param=param,
            )
        out.append(enc)
    return out


def join_segments(
    segments: list[list[int]], image_tokens: list[int], ids: dict[str, int]
) -> list[int]:
    """Text segments joined by image blocks: ``<img>`` + ``<IMG_CONTEXT>`` × n + ``</img>``."""
    out = list(segments[0])
    for n, seg in zip(image_tokens, segments[1:], strict=True):
        out += [ids["img_start"], *[ids["img_context"]] * n, ids["img_end"]]
        out += seg
    return out


def image_offsets(ids: list[int], image_tokens: list[int], ctx_id: int) -> list[int]:
    """Where each image's ``<IMG_CONTEXT>`` block starts in ``ids`` (``image_tokens[i]`` long)."""
    offsets, pos = [], 0
    for n in image_tokens:
        pos = ids.index(ctx_id, pos)
        offsets.append(pos)
        pos += n
    return offsets


def raw_prompt(prompt: Any) -> str:
    """A ``do_preprocess=False`` prompt: a string used as is, which cannot place images."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            "do_preprocess=False needs a string prompt", code="invalid_prompt", param="prompt"
        )
    if IMAGE_TOKEN in prompt:
        raise InvalidRequestError(
            f"a raw prompt cannot hold {IMAGE_TOKEN}", code="invalid_prompt", param="prompt"
        )
    return prompt


def has_images(prompt: Any) -> bool:
    """Whether the prompt carries images (a malformed prompt counts as none: preparing it reports
    what is wrong). Looks at the parts' types only: it runs on the caller's event loop, before
    the prompt's size is checked."""
    try:
        messages = to_messages(prompt)
    except InvalidRequestError:
        return False
    return any(
        isinstance(part, dict) and part.get("type") in ("image_url", "image", *VIDEO_PART_TYPES)
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
    )


class PromptEncoder:
    """The checkpoint's chat template and tokenizer applied to prompts."""

    def __init__(self, tokenizer: Tokenizer,
                 template: tuple[str, dict[str, Any]] | None = None):
        """``template``: a template and its variables in place of the checkpoint's (see
        :class:`vlmdeploy.model.ChatTemplateConfig`)."""
        source, variables = template or (tokenizer.chat_template, None)
        self.template = ChatTemplate(source, tokenizer.hf.special_tokens_map, variables)
        self.encode = tokenizer.encode
        self.image_ids = tokenizer.image_ids

    def render(
        self,
        prompt: Any,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
        video: VideoLimits | None = None,
    ) -> tuple[str, list[ImageRef]]:
        """The prompt's text with one ``IMAGE_TOKEN`` per image (a video's frames included), and
        its images in order. ``video``: the frame counts video parts get and may ask for."""
        if not do_preprocess:
            return raw_prompt(prompt), []
        conv = build_conversation(to_messages(prompt), video)
        return self.template.render(conv.messages, **(chat_template_kwargs or {})), conv.images

    def token_ids(self, text: str, image_tokens: list[int]) -> list[int]:
        """Ids of rendered ``text``, each marker expanded into an image block of its size."""
        return tokenize_with_images(text, image_tokens, self.encode, self.image_ids)

    def encode_text(self, text: str, num_images: int, param: str = "messages") -> list[list[int]]:
        """The ids of the text around rendered ``text``'s image markers (see ``join``)."""
        return encode_segments(text, num_images, self.encode, self.image_ids, param)

    def join(self, segments: list[list[int]], image_tokens: list[int]) -> list[int]:
        """``encode_text``'s segments with each image's block of its size between them."""
        return join_segments(segments, image_tokens, self.image_ids)

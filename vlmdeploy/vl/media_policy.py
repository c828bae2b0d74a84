"""The limits and permissions an image is loaded under (:class:`MediaPolicy`), and the fixed
messages of the refusals.

Every refusal is a ``vlmdeploy.errors.ImageError`` with a stable ``code`` (what clients branch on)
and one of the messages below, which never contain the input, a path, an address or a library's
text; a fetch that fails says why after it, in a fixed phrase ("the server answered HTTP 404",
"the host name could not be resolved", ...). :mod:`vlmdeploy.vl.media` (local and inline
sources, decoding), :mod:`vlmdeploy.vl.ssrf` (which URLs and addresses may be fetched) and
:mod:`vlmdeploy.vl.fetch` (the HTTP transfer) all enforce the one policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlmdeploy.errors import ImageError

Resolver = Callable[[str, int], Sequence[str]]

# Fixed, input-free messages (one per situation; the `code` is what clients should branch on).
MSG_URL = "The image URL is invalid or not allowed."
MSG_FETCH = "The image could not be fetched from its URL."
MSG_LOCAL_DENIED = "Local image files are not allowed here."
MSG_LOCAL_READ = "The local image file could not be read."
MSG_FORMAT = "The image data could not be decoded."
MSG_TYPE = "The image type is not supported."
MSG_TOO_LARGE = "The image exceeds the size limit."
MSG_TIMEOUT = "Fetching the image timed out."
MSG_CANCELLED = "The request was cancelled."


def fail(code: str, message: str, reason: str | None = None) -> ImageError:
    """The refusal; ``reason`` (one of a fixed set of phrases, never the input) says why, in
    the message: "The image could not be fetched from its URL: the server answered HTTP 404."."""
    if reason:
        message = f"{message.rstrip('.')}: {reason}."
    return ImageError(message, code=code)


@dataclass(frozen=True)
class VideoLimits:
    """How a video is sampled and what it may cost (:mod:`vlmdeploy.vl.video`).

    ``default_frames`` is the number of frames (the model card's ``num_segments``) a request gets
    when it names none; ``max_frames`` caps what a request may ask. The file is bounded by
    ``max_bytes``, its stated duration by ``max_duration_s``, the frames its index may list by
    ``max_stream_frames``, each frame by ``max_pixels``, the sampled frames together by
``max_total_pixels`` (they are held decoded until tiled), and demuxing plus decoding together by
    ``decode_timeout_s``. Only the listed containers' demuxers and codecs' decoders ever run.
    """

    default_frames: int = 8
    max_frames: int = 64
    max_bytes: int = 256 * 1024 * 1024
    max_duration_s: float = 4 * 3600.0
    max_stream_frames: int = 1_000_000
    max_pixels: int = 7680 * 4320
    # the sampled frames are held decoded (RGB) until tiled: 64 frames of 1080p is 133 M pixels
    max_total_pixels: int = 200_000_000
    decode_timeout_s: float = 20.0
    allowed_codecs: tuple[str, ...] = (
        "h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.default_frames <= self.max_frames:
            raise ValueError("video frames: need 1 <= default_frames <= max_frames")
        if min(self.max_bytes, self.max_duration_s, self.max_stream_frames, self.max_pixels,
               self.max_total_pixels, self.decode_timeout_s) <= 0:
            raise ValueError("video limits must be positive")


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and permissions for loading one image (and, with ``video``, one video).

    The defaults suit the Python API (local paths work, as in LMDeploy); `server_default` suits
    requests from the network. With ``local_root`` set, relative paths are taken from it (else
    from the working directory). ``allowed_domains`` entries match exactly or as a parent domain.
    ``resolver(host, port) -> [ip, ...]`` replaces DNS resolution (custom DNS, tests); by default
    the system resolver (``getaddrinfo``) is used.
    """

    allow_local_files: bool = True
    local_root: str | None = None
    allow_private_networks: bool = False
    allowed_domains: tuple[str, ...] | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    resolver: Resolver | None = field(default=None, compare=False, repr=False)
    video: VideoLimits = field(default_factory=VideoLimits)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.timeout_s <= 0:
            raise ValueError("max_bytes, max_pixels and timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        # Normalise containers and spellings once, so checks below are plain comparisons.
        formats = tuple(f.upper() for f in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)
        if self.allowed_domains is not None:
            domains = tuple(_normalise_domain(d) for d in self.allowed_domains)
            object.__setattr__(self, "allowed_domains", domains)

    @classmethod
    def server_default(cls, **overrides) -> MediaPolicy:
        """For requests from the network: no local files, no private or special addresses."""
        return cls(**{"allow_local_files": False, "allow_private_networks": False, **overrides})


def _normalise_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".")
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return domain.lower()

"""Vision input for InternVL: loading untrusted images (`media`) and videos (`video`), and dynamic
tiling (`tiling`).

``from vlmdeploy.vl import load_image`` works as in LMDeploy; ``load_video`` beside it samples a
video's frames as the InternVL3.5 model card does (PyAV, imported on first use).
"""

from vlmdeploy.vl.media import MediaPolicy, encode_image_base64, load_image
from vlmdeploy.vl.media_policy import VideoLimits
from vlmdeploy.vl.tiling import (
    detail_to_max_num,
    dynamic_tiles,
    num_image_tokens,
    num_tiles,
    pixel_values,
    resolve_max_num,
    target_grid,
)
from vlmdeploy.vl.video import Video, frame_indices, load_video

__all__ = [
    "MediaPolicy",
    "Video",
    "VideoLimits",
    "detail_to_max_num",
    "dynamic_tiles",
    "encode_image_base64",
    "frame_indices",
    "load_image",
    "load_video",
    "num_image_tokens",
    "num_tiles",
    "pixel_values",
    "resolve_max_num",
    "target_grid",
]

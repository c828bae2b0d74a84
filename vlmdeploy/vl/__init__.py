"""Vision input for InternVL: loading untrusted images (`media`) and dynamic tiling (`tiling`).

``from vlmdeploy.vl import load_image`` works as in LMDeploy.
"""

from vlmdeploy.vl.media import MediaPolicy, encode_image_base64, load_image
from vlmdeploy.vl.tiling import (
    detail_to_max_num,
    dynamic_tiles,
    num_image_tokens,
    num_tiles,
    pixel_values,
    resolve_max_num,
    target_grid,
)

__all__ = [
    "MediaPolicy",
    "detail_to_max_num",
    "dynamic_tiles",
    "encode_image_base64",
    "load_image",
    "num_image_tokens",
    "num_tiles",
    "pixel_values",
    "resolve_max_num",
    "target_grid",
]

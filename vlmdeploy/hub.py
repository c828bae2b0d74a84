"""Model ids: `pipeline('OpenGVLab/InternVL3_5-8B')` and `serve api_server OpenGVLab/InternVL3_5-8B`
resolve through `huggingface_hub`, as with LMDeploy and transformers.

`resolve_model_path(name, backend_config)`:

* `None` or the embedded model's name → the embedded default model;
* an existing directory → itself;
* anything else is a Hugging Face model id: the checkpoint in the local cache (`download_dir`,
  else the hub's default cache: `HF_HUB_CACHE`, `HF_HOME`) at `revision` (default `main`) is used
  as is; if it is not there, it is downloaded, unless the hub is offline (`HF_HUB_OFFLINE=1`),
  which is then an error naming the id and the cache searched.

Only what vlmdeploy reads is downloaded (configs, tokenizer files, chat templates, safetensors):
pickled weights (`*.bin`, `*.pt`) and code shipped with a checkpoint are never fetched.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("vlmdeploy")

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.md"]


class ModelNotFound(FileNotFoundError):
    """A model id that is neither a directory nor in the cache, and cannot be downloaded."""


def looks_like_model_id(name: str) -> bool:
    """`org/name` (one slash, no path syntax)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and "\\" not in name)


def resolve_model_path(name_or_path: str | None, backend_config: Any = None) -> str:
    """A local checkpoint directory for `name_or_path` (see the module's docstring)."""
    from vlmdeploy.assets import resolve_model_path as embedded

    path = embedded(name_or_path)
    if name_or_path is None or os.path.isdir(path) or not looks_like_model_id(path):
        return path  # a directory, or something the loader will report as missing
    return snapshot(path, revision=getattr(backend_config, "revision", None),
                    download_dir=getattr(backend_config, "download_dir", None))


def snapshot(repo_id: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """The directory of `repo_id` at `revision`: from the cache, else downloaded."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=download_dir,
                  allow_patterns=ALLOW_PATTERNS)
    try:
        return huggingface_hub.snapshot_download(**kwargs, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    where = download_dir or constants.HF_HUB_CACHE
    at = f" at revision {revision!r}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{repo_id}{at} is not in the Hugging Face cache {where} and the hub "
                            "is offline (HF_HUB_OFFLINE=1)") from None
    logger.warning("downloading %s%s into %s", repo_id, at, where)
    try:
        return huggingface_hub.snapshot_download(**kwargs)
    except Exception as exc:  # no network, no such repo, gated: one clear line
        raise ModelNotFound(f"{repo_id}{at} is neither a local directory nor in the Hugging Face "
                            f"cache {where}, and downloading it failed: {exc}") from None

"""`vlmdeploy check_env [--dump-file FILE]`: the environment, for bug reports (LMDeploy's command).

Prints one `name: value` line each for vlmdeploy, Python, the platform, torch and its CUDA (the
GPUs it sees), and the libraries vlmdeploy runs on; `--dump-file` also writes them to a `.json`
file (or `.yml`/`.yaml` when PyYAML is installed). LMDeploy's `.pkl` is refused: vlmdeploy writes
no pickle.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any

LIBRARIES = ("transformers", "huggingface_hub", "triton", "fastapi", "uvicorn", "pydantic",
             "numpy", "PIL", "prometheus_client")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dump-file", default=None, metavar="FILE",
                        help="also write the information to FILE (.json, .yml or .yaml)")


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return "Not Found"
    except Exception:  # imported, but without a __version__
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(module)
        except PackageNotFoundError:
            return "installed"


def collect() -> dict[str, Any]:
    from vlmdeploy import __version__

    info: dict[str, Any] = {"vlmdeploy": __version__, "Python": sys.version.replace("\n", " "),
                            "Platform": platform.platform()}
    try:
        import torch

        info["PyTorch"] = torch.__version__
        info["CUDA available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["CUDA"] = torch.version.cuda
            names: dict[str, list[int]] = {}
            for i in range(torch.cuda.device_count()):
                names.setdefault(torch.cuda.get_device_name(i), []).append(i)
            for name, ids in names.items():
                info["GPU " + ",".join(map(str, ids))] = name
    except Exception as exc:  # a broken torch is what this command is for
        info["PyTorch"] = f"Not usable: {exc}"
    for module in LIBRARIES:
        info[module] = _version(module)
    return info


def dump(info: dict[str, Any], path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yml", ".yaml"):
        raise ValueError(f"--dump-file {path}: write .json, .yml or .yaml (vlmdeploy writes no "
                         "pickle)")
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if ext == ".json":
            json.dump(info, f, indent=2, default=str)
        else:
            import yaml

            yaml.safe_dump({k: v if isinstance(v, int | float | bool) else str(v)
                            for k, v in info.items()}, f)


def run(args: argparse.Namespace) -> int:
    info = collect()
    for key, value in info.items():
        print(f"{key}: {value}")
    if args.dump_file:
        try:
            dump(info, args.dump_file)
        except (ValueError, ImportError, OSError) as exc:
            print(f"vlmdeploy: {exc}", file=sys.stderr)
            return 1
    return 0

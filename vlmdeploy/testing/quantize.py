"""Quantised copies of a full-precision checkpoint, laid out as published quantised checkpoints are,
so the loaders are tested on the files they will meet.

    quantize_checkpoint(src_dir, out_dir, method='fp8' | 'awq', group_size=128,
                        device='cpu') -> Path

Each projection of the language model (``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
of every decoder layer, under any of the three layouts' names) is replaced:

* ``fp8``: ``<name>.weight`` in ``float8_e4m3fn`` and ``<name>.weight_scale_inv`` (float32, one
  scale per 128 × 128 block), as Qwen3-FP8 ships; everything else keeps its dtype.
* ``awq``: ``<name>.qweight``, ``<name>.qzeros``, ``<name>.scales`` in AutoAWQ's GEMM layout,
  quantised by rounding to nearest per group (:func:`vlmdeploy.quant.awq.quantize_rtn`; AWQ's
  activation-aware scaling needs calibration data and is not attempted), everything else in
  float16, as AutoAWQ saves it.

The vision tower, the projector, embeddings, norms and the lm_head are copied. ``config.json``
gains the ``quantization_config`` such a checkpoint carries; the other files are copied; the
shards keep their names and the index its map.

CLI: python -m vlmdeploy.testing.quantize SRC OUT --method fp8|awq [--group-size 128]
     [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmdeploy.kernels.quant_reference import fp8_quantize_blocks
from vlmdeploy.models.loader import safetensors_files
from vlmdeploy.quant.awq import quantize_rtn

METHODS = ("fp8", "awq")
# a decoder layer's projection, not a vision layer's (those are "layer.N.attention" or "attn.qkv")
_PROJECTION = re.compile(
    r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


def quantization_config(method: str, group_size: int = 128) -> dict:
    """The ``quantization_config`` block of ``config.json`` (Qwen3-FP8's; AutoAWQ's)."""
    if method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def quantize_tensors(tensors: dict[str, torch.Tensor], method: str, group_size: int = 128,
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """One file's tensors → the quantised checkpoint's tensors (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _PROJECTION.search(name):
            out[name] = t.to(torch.float16) if method == "awq" and t.is_floating_point() else t
            continue
        base = name.removesuffix(".weight")
        w = t.to(device)
        if method == "fp8":
            q, s = fp8_quantize_blocks(w)
            out[f"{base}.weight"], out[f"{base}.weight_scale_inv"] = q.cpu(), s.cpu()
        else:
            qweight, qzeros, scales = quantize_rtn(w, group_size)
            out.update({f"{base}.qweight": qweight.cpu(), f"{base}.qzeros": qzeros.cpu(),
                        f"{base}.scales": scales.cpu()})
    return out


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, method: str = "fp8",
                        group_size: int = 128, device: str = "cpu") -> Path:
    """Write the ``method``-quantised copy of checkpoint ``src_dir`` to ``out_dir``."""
    src, out = Path(src_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is quantised already ({config['quantization_config']})")
    qc = quantization_config(method, group_size)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config["quantization_config"] = qc
    if method == "awq":
        config["torch_dtype"] = "float16"
        for block in ("llm_config", "text_config", "vision_config"):
            if isinstance(config.get(block), dict) and "torch_dtype" in config[block]:
                config[block]["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index: dict[str, str] = {}
    for file in safetensors_files(src):
        with safe_open(str(file), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
            meta = sf.metadata() or {}
        quantized = quantize_tensors(tensors, method, group_size, device)
        save_file(quantized, str(out / file.name), metadata={**meta, "quantization": method})
        index.update({k: file.name for k in quantized})
    if (src / "model.safetensors.index.json").is_file():
        size = sum((out / f).stat().st_size for f in set(index.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": index}, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vlmdeploy.testing.quantize",
                                 description="Write an FP8 or AWQ copy of a checkpoint.")
    ap.add_argument("src", help="a full-precision checkpoint directory")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--group-size", type=int, default=128, help="AWQ: inputs per group")
    ap.add_argument("--device", default="cpu", help="where to quantise: 'cpu' or 'cuda'")
    args = ap.parse_args(argv)
    path = quantize_checkpoint(args.src, args.out, args.method, args.group_size, args.device)
    print(json.dumps({"out": str(path), "method": args.method}))


if __name__ == "__main__":
    main()

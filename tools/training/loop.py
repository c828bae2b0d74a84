"""The optimiser, the learning-rate schedule and the training loop.

Contract: ``train(args, model, tokenizer)`` trains ``model`` in place on the stream that starts at
``args.data_offset`` and returns ``{"steps", "seconds", "log"}`` for ``train_log.json``. The
number of steps is ``args.steps``, or with ``args.steps == 0`` it is fixed from
``args.time_budget`` after timing ``args.calibrate`` steps. The calibration runs inside the
warmup, whose learning rates do not depend on the total, so the schedule equals that of
``--steps N`` with the N printed, and a rerun with that ``--steps N`` trains the same way.
``--stop-after`` and the ``--max-seconds`` guard end a run early without changing its schedule:
the learning rate of each step stays that of the full ``--steps`` run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from .batches import TrainSet, collate
from .objectives import AuxHeads, SummaryHead, loss_of


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 5% of it at
    ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms, biases, layer scales, position/cls embeddings (all vectors).
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.shape[0] > 1]
    other = [p for p in model.parameters() if not (p.dim() >= 2 and p.shape[0] > 1)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def train(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    device = torch.device(args.device)
    amp = device.type == "cuda"
    pixel_dtype = torch.bfloat16 if amp else torch.float32
    max_steps = args.steps or 10**6
    data = TrainSet(tokenizer, max_steps * args.batch_size, args.data_offset, args.plain_share,
                    args.questions_per_scene, args.local_targets == "all-tokens",
                    args.absent_share)
    img_end = tokenizer.convert_tokens_to_ids("</img>")
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        collate_fn=lambda s: collate(s, tokenizer.pad_token_id, img_end), pin_memory=amp,
        persistent_workers=args.workers > 0, prefetch_factor=8 if args.workers else None)
    all_tokens = args.local_targets == "all-tokens"
    heads = AuxHeads(model.config.text_config.hidden_size, args.aux == "scene",
                     all_tokens).to(device)
    aux_weight = 0.0 if args.aux == "none" else args.aux_weight
    hidden = model.config.text_config.hidden_size
    summary = SummaryHead(hidden, args.summary_layer).to(device) if args.summary_layer else None
    opt = make_optimizer(torch.nn.ModuleList([model, heads, summary or torch.nn.Module()]),
                         args.lr)
    total, log, t0, t_cal = args.steps, [], time.time(), 0.0
    model.train()
    for step, batch in enumerate(loader):
        if total and step >= total:
            break
        if args.stop_after and step >= args.stop_after:  # replays a run the guard below cut
            total = step
            break
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"wall-clock guard: stopped at step {step} of {total}", flush=True)
            total = step
            break
        # Calibration times steps 10 to 10 + calibrate: the first steps pay one-off costs
        # (worker start-up, allocations) that would make the estimate too slow.
        if not total and step == 10:
            t_cal = time.time()
        if not total and step == 10 + args.calibrate:
            per_step = (time.time() - t_cal) / args.calibrate
            total = max(step + 1, int((args.time_budget - (time.time() - t0)) / per_step) + step)
            print(f"calibrated: {per_step * 1e3:.1f} ms/step -> {total} steps", flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or args.warmup * 10, args.lr, args.warmup)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            lm, aux, scene = loss_of(model, heads, batch, pixel_dtype, aux_weight,
                                     summary=summary)
        loss = lm + aux_weight * aux + args.summary_weight * scene
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0:
            entry = {"step": step, "loss": round(lm.item(), 4), "aux": round(aux.item(), 4),
                     "summary": round(scene.item(), 4),
                     "object_acc": [round(a, 3) for a in getattr(heads, "object_accuracy", [])],
                     "s": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return {"steps": total, "seconds": round(time.time() - t0, 1), "log": log}

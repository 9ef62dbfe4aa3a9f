"""What bench_model_step.py and bench_caption_generate.py share: the model / device / precision options, their
checks, and the two helpers that make GPU timings honest (the same autocast on both sides, synchronised clocks).
Not a benchmark itself (`make bench` runs benchmarks/bench_*.py)."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

PRECISIONS = ("fp32", "bf16")
MODELS = ("tiny", "base")


def add_options(parser: argparse.ArgumentParser, default_image_sizes: str) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-base", action="store_true", help="the same as --models tiny")
    parser.add_argument("--models", default="tiny,base", help="comma list of tiny,base (default both)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: ours and transformers under torch.autocast(bfloat16) (CPU autocast on cpu)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"pixels for every model run (default: {default_image_sizes})")


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], Any]:
    """(models to run, torch.device) from the options; a bad value is a usage error, not a traceback."""
    import torch

    models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not models or set(models) - set(MODELS):
        parser.error(f"--models: choose from {','.join(MODELS)}, got {args.models!r}")
    if args.skip_base:
        models = [name for name in models if name != "base"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    return models, device


def autocast(device: Any, precision: str) -> Any:
    """bf16: torch.autocast on the device (CPU autocast too); fp32: no autocast."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":  # kernels run asynchronously: time what the GPU did, not what Python queued
        torch.cuda.synchronize(device)

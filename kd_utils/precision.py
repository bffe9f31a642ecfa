"""Numeric precision of training, teacher-cache generation and evaluation: what ``auto`` means on this machine.

A protocol's ``precision`` is ``auto``, ``fp32``, ``bf16`` or ``fp16``; ``resolve`` turns it into what
runs here (``fp32``, ``bf16`` or ``fp16``), and that resolved value is what runs record.

- ``auto``: bf16 autocast on fp32 weights on a GPU with bf16 and on a CPU with native bf16 instructions
  (``avx512_bf16`` / ``amx_bf16`` on x86, ``bf16`` on Arm, and torch's oneDNN bf16 path); fp32 elsewhere.
  ``KD_AUTO_PRECISION`` (``fp32`` or ``bf16``) pins what ``auto`` means on a CPU: a study pins it once
  (``kd_utils.study``) so a resumed study never mixes precisions, and the tests pin fp32.
- ``bf16``: bf16 autocast on fp32 weights (a GPU without bf16 is refused; a CPU without native bf16 emulates it,
  slowly).
- ``fp16``: the authors' fp16 (frozen weights in fp16, autocast) on a GPU; fp32 on a CPU, which has no fast fp16.
- ``fp32``: fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import os
import platform
from functools import lru_cache

import torch

from kd_utils.constants import PRECISIONS

RESOLVED = ("fp32", "bf16", "fp16")
AUTO_ENV = "KD_AUTO_PRECISION"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 / Arm
                    return set(value.split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (not emulated through fp32).

    torch's oneDNN check alone is not enough (it accepts any AVX-512 CPU and emulates bf16 there), so
    the CPU's own flags must list a bf16 dot-product instruction too. Apple silicon: oneDNN's check only.
    """
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False
    if platform.system() == "Darwin":
        return platform.machine() == "arm64"
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def resolve(precision: str, device=None) -> str:
    """What ``precision`` (``PRECISIONS``) runs as on ``device`` (default: CUDA when present, else CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = _device_type(device)
    if precision == "fp32" or kind not in ("cuda", "cpu"):
        return "fp32"
    if kind == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if has_bf16 else "fp32"
        if precision == "bf16" and not has_bf16:
            raise ValueError("precision bf16, but this GPU has no bf16; switch it with precision=fp32 or "
                             "precision=fp16, e.g. improved[precision=fp32]")
        return precision
    if precision == "fp16":
        return "fp32"
    if precision == "auto":
        pinned = os.environ.get(AUTO_ENV, "").strip()
        if pinned:
            if pinned not in ("fp32", "bf16"):
                raise ValueError(f"{AUTO_ENV} must be fp32 or bf16, got {pinned!r}")
            return pinned
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def autocast(resolved: str, device=None):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=_DTYPES[resolved])


@contextlib.contextmanager
def inference_autocast(model: torch.nn.Module, resolved: str, device=None):
    """No-grad autocast for inference that casts each frozen fp32 weight once per context, not once per call.

    torch's autocast keeps its lower-precision copy only of leaf tensors that require grad, so the frozen weights
    of a peft base or a merged teacher were cast again at every decoding step (half a small student's
    generation time on a CPU). Marking them for the context changes no number (the same casts, kept) and builds
    no graph (no_grad); the flags are restored on exit. The kept copies cost 2 bytes per weight meanwhile.
    """
    frozen = [] if resolved == "fp32" else [p for p in model.parameters()
                                           if not p.requires_grad and p.dtype == torch.float32]
    try:
        for param in frozen:
            param.requires_grad_(True)
        with torch.no_grad(), autocast(resolved, device):
            yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def describe(resolved: str, device=None) -> str:
    """A run record's words for a resolved precision."""
    text = {"fp32": "fp32", "bf16": "bf16 autocast, fp32 weights", "fp16": "fp16 autocast, fp16 frozen weights"}
    return text[resolved] + (" (CPU)" if _device_type(device) == "cpu" else "")

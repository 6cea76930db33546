"""`trainer.mixed_precision=auto`: the precision that is fastest on this machine, chosen by measurement.

Accelerate takes a precision but does not choose one, and on a CPU the right choice is not knowable
from the device type: bf16 matmuls ran 70x SLOWER than fp32 on a 2-core EPYC with AVX2 (no native
bf16; oneDNN emulates it) and faster than fp32 on a CPU with AVX512-BF16/AMX. So:

- CUDA: bf16 where the GPU supports it, else fp16 (with Accelerate's GradScaler).
- CPU, x86 without AVX-512 (capability AVX2 or less): fp32. Conclusive without measuring: no bf16
  instructions exist below AVX512-BF16.
- any other CPU: a short fp32-vs-bf16 matmul probe (about a second), cached per machine in
  $DIST_GACC_CACHE_DIR (default ~/.cache/dist_gacc); bf16 only if it is at least BF16_MARGIN faster.

An explicit `bf16` on a CPU where the probe shows it slower is honoured with a warning giving both figures.
The choice and its reason go to the log and to metrics.json (`precision`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import machine

# A MiniLM-sized feed-forward product (512 tokens x hidden 384 x intermediate 1536): the shape the
# models we train spend their time in. Emulated bf16 takes ~0.5 s for one such product.
PROBE_SHAPE = (512, 384, 1536)
BF16_MARGIN = 1.10      # bf16 must beat fp32 by 10 %: below that the probe's noise could decide
PROBE_VERSION = 1       # bump when PROBE_SHAPE or the method changes: older cache entries are ignored


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str               # auto | no | bf16 | fp16, as configured
    resolved: str                # no | bf16 | fp16: what Accelerate is given
    reason: str
    probe: dict | None = None    # {"fp32_gflops", "bf16_gflops", "shape", "cached"} when measured
    warning: str | None = None   # explicit bf16 on a CPU where it measured slower

    def record(self) -> dict:
        return asdict(self)


# --- the probe -------------------------------------------------------------------------------------------

def probe(timer: Callable[[], float] = time.perf_counter, matmul: Callable = torch.matmul,
          min_seconds: float = 0.1) -> dict:
    """fp32 and bf16 GFLOP/s of PROBE_SHAPE on the CPU (each: one warm-up, then >= min_seconds of products)."""
    measure = lambda dtype: machine.matmul_gflops(dtype, PROBE_SHAPE, min_seconds=min_seconds,  # noqa: E731
                                                  max_reps=50, timer=timer, matmul=matmul)
    return {"fp32_gflops": round(measure(torch.float32), 2), "bf16_gflops": round(measure(torch.bfloat16), 2),
            "shape": list(PROBE_SHAPE)}


def bf16_faster(result: dict, margin: float = BF16_MARGIN) -> bool:
    return result["bf16_gflops"] >= margin * result["fp32_gflops"]


def machine_key() -> str:
    """What the probe's answer depends on: CPU, its capability, threads, torch (its kernels)."""
    return (f"v{PROBE_VERSION}|{machine.cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|"
            f"native_bf16={machine.native_bf16()}|threads={torch.get_num_threads()}|torch {torch.__version__}")


def cache_file() -> Path:
    root = os.environ.get("DIST_GACC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dist_gacc")
    return Path(root) / "precision_probe.json"


def cached_probe(run_probe: Callable[[], dict] = probe, path: Path | None = None) -> dict:
    """The probe's result for this machine: from the cache file, else measured and stored (atomically)."""
    path, key = path or cache_file(), machine_key()
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if key in entries:
        return {**entries[key], "cached": True}
    result = run_probe()
    entries[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return {**result, "cached": False}


# --- the decision ----------------------------------------------------------------------------------------

def cpu_without_bf16(capability: str, arch: str, native: bool) -> bool:
    """x86 below AVX-512 has no bf16 instructions: conclusive without a probe."""
    return not native and arch.lower() in ("x86_64", "amd64", "i686", "x86") and capability in ("AVX2", "NO AVX",
                                                                                                  "DEFAULT")


def resolve(requested: str, device_type: str, *, cuda_bf16: Callable[[], bool] | None = None,
            capability: str | None = None, arch: str | None = None, native: bool | None = None,
            measure: Callable[[], dict] = cached_probe) -> PrecisionChoice:
    """The precision to train in. Keyword arguments stand in for the machine (tests)."""
    if requested in ("no", "fp16"):
        return PrecisionChoice(requested, requested, "as configured")
    if device_type == "cuda":
        if requested == "bf16":
            return PrecisionChoice(requested, "bf16", "as configured")
        supported = (cuda_bf16 or torch.cuda.is_bf16_supported)()
        return PrecisionChoice(requested, "bf16" if supported else "fp16",
                               "CUDA GPU with bf16 support" if supported
                               else "CUDA GPU without bf16 support: fp16 with a GradScaler")
    if device_type != "cpu":
        return PrecisionChoice(requested, "no" if requested == "auto" else requested,
                               f"{device_type}: no measurement for this device type; fp32 by default"
                               if requested == "auto" else "as configured")
    return _resolve_cpu(requested, capability or torch.backends.cpu.get_cpu_capability(),
                        arch or platform.machine(), machine.native_bf16() if native is None else native, measure)


def _resolve_cpu(requested: str, capability: str, arch: str, native: bool, measure) -> PrecisionChoice:
    if requested == "auto" and cpu_without_bf16(capability, arch, native):
        return PrecisionChoice("auto", "no", f"CPU capability {capability} without native bf16: bf16 is emulated "
                               "there (measured 70x slower than fp32 on such a CPU), so fp32")
    result = measure()
    figures = (f"bf16 {result['bf16_gflops']:g} vs fp32 {result['fp32_gflops']:g} GFLOP/s "
               f"({'x'.join(map(str, result['shape']))} matmul{', cached' if result.get('cached') else ''})")
    faster = bf16_faster(result)
    if requested == "bf16":
        warning = None if faster else (
            f"trainer.mixed_precision=bf16 on a CPU where bf16 measured slower than fp32: {figures}. "
            "Training will be slower by about that ratio; trainer.mixed_precision=auto (or no) would use fp32.")
        return PrecisionChoice("bf16", "bf16", f"as configured; {figures}", result, warning)
    return PrecisionChoice("auto", "bf16" if faster else "no",
                           (f"CPU measured bf16 at least {BF16_MARGIN:g}x faster: " if faster else
                            f"CPU measured bf16 not {BF16_MARGIN:g}x faster than fp32: ") + figures, result)

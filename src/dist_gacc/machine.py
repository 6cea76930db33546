"""What machine a figure was measured on: CPU model, torch's CPU capability, threads, measured fp32 ceiling, GPU.

Every benchmark table and every figure in the docs carries this record (issue 15: the same benchmark gave
63 GFLOP/s on one 2-core EPYC and 190 on another, and bf16 is 70x slower than fp32 on a CPU without native
bf16). No library reports it in one place, hence this module.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (/proc/cpuinfo, lscpu's source), else platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # /proc/cpuinfo's names for bf16 and AMX instructions


def bf16_flags() -> list[str]:
    """The CPU's bf16/AMX instruction flags (Linux /proc/cpuinfo); elsewhere torch's own probes."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in BF16_FLAGS if flag in present]
    except OSError:
        pass
    return ["native_bf16"] if native_bf16() else []


def native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); torch exposes these private probes."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = (2048, 1024, 1024), *,
                  min_seconds: float = 0.2, max_reps: int = 20, timer: Callable[[], float] = time.perf_counter,
                  matmul: Callable = torch.matmul) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul in `dtype` on the CPU: one warm-up product of the same shape,
    then products until `min_seconds` have passed (at least one, at most `max_reps`)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    matmul(a, b)  # warm-up: thread pool, oneDNN kernel selection
    reps, start = 0, timer()
    elapsed = 0.0
    while reps < max_reps and (reps == 0 or elapsed < min_seconds):
        matmul(a, b)
        reps += 1
        elapsed = timer() - start
    return 2 * m * k * n * reps / max(elapsed, 1e-12) / 1e9


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def describe(measure: bool = True) -> dict:
    """The record every published figure carries. `measure` times the fp32 matmul ceiling (~0.3 s)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "bf16_flags": bf16_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fp32_gflops": round(matmul_gflops(torch.float32), 1) if measure else None,
        "gpu": gpu_name(),
        "torch": torch.__version__,
    }


def label(info: dict) -> str:
    """One line: 'AMD EPYC | AVX2 | 2 threads | fp32 62.8 GFLOP/s (2048x1024x1024) | no GPU | torch 2.13.0'."""
    ceiling = f"fp32 {info['fp32_gflops']} GFLOP/s (2048x1024x1024 matmul)" if info.get("fp32_gflops") else \
        "fp32 ceiling not measured"
    bf16 = (f"native bf16 ({', '.join(info.get('bf16_flags') or [])})".replace(" ()", "")
            if info.get("native_bf16") else "no native bf16")
    return (f"{info['cpu_model']} | capability {info['cpu_capability']}, {bf16} | {info['torch_threads']} threads "
            f"of {info['cpu_count']} cores | {ceiling} | {info.get('gpu') or 'no GPU'} | torch {info['torch']}")

"""`trainer.mixed_precision=auto`: the precision that is fastest on this machine, chosen by measurement.

Accelerate takes a precision but does not choose one, and on a CPU the right choice is not knowable
from the device type: bf16 matmuls ran 70x SLOWER than fp32 on a 2-core EPYC with AVX2 (no native
bf16; oneDNN emulates it) and faster than fp32 on a CPU with AVX512-BF16/AMX. So:

- CUDA: bf16 where the GPU supports it, else fp16 (with Accelerate's GradScaler).
- CPU, x86 without AVX-512 (capability AVX2 or less): fp32. Conclusive without measuring: no bf16
  instructions exist below AVX512-BF16.
- any other CPU: a probe of what training does -- forward and backward of a MiniLM-shaped transformer
  layer in fp32 and under bf16 autocast, PROBE_REPEATS interleaved steps of each, the fastest of each
  side decides (about a second; probe() says why not the median) -- cached in $DIST_GACC_CACHE_DIR (default ~/.cache/dist_gacc) under what decides the answer:
  torch's CPU capability, the CPU's bf16/AMX flags, the thread count and torch's version (not the model
  string, which is generic on VMs). bf16 only if at least BF16_MARGIN faster.
- a resume under `auto` keeps the precision its checkpoint trained in (build.choose_precision): another
  thread count may probe differently, and that must not refuse or change a run.

Why not a bare matmul: on an AVX512-BF16/AMX Xeon eight matmul probes gave bf16/fp32 ratios from 1.39x to
29x (0.1 s each, once); a training step also runs softmax, GELU, layer norm and their backward, which
autocast keeps partly in fp32.

An explicit `bf16` on a CPU where the probe shows it slower is honoured with a warning giving both figures.
The choice and its reason go to the log and to metrics.json (`precision`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import machine

# MiniLM's layer (hidden 384, 12 heads, feed-forward 1536) on a micro-batch of 8 x 64 tokens (Rotten
# Tomatoes reviews are ~30-60 tokens after dynamic padding).
PROBE_LAYER = {"hidden": 384, "heads": 12, "intermediate": 1536, "batch": 8, "tokens": 64}
PROBE_REPEATS = 11      # interleaved fp32/bf16 steps; the fastest of each side decides
NOISY = 1.5             # median fp32 step over this many fastest: measured on a busy machine, not cached
BF16_MARGIN = 1.10      # bf16 must beat fp32 by 10 %: below that the probe's noise could decide
CONCLUSIVE = 3.0        # bf16 slower than this many fp32 steps in the first pair: emulated, stop measuring
PROBE_VERSION = 2       # bump when the probe's workload or method changes: older cache entries are ignored


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str               # auto | no | bf16 | fp16, as configured
    resolved: str                # no | bf16 | fp16: what Accelerate is given
    reason: str
    probe: dict | None = None    # {"fp32_ms", "bf16_ms", "speedup", "repeats", "key", "cached"} when measured
    warning: str | None = None   # explicit bf16 on a CPU where it measured slower

    def record(self) -> dict:
        return asdict(self)


# --- the probe -------------------------------------------------------------------------------------------

def layer_step(dtype: torch.dtype) -> Callable[[], None]:
    """One training step's forward and backward through a MiniLM-shaped layer, fp32 or under bf16 autocast
    (parameters and gradients stay fp32, as in training)."""
    p = PROBE_LAYER
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(p["hidden"], p["heads"], p["intermediate"], dropout=0.0,
                                             activation="gelu", batch_first=True)
    inputs = torch.randn(p["batch"], p["tokens"], p["hidden"], generator=generator)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = layer(inputs).float().pow(2).mean()
        loss.backward()
        layer.zero_grad(set_to_none=True)
    return step


def probe(step_for: Callable[[torch.dtype], Callable[[], None]] = layer_step,
          timer: Callable[[], float] = time.perf_counter, repeats: int = PROBE_REPEATS) -> dict:
    """Milliseconds per step in fp32 and bf16 and bf16's speed-up: one warm-up each (threads, oneDNN kernel
    choice), then `repeats` interleaved fp32/bf16 steps. The speed-up is the ratio of the FASTEST step of
    each side: other load only adds time. Measured on a Xeon with AMX while another job ran: per-pair median
    ratios 0.88 / 1.30 / 1.39 in three probes, fastest-step ratios 1.55 / 1.40 / 1.44 (quiet, 1 thread:
    1.41-1.46). The medians are reported too; `quiet` is False where the median fp32 step took over
    NOISY times the fastest (the machine was busy), and such a result is not cached.
    A first bf16 step CONCLUSIVE times slower than fp32 ends the measurement: bf16 is emulated there."""
    steps = {"fp32": step_for(torch.float32), "bf16": step_for(torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = timer()
            step()
            times[name].append(timer() - start)
        if times["bf16"][0] > CONCLUSIVE * times["fp32"][0]:
            break
    fastest = {name: max(min(values), 1e-12) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"fp32_ms": round(fastest["fp32"] * 1e3, 3), "bf16_ms": round(fastest["bf16"] * 1e3, 3),
            "speedup": round(fastest["fp32"] / fastest["bf16"], 3),
            "fp32_median_ms": round(median["fp32"] * 1e3, 3), "bf16_median_ms": round(median["bf16"] * 1e3, 3),
            "repeats": len(times["fp32"]), "quiet": median["fp32"] <= NOISY * fastest["fp32"],
            "workload": "forward+backward of a transformer layer " +
            "x".join(str(PROBE_LAYER[k]) for k in ("batch", "tokens", "hidden", "intermediate"))}


def bf16_faster(result: dict, margin: float = BF16_MARGIN) -> bool:
    return result["speedup"] >= margin


def machine_key() -> str:
    """What the probe's answer depends on: torch's CPU capability, the CPU's bf16/AMX instructions, threads,
    torch (its kernels). Not the CPU model string: VMs report a generic one ("Intel(R) Xeon(R) Processor")."""
    return (f"v{PROBE_VERSION}|{torch.backends.cpu.get_cpu_capability()}|{','.join(machine.bf16_flags()) or 'no bf16'}"
            f"|threads={torch.get_num_threads()}|torch {torch.__version__}")


def cache_file() -> Path:
    root = os.environ.get("DIST_GACC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dist_gacc")
    return Path(root) / "precision_probe.json"


def read_cache(path: Path | None = None) -> dict:
    try:
        return json.loads((path or cache_file()).read_text())
    except (OSError, ValueError):
        return {}


def cached_probe(run_probe: Callable[[], dict] = probe, path: Path | None = None) -> dict:
    """The probe's result for this machine: from the cache file, else measured and stored (atomically)."""
    path, key = path or cache_file(), machine_key()
    entries = read_cache(path)
    if key in entries:
        return {**entries[key], "key": key, "cached": True}
    result = run_probe()
    if not result.get("quiet", True):
        return {**result, "key": key, "cached": False}  # a busy machine: measure again next time
    entries[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return {**result, "key": key, "cached": False}


def figures(result: dict) -> str:
    """'bf16 17.6 vs fp32 22.8 ms per layer step (1.3x; fastest of 11, cached)'."""
    return (f"bf16 {result['bf16_ms']:g} vs fp32 {result['fp32_ms']:g} ms per layer step ({result['speedup']:g}x; "
            f"fastest of {result['repeats']}{'' if result.get('quiet', True) else ', busy machine'}"
            f"{', cached' if result.get('cached') else ''})")


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


def kept_on_resume(saved: str) -> PrecisionChoice:
    """`auto` when resuming: the checkpoint's precision, whatever this process would measure now."""
    return PrecisionChoice("auto", saved, f"resume: the checkpoint trained in {saved}, and auto keeps a run's "
                           "precision (another thread count or machine may measure differently)")


def _resolve_cpu(requested: str, capability: str, arch: str, native: bool, measure) -> PrecisionChoice:
    if requested == "auto" and cpu_without_bf16(capability, arch, native):
        return PrecisionChoice("auto", "no", f"CPU capability {capability} without native bf16: bf16 is emulated "
                               "there (measured 70x slower than fp32 on such a CPU), so fp32")
    result = measure()
    faster, measured = bf16_faster(result), figures(result)
    if requested == "bf16":
        warning = None if faster else (
            f"trainer.mixed_precision=bf16 on a CPU where bf16 measured slower than fp32: {measured}. "
            "Training will be slower by about that ratio; trainer.mixed_precision=auto (or no) would use fp32.")
        return PrecisionChoice("bf16", "bf16", f"as configured; {measured}", result, warning)
    return PrecisionChoice("auto", "bf16" if faster else "no",
                           (f"CPU measured bf16 at least {BF16_MARGIN:g}x faster: " if faster else
                            f"CPU measured bf16 not {BF16_MARGIN:g}x faster than fp32: ") + measured, result)

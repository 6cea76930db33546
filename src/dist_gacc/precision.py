"""`trainer.mixed_precision=auto`: the precision that is fastest on this machine, chosen by measurement.

Accelerate takes a precision but does not choose one, and on a CPU the right choice is not knowable
from the device type: bf16 matmuls ran 70x SLOWER than fp32 on a 2-core EPYC with AVX2 (no native
bf16; oneDNN emulates it) and faster than fp32 on a CPU with AVX512-BF16/AMX. So:

- CUDA: bf16 where the GPU supports it, else fp16 (with Accelerate's GradScaler).
- CPU, x86 without AVX-512 (capability AVX2 or less): fp32. Conclusive without measuring: no bf16
  instructions exist below AVX512-BF16.
- any other CPU: a probe of what training does -- forward and backward of a MiniLM-shaped transformer
  layer in fp32 and under bf16 autocast, PROBE_REPEATS interleaved pairs of steps, the fastest step of each
  side decides (about a second; summarize() says why not the median). bf16 only if at least BF16_MARGIN
  faster. One pair ends the probe only where the CPU has no bf16 instruction flag and bf16 was CONCLUSIVE
  times slower (emulated); elsewhere one slow step never decides.
- the verdict is cached in $DIST_GACC_CACHE_DIR (default ~/.cache/dist_gacc) under what decides it: torch's
  CPU capability, the CPU's bf16/AMX flags, the thread count and torch's version (not the model string,
  which is generic on VMs). Only a verdict of at least MIN_CACHED_PAIRS pairs with a spread up to NOISY is
  cached (both stored with it); a record without them, or whose verdict contradicts the CPU's flags and
  was not confirmed by a second probe, is measured again. `python scripts/precision_cache.py --show |
  --clear | --measure` shows, clears or renews it.
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
PROBE_REPEATS = 11      # interleaved fp32/bf16 pairs; the fastest step of each side decides
# A verdict is cached only from at least this many pairs: the fastest of 5 steps per side is decided by other
# load only if it slowed all 5 of that side, and 5 steps give a median to judge the spread by.
MIN_CACHED_PAIRS = 5
# The spread: the median step over the fastest, the larger of the two sides. Over NOISY the machine was busy
# while the probe ran: its result is used for this run but not cached.
NOISY = 1.5
BF16_MARGIN = 1.10      # bf16 must beat fp32 by 10 %: below that the probe's noise could decide
# CPUs without a native bf16 flag only: a first bf16 step this many fp32 steps slower is emulation, and more
# pairs would cost about a second each. With a flag, one pair never decides: one step slowed by other load
# would then choose the precision.
CONCLUSIVE = 3.0
PROBE_VERSION = 3       # bump when the probe's workload or method changes: older cache entries are ignored


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str               # auto | no | bf16 | fp16, as configured
    resolved: str                # no | bf16 | fp16: what Accelerate is given
    reason: str
    probe: dict | None = None    # summarize()'s figures with "key", "cached" (cached_probe) when measured
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
          timer: Callable[[], float] = time.perf_counter, repeats: int = PROBE_REPEATS,
          native: bool | None = None) -> dict:
    """Time one warm-up step of each precision (threads, oneDNN kernel choice), then `repeats` interleaved
    fp32/bf16 pairs, and summarize them. `native`: the CPU has a bf16 instruction flag (default: this CPU's);
    without one, a first pair that shows emulated bf16 ends the measurement (stops_early)."""
    native = bool(machine.bf16_flags()) if native is None else native
    steps = {"fp32": step_for(torch.float32), "bf16": step_for(torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = timer()
            step()
            times[name].append(timer() - start)
        if stops_early(times["fp32"], times["bf16"], native):
            break
    return summarize(times["fp32"], times["bf16"])


def stops_early(fp32_s: list[float], bf16_s: list[float], native: bool) -> bool:
    """After the first pair, on a CPU without a native bf16 flag only: bf16 over CONCLUSIVE times slower is
    emulated there, and every further pair costs that slow step again."""
    return not native and len(bf16_s) == 1 and bf16_s[0] > CONCLUSIVE * fp32_s[0]


def summarize(fp32_s: list[float], bf16_s: list[float]) -> dict:
    """The probe's figures from its step times in seconds, one of each side per pair. The speed-up is the
    ratio of the FASTEST step of each side: other load only adds time, so the fastest step is the least
    disturbed one, where a median moves with the load. `spread` is the larger of the two sides' median step
    over its fastest: over NOISY the machine was busy, and `quiet` is False."""
    fastest = {"fp32": max(min(fp32_s), 1e-12), "bf16": max(min(bf16_s), 1e-12)}
    median = {"fp32": statistics.median(fp32_s), "bf16": statistics.median(bf16_s)}
    spread = max(median[side] / fastest[side] for side in fastest)
    return {"fp32_ms": round(fastest["fp32"] * 1e3, 3), "bf16_ms": round(fastest["bf16"] * 1e3, 3),
            "speedup": round(fastest["fp32"] / fastest["bf16"], 3),
            "fp32_median_ms": round(median["fp32"] * 1e3, 3), "bf16_median_ms": round(median["bf16"] * 1e3, 3),
            "pairs": len(fp32_s), "spread": round(spread, 3), "quiet": spread <= NOISY,
            "workload": "forward+backward of a transformer layer " +
            "x".join(str(PROBE_LAYER[k]) for k in ("batch", "tokens", "hidden", "intermediate"))}


def bf16_faster(result: dict, margin: float = BF16_MARGIN) -> bool:
    return result["speedup"] >= margin


def verdict(result: dict) -> str:
    return "bf16" if bf16_faster(result) else "fp32"


# --- the cache -------------------------------------------------------------------------------------------

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
        entries = json.loads((path or cache_file()).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(entries: dict, path: Path) -> None:
    """Atomically (a temporary file renamed); a read-only home only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def not_cacheable(result: dict) -> str | None:
    """Why a result is no verdict to keep (None: it is one): too few pairs, a busy machine, or a record
    without its pair count and spread (an older format, which kept one-pair guesses)."""
    pairs, spread = result.get("pairs"), result.get("spread")
    if not isinstance(pairs, int) or not isinstance(spread, (int, float)):
        return "no pair count and spread recorded (an older format)"
    if pairs < MIN_CACHED_PAIRS:
        return f"{pairs} pair{'s' if pairs != 1 else ''}, fewer than {MIN_CACHED_PAIRS}"
    if spread > NOISY:
        return f"spread {spread:g} over {NOISY:g}: the machine was busy"
    return None


def contradicts_flags(result: dict, native: bool) -> bool:
    """bf16 not faster on a CPU with a bf16 instruction flag, or faster on one without any."""
    return bf16_faster(result) != native


def distrust(entry: dict, native: bool) -> str | None:
    """Why a cached record is measured again (None: it is used). A verdict against the CPU's flags is kept
    only once a second probe confirmed it (`confirmed`): one odd probe cannot fix the precision for good."""
    why = not_cacheable(entry)
    if why is None and contradicts_flags(entry, native) and not entry.get("confirmed"):
        why = (f"its verdict {verdict(entry)} contradicts the CPU's flags ("
               f"{'a bf16 instruction flag' if native else 'no bf16 instruction flag'}) and no second probe "
               "confirmed it")
    return why


def cached_probe(run_probe: Callable[[], dict] = probe, path: Path | None = None, native: bool | None = None,
                 refresh: bool = False) -> dict:
    """The probe's result for this machine: the cached verdict if distrust() finds nothing against it, else
    measured now (`refresh`: always), and cached when not_cacheable() finds nothing against the new result.
    The result says `cached`, and why it was measured again (`remeasured`) or is not kept (`not_cached`)."""
    path, key = path or cache_file(), machine_key()
    native = bool(machine.bf16_flags()) if native is None else native
    entries = read_cache(path)
    entry = entries.get(key) if isinstance(entries.get(key), dict) else None
    why_again = None if entry is None or refresh else distrust(entry, native)
    if entry is not None and not refresh and why_again is None:
        return {**entry, "key": key, "cached": True}
    result = run_probe()
    why_not = not_cacheable(result)
    if why_not is None:
        confirmed = (contradicts_flags(result, native) and entry is not None and not_cacheable(entry) is None
                     and verdict(entry) == verdict(result))
        entries[key] = {**result, "confirmed": confirmed}
        write_cache(entries, path)
    return {**result, "key": key, "cached": False, **({"remeasured": why_again} if why_again else {}),
            **({"not_cached": why_not} if why_not else {})}


def figures(result: dict) -> str:
    """'bf16 17.6 vs fp32 22.8 ms per layer step (1.3x; fastest of 11 pairs, spread 1.04, cached)'; a result
    measured again or not kept says why ('; not cached: 1 pair, fewer than 5')."""
    pairs, spread = result.get("pairs"), result.get("spread")
    notes = [f"fastest of {pairs} pair{'s' if pairs != 1 else ''}" if pairs is not None
             else "pairs not recorded"]
    notes += [f"spread {spread:g}"] if spread is not None else []
    notes += ["cached"] if result.get("cached") else []
    why = "".join(f"; {label}: {result[key]}" for key, label in
                  (("remeasured", "measured again"), ("not_cached", "not cached")) if result.get(key))
    return (f"bf16 {result['bf16_ms']:g} vs fp32 {result['fp32_ms']:g} ms per layer step "
            f"({result['speedup']:g}x; {', '.join(notes)}{why})")


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
        slower = "slower than" if result["speedup"] < 1 else f"under {BF16_MARGIN:g}x faster than"
        warning = None if faster else (
            f"trainer.mixed_precision=bf16 on a CPU where bf16 measured {slower} fp32: {measured}. "
            "Training will be slower by about that ratio; trainer.mixed_precision=auto (or no) would use fp32.")
        return PrecisionChoice("bf16", "bf16", f"as configured; {measured}", result, warning)
    return PrecisionChoice("auto", "bf16" if faster else "no",
                           (f"CPU measured bf16 at least {BF16_MARGIN:g}x faster: " if faster else
                            f"CPU measured bf16 not {BF16_MARGIN:g}x faster than fp32: ") + measured, result)


# --- the command line ------------------------------------------------------------------------------------

def describe_entry(key: str, entry: dict, native: bool) -> str:
    """One line of --show: the key, the verdict and its figures, and whether a run with this key uses it."""
    if key != machine_key():
        use = "another machine, thread count or version"
    else:
        why = distrust(entry, native) if isinstance(entry, dict) else "not a record"
        use = "used by runs with this key" if why is None else f"measured again: {why}"
    if not isinstance(entry, dict) or "speedup" not in entry:
        return f"{key}: unreadable record ({use})"
    return f"{key}: {verdict(entry)} ({figures(entry)}) -- {use}"


def main(argv: list[str] | None = None) -> int:
    """scripts/precision_cache.py [--show] [--clear | --measure]: the probe's cache (--show by default)."""
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/precision_cache.py", description="The precision probe's "
                                     "cache (trainer.mixed_precision=auto): show, clear or renew it.")
    parser.add_argument("--show", action="store_true", help="print the cached verdicts and whether a run "
                        "uses each (the default; first, when combined)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--clear", action="store_true",
                        help="remove the cache file: every run measures again")
    action.add_argument("--measure", action="store_true", help="probe now with this process's threads "
                        "(OMP_NUM_THREADS) and cache the verdict if it qualifies")
    args = parser.parse_args(argv)
    path, native = cache_file(), bool(machine.bf16_flags())
    entries = read_cache(path)
    if args.show or not (args.clear or args.measure):
        print(f"{path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}; this process's key "
              f"{machine_key()} (CPU flags: {', '.join(machine.bf16_flags()) or 'no bf16 instruction flag'})")
        for key, entry in entries.items():
            print("  " + describe_entry(key, entry, native))
    if args.clear:
        if path.exists():
            path.unlink()
        print(f"cleared {path} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")
    elif args.measure:
        result = cached_probe(path=path, native=native, refresh=True)
        print(f"{result['key']}: {verdict(result)} ({figures(result)})")
    return 0

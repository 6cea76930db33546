"""The precision probe's cache (trainer.mixed_precision=auto on a CPU): show the cached verdicts and whether
runs use them, clear the cache (every run measures again), or measure now and cache the verdict if it
qualifies (dist_gacc.precision says when).

    python scripts/precision_cache.py --show
    python scripts/precision_cache.py --clear
    OMP_NUM_THREADS=2 python scripts/precision_cache.py --measure   # the thread count is part of the key
"""

from dist_gacc.precision import main

if __name__ == "__main__":
    raise SystemExit(main())

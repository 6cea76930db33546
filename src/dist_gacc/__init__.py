"""dist-gacc: fine-tune text classifiers with exact gradient accumulation on Accelerate + Hydra."""

from .resolvers import register as _register_resolvers

_register_resolvers()

from hydra_plugins.dist_gacc_launcher import accelerate_launcher  # noqa: E402,F401  (hydra/launcher=accelerate)


def __getattr__(name: str):
    # `main` loads torch, transformers and the rest of a run (seconds): only when asked for, so what needs none of
    # it stays light (`python -m dist_gacc.launch` in the SLURM scripts, a sweep's parent, config tests).
    if name == "main":
        from .run import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main"]

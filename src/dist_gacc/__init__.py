"""dist-gacc: fine-tune text classifiers with exact gradient accumulation on Accelerate + Hydra."""

from .resolvers import register as _register_resolvers

_register_resolvers()

from hydra_plugins.dist_gacc_launcher import accelerate_launcher  # noqa: E402,F401  (hydra/launcher=accelerate)
from .run import main, run  # noqa: E402

__all__ = ["main", "run"]

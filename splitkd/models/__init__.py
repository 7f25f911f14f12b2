"""Model zoo: staged models whose every cut point can be named.

``spec`` (the architecture, JSON-serialisable, no torch) is importable on an
inference-only edge; ``staged`` and ``zoo`` need torch.
"""

from splitkd.models.spec import ModelSpec

__all__ = ["ModelSpec"]

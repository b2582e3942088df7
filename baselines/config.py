"""The baselines' hyperparameters: one frozen dataclass, loaded from YAML like `EditConfig`."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import ConfigError


@dataclass(frozen=True)
class LinearEditConfig:
    """MEMIT / AlphaEdit settings. Defaults follow the authors' Llama-3-8B files (AlphaEdit repo,
    hparams/{MEMIT,AlphaEdit}/Llama3-8B.json) except where README's faithfulness section says."""

    layers: tuple[int, ...] = ()  # empty: the 5 layers ending at the NeuralDB layer (z is shared)
    batch_size: int = 100  # sequential batches (AlphaEdit's protocol)
    mom2_update_weight: float = 15000.0  # MEMIT's lambda on C = E[k k^T]
    mom2_tokens: int = 100_000  # WikiText-2 tokens behind C
    nullspace_threshold: float = 2e-2  # AlphaEdit: eigenvalues of C below it span the null space
    l2: float = 10.0  # AlphaEdit's ridge term

    def __post_init__(self) -> None:
        checks = {"batch_size": self.batch_size >= 1, "mom2_update_weight": self.mom2_update_weight >= 0,
                  "mom2_tokens": self.mom2_tokens >= 1, "nullspace_threshold": self.nullspace_threshold > 0,
                  "l2": self.l2 >= 0, "layers": all(i >= 0 for i in self.layers)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"LinearEditConfig: invalid value for {bad}: {[getattr(self, k) for k in bad]}")

    def layer_range(self, last: int) -> tuple[int, ...]:
        """The edited layers: `layers`, or the 5 consecutive layers ending at `last`."""
        return tuple(sorted(self.layers)) if self.layers else tuple(range(max(0, last - 4), last + 1))

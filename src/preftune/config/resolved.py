"""What a run chose where its config left the choice to it, kept beside the config rather than written into it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from preftune.config.train import TrainConfig


@dataclass(frozen=True)
class Resolved:
    """The choices a run made for the model and the machine where the config left them open (``None``).

    ``bf16``: bf16 autocast (where the hardware multiplies bf16 natively; the run driver decides before anything
    loads). ``judge``: the judge spec of a run that samples (the embedded world's ``gold`` when none is given).
    ``fused_mlp``, ``prefix_sharing``, ``padding_free``: the speed choices for the loaded model (None before it is
    loaded). ``precompute_ref_log_probs``: whether the reference's log-probs were computed once before training.

    The config stays what the user wrote; :meth:`applied` is the config as the run computes with it, for what
    records the run (config.yaml, the fingerprint a resume is checked against, the model card)."""

    bf16: bool = False
    judge: str | None = None
    fused_mlp: bool | None = None
    prefix_sharing: bool | None = None
    padding_free: bool | None = None
    precompute_ref_log_probs: bool | None = None

    def applied(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with every choice made so far filled in (a new config; ``cfg`` is left as it is)."""
        made = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(cfg, **made)

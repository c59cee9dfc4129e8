"""The allowed values of `FIPConfig`'s choice fields, one source each: the `Literal` types annotate the fields, and
the tuples the validation and the command line's `choices` read are derived from them.

Free of torch and peft, so that `fip-peft --help` lists them without importing either. `FIPConfig.solver`'s
values are the `Literal` written on that field in `fip_peft/method/config.py` (`config.SOLVERS` is derived from it).
"""

from __future__ import annotations

from typing import Literal, get_args

Objective = Literal["continual", "sparsify"]
Distance = Literal["logits", "bhattacharyya", "kl"]
SparsitySchedule = Literal["cubic", "linear", "constant"]
SparsityScope = Literal["global", "layer", "2:4"]
SparsityCriterion = Literal["magnitude", "saliency", "obs"]
NonfinitePolicy = Literal["skip", "raise"]
ReferenceMode = Literal["auto", "full", "top_k", "recompute"]
AnchorIntervalMode = Literal["reuse", "scale"]

OBJECTIVES: tuple[str, ...] = get_args(Objective)
DISTANCES: tuple[str, ...] = get_args(Distance)
SCHEDULES: tuple[str, ...] = get_args(SparsitySchedule)
SCOPES: tuple[str, ...] = get_args(SparsityScope)
CRITERIA: tuple[str, ...] = get_args(SparsityCriterion)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonfinitePolicy)
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
ANCHOR_INTERVAL_MODES: tuple[str, ...] = get_args(AnchorIntervalMode)

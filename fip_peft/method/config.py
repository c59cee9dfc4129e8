"""`FIPConfig`: the settings of a functionally-invariant-path adapter."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args, get_type_hints

from peft.config import PeftConfig
from peft.utils import PeftType

from ..choices import (
    ANCHOR_INTERVAL_MODES,
    CRITERIA,
    DISTANCES,
    NONFINITE_POLICIES,
    OBJECTIVES,
    REFERENCE_MODES,
    SCHEDULES,
    SCOPES,
    AnchorIntervalMode,
    Distance,
    NonfinitePolicy,
    Objective,
    ReferenceMode,
    SparsityCriterion,
    SparsitySchedule,
    SparsityScope,
)
from .checks import is_int, is_number

# Defaults of `beta`, measured on the acceptance tasks (tests/test_function_preservation.py, docs/benchmarks.md):
# a low-rank displacement can move in few directions, so it needs a weaker hold on the old outputs to learn.
DEFAULT_BETA_FULL_RANK = 0.4
DEFAULT_BETA_LOW_RANK = 0.7
# With solver="natural+penalty" the metric already keeps the outputs; the penalty only corrects drift (same evidence).
DEFAULT_BETA_NATURAL = 5.0
# Damping of the metric solvers, relative to the mean eigenvalue of their metric, chosen on validation data
# (docs/benchmarks.md, "Natural solver" and "Projection solver").
DEFAULT_DAMPING_NATURAL = 0.1
DEFAULT_DAMPING_PROJECTION = 1.0
# Classes kept per position by reference_mode="top_k" (and "auto" on large vocabularies), measured on a tiny LM
# (docs/benchmarks.md, "Compact references (issue 27)").
DEFAULT_REFERENCE_TOP_K = 64
# Weight of the cross-entropy on labelled anchors, chosen on validation (docs/benchmarks.md, "Labelled anchors").
DEFAULT_LABEL_WEIGHT = 2.0


@dataclass
class FIPConfig(PeftConfig):
    """Configuration of a [`FIPModel`][fip_peft.method.model.FIPModel].

    The adapter holds the weight displacement `delta` of each target module from its base weight, so the adapted
    weight is `W + delta`. Training moves `delta` along a functionally invariant path: every optimizer step descends
    the secondary objective L (the task loss) plus the functional distance D(w, w_ref) between the model's outputs
    and the recorded reference outputs on the remembered anchor inputs, divided by `beta`:

        step direction = grad L + (1 / beta) * grad D

    which is the penalty form of the paper's step `argmin_theta theta^T g theta + beta <theta, grad L>` (g, the
    metric, is the Hessian of D at the reference weights).

    Args:
        target_modules: Module names, a regex, or `"all-linear"`. `None` means `"all-linear"` on transformers
            models; custom models must name their targets.
        exclude_modules: Module names or a regex of modules not to adapt.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. a new classifier head).
        objective: `"continual"` (learn a new task, keep remembered tasks). `"sparsify"`: walk the target weights
            to `target_sparsity` zeros while keeping the outputs on the remembered anchors (see the `sparsity_*`
            fields; full rank only).
        distance: How output change on anchors is measured. `"logits"`: mean squared difference of the logits
            (or the last hidden state), whose metric is g = J^T J, the paper's metric. `"bhattacharyya"`: between
            softmax outputs, what the authors' code uses. `"kl"`: KL(p_ref || p) between softmax outputs.
        beta: Weight of the secondary objective against output preservation (> 0). Larger moves faster and
            preserves less. `None` picks the balance measured on the acceptance tasks (`DEFAULT_BETA_*`): a
            low-rank displacement moves in few directions, so it gets a weaker hold on the old outputs.
        rank: `None` for a full-rank displacement; an int r for a low-rank displacement `B @ A` (B zero-initialised)
            at LoRA-like memory. LoRA users raise the learning rate about 10x with a low rank.
        anchor_budget: Most anchors kept over all remembered tasks, split evenly across tasks.
        anchor_batch_size: Anchors drawn per anchor pass to measure D. The pass (a forward and backward pass on
            this many anchors) costs about as much as a training step on as many examples, so a FIP step costs
            about (1 + anchor_batch_size / training batch / anchor_interval) plain steps: with a training batch much
            larger than the anchor batch the pass is cheap, with a smaller one it dominates.
        anchor_interval: Optimizer steps per anchor pass (>= 1). 1 runs the pass at every step. k > 1 runs it at
            every k-th step only, which cuts the cost of the passes k-fold; what the steps between add is set by
            `anchor_interval_mode`. It trades accuracy for time: between passes the anchor term is computed at
            older weights, and the run sees k times fewer anchor batches; a smaller `anchor_batch_size` at every
            step kept more of the accuracy at the same cost (docs/benchmarks.md, "Cost against retention"), so 1
            is the default. The step counter that decides when the pass runs, and the kept anchor gradient, are
            saved in the optimizer's `state_dict`, so a resumed run takes its passes at the same steps. `FIPTrainer`
            logs `fip_distance` as the mean D over the passes since the last log (none when no pass ran).
        anchor_interval_mode: With `anchor_interval` k > 1. `"reuse"`: the gradient of the last pass is kept and
            added again at every step until the next pass (a slightly stale anchor term, present at every step, at
            the memory of one more gradient): the optimizer sees the same kind of combined gradient at every step,
            as with k=1. `"scale"`: the pass's gradient is multiplied by k and the steps between add nothing (lazy
            regularisation as in StyleGAN2, the same term on average); under Adam-like optimizers, which normalise
            each gradient entry, a term present one step in k is not the same path: the task loss moves unopposed
            between passes and the rare large term inflates Adam's second moment.
        save_anchors: Store anchors and reference outputs in the adapter file so that training can resume
            anywhere. Anchors are training inputs: mind their privacy before pushing to a public Hub.
        anchor_seed: Seed of anchor selection and per-step anchor sampling (identical on every process).
        anchor_output_module: Name of the submodule whose output is kept unchanged on the anchors (e.g.
            `"bert.pooler"`: the 384 features a MiniLM classifier reads instead of its 2 logits), compared with
            `distance="logits"` (squared L2). `None`: the model's output. For models whose output is not what
            should stay put: a backbone whose head will be replaced, task heads on shared features. Not a free gain:
            hidden features constrain more than logits, so they need more anchors (docs/benchmarks.md, "Run 9").
            The reference is recorded from this module, so set it before `remember`.
        label_weight: Weight of the label term: where anchors carry labels (`remember(data, labels=...)` or the
            data's own label column), each FIP step adds `label_weight` times the cross-entropy of their logits to
            `D / beta` (DER++'s label term beside its logit matching). Matching old outputs keeps what the model
            did; the labels add what it should do, which separates old classes from new ones in class-incremental
            learning, where the outputs alone give no such signal. Unlabelled anchors are kept by their outputs
            alone. `None` resolves to the default chosen on validation data for `objective="continual"`
            (docs/benchmarks.md, "Labelled anchors") and to 0 for `"sparsify"`, whose anchors keep the outputs.
        solver: How the FIP step is solved. `"penalty"`: first-order step on L + D / beta. `"natural"`: the
            metric-preconditioned step: the gradient of L on each covered layer (full-rank displacements and trained
            `nn.Linear` heads) becomes P grad L, P = lambda (g + lambda I)^-1 with g the Kronecker-factored metric
            E[J^T M J] on the anchors (no D per step). `"natural+penalty"`: P grad L + grad D / beta, the penalty
            correcting drift the metric lets through (`beta=None` resolves to `DEFAULT_BETA_NATURAL` here); the one
            to use, as `"natural"` alone forgets over long task sequences unless its metric is refreshed every step
            or two (`metric_update_interval`; the metric goes stale, docs/benchmarks.md). Both need `rank=None`.
            `"projection"`: the wrapped optimizer's update u becomes P u = u - J^T (J J^T + lambda I)^-1 J u, J the
            exact Jacobian of the outputs on `metric_anchors` anchors with respect to every trained parameter (any
            rank), so those outputs stay put to first order; `"projection+penalty"` adds grad D / beta before the
            step. Not for class-incremental learning: learning new classes must move the old anchors' logits, which
            the projection forbids (docs/benchmarks.md, "Projection solver").
        epsilon: Natural solvers only. `None`: the wrapped optimizer steps on the preconditioned gradient (its lr
            sets the length). A number: the paper's step, the covered parameters move by exactly `epsilon` (times
            lr / initial_lr under a schedule) along the preconditioned gradient.
        damping: Natural and projection solvers: lambda relative to the mean eigenvalue of the metric (each layer's
            Kronecker metric; J J^T for the projection), > 0. Directions whose eigenvalue is below `damping` x mean
            move freely; larger ones shrink by lambda / (s + lambda). `None`: `DEFAULT_DAMPING_NATURAL` or
            `DEFAULT_DAMPING_PROJECTION`.
        metric_update_interval: Natural solvers: optimizer steps between refreshes of the metric.
        metric_basis_interval: Natural solvers: every this-many metric refreshes the Kronecker factors are
            eigendecomposed; the refreshes between keep the last eigenbasis and refresh only its eigenvalues
            (eigenvalue-corrected K-FAC). Eigendecompositions dominate a refresh on a GPU; 1 decomposes every time.
        metric_anchors: Natural solvers: anchors the metric is estimated on at each refresh.
        metric_batch_size: Natural solvers: anchors per forward/backward pass of a refresh. `None`: `anchor_batch_size`
            (a refresh holds no more activations than a step). Larger means fewer passes per refresh (faster on a GPU
            and on small models, where each pass's fixed cost dominates) and more memory; the metric is the same.
        metric_samples: Natural solvers: random output directions per anchor when estimating the metric.
        metric_positions: Natural solvers: input positions (tokens, conv patches) per anchor, on average, that the
            Kronecker factors are formed from, drawn at random among the non-padding ones at each refresh. `None`:
            all of them. Forming the factors over every token of every anchor (x^T x and d^T d over batch x
            sequence rows) is a large part of a refresh on long sequences; a few positions per anchor estimate the
            same factors for less (docs/benchmarks.md, "Factors from sampled positions").
        init_weights: `True` starts from a zero displacement (the base function). `False` starts from a small
            random displacement, for tests.
        on_nonfinite: What the optimizer step does when the task gradient or the anchor distance D is NaN or
            infinite (a bad batch, an overflow). `"skip"`: the step changes nothing (parameters and optimizer state
            stay as they were) and a warning names the step. `"raise"`: `NonFiniteStepError` names the step.
        target_sparsity: `objective="sparsify"`: the fraction s_f of the target weights' entries (base + delta) that
            are exactly zero at the end, in [0, 1). Only target modules count (norms, biases, heads only if targeted).
            With `sparsity_scope="2:4"` it is 1/2 (leave it unset). Defaults: `sparsity_criterion`, `sparsity_scope`
            and `sparsity_schedule` left unset (`None`) resolve to the best recipe measured for `target_sparsity`
            (`fip_peft.math.sparsity.recommended_recipe`, which says why and gives the Adam learning rate measured with
            it):
            magnitude / global / cubic at moderate sparsity, obs / layer / constant at high, saliency / global / cubic
            at very high; obs / constant for `"2:4"`. A field given explicitly is kept and constrains the others. A
            resolved saliency or obs refuses to prune before `remember` (naming the fix); a resolved obs meeting
            embeddings switches to saliency with a warning.
        sparsity_schedule: How the mask's sparsity s_t ramps from 0 to `target_sparsity`: `"cubic"` (Zhu & Gupta,
            s_t = s_f (1 - (1 - t/T)^3)), `"linear"`, or `"constant"` (s_f from the first step, as the authors).
            `None`: see Defaults above.
        sparsity_scope: `"global"`: one threshold over all target weights; `"layer"`: one per weight; `"2:4"`:
            N:M structured sparsity, 2 zeros in every group of 4 consecutive inputs of each row of the (out, in)
            weight matrix (the pattern sparse tensor cores accelerate; every target weight's inputs must be a
            multiple of 4; a ramp prunes toward the pattern and never leaves it). `None`: see Defaults above.
        sparsity_defaults: The `sparsity_*` fields left unset and resolved to the measured recipe (filled in; saved).
        sparsity_criterion: Which entries go first (`None`: see Defaults above). `"magnitude"`: the smallest |w|.
            `"saliency"`: the smallest w_ij^2 A_jj G_ii, the optimal-brain-damage saliency under the FIP metric
            (diagonal of its Kronecker factors A (x) G on `metric_anchors` anchors, gathered as the natural solvers'
            `metric_*` fields say and refreshed at every mask update): the entries whose removal moves the outputs on
            the anchors least. It weighs each entry by how much its input carries and how much the outputs depend on
            its output, so one global threshold compares layers on one scale (docs/benchmarks.md, "Run 10"). Needs
            remembered anchors. `"obs"`: optimal brain surgeon under the metric's input factor A = E[x x^T]
            (SparseGPT's solve, `saliency.obs_prune`): at every mask update each layer is pruned to the scheduled
            sparsity and the kept entries of each row move to make up for the pruned ones, so the layer's outputs on
            the anchors change as little as the solve finds; the pull uses the OBS saliency w_ij^2 / [A^-1]_jj. Needs
            remembered anchors and `sparsity_scope="layer"` (or `"2:4"`, with a constant schedule); not for embeddings.
            Best with `sparsity_schedule="constant"` (one solve at the first step, then the walk repairs; with a ramp
            the solve runs at every mask update); which of saliency and OBS wins depends on the target
            (docs/benchmarks.md, "Run 11").
        sparsity_begin_step: Optimizer step at which the mask starts to prune.
        sparsity_ramp_steps: T, optimizer steps from `sparsity_begin_step` until the mask reaches the target.
        sparsity_update_every: Optimizer steps between mask updates (the last ramp step always updates). `None`
            resolves to `sparsity_ramp_steps // 10` (at least 1): ten updates over the ramp, however long it is.
        sparsity_lambda: Pull lambda: each step adds lambda * (w - P_s_f(w)), the gradient of
            lambda/2 ||w - P_s_f(w)||^2, so the entries the target mask would remove shrink toward zero before the
            scheduled mask removes them. 0 turns the pull off (gradual magnitude pruning under the anchor term).
            Under Adam the pull moves each entry by about lr per step whatever lambda: lr x sparsity_ramp_steps must
            reach the size of the weights to prune (the first step warns when it does not).
        task_names: The adapter's task history, one name per `remember` call (filled by `remember(task_name=...)`,
            `"task <i>"` when no name is given); shown in the model card and by `fip-peft info`.
        accuracy_matrix: The accuracy matrix R of the tasks, as `AccuracyMatrix.to_dict()` (set by
            `model.record_accuracy(R)`); shown in the model card.
        max_consecutive_skips: With `on_nonfinite="skip"`, this many skipped steps in a row stop training with
            `NonFiniteStepError` (a diverged run would otherwise skip every step forever); `None` never stops.
        reference_mode: How the reference outputs are kept (docs/concepts.md, "Causal language models"). `"full"`:
            in full (refused above 2 GiB: per-token logits over a 50k vocabulary for 512 x 128 tokens take 13 GB).
            `"top_k"`: per position, the log-probabilities of the reference's `reference_top_k` likeliest classes and
            of the rest merged into one; D is the softmax distance on these k + 1 classes (at most the full D, equal
            when the rest's mass is small). Needs `distance="kl"` or `"bhattacharyya"`. `"recompute"`: nothing
            stored; each step reruns the anchors through the base model with the adapters disabled (exact, one more
            forward pass); refused by `remember` once the model differs from the base model (a trained adapter, a
            later task) or is merged. `"auto"`: `"top_k"` for a softmax distance over more than 4 x
            `reference_top_k` classes (a language model), else `"full"` (docs/benchmarks.md, "Compact references").
        reference_top_k: k of `reference_mode="top_k"`: classes kept per position (>= 1), fewer than the
            model's classes.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names, a regex, or 'all-linear'. None means 'all-linear' on transformers models."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. a new head."}
    )
    objective: Objective = field(
        default="continual", metadata={"help": "'continual' keeps remembered tasks while learning a new one."}
    )
    distance: Distance = field(default="logits", metadata={"help": f"Output distance on anchors: one of {DISTANCES}."})
    beta: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the new objective against preservation (> 0); larger preserves less. None: "
            f"{DEFAULT_BETA_FULL_RANK} for a full-rank displacement, {DEFAULT_BETA_LOW_RANK} for a low-rank one."
        },
    )
    rank: int | None = field(
        default=None, metadata={"help": "None: full-rank displacement; int r: low-rank B @ A displacement."}
    )
    anchor_budget: int = field(default=512, metadata={"help": "Most anchors kept over all tasks, split evenly."})
    anchor_batch_size: int = field(default=16, metadata={"help": "Anchors drawn per anchor pass."})
    anchor_interval: int = field(
        default=1,
        metadata={"help": "Optimizer steps per anchor pass (>= 1); k > 1 runs the pass every k-th step only."},
    )
    anchor_interval_mode: AnchorIntervalMode = field(
        default="reuse",
        metadata={
            "help": "anchor_interval > 1: 'reuse' re-adds the last pass's gradient at the steps between passes; "
            "'scale' multiplies the pass's gradient by anchor_interval and adds nothing between."
        },
    )
    save_anchors: bool = field(
        default=True, metadata={"help": "Store anchors and reference outputs in the adapter file."}
    )
    anchor_seed: int = field(default=0, metadata={"help": "Seed of anchor selection and sampling."})
    anchor_output_module: str | None = field(
        default=None,
        metadata={"help": "Submodule whose output is kept on anchors (e.g. 'bert.pooler'); None: the model output."},
    )
    label_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the cross-entropy on labelled anchors in each FIP step (0: outputs only). None: "
            f"{DEFAULT_LABEL_WEIGHT} for objective='continual', 0 for 'sparsify'."
        },
    )
    solver: Literal["penalty", "natural", "natural+penalty", "projection", "projection+penalty"] = field(
        default="penalty",
        metadata={
            "help": "How the FIP step is solved: 'penalty', 'natural', 'natural+penalty', 'projection', "
            "'projection+penalty'."
        },
    )
    epsilon: float | None = field(
        default=None,
        metadata={"help": "Natural solvers: None lets the optimizer's lr set the step; a number: fixed step length."},
    )
    damping: float | None = field(
        default=None,
        metadata={
            "help": "Metric solvers: damping relative to the metric's mean eigenvalue. None: "
            f"{DEFAULT_DAMPING_NATURAL} for natural solvers, {DEFAULT_DAMPING_PROJECTION} for projection solvers."
        },
    )
    metric_update_interval: int = field(
        default=10, metadata={"help": "Natural solvers: optimizer steps between metric refreshes."}
    )
    metric_basis_interval: int = field(
        default=5,
        metadata={"help": "Natural solvers: metric refreshes per eigendecomposition (others refresh eigenvalues)."},
    )
    metric_anchors: int = field(
        default=128, metadata={"help": "Natural solvers, saliency: anchors per metric refresh."}
    )
    metric_batch_size: int | None = field(
        default=None,
        metadata={"help": "Natural solvers, saliency: anchors per pass of a metric refresh; None: anchor_batch_size."},
    )
    metric_samples: int = field(
        default=1, metadata={"help": "Natural solvers, saliency: random output directions per anchor for the metric."}
    )
    metric_positions: int | None = field(
        default=None,
        metadata={
            "help": "Natural solvers, saliency: positions (tokens, patches) per anchor the metric uses; None: all."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero displacement (base function); False: random, for tests."}
    )
    target_sparsity: float | None = field(
        default=None,
        metadata={"help": "objective='sparsify': fraction of target weight entries to zero, in [0, 1)."},
    )
    sparsity_schedule: SparsitySchedule | None = field(
        default=None, metadata={"help": "Ramp from 0 to target: 'cubic', 'linear', 'constant'. None: measured best."}
    )
    sparsity_scope: SparsityScope | None = field(
        default=None,
        metadata={
            "help": "Threshold over all target weights ('global'), one per layer ('layer'), or the '2:4' pattern "
            "(2 zeros in every 4 consecutive inputs of a row; target_sparsity 0.5). None: 'layer' for obs, else "
            "'global'."
        },
    )
    sparsity_criterion: SparsityCriterion | None = field(
        default=None,
        metadata={
            "help": "Entries pruned first: smallest 'magnitude' |w|, smallest 'saliency' under the metric, or 'obs' "
            "(optimal brain surgeon: the rest of each row compensates; needs sparsity_scope='layer' or '2:4'). "
            "None: the best measured for target_sparsity (magnitude at moderate, obs at high, saliency at very "
            "high sparsity)."
        },
    )
    sparsity_defaults: list[str] = field(
        default_factory=list,
        metadata={"help": "The sparsity_* fields left unset and resolved to the measured recipe (filled in)."},
    )
    sparsity_begin_step: int = field(default=0, metadata={"help": "Optimizer step at which pruning begins."})
    sparsity_ramp_steps: int = field(
        default=100, metadata={"help": "Optimizer steps from begin_step until the mask reaches target_sparsity."}
    )
    sparsity_update_every: int | None = field(
        default=None, metadata={"help": "Optimizer steps between mask updates; None: sparsity_ramp_steps // 10."}
    )
    sparsity_lambda: float = field(
        default=1.0,
        metadata={"help": "Pull lambda of the weights toward their projection at target_sparsity (>= 0)."},
    )
    on_nonfinite: NonfinitePolicy = field(
        default="skip",
        metadata={"help": "A NaN/inf task gradient or anchor distance: 'skip' the step (with a warning) or 'raise'."},
    )
    task_names: list[str] = field(
        default_factory=list, metadata={"help": "Task history: one name per `remember` call, in order."}
    )
    accuracy_matrix: dict | None = field(
        default=None, metadata={"help": "Accuracy matrix of the tasks (AccuracyMatrix.to_dict()), for the card."}
    )
    max_consecutive_skips: int | None = field(
        default=10,
        metadata={"help": "on_nonfinite='skip': stop (NonFiniteStepError) after this many skipped steps in a row."},
    )
    reference_mode: ReferenceMode = field(
        default="auto",
        metadata={"help": "References kept 'full', as 'top_k', 'recompute'd, or 'auto' (top_k on LMs)."},
    )
    reference_top_k: int = field(
        default=DEFAULT_REFERENCE_TOP_K, metadata={"help": "reference_mode='top_k': classes kept per position."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FIP
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _resolve_defaults(self)
        _validate(self)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Drop (with a warning) fields that a newer fip_peft wrote into `adapter_config.json`."""
        return drop_unknown_config_fields(cls, kwargs)


# The solvers are the values of the Literal on `FIPConfig.solver` (the one place they are written).
SOLVERS: tuple[str, ...] = get_args(get_type_hints(FIPConfig)["solver"])


def _resolve_defaults(config: FIPConfig) -> None:
    """Resolve the fields left `None` to the defaults measured for this configuration."""
    if config.damping is None:
        projection = isinstance(config.solver, str) and config.solver.startswith("projection")
        config.damping = DEFAULT_DAMPING_PROJECTION if projection else DEFAULT_DAMPING_NATURAL
    if config.beta is None and config.solver in ("natural+penalty", "projection+penalty"):
        config.beta = DEFAULT_BETA_NATURAL
    elif config.beta is None and is_int(config.rank):
        config.beta = DEFAULT_BETA_LOW_RANK
    elif config.beta is None:
        config.beta = DEFAULT_BETA_FULL_RANK
    if config.label_weight is None:
        config.label_weight = DEFAULT_LABEL_WEIGHT if config.objective == "continual" else 0.0


def _validate(config: FIPConfig) -> None:
    """Refuse invalid fields, naming the field, the value and what would work."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"FIPConfig.objective must be one of {OBJECTIVES}, got {config.objective!r}.")
    _check_sparsity(config)
    if config.distance not in DISTANCES:
        raise ValueError(f"FIPConfig.distance must be one of {DISTANCES}, got {config.distance!r}.")
    if config.solver not in SOLVERS:
        raise ValueError(f"FIPConfig.solver must be one of {SOLVERS}, got {config.solver!r}.")
    _check_metric_solver(config)
    _check_number("beta", config.beta, positive=True)
    _check_number("label_weight", config.label_weight, positive=False)
    if not 0 <= config.label_weight < float("inf"):
        raise ValueError(
            f"FIPConfig.label_weight must be a finite number >= 0 (0 keeps the outputs alone), got "
            f"{config.label_weight}."
        )
    if config.rank is not None:
        _check_int("rank", config.rank, minimum=1, hint="or None for a full-rank displacement")
    _check_int("anchor_budget", config.anchor_budget, minimum=1)
    _check_int("anchor_batch_size", config.anchor_batch_size, minimum=1)
    _check_anchor_interval(config)
    _check_int("anchor_seed", config.anchor_seed, minimum=0)
    _check_anchor_output(config)
    if not isinstance(config.save_anchors, bool):
        raise TypeError(f"FIPConfig.save_anchors must be a bool, got {type(config.save_anchors).__name__}.")
    _check_history(config.task_names, config.accuracy_matrix)
    _check_reference_mode(config)
    check_config_consistency(config)


def _check_anchor_interval(config: FIPConfig) -> None:
    _check_int("anchor_interval", config.anchor_interval, minimum=1, hint="1 runs the anchor pass at every step")
    if config.anchor_interval_mode not in ANCHOR_INTERVAL_MODES:
        raise ValueError(
            f"FIPConfig.anchor_interval_mode must be one of {ANCHOR_INTERVAL_MODES}, got "
            f"{config.anchor_interval_mode!r}."
        )
    if config.anchor_interval > 1 and config.solver in ("natural", "projection"):
        raise ValueError(
            f"FIPConfig.anchor_interval={config.anchor_interval} spaces out the anchor pass, which "
            f"solver={config.solver!r} does not run (its step has no D): leave anchor_interval=1, or use "
            f"solver='{config.solver}+penalty' to space out its penalty's pass."
        )


def _check_metric_solver(config: FIPConfig) -> None:
    if config.epsilon is not None:
        _check_number("epsilon", config.epsilon, positive=True)
    _check_number("damping", config.damping, positive=True)
    _check_int("metric_update_interval", config.metric_update_interval, minimum=1)
    _check_int("metric_basis_interval", config.metric_basis_interval, minimum=1)
    _check_int("metric_anchors", config.metric_anchors, minimum=1)
    if config.metric_batch_size is not None:
        _check_int("metric_batch_size", config.metric_batch_size, minimum=1)
    _check_int("metric_samples", config.metric_samples, minimum=1)
    if config.metric_positions is not None:
        _check_int("metric_positions", config.metric_positions, minimum=1, hint="or None for every position")
    if config.solver in ("penalty", "projection", "projection+penalty"):
        if config.epsilon is not None:
            raise ValueError(
                f"FIPConfig.epsilon={config.epsilon} needs a natural solver (solver='natural' or "
                f"'natural+penalty'); the {config.solver} solver's step length is the optimizer's lr."
            )
        return
    if config.rank is not None:
        raise ValueError(
            f"FIPConfig.solver={config.solver!r} needs FIPConfig.rank=None (a full-rank displacement), got "
            f"rank={config.rank}: the Kronecker metric preconditions full weight matrices. Use solver='penalty' "
            "with a low rank."
        )


def _check_anchor_output(config: FIPConfig) -> None:
    if config.anchor_output_module is None:
        return
    if not isinstance(config.anchor_output_module, str) or not config.anchor_output_module.strip():
        raise (TypeError if not isinstance(config.anchor_output_module, str) else ValueError)(
            "FIPConfig.anchor_output_module must be a submodule name such as 'bert.pooler', or None for the "
            f"model's output; got {config.anchor_output_module!r}."
        )
    if config.distance != "logits":
        raise ValueError(
            f"FIPConfig.anchor_output_module={config.anchor_output_module!r} keeps hidden features, which are not "
            f"logits of a distribution: use distance='logits' (squared L2), got distance={config.distance!r}."
        )


def _check_reference_mode(config: FIPConfig) -> None:
    """`reference_mode` and `reference_top_k` alone, and against the distance, the kept output and the solver."""
    mode = config.reference_mode
    if mode not in REFERENCE_MODES:
        raise ValueError(f"FIPConfig.reference_mode must be one of {REFERENCE_MODES}, got {mode!r}.")
    _check_int("reference_top_k", config.reference_top_k, minimum=1)
    if mode == "top_k" and config.distance == "logits":
        raise ValueError(
            "FIPConfig.reference_mode='top_k' keeps log-probabilities, which the squared-logit distance cannot use: "
            "set distance='kl' (or 'bhattacharyya'), or reference_mode='full' or 'recompute'."
        )
    if mode in ("top_k", "recompute") and isinstance(config.solver, str) and config.solver.startswith("projection"):
        raise ValueError(
            f"FIPConfig.reference_mode={mode!r} does not keep the full reference outputs that "
            f"solver={config.solver!r} measures its drift against: use reference_mode='full', or solver='penalty'."
        )


def _check_sparsity(config: FIPConfig) -> None:
    if config.objective != "sparsify":
        if config.target_sparsity is not None:
            raise ValueError(
                f"FIPConfig.target_sparsity={config.target_sparsity} needs objective='sparsify' (got "
                f"objective={config.objective!r})."
            )
        return
    if config.sparsity_scope == "2:4":
        if config.target_sparsity is None:
            config.target_sparsity = 0.5
        elif config.target_sparsity != 0.5:
            raise ValueError(
                f"FIPConfig.sparsity_scope='2:4' zeroes 2 of every 4 consecutive inputs, exactly half of the weights: "
                f"leave target_sparsity unset (or 0.5), got target_sparsity={config.target_sparsity}."
            )
    if config.target_sparsity is None:
        raise ValueError("FIPConfig.objective='sparsify' needs target_sparsity, e.g. target_sparsity=0.8.")
    _check_number("target_sparsity", config.target_sparsity, positive=False)
    if not 0.0 <= config.target_sparsity < 1.0:
        raise ValueError(f"FIPConfig.target_sparsity must be in [0, 1), got {config.target_sparsity}.")
    _resolve_sparsity_recipe(config)
    if config.rank is not None:
        raise ValueError(
            f"FIPConfig.objective='sparsify' needs a full-rank displacement (rank=None), got rank={config.rank}: "
            "a low-rank displacement cannot zero arbitrary entries."
        )
    if config.sparsity_schedule not in SCHEDULES:
        raise ValueError(f"FIPConfig.sparsity_schedule must be one of {SCHEDULES}, got {config.sparsity_schedule!r}.")
    if config.sparsity_scope not in SCOPES:
        raise ValueError(f"FIPConfig.sparsity_scope must be one of {SCOPES}, got {config.sparsity_scope!r}.")
    if config.sparsity_criterion not in CRITERIA:
        raise ValueError(f"FIPConfig.sparsity_criterion must be one of {CRITERIA}, got {config.sparsity_criterion!r}.")
    if config.sparsity_criterion == "obs" and config.sparsity_scope not in ("layer", "2:4"):
        raise ValueError(
            "FIPConfig.sparsity_criterion='obs' prunes every target layer to the scheduled sparsity (its solve "
            f"works within a layer), so it needs sparsity_scope='layer' (or '2:4'), got {config.sparsity_scope!r}."
        )
    obs_ramp = config.sparsity_criterion == "obs" and config.sparsity_schedule != "constant"
    if obs_ramp and config.sparsity_scope == "2:4":
        raise ValueError(
            "FIPConfig.sparsity_criterion='obs' with sparsity_scope='2:4' prunes the whole pattern in one solve, so "
            f"it needs sparsity_schedule='constant', got {config.sparsity_schedule!r} (or use sparsity_criterion="
            "'magnitude' or 'saliency', which can ramp toward the pattern)."
        )
    _check_int("sparsity_begin_step", config.sparsity_begin_step, minimum=0)
    _check_int("sparsity_ramp_steps", config.sparsity_ramp_steps, minimum=0)
    if config.sparsity_update_every is None:
        config.sparsity_update_every = max(1, config.sparsity_ramp_steps // 10)
    _check_int("sparsity_update_every", config.sparsity_update_every, minimum=1)
    _check_number("sparsity_lambda", config.sparsity_lambda, positive=False)
    if config.sparsity_lambda < 0:
        raise ValueError(f"FIPConfig.sparsity_lambda must be >= 0, got {config.sparsity_lambda}.")


def _resolve_sparsity_recipe(config: FIPConfig) -> None:
    """Fill the unset (None) `sparsity_criterion`, `sparsity_scope` and `sparsity_schedule` with the best measured
    recipe for `target_sparsity` (`sparsity.recommended_recipe`), and record which in `sparsity_defaults`. Configs
    saved before these defaults carry all three explicitly and load unchanged."""
    from ..math.sparsity import recommended_recipe

    names = ("sparsity_criterion", "sparsity_scope", "sparsity_schedule")
    unset = [name for name in names if getattr(config, name) is None]
    if not unset:
        return
    recipe = recommended_recipe(
        config.target_sparsity, config.sparsity_criterion, config.sparsity_scope, config.sparsity_schedule
    )
    config.sparsity_criterion = config.sparsity_criterion or recipe.criterion
    config.sparsity_scope = config.sparsity_scope or recipe.scope
    config.sparsity_schedule = config.sparsity_schedule or recipe.schedule
    if not isinstance(config.sparsity_defaults, list):
        raise TypeError(f"FIPConfig.sparsity_defaults must be a list of names, got {config.sparsity_defaults!r}.")
    config.sparsity_defaults = sorted(set(config.sparsity_defaults) | set(unset))


# ---- checks of several fields --------------------------------------------------------------------------------------


def _check_names(name: str, value: object, *, allow_str: bool) -> None:
    if value is None or (allow_str and isinstance(value, str)):
        return
    kinds = "None, a regex string or a list of module names" if allow_str else "None or a list of module names"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(f"FIPConfig.{name} must be {kinds}, got {type(value).__name__}.")
    bad = [item for item in value if not isinstance(item, str)]
    if bad:
        raise TypeError(f"FIPConfig.{name} must hold module names (str), got {bad[:3]!r}.")


def check_config_consistency(config: FIPConfig) -> None:
    """Types of the fields `_validate` does not cover, and checks that involve several fields."""
    if config.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"FIPConfig.on_nonfinite must be one of {NONFINITE_POLICIES}, got {config.on_nonfinite!r}.")
    skips = config.max_consecutive_skips
    if skips is not None and (not is_int(skips) or skips < 1):
        raise (ValueError if is_int(skips) else TypeError)(
            f"FIPConfig.max_consecutive_skips must be an int >= 1 or None (never stop), got {skips!r}."
        )
    if not math.isfinite(config.beta):
        raise ValueError(
            f"FIPConfig.beta must be finite, got {config.beta}: beta=inf would ignore the remembered outputs (plain "
            "fine-tuning). Use a large finite beta to preserve less, or leave beta=None for the default."
        )
    if not isinstance(config.init_weights, bool):
        raise TypeError(f"FIPConfig.init_weights must be a bool, got {type(config.init_weights).__name__}.")
    _check_names("target_modules", config.target_modules, allow_str=True)
    _check_names("exclude_modules", config.exclude_modules, allow_str=True)
    _check_names("modules_to_save", config.modules_to_save, allow_str=False)
    if isinstance(config.target_modules, (set, list)) and config.modules_to_save:
        both = sorted(set(config.target_modules) & set(config.modules_to_save))
        if both:
            raise ValueError(
                f"{both} are both in FIPConfig.target_modules (given a FIP displacement) and in "
                "FIPConfig.modules_to_save (trained in full): name each module in one of them only."
            )


def drop_unknown_config_fields(config_cls: type, kwargs: dict) -> dict:
    """`kwargs` without the fields `config_cls` does not have, with a warning naming them (a newer fip_peft's)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        from .. import __version__

        warnings.warn(
            f"The FIP adapter config has fields {unknown} that fip_peft {__version__} does not know; they are "
            "ignored. The adapter was probably saved by a newer fip_peft: upgrade it (`pip install -U fip-peft`) "
            "if the adapter does not behave as it did when saved.",
            stacklevel=3,
        )
    return {key: value for key, value in kwargs.items() if key in known}


def _check_number(name: str, value: object, *, positive: bool) -> None:
    if not is_number(value):
        raise TypeError(f"FIPConfig.{name} must be a number, got {type(value).__name__}.")
    if positive and not value > 0:
        raise ValueError(f"FIPConfig.{name} must be > 0, got {value}.")


def _check_int(name: str, value: object, *, minimum: int, hint: str = "") -> None:
    if not is_int(value):
        raise TypeError(f"FIPConfig.{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        suffix = f" ({hint})" if hint else ""
        raise ValueError(f"FIPConfig.{name} must be >= {minimum}, got {value}{suffix}.")


def _check_history(task_names: object, accuracy_matrix: object) -> None:
    if not isinstance(task_names, list) or not all(isinstance(name, str) for name in task_names):
        raise TypeError(f"FIPConfig.task_names must be a list of str (filled by `remember`), got {task_names!r}.")
    if accuracy_matrix is not None and not isinstance(accuracy_matrix, dict):
        raise TypeError(
            "FIPConfig.accuracy_matrix must be None or AccuracyMatrix.to_dict() (set by `model.record_accuracy`), "
            f"got {type(accuracy_matrix).__name__}."
        )

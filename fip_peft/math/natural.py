"""The math of the metric-preconditioned FIP step (`solver="natural"`): Kronecker factors of the metric, how they are
estimated on the anchors (forward hooks and sampled output directions), their damped inverse and their spectrum.
The model side (which layers, which anchors, which seeds) is `fip_peft.method.metric`; the sparsity scores read from
the factors are `fip_peft.math.saliency`; exact matrix-free references for the tests are in `tests/_references.py`.

The paper's step solves argmin_theta theta^T g theta + beta <theta, grad L> with |theta| <= epsilon, where
g = E[J^T M J] over the anchors. Its solution is theta proportional to -(g + lambda I)^-1 grad L. Here g is
approximated per covered layer by a Kronecker product (K-FAC, Martens & Grosse 2015). For a layer y = x W^T with
displacement delta (out x in):

    g_layer ~ A (x) G,    A = E[x x^T] over the layer's inputs on the anchors,
                          G = E[d d^T], d = d(v^T f) / dy the gradient at the layer's output of a random
                          projection v of the model's output f with E[v v^T] = M,

so no Jacobian is ever formed: one forward pass on the anchors and one backward pass per sampled direction. For
`distance="logits"` M = I (v is Rademacher); for the softmax distances M is the output Fisher diag(p) - p p^T up to a
constant (v = e_c - p with c drawn from p). For a deep linear network and all output directions the product is exact.

The step uses the damped inverse in the eigenbasis of the factors (A = Q_A S_A Q_A^T, G = Q_G S_G Q_G^T):

    P = lambda (A (x) G + lambda I)^-1,    P u = u - Q_G [(Q_G^T u Q_A) * s / (s + lambda)] Q_A^T,   s = S_G S_A^T

This inverts the Kronecker metric plus damping exactly (the factored form (G + sqrt(lambda) I)^-1 u
(A + sqrt(lambda) I)^-1 only approximates it and adds a cross term), the same eigendecomposition gives the
spectrum for `metric_spectrum`, and P is dimensionless: it leaves directions the anchors do not see (s << lambda)
unchanged and shrinks a direction of metric eigenvalue s by lambda / (s + lambda). lambda = `damping` x the mean
eigenvalue of the layer's metric (trace A / in x trace G / out), so one `damping` means the same on every layer and
model. Eigen-directions whose shrinkage is below `TRUNCATION` on every product are dropped (treated as free), which
makes applying P cost O(out x in x rank) instead of O(out x in x (out + in)); a factor seen on fewer rows than its
size (e.g. 128 anchors into a 1568-wide layer) is decomposed through its Gram matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Eigen-directions whose largest shrinkage s / (s + lambda) stays below this are treated as free (P = 1 there).
TRUNCATION = 1e-4
# An earlier partial eigenbasis (of a factor seen on fewer rows than its width) is kept while it holds at least this
# share of the new factor's trace; the rest is treated as free until the next eigendecomposition.
KEPT_BASIS_MIN_TRACE = 0.9


# ---- covered layers -------------------------------------------------------------------------------------------------


@dataclass
class CoveredLayer:
    """A layer whose trainable weight the metric preconditions, seen as y = x W^T with W of shape (out, in).

    `kind` is "linear" (nn.Linear, transformers' Conv1D with `transposed`), "conv2d" (inputs unfolded into patches)
    or "embedding" (one-hot inputs: A is diagonal, the token counts). `bias`, when trained, is preconditioned with
    the weight by appending a constant 1 to the inputs.
    """

    module: nn.Module
    kind: str
    weight: nn.Parameter
    transposed: bool = False
    bias: nn.Parameter | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def as_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None = None) -> torch.Tensor:
        """A weight-shaped tensor (and bias-shaped one) as the (out, in [+ 1]) matrix the factors act on."""
        matrix = weight_like.t() if self.transposed else weight_like.reshape(weight_like.shape[0], -1)
        if self.bias is not None:
            matrix = torch.cat([matrix, bias_like.reshape(-1, 1)], dim=1)
        return matrix

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of `as_matrix`: the weight-shaped (and bias-shaped) tensors."""
        if self.bias is not None:
            matrix, bias = matrix[:, :-1], matrix[:, -1]
        weight = matrix.t() if self.transposed else matrix.reshape(self.weight.shape)
        return [weight] if self.bias is None else [weight, bias.reshape(self.bias.shape)]

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's inputs as rows of the A factor: (rows, in [+ 1]); embedding: the flat token ids."""
        if self.kind == "embedding":
            return x.reshape(-1)
        if self.kind == "conv2d":
            conv = self.module.get_base_layer() if hasattr(self.module, "get_base_layer") else self.module
            patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
        return rows

    def output_rows(self, d: torch.Tensor) -> torch.Tensor:
        """Gradients at the layer's output as rows of the G factor: (rows, out)."""
        if self.kind == "conv2d":
            return d.transpose(1, -1).reshape(-1, d.shape[1])
        return d.reshape(-1, d.shape[-1])


# ---- factors --------------------------------------------------------------------------------------------------------


@dataclass
class Eigen:
    """Eigen-decomposition of a symmetric PSD factor of size `dim`: the eigenvalues kept and their eigenvectors
    (`vectors` (dim, k)), or unit vectors at `index` for a diagonal factor. Eigenvalues not kept are 0."""

    values: torch.Tensor
    dim: int
    trace: float
    vectors: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        """The factor as a dense (dim, dim) matrix (for tests and small layers)."""
        if self.vectors is not None:
            return (self.vectors * self.values) @ self.vectors.t()
        dense = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        dense[self.index] = self.values
        return torch.diag(dense)

    def is_full_basis(self, dim: int) -> bool:
        """Whether the eigenvectors span the whole space of a factor of size `dim` (so they can be reused)."""
        return self.vectors is not None and self.vectors.shape == (dim, dim)

    def keep(self, mask: torch.Tensor) -> Eigen:
        """The eigen-directions where `mask` is true (this very object, no copy, when all are kept)."""
        if bool(mask.all()):
            return self
        if self.vectors is not None:
            return Eigen(self.values[mask], self.dim, self.trace, vectors=self.vectors[:, mask])
        return Eigen(self.values[mask], self.dim, self.trace, index=self.index[mask])

    def rotate_in(self, u: torch.Tensor) -> torch.Tensor:
        """u Q (columns of u into the eigenbasis)."""
        return u @ self.vectors if self.vectors is not None else u[:, self.index]

    def rotate_out(self, core: torch.Tensor) -> torch.Tensor:
        """core Q^T (back to the layer's basis)."""
        if self.vectors is not None:
            return core @ self.vectors.t()
        out = core.new_zeros(core.shape[0], self.dim)
        out[:, self.index] = core
        return out


class _Factor:
    """Running sum of row outer products, kept as the rows themselves while there are fewer rows than columns (so
    that a wide, rarely seen factor is decomposed through its small Gram matrix)."""

    def __init__(self, dim: int, diagonal_only: bool = False) -> None:
        self.dim = dim
        self.diagonal_only = diagonal_only
        self.rows: list[torch.Tensor] = []
        self.num_rows = 0
        self.sum: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        self.num_rows += rows.shape[0]
        if self.diagonal_only:  # only diag(sum of x x^T) = sum of x^2 is wanted: no outer products
            squares = rows.pow(2).sum(0)
            self.sum = squares if self.sum is None else self.sum + squares
            return
        if self.sum is None:
            # all-zero rows (positions no output depends on) add nothing, and would make the Gram matrix singular
            self.rows.append(rows[rows.any(dim=1)])
            if sum(len(kept) for kept in self.rows) <= self.dim:
                return
            rows, self.rows = torch.cat(self.rows), []
        product = rows.t() @ rows
        self.sum = product if self.sum is None else self.sum + product

    def all_reduce(self, device: torch.device) -> None:
        """Sum this factor over the processes of the default group, in place on every process (each must call it at
        the same time). While all processes together kept fewer rows than its width, the rows are gathered in rank
        order (so that it stays decomposable through its Gram matrix); otherwise the outer products are summed."""
        self.num_rows = int(_summed(torch.tensor([self.num_rows], device=device)))
        if self.diagonal_only:
            self.sum = _summed(self.sum.to(device))
            return
        kept = sum(len(rows) for rows in self.rows) if self.sum is None else self.dim + 1
        if int(_summed(torch.tensor([kept], device=device))) <= self.dim:
            self.rows = [self._gathered_rows(device)]
            return
        local = self.sum if self.sum is not None else torch.zeros(self.dim, self.dim, device=device)
        for rows in self.rows:
            local = local.to(rows.device) + rows.t() @ rows
        self.sum, self.rows = _summed(local.to(device)), []

    def _gathered_rows(self, device: torch.device) -> torch.Tensor:
        """The rows every process kept, concatenated in rank order (padded to one size to be gathered)."""
        rows = torch.cat(self.rows).to(device) if self.rows else torch.zeros(0, self.dim, device=device)
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([len(rows)], device=device))
        longest = max(int(count) for count in counts)
        padded = torch.cat([rows, rows.new_zeros(longest - len(rows), self.dim)])
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[: int(count)] for piece, count in zip(pieces, counts, strict=True)])

    def diagonal(self, scale: float) -> torch.Tensor:
        """diag(F), F = (sum of row outer products) / scale (zeros before any row)."""
        diagonal = self.sum if self.diagonal_only or self.sum is None else self.sum.diagonal()
        for rows in self.rows:
            diagonal = rows.pow(2).sum(0) if diagonal is None else diagonal + rows.pow(2).sum(0)
        return torch.zeros(self.dim) if diagonal is None else diagonal / scale

    def dense(self, scale: float) -> torch.Tensor:
        """F = (sum of row outer products) / scale as a (dim, dim) matrix."""
        if self.diagonal_only:
            raise ValueError("A diagonal-only factor has no dense form.")
        total = self.sum if self.sum is not None else torch.zeros(self.dim, self.dim)
        for rows in self.rows:
            total = total.to(rows.device) + rows.t() @ rows
        return total / scale

    def eigen(self, scale: float, basis: Eigen | None = None) -> Eigen:
        """Eigen-decomposition of F = (sum of row outer products) / scale. Given the eigenbasis Q of an earlier F,
        only the eigenvalues are refreshed, as diag(Q^T F Q) (eigenvalue-corrected K-FAC, George et al. 2018): matrix
        products instead of an eigendecomposition, the slow part of a refresh on a GPU. A partial Q (from a factor
        seen on fewer rows than its width) is kept only while it holds `KEPT_BASIS_MIN_TRACE` of F's trace."""
        if basis is not None and self.sum is not None and basis.is_full_basis(self.dim):
            current = self.sum / scale
            values = ((current @ basis.vectors) * basis.vectors).sum(0).clamp_min(0.0)
            return Eigen(values, self.dim, float(current.diagonal().sum()), vectors=basis.vectors)
        if self.sum is not None:
            values, vectors = torch.linalg.eigh(self.sum / scale)
            values = values.clamp_min(0.0)
            return Eigen(values, self.dim, float(values.sum()), vectors=vectors)
        rows = torch.cat(self.rows) / scale**0.5
        if not len(rows):
            return Eigen(rows.new_zeros(0), self.dim, 0.0, vectors=rows.new_zeros(self.dim, 0))
        if basis is not None and basis.vectors is not None and basis.dim == self.dim and basis.vectors.shape[1]:
            values = (rows @ basis.vectors).pow(2).sum(0)
            trace = float(rows.pow(2).sum())
            if float(values.sum()) >= KEPT_BASIS_MIN_TRACE * trace:
                return Eigen(values, self.dim, trace, vectors=basis.vectors)
        values, left = torch.linalg.eigh(rows @ rows.t())
        kept = values > values.max().clamp_min(0.0) * 1e-10
        values = values[kept]
        vectors = (rows.t() @ left[:, kept]) / values.sqrt()
        return Eigen(values, self.dim, float(values.sum()), vectors=vectors)


class _DiagonalFactor:
    """Diagonal A of an embedding: how often each token occurs among the anchor inputs."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.num_rows = 0
        self.counts: torch.Tensor | None = None

    def add(self, ids: torch.Tensor) -> None:
        self.num_rows += ids.numel()
        counts = torch.bincount(ids, minlength=self.dim).to(torch.float32)
        self.counts = counts if self.counts is None else self.counts + counts

    def diagonal(self, scale: float) -> torch.Tensor:
        return self.counts / scale

    def all_reduce(self, device: torch.device) -> None:
        """Sum the token counts over the processes of the default group, in place on every process."""
        self.num_rows = int(_summed(torch.tensor([self.num_rows], device=device)))
        self.counts = _summed(self.counts.to(device))

    def eigen(self, scale: float, basis: Eigen | None = None) -> Eigen:
        """The diagonal factor is its own eigen form (`basis` is not needed)."""
        values = self.counts / scale
        index = torch.nonzero(values).flatten()
        return Eigen(values[index], self.dim, float(values.sum()), index=index)


@dataclass
class LayerMetric:
    """A (x) G of one layer in eigen form, with its absolute damping lambda and the shrinkage s / (s + lambda) of
    every eigen-direction s = S_G S_A^T (computed once per refresh, used by every step's `project`)."""

    a: Eigen
    g: Eigen
    damping: float
    shrink: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.a.values) and len(self.g.values):
            products = self.g.values[:, None] * self.a.values[None, :]
            self.shrink = products / (products + self.damping)

    def kronecker(self) -> torch.Tensor:
        """The dense metric block of the layer, over vec(W) of the (out, in) matrix in row-major order: G (x) A."""
        return torch.kron(self.g.matrix(), self.a.matrix())

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """P u = lambda (A (x) G + lambda I)^-1 u for an (out, in) matrix u."""
        if self.shrink is None:
            return u
        u = u.to(self.a.values.dtype)
        core = self.a.rotate_in(self.g.vectors.t() @ u).mul_(self.shrink)
        if self.a.vectors is not None:
            return torch.addmm(u, self.g.vectors @ core, self.a.vectors.t(), alpha=-1.0)
        return u - self.a.rotate_out(self.g.vectors @ core)

    def top_eigenvalues(self, k: int) -> torch.Tensor:
        """The k largest eigenvalues of A (x) G (zeros past its rank)."""
        k = min(k, self.a.dim * self.g.dim)
        a = self.a.values.topk(min(k, len(self.a.values))).values
        g = self.g.values.topk(min(k, len(self.g.values))).values
        products = (g[:, None] * a[None, :]).flatten()
        top = products.topk(min(k, products.numel())).values
        return torch.cat([top, top.new_zeros(k - top.numel())])


def _truncate(a: Eigen, g: Eigen, damping: float) -> tuple[Eigen, Eigen]:
    """Drop eigen-directions whose shrinkage s / (s + lambda) is below `TRUNCATION` for every partner."""
    if not len(a.values) or not len(g.values):
        return a, g
    limit = TRUNCATION * damping
    return a.keep(a.values * g.values.max() > limit), g.keep(g.values * a.values.max() > limit)


def output_directions(
    outputs: torch.Tensor,
    distance: str,
    samples: int | None,
    generator: torch.Generator | list[torch.Generator],
    mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Directions v (each shaped like `outputs`) whose outer products sum to M per position: `samples` random ones
    scaled by 1 / sqrt(samples), or with `samples=None` all C of them (exact, for tests and small outputs).
    `generator`: one for the whole batch, or one per anchor (row of `outputs`), so that an anchor's directions do
    not depend on which batch or process it is drawn in."""
    outputs = outputs.detach().float()
    classes = outputs.shape[-1]
    generators = generator if isinstance(generator, list) else None
    if distance == "logits":
        if samples is None:
            eye = torch.eye(classes, device=outputs.device)
            directions = [eye[c].expand_as(outputs) for c in range(classes)]
        else:
            directions = []
            for _ in range(samples):
                if generators is None:
                    signs = torch.randint(0, 2, outputs.shape, generator=generator)
                else:
                    signs = torch.stack([torch.randint(0, 2, outputs.shape[1:], generator=g) for g in generators])
                directions.append((signs * 2.0 - 1.0).to(outputs.device))
    else:
        p = outputs.softmax(dim=-1)
        if samples is None:
            fisher = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
            values, vectors = torch.linalg.eigh(fisher)
            roots = vectors * values.clamp_min(0.0).sqrt()[..., None, :]
            directions = [roots[..., c] for c in range(classes)]
        else:
            flat = p.reshape(-1, classes).cpu()
            per_anchor = flat.reshape(outputs.shape[0], -1, classes)
            directions = []
            for _ in range(samples):
                if generators is None:
                    drawn = torch.multinomial(flat, 1, generator=generator).flatten()
                else:
                    pairs = zip(per_anchor, generators, strict=True)
                    drawn = torch.cat([torch.multinomial(q, 1, generator=g) for q, g in pairs]).flatten()
                one_hot = F.one_hot(drawn, classes).to(p.dtype).reshape(p.shape).to(p.device)
                directions.append(one_hot - p)
    if samples is not None:
        directions = [v / samples**0.5 for v in directions]
    if mask is not None and mask.shape == outputs.shape[:-1]:
        directions = [v * mask[..., None].to(v.device, v.dtype) for v in directions]
    return directions


class RowSelector:
    """Which rows of one anchor chunk the factors are estimated on, the same for A and G of every layer.

    Rows of a layer are its input positions: one per anchor for a plain MLP, one per token for a transformer, one
    per patch for a convolution. Positions the attention `mask` marks as padding are dropped (a padded position gets
    no gradient from the outputs, so its input would only dilute A). With `positions` set, `positions` x anchors
    rows are drawn at random among the rest, without replacement; G's rows are then weighted by kept / drawn so that
    G stays an unbiased estimate of the sum over all positions, and A, a mean over rows, needs no weight.
    """

    def __init__(self, mask: torch.Tensor | None, positions: int | None, generator: torch.Generator) -> None:
        self.mask = mask
        self.positions = positions
        self.generator = generator
        self.chosen: dict[tuple[int, int], tuple[torch.Tensor | None, float]] = {}
        self.on_device: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def select(self, num_rows: int, num_anchors: int) -> tuple[torch.Tensor | None, float]:
        """(index of the rows to keep or None for all, weight of a kept row in G) for a layer with `num_rows` rows
        over `num_anchors` anchors; every layer with the same row count gets the same rows."""
        key = (num_rows, num_anchors)
        if key not in self.chosen:
            index = None
            if self.mask is not None and self.mask.numel() == num_rows:
                index = torch.nonzero(self.mask.reshape(-1).cpu()).flatten()
                if index.numel() == num_rows:  # no padding
                    index = None
            available = num_rows if index is None else index.numel()
            drawn = available if self.positions is None else min(available, self.positions * num_anchors)
            weight = 1.0
            if drawn < available:
                order = torch.randperm(available, generator=self.generator)[:drawn].sort().values
                index = order if index is None else index[order]
                weight = available / drawn
            self.chosen[key] = (index, weight)
        return self.chosen[key]

    def rows(self, rows: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, float]:
        """The kept rows of `rows` (shaped (num_rows, ...)) and their weight in G. The index is copied to the rows'
        device once per row count, not once per layer (a copy from host memory waits for the device's queue)."""
        index, weight = self.select(rows.shape[0], num_anchors)
        if index is None:
            return rows, weight
        key = (rows.shape[0], num_anchors, rows.device)
        if key not in self.on_device:
            self.on_device[key] = index.to(rows.device)
        return rows[self.on_device[key]], weight


class KroneckerFactors:
    """Running K-FAC factors A and G of covered layers, gathered over one or more anchor chunks.

    Each `add` runs one forward pass on a chunk of anchors and one backward pass per output direction, so the
    memory held is that of one chunk whatever the number of anchors. Layers that read the same input tensor (the
    query, key and value projections of an attention block) share one A factor: gathered and decomposed once.
    """

    def __init__(self, layers: dict[str, CoveredLayer], diagonal_only: bool = False) -> None:
        self.layers = layers
        self.diagonal_only = diagonal_only
        self.inputs: dict[str, _Factor | _DiagonalFactor] = {}
        self.grads: dict[str, _Factor] = {}
        self.shares_input: dict[str, str] = {}
        self.eigen: dict[str, Eigen] = {}
        self.num_anchors = 0

    def add(
        self,
        forward: Callable[[], torch.Tensor],
        distance: str,
        samples: int | None,
        generator: torch.Generator,
        mask: torch.Tensor | None = None,
        positions: int | None = None,
        direction_generators: list[torch.Generator] | None = None,
    ) -> None:
        """Gather the factors of one chunk: `forward()` returns the model's output f on the chunk's anchors, `mask`
        their attention mask, `positions` the rows per anchor to estimate the factors on (`RowSelector`, drawn
        from `generator`). The output directions come from `direction_generators` (one per anchor) when given,
        else from `generator`."""
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        selector = RowSelector(mask, positions, generator)

        def hook_for(name: str, layer: CoveredLayer):
            def hook(module, args, output):
                x = args[0]
                key = (id(x), layer.bias is not None) if layer.kind == "linear" else (id(x), name)
                owner = seen.setdefault(key, (name, x))[0]
                outputs[name].append(output)
                if owner != name:
                    self.shares_input.setdefault(name, owner)
                if self.shares_input.get(name, name) != name:
                    return
                rows, _ = selector.rows(layer.input_rows(x.detach()), x.shape[0])
                if name not in self.inputs:
                    if layer.kind == "embedding":
                        self.inputs[name] = _DiagonalFactor(layer.module.get_base_layer().num_embeddings)
                    else:
                        self.inputs[name] = _Factor(rows.shape[1], self.diagonal_only)
                self.inputs[name].add(rows if layer.kind == "embedding" else rows.float())

            return hook

        handles = [layer.module.register_forward_hook(hook_for(name, layer)) for name, layer in self.layers.items()]
        try:
            with torch.enable_grad():
                model_output = forward()
        finally:
            for handle in handles:
                handle.remove()
        self.num_anchors += model_output.shape[0]
        names = [name for name in self.layers if outputs[name] and outputs[name][0].requires_grad]
        flat = [tensor for name in names for tensor in outputs[name]]
        for name in names:
            if name not in self.grads:
                dim = outputs[name][0].shape[1 if self.layers[name].kind == "conv2d" else -1]
                self.grads[name] = _Factor(dim, self.diagonal_only)
        directions = output_directions(model_output, distance, samples, direction_generators or generator, mask)
        for i, v in enumerate(directions):
            grads = torch.autograd.grad(
                model_output, flat, v.to(model_output.dtype), retain_graph=i + 1 < len(directions), allow_unused=True
            )
            position = 0
            for name in names:
                for _ in outputs[name]:
                    if grads[position] is not None:
                        rows, weight = selector.rows(
                            self.layers[name].output_rows(grads[position]), model_output.shape[0]
                        )
                        self.grads[name].add(rows.float() * weight**0.5 if weight != 1.0 else rows.float())
                    position += 1

    def all_reduce(self, device: torch.device) -> None:
        """Sum, in place on every process (each must call it at the same time), the factors each process gathered on
        its share of the anchors (`process_share`). Every process then holds the factors one
        process would have gathered from every share in turn (up to the order of the sums)."""
        self.num_anchors = int(_summed(torch.tensor([self.num_anchors], device=device)))
        for key in sorted(self.inputs):
            self.inputs[key].all_reduce(device)
        for key in sorted(self.grads):
            self.grads[key].all_reduce(device)

    def diagonals(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """diag(A) and diag(G) of every layer with factors (the diagonal of the metric A (x) G is their outer
        product)."""
        diagonals = {}
        for name, grads in self.grads.items():
            owner = self.shares_input.get(name, name)
            if grads.num_rows and owner in self.inputs:
                inputs = self.inputs[owner]
                diagonals[name] = (inputs.diagonal(float(inputs.num_rows)), grads.diagonal(float(self.num_anchors)))
        return diagonals

    def input_moments(self) -> dict[str, torch.Tensor]:
        """A = E[x x^T] per input row, dense, of every layer with factors (layers sharing an input share the
        tensor); embeddings, whose A is a diagonal of token counts, are left out."""
        moments: dict[str, torch.Tensor] = {}
        by_owner: dict[str, torch.Tensor] = {}
        for name, grads in self.grads.items():
            owner = self.shares_input.get(name, name)
            factor = self.inputs.get(owner)
            if grads.num_rows and isinstance(factor, _Factor):
                if owner not in by_owner:
                    by_owner[owner] = factor.dense(float(factor.num_rows))
                moments[name] = by_owner[owner]
        return moments

    def metric(self, damping: float, basis: dict[str, Eigen] | None = None) -> dict[str, LayerMetric]:
        """The damped eigen form of every layer's A (x) G; A = E[x x^T] per input row, G = sum over rows / anchors.

        `basis`: the `eigen` of an earlier refresh; factors keep their eigenbasis there and refresh only their
        eigenvalues (a partial basis only while it holds most of the new factor, see `_Factor.eigen`). The
        decompositions made here are left in `self.eigen` (before truncation)."""
        basis = basis or {}
        self.eigen = {}
        metric = {}
        for name, grads in self.grads.items():
            owner = self.shares_input.get(name, name)
            if not grads.num_rows or owner not in self.inputs:
                continue
            a_key, g_key = f"{owner}:input", f"{name}:output"
            if a_key not in self.eigen:
                factor = self.inputs[owner]
                self.eigen[a_key] = factor.eigen(float(factor.num_rows), basis.get(a_key))
            a = self.eigen[a_key]
            g = self.eigen[g_key] = grads.eigen(float(self.num_anchors), basis.get(g_key))
            lam = damping * (a.trace / a.dim) * (g.trace / g.dim)
            if lam <= 0:
                continue
            a, g = _truncate(a, g, lam)
            metric[name] = LayerMetric(a, g, lam)
        return metric


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of the default group, in place."""
    dist.all_reduce(tensor)
    return tensor


def process_share(count: int) -> range:
    """Which of `count` work items this process takes when they are split over the processes of the default group:
    a contiguous block (blocks in rank order). All of them outside a multi-process run, or when there are fewer
    items than processes."""
    if not (dist.is_available() and dist.is_initialized()) or not count >= dist.get_world_size() > 1:
        return range(count)
    world, rank = dist.get_world_size(), dist.get_rank()
    return range(count * rank // world, count * (rank + 1) // world)

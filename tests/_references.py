"""Exact, slow references the tests check the natural solver's math against (no library code uses them).

`kronecker_metric` gathers the K-FAC metric of a single forward pass; `gauss_newton_matvec` and `conjugate_gradient`
solve (g + damping I) x = rhs with the exact Gauss-Newton metric g = (1 / N) sum_n J_n^T J_n, matrix-free.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fip_peft.math.natural import CoveredLayer, KroneckerFactors, LayerMetric


def kronecker_metric(
    layers: dict[str, CoveredLayer],
    forward: Callable[[], torch.Tensor],
    distance: str,
    damping: float,
    samples: int | None,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> dict[str, LayerMetric]:
    """K-FAC factors A and G of every covered layer from one forward pass `forward()` on the anchors (returning the
    model's output f) and one backward pass per output direction, then their damped eigen form.

    `KroneckerFactors` does the same over several chunks of anchors (and `fip_peft.method.metric.gather_factors` over
    the processes of a distributed run).
    """
    factors = KroneckerFactors(layers)
    factors.add(forward, distance, samples, generator, mask)
    return factors.metric(damping)


# ---- exact reference: conjugate gradient on Gauss-Newton-vector products ----------------------------------------


def gauss_newton_matvec(
    outputs: torch.Tensor, params: list[torch.Tensor]
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """v -> g v with g = (1 / N) sum_n J_n^T J_n, J = d outputs / d params, by reverse mode only: J v is the
    derivative of u -> (J^T u) . v (double backward), then J^T (J v) is one more backward pass. Works where forward
    mode (`torch.func.jvp`) does not (SDPA attention, DDP/FSDP). The graph of `outputs` is kept between calls."""
    num_anchors = outputs.shape[0]
    u = torch.zeros_like(outputs, requires_grad=True)
    jt_u = torch.autograd.grad(outputs, params, u, create_graph=True)

    def matvec(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        (jv,) = torch.autograd.grad(jt_u, u, vector, retain_graph=True)
        return [g / num_anchors for g in torch.autograd.grad(outputs, params, jv, retain_graph=True)]

    return matvec


def conjugate_gradient(
    matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    rhs: list[torch.Tensor],
    damping: float,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> list[torch.Tensor]:
    """x with (g + damping I) x = rhs, by conjugate gradient on the products `matvec(v) = g v`."""

    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))

    x = [torch.zeros_like(r) for r in rhs]
    residual = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    rr = dot(residual, residual)
    stop = tol * float(rr)
    for _ in range(max_iter):
        if float(rr) <= stop:
            break
        product = [gv + damping * v for gv, v in zip(matvec(direction), direction, strict=True)]
        alpha = rr / dot(direction, product)
        x = [xi + alpha * di for xi, di in zip(x, direction, strict=True)]
        residual = [ri - alpha * pi for ri, pi in zip(residual, product, strict=True)]
        rr_new = dot(residual, residual)
        direction = [ri + (rr_new / rr) * di for ri, di in zip(residual, direction, strict=True)]
        rr = rr_new
    return x

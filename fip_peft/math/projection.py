"""The math of the projected FIP step (`solver="projection"`): the exact metric in output space.

The paper's metric on the anchors is g = J^T M J, J the Jacobian of the anchors' outputs with respect to the trained
parameters w (N anchors x C outputs rows) and M the distance's output metric (I for `logits`, the output Fisher
diag(p) - p p^T for the softmax distances). Writing M = B^T B and folding B into the rows, g = J^T J. A step u keeps
the outputs on the anchors to first order when J u = 0. Its closest such step, with a ridge lambda that lets
directions the anchors barely see move, is

    P u = u - J^T (J J^T + lambda I)^-1 J u,

the damped projection onto the null space of J: an (N C) x (N C) solve, however many parameters there are, with no
Kronecker approximation, exact for low-rank adapters too (J is with respect to whatever is trained). In the
eigenbasis of J^T J it shrinks a direction of eigenvalue s by lambda / (s + lambda), as the natural solver's
(g + lambda I)^-1 does, and leaves the rest of the parameter space untouched. lambda is `damping` x the mean
eigenvalue of J J^T (trace / rows), so one `damping` means the same on every model.

The projection keeps the outputs to first order only: over many steps the path curves away and the outputs drift by
second-order terms, which `"projection+penalty"` pulls back with the penalty's gradient.

Here J is held as one block per parameter, of shape (rows, *parameter.shape), and applied as J u = sum of the blocks'
inner products with u and J^T z = each block contracted with z: two matrix-vector products per step, the solve a
Cholesky factor of the rows x rows Gram matrix computed once per refresh.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OutputProjection:
    """The damped projection P = I - J^T (J J^T + lambda I)^-1 J for a Jacobian J given as per-parameter blocks.

    `blocks[i]` has shape (rows, *params[i].shape): row k of J restricted to parameter i. `damping` is lambda
    relative to the mean eigenvalue of J J^T.
    """

    def __init__(self, blocks: Sequence[torch.Tensor], damping: float) -> None:
        if not blocks:
            raise ValueError("OutputProjection needs at least one Jacobian block.")
        rows = blocks[0].shape[0]
        if any(block.shape[0] != rows for block in blocks):
            shapes = [tuple(block.shape) for block in blocks]
            raise ValueError(f"Every Jacobian block must have the same number of rows, got shapes {shapes}.")
        self.blocks = [block.reshape(rows, -1) for block in blocks]
        self.shapes = [block.shape[1:] for block in blocks]
        gram = torch.zeros(rows, rows, dtype=torch.float64, device=self.blocks[0].device)
        for block in self.blocks:  # products in the blocks' precision, summed over parameters in float64
            gram += (block @ block.T).double()
        trace = float(gram.diagonal().sum())
        self.lam = damping * trace / max(rows, 1) if trace > 0 else damping
        self.gram = gram
        eye = torch.eye(rows, dtype=gram.dtype, device=gram.device)
        self.factor = torch.linalg.cholesky(gram + self.lam * eye)

    @property
    def rows(self) -> int:
        return self.blocks[0].shape[0]

    def jvp(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """J u for u given per parameter (float64, shape (rows,))."""
        total = torch.zeros(self.rows, dtype=torch.float64, device=self.factor.device)
        for block, vector in zip(self.blocks, vectors, strict=True):
            total += (block @ vector.reshape(-1).to(block.dtype)).double()
        return total

    def vjp(self, z: torch.Tensor) -> list[torch.Tensor]:
        """J^T z, per parameter, in each block's dtype and shape."""
        return [
            (z.to(block.dtype) @ block).reshape(shape) for block, shape in zip(self.blocks, self.shapes, strict=True)
        ]

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """(J J^T + lambda I)^-1 rhs."""
        return torch.cholesky_solve(rhs.reshape(-1, 1).double(), self.factor).reshape(-1)

    def project_(self, vectors: Sequence[torch.Tensor]) -> None:
        """u <- P u in place (per-parameter tensors shaped like the blocks' parameters)."""
        z = self.solve(self.jvp(vectors))
        for vector, correction in zip(vectors, self.vjp(z), strict=True):
            vector.sub_(correction.to(vector.dtype))

"""The projected FIP step (`solver="projection"`): the anchors' Jacobian, the damped projection, and the step."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fip_peft
from fip_peft.math.projection import OutputProjection
from fip_peft.optimizers.projection import OutputProjector, jacobian_rows, output_directions
from tests._tasks import MLP, as_tokens, tiny_bert, train_plain


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], 40, 3e-3)


def projection_mlp(base: nn.Module, anchors: torch.Tensor, **config) -> nn.Module:
    settings = {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], "solver": "projection"} | config
    model = get_peft_model(copy.deepcopy(base), fip_peft.FIPConfig(**settings))
    model.remember(anchors)
    return model


def trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def dense_jacobian(model: nn.Module, params: list[torch.Tensor], inputs) -> torch.Tensor:
    """The Jacobian of every output coordinate on `inputs` w.r.t. `params`, one backward pass per coordinate."""
    model.eval()
    outputs = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs).logits
    rows = []
    for index in range(outputs.numel()):
        grads = torch.autograd.grad(outputs.flatten()[index], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
            )
        )
    return torch.stack(rows)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_jacobian_rows_are_the_jacobian_of_every_logit_on_the_anchors(digits, trained_mlp):
    anchors = digits["x_a_train"][:6]
    model = projection_mlp(trained_mlp, anchors, init_weights=False)
    params = trained(model)
    blocks, drift = jacobian_rows(model.base_model, "default", params, torch.arange(6), torch.Generator())
    expected = dense_jacobian(model, params, anchors)
    torch.testing.assert_close(torch.cat([b.reshape(b.shape[0], -1) for b in blocks], 1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(drift, torch.zeros_like(drift))  # nothing moved since `remember`


def test_projection_equals_the_dense_damped_solve(digits, trained_mlp):
    anchors = digits["x_a_train"][:6]
    model = projection_mlp(trained_mlp, anchors)
    params = trained(model)
    blocks, _ = jacobian_rows(model.base_model, "default", params, torch.arange(6), torch.Generator())
    projection = OutputProjection(blocks, damping=1e-2)
    jacobian = dense_jacobian(model, params, anchors).double()
    torch.manual_seed(1)
    update = [torch.randn_like(p) for p in params]
    u = flat(update).double()
    gram = jacobian @ jacobian.T
    lam = 1e-2 * gram.trace() / gram.shape[0]
    expected = u - jacobian.T @ torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), jacobian @ u
    )
    projection.project_(update)
    torch.testing.assert_close(flat(update).double(), expected, atol=1e-5, rtol=0)


def test_a_projected_step_moves_anchor_outputs_100x_less_than_an_unprojected_step_of_equal_length(digits, trained_mlp):
    anchors = digits["x_a_train"][:32]
    model = projection_mlp(trained_mlp, anchors, damping=1e-6)
    params = trained(model)
    blocks, _ = jacobian_rows(model.base_model, "default", params, torch.arange(32), torch.Generator())
    projection = OutputProjection(blocks, damping=1e-6)
    torch.manual_seed(2)
    raw = [torch.randn_like(p) for p in params]
    projected = [r.clone() for r in raw]
    projection.project_(projected)
    scale = 1e-3 / flat(projected).norm()
    raw_scale = 1e-3 / flat(raw).norm()
    model.eval()
    with torch.no_grad():
        before = model(anchors)
        changes = []
        for direction, factor in ((projected, scale), (raw, raw_scale)):
            for p, d in zip(params, direction, strict=True):
                p.add_(d, alpha=float(factor))
            changes.append(float((model(anchors) - before).norm()))
            for p, d in zip(params, direction, strict=True):
                p.sub_(d, alpha=float(factor))
    assert changes[0] * 100 <= changes[1]


def test_the_optimizer_update_is_projected_after_adamw(digits, trained_mlp):
    """The step is w_old + P (w_new - w_old): the outputs on the anchors of the Jacobian move far less than under
    the same AdamW step unprojected."""
    anchors = digits["x_a_train"][:20]
    changes = {}
    for solver in ("projection", "penalty"):
        model = projection_mlp(trained_mlp, anchors, solver=solver, metric_anchors=20, damping=1e-6, beta=1e9)
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
        model.eval()
        with torch.no_grad():
            before = model(anchors)
        loss = nn.functional.cross_entropy(model(digits["x_b_train"][:64]), digits["y_b_train"][:64])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            changes[solver] = float((model(anchors) - before).norm())
    assert changes["projection"] * 20 <= changes["penalty"]


def test_a_jacobian_too_large_for_memory_is_refused_before_any_step(digits, trained_mlp, monkeypatch):
    import fip_peft.optimizers.projection as glue

    monkeypatch.setattr(glue, "MAX_JACOBIAN_BYTES", 10_000)
    model = projection_mlp(trained_mlp, digits["x_a_train"][:16], metric_anchors=16)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    before = [p.detach().clone() for p in trained(model)]
    loss = nn.functional.cross_entropy(model(digits["x_b_train"][:32]), digits["y_b_train"][:32])
    loss.backward()
    with pytest.raises(ValueError, match="metric_anchors=1 or fewer"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, trained(model), strict=True))


def test_jacobian_rows_of_padded_token_anchors_equal_those_of_the_unpadded_anchor(digits):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", solver="projection"))
    tokens = as_tokens(digits["x_a_train"][:2])
    short = {"input_ids": tokens["input_ids"][:1, :20], "attention_mask": tokens["attention_mask"][:1, :20]}
    padded = {
        "input_ids": torch.cat(
            [tokens["input_ids"][1:], torch.cat([short["input_ids"], torch.zeros(1, 45).long()], 1)]
        ),
        "attention_mask": torch.cat(
            [tokens["attention_mask"][1:], torch.cat([short["attention_mask"], torch.zeros(1, 45).long()], 1)]
        ),
    }
    model.remember(padded)
    params = trained(model)
    blocks, _ = jacobian_rows(model.base_model, "default", params, torch.tensor([1]), torch.Generator())
    expected = dense_jacobian(model, params, short)
    torch.testing.assert_close(torch.cat([b.reshape(b.shape[0], -1) for b in blocks], 1), expected, atol=1e-5, rtol=0)


def test_softmax_distances_take_rows_of_the_output_fisher():
    outputs = torch.tensor([[2.0, 0.5, -1.0]])
    directions, _ = output_directions(outputs, outputs, "kl", None, 1, torch.Generator())
    rows = directions.reshape(3, 3)
    p = outputs.softmax(-1)[0]
    torch.testing.assert_close(rows.T @ rows, torch.diag(p) - torch.outer(p, p), atol=1e-6, rtol=0)


def test_an_anchor_with_many_outputs_gives_metric_samples_sketched_rows():
    outputs = torch.randn(1, 30, 8)  # 240 outputs > EXACT_OUTPUTS
    directions, _ = output_directions(outputs, outputs, "logits", torch.ones(1, 30), 3, torch.Generator())
    assert directions.shape == (3, 1, 30, 8)


def test_projection_works_for_a_low_rank_adapter(digits, trained_mlp):
    model = projection_mlp(trained_mlp, digits["x_a_train"][:16], rank=4, metric_anchors=16)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    loss = nn.functional.cross_entropy(model(digits["x_b_train"][:32]), digits["y_b_train"][:32])
    loss.backward()
    optimizer.step()
    projector = optimizer._fip_preconditioner
    assert isinstance(projector, OutputProjector)
    assert projector.projection.rows == 16 * 10
    assert sum(p.numel() for p in projector.params) == sum(p.numel() for p in trained(model))


def test_the_jacobian_is_refreshed_every_metric_update_interval_steps(digits, trained_mlp):
    model = projection_mlp(trained_mlp, digits["x_a_train"][:16], metric_anchors=8, metric_update_interval=3)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=1e-3)
    refreshes = []
    for _ in range(7):
        loss = nn.functional.cross_entropy(model(digits["x_b_train"][:32]), digits["y_b_train"][:32])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        refreshes.append(optimizer._fip_preconditioner.refreshes)
    assert refreshes == [1, 1, 1, 2, 2, 2, 3]


def test_a_projected_run_gives_the_same_weights_with_one_or_two_threads(digits, trained_mlp):
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model = projection_mlp(
                trained_mlp, digits["x_a_train"][:32], solver="projection+penalty", metric_anchors=16
            )
            optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
            generator = torch.Generator().manual_seed(0)
            for _ in range(12):
                index = torch.randint(0, len(digits["y_b_train"]), (32,), generator=generator)
                loss = nn.functional.cross_entropy(model(digits["x_b_train"][index]), digits["y_b_train"][index])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            results.append(flat(trained(model)).detach())
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("solver", ["projection", "projection+penalty"])
def test_projection_solvers_refuse_epsilon_naming_the_field(solver):
    with pytest.raises(ValueError, match="epsilon"):
        fip_peft.FIPConfig(solver=solver, epsilon=0.1)


def test_damping_resolves_per_solver_unless_given():
    from fip_peft.method.config import DEFAULT_DAMPING_NATURAL, DEFAULT_DAMPING_PROJECTION

    assert fip_peft.FIPConfig(solver="projection+penalty").damping == DEFAULT_DAMPING_PROJECTION
    assert fip_peft.FIPConfig(solver="natural").damping == DEFAULT_DAMPING_NATURAL
    assert fip_peft.FIPConfig(solver="projection", damping=0.5).damping == 0.5

"""The metric-preconditioned FIP step (`solver="natural"`): its metric, its solve, and what the step does."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fip_peft
from fip_peft.math.natural import KroneckerFactors, RowSelector, _Factor, output_directions
from fip_peft.method.metric import covered_layers
from fip_peft.optimizers.preconditioner import MetricPreconditioner
from tests._references import conjugate_gradient, gauss_newton_matvec, kronecker_metric
from tests._tasks import MLP, train_plain


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], 40, 3e-3)


class DeepLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def natural_mlp(base: nn.Module, anchors: torch.Tensor, **config) -> nn.Module:
    model = get_peft_model(
        copy.deepcopy(base),
        fip_peft.FIPConfig(target_modules=["fc1", "fc2"], modules_to_save=["head"], solver="natural", **config),
    )
    model.remember(anchors)
    return model


def exact_metric(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(1 / N) sum_n J_n^T J_n, J_n the Jacobian of the outputs on anchor n w.r.t. `params`, by one backward pass per
    output coordinate."""
    outputs = model(x)
    rows = []
    for index in range(outputs.numel()):
        grads = torch.autograd.grad(outputs.flatten()[index], params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows)
    return jacobian.t() @ jacobian / x.shape[0]


def test_kronecker_metric_equals_the_exact_gauss_newton_metric_on_a_linear_model():
    torch.manual_seed(0)
    model = get_peft_model(DeepLinear(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], solver="natural"))
    model.eval()
    x = torch.randn(32, 6)
    layers = covered_layers(model.base_model, "default")
    metric = kronecker_metric(layers, lambda: model(x), "logits", 0.1, None, torch.Generator())
    for name, layer in layers.items():
        exact = exact_metric(model, [layer.weight], x)
        assert torch.allclose(metric[name].kronecker(), exact, atol=1e-5), name


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_metric(samples: int | None, seed: int = 0):
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], solver="natural"))
    model.eval()
    x = torch.randn(48, 6)
    layers = covered_layers(model.base_model, "default")
    return kronecker_metric(layers, lambda: model(x), "logits", 0.1, samples, torch.Generator().manual_seed(seed))


def test_sampled_output_directions_estimate_the_metric_of_all_directions():
    exact, sampled = tiny_metric(None), tiny_metric(256)
    for name, layer_metric in exact.items():
        error = (sampled[name].kronecker() - layer_metric.kronecker()).norm() / layer_metric.kronecker().norm()
        assert error < 0.1, name


def test_preconditioner_is_the_damped_inverse_of_the_kronecker_metric():
    for name, layer_metric in tiny_metric(1).items():
        u = torch.randn(layer_metric.g.dim, layer_metric.a.dim, generator=torch.Generator().manual_seed(1))
        dense = layer_metric.kronecker().double() + layer_metric.damping * torch.eye(u.numel(), dtype=torch.float64)
        expected = layer_metric.damping * torch.linalg.solve(dense, u.flatten().double())
        assert torch.allclose(layer_metric.project(u).flatten().double(), expected, atol=1e-5), name


def test_metric_gathered_in_chunks_of_anchors_equals_the_metric_of_one_pass():
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], solver="natural"))
    model.eval()
    x = torch.randn(48, 6)
    layers = covered_layers(model.base_model, "default")
    whole = kronecker_metric(layers, lambda: model(x), "logits", 0.1, None, torch.Generator())
    factors = KroneckerFactors(layers)
    for chunk in x.split(16):
        factors.add(lambda chunk=chunk: model(chunk), "logits", None, torch.Generator())
    chunked = factors.metric(0.1)
    for name, layer_metric in whole.items():
        assert torch.allclose(chunked[name].kronecker(), layer_metric.kronecker(), atol=1e-5), name
        assert chunked[name].damping == pytest.approx(layer_metric.damping)


class SharedInput(nn.Module):
    """Two projections of the same input, like the query and key of an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(6, 4)
        self.key = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.query(x)) * self.key(x)


def test_layers_reading_the_same_input_share_one_input_factor_with_the_same_metric():
    torch.manual_seed(0)
    model = get_peft_model(SharedInput(), fip_peft.FIPConfig(target_modules=["query", "key"], solver="natural"))
    model.eval()
    x = torch.randn(32, 6)
    layers = covered_layers(model.base_model, "default")
    factors = KroneckerFactors(layers)
    factors.add(lambda: model(x), "logits", None, torch.Generator())
    together = factors.metric(0.1)
    assert len(factors.inputs) == 1 and len(factors.shares_input) == 1
    for name, layer in layers.items():
        alone = kronecker_metric({name: layer}, lambda: model(x), "logits", 0.1, None, torch.Generator())
        assert torch.allclose(together[name].kronecker(), alone[name].kronecker(), atol=1e-5), name


def test_masked_output_directions_follow_the_outputs_device():
    # the anchors' attention mask stays where the memory is (CPU) while the model runs on a GPU
    outputs = torch.randn(2, 3, 4, device="meta")
    directions = output_directions(outputs, "logits", 1, torch.Generator(), torch.ones(2, 3))
    assert all(v.device == outputs.device and v.shape == outputs.shape for v in directions)


def test_conjugate_gradient_on_gauss_newton_products_matches_a_dense_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = list(model.parameters())
    x = torch.randn(10, 4)
    rhs = [torch.randn_like(p) for p in params]
    dense = exact_metric(model, params, x) + 0.1 * torch.eye(sum(p.numel() for p in params))
    expected = torch.linalg.solve(dense, torch.cat([r.flatten() for r in rhs]))
    solved = conjugate_gradient(gauss_newton_matvec(model(x), params), rhs, damping=0.1, max_iter=200, tol=1e-12)
    assert torch.allclose(torch.cat([s.flatten() for s in solved]), expected, atol=1e-4)


def anchor_change(model: nn.Module, step, anchors: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        before = model(anchors)
        step()
        return float((model(anchors) - before).pow(2).sum(-1).mean())


def test_natural_step_moves_anchor_outputs_10x_less_than_a_plain_step_of_equal_length(digits, trained_mlp):
    anchors = digits["x_a_train"]
    model = natural_mlp(trained_mlp, anchors, epsilon=1e-3)
    plain = copy.deepcopy(model)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=1.0)
    params = [p for p in plain.parameters() if p.requires_grad]
    for m in (model, plain):
        m.train()
        x, y = digits["x_b_train"][:64], digits["y_b_train"][:64]
        nn.functional.cross_entropy(m(x), y).backward()
    grad_norm = torch.cat([p.grad.flatten() for p in params]).norm()

    def plain_step():
        for p in params:
            p.add_(p.grad, alpha=-1e-3 / float(grad_norm))

    natural_change = anchor_change(model, optimizer.step, anchors)
    plain_change = anchor_change(plain, plain_step, anchors)
    moved = torch.cat([(a - b).flatten() for a, b in zip(model.parameters(), plain.parameters(), strict=True)])
    assert natural_change * 10 <= plain_change
    assert moved.norm() > 0


def test_epsilon_step_has_length_epsilon_on_the_covered_parameters(digits, trained_mlp):
    model = natural_mlp(trained_mlp, digits["x_a_train"], epsilon=1e-3)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(digits["x_b_train"][:32]), digits["y_b_train"][:32]).backward()
    optimizer.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    step = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])
    assert step.norm() == pytest.approx(1e-3, rel=1e-3)


def test_metric_is_refreshed_every_metric_update_interval_steps(digits, trained_mlp):
    model = natural_mlp(trained_mlp, digits["x_a_train"], metric_update_interval=4)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    model.train()
    for _ in range(9):
        nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(model.base_model.memory().sample_step) == 3  # steps 1, 5, 9 draw anchors; the others reuse them


def test_eigenbasis_is_recomputed_every_metric_basis_interval_refreshes(digits, trained_mlp):
    model = natural_mlp(trained_mlp, digits["x_a_train"], metric_update_interval=1, metric_basis_interval=2)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    model.train()
    bases, values = [], []
    for _ in range(3):
        nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
        optimizer.step()
        optimizer.zero_grad()
        bases.append(optimizer._fip_preconditioner.basis["fc1:output"].vectors)
        values.append(optimizer._fip_preconditioner.basis["fc1:output"].values)
    assert bases[1] is bases[0] and not torch.equal(values[1], values[0])
    assert bases[2] is not bases[1]


def test_a_refresh_on_non_finite_outputs_keeps_the_previous_metric(digits, trained_mlp):
    model = natural_mlp(trained_mlp, digits["x_a_train"])
    preconditioner = MetricPreconditioner(model.base_model, "default")
    preconditioner.refresh()
    kept = preconditioner.metric
    with torch.no_grad():
        model.base_model.model.fc2.base_layer.weight[0, 0] = float("nan")
    preconditioner.refresh()
    assert preconditioner.metric is kept
    assert preconditioner.refreshes == 1


def test_eigenvalues_in_a_kept_basis_are_the_diagonal_of_the_new_factor_in_that_basis():
    torch.manual_seed(0)
    old, new = _Factor(5), _Factor(5)
    old.add(torch.randn(20, 5))
    new.add(torch.randn(20, 5))
    basis = old.eigen(20.0)
    refreshed = new.eigen(20.0, basis)
    assert torch.allclose(old.eigen(20.0, basis).values, basis.values, atol=1e-5)
    expected = torch.diagonal(basis.vectors.t() @ (new.sum / 20.0) @ basis.vectors)
    assert torch.allclose(refreshed.values, expected, atol=1e-5)
    assert refreshed.trace == pytest.approx(float(torch.trace(new.sum / 20.0)), rel=1e-5)


def _few_rows(subspace: torch.Tensor, count: int, seed: int) -> _Factor:
    """A 10-wide factor seen on `count` rows (fewer than its width: the Gram path) drawn from `subspace`."""
    factor = _Factor(10)
    factor.add(torch.randn(count, subspace.shape[0], generator=torch.Generator().manual_seed(seed)) @ subspace)
    return factor


def test_a_partial_eigenbasis_is_kept_while_it_holds_the_new_factor():
    subspace = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))[0].t()
    basis = _few_rows(subspace, 4, seed=1).eigen(4.0)
    new = _few_rows(subspace, 4, seed=2)
    refreshed = new.eigen(4.0, basis)
    dense = new.eigen(4.0).matrix()
    assert refreshed.vectors is basis.vectors
    assert torch.allclose(refreshed.values, torch.diagonal(basis.vectors.t() @ dense @ basis.vectors), atol=1e-5)
    assert refreshed.trace == pytest.approx(float(torch.trace(dense)), rel=1e-5)


def test_a_partial_eigenbasis_that_misses_the_new_factor_is_recomputed():
    generator = torch.Generator().manual_seed(0)
    space = torch.linalg.qr(torch.randn(10, 6, generator=generator))[0].t()
    basis = _few_rows(space[:3], 4, seed=1).eigen(4.0)
    new = _few_rows(space[3:], 4, seed=2)
    refreshed = new.eigen(4.0, basis)
    assert refreshed.vectors is not basis.vectors
    assert torch.allclose(refreshed.matrix(), new.eigen(4.0).matrix(), atol=1e-5)


def test_natural_plus_penalty_keeps_task_a_better_than_the_penalty_solver_alone(digits, trained_mlp):
    anchors = digits["x_a_train"]
    changes = {}
    for solver in ("penalty", "natural+penalty"):
        model = get_peft_model(
            copy.deepcopy(trained_mlp),
            fip_peft.FIPConfig(target_modules=["fc1", "fc2"], modules_to_save=["head"], solver=solver, beta=0.4),
        )
        model.remember(anchors)
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=2e-3)

        def train(model=model, optimizer=optimizer):
            with torch.enable_grad():
                for start in range(0, 320, 32):
                    model.train()
                    x, y = digits["x_b_train"][start : start + 32], digits["y_b_train"][start : start + 32]
                    nn.functional.cross_entropy(model(x), y).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                model.eval()

        changes[solver] = anchor_change(model, train, anchors)
    assert changes["natural+penalty"] < changes["penalty"]


def test_natural_solver_preconditions_conv2d_and_embedding_layers():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
            self.head = nn.Linear(8 + 4 * 16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ids, pixels = x[:, :5].long(), x[:, 5:].reshape(-1, 1, 4, 4)
            features = torch.cat([self.embed(ids).mean(1), torch.relu(self.conv(pixels)).flatten(1)], dim=1)
            return self.head(features)

    torch.manual_seed(0)
    x = torch.cat([torch.randint(0, 10, (64, 5)).float(), torch.randn(64, 16)], dim=1)
    model = get_peft_model(Mixed(), fip_peft.FIPConfig(target_modules=["embed", "conv"], solver="natural"))
    model.remember(x)
    layers = covered_layers(model.base_model, "default")
    assert {layer.kind for layer in layers.values()} == {"embedding", "conv2d"}
    model.eval()
    metric = kronecker_metric(layers, lambda: model(x), "logits", 0.1, 1, torch.Generator().manual_seed(0))
    assert set(metric) == set(layers)
    # tokens 10..19 never occur among the anchors: their embedding rows move freely
    embed = metric["embed"]
    u = torch.randn(embed.g.dim, embed.a.dim)
    assert torch.equal(embed.project(u)[:, 10:], u[:, 10:])
    assert (embed.project(u)[:, :10] - u[:, :10]).abs().max() > 0


def test_metric_spectrum_gives_the_top_k_eigenvalues_of_each_layer(digits, trained_mlp):
    model = natural_mlp(trained_mlp, digits["x_a_train"])
    spectrum = model.metric_spectrum(5)
    assert set(spectrum) == {"fc1", "fc2", "head.modules_to_save.default"}
    for values in spectrum.values():
        assert values.shape == (5,)
        assert (values[:-1] >= values[1:]).all() and (values >= 0).all()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"solver": "newton"}, "solver"),
        ({"solver": "natural", "rank": 4}, "rank"),
        ({"solver": "natural", "damping": 0.0}, "damping"),
        ({"solver": "natural", "epsilon": -1.0}, "epsilon"),
        ({"solver": "penalty", "epsilon": 1e-3}, "epsilon"),
        ({"solver": "natural", "metric_update_interval": 0}, "metric_update_interval"),
        ({"solver": "natural", "metric_anchors": 0}, "metric_anchors"),
        ({"solver": "natural", "metric_batch_size": 0}, "metric_batch_size"),
        ({"solver": "natural", "metric_samples": 1.5}, "metric_samples"),
        ({"solver": "natural", "metric_positions": 0}, "metric_positions"),
    ],
)
def test_invalid_natural_solver_settings_raise_naming_the_field(config, field):
    with pytest.raises((ValueError, TypeError), match=f"FIPConfig.{field}"):
        fip_peft.FIPConfig(target_modules=["fc1"], **config)


def test_natural_plus_penalty_default_beta_is_the_natural_default():
    from fip_peft.method.config import DEFAULT_BETA_NATURAL

    assert fip_peft.FIPConfig(solver="natural+penalty").beta == DEFAULT_BETA_NATURAL


def test_grouped_convolution_is_refused_with_the_solver_named():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    peft_model = get_peft_model(model, fip_peft.FIPConfig(target_modules=["0"], solver="natural"))
    with pytest.raises(ValueError, match="solver='natural'"):
        covered_layers(peft_model.base_model, "default")


def test_fip_trainer_takes_natural_plus_penalty_steps_on_a_transformer(digits, tmp_path):
    from tests._tasks import as_tokens, tiny_bert
    from tests.test_training import token_dataset, trainer_args

    model = get_peft_model(
        tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=32, solver="natural+penalty")
    )
    model.remember(as_tokens(digits["x_a_train"]))
    trainer = fip_peft.FIPTrainer(
        model=model,
        args=trainer_args(tmp_path, steps=2),
        train_dataset=token_dataset(digits["x_b_train"], digits["y_b_train"]),
    )
    trainer.train()
    preconditioner = trainer.optimizer.optimizer._fip_preconditioner
    assert preconditioner.steps == 2
    assert "bert.encoder.layer.0.attention.self.query" in preconditioner.metric
    assert any("classifier" in name for name in preconditioner.metric)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("fip_distance" in entry for entry in logged)


def test_metric_batch_size_sets_the_passes_of_a_refresh_not_the_metric(digits, trained_mlp):
    spectra, passes = [], []
    for batch_size in (None, 64):
        model = natural_mlp(trained_mlp, digits["x_a_train"], anchor_batch_size=16, metric_anchors=64)
        fc1 = model.base_model.model.fc1
        passes.append(0)
        handle = fc1.register_forward_hook(lambda *_: passes.__setitem__(-1, passes[-1] + 1))
        model.peft_config["default"].metric_batch_size = batch_size
        spectra.append(model.metric_spectrum(8))
        handle.remove()
    assert passes == [4, 1]
    for name, values in spectra[0].items():
        assert torch.allclose(spectra[1][name], values, rtol=1e-4, atol=1e-6), name


class TokenClassifier(nn.Module):
    """Embeddings, one per-token linear layer, masked mean pooling and a head: a transformer's row structure."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.fc1 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.fc1(self.embed(input_ids)))
        mask = attention_mask[..., None].float()
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def padded_tokens(num_anchors: int = 12, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (num_anchors, length), generator=generator)
    lengths = torch.randint(3, length + 1, (num_anchors,), generator=generator)
    return {"input_ids": ids, "attention_mask": (torch.arange(length)[None, :] < lengths[:, None]).long()}


def token_model() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TokenClassifier(), fip_peft.FIPConfig(target_modules=["fc1"], solver="natural"))
    return model.eval()


def token_factors(positions: int | None, seed: int = 0, model: nn.Module | None = None) -> KroneckerFactors:
    model = model or token_model()
    inputs = padded_tokens()
    factors = KroneckerFactors(covered_layers(model.base_model, "default"))
    factors.add(
        lambda: model(**inputs),
        "logits",
        None,
        torch.Generator().manual_seed(seed),
        inputs["attention_mask"],
        positions,
    )
    return factors


def factor_matrices(factors: KroneckerFactors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, grads = factors.inputs[name], factors.grads[name]
    return inputs.eigen(float(inputs.num_rows)).matrix(), grads.eigen(float(factors.num_anchors)).matrix()


def test_padding_positions_are_left_out_of_the_input_factor():
    model = token_model()
    factors = token_factors(None, model=model)
    inputs = padded_tokens()
    embedded = model.base_model.model.embed(inputs["input_ids"]).detach()
    kept = embedded[inputs["attention_mask"].bool()]
    a, _ = factor_matrices(factors, "fc1")
    assert factors.inputs["fc1"].num_rows == int(inputs["attention_mask"].sum())
    assert torch.allclose(a, kept.t() @ kept / kept.shape[0], atol=1e-5)


def test_a_mask_without_padding_keeps_every_row_without_an_index():
    selector = RowSelector(torch.ones(3, 4), None, torch.Generator().manual_seed(0))
    rows = torch.randn(12, 5)
    assert selector.select(12, 3) == (None, 1.0)
    kept, weight = selector.rows(rows, 3)
    assert kept is rows and weight == 1.0


def test_sampled_positions_estimate_the_factors_of_every_position():
    model = token_model()
    full_a, full_g = factor_matrices(token_factors(None, model=model), "fc1")
    draws = [factor_matrices(token_factors(2, seed, model), "fc1") for seed in range(200)]
    mean_a = torch.stack([a for a, _ in draws]).mean(0)
    mean_g = torch.stack([g for _, g in draws]).mean(0)
    # one draw of 2 positions per anchor is 40% (A) and 20% (G) off; the mean of 200 draws about 3%
    assert (mean_a - full_a).norm() / full_a.norm() < 0.06
    assert (mean_g - full_g).norm() / full_g.norm() < 0.06


def test_metric_positions_sets_the_rows_per_anchor_of_the_factors():
    factors = token_factors(2)
    assert factors.inputs["fc1"].num_rows == 2 * 12
    assert factors.grads["fc1"].num_rows == 2 * 12 * 3  # one backward pass per output class (samples=None)


def test_more_positions_than_the_sequence_gives_the_metric_of_every_position():
    every, sampled = token_factors(None).metric(0.1), token_factors(10).metric(0.1)
    for name, layer_metric in every.items():
        assert torch.allclose(sampled[name].kronecker(), layer_metric.kronecker(), atol=1e-6), name


def test_all_zero_rows_count_toward_the_mean_but_are_not_decomposed():
    # positions no output depends on (every token but [CLS] in a BERT's last layer) have all-zero gradient rows
    rows = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    factor = _Factor(8)
    factor.add(torch.cat([rows, torch.zeros(5, 8)]))
    assert factor.num_rows == 8 and sum(len(kept) for kept in factor.rows) == 3
    assert torch.allclose(factor.eigen(8.0).matrix(), rows.t() @ rows / 8.0, atol=1e-5)


def test_a_factor_of_only_zero_rows_has_no_eigen_directions():
    factor = _Factor(4)
    factor.add(torch.zeros(2, 4))
    eigen = factor.eigen(2.0)
    assert eigen.values.numel() == 0 and eigen.trace == 0.0
    assert torch.equal(eigen.matrix(), torch.zeros(4, 4))


@pytest.mark.parametrize("positions", [None, 4])
def test_metric_positions_sets_the_rows_of_a_refresh_on_a_transformer(digits, positions):
    from fip_peft.method.metric import gather_factors
    from tests._tasks import as_tokens, tiny_bert

    config = fip_peft.FIPConfig(task_type="SEQ_CLS", solver="natural", anchor_budget=32, metric_positions=positions)
    model = get_peft_model(tiny_bert(), config)
    anchors = as_tokens(digits["x_a_train"][:32])
    model.remember(anchors)
    fip_model = model.base_model
    factors = gather_factors(fip_model, "default", covered_layers(fip_model, "default"), torch.arange(32), 0)
    tokens = anchors["input_ids"].shape[1]
    expected = 32 * (tokens if positions is None else positions)
    assert factors.inputs["bert.encoder.layer.0.attention.self.query"].num_rows == expected

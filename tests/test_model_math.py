"""The model is correct to the math: flow Jacobians, KL, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from cvae_model.config import ModelConfig, TrainConfig, default_cells_encoder
from cvae_model.flows import IAF
from cvae_model.losses import analytic_gaussian_kl, monte_carlo_kl
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE


@pytest.fixture(autouse=True)
def float64() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _flow_with_random_weights(flow_length: int, dim_latent: int, seed: int = 0) -> IAF:
    torch.manual_seed(seed)
    flow = IAF(flow_length, dim_latent, dim_encoder_hidden=7, cells_hidden=5,
               initializer="orthogonal", s_offset=1.0)
    with torch.no_grad():  # biases start at 0.001; randomize them so nothing is trivially zero
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("flow_length", [0, 1, 5])
@pytest.mark.parametrize("dim_latent", [1, 2, 16])
def test_flow_log_det_equals_slogdet_of_autograd_jacobian(flow_length: int, dim_latent: int) -> None:
    flow = _flow_with_random_weights(flow_length, dim_latent)
    hidden = torch.randn(1, 7)
    for _ in range(3):
        z0 = torch.randn(1, dim_latent)
        _, log_det = flow(z0, hidden)
        jac = torch.autograd.functional.jacobian(lambda z: flow(z[None], hidden)[0][0], z0[0])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        torch.testing.assert_close(log_det[0], logabs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim_latent", [2, 5, 16])
def test_each_iaf_step_is_autoregressive(dim_latent: int) -> None:
    """dz'_j/dz_i = 0 for i > j within a step (strictly upper entries zero, diagonal sigma)."""
    flow = _flow_with_random_weights(1, dim_latent, seed=3)
    step = flow.steps[0]
    hidden = torch.randn(1, 7)
    z0 = torch.randn(dim_latent)
    jac = torch.autograd.functional.jacobian(lambda z: step(z[None], hidden)[0][0], z0)
    upper = torch.triu(jac, diagonal=1)
    assert torch.count_nonzero(upper) == 0
    # ... and every allowed dependency is actually used (the net is not trivially diagonal).
    lower = torch.tril(jac, diagonal=-1)
    assert torch.count_nonzero(lower) == dim_latent * (dim_latent - 1) // 2
    assert (torch.diagonal(jac) > 0).all() and (torch.diagonal(jac) < 1).all()


def test_flow_reverses_order_between_steps() -> None:
    """Two steps: the second step's autoregressive order is the reverse of the first's."""
    flow = _flow_with_random_weights(2, 4, seed=1)
    hidden = torch.randn(1, 7)
    z0 = torch.randn(4)
    z1 = flow.steps[0](z0[None], hidden)[0].flip(-1)[0]
    jac2 = torch.autograd.functional.jacobian(
        lambda z: flow.steps[1](z[None], hidden)[0][0], z1)
    assert torch.count_nonzero(torch.triu(jac2, diagonal=1)) == 0


def test_monte_carlo_kl_matches_analytic_without_flow() -> None:
    torch.manual_seed(0)
    mu = torch.randn(4, 3)
    log_var = 0.5 * torch.randn(4, 3)
    n = 200_000
    eps = torch.randn(n, 4, 3)
    z = mu + torch.exp(0.5 * log_var) * eps
    mc = monte_carlo_kl(eps, log_var.expand_as(eps), z, torch.zeros(n, 4)).mean(dim=0)
    analytic = analytic_gaussian_kl(mu, log_var)
    torch.testing.assert_close(mc, analytic, rtol=0.0, atol=0.02)


def test_vae_loss_uses_mc_kl_of_the_flow_output() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=6, dim_latent=2, iaf_flow_length=0))
    x = torch.randn(50_000, 6)
    out = model(x)
    # Without a flow z = z0, and the MC KL averages to the analytic one.
    torch.testing.assert_close(out.kl.mean(), analytic_gaussian_kl(out.mu, out.log_var).mean(),
                               rtol=0.02, atol=0.01)


@pytest.mark.parametrize(("dims", "expected"), [
    ((784, 2), (512, 128)), ((64, 2), (64, 32)), ((784, 16), (512, 256)), ((300, 2), (256, 64)),
    ((784, 64), (512, 512)), ((8, 2), (8, 16)), ((3, 2), (2, 1)),
])
def test_default_cells_encoder_reproduces_the_original_rule(dims: tuple[int, int],
                                                            expected: tuple[int, int]) -> None:
    cells, hidden = default_cells_encoder(*dims)
    assert cells == expected
    assert hidden == min(expected[-1], 64)
    assert ModelConfig(dim_feature=dims[0], dim_latent=dims[1]).cells_encoder == expected


def test_default_mnist_model_has_the_originals_parameter_count_layout() -> None:
    model = VAE(ModelConfig(dim_feature=784, dim_latent=2))
    # Encoder 784-512-128, mu/logvar hidden 128->128 split 64|64, heads 64->2, decoder 2-128-512-784.
    assert model.config.cells_encoder == (512, 128) and model.config.cells_hidden == 64
    shapes = [tuple(layer.weight.shape) for layer in model.encoder_layers]
    assert shapes == [(512, 784), (128, 512)]
    assert tuple(model.posterior_hidden.weight.shape) == (128, 128)
    assert len(model.flow.steps) == 5


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8)))
    model(torch.randn(32, 10), keep_prob=0.75).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


def test_train_step_changes_weights_and_eval_does_not() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=2, cells_encoder=(16, 8)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 10)
    with torch.no_grad():
        model.eval()
        model(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    optimizer = make_optimizer(model, TrainConfig())
    result = train_step(model, optimizer, x, keep_prob=0.75, grad_clip_norm=100.0)
    assert result.applied
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert set(changed) == {k for k, _ in model.named_parameters()}


def test_nonfinite_gradient_skips_the_step() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=4, dim_latent=2, cells_encoder=(8, 4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randn(8, 4)
    x[0, 0] = float("inf")
    result = train_step(model, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0)
    assert not result.applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_embed_is_deterministic_and_mode_independent() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=2, cells_encoder=(16, 8)))
    x = torch.randn(20, 10)
    model.train()
    a = model.embed(x)
    b = model.embed(x)
    model.eval()
    c = model.embed(x)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_log_variance_is_bounded() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=4, dim_latent=2, cells_encoder=(8, 4), log_var_bound=10.0))
    post = model.encode(1e6 * torch.randn(16, 4))
    assert post.log_var.abs().max() <= 10.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dim_latent": 0}, r"'dim_latent' parameter of CompressionVAE must be an int in the range \[1"),
    ({"iaf_flow_length": -1}, r"'iaf_flow_length' parameter .* Got -1 instead"),
    ({"initializer": "glorot"}, r"'initializer' parameter .* one of \['orthogonal'"),
    ({"cells_encoder": (16, 0)}, r"'cells_encoder' parameter"),
])
def test_bad_model_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(dim_feature=4, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("initializer", ["orthogonal", "truncated_normal", "lecun_normal"])
def test_initializers_give_finite_distinct_weights(initializer: str) -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=12, dim_latent=2, initializer=initializer))  # type: ignore[arg-type]
    w = model.encoder_layers[0].weight
    assert torch.isfinite(w).all() and w.std() > 0
    assert torch.allclose(model.encoder_layers[0].bias, torch.full_like(model.encoder_layers[0].bias, 0.001))
    if initializer == "truncated_normal":
        assert w.abs().max() <= 0.1 + 1e-9

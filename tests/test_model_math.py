"""The model is correct to the math: flow Jacobians, KL, gradients, determinism."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch.nn import functional as F

from cvae_model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, TrainState
from cvae_model.config import ModelConfig, TrainConfig, default_cells_encoder
from cvae_model.flows import IAF, AutoregressiveNet, autoregressive_input_mask
from cvae_model.losses import analytic_gaussian_kl, monte_carlo_kl
from cvae_model.normalization import Normalizer
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE, upgrade_optimizer_state_dict, upgrade_state_dict


@pytest.fixture(autouse=True)
def float64() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=[False, True], ids=["masked-hidden", "structured-hidden"])
def hidden_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with each way AutoregressiveNet computes its hidden layer."""
    monkeypatch.setattr(AutoregressiveNet, "structured_min_weights", 0 if request.param else 10**9)


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
def test_flow_log_det_equals_slogdet_of_autograd_jacobian(flow_length: int, dim_latent: int,
                                                          hidden_path: None) -> None:
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
def test_each_iaf_step_is_autoregressive(dim_latent: int, hidden_path: None) -> None:
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


@pytest.mark.slow
@pytest.mark.parametrize("keep_prob", [0.75, 1.0], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("structured", [False, True], ids=["masked-hidden", "structured-hidden"])
def test_compiled_and_eager_train_steps_agree(structured: bool, keep_prob: float,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile hook changes speed, not results: the same steps (fused Adam, dropout and
    noise from the same generator seeds) give the same losses and weights to float tolerance.
    Without dropout train_step draws the noise itself and the forward is one compiled graph."""
    import copy
    import warnings

    from cvae_model.compiling import COMPILE_MIN_STEPS, compile_for_training

    monkeypatch.setattr(AutoregressiveNet, "structured_min_weights", 0 if structured else 10**9)
    monkeypatch.delenv("CVAE_COMPILE", raising=False)
    torch.manual_seed(0)
    eager = VAE(ModelConfig(dim_feature=12, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8)))
    model = copy.deepcopy(eager)
    config = TrainConfig(num_steps=COMPILE_MIN_STEPS)
    compiled = compile_for_training(model, config)
    assert compiled is not model
    optimizers = make_optimizer(eager, config), make_optimizer(model, config)
    batches = torch.randn(4, 32, 12)
    for step, x in enumerate(batches):
        results = []
        for module, optimizer in zip((eager, compiled), optimizers):
            generator = torch.Generator().manual_seed(step)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
                results.append(train_step(module, optimizer, x, keep_prob=keep_prob,
                                          grad_clip_norm=100.0, generator=generator))
        assert results[0].applied and results[1].applied
        assert results[1].loss == pytest.approx(results[0].loss, rel=1e-9, abs=1e-9)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


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


def _old_output_mask(k: int, h: int) -> torch.Tensor:
    """The format-1 output mask: row c*k + j (m_j for c=0, s_j for c=1) reads hidden block j."""
    return ((torch.arange(2 * k) % k)[:, None] == (torch.arange(k * h) // h)[None, :]).double()


def _dense_from_blocks(weight: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The (2k, k*h) dense weight equal to ``fill`` off the blocks and ``weight`` (2, k, h) on them."""
    _, k, h = weight.shape
    dense = fill.clone().reshape(2, k, k, h)
    torch.diagonal(dense, dim1=1, dim2=2).copy_(weight.transpose(1, 2))
    return dense.reshape(2 * k, k * h)


def _old_flow(sd: dict[str, torch.Tensor], flow_length: int, s_offset: float, z: torch.Tensor,
              hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The format-1 IAF, written out from a format-1 state dict (keys relative to the flow)."""
    total = torch.zeros(z.shape[:-1])
    for i in range(flow_length):
        p = f"steps.{i}."
        context = torch.relu(F.linear(hidden, sd[p + "context.weight"], sd[p + "context.bias"]))
        w_h = sd[p + "net.hidden.weight"] * sd[p + "net.hidden.mask"]
        h = torch.relu(F.linear(torch.cat([context, z], -1), w_h, sd[p + "net.hidden.bias"]))
        w_o = sd[p + "net.out.weight"] * sd[p + "net.out.mask"]
        m, s = F.linear(h, w_o, sd[p + "net.out.bias"]).chunk(2, dim=-1)
        s = s + s_offset
        sigma = torch.sigmoid(s)
        z = (sigma * z + (1 - sigma) * m).flip(-1)
        total = total + F.logsigmoid(s).sum(-1)
    return z, total


def _format1_state_dict(model: VAE, seed: int = 7) -> dict[str, torch.Tensor]:
    """``model``'s weights in the format-1 layout, with random values where the mask is 0."""
    gen = torch.Generator().manual_seed(seed)
    old = {}
    for name, value in model.state_dict().items():
        if name.startswith("flow.steps.") and ".net.out." in name:
            prefix = name.rsplit(".", 1)[0]
            _, k, h = model.state_dict()[prefix + ".weight"].shape
            if name.endswith("weight"):
                old[name] = _dense_from_blocks(value, torch.randn(2 * k, k * h, generator=gen))
                old[prefix + ".mask"] = _old_output_mask(k, h)
            else:
                old[name] = value.reshape(-1).clone()
        else:
            old[name] = value.clone()
    return old


@pytest.mark.parametrize(("k", "h"), [(1, 3), (2, 5), (7, 4)])
def test_autoregressive_net_equals_the_masked_dense_formulation(k: int, h: int, hidden_path: None) -> None:
    """Values and every gradient, for both ways of computing the hidden layer."""
    torch.manual_seed(k)
    net = AutoregressiveNet(k, k, h, "orthogonal")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z, context = torch.randn(11, k, requires_grad=True), torch.randn(11, k, requires_grad=True)
    w_h, b_h = (t.detach().clone().requires_grad_() for t in (net.hidden.weight, net.hidden.bias))
    w_o = _dense_from_blocks(net.out.weight.detach(), torch.randn(2 * k, k * h)).requires_grad_()
    b_o = net.out.bias.detach().reshape(-1).clone().requires_grad_()
    hidden = torch.relu(F.linear(torch.cat([context, z], -1), w_h * net.hidden.mask, b_h))
    ref_m, ref_s = F.linear(hidden, w_o * _old_output_mask(k, h), b_o).chunk(2, -1)
    m, s = net(z, context)
    torch.testing.assert_close((m, s), (ref_m, ref_s), rtol=1e-12, atol=1e-12)
    cot_m, cot_s = torch.randn_like(m), torch.randn_like(s)
    got = torch.autograd.grad((m * cot_m).sum() + (s * cot_s).sum(),
                              [z, context, *net.hidden.parameters(), *net.out.parameters()])
    ref = list(torch.autograd.grad((ref_m * cot_m).sum() + (ref_s * cot_s).sum(),
                                   [z, context, w_h, b_h, w_o, b_o]))
    assert torch.count_nonzero(ref[2] * (1 - net.hidden.mask)) == 0
    ref[4] = torch.diagonal(ref[4].reshape(2, k, k, h), dim1=1, dim2=2).transpose(1, 2)
    ref[5] = ref[5].reshape(2, k)
    torch.testing.assert_close(got, tuple(ref), rtol=1e-12, atol=1e-12)
    assert tuple(net.out.weight.shape) == (2, k, h) and tuple(net.out.bias.shape) == (2, k)


@pytest.mark.parametrize("flow_length", [1, 3])
def test_iaf_equals_its_steps_and_reversals(flow_length: int, hidden_path: None) -> None:
    flow = _flow_with_random_weights(flow_length, 4, seed=5)
    z, hidden = torch.randn(9, 4), torch.randn(9, 7)
    expected_z, expected_log_det = z, torch.zeros(9)
    for step in flow.steps:
        expected_z, log_det = step(expected_z, hidden)
        expected_z, reverse_log_det = flow.reverse(expected_z)
        expected_log_det = expected_log_det + log_det + reverse_log_det
    got_z, got_log_det = flow(z, hidden)
    torch.testing.assert_close(got_z, expected_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_log_det, expected_log_det, rtol=1e-12, atol=1e-12)


def test_upgraded_format1_state_dict_gives_identical_outputs(hidden_path: None) -> None:
    config = ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=3, cells_encoder=(16, 8))
    torch.manual_seed(0)
    source = VAE(config)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old = _format1_state_dict(source)
    torch.manual_seed(1)
    model = VAE(config)
    model.load_state_dict(upgrade_state_dict(old, config))  # strict: names and shapes all match
    assert all(torch.equal(v, source.state_dict()[n]) for n, v in model.state_dict().items())
    x, eps = torch.randn(6, 10), torch.randn(6, 3)
    post = model.encode(x)
    z0 = post.mu + torch.exp(0.5 * post.log_var) * eps
    flow_sd = {n.removeprefix("flow."): v for n, v in old.items() if n.startswith("flow.")}
    z, log_det = _old_flow(flow_sd, 3, config.initial_s_offset, z0, post.hidden)
    out = model(x, eps=eps)
    torch.testing.assert_close(out.z, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.kl, monte_carlo_kl(eps, post.log_var, z, log_det), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.embed(x), _old_flow(flow_sd, 3, 1.0, post.mu, post.hidden)[0],
                               rtol=1e-12, atol=1e-12)
    assert upgrade_state_dict(model.state_dict(), config).keys() == model.state_dict().keys()


def test_upgraded_format1_optimizer_state_matches() -> None:
    config = ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8))
    torch.manual_seed(0)
    model = VAE(config)
    optimizer = make_optimizer(model, TrainConfig())
    train_step(model, optimizer, torch.randn(8, 10), keep_prob=1.0, grad_clip_norm=100.0)
    current = optimizer.state_dict()
    names = [n for n, _ in model.named_parameters()]
    old = {"param_groups": current["param_groups"], "state": {}}
    for i, entry in current["state"].items():  # format 1: moments of masked entries were 0
        old["state"][i] = {key: _dense_from_blocks(v, torch.zeros(6, 3 * 8))
                           if ".net.out.weight" in names[i] and v.dim() else
                           v.reshape(-1) if ".net.out.bias" in names[i] and v.dim() else v
                           for key, v in entry.items()}
    rng = torch.get_rng_state()
    upgraded = upgrade_optimizer_state_dict(old, config)
    assert torch.equal(torch.get_rng_state(), rng)
    for i, entry in current["state"].items():
        assert all(torch.equal(upgraded["state"][i][key], v) for key, v in entry.items())


@pytest.mark.parametrize("initializer", ["orthogonal", "truncated_normal", "lecun_normal"])
def test_iaf_blocks_are_initialized_as_the_originals_per_dimension_layers(initializer: str) -> None:
    torch.manual_seed(0)
    k, h = 3, 8
    net = AutoregressiveNet(k, k, h, initializer)  # type: ignore[arg-type]
    w, mask = net.hidden.weight.detach(), autoregressive_input_mask(k, k, h)
    assert torch.count_nonzero(w * (1 - mask)) == 0 and torch.count_nonzero(w * mask) == mask.sum()
    assert (net.hidden.bias == 0.001).all() and (net.out.bias == 0.001).all()
    blocks = [w[j * h:(j + 1) * h, :k + j] for j in range(k)] + list(net.out.weight.detach().unbind(1))
    for block in blocks:  # (out, in) of the original's layer for latent dimension j
        if initializer == "orthogonal":
            small = block if block.shape[0] <= block.shape[1] else block.T
            torch.testing.assert_close(small @ small.T, torch.eye(small.shape[0]))
        elif initializer == "truncated_normal":
            assert block.abs().max() <= 0.1
        else:  # lecun_normal: fan_in is the block's own input width
            assert block.abs().max() <= 2 * (1 / block.shape[1]) ** 0.5 / 0.8796256610342398 + 1e-12


def test_dropout_follows_the_generator() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=2, cells_encoder=(16, 8)))
    x = torch.randn(32, 10)

    def run(seed: int) -> torch.Tensor:
        return model(x, keep_prob=0.5, generator=torch.Generator().manual_seed(seed)).x_hat

    global_rng = torch.get_rng_state()
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), global_rng)  # nothing drawn from the global RNG
    post = model.encode(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(post.mu, model.encode(x, 0.5, torch.Generator().manual_seed(3)).mu)
    assert not torch.equal(post.mu, model.encode(x, 0.5, torch.Generator().manual_seed(4)).mu)


def test_dropout_is_inverted_dropout_with_the_keep_probability() -> None:
    from cvae_model.vae import _dropout
    h = torch.rand(400, 500) + 1.0
    out = _dropout(h, 0.75, torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], h[kept] / 0.75)
    assert abs(kept.double().mean().item() - 0.75) < 0.01


def test_keep_prob_one_draws_no_dropout_noise() -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=2, cells_encoder=(16, 8)))
    x = torch.randn(32, 10)
    before = (generator := torch.Generator().manual_seed(5)).get_state()
    model(x, 1.0, eps=torch.randn(32, 2), generator=generator)
    assert torch.equal(generator.get_state(), before)
    model(x, 1.0, generator=generator)  # draws eps only
    reference = torch.Generator().set_state(before)
    torch.randn((32, 2), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_format1_checkpoint_files_load_into_the_current_layout() -> None:
    """A checkpoint written before the block-diagonal layout (format_version 1) still loads,
    weights and optimizer moments converted, and embeds exactly as the model it was saved from."""
    config = ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8))
    torch.manual_seed(0)
    model = VAE(config)
    optimizer = make_optimizer(model, TrainConfig())
    train_step(model, optimizer, torch.randn(8, 10), keep_prob=1.0, grad_clip_norm=100.0)
    current = Checkpoint(config, model.state_dict(), Normalizer.identity(10),
                         TrainState(step=1, optimizer=optimizer.state_dict()))
    files = current.to_files()
    old_config = json.loads(files[CONFIG_FILE])
    old_config["format_version"] = 1
    weights = io.BytesIO()
    torch.save(_format1_state_dict(model), weights)
    files = {**files, CONFIG_FILE: json.dumps(old_config).encode(), WEIGHTS_FILE: weights.getvalue()}
    loaded = Checkpoint.from_files(files, where="format1")
    x = torch.randn(5, 10)
    torch.testing.assert_close(loaded.build_model().embed(x), model.embed(x), rtol=0, atol=0)
    moments = loaded.train_state.optimizer["state"]
    assert all(moments[i]["exp_avg"].shape == p.shape for i, p in enumerate(model.parameters()))
    files[CONFIG_FILE] = json.dumps({**old_config, "format_version": 99}).encode()
    with pytest.raises(ValueError, match="format_version 99"):
        Checkpoint.from_files(files, where="format1")

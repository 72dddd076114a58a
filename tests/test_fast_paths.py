"""The speed work changes speed, not results: each fast path against the plain computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.layers import BlockLinear
from cvae_model.training import _clip_gradients, make_optimizer, train_step
from cvae_model.vae import VAE


def _model_with_gradients(scale: float) -> tuple[VAE, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8)))
    for p in model.parameters():
        p.grad = scale * torch.randn_like(p)
    return model, make_optimizer(model, TrainConfig())


@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0, float("inf"), float("nan")],
                         ids=["far-below", "near", "above", "inf", "nan"])
@pytest.mark.parametrize("max_norm", [1.0, 100.0])
def test_clipping_equals_clip_grad_norm(scale: float, max_norm: float) -> None:
    """Same gradients, bit for bit, and 'applied' exactly when the norm is finite."""
    model, optimizer = _model_with_gradients(scale)
    reference, _ = _model_with_gradients(scale)
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm)
    applied = _clip_gradients(optimizer, max_norm)
    assert applied == bool(torch.isfinite(norm))
    if applied:
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
    if scale == 10.0 and max_norm == 1.0:  # the case that clips: it really did
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_a_step_without_dropout_draws_the_noise_the_model_would() -> None:
    """train_step draws eps itself when there is no dropout (one compiled graph); the loss is the
    one the model computes drawing eps from the same generator."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=2, cells_encoder=(16, 8)))
    x = torch.randn(16, 10)
    expected = model(x, 1.0, None, torch.Generator().manual_seed(7)).loss
    result = train_step(model, make_optimizer(model, TrainConfig()), x, keep_prob=1.0,
                        grad_clip_norm=100.0, generator=torch.Generator().manual_seed(7))
    assert result.loss == float(expected.detach())


def test_a_step_takes_a_vae_however_it_is_wrapped() -> None:
    """train_step finds the VAE's latent size through DDP, the compile hook or torch.compile
    (it draws the noise itself), and names what it got when there is none."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=1, cells_encoder=(8,)))
    optimizer = make_optimizer(model, TrainConfig())
    wrapped = torch.compile(model, backend="eager")  # an OptimizedModule: the VAE is _orig_mod
    result = train_step(wrapped, optimizer, torch.randn(4, 10), keep_prob=1.0, grad_clip_norm=1.0)
    assert result.applied
    with pytest.raises(TypeError, match="trains a VAE.*got Linear"):
        train_step(torch.nn.Linear(10, 3), optimizer, torch.randn(4, 10), keep_prob=1.0,
                   grad_clip_norm=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 7])
def test_block_linear_compiled_equals_eager(rows: int) -> None:
    """BlockLinear computes its sums one way eagerly and another under torch.compile: values and
    every gradient agree."""
    torch.manual_seed(rows)
    layer = BlockLinear(blocks=5, block_in=4, groups=2, initializer="orthogonal")
    x = torch.randn(rows, 20, requires_grad=True)
    cotangent = torch.randn(2, rows, 5)

    def run(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        out = module(x)
        return (out, *torch.autograd.grad(out, (x, layer.weight, layer.bias), cotangent))

    reference = (torch.einsum("nji,gji->gnj", x.detach().view(rows, 5, 4), layer.weight.detach())
                 + layer.bias.detach().unsqueeze(1))
    eager = run(layer)
    compiled = run(torch.compile(layer, dynamic=False, fullgraph=True))
    torch.testing.assert_close(eager[0], reference)
    torch.testing.assert_close(compiled, eager)


_FAULTS_PER_STEP = textwrap.dedent("""
    import json, resource, torch
    from cvae_model.config import ModelConfig, TrainConfig
    from cvae_model.training import make_optimizer, train_step
    from cvae_model.allocator import keep_freed_memory
    tuned = keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from cvae_model.vae import VAE
    model = VAE(ModelConfig(dim_feature=784, dim_latent=64))
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randn(64, 784)
    def steps(n):
        for _ in range(n):
            train_step(model, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0)
    steps(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(5)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"tuned": tuned, "faults": faults}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_kept_memory_stops_the_page_faults_of_each_step() -> None:
    """What cvae_model.allocator is for: with glibc's defaults a 64-D step page-faults its tensors
    in again (over a thousand faults); with the settings training applies, almost none."""
    def faults(setting: str) -> dict[str, object]:
        env = {**os.environ, "CVAE_MALLOC_TUNING": setting}
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout
        return json.loads(out.strip().splitlines()[-1])

    default, tuned = faults("0"), faults("1")
    assert default["tuned"] is False and tuned["tuned"] is True
    assert default["faults"] > 200, default
    assert tuned["faults"] < default["faults"] / 10, (tuned, default)

"""The speed work changes speed, not results: each fast path against the plain computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cvae_model import allocator
from cvae_model.compiling import COMPILE_MIN_STEPS, _CompiledOrEager, compile_for_training
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.gradients import clip_gradients
from cvae_model.layers import BlockLinear
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE


def _small_vae(flow_length: int = 2) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(dim_feature=10, dim_latent=3, iaf_flow_length=flow_length,
                           cells_encoder=(16, 8)))


def _model_with_gradients(scale: float, without: str | None = None) -> VAE:
    model = _small_vae()
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        p.grad = None if name == without else scale * torch.randn(p.shape, generator=generator)
    return model


def _norm(model: VAE) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                if p.grad is not None]))


@pytest.mark.parametrize("scale", [1e-3, 1.0, float("inf"), float("nan")],
                         ids=["small", "large", "inf", "nan"])
@pytest.mark.parametrize("max_norm", [1.0, 100.0, "just-below", "just-above"])
@pytest.mark.parametrize("without", [None, "mu.weight"], ids=["all-grads", "a-grad-is-None"])
def test_clipping_equals_clip_grad_norm(scale: float, max_norm: float | str,
                                        without: str | None) -> None:
    """Same gradients, bit for bit, and 'applied' exactly when the norm is finite: below, at
    and above the clipping threshold, with a parameter that has no gradient."""
    norm = _norm(_model_with_gradients(scale, without))
    if max_norm == "just-below":  # the norm a hair under the threshold: no clipping
        max_norm = norm * (1 + 1e-5)
    elif max_norm == "just-above":  # a hair over: clipping by a coefficient just under 1
        max_norm = norm * (1 - 1e-5)
    model, reference = _model_with_gradients(scale, without), _model_with_gradients(scale, without)
    total = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm)
    applied = clip_gradients(make_optimizer(model, TrainConfig()), max_norm)
    assert applied == bool(torch.isfinite(total))
    if applied:
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
        if max_norm < norm:  # it clipped: to the threshold (scaled by clip_grad_norm_'s 1e-6)
            assert _norm(model) == pytest.approx(max_norm * norm / (norm + 1e-6), rel=1e-5)


def test_a_step_without_dropout_draws_the_noise_the_model_would() -> None:
    """train_step draws eps itself when there is no dropout; the loss is the one the model
    computes drawing eps from the same generator."""
    model = _small_vae()
    x = torch.randn(16, 10)
    expected = model(x, 1.0, None, torch.Generator().manual_seed(7)).loss.detach()
    result = train_step(model, make_optimizer(model, TrainConfig()), x, keep_prob=1.0,
                        grad_clip_norm=100.0, generator=torch.Generator().manual_seed(7))
    assert result.loss == float(expected)


class _Recording(torch.nn.Module):
    """Wraps a VAE as DDP does (``.module``) and records the noise each forward was given."""

    def __init__(self, module: VAE) -> None:
        super().__init__()
        self.module = module
        self.noise: list[torch.Tensor | None] = []

    def forward(self, *args: object) -> object:
        self.noise.append(args[2] if len(args) > 2 else None)  # type: ignore[arg-type]
        return self.module(*args)


def test_without_dropout_the_forward_gets_its_noise_and_compiles_as_one_graph() -> None:
    """What drawing eps in train_step is for: the forward it calls draws nothing, and dynamo
    traces such a forward as one graph (a generator draw inside it breaks the graph)."""
    model = _small_vae()
    recording = _Recording(model)
    optimizer = make_optimizer(model, TrainConfig())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 10)
    train_step(recording, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0, generator=generator)
    train_step(recording, optimizer, x, keep_prob=0.75, grad_clip_norm=100.0, generator=generator)
    assert recording.noise[0] is not None and tuple(recording.noise[0].shape) == (8, 3)
    assert recording.noise[1] is None  # with dropout the VAE draws it, in its own order
    torch._dynamo.reset()
    with_noise = torch._dynamo.explain(model)(x, 1.0, recording.noise[0], generator)
    drawing = torch._dynamo.explain(model)(x, 1.0, None, generator)
    assert with_noise.graph_count == 1 and with_noise.graph_break_count == 0
    assert drawing.graph_break_count >= 1  # the reason: without eps it does not compile whole


def test_only_long_runs_compile_and_cvae_compile_0_turns_it_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README: runs of COMPILE_MIN_STEPS (20,000) steps or more go through torch.compile by
    default; shorter runs, and any run with CVAE_COMPILE=0, train the module itself."""
    model = _small_vae()
    monkeypatch.delenv("CVAE_COMPILE", raising=False)
    assert COMPILE_MIN_STEPS == 20_000
    assert compile_for_training(model, TrainConfig(num_steps=COMPILE_MIN_STEPS - 1)) is model
    hooked = compile_for_training(model, TrainConfig(num_steps=COMPILE_MIN_STEPS))
    assert isinstance(hooked, _CompiledOrEager) and hooked.module is model
    monkeypatch.setenv("CVAE_COMPILE", "0")
    assert compile_for_training(model, TrainConfig(num_steps=COMPILE_MIN_STEPS)) is model


def test_the_compile_hook_trains_eagerly_when_compiling_fails() -> None:
    """README: eager if compiling fails. A backend that fails (as inductor does without a C++
    compiler) gives one RuntimeWarning naming the error, the eager result, and eager from then on."""
    model = _small_vae()

    def failing_backend(graph: object, inputs: object) -> object:
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    hook = _CompiledOrEager(model)
    hook.compiled = torch.compile(model, backend=failing_backend)
    x, eps = torch.randn(4, 10), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="(?s)torch.compile failed.*no C\\+\\+ compiler found"):
        out = hook(x, 1.0, eps)
    assert hook.compiled is None
    assert torch.equal(out.loss, model(x, 1.0, eps).loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(hook(x, 1.0, eps).loss, out.loss)


@pytest.mark.parametrize("env", [{"CVAE_MALLOC_TUNING": "0"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                                 {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}],
                         ids=["turned-off", "jemalloc", "tcmalloc"])
def test_malloc_is_left_alone_when_turned_off_or_under_another_allocator(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """README: CVAE_MALLOC_TUNING=0 leaves glibc's malloc alone; so does a preloaded allocator,
    which glibc's settings would not reach."""
    monkeypatch.setattr(allocator, "_applied", False)  # as in a fresh process
    monkeypatch.delenv("CVAE_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert allocator.keep_freed_memory() is False
    assert allocator._applied is False


def test_a_step_takes_a_vae_however_it_is_wrapped() -> None:
    """train_step finds the VAE's latent size through a DDP-like ``.module``, the compile hook
    and torch.compile (an OptimizedModule's ``_orig_mod``), and names what it got otherwise."""
    model = _small_vae(flow_length=1)
    optimizer = make_optimizer(model, TrainConfig())
    hook = _CompiledOrEager(model)
    hook.compiled = torch.compile(model, backend="eager")
    for wrapped in (_Recording(model), hook, torch.compile(model, backend="eager")):
        result = train_step(wrapped, optimizer, torch.randn(4, 10), keep_prob=1.0,
                            grad_clip_norm=1.0)
        assert result.applied, type(wrapped).__name__
    with pytest.raises(TypeError, match="trains a VAE.*got Linear"):
        train_step(torch.nn.Linear(10, 3), optimizer, torch.randn(4, 10), keep_prob=1.0,
                   grad_clip_norm=1.0)


def _block_reference(layer: BlockLinear, x: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(*x.shape[:-1], layer.blocks, layer.block_in)
    return torch.einsum("...ji,gji->g...j", xb, layer.weight) + layer.bias.view(
        layer.groups, *[1] * (x.dim() - 1), layer.blocks)


@pytest.mark.parametrize("shape", [(7, 20), (3, 4, 20)], ids=["2-D", "3-D"])
def test_block_linear_equals_its_sums_with_every_gradient(shape: tuple[int, ...]) -> None:
    """The eager batched products against the einsum of the definition (float64), values and
    the gradients of input, weight and bias; a 2-D output may be modified in place."""
    torch.manual_seed(0)
    layer = BlockLinear(blocks=5, block_in=4, groups=2, initializer="orthogonal").double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out, reference = layer(x), _block_reference(layer, x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(out)
    params = (x, layer.weight, layer.bias)
    got = torch.autograd.grad(out, params, cotangent)
    torch.testing.assert_close(got, torch.autograd.grad(reference, params, cotangent),
                               rtol=1e-12, atol=1e-12)
    assert all(g.is_contiguous() for g in got[1:])  # laid out as the parameters
    if len(shape) == 2:
        layer(x.detach()).add_(1.0)  # not a view of a temporary: in-place is allowed


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 20), (7, 20), (3, 4, 20)], ids=["1-row", "2-D", "3-D"])
def test_block_linear_compiled_equals_eager(shape: tuple[int, ...]) -> None:
    """BlockLinear computes its sums one way eagerly and another under torch.compile: values and
    every gradient agree."""
    torch.manual_seed(0)
    layer = BlockLinear(blocks=5, block_in=4, groups=2, initializer="orthogonal")
    x = torch.randn(*shape, requires_grad=True)
    cotangent = torch.randn(2, *shape[:-1], 5)

    def run(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        out = module(x)
        return (out, *torch.autograd.grad(out, (x, layer.weight, layer.bias), cotangent))

    eager = run(layer)
    compiled = run(torch.compile(layer, dynamic=False, fullgraph=True))
    torch.testing.assert_close(eager[0], _block_reference(layer, x))
    torch.testing.assert_close(compiled, eager)


def test_training_keeps_freed_memory_on_the_cpu(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """run_training (both launchers' loop) applies cvae_model.allocator's settings on the CPU."""
    import cvae_model.training as training
    from cvae_model.estimator import CompressionVAE

    calls: list[bool] = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(True) or True)
    rows = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    CompressionVAE(rows, logdir=str(tmp_path / "run"), dim_latent=2, iaf_flow_length=1,
                   cells_encoder=[8, 4], random_state=0).train(num_steps=2, verbose=False,
                                                               neighbour_weight=0.0)
    assert calls


_FAULTS_PER_STEP = textwrap.dedent("""
    import json, resource, torch
    from cvae_model.allocator import keep_freed_memory
    from cvae_model.config import ModelConfig, TrainConfig
    from cvae_model.training import make_optimizer, train_step
    from cvae_model.vae import VAE
    tuned = keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=784, dim_latent=64))
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randn(64, 784)
    def steps(n):
        for _ in range(n):
            train_step(model, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0)
    steps(3)
    per_step = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        steps(1)
        per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The median, because even with the settings the heap still grows now and then while it
    # settles (a step of 256-1,500 faults among steps of 0-2); the mean of a few steps caught one.
    print(json.dumps({"tuned": tuned, "faults": sorted(per_step)[len(per_step) // 2]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_kept_memory_stops_the_page_faults_of_each_step() -> None:
    """What cvae_model.allocator is for: with glibc's defaults a 64-D step page-faults its
    tensors in again (hundreds of faults or more in a typical step); with the settings training
    applies, a tenth of that or less."""
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("MALLOC_") and key not in ("LD_PRELOAD", "GLIBC_TUNABLES")}

    def faults(setting: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], check=True, text=True,
                             env={**clean, "CVAE_MALLOC_TUNING": setting}, capture_output=True,
                             timeout=300).stdout
        return json.loads(out.strip().splitlines()[-1])

    default, tuned = faults("0"), faults("1")
    assert default["tuned"] is False and tuned["tuned"] is True
    assert default["faults"] > 200, default
    assert tuned["faults"] < default["faults"] / 10, (tuned, default)

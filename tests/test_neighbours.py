"""The neighbour-preserving term's math: calibrated input affinities, Student-t affinities, KL."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_helpers import assert_same_step, run_on_two_workers, small_vae
from scipy.spatial.distance import squareform
from sklearn.datasets import load_digits
from sklearn.manifold._t_sne import _joint_probabilities

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.neighbours import (
    conditional_affinities,
    effective_perplexity,
    joint_affinities,
    neighbour_kl,
    squared_distances,
    student_t_affinities,
)
from cvae_model.training import NeighbourTerm, neighbour_term, train_step
from cvae_model.vae import VAE

TOL = 1e-5  # the default entropy tolerance, in nats (scikit-learn's PERPLEXITY_TOLERANCE)


# One torch thread: split over 2 threads on a busy 2-core machine, every n x n op waits a
# scheduler slice for the second one, which turns this module's ~2 s into ~50 s.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """300 z-scored rows of scikit-learn's digits, float64 (real data with clusters)."""
    x = torch.from_numpy(load_digits().data[:300])
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-3)


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim=1)


def random_joint(n: int, seed: int) -> torch.Tensor:
    """A random valid P: symmetric, zero diagonal, sums to 1, float64."""
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = (a + a.T).fill_diagonal_(0.0)
    return a / a.sum()


def reference_kl(p: torch.Tensor, z: torch.Tensor, dof: float) -> float:
    """KL(P || Q) straight from the definition, in numpy float64."""
    z64 = z.detach().double().numpy()
    sq = ((z64[:, None, :] - z64[None, :, :]) ** 2).sum(-1)
    w = (1.0 + sq / dof) ** (-(dof + 1.0) / 2.0)
    np.fill_diagonal(w, 0.0)
    q = w / w.sum()
    p64 = p.double().numpy()
    mask = p64 > 0
    return float((p64[mask] * np.log(p64[mask] / q[mask])).sum())


@pytest.mark.parametrize(("n", "k", "dof"), [(12, 2, 1.0), (12, 2, 2.5), (10, 10, 1.0)])
def test_gradcheck_neighbour_kl(n: int, k: int, dof: float) -> None:
    # k = 10 takes the Gram-matrix path, k = 2 the coordinate-difference path.
    p = random_joint(n, seed=1)
    z = torch.randn(n, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z_: neighbour_kl(p, z_, dof), (z,), eps=1e-6,
                                    atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dof", [1.0, 3.0])
def test_kl_value_matches_definition(dof: float) -> None:
    p = random_joint(40, seed=3)
    for k in (2, 12):
        z = torch.randn(40, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        assert neighbour_kl(p, z, dof).item() == pytest.approx(reference_kl(p, z, dof), abs=1e-12)
        q = student_t_affinities(z, dof)
        assert neighbour_kl(p, z, dof).item() == pytest.approx(
            float((p * torch.log(p.clamp_min(1e-300) / q.clamp_min(1e-300))).sum()), abs=1e-12)


def test_student_t_affinities_are_a_distribution() -> None:
    z = torch.randn(30, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = student_t_affinities(z, dof=1.0)
    assert torch.allclose(q, q.T, atol=0.0, rtol=1e-12)
    assert q.diagonal().abs().max().item() == 0.0
    assert q.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (q[~torch.eye(30, dtype=torch.bool)] > 0).all()
    # q_ij is proportional to 1 / (1 + |z_i - z_j|^2) for dof = 1.
    w = 1.0 / (1.0 + torch.cdist(z, z).pow(2))
    w.fill_diagonal_(0.0)
    assert torch.allclose(q, w / w.sum(), atol=1e-15, rtol=1e-12)


def test_conditional_and_joint_are_distributions_with_duplicates(digits: torch.Tensor) -> None:
    x = torch.cat([digits[:150], digits[:5], digits[:5]])  # rows 0-4 appear three times each
    n = x.shape[0]
    pc = conditional_affinities(x, 30.0)
    assert torch.isfinite(pc).all() and (pc >= 0).all()
    assert pc.diagonal().abs().max().item() == 0.0
    assert (pc.sum(dim=1) - 1.0).abs().max().item() < 1e-12
    assert (row_entropy(pc) - math.log(30.0)).abs().max().item() <= TOL
    # Row 0 sees its two copies at distance exactly 0: the largest and equal affinities.
    assert pc[0, 150].item() == pc[0, 155].item() == pc[0].max().item()
    p = joint_affinities(x, 30.0)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert torch.equal(p, p.T)
    assert p.diagonal().abs().max().item() == 0.0
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(p, (pc + pc.T) / (2 * n), rtol=0.0, atol=0.0)


def test_duplicate_group_larger_than_perplexity_is_uniform_over_the_copies() -> None:
    # 12 identical rows and perplexity 5: no finite beta brings the entropy down to log 5 < log 11,
    # so each copy spreads its mass evenly over the other 11 (the beta -> infinity limit). The
    # group sits far from the other rows, whose nearest neighbours are then not tied.
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.full((12, 8), 100.0, dtype=torch.float64),
                   torch.randn(40, 8, generator=g, dtype=torch.float64)])
    pc = conditional_affinities(x, 5.0)
    assert torch.allclose(pc[:12, :12], (1.0 - torch.eye(12, dtype=torch.float64)) / 11.0,
                          atol=0.0, rtol=1e-12)
    assert pc[:12, 12:].abs().max().item() == 0.0
    assert (row_entropy(pc[12:]) - math.log(5.0)).abs().max().item() <= TOL
    p = joint_affinities(x, 5.0)
    assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("perplexity", [2.0, 5.0, 30.0, 80.0])
def test_row_entropy_equals_log_perplexity(digits: torch.Tensor, perplexity: float) -> None:
    h = row_entropy(conditional_affinities(digits, perplexity))
    assert (h - math.log(perplexity)).abs().max().item() <= TOL
    h_tight = row_entropy(conditional_affinities(digits, perplexity, tol=1e-10))
    assert (h_tight - math.log(perplexity)).abs().max().item() <= 1e-10


def test_scale_invariance_of_the_calibration(digits: torch.Tensor) -> None:
    # Multiplying x by c divides every beta by c^2: P must not change (no hidden scale), even
    # where the squared distances themselves would under- or overflow float64.
    p = joint_affinities(digits, 20.0, tol=1e-10)
    for c in (1e-3, 1e3, 1e-160, 1e160):
        assert torch.allclose(joint_affinities(digits * c, 20.0, tol=1e-10), p, rtol=1e-6,
                              atol=1e-6 * p.max().item())


def test_joint_matches_scikit_learn(digits: torch.Tensor) -> None:
    # Both searches stop once |H - log perplexity| <= 1e-5; an entropy error delta moves
    # log p_{j|i} by delta * u_j / var(u), u = beta (d_ij - E d), so |u| <~ 3 sd(u) for the
    # entries that carry mass: relative errors up to ~3e-5 from each side. sklearn also
    # rounds distances to float32 (~1e-6 relative on p). Hence 1e-4 of the largest entry.
    d = squared_distances(digits)
    for perplexity in (5.0, 30.0):
        ref = squareform(_joint_probabilities(d.numpy(), perplexity, 0))
        ours = joint_affinities(digits, perplexity).numpy()
        err = np.abs(ours - ref).max() / ref.max()
        assert err <= 1e-4, err
        # ... and a real mismatch is far larger: a 10% different perplexity.
        other = joint_affinities(digits, perplexity * 1.1).numpy()
        assert np.abs(other - ref).max() / ref.max() > 1e-2


def test_kl_is_zero_when_p_is_q_and_positive_otherwise() -> None:
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z.requires_grad_(True)
    q = student_t_affinities(z).detach()
    kl = neighbour_kl(q, z)
    (grad,) = torch.autograd.grad(kl, z)
    assert abs(kl.item()) < 1e-12
    assert grad.abs().max().item() < 1e-12
    other = z.detach() + 0.3 * torch.randn(50, 2, generator=torch.Generator().manual_seed(8),
                                           dtype=torch.float64)
    assert neighbour_kl(q, other).item() > 1e-3


def test_collapsed_and_huge_embeddings_stay_finite(digits: torch.Tensor) -> None:
    p = joint_affinities(digits[:100], 10.0)
    n = p.shape[0]
    # All points at one place: Q is uniform, KL(P || U) = sum p log p + log(n (n - 1)).
    expected = float(torch.xlogy(p, p).sum()) + math.log(n * (n - 1))
    for dtype in (torch.float32, torch.float64):
        zero = torch.zeros(n, 2, dtype=dtype, requires_grad=True)
        kl = neighbour_kl(p, zero)
        kl.backward()
        assert kl.item() == pytest.approx(expected, rel=1e-5)
        assert torch.isfinite(zero.grad).all()
        huge = (torch.randn(n, 2, generator=torch.Generator().manual_seed(9)) * 1e15).to(dtype)
        huge.requires_grad_(True)
        kl = neighbour_kl(p, huge)
        kl.backward()
        assert math.isfinite(kl.item()) and kl.item() >= 0.0
        assert torch.isfinite(huge.grad).all()


def test_kl_nonnegative_and_decreases_under_gradient_descent(digits: torch.Tensor) -> None:
    p = joint_affinities(digits[:200], 30.0)
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(200, 2, generator=torch.Generator().manual_seed(10)).to(dtype)
        z.requires_grad_(True)
        opt = torch.optim.SGD([z], lr=20.0, momentum=0.5)
        values = []
        for _ in range(30):
            opt.zero_grad()
            kl = neighbour_kl(p, z)
            kl.backward()
            opt.step()
            values.append(kl.item())
        assert min(values) >= 0.0
        assert values[-1] < 0.8 * values[0], values


def test_gradient_matches_finite_difference_and_tsne_formula(digits: torch.Tensor) -> None:
    p = joint_affinities(digits[:60], 10.0)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(60, 2, generator=g, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(neighbour_kl(p, z), z)
    v = torch.randn(60, 2, generator=g, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (neighbour_kl(p, z + h * v) - neighbour_kl(p, z - h * v)) / (2 * h)
    assert fd.item() == pytest.approx(float((grad * v).sum()), rel=1e-7)
    # van der Maaten & Hinton (2008), eq. 5: dC/dz_i = 4 sum_j (p_ij - q_ij)(z_i - z_j) w_ij.
    with torch.no_grad():
        q = student_t_affinities(z)
        w = 1.0 / (1.0 + torch.cdist(z, z).pow(2))
        m = (p - q) * w
        tsne = 4.0 * (m.sum(1, keepdim=True) * z - m @ z)
    assert torch.allclose(grad, tsne, rtol=1e-9, atol=1e-14)


def test_float32_input_gives_float32_and_agrees_with_float64(digits: torch.Tensor) -> None:
    p64 = joint_affinities(digits, 30.0)
    p32 = joint_affinities(digits.float(), 30.0)
    assert p32.dtype == torch.float32
    assert (p32.double() - p64).abs().max().item() <= 1e-4 * p64.max().item()
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(12))
    kl32 = neighbour_kl(p32, z).item()
    assert kl32 == pytest.approx(neighbour_kl(p64, z.double()).item(), rel=1e-4)


def test_integer_and_half_inputs_are_computed_in_float32() -> None:
    x = torch.randint(0, 17, (120, 16), generator=torch.Generator().manual_seed(13))
    ref = joint_affinities(x.double(), 10.0)
    for xi in (x, x.half()):
        p = joint_affinities(xi, 10.0)
        assert p.dtype == torch.float32
        assert (p.double() - ref).abs().max().item() <= 1e-4 * ref.max().item()


def test_effective_perplexity_rule() -> None:
    assert effective_perplexity(30.0, 512) == 30.0
    assert effective_perplexity(30.0, 91) == 30.0
    assert effective_perplexity(30.0, 64) == 21.0
    assert effective_perplexity(30.0, 2) == 1.0
    assert effective_perplexity(0.5, 100) == 1.0
    with pytest.raises(ValueError):
        effective_perplexity(0.0, 10)


def test_small_batches_follow_the_documented_rule(digits: torch.Tensor) -> None:
    # n = 10 with perplexity 30: the rows are calibrated to (10 - 1) / 3 = 3 instead.
    pc = conditional_affinities(digits[:10], 30.0)
    assert (row_entropy(pc) - math.log(3.0)).abs().max().item() <= TOL
    assert (pc.sum(dim=1) - 1.0).abs().max().item() < 1e-12
    # n = 3: perplexity 1, all mass on the nearest neighbour.
    x3 = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                            dtype=torch.float64)
    assert torch.equal(conditional_affinities(x3, 30.0), expected)
    # n = 2: each row has one neighbour.
    x2 = digits[:2]
    assert torch.equal(conditional_affinities(x2, 30.0), torch.tensor([[0.0, 1.0], [1.0, 0.0]],
                                                                     dtype=torch.float64))
    assert torch.equal(joint_affinities(x2, 30.0), torch.tensor([[0.0, 0.5], [0.5, 0.0]],
                                                               dtype=torch.float64))
    # n = 1: nothing to preserve; the term is 0 and still differentiable.
    assert torch.equal(joint_affinities(digits[:1], 30.0), torch.zeros(1, 1, dtype=torch.float64))
    z1 = torch.zeros(1, 2, requires_grad=True)
    kl = neighbour_kl(torch.zeros(1, 1), z1)
    kl.backward()
    assert kl.item() == 0.0 and torch.equal(z1.grad, torch.zeros(1, 2))


def test_shape_mismatch_and_bad_dof_are_rejected() -> None:
    with pytest.raises(ValueError):
        neighbour_kl(torch.zeros(3, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        neighbour_kl(random_joint(4, seed=0), torch.zeros(4, 2, dtype=torch.float64), dof=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(digits: torch.Tensor) -> None:
    p_cpu = joint_affinities(digits, 30.0)
    p_gpu = joint_affinities(digits.cuda(), 30.0)
    assert p_gpu.device.type == "cuda"
    assert torch.allclose(p_gpu.cpu(), p_cpu, rtol=0.0, atol=1e-4 * p_cpu.max().item())
    z = torch.randn(300, 2, dtype=torch.float64, requires_grad=True)
    zg = z.detach().cuda().requires_grad_(True)
    neighbour_kl(p_cpu, z).backward()
    neighbour_kl(p_gpu, zg).backward()
    assert torch.allclose(zg.grad.cpu(), z.grad, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- in training
TINY = ModelConfig(dim_feature=64, dim_latent=2, iaf_flow_length=2, cells_encoder=(16, 8))


@pytest.mark.parametrize("scaled", [False, True], ids=["rows-as-given", "feature-scale"])
def test_the_step_objective_is_elbo_plus_weighted_kl_of_embed(digits: torch.Tensor,
                                                              scaled: bool) -> None:
    """The wiring: the ELBO with the step's noise plus the weighted KL(P(x * feature_scale) ||
    Q(scale * embed(x))); the same gradient as the objective written out by hand."""
    x = digits[:40].float()
    eps = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = VAE(TINY)
    reference = VAE(TINY)
    reference.load_state_dict(model.state_dict())
    # Uneven factors, so that scaled rows have other neighbours than the rows themselves.
    feature_scale = torch.linspace(0.1, 6.0, 64) if scaled else None
    term = NeighbourTerm(weight=3.0, perplexity=5.0, dof=1.0, scale=2.0,
                         feature_scale=feature_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights: compare grads
    result = train_step(model, optimizer, x, keep_prob=1.0, grad_clip_norm=1e9, eps=eps,
                        neighbours=term)
    rows = x * feature_scale if scaled else x
    if scaled:
        assert not torch.allclose(joint_affinities(rows, 5.0), joint_affinities(x, 5.0), atol=1e-3)
    expected_kl = neighbour_kl(joint_affinities(rows, 5.0), 2.0 * reference.embed(x), 1.0)
    expected = reference(x, 1.0, eps).loss + 3.0 * expected_kl
    expected.backward()
    assert result.applied and result.neighbour_kl == pytest.approx(float(expected_kl.detach()), rel=1e-5)
    assert result.loss == pytest.approx(float(expected.detach()), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("keep_prob", [1.0, 0.5])
def test_forward_returns_exactly_embed_of_the_rows(digits: torch.Tensor, keep_prob: float) -> None:
    """The term's embedding is embed()'s vector, with or without dropout in the ELBO pass (the
    encoder pass is shared only when there is no dropout)."""
    torch.manual_seed(0)
    model = VAE(TINY)
    x = digits[:30].float()
    generator = torch.Generator().manual_seed(1)
    shared = model(x, keep_prob, None, generator, x)
    separate = model(x, keep_prob, None, torch.Generator().manual_seed(1), x.clone())
    assert torch.equal(shared.embedding, model.embed(x))
    assert torch.equal(separate.embedding, model.embed(x))
    assert model(x).embedding is None


def test_weight_zero_is_the_original_objective_and_draws_the_batch_size() -> None:
    off = TrainConfig(neighbour_weight=0.0, batch_size=64, neighbour_batch_size=512)
    assert neighbour_term(off, 2) is None  # the step's code path of old
    assert off.step_rows == 64 and not off.neighbours_on
    on = TrainConfig(neighbour_weight=2.0, batch_size=64, neighbour_batch_size=512)
    assert on.step_rows == 512
    assert TrainConfig(neighbour_weight=2.0, batch_size=1024, neighbour_batch_size=512).step_rows == 1024
    term = neighbour_term(on, 2)
    assert term is not None and (term.weight, term.dof, term.scale) == (2.0, 1.0, on.neighbour_scale)
    assert neighbour_term(on, 16).dof == 15.0  # type: ignore[union-attr]
    assert neighbour_term(on, 1).dof == 1.0  # type: ignore[union-attr]
    assert neighbour_term(TrainConfig(neighbour_weight=2.0, neighbour_dof=3.0), 2).dof == 3.0  # type: ignore[union-attr]
    assert term.feature_scale is None
    scale = torch.tensor([1.0, 2.0])
    assert neighbour_term(on, 2, feature_scale=scale).feature_scale is scale  # type: ignore[union-attr]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("neighbour_weight", -1.0, r"'neighbour_weight' parameter of CompressionVAE.train must be a "
                               r"finite number >= 0 \(0 turns the neighbour term off\). Got -1.0"),
    ("neighbour_weight", math.inf, r"'neighbour_weight' .* Got inf instead"),
    ("neighbour_perplexity", 0.0, r"'neighbour_perplexity' .* must be a number > 0. Got 0.0"),
    ("neighbour_batch_size", 1, r"'neighbour_batch_size' .* range \[2, inf\). Got 1 instead"),
    ("neighbour_dof", -2.0, r"'neighbour_dof' .* must be a number > 0. Got -2.0"),
    ("neighbour_scale", 0.0, r"'neighbour_scale' .* must be a number > 0. Got 0.0"),
])
def test_bad_neighbour_settings_are_refused(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_a_config_saved_before_the_term_existed_reads_as_weight_zero() -> None:
    old = {k: v for k, v in TrainConfig().to_dict().items() if not k.startswith("neighbour_")}
    assert TrainConfig.from_dict(old).neighbour_weight == 0.0
    assert TrainConfig.from_dict(TrainConfig(neighbour_weight=3.0).to_dict()).neighbour_weight == 3.0


def test_training_with_the_term_resumes_exactly(tmp_path: Path) -> None:
    """40 steps, then 30 more, equal 70 straight: the term adds no randomness and its batches
    are a function of (seed, step) like the ELBO's."""
    from cvae_model import CompressionVAE

    X = load_digits().data[:400]
    params = {"random_state": 5, "dim_latent": 2, "iaf_flow_length": 1, "cells_encoder": [16, 8]}
    train = {"lr_scheduling": False, "test_every": 10, "verbose": False, "neighbour_weight": 2.0,
             "neighbour_batch_size": 96}
    straight = CompressionVAE(X, logdir=tmp_path / "straight", **params).train(num_steps=70, **train)
    split = CompressionVAE(X, logdir=tmp_path / "split", **params).train(num_steps=40, **train)
    resumed = CompressionVAE(X, logdir=tmp_path / "split", **params)
    resumed.train(num_steps=30, overwrite=True, **train)
    assert resumed.state_.step == 70 and split.state_.step == 40
    np.testing.assert_array_equal(resumed.embed(X), straight.embed(X))
    assert "train_neighbour_kl" in straight.history_[-1]
    saved = resumed.train_config_
    assert saved is not None and (saved.neighbour_weight, saved.neighbour_batch_size) == (2.0, 96)


def _ddp_neighbour_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from pipeline.ray_worker import _RowGather

    rank = ray.train.get_context().get_world_rank()
    model = small_vae()
    module = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    rows = slice(rank * 6, (rank + 1) * 6)
    x, eps = torch.tensor(config["x"])[rows], torch.tensor(config["eps"])[rows]
    term = NeighbourTerm(weight=5.0, perplexity=3.0, dof=1.0, scale=2.0, gather=_RowGather(2))
    result = train_step(module, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0, eps=eps,
                        neighbours=term)
    if rank == 0:
        np.savez(config["out"], kl=result.neighbour_kl,
                 **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    ray.train.report({"done": 1})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_workers_gather_the_term_and_equal_one_in_process_step(ray_session: object,
                                                                    tmp_path: Path) -> None:
    """Each worker embeds its 6 rows; the term runs over all 12 gathered rows and its gradient
    reaches each worker's rows: one DDP step equals one in-process step on the 12 rows."""
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(12, 8)) + np.repeat(rng.normal(size=(3, 8)) * 3, 4, axis=0)).astype(np.float32)
    eps = rng.normal(size=(12, 2)).astype(np.float32)
    out = run_on_two_workers(_ddp_neighbour_worker, x, eps, "neighbour-gather", tmp_path)
    model = small_vae()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    term = NeighbourTerm(weight=5.0, perplexity=3.0, dof=1.0, scale=2.0)
    result = train_step(model, optimizer, torch.from_numpy(x), keep_prob=1.0, grad_clip_norm=100.0,
                        eps=torch.from_numpy(eps), neighbours=term)
    with np.load(out) as ddp:
        assert float(ddp["kl"]) == pytest.approx(result.neighbour_kl, rel=1e-5)
    assert_same_step(out, model, initial)

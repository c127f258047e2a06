"""OG+DTP at the official script's precision (cfgbasin_jax.method.official_cosine, precision="official").

The official opposite-guidance script records ``1 - torch.nn.functional.cosine_similarity(x_{j+1}.flatten(),
x_j.flatten(), dim=0)`` in float32 and applies ``argrelextrema(np.array(diffs), np.less)`` to it. Here:
- a plain numpy float32 restatement of what torch 2.13 computes (read from ATen: Distance.cpp's
  cosine_similarity, the AVX2 p=2 ``linalg_vector_norm`` kernel of ReduceOpsKernel.cpp and the cascade
  sum of SumKernel.cpp), checked bit for bit against torch itself;
- our jnp signal, bit for bit against that restatement and torch on latents recorded from an
  official-structure PyTorch loop;
- the official minimum rule on it, ties included; the option wired through the pipeline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bench.reference import official_og_index, pt_embed, pt_scheduler

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import official_cosine as OC
from cfgbasin_jax.method import sampler as S

F32 = np.float32
ULP1 = 2.0**-24  # the spacing of float32 just below 1: 1 - cos is a multiple of it when cos >= 0.5


# ---------------------------------------------------------------- torch 2.13 restated in plain numpy

AVX2_LANES = 8  # torch dispatches its AVX2 reduction kernels on AVX2 and AVX512 CPUs alike


def fma32(a, b, c):
    """float32 fma(a, b, c), correctly rounded: the exact product in float64, the sum rounded to odd
    in float64, then to float32 (53 >= 2 * 24 + 2 bits, so no double rounding)."""
    a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def norm_restated(x):
    """torch.linalg.vector_norm(x) (float32, CPU): one 8-lane accumulator acc += v*v, its lanes left
    to right, then the tail: groups of four squares added one by one, the last n % 4 fused (fma)."""
    x = np.asarray(x, F32).ravel()
    n, lanes = x.size, AVX2_LANES
    acc = np.zeros(lanes, F32)
    d = 0
    while d + lanes <= n:
        v = x[d:d + lanes]
        acc = acc + v * v
        d += lanes
    total = acc[0]
    for k in range(1, lanes):
        total = F32(total + acc[k])
    while n - d >= 4:
        for _ in range(4):
            total = F32(total + F32(x[d] * x[d]))
            d += 1
    for k in range(d, n):
        total = fma32(x[k], x[k], total)[()]
    return F32(np.sqrt(total))


def multi_row_sum_restated(rows):
    """SumKernel.cpp multi_row_sum over rows [size, ...]: chunks of 2**max(4, ceil_log2(size)//4)
    rows, chunk sums cascading through 4 levels."""
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()
    power = max(4, ceil_log2 // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = [np.zeros(rows.shape[1:], F32) for _ in range(4)]
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = acc[0] + rows[i]
            i += 1
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = np.zeros_like(acc[j - 1])
            if i & (mask << (j * power)):
                break
    while i < size:
        acc[0] = acc[0] + rows[i]
        i += 1
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def row_sum_restated(items):
    """SumKernel.cpp row_sum: items [size, ...] in rows of 4, then the leftovers, then the 4 partials."""
    size = items.shape[0]
    n_rows = size // 4
    partial = multi_row_sum_restated(items[:n_rows * 4].reshape(n_rows, 4, *items.shape[1:]))
    first = partial[0]
    for i in range(n_rows * 4, size):
        first = first + items[i]
    for k in range(1, 4):
        first = first + partial[k]
    return first


def sum_restated(x):
    """torch.sum(x) (float32, CPU, <= 32768 elements): vectors of 8 through row_sum, the scalar tail,
    then the 8 lanes, all left to right."""
    x = np.asarray(x, F32).ravel()
    n = x.size
    if n < AVX2_LANES:
        return F32(row_sum_restated(x))
    n_vec = n // AVX2_LANES
    lanes = row_sum_restated(x[:n_vec * AVX2_LANES].reshape(n_vec, AVX2_LANES))
    total = F32(0)
    for k in range(n_vec * AVX2_LANES, n):
        total = F32(total + x[k])
    for k in range(AVX2_LANES):
        total = F32(total + lanes[k])
    return total


def cosine_similarity_restated(a, b, eps=1e-8):
    """torch 2.13 F.cosine_similarity(a, b, dim=0) for 1-D float32: each norm clamped at float32(eps)
    (torch 1.x clamped |a|^2 |b|^2 at eps^2 instead), a/|a| times b/|b|, summed."""
    a, b = np.asarray(a, F32).ravel(), np.asarray(b, F32).ravel()
    na = np.maximum(norm_restated(a), F32(eps))
    nb = np.maximum(norm_restated(b), F32(eps))
    return sum_restated((a / na) * (b / nb))


def official_signal_restated(latents):
    """[S+1, B, ...] trajectory -> [S, B]: the official script's diffs, 1 - cos(x_{j+1}, x_j)."""
    s, b = latents.shape[0] - 1, latents.shape[1]
    return np.array([[F32(1) - cosine_similarity_restated(latents[j + 1, i], latents[j, i]) for i in range(b)]
                     for j in range(s)], F32)


def torch_signal(latents):
    """The same with torch itself (the official line, per sample)."""
    x = torch.from_numpy(latents)
    return np.array([[(1 - torch.nn.functional.cosine_similarity(torch.flatten(x[j + 1, i]), torch.flatten(x[j, i]),
                                                                  dim=0)).item() for i in range(x.shape[1])]
                     for j in range(x.shape[0] - 1)], F32)


# ---------------------------------------------------------------- recorded latents

PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "oil painting of a city at night", "a red car"]
STEPS = 50


@pytest.fixture(scope="module")
def recorded(tiny_sd1):
    """The official OG script's record pass on the tiny PyTorch model: DPM-Solver++ from the model's
    scheduler config, noise_pred = eps_u - 7.5 (eps_c - eps_u), 50 steps; every latent kept.
    Returns latents [S+1, B, C, h, w] float32."""
    scheduler = pt_scheduler("dpm++2m", tiny_sd1.scheduler_config)
    scheduler.set_timesteps(STEPS)
    size = tiny_sd1.unet.config.sample_size
    noise = np.random.default_rng(3).standard_normal((len(PROMPTS), 4, size, size)).astype(F32)
    cond = pt_embed(tiny_sd1.text_encoder, tiny_sd1.tokenizer, PROMPTS)
    uncond = pt_embed(tiny_sd1.text_encoder, tiny_sd1.tokenizer, [""] * len(PROMPTS))
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    kept = [x.numpy().copy()]
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny_sd1.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t,
                                encoder_hidden_states=torch.cat([uncond, cond])).sample
            eu, ec = eps.chunk(2)
            x = scheduler.step(eu - 7.5 * (ec - eu), t, x).prev_sample
            kept.append(x.numpy().copy())
    return np.stack(kept).astype(F32)


@pytest.fixture(scope="module")
def signals(recorded):
    """(torch, numpy restatement, ours) official signals [S, B] on the recorded latents."""
    ours = jax.jit(jax.vmap(OC.official_cosine_distance))(jnp.asarray(recorded[1:]), jnp.asarray(recorded[:-1]))
    return torch_signal(recorded), official_signal_restated(recorded), np.asarray(ours)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("n", [3, 5, 8, 13, 36, 37, 256, 1000, 4099, 16384])
def test_restatement_equals_torch(n):
    """The numpy restatement is torch 2.13's cosine_similarity bit for bit (norm, sum and the whole),
    for sizes with and without tails, on near-parallel pairs like consecutive latents."""
    rng = np.random.default_rng(n)
    for trial in range(12):
        a = (rng.standard_normal(n) * 10 ** rng.uniform(-2, 2)).astype(F32)
        b = (a + rng.standard_normal(n) * 10 ** rng.uniform(-5, 0) * np.abs(a).mean()).astype(F32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        assert norm_restated(a) == F32(torch.linalg.vector_norm(ta).item()), (n, trial)
        assert sum_restated(a) == F32(ta.sum().item()), (n, trial)
        assert cosine_similarity_restated(a, b) == F32(torch.nn.functional.cosine_similarity(ta, tb, dim=0).item())


def test_restatement_eps_clamps_each_norm():
    """torch 2.13 clamps each norm at eps separately: a zero vector gives 0, a tiny one is scaled."""
    tiny = np.full(16, 1e-12, F32)
    other = np.arange(16, dtype=F32)
    for a, b in ((np.zeros(16, F32), other), (tiny, other), (tiny, tiny)):
        want = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=0).item()
        assert cosine_similarity_restated(a, b) == F32(want)
    got = np.asarray(OC.torch_cosine_similarity(jnp.asarray(np.stack([tiny, tiny])), jnp.asarray(np.stack([tiny, other]))))
    assert got.tolist() == [cosine_similarity_restated(tiny, tiny), cosine_similarity_restated(tiny, other)]


@pytest.mark.parametrize("n", [5, 16, 36, 256, 1000, 16384])
def test_ours_equals_restatement_on_random_vectors(n):
    rng = np.random.default_rng(100 + n)
    a = rng.standard_normal((6, n)).astype(F32) * F32(3)
    b = (a + rng.standard_normal((6, n)).astype(F32) * F32(1e-3)).astype(F32)
    norm, total = np.asarray(OC.torch_vector_norm(jnp.asarray(a))), np.asarray(OC.torch_sum(jnp.asarray(a)))
    cos = np.asarray(OC.torch_cosine_similarity(jnp.asarray(a), jnp.asarray(b)))
    for i in range(6):
        assert total[i] == sum_restated(a[i]) and cos[i] == cosine_similarity_restated(a[i], b[i])
        if n % 4 == 0:  # the documented exception: torch fuses the last n % 4 squares
            assert norm[i] == norm_restated(a[i])


def test_official_signal_bit_for_bit_on_recorded_latents(signals):
    """On latents of the official record pass, ours == numpy restatement == torch, every bit; near
    convergence the signal is a small multiple of 2^-24 with ties, which the stable formula smooths."""
    from_torch, restated, ours = signals
    assert np.array_equal(restated.view(np.int32), from_torch.view(np.int32))
    assert np.array_equal(ours.view(np.int32), restated.view(np.int32))
    small = ours[ours < 0.5].astype(np.float64)
    assert small.size and np.all(small / ULP1 == np.round(small / ULP1))
    assert np.mean(ours < 64 * ULP1) > 0.1, "the tiny trajectory should reach the quantized regime"


def test_stable_formula_differs_where_the_official_one_is_quantized(recorded, signals):
    _, _, ours = signals
    stable = np.asarray(jax.vmap(S.cosine_distance)(jnp.asarray(recorded[1:]), jnp.asarray(recorded[:-1])))
    tail = ours < 64 * ULP1
    assert not np.array_equal(stable[tail], ours[tail])
    np.testing.assert_allclose(stable, ours, atol=64 * ULP1)


def _argrelextrema_less(c):
    """scipy.signal.argrelextrema(c, np.less) (order 1, mode 'clip') restated: strict on both sides,
    so a plateau is no minimum; the end points never are."""
    return [k for k in range(1, len(c) - 1) if c[k] < c[k - 1] and c[k] < c[k + 1]]


def _official_index(c):
    minima = _argrelextrema_less(np.asarray(c, np.float64))
    if not minima:
        return 5
    return minima[1] if minima[0] == 1 and len(minima) >= 2 else minima[0]


TIES = {
    "plateau is no minimum": [9, 5, 5, 7, 8, 9, 9],
    "plateau then a strict minimum": [9, 5, 5, 7, 6, 8, 9],
    "first minimum at 1, a second after a tie": [9, 4, 6, 6, 5, 7, 8],
    "only minimum at 1": [9, 4, 6, 7, 8, 9, 9],
    "flat": [3, 3, 3, 3, 3, 3, 3],
    "quantized tail": [0.02, 0.01, 0.005, 63, 40, 40, 14, 14, 15, 14, 20],
}


@pytest.mark.parametrize("name", sorted(TIES))
def test_official_rule_on_ties(name):
    c = np.asarray(TIES[name], np.float64)
    c = np.where(c >= 1, c * ULP1, c).astype(F32)  # the quantized values as multiples of 2^-24
    assert G.latent_cosine_transition_index(c) == _official_index(c) == official_og_index(c)


def test_official_rule_on_recorded_signals(signals):
    """The index our exact mode takes from the official-precision signal is the official one; scipy's
    argrelextrema (the official script's call) agrees with the restatement where installed."""
    _, _, ours = signals
    for c in ours.T:
        assert G.latent_cosine_transition_index(c) == _official_index(c)
    try:
        from scipy.signal import argrelextrema
    except ImportError:
        return
    for c in ours.T:
        assert list(argrelextrema(np.array([float(v) for v in c]), np.less)[0]) == _argrelextrema_less(c)


def test_precision_option_validation():
    g = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", precision="official")
    assert g.precision == "official" and g.describe()["precision"] == "official"
    assert G.dynamic_transition(-7.5, 7.5, signal="latent_cosine").precision == "stable"
    assert G.dynamic_transition(1.0, 7.5).precision is None and "precision" not in G.static_transition(500, 0, 7.5).describe()
    with pytest.raises(ValueError, match="precision applies only to signal='latent_cosine'"):
        G.dynamic_transition(1.0, 7.5, precision="official")
    with pytest.raises(ValueError, match="unknown precision"):
        G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", precision="float64")
    mixed = [g, G.dynamic_transition(-7.5, 7.5, signal="latent_cosine")]
    with pytest.raises(ValueError, match="cannot mix detector kinds"):  # precision is a static detector field
        G.plan(mixed, 2, np.arange(10)[::-1] * 100)
    assert G.plan(g, 2, np.arange(10)[::-1] * 100).detector.pass_detector().precision == "official"


OFFICIAL = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="exact", precision="official")
OFFICIAL_KW = dict(num_inference_steps=STEPS, scheduler="dpm++2m", progress=False, decode=False)


@pytest.fixture(scope="module")
def official_run(pipe_sd1):
    """precision="official" through Pipeline.generate on PROMPTS in one batch: (noise, result); the
    two tests below share it (one compiled batch-of-4 sampler)."""
    noise = np.random.default_rng(3).standard_normal((len(PROMPTS), 4, 8, 8)).astype(F32)
    return noise, pipe_sd1.generate(PROMPTS, OFFICIAL, latents=noise, **OFFICIAL_KW)


def test_pipeline_official_precision(official_run):
    """precision="official" through Pipeline.generate (exact mode): the recorded signal is the
    official quantized one, the transition is the official rule's index on it, and the scale is a
    constant -7.5 before it (the official script flips the sign at every step) and 7.5 from it on."""
    _, res = official_run
    c = res.latent_cosine
    small = c[c < 0.5].astype(np.float64)
    assert small.size and np.all(small / ULP1 == np.round(small / ULP1))
    for b in range(len(PROMPTS)):
        k = res.transition_index[b]
        assert k == _official_index(c[b])
        assert np.all(res.guidance_scale[b, :k] == -7.5) and np.all(res.guidance_scale[b, k:] == 7.5)


def test_pipeline_official_precision_is_independent_of_the_batch(pipe_sd1, official_run):
    """Same prompts and noise in one batch and in batches of 1: the official signal, its index and
    the scales are the same bits. Its minima are rounding ties, so the recording pass runs the UNet
    one row at a time and the prompts are encoded one at a time (XLA:CPU's kernels depend on the
    batch shape)."""
    noise, batched = official_run
    alone = pipe_sd1.generate(PROMPTS, OFFICIAL, latents=noise, batch_size=1, **OFFICIAL_KW)
    np.testing.assert_array_equal(batched.latent_cosine, alone.latent_cosine)
    np.testing.assert_array_equal(batched.transition_index, alone.transition_index)
    np.testing.assert_array_equal(batched.guidance_scale, alone.guidance_scale)

"""Fixed-point arithmetic: each operation against Python integers or a float reference."""

import math

import torch

from vqvae.fixedpoint import exp2_neg, exp2_tables, isqrt, layer_norm, requant


def test_isqrt_is_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.cat([torch.randint(0, 1 << 62, (2000,), generator=g), torch.arange(0, 200),
                   torch.tensor([(1 << 31) ** 2 - 1, (1 << 31) ** 2, (3037000499) ** 2, 3037000499 ** 2 - 1])])
    q = q[q < 1 << 62]
    assert isqrt(q).tolist() == [math.isqrt(v) for v in q.tolist()]


def test_requant_rounds_exactly():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(1 << 40), 1 << 40, (1000,), generator=g)
    mult, shift = torch.tensor(1234567), torch.tensor(37)
    expected = [math.floor(a * 1234567 / 2**37 + 0.5) for a in acc.tolist()]  # half up
    exact = [(a * 1234567 + (1 << 36)) >> 37 for a in acc.tolist()]  # Python ints: no rounding at all
    assert requant(acc, mult, shift).tolist() == exact
    assert sum(e != x for e, x in zip(expected, exact)) == 0


def test_exp2_table_approximates_two_to_the_minus_z():
    hi, lo = exp2_tables()
    z = torch.cat([torch.arange(0, 1 << 17, 7), torch.tensor([(30 << 16) + 5, 40 << 16, 1 << 40])])
    e = exp2_neg(z, hi, lo).double()
    ref = 2.0**30 * torch.pow(2.0, -z.double() / 2**16)
    assert int(e[0]) == 1 << 30
    assert float((e - ref).abs().max()) <= 2.0  # two rounded table entries, a rounded product, a floor
    assert bool((e[:-1] >= e[1:]).all())  # monotone


def test_layer_norm_matches_float():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-(1 << 19), 1 << 19, (50, 64), generator=g)
    x[0] = 5  # constant row: eps keeps it finite, output 0
    x[1] = torch.randint(-3, 4, (64,), generator=g)  # tiny deviations
    s, eps, frac = 1e-4, 1e-5, 15
    y = layer_norm(x, torch.tensor(max(1, round(eps * 64 * 64 / s**2))), frac, 0)
    ref = torch.nn.functional.layer_norm(x.double() * s, (64,), eps=eps) * 2**frac
    assert float((y.double() - ref).abs().max()) <= 1.0 + 1e-5 * float(ref.abs().max())
    assert bool((y[0] == 0).all())

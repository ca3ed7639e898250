"""Counter-based seeded noise (engine/csrc/philox.h, noise.cpp): Philox 4x32-10 against
Random123's known answers, the Box-Muller map recomputed here in Python, pinned values, and
independence from batch size and position."""
import math

import pytest
import torch

from admrt import core

# Random123 kat_vectors, philox4x32_10: (counter, key) -> output.
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert core.philox4x32_10(counter, key) == expected


def _box_muller(bits):
    out = []
    for p in range(2):
        u1, u2 = ((bits[2 * p + j] + 0.5) / 2 ** 32 for j in range(2))
        r = math.sqrt(-2 * math.log(u1))
        out += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    return out


def test_normals_are_box_muller_of_philox_keyed_by_seed_draw_element():
    """normal(seed, draw, e) = lane e % 4 of BoxMuller(Philox(ctr = (e // 4, draw), key = seed))."""
    seed, draw = 0x0123456789ABCDEF, 7
    got = core.seeded_normal(torch.tensor([seed]), [10], draw)[0]
    for group in range(3):
        ctr = [group, 0, draw, 0]
        key = [seed & 0xFFFFFFFF, seed >> 32]
        expected = _box_muller(core.philox4x32_10(ctr, key))
        n = min(4, 10 - 4 * group)
        torch.testing.assert_close(got[4 * group:4 * group + n], torch.tensor(expected[:n], dtype=torch.float32),
                                   rtol=0, atol=1e-6)


def test_pinned_values():
    """Changing the map changes every seeded image: these numbers are part of the format."""
    a = core.seeded_normal(torch.tensor([0, -1]), [3], 0)   # -1: the seed 2**64 - 1
    torch.testing.assert_close(a, torch.tensor([[0.991137683391571, -0.9246625900268555, -0.6176089644432068],
                                                [1.0985957384109497, 0.6323022246360779, 0.645859956741333]]),
                               rtol=0, atol=1e-7)
    b = core.seeded_normal(torch.tensor([7]), [2, 3], 25)
    torch.testing.assert_close(b[0, 1], torch.tensor([-1.2794241905212402, -0.5642072558403015, -1.9863845109939575]),
                               rtol=0, atol=1e-7)


def test_same_numbers_at_every_batch_size_and_position():
    seeds = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])
    full = core.seeded_normal(seeds, [3, 5, 5], 4)
    for bs in (1, 3, 8):
        for start in range(0, 8, bs):
            part = core.seeded_normal(seeds[start:start + bs], [3, 5, 5], 4)
            assert torch.equal(part, full[start:start + bs])
    shuffled = core.seeded_normal(seeds.flip(0), [3, 5, 5], 4)
    assert torch.equal(shuffled, full.flip(0))


def test_draws_seeds_and_elements_are_independent_normals():
    seeds = torch.arange(64)
    a = core.seeded_normal(seeds, [3, 32, 32], 1)
    b = core.seeded_normal(seeds, [3, 32, 32], 2)
    c = core.seeded_normal(seeds + 64, [3, 32, 32], 1)
    for x in (a, b, c):
        assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
        assert abs((x.flatten() ** 4).mean().item() - 3) < 0.1   # normal kurtosis
    for x, y in ((a, b), (a, c), (a[:, :, :, :-1], a[:, :, :, 1:])):
        assert abs(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].item()) < 0.01


@pytest.mark.gpu
def test_cpu_and_cuda_give_the_same_noise():
    """The same integer stream on both devices; normals equal within 1e-6 (transcendentals may
    round differently)."""
    seeds = torch.tensor([0, 1, 2 ** 40, -5, 123456789])
    cpu = core.seeded_normal(seeds, [3, 64, 64], 9)
    cuda = core.seeded_normal(seeds.cuda(), [3, 64, 64], 9).cpu()
    assert (cpu - cuda).abs().max().item() <= 1e-6

"""Spatial entropy (paper §6.1) and neighbouring-difference maps (§6.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fullsparse.analysis.inputs import white_noise
from fullsparse.analysis.neighbors import (
    adjacent_difference,
    default_layers,
    neighbor_maps,
    pair_reconstruction,
    reconstruction_errors,
    relative_reconstruction_error,
)
from fullsparse.analysis.similarity import (
    adjacent_pairs,
    entropy_bits,
    format_similarity,
    layer_similarity,
    quantize,
    spatial_entropy,
)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.fc(x.mean((2, 3)))


def test_entropy_of_a_constant_image_is_zero():
    h, h_cond = spatial_entropy(torch.full((2, 3, 8, 8), 0.7))
    assert h.tolist() == [0.0, 0.0]
    assert h_cond.tolist() == [0.0, 0.0]


def test_entropy_of_uniform_8bit_noise_is_near_8_bits():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1, 1, 512, 512), generator=g).float()
    h, h_cond = spatial_entropy(noise)
    # 131,072 samples over 256 bins: the plug-in estimate is within ~0.003 bits of 8
    assert 7.99 < float(h[0]) <= 8.0
    assert float(h_cond[0]) <= float(h[0]) + 1e-9


def test_quantize_maps_each_8bit_level_to_its_own_bin():
    levels = torch.arange(256.0).reshape(1, 1, 16, 16)
    assert torch.equal(quantize(levels).flatten(), torch.arange(256))
    assert quantize(torch.full((2, 5), -3.0)).eq(0).all()  # constant sample -> one bin


def test_quantization_range_is_per_sample():
    x = torch.stack([torch.linspace(0, 1, 64), torch.linspace(0, 1000, 64)]).reshape(2, 1, 8, 8)
    codes = quantize(x)
    assert torch.equal(codes[0], codes[1])  # same shape of values, different scales


def test_conditional_entropy_never_exceeds_entropy():
    torch.manual_seed(0)
    for x in (
        torch.randn(4, 3, 9, 9),  # odd width: the last column has no partner
        torch.randn(4, 2, 6, 6).relu(),
        torch.randint(0, 3, (4, 1, 10, 10)).float(),
        torch.randn(3, 1, 4, 64).cumsum(-1),  # smooth rows: strong neighbour similarity
    ):
        h, h_cond = spatial_entropy(x)
        assert (h_cond >= -1e-12).all()
        assert (h_cond <= h + 1e-9).all(), (h, h_cond)


def test_identical_column_pairs_leave_no_uncertainty():
    x = torch.randn(2, 4, 8, 5).repeat_interleave(2, dim=-1)  # columns 2j == 2j+1
    h, h_cond = spatial_entropy(x)
    assert (h > 4).all()
    assert h_cond.abs().max() < 1e-12


def test_adjacent_pairs_are_width_neighbours_without_wrap():
    x = torch.arange(7.0).reshape(1, 1, 1, 7)
    dropped, kept = adjacent_pairs(x)
    assert dropped.flatten().tolist() == [1.0, 3.0, 5.0]
    assert kept.flatten().tolist() == [0.0, 2.0, 4.0]


def test_entropy_bits_of_a_fair_coin_and_of_four_equal_cells():
    assert float(entropy_bits(torch.tensor([5, 5]))) == pytest.approx(1.0)
    assert float(entropy_bits(torch.tensor([1, 1, 0, 1, 1]))) == pytest.approx(2.0)


def test_joint_entropy_matches_a_hand_count():
    # pairs (dropped, kept): (1,0) (1,0) (0,1) (1,1): H(X)=H(3/4,1/4), H(X')=H(1/2,1/2),
    # H(X,X')=H(1/2,1/4,1/4)=1.5 -> H(X|X') = 0.5
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]]).reshape(1, 1, 1, 8)
    h, h_cond = spatial_entropy(x, bins=2)
    p = torch.tensor([0.75, 0.25])
    assert float(h[0]) == pytest.approx(float(-(p * p.log2()).sum()))
    assert float(h_cond[0]) == pytest.approx(0.5)


def test_layer_similarity_covers_every_conv_input_and_pools_images():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images = torch.randn(6, 1, 12, 12)
    result = layer_similarity(model, images, batch_size=4)  # two batches: 4 + 2
    assert [r.name for r in result.layers] == ["conv1", "conv2", "conv3"]
    conv1 = result.layers[0]
    assert conv1.shape == (1, 12, 12) and conv1.pairs == 72 and conv1.images == 6
    h, h_cond = spatial_entropy(images)
    assert conv1.h == pytest.approx(float(h.mean()))
    assert conv1.h_cond == pytest.approx(float(h_cond.mean()))
    for row in result.layers:
        assert row.h_cond <= row.h + 1e-9
        assert row.pooled_h_cond <= row.pooled_h + 1e-9
    text = format_similarity([result])
    assert "| conv2 | 8×12×12 | 576 |" in text


def test_smooth_inputs_show_more_similarity_than_white_noise():
    # 16 bins (256 joint cells) so that 32 images × 128 pairs estimate them without much bias
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(32, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear"
    )
    model = TinyCNN().eval()
    natural = layer_similarity(model, smooth, inputs="natural", bins=16)
    noisy = white_noise(smooth, (0.5,), (0.25,), seed=1)
    noise = layer_similarity(model, noisy, inputs="noise", bins=16)
    assert natural.layers[0].pooled_similarity > 1.0
    assert noise.layers[0].pooled_similarity < 0.2


def test_unknown_layer_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="no Conv2d named nope; conv layers: conv1, conv2"):
        layer_similarity(TinyCNN(), torch.randn(2, 1, 8, 8), layers=["nope"])


def test_width_one_layers_report_no_pairs():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2 * 4, 2)).eval()
    row = layer_similarity(model, torch.randn(3, 1, 4, 1)).layers[0]
    assert row.pairs == 0 and math.isnan(row.h)


# ------------------------------------------------------------------------- neighbours
def test_reconstruction_is_exact_for_identical_column_pairs():
    x = torch.randn(3, 6, 4).repeat_interleave(2, dim=-1)
    assert torch.equal(pair_reconstruction(x), x)
    assert relative_reconstruction_error(x).abs().max() == 0.0


def test_reconstruction_copies_even_columns_and_keeps_an_unpaired_last_one():
    x = torch.arange(5.0).reshape(1, 5)
    assert pair_reconstruction(x).tolist() == [[0.0, 0.0, 2.0, 2.0, 4.0]]
    assert adjacent_difference(x).tolist() == [[-1.0, -1.0, -1.0, -1.0]]


def test_relative_reconstruction_error_by_hand():
    x = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])  # X^r = [[1, 1], [0, 0]]
    assert float(relative_reconstruction_error(x)[0]) == pytest.approx(2.0 / math.sqrt(10.0))
    assert float(relative_reconstruction_error(torch.zeros(1, 2, 2))[0]) == 0.0


def test_neighbor_maps_pick_the_highest_variance_channel():
    model = TinyCNN().eval()
    image = torch.zeros(1, 10, 10)
    image[0, :, 5:] = 1.0
    maps = neighbor_maps(model, image, layers=["conv1", "conv3"])
    assert [m.layer for m in maps] == ["conv1", "conv3"]
    assert maps[0].channel == 0 and maps[0].x.shape == (10, 10)
    assert maps[0].x_ad.shape == (10, 9) and maps[0].input_shape == (1, 10, 10)
    assert maps[1].x.shape == (10, 10) and maps[1].input_shape == (8, 10, 10)
    assert torch.equal(maps[0].x, image[0])  # conv1's input is the image itself
    errors = reconstruction_errors(model, image.unsqueeze(0).repeat(3, 1, 1, 1), ["conv1"])
    assert errors["conv1"]["images"] == 3
    assert errors["conv1"]["mean"] == pytest.approx(maps[0].rel_error)


def test_default_layers_spread_over_depth():
    model = nn.Sequential(*[nn.Conv2d(4, 4, 3) for _ in range(9)], nn.Conv2d(4, 4, 1))
    assert default_layers(model, 5) == ["0", "2", "4", "6", "8"]
    assert default_layers(TinyCNN(), 5) == ["conv1", "conv2", "conv3"]

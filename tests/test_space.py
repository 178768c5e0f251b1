import pytest
import torch
import torch.nn.functional as F

from betanas_fast._rules import conv_out_size
from betanas_fast.nn import MBConv, Net
from betanas_fast.space import SKIP, build_space, count_skip_blocks, expanded_channels, parse_candidate


def test_mobile_space_shape():
    sp = build_space("mobile")
    assert sp.num_blocks == 21
    assert count_skip_blocks(sp) == 15
    assert sp.candidate_names == ["mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6", SKIP]
    assert [b.out_channels for b in sp.blocks][:5] == [24, 24, 24, 24, 40]
    assert sp.blocks[0].stride == 2 and sp.blocks[12].stride == 1 and sp.blocks[12].in_channels == 80
    assert sp.head_channels == 1280 and sp.config.num_classes == 1000


def test_demo_space_same_kinds():
    demo, mobile = build_space("demo"), build_space("mobile")
    assert demo.candidate_names == mobile.candidate_names
    assert demo.config.resolution == 32 and 0 < count_skip_blocks(demo) < demo.num_blocks < mobile.num_blocks


def test_block_strings_round_trip():
    sp = build_space("mobile")
    arch = [0] * sp.num_blocks
    arch[4] = sp.index_of("mb_k5_e6")
    arch[5] = sp.index_of(SKIP)
    strings = sp.arch_strings(arch)
    assert strings[4] == "ir_r1_k5_s2_e6_c40" and strings[5] == "skip"
    assert sp.arch_from_strings(strings) == arch


def test_configurable():
    sp = build_space("mobile", width_mult=0.5, resolution=160, num_classes=7, stage_depths=[1, 2, 2, 1, 1, 1],
                     candidates=["mb_k3_e3", SKIP])
    assert sp.num_blocks == 8 and sp.num_candidates == 2 and sp.config.num_classes == 7
    assert sp.blocks[0].out_channels == 16  # 24 * 0.5 rounded to a multiple of 8


def test_unknown_candidate_rejected():
    with pytest.raises(ValueError, match="unknown candidate name 'mb_k9_e6'"):
        parse_candidate("mb_k9_e6")
    with pytest.raises(ValueError, match="unknown candidate name 'conv3'"):
        build_space("demo", candidates=["conv3", SKIP])


def test_identity_where_shapes_change_rejected():
    with pytest.raises(ValueError, match="'skip' needs stride 1 and equal channels"):
        build_space("demo", candidates=[SKIP])
    sp = build_space("demo")
    arch = [0] * sp.num_blocks
    arch[0] = sp.index_of(SKIP)  # block 0 has stride 2
    with pytest.raises(ValueError, match="not allowed"):
        Net(sp, arch)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_conv_out_size_is_torchs_for_odd_kernels(k, stride):
    for size in range(1, 12):
        out = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k), stride=stride, padding=k // 2)
        assert out.shape[-1] == conv_out_size(size, stride), (size, k, stride)


def test_blocks_and_modules_share_the_space_shapes():
    sp = build_space("demo")
    for b in sp.blocks:
        for c in sp.candidates:
            if c.is_skip:
                continue
            block = MBConv(b.in_channels, b.out_channels, c.kernel_size, b.stride, c.expand_ratio)
            assert block.depthwise.conv.in_channels == expanded_channels(b.in_channels, c.expand_ratio)
            x = torch.zeros(2, b.in_channels, b.in_resolution, b.in_resolution)
            assert block.eval()(x).shape[-1] == b.out_resolution

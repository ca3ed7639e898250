"""Dispatch of admrt.kernels in an ordinary (non-interpreter) CPU process."""
from __future__ import annotations

import logging

import pytest
import torch

import admrt.kernels as K


def _gn_args():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4)
    return x, torch.randn(64), torch.randn(64)


@pytest.mark.skipif(K.INTERPRET or torch.cuda.is_available(), reason="CPU-only dispatch check")
def test_cpu_falls_back_to_reference_with_one_warning(caplog):
    x, w, b = _gn_args()
    K._warned.clear()
    with caplog.at_level(logging.WARNING, logger="admrt.kernels"):
        y1 = K.group_norm_act(x, w, b)
        y2 = K.group_norm_act(x, w, b)
    torch.testing.assert_close(y1, K.group_norm_act_reference(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    msgs = [r.getMessage() for r in caplog.records if "group_norm_act" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0], msgs


@pytest.mark.skipif(K.INTERPRET or torch.cuda.is_available(), reason="CPU-only dispatch check")
def test_auto_is_the_reference_on_cpu_without_a_warning(caplog):
    x, w, b = _gn_args()
    K._warned.clear()
    with caplog.at_level(logging.WARNING, logger="admrt.kernels"):
        y = K.group_norm_act(x, w, b, fused="auto")
    torch.testing.assert_close(y, K.group_norm_act_reference(x, w, b), rtol=0, atol=0)
    assert not [r for r in caplog.records if r.name == "admrt.kernels"]


@pytest.mark.skipif(K.INTERPRET or torch.cuda.is_available(), reason="CPU-only dispatch check")
def test_require_raises_without_device():
    x, w, b = _gn_args()
    with pytest.raises(RuntimeError, match="fused kernel required"):
        K.group_norm_act(x, w, b, fused="require")
    with pytest.raises(RuntimeError, match="fused kernel required"):
        K.qkv_attention(torch.randn(1, 3 * 64, 8), 1, legacy_order=True, fused="require")


def test_fused_false_is_reference_and_bad_flag_rejected():
    x, w, b = _gn_args()
    torch.testing.assert_close(K.group_norm_act(x, w, b, fused=False),
                               K.group_norm_act_reference(x, w, b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused="):
        K.group_norm_act(x, w, b, fused="yes")


def test_argument_errors_name_the_argument():
    x, w, b = _gn_args()
    with pytest.raises(ValueError, match="num_groups"):
        K.group_norm_act(x, w, b, num_groups=7, fused=False)
    with pytest.raises(ValueError, match="scale and shift"):
        K.group_norm_act(x, w, b, scale=torch.zeros(2, 64), fused=False)
    with pytest.raises(ValueError, match="qkv width"):
        K.qkv_attention(torch.randn(1, 100, 8), 4, legacy_order=True, fused=False)


@pytest.mark.skipif(not K._group_norm.HAS_TRITON, reason="needs triton")
def test_custom_ops_registered():
    for name in ("group_norm_act_fwd", "group_norm_act_bwd", "qkv_attention_fwd", "qkv_attention_bwd"):
        assert hasattr(torch.ops.admrt, name), name

"""The QnA layer's NumPy reference (fused logits, -inf-padded window slices) against the PyTorch reference
written from the official formulation (materialised keys, grouped convolutions of exps), in float64: this also
checks the engine layout (tests/reference/qna_torch.engine_weights) and the load-time fold of the queries."""
import math

import numpy as np
import pytest
from hypothesis import given

from qnalo.kernels import qna
from test_kernels_qna import cases, real_and_edge_examples
from tolerances import assert_close

torch = pytest.importorskip("torch")
from reference.qna_torch import FusedKQnA, engine_weights, randomize_  # noqa: E402


def _run(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale):
    # key_scale * |unit query . key| / sqrt(hd) on unit inputs: logits ~ N(0, logit_scale^2)
    module = randomize_(FusedKQnA(c, heads * hd, heads, k, stride, nq).double(), seed=seed,
                        key_scale=logit_scale * math.sqrt(hd))
    x = np.random.default_rng(seed).standard_normal((b, h, w, c))
    with torch.no_grad():
        ref = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    out = qna.qna_attention_ref(x, heads=heads, stride=stride, **engine_weights(module.state_dict(), heads))
    return out, ref


@given(**cases)
@real_and_edge_examples
def test_qna_reference_vs_torch(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale):
    out, ref = _run(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale)
    assert_close(out, ref, "qna", "float64")


def test_queries_are_normalised_as_the_official_code():
    # official semantics: q_param is raw; scaling a query's head block by any factor changes nothing but the
    # +1e-6 in its norm (a pre-normalised DAT q_param would be normalised once more: ~1e-6 relative)
    module = randomize_(FusedKQnA(6, 8, 2, 3, 1, 2).double(), seed=1)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 6, 5, 5)))
    with torch.no_grad():
        before = module(x)
        module.q_param[:, :4].mul_(1e3)
        after = module(x)
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(after, before)


def test_parameter_names_and_shapes_follow_the_dat_port():
    shapes = {n: tuple(p.shape) for n, p in FusedKQnA(64, 128, 16, 3, 2, 2).state_dict().items()}
    assert shapes == {"proj_k.weight": (128, 64), "proj_v.weight": (128, 64), "proj_out.weight": (128, 128, 1, 1),
                      "q_param": (2, 128), "attn_scale": (1, 1, 9, 32), "rpb_table": (9, 32)}

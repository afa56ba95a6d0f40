"""Rollout with measured residual mixing (Kobayashi et al. 2021) against a plain float64 loop.

w_li = ‖a_li‖ / (‖a_li‖ + ‖x_li‖);  Â_l[i] = rownorm(w_li·Ā_l[i]·keep + (1 - w_li)·e_i);  R = Â_L ··· Â_1.
The tiny-model test measures a and x from the model itself (hooks on the attention module, hidden states).
"""

from __future__ import annotations

import pytest
import torch

import attnflow.flow as F
from attnflow.errors import BadArgumentError, ShapeError
from tiny_models import eager_copy, eager_run, prompts_ids, tiny_model


def loop_reference(A, a_norm, x_norm, exclude=()):
    """Plain Python loops over one example: A [layer, head, N, N], norms [layer, N]."""
    L, H, N, _ = A.shape
    R = [[1.0 if i == j else 0.0 for j in range(N)] for i in range(N)]
    for l in range(L):
        M = [[0.0] * N for _ in range(N)]
        for i in range(N):
            a, x = float(a_norm[l, i]), float(x_norm[l, i])
            w = a / (a + x) if a + x else 0.0
            row = [sum(float(A[l, h, i, j]) for h in range(H)) / H for j in range(N)]
            row = [0.0 if j in exclude else v for j, v in enumerate(row)]
            s = sum(row)
            row = [v / s if s else 0.0 for v in row]
            row = [w * v + (1 - w) * (i == j) for j, v in enumerate(row)]
            s = sum(row)
            M[i] = [v / s for v in row]
        R = [[sum(M[i][k] * R[k][j] for k in range(N)) for j in range(N)] for i in range(N)]
    return torch.tensor(R, dtype=torch.float64)


def random_case(seed=0, B=2, L=3, H=2, N=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(B, L, H, N, N, generator=g, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)
    a = torch.rand(B, L, N, generator=g, dtype=torch.float64) * 3
    x = torch.rand(B, L, N, generator=g, dtype=torch.float64) * 3
    return A, a, x


def test_matches_a_plain_loop_with_and_without_exclusion():
    A, a, x = random_case()
    for exclude in ((), (0,), (0, 2)):
        got = F.measured_rollout(A, a, x, exclude_keys=exclude)
        for b in range(A.shape[0]):
            torch.testing.assert_close(got[b], loop_reference(A[b], a[b], x[b], exclude), rtol=1e-12, atol=1e-14)
        rows = F.measured_rollout(A, a, x, rows=[-1, 2], exclude_keys=exclude)  # top-down
        torch.testing.assert_close(rows, got[:, [-1, 2]], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(F.compose(A, "rollout_measured", attn_norms=a, residual_norms=x, exclude_keys=exclude), got)


def test_equal_norms_are_alpha_one_half_and_constant_ratio_is_alpha():
    A, a, _ = random_case(seed=1)
    torch.testing.assert_close(F.measured_rollout(A, a, a), F.rollout(A, alpha=0.5), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(F.measured_rollout(A, 3 * a, a), F.rollout(A, alpha=0.75), rtol=1e-12, atol=1e-14)


def test_key_mask_padding_and_mask_exclusion():
    A, a, x = random_case(seed=2, B=1)
    P = torch.zeros(1, 3, 2, 8, 8, dtype=torch.float64)
    P[..., 2:, 2:] = A
    pa, px = torch.zeros(1, 3, 8, dtype=torch.float64), torch.zeros(1, 3, 8, dtype=torch.float64)
    pa[..., 2:], px[..., 2:] = a, x
    mask = torch.tensor([[0, 0] + [1] * 6])
    drop = torch.zeros(1, 8, dtype=torch.bool)
    drop[0, 2] = drop[0, 5] = True  # keys 0 and 3 of the example, as a key mask in padded coordinates
    got = F.measured_rollout(P, pa, px, key_mask=mask, exclude_keys=drop)
    torch.testing.assert_close(got[0, 2:, 2:], loop_reference(A[0], a[0], x[0], (0, 3)), rtol=1e-12, atol=1e-14)
    assert not got[0, :2].any()


@pytest.fixture(scope="module")
def measured():
    model = eager_copy(tiny_model("llama", seed=4)).double()
    ids = prompts_ids((8,), seed=2)[0]
    res, outs = eager_run(model, ids)
    A = torch.stack([t[0] for t in res.attentions])  # [layer, head, q, k]
    a = torch.stack([outs[l].norm(dim=-1) for l in range(len(outs))])  # [layer, query]: ‖attention output‖
    x = torch.stack([res.hidden_states[l][0].norm(dim=-1) for l in range(len(outs))])  # ‖residual input‖
    return A, a, x


def test_tiny_model_norms_against_the_loop(measured):
    A, a, x = measured
    got = F.measured_rollout(A[None], a[None], x[None], exclude_keys=(0,))[0]
    torch.testing.assert_close(got, loop_reference(A, a, x, (0,)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(-1), torch.ones(A.shape[-1], dtype=torch.float64))
    assert (got - F.rollout(A[None], exclude_keys=(0,))[0]).abs().max() > 1e-3  # the measured weights matter


def test_errors():
    A, a, x = random_case()
    with pytest.raises(ShapeError, match="attn_norms have shape"):
        F.measured_rollout(A, a[..., :3], x)
    with pytest.raises(BadArgumentError, match="non-negative"):
        F.measured_rollout(A, -a, x)
    with pytest.raises(BadArgumentError, match="needs attn_norms"):
        F.compose(A, "rollout_measured")
    assert F.mixing_weights(torch.zeros(2), torch.zeros(2)).tolist() == [0.0, 0.0]

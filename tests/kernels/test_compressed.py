import pytest
import torch
from sfa_oracle import oracle_keep

from sfa_compile import densify, sparsify


@pytest.mark.parametrize("head_dim,topk,idx_dtype",
                         [(8, 3, torch.uint8), (256, 16, torch.uint8), (300, 7, torch.int16)])
def test_round_trip_matches_topk(head_dim, topk, idx_dtype):
    torch.manual_seed(head_dim)
    x = torch.randn(2, 3, 5, head_dim, dtype=torch.bfloat16)
    c = sparsify(x, topk)
    assert c.indices.dtype == idx_dtype and c.values.dtype == torch.bfloat16
    assert c.values.shape == c.indices.shape == (2, 3, 5, topk)
    assert bool((c.indices.long().diff(dim=-1) > 0).all()), "indices ascending per row"
    expected = torch.where(oracle_keep(x.double(), topk), x, torch.zeros((), dtype=x.dtype))
    assert torch.equal(c.to_dense(), expected)
    assert torch.equal(densify(c.values, c.indices, head_dim), expected)
    assert c.nbytes == x.numel() // head_dim * topk * (2 + idx_dtype.itemsize)


def test_ties_go_to_lower_index():
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0]])
    c = sparsify(x, 2)
    assert c.indices.tolist() == [[1, 2]] and c.values.tolist() == [[-2.0, 2.0]]


@pytest.mark.parametrize("bad", [0, 9, 2.0])
def test_bad_topk(bad):
    with pytest.raises(ValueError, match=r"topk must be an integer in \[1, head dim = 8\]"):
        sparsify(torch.randn(3, 8), bad)


def test_densify_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        densify(torch.randn(3, 2), torch.zeros(3, 3, dtype=torch.uint8), 8)

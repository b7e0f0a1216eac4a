import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_fedprune.pruning.patterns import PATTERNS, expand_groups, groups_from_mask, num_groups
from lightning_fedprune.federated.wire import (
    STRUCTURED_PATTERNS,
    EncodedTensor,
    Payload,
    decode_state,
    decode_tensor,
    dense_nbytes,
    encode_state,
    encode_tensor,
)

SHAPES = [(8, 6), (6, 4, 3, 2), (10,), (4, 2, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]


def _tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape, generator=g)
    # +1 keeps every value away from 0 so "kept" and "pruned" are distinguishable
    return (torch.randn(shape, generator=g).abs() + 1).to(dtype)


def _random_mask(shape, pattern, frac=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = num_groups(pattern, shape)
    flags = torch.rand(n, generator=g) < frac
    return expand_groups(flags, pattern, shape)


def _applicable(shape, pattern):
    R = shape[0]
    C = math.prod(shape[1:])
    return not ((pattern == "half_row" and C % 2) or (pattern == "half_column" and R % 2))


CASES = [(s, p) for s in SHAPES for p in PATTERNS if _applicable(s, p)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,pattern", CASES, ids=lambda x: str(x))
def test_roundtrip_every_kind(shape, pattern, dtype):
    t = _tensor(shape, dtype)
    mask = _random_mask(shape, pattern)
    enc = encode_tensor(t, mask, pattern)
    assert enc.kind == pattern and enc.shape == tuple(shape) and enc.dtype == str(dtype)[6:]
    assert all(isinstance(a, np.ndarray) for a in enc.arrays.values())
    assert enc.nbytes == sum(a.nbytes for a in enc.arrays.values())
    out = decode_tensor(enc)
    assert out.dtype == dtype and out.shape == t.shape
    expected = torch.where(mask, t, torch.zeros((), dtype=dtype))
    assert torch.equal(out, expected)
    assert not out[~mask].any()  # pruned entries are exact zeros
    assert torch.equal(enc.mask(), mask)

    # upward direction: values only, the mask comes from the server
    up = encode_tensor(t, mask, pattern, send_index=False)
    assert not up.has_index and up.index is None
    assert up.nbytes < enc.nbytes or enc.nbytes == 0
    assert torch.equal(decode_tensor(up, mask), expected)
    with pytest.raises(ValueError, match="send_index=False"):
        decode_tensor(up)

    # through bytes and through arrays + JSON spec
    p = Payload({"w": enc})
    for q in (Payload.from_bytes(p.to_bytes()), Payload.from_arrays(p.to_arrays(), json.loads(json.dumps(p.spec())))):
        assert q.nbytes == p.nbytes
        assert torch.equal(decode_tensor(q["w"]), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(), (0, 3)], ids=str)
def test_dense_roundtrip(shape, dtype):
    t = _tensor(shape, dtype)
    enc = encode_tensor(t)
    assert enc.kind == "dense"
    assert enc.nbytes == t.numel() * t.element_size() == dense_nbytes({"t": t})
    assert torch.equal(decode_tensor(enc), t)
    ((kept, values),) = enc.blocks()  # the 2-D view; a 0-d tensor is (1, 1)
    R = shape[0] if shape else 1
    assert torch.equal(kept, torch.arange(R)) and torch.equal(values, t.reshape(R, math.prod(shape[1:])))


def test_noncontiguous_and_special_values():
    t = torch.randn(6, 8).t()  # non-contiguous
    t[0, 0] = float("nan")
    t[1, 1] = float("inf")
    t[2, 2] = -0.0
    mask = torch.ones_like(t, dtype=torch.bool)
    mask[:, 3] = False
    out = decode_tensor(encode_tensor(t, mask, "column"))
    assert torch.equal(out.view(torch.int32), torch.where(mask, t, torch.zeros(())).view(torch.int32))  # bit-exact


def test_bfloat16_bits_exact():
    t = torch.randn(16, 8).to(torch.bfloat16)
    mask = _random_mask(t.shape, "half_row")
    enc = encode_tensor(t, mask, "half_row")
    assert all(a.dtype in (np.uint16, np.uint8, np.int32) for a in enc.arrays.values())
    expected = torch.where(mask, t, torch.zeros((), dtype=t.dtype))  # +0.0, not -0.0
    assert torch.equal(decode_tensor(enc).view(torch.int16), expected.view(torch.int16))


def test_kept_groups_and_blocks_without_scatter():
    W = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6) + 1
    # row
    mask = expand_groups(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool), "row", W.shape)
    enc = encode_tensor(W, mask, "row")
    assert enc.group_flags().nonzero().reshape(-1).tolist() == [0, 2, 3, 7]
    ((k, v),) = enc.blocks()
    assert torch.equal(v, W[k])
    # column
    mask = expand_groups(torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool), "column", W.shape)
    ((k, v),) = encode_tensor(W, mask, "column").blocks()
    assert k.tolist() == [1, 2, 5] and torch.equal(v, W[:, k])
    # half_row: group h*R + r, block h = columns [h*C/2, (h+1)*C/2)
    flags = torch.zeros(16, dtype=torch.bool)
    flags[[1, 4, 8 + 0, 8 + 4, 8 + 7]] = True
    mask = expand_groups(flags, "half_row", W.shape)
    assert torch.equal(mask[:, :3], flags[:8, None].expand(8, 3))
    assert torch.equal(mask[:, 3:], flags[8:, None].expand(8, 3))
    enc = encode_tensor(W, mask, "half_row")
    assert enc.group_flags().nonzero().reshape(-1).tolist() == [1, 4, 8, 12, 15]
    (k0, v0), (k1, v1) = enc.blocks()
    assert k0.tolist() == [1, 4] and k1.tolist() == [0, 4, 7]
    assert torch.equal(v0, W[:, :3][k0]) and torch.equal(v1, W[:, 3:][k1])
    # half_column: group h*C + c, block h = rows [h*R/2, (h+1)*R/2)
    flags = torch.zeros(12, dtype=torch.bool)
    flags[[0, 5, 6 + 2]] = True
    mask = expand_groups(flags, "half_column", W.shape)
    (k0, v0), (k1, v1) = encode_tensor(W, mask, "half_column").blocks()
    assert k0.tolist() == [0, 5] and k1.tolist() == [2]
    assert torch.equal(v0, W[:4][:, k0]) and torch.equal(v1, W[4:][:, k1])
    # with send_index=False the mask supplies the indices
    up = encode_tensor(W, mask, "half_column", send_index=False)
    assert up.group_flags(mask).nonzero().reshape(-1).tolist() == [0, 5, 8]


def test_groups_from_mask_roundtrip_all_patterns():
    for shape, pattern in CASES:
        m = _random_mask(shape, pattern, seed=7)
        g = groups_from_mask(m, pattern)
        assert g.numel() == num_groups(pattern, shape)
        assert torch.equal(expand_groups(g, pattern, shape), m)


def test_index_encoding_picks_smaller():
    W = torch.randn(4096, 4)
    few = torch.zeros(4096, dtype=torch.bool)
    few[[3, 100]] = True
    enc = encode_tensor(W, few[:, None].expand(4096, 4), "row")
    assert enc.index == "int32" and enc.arrays["index"].dtype == np.int32 and enc.arrays["index"].nbytes == 8
    half = torch.arange(4096) % 2 == 0
    enc = encode_tensor(W, half[:, None].expand(4096, 4), "row")
    assert enc.index == "bits" and enc.arrays["index_bits"].nbytes == 512
    for e in (encode_tensor(W, few[:, None].expand(4096, 4), "row"), enc):
        assert torch.equal(decode_tensor(e), W * e.mask())


def test_all_pruned_and_all_kept():
    W = torch.randn(6, 4)
    for pattern in PATTERNS:
        for val in (False, True):
            m = torch.full_like(W, val, dtype=torch.bool)
            enc = encode_tensor(W, m, pattern)
            assert torch.equal(decode_tensor(enc), W * m)
            assert torch.equal(decode_tensor(encode_tensor(W, m, pattern, send_index=False), m), W * m)


@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_byte_ratio_structured_half_sparsity(pattern):
    W = torch.randn(1024, 256)
    n = num_groups(pattern, W.shape)
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 2]] = True
    enc = encode_tensor(W, expand_groups(flags, pattern, W.shape), pattern)
    dense = dense_nbytes([W])
    index_bytes = (n + 7) // 8
    assert enc.nbytes == dense // 2 + index_bytes
    assert 0.5 < enc.nbytes / dense < 0.5 + 0.001
    up = encode_tensor(W, expand_groups(flags, pattern, W.shape), pattern, send_index=False)
    assert up.nbytes == dense // 2


def test_byte_ratio_unstructured_half_sparsity():
    W = torch.randn(256, 128)
    flags = torch.zeros(W.numel(), dtype=torch.bool)
    flags[torch.randperm(W.numel(), generator=torch.Generator().manual_seed(0))[: W.numel() // 2]] = True
    mask = flags.reshape(W.shape)
    enc = encode_tensor(W, mask, "unstructured")
    assert enc.nbytes / dense_nbytes([W]) == 0.5 + 1 / 32
    assert encode_tensor(W, mask, send_index=False).nbytes / dense_nbytes([W]) == 0.5
    h = encode_tensor(W.half(), mask)
    assert h.nbytes / dense_nbytes([W.half()]) == 0.5 + 1 / 16


def test_state_payload():
    g = torch.Generator().manual_seed(0)
    state = {
        "lin.weight": torch.randn(8, 6, generator=g),
        "lin.bias": torch.randn(8, generator=g),
        "conv.weight": torch.randn(4, 2, 3, generator=g),
        "emb.weight": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": torch.randn(4, generator=g).half(),
    }
    masks = {
        "lin.weight": _random_mask((8, 6), "half_column"),
        "conv.weight": _random_mask((4, 2, 3), "column"),
        "emb.weight": _random_mask((10, 4), "unstructured"),
        "other.weight": torch.ones(3, dtype=torch.bool),  # ignored: not in state
    }
    patterns = {"lin.weight": "half_column", "conv.weight": "column"}  # emb defaults to unstructured
    p = encode_state(state, masks, patterns)
    assert list(p.keys()) == list(state)
    assert p["emb.weight"].kind == "unstructured" and p["lin.bias"].kind == "dense"
    assert p.nbytes == sum(a.nbytes for a in p.to_arrays())
    assert p.nbytes < dense_nbytes(state)
    for q in (p, Payload.from_bytes(p.to_bytes()), Payload.from_arrays(p.to_arrays(), p.spec())):
        out = decode_state(q)
        for k, v in state.items():
            m = masks.get(k)
            assert torch.equal(out[k], v if m is None else v * m), k

    up = encode_state(state, masks, patterns, send_index=False)
    assert up.nbytes < p.nbytes
    with pytest.raises(ValueError, match="needs masks"):
        decode_state(up)
    out = decode_state(up, masks)
    assert torch.equal(out["lin.weight"], state["lin.weight"] * masks["lin.weight"])
    # the bytes blob is the arrays plus a small header
    assert len(p.to_bytes()) > p.nbytes


def test_errors():
    W = torch.randn(8, 6)
    with pytest.raises(ValueError, match="mask shape"):
        encode_tensor(W, torch.ones(6, 8, dtype=torch.bool), "row")
    with pytest.raises(ValueError, match="`pattern` must be one of .*'diagonal'"):
        encode_tensor(W, torch.ones(8, 6, dtype=torch.bool), "diagonal")
    with pytest.raises(ValueError, match="`pattern` must be one of .*'blocks'"):
        encode_tensor(W, None, "blocks")  # the name is checked even when the tensor goes dense
    with pytest.raises(ValueError, match="bool"):
        encode_tensor(W, torch.ones(8, 6), "row")
    bad = torch.ones(8, 6, dtype=torch.bool)
    bad[0, 0] = False  # not a union of whole rows / columns / half-rows / half-columns
    for pattern in STRUCTURED_PATTERNS:
        with pytest.raises(ValueError, match=rf"mask of 'fc.w' \(shape \(8, 6\)\) is not a union of whole '{pattern}'"):
            encode_tensor(W, bad, pattern, name="fc.w")
    with pytest.raises(ValueError, match=r"'half_row'.*'fc.w'.*axis 1 \(columns\) has odd length 5"):
        encode_tensor(torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool), "half_row", name="fc.w")
    with pytest.raises(ValueError, match=r"'half_column'.*axis 0 \(rows\) has odd length 5"):
        encode_tensor(torch.randn(5, 4), torch.ones(5, 4, dtype=torch.bool), "half_column")
    # a mask needs something to prune: 0-d and empty tensors only travel dense
    with pytest.raises(ValueError, match="'b' is a 0-d"):
        encode_tensor(torch.tensor(1.0), torch.tensor(True), name="b")
    with pytest.raises(ValueError, match="'e' is empty"):
        encode_tensor(torch.ones(0, 3), torch.ones(0, 3, dtype=torch.bool), "row", name="e")
    m = _random_mask((8, 6), "row")
    up = encode_tensor(W, m, "row", send_index=False)
    with pytest.raises(ValueError, match="mask shape"):
        decode_tensor(up, m.t())
    with pytest.raises(ValueError, match="not a union of whole"):
        decode_tensor(up, bad)
    enc = encode_tensor(W, m, "row")
    with pytest.raises(ValueError, match="does not match the index"):
        decode_tensor(enc, ~m)
    with pytest.raises(ValueError, match="bad magic"):
        Payload.from_bytes(b"nope" + bytes(20))
    with pytest.raises(ValueError, match="spec describes"):
        Payload.from_arrays([], encode_state({"w": W}).spec())


def test_encoded_tensor_is_plain_data():
    enc = encode_tensor(torch.randn(4, 4), torch.eye(4, dtype=torch.bool), "unstructured")
    assert isinstance(enc, EncodedTensor)
    # arrays never alias torch memory: mutating the source does not change the encoding
    t = torch.ones(3, 3)
    e = encode_tensor(t)
    t.zero_()
    assert (e.arrays["values"] == 1).all()


def test_payload_pickles():
    import pickle

    W = torch.randn(8, 6)
    p = encode_state({"w": W}, {"w": _random_mask((8, 6), "row")}, {"w": "row"})
    q = pickle.loads(pickle.dumps(p))
    assert q.nbytes == p.nbytes and torch.equal(decode_state(q)["w"], decode_state(p)["w"])


# ------------------------------------------------------------------ the wire bytes are pinned
GOLDEN = Path(__file__).parent / "data" / "wire_golden.json"
GOLDEN_SHAPES = [(8, 6), (6, 4, 3, 2), (10,), (4, 2, 5), (256, 4)]
GOLDEN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
GOLDEN_KEEP = {"half": lambda i: (i * 7 + 3) % 5 < 3, "few": lambda i: i % 40 == 3}  # "few" picks int32 indices


def _golden_payloads():
    """``case -> Payload``: every dtype of one shape, pattern, density and direction in one payload.

    Inputs are built from integer arithmetic only (no RNG, no transcendental functions), so they are
    the same bits on every machine and torch version."""
    out = {}
    for shape in GOLDEN_SHAPES:
        n = math.prod(shape)
        base = ((torch.arange(n, dtype=torch.float64) * 7919 % 1009) - 504) / 37
        state = {str(d)[6:]: (base > 0 if d == torch.bool else base.to(d)).reshape(shape) for d in GOLDEN_DTYPES}
        for pattern in PATTERNS:
            if not _applicable(shape, pattern):
                continue
            for density, keep in GOLDEN_KEEP.items():
                flags = torch.tensor([keep(i) for i in range(num_groups(pattern, shape))])
                mask = expand_groups(flags, pattern, shape)
                masks = dict.fromkeys(state, mask)
                patterns = dict.fromkeys(state, pattern)
                for send_index in (True, False):
                    case = f"{shape}|{pattern}|{density}|{'down' if send_index else 'up'}"
                    out[case] = encode_state(state, masks, patterns, send_index=send_index)
    return out


def test_wire_bytes_are_pinned():
    """The encoded bytes of every pattern, dtype, index kind and direction are pinned (``Payload.to_bytes()``
    digests in ``tests/data/wire_golden.json``): the blob holds the spec (kinds, index choice, array keys and
    order) and every array's dtype, shape and bytes. The arrays are those the original if/elif implementation
    produced; the digests were re-recorded once, when the spec dropped its ``pattern`` field (a copy of
    ``kind``), after checking that every array and the rest of the spec stayed identical."""
    golden = json.loads(GOLDEN.read_text())
    payloads = _golden_payloads()
    assert {enc.index for p in payloads.values() for enc in p.tensors.values()} == {"bits", "int32", None}
    got = {case: hashlib.sha256(p.to_bytes()).hexdigest() for case, p in payloads.items()}
    assert sorted(got) == sorted(golden)
    changed = [case for case in golden if got[case] != golden[case]]
    assert not changed, f"wire bytes changed for {changed}"

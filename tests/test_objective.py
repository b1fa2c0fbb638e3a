"""The alignment objective a merge stores (`merge/diagnostics.py`): float64 dot products, a chunk at a time."""

from __future__ import annotations

import pytest
import torch

import lib_rebasin.merge.diagnostics as diagnostics
from lib_rebasin.merge.diagnostics import accumulate, stored_float


@pytest.mark.parametrize("n", [0, 1, 1000, 3 * (1 << 16) + 5])
@pytest.mark.parametrize("permuted", [False, True])
def test_chunked_dot_products_are_the_float64_ones(n: int, permuted: bool) -> None:
    """<A,B>, <A,pi B>, |A|^2, |B|^2 as float64 dot products of the whole tensors give them, to the stored digits,
    across chunk boundaries, added to what the list already holds."""
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=gen).half().float()
    b = (a + 0.05 * torch.randn(n, generator=gen)).half().float()
    pb = b.flip(0) if permuted else b
    acc = [1.0, 2.0, 3.0, 4.0]
    accumulate(acc, a, b, pb)
    ad, bd, pd = a.double(), b.double(), pb.double()
    want = [1 + float(ad @ bd), 2 + float(ad @ pd), 3 + float(ad @ ad), 4 + float(bd @ bd)]
    assert [stored_float(x) for x in acc] == [stored_float(x) for x in want]
    assert acc == pytest.approx(want, rel=1e-13, abs=1e-9)


def test_small_chunks_give_the_same_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 250, generator=gen), torch.randn(4, 250, generator=gen)
    whole = [0.0] * 4
    accumulate(whole, a, b, b)
    monkeypatch.setattr(diagnostics, "OBJECTIVE_CHUNK", 7)
    chunked = [0.0] * 4
    accumulate(chunked, a, b, b)
    assert chunked == pytest.approx(whole, rel=1e-13)


def test_a_wider_a_adds_nothing() -> None:
    acc = [0.0] * 4
    accumulate(acc, torch.ones(9, 4), torch.ones(4, 4), torch.ones(4, 4))
    assert acc == [0.0] * 4


@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_blend_in_chunks_is_the_whole_tensor_blend_bit_for_bit(monkeypatch: pytest.MonkeyPatch, chunk: int | None,
                                                                    permuted: bool, dtype: torch.dtype) -> None:
    """(1-a) A + a pi(B) with its objective a chunk at a time (the merge's path on the CPU) gives the bytes and the
    float64 sums of the whole-tensor blend with `accumulate`: the same operations on the same values."""
    from types import SimpleNamespace

    from lib_rebasin.merge.blend import Blend, Term

    if chunk is not None:
        monkeypatch.setattr(diagnostics, "OBJECTIVE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(int(permuted) + 2 * (chunk or 0))
    rows, cols = (37, 11) if chunk else (300, 700)  # 210,000 elements: three whole chunks and a partial one
    a = torch.randn(rows, cols, generator=gen).to(dtype)
    b = (a.float() + 0.05 * torch.randn(rows, cols, generator=gen)).to(dtype)
    spec = SimpleNamespace(axes={"w": {0: [("g", rows, 0)]}})
    perms = {"g": torch.randperm(rows, generator=gen)} if permuted else {}
    blend = Blend(spec, [Term(0.3, {"w": a}.__getitem__, {}), Term(0.7, {"w": b}.__getitem__, perms)],
                  torch.device("cpu"))
    whole = [0.0] * 4
    want = blend("w", objective=whole, chunked=False)
    alone = [0.0] * 4
    accumulate(alone, a.float(), b.float(), b.float()[perms["g"]] if permuted else b.float())
    assert alone == whole  # the whole-tensor path measures what `accumulate` does
    chunked = [0.0] * 4
    got = blend("w", objective=chunked)  # on the CPU: a chunk at a time
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert chunked == whole and whole[2] > 0


@pytest.mark.parametrize("out", [torch.float16, torch.bfloat16, torch.float32])
def test_the_blend_cast_a_chunk_at_a_time_is_the_whole_blend_cast(monkeypatch: pytest.MonkeyPatch,
                                                                   out: torch.dtype) -> None:
    """With the output's dtype, each chunk is summed in a cache-sized fp32 buffer and cast from there, and with a
    sink handed out in order, whole chunks at a time: the bytes of the whole fp32 blend cast after, the same
    objective, and the pieces make up the returned tensor."""
    from types import SimpleNamespace

    from lib_rebasin.merge import blend as blend_module
    from lib_rebasin.merge.blend import Blend, Term

    monkeypatch.setattr(diagnostics, "OBJECTIVE_CHUNK", 64)
    monkeypatch.setattr(blend_module, "SINK_BYTES", 300)  # two fp16 chunks a piece, one fp32 chunk
    gen = torch.Generator().manual_seed(9)
    a = (100 * torch.randn(37, 11, generator=gen)).half()  # 407 elements: six whole chunks and a partial one
    b = (a.float() + 5 * torch.randn(37, 11, generator=gen)).half()
    spec = SimpleNamespace(axes={"w": {0: [("g", 37, 0)]}})
    perms = {"g": torch.randperm(37, generator=gen)}
    blend = Blend(spec, [Term(0.3, {"w": a}.__getitem__, {}), Term(0.7, {"w": b}.__getitem__, perms)],
                  torch.device("cpu"))
    whole = [0.0] * 4
    want = blend("w", objective=whole, chunked=False).to(out)
    pieces: list[torch.Tensor] = []
    chunked = [0.0] * 4
    got = blend("w", objective=chunked, dtype=out, sink=lambda t: pieces.append(t.clone()))
    assert got.dtype == out and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert chunked == whole
    per_piece = 128 if out != torch.float32 else 64
    assert [len(p) for p in pieces] == [per_piece] * (407 // per_piece) + [407 % per_piece]
    assert torch.equal(torch.cat(pieces).view(torch.uint8), got.reshape(-1).view(torch.uint8))
    # made whole (here: not on a CPU device's chunked path), the value is cast and nothing is handed out
    pieces.clear()
    alone = blend("w", dtype=out, chunked=False, sink=pieces.append)
    assert pieces == [] and torch.equal(alone.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_blend_of_any_terms_in_chunks_is_the_whole_tensor_blend_bit_for_bit(monkeypatch: pytest.MonkeyPatch,
                                                                               dtype: torch.dtype) -> None:
    """Every linear method's blend (here add difference's A + a (B - C), B permuted) on the CPU, a chunk at a
    time, gives the bytes of the whole-tensor blend."""
    from types import SimpleNamespace

    from lib_rebasin.merge.blend import Blend, Term

    monkeypatch.setattr(diagnostics, "OBJECTIVE_CHUNK", 64)
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(37, 11, generator=gen).to(dtype) for _ in range(3))
    spec = SimpleNamespace(axes={"w": {0: [("g", 37, 0)]}})
    perms = {"g": torch.randperm(37, generator=gen)}
    blend = Blend(spec, [Term(1.0, {"w": a}.__getitem__, {}), Term(0.3, {"w": b}.__getitem__, perms),
                         Term(-0.3, {"w": c}.__getitem__, {})], torch.device("cpu"))
    want = blend("w", chunked=False)
    assert torch.equal(blend("w").view(torch.int32), want.view(torch.int32))
    assert torch.allclose(want, a.float() + 0.3 * b.float()[perms["g"]] - 0.3 * c.float(), atol=1e-6)


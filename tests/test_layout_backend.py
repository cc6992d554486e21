"""Zigzag layout helpers and the CPU backend's block kernel."""

from __future__ import annotations

import pytest
import torch
from reference import attention64
from tr_engine.backends import BackendUnavailable, get_backend, resolve_name

from tr_engine.distributed import zigzag


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("total", [1, 7, 16, 33, 100])
def test_shard_unshard_round_trip(p, total):
    x = torch.arange(total * 3).reshape(total, 3)
    shards = [zigzag.shard(x, p, r) for r in range(p)]
    assert {s.shape[0] for s in shards} == {zigzag.padded_len(total, p) // p}
    assert torch.equal(zigzag.unshard(shards, total), x)
    for r in range(p):
        pos = zigzag.positions(total, p, r)
        n_real = zigzag.local_len(total, p, r)
        # real tokens come first on every rank, and the shard holds exactly those positions
        assert bool((pos[:n_real] < total).all()) and bool((pos[n_real:] >= total).all())
        assert torch.equal(shards[r][:n_real], x[pos[:n_real]])
    for position in range(total):
        r, i = zigzag.owner(total, p, position)
        assert int(zigzag.positions(total, p, r)[i]) == position
    assert sum(zigzag.local_len(total, p, r) for r in range(p)) == total


def test_zigzag_chunks():
    # 2 ranks, 8 tokens: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert zigzag.positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag.positions(8, 2, 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("tq,tk", [(5, 5), (3, 11), (1, 9), (9, 4), (6, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_kernel_bottom_right_causal(tq, tk, causal):
    """Causal blocks are aligned bottom-right: query i sits at key position tk - tq + i."""
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(tq, 6, 64, generator=g)
    k = torch.randn(tk, 2, 64, generator=g)
    v = torch.randn(tk, 2, 64, generator=g)
    out, lse = get_backend("cpu").attention(q, k, v, causal)
    assert out.shape == q.shape and lse.shape == (tq, 6) and lse.dtype == torch.float32
    if tk == 0:
        assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
        return
    offset = tk - tq if causal else 0
    if offset >= 0:
        ref_out, ref_lse = attention64(q, k, v, causal=causal, q_offset=offset)
        assert (out.double() - ref_out).abs().max() < 1e-5
        assert (lse.double() - ref_lse).abs().max() < 1e-5
    else:  # the first -offset queries see no key
        assert torch.isneginf(lse[:-offset]).all() and not out[:-offset].any()
        ref_out, ref_lse = attention64(q[-offset:], k, v, causal=causal)
        assert (out[-offset:].double() - ref_out).abs().max() < 1e-5


def test_backend_names():
    assert resolve_name("cpu") == "cpu"
    assert resolve_name("auto") in ("cpu", "cuda")  # never npu without torch_npu
    with pytest.raises(ValueError, match="unknown device"):
        resolve_name("tpu")
    backend = get_backend("cpu")
    assert (backend.device_type, backend.dist_backend) == ("cpu", "gloo")
    free, total = backend.mem_get_info()
    assert 0 < free <= total


def test_npu_backend_reports_what_is_missing():
    with pytest.raises(BackendUnavailable) as e:
        get_backend("npu")
    assert "torch_npu" in e.value.what and e.value.fix


@pytest.mark.parametrize(("tq", "tk", "pieces", "rows"), [
    (5, 40, (16,), 8), (8, 32, (16,), 8), (3, 7, (16,), 4), (1, 50, (8,), 64),
    (5, 77, (32, 8), 8), (6, 23, (32, 8), 8), (4, 64, (8, 32), 4), (3, 104, (16, 4), 4),
    (2, 131, (32, 8), 4)])
@pytest.mark.parametrize("pairs", [False, True])
def test_attention_in_key_pieces_is_exact(tq, tk, pieces, rows, pairs):
    """Queries padded to a bucket, keys in fixed pieces (the largest first, two at a time in
    one call where a paired kernel is given) plus a remainder, merged by LSE: the same as one
    non-causal block (what the CUDA backend runs with cuDNN and flash)."""
    backend = get_backend("cpu")
    g = torch.Generator().manual_seed(tq * tk)
    q = torch.randn(tq, 6, 16, generator=g)
    k, v = torch.randn(tk, 2, 16, generator=g), torch.randn(tk, 2, 16, generator=g)
    calls = []

    def fixed(q_, k_, v_, scale):
        calls.append(("fixed", q_.shape[0], k_.shape[0]))
        return backend.attention(q_, k_, v_, False, scale)

    def rest(q_, k_, v_, scale):
        calls.append(("rest", q_.shape[0], k_.shape[0]))
        return backend.attention(q_, k_, v_, False, scale)

    def paired(q2, k_, v_, scale):
        calls.append(("pair", q2.shape[1], k_.shape[0]))
        assert torch.equal(q2[0], q2[1])
        n = k_.shape[0] // 2
        parts = [backend.attention(q2[i], k_[i * n : (i + 1) * n], v_[i * n : (i + 1) * n],
                                   False, scale) for i in (0, 1)]
        # the layout a batched kernel returns: heads and rows transposed views
        out = torch.stack([o for o, _ in parts]).transpose(1, 2).contiguous().transpose(1, 2)
        return out, torch.stack([s for _, s in parts])

    out, lse = backend.attention_in_pieces(fixed, rest, q, k, v, 0.25, pieces, rows,
                                           paired if pairs else None)
    ref, ref_lse = attention64(q, k, v, causal=False, scale=0.25)
    assert (out.double() - ref).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    # the largest piece while it fits (two at a time, with pairs), then the smaller, then
    # the rest
    want, left = [], tk
    for piece in sorted(pieces, reverse=True):
        n, left = left // piece, left % piece
        if pairs and piece == max(pieces):
            want += [("pair", rows, 2 * piece)] * (n // 2)
            n %= 2
        want += [("fixed", rows, piece)] * n
    assert calls == want + ([("rest", tq, left)] if left else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_prefix_attention_in_pieces():
    """On a GPU: a follow-up's queries over a long prefix take the prepared cuDNN pieces and
    match float64 within bfloat16 rounding."""
    backend = get_backend("cuda")
    backend.prepare_attention(32, 8, 128, torch.bfloat16, torch.device("cuda"))
    assert backend._piece_rows and backend._pairs  # 40,000 keys: two pieces in one call
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1000, 32, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(40000, 8, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(40000, 8, 128, device="cuda", generator=g).bfloat16()
    built = len(backend.cudnn_shapes)
    out, lse = backend.attention(q, k, v, False, 128**-0.5)
    assert len(backend.cudnn_shapes) == built  # nothing built on the request path
    ref, ref_lse = attention64(q.cpu(), k.cpu(), v.cpu(), causal=False, scale=128**-0.5)
    assert (out.cpu().double() - ref).abs().max() < 2e-2
    assert (lse.cpu().double() - ref_lse).abs().max() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_chunks_take_prepared_shapes(monkeypatch):
    """On a GPU: a prompt chunk of up to 8192 queries over its cached prefix and its own
    keys (the local strategy, bottom-right causal) meets cuDNN only in the shapes built at
    start-up (the causal block padded at its end, the prefix in key pieces with the queries
    padded) and matches float64 within bfloat16 rounding."""
    from tr_engine.backends import cuda

    from tr_engine.attention import local_attention

    backend = get_backend("cuda")
    backend.prepare_attention(4, 1, 128, torch.bfloat16, torch.device("cuda"))
    prepared = {(r, k, c) for r, k, c in backend.prepare_shapes()}
    built = len(backend.cudnn_shapes)
    met = []
    real = cuda._cudnn

    def recorded(q, k, v, causal, scale):
        met.append((q.shape[0], k.shape[0], causal))
        return real(q, k, v, causal, scale)

    monkeypatch.setattr(cuda, "_cudnn", recorded)
    g = torch.Generator(device="cuda").manual_seed(0)
    for tq, cached in [(1000, 0), (1024, 0), (1100, 5000), (2300, 9000), (5000, 17000),
                       (8192, 4096)]:
        q = torch.randn(tq, 4, 128, device="cuda", generator=g).bfloat16()
        k = torch.randn(cached + tq, 1, 128, device="cuda", generator=g).bfloat16()
        v = torch.randn(cached + tq, 1, 128, device="cuda", generator=g).bfloat16()
        out, lse = local_attention(q, k[cached:], v[cached:], causal=True, scale=128**-0.5,
                                   k_prefix=k[:cached], v_prefix=v[:cached])
        ref, ref_lse = attention64(q, k, v, causal=True, q_offset=cached, scale=128**-0.5)
        assert (out.double() - ref).abs().max() < 2e-2, (tq, cached)
        assert (lse.double() - ref_lse).abs().max() < 1e-2, (tq, cached)
    assert len(backend.cudnn_shapes) == built  # nothing built on the request path
    assert met and set(met) <= prepared
    assert (1280, 1280, True) in met and (2560, 4096, False) in met
    assert (1024, 16384, False) in met or (5120, 16384, False) in met


def test_cuda_attention_shapes_are_built_again_on_each_new_thread(monkeypatch):
    """torch keeps cuDNN's attention graphs per thread, and the server steps the engine on a
    thread of its own: prepare_thread builds the prepared shapes there, once a thread."""
    import threading
    import time

    from tr_engine.backends.cuda import CudaBackend

    backend = CudaBackend.__new__(CudaBackend)  # no device here: the bookkeeping alone
    backend._prepared, backend._prepared_on = None, set()
    built = []
    real = CudaBackend.prepare_attention

    def prepare(self, *args):
        built.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(CudaBackend, "prepare_attention", prepare)
    backend.prepare_thread()  # nothing prepared yet: nothing to build
    backend.prepare_attention(4, 2, 64, torch.float32, torch.device("cpu"))  # float32: no cuDNN
    backend.prepare_thread()  # the thread that prepared: nothing again
    release = threading.Event()

    def loop():  # alive until both have run (a finished thread's id can be reused)
        backend.prepare_thread()
        backend.prepare_thread()
        release.wait()

    threads = [threading.Thread(target=loop, name=f"loop-{i}") for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(built) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert built[0] == threading.current_thread().name
    assert sorted(built[1:]) == ["loop-0", "loop-1"]  # each new thread once


@pytest.mark.parametrize("pair_fails", [False, True])
def test_cuda_key_pieces_in_pairs_and_their_fallback(monkeypatch, pair_fails):
    """The CUDA backend's choice of kernels for queries over a long prefix, without a GPU:
    cuDNN, its batch of two pieces and flash are stood in for by the float32 math kernel
    (the merges run in Triton's interpreter). Two of the largest pieces go in one call; if
    that call fails, the backend logs it, takes the pieces one at a time from then on and
    still gives the exact result."""
    pytest.importorskip("triton")
    from tr_engine.backends import cuda
    from tr_engine.backends.reference import math_attention

    backend = cuda.CudaBackend()
    monkeypatch.setattr(backend, "KEY_PIECES", (64, 16))
    backend._piece_rows, backend._pairs = backend.QUERY_BUCKETS, True
    calls = []

    def one(q, k, v, causal, scale):
        calls.append(("one", q.shape[0], k.shape[0]))
        return math_attention(q, k, v, causal, scale)

    def rest(q, k, v, causal, scale):
        calls.append(("rest", q.shape[0], k.shape[0]))
        return math_attention(q, k, v, causal, scale)

    def pair(q2, k, v, scale):
        calls.append(("pair", q2.shape[1], k.shape[0]))
        if pair_fails:
            raise RuntimeError("no such graph")
        n = k.shape[0] // 2
        parts = [math_attention(q2[i], k[i * n : (i + 1) * n], v[i * n : (i + 1) * n], False,
                                scale) for i in (0, 1)]
        return torch.stack([o for o, _ in parts]), torch.stack([s for _, s in parts])

    monkeypatch.setattr(cuda, "_cudnn", one)
    monkeypatch.setattr(cuda, "_flash", rest)
    monkeypatch.setattr(cuda, "_cudnn_pair", pair)
    g = torch.Generator().manual_seed(3)
    tq, tk = 5, 3 * 64 + 16 + 7
    q = torch.randn(tq, 4, 16, generator=g).half()
    k, v = (torch.randn(tk, 2, 16, generator=g).half() for _ in range(2))
    out, lse = backend.attention(q, k, v, False, 0.25)
    ref, ref_lse = attention64(q.double(), k.double(), v.double(), causal=False, scale=0.25)
    assert (out.double() - ref).abs().max() < 2e-3  # float16 output
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    singles = [("one", 64, 64)] * (3 if pair_fails else 1) + [("one", 64, 16), ("rest", 5, 7)]
    assert calls == [("pair", 64, 128)] + singles
    assert backend._pairs is (not pair_fails) and backend._piece_rows


@pytest.mark.parametrize("tq", [1024, 1100])
def test_cuda_prepared_shapes_get_contiguous_inputs(monkeypatch, tq):
    """torch keys cuDNN's attention graphs by strides as well as shapes, and the prepared
    ones were built on contiguous tensors; a chunk's q, k and v are views of the fused
    projection. A causal block of exactly a bucket's rows (no padding to copy it) and queries
    over a prefix in pieces still reach cuDNN contiguous, and the results are exact. Without
    a GPU: cuDNN is stood in for by the float32 math kernel (merges in Triton's
    interpreter)."""
    pytest.importorskip("triton")
    from tr_engine.backends import cuda
    from tr_engine.backends.reference import math_attention

    backend = cuda.CudaBackend()
    monkeypatch.setattr(backend, "KEY_PIECES", (64, 16))
    backend._piece_rows, backend._pairs = backend.QUERY_BUCKETS, False
    assert 1024 in backend.QUERY_BUCKETS and 1100 not in backend.QUERY_BUCKETS
    met = []

    def recorded(q, k, v, causal, scale):
        met.append((q.shape[0], k.shape[0], causal,
                    q.is_contiguous() and k.is_contiguous() and v.is_contiguous()))
        return math_attention(q, k, v, causal, scale)

    monkeypatch.setattr(cuda, "_cudnn", recorded)
    monkeypatch.setattr(cuda, "_flash", math_attention)
    g = torch.Generator().manual_seed(tq)
    fused = torch.randn(tq, (4 + 2 * 2) * 16, generator=g).half()  # [T, (Hq + 2 Hkv) D]
    q, k, v = fused.split([64, 32, 32], dim=-1)
    q, k, v = q.view(tq, 4, 16), k.view(tq, 2, 16), v.view(tq, 2, 16)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = backend.attention(q, k, v, True, 0.25)
    ref, ref_lse = attention64(q.double(), k.double(), v.double(), causal=True, scale=0.25)
    assert (out.double() - ref).abs().max() < 2e-3 and (lse.double() - ref_lse).abs().max() < 1e-4
    rows = 1024 if tq == 1024 else 1280
    assert met == [(rows, rows, True, True)]
    del met[:]
    # a cached prefix: runs of the pool's pages, contiguous
    pk, pv = (torch.randn(2 * 64 + 16, 2, 16, generator=g).half() for _ in range(2))
    out, lse = backend.attention(q, pk, pv, False, 0.25)
    ref, ref_lse = attention64(q.double(), pk.double(), pv.double(), causal=False, scale=0.25)
    assert (out.double() - ref).abs().max() < 2e-3 and (lse.double() - ref_lse).abs().max() < 1e-4
    assert met == [(rows, 64, False, True)] * 2 + [(rows, 16, False, True)]


def test_start_up_prepares_every_matrix_product_a_step_meets(tmp_path, monkeypatch):
    """The engine hands Backend.prepare_matmuls one weight of each linear layer's shape and
    the head, and the products its steps then run (a prompt in chunks and slices, decode
    steps of several sequences) take only those weights, with token counts within the
    prepared range (at most token_chunk: prefill slices its work) and the head at most a
    step's sampled rows."""
    from checkpoints import byte_ids, make_checkpoint

    from tr_engine import LLM, SamplingParams

    backend_type = type(get_backend("cpu"))
    prepared = {}

    def record(self, weights, rows, heads, head_rows):
        prepared.update(weights=[w.shape for w in weights], rows=rows,
                        heads=[w.shape for w in heads], head_rows=head_rows)

    monkeypatch.setattr(backend_type, "prepare_matmuls", record)
    ckpt = str(make_checkpoint("llama3.2", tmp_path / "ckpt"))
    met = []
    real = torch.nn.functional.linear

    def linear(x, w, b=None):
        met.append((x.reshape(-1, x.shape[-1]).shape[0], tuple(w.shape)))
        return real(x, w, b)

    with LLM(ckpt, device="cpu", dtype="float32", prefill_chunk=96, token_chunk=40,
             max_num_seqs=3, max_num_batched_tokens=64) as llm:
        model = llm.engine.cluster.runner.model
        linears = {tuple(m.weight.shape) for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.lm_head}
        assert {tuple(s) for s in prepared["weights"]} == linears
        assert prepared["heads"] == [model.lm_head.weight.shape]
        assert prepared["rows"][0] == 1 and prepared["rows"][-1] == 40  # token_chunk
        assert prepared["head_rows"] == [1, 2, 3, 4]
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": byte_ids(n, n)} for n in (150, 7, 33)], params)
    head = tuple(model.lm_head.weight.shape)
    assert {w for _, w in met} == linears | {head}
    assert max(m for m, w in met if w != head) <= 40
    assert max(m for m, w in met if w == head) <= 4

"""CUDA-graph decode: bucket arithmetic (CPU) and graph replay == eager decode, token for token (GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.core.types import ComputeDtype, KVDtype, LinearMode
from workers.engine.cuda_graphs import BATCH_BUCKETS, batch_bucket, width_bucket

from .factories import greedy, make_engine, prompts, run_to_end


def test_batch_and_width_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17, 128)] == [1, 2, 4, 8, 16, 32, 128]
    assert batch_bucket(BATCH_BUCKETS[-1] + 1) is None
    assert [width_bucket(w, 1000) for w in (1, 3, 33, 64, 65, 129, 999)] == [1, 4, 64, 64, 96, 160, 1000]
    assert width_bucket(70, 66) == 66  # never wider than the engine's widest table


def test_cpu_engine_never_uses_graphs():
    assert not make_engine().uses_cuda_graphs


needs_compiled_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="graph capture needs compiled Triton kernels"
)


def _run(engine, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, greedy(max_tokens))
    out = run_to_end(engine)
    engine.assert_no_leaks()
    return [out[f"r{i}"] for i in range(len(batch))]


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.parametrize(
    ("model", "num_layers", "linear", "kv"),
    [
        ("tiny", None, LinearMode.BF16, KVDtype.BF16),
        ("tiny", None, LinearMode.FP8_DYNAMIC, KVDtype.FP8_E4M3),
        ("llama-3.2-1b-shape", 2, LinearMode.FP8_DYNAMIC, KVDtype.FP8_E4M3),
        ("llama-3.2-1b-shape", 2, LinearMode.BF16, KVDtype.BF16),
    ],
    ids=["tiny-bf16", "tiny-fp8", "1b2l-fp8", "1b2l-bf16"],
)
@pytest.mark.parametrize("batch", [1, 3, 8], ids=lambda b: f"B{b}")
def test_graph_decode_matches_eager(model, num_layers, linear, kv, batch):
    """Greedy tokens of graph-replayed decode equal eager decode (same kernels; batch 3 is padded to 4)."""
    assert torch.cuda.is_available()
    kw = dict(model=model, num_layers=num_layers, device="cuda", dtype=ComputeDtype.BF16, linear_mode=linear,
              kv_dtype=kv, init_on_device=True, num_blocks=64, max_model_len=256)
    eager = make_engine(cuda_graphs=False, **kw)
    graphs = make_engine(cuda_graphs=True, **kw)
    assert graphs.uses_cuda_graphs and not eager.uses_cuda_graphs
    vocab = graphs.model_config.vocab_size
    batch_prompts = prompts(batch, base_len=9, vocab=min(vocab, 256))
    expected = _run(eager, batch_prompts, 12)
    got = _run(graphs, batch_prompts, 12)
    assert graphs._graphs is not None and graphs._graphs.num_graphs >= 1 and not graphs._graphs.failed
    assert got == expected
    assert all(len(t) == 12 for t in got)


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.parametrize("lookahead", [False, True], ids=["sync", "lookahead"])
def test_graph_decode_matches_eager_as_the_batch_changes(lookahead):
    """Requests finish at different steps and others join mid-run: the batch shrinks, grows and changes
    its block tables, so the graph runner must re-upload tables whenever the batch changes; with decode
    lookahead (the default with graphs) the next step is launched from the device's own picks."""
    kw = dict(device="cuda", dtype=ComputeDtype.BF16, linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=KVDtype.FP8_E4M3)
    results = []
    for graphs in (False, True):
        eng = make_engine(cuda_graphs=graphs, lookahead=lookahead and graphs, **kw)
        assert eng._lookahead is (lookahead and graphs)
        ps = prompts(6, base_len=7)
        out: dict[str, list[int]] = {}
        for i in range(3):
            eng.add_request(f"a{i}", ps[i], greedy(4 + 4 * i))
        for step in range(60):
            if step in (3, 6, 7):
                j = {3: 3, 6: 4, 7: 5}[step]
                eng.add_request(f"b{j}", ps[j], greedy(6))
            for o in eng.step():
                out.setdefault(o.request_id, []).append(o.token_id)
            if not eng.has_unfinished() and step > 7:
                break
        eng.assert_no_leaks()
        results.append(out)
        if graphs:
            assert eng._graphs is not None and eng._graphs.num_graphs >= 2 and not eng._graphs.failed
    assert results[1] == results[0]
    assert sorted(len(v) for v in results[1].values()) == [4, 6, 6, 6, 8, 12]

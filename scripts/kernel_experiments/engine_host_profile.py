# ruff: noqa: B007, B023, E401, E701, E702, E402, SIM115, UP031  (one-off H100 experiments, kept as they were run)
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
from _bench_engine_real import build_engine, fill_kv_random, place_running

for mode in ("fp8", "bf16"):
    eng = build_engine(mode, 32, 200_000, 64, 4096)
    fill_kv_random(eng)
    ids = place_running(eng, 64, 2048, 80, 1)
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    # host-only timing: where does the step's wall go besides the GPU?
    g = eng._graphs
    orig_replay = torch.cuda.CUDAGraph.replay
    marks = []
    def replay(self):
        marks.append(("replay_start", time.perf_counter()))
        orig_replay(self)
        marks.append(("replay_end", time.perf_counter()))
    torch.cuda.CUDAGraph.replay = replay
    rows = []
    for _ in range(20):
        marks.clear()
        t0 = time.perf_counter(); eng.step(); torch.cuda.synchronize(); t1 = time.perf_counter()
        d = dict(marks)
        rows.append(((d["replay_start"] - t0) * 1e3, (d["replay_end"] - d["replay_start"]) * 1e3, (t1 - d["replay_end"]) * 1e3, (t1 - t0) * 1e3))
    torch.cuda.CUDAGraph.replay = orig_replay
    import statistics as st
    print(mode, "median ms: before replay %.3f, replay launch %.3f, after replay (GPU wait + sample + bookkeeping) %.3f, step %.3f" % tuple(st.median(r[i] for r in rows) for i in range(4)))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        eng.step()
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[:4000])
    for rid in ids: eng.abort(rid)
    del eng; torch.cuda.empty_cache()

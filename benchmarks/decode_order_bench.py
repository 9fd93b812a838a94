"""Longest-first order of a decode batch: kvflow/kernels/decode_order.py against torch.argsort.

    python3 benchmarks/decode_order_bench.py

On a CUDA device: us per call inside a CUDA graph (20 calls a replay, 50 replays) at 80-1024
random lengths, torch.argsort(descending) + the int32 cast against the one-program sort at 1-16
warps; each size's result is checked against the stable torch reference.
"""
import torch, triton
from kvflow.kernels import decode_order as do
from kvflow.kernels.pdl import pdl_launch
dev = torch.device("cuda")
def graph_us(fn, iters=50):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20): fn()
    torch.cuda.current_stream().wait_stream(s); g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters): g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / iters / 20
for n in (80, 144, 256, 512, 1024):
    lens = torch.randint(100, 2000, (n,), device=dev, dtype=torch.int32)
    out = torch.empty(n, dtype=torch.int32, device=dev)
    row = {"torch": round(graph_us(lambda: torch.argsort(lens, descending=True).to(torch.int32)), 2)}
    block = max(16, triton.next_power_of_2(n))
    for w in (1, 2, 4, 8, 16):
        row[f"w{w}"] = round(graph_us(lambda: do._longest_first_kernel[(1,)](lens, out, n, BLOCK=block, num_warps=w, **pdl_launch(dev))), 2)
    assert torch.equal(out, do.longest_first_order_ref(lens))
    print(n, row, flush=True)

import torch, time, statistics
torch.manual_seed(0)
n = 4 * 124_439_808
res = []
bufs = []
for k in range(6):
    b = torch.ones(n); bufs.append(b)
    ts = []
    for r in range(5):
        t = time.perf_counter(); b.mul_(2.0 if r % 2 else 0.5); ts.append(time.perf_counter() - t)
    res.append(statistics.median(ts) * 1e3)
print(" ".join(f"{x:.1f}" for x in res))

import time, statistics, torch, onepass
from onepass.benchmark import make_params, make_ceiling
N, E = 2000, 4096
small = make_params([(E,)] * N)
big = make_params([(N * E,)])
mid = make_params([(E * 64,)] * (N // 64))
o_s = onepass.AdamW(small, lr=1e-4, backend="cpu")
o_b = onepass.AdamW(big, lr=1e-4, backend="cpu")
o_m = onepass.AdamW(mid, lr=1e-4, backend="cpu")
ceil = make_ceiling("cpu", N * E)
for _ in range(3): o_s.step(); o_b.step(); o_m.step(); ceil.fn()
res = {"small 2000x4096": [], "mid 31x262144": [], "big 1x8.2M": [], "ceiling": []}
fns = {"small 2000x4096": o_s.step, "mid 31x262144": o_m.step, "big 1x8.2M": o_b.step, "ceiling": ceil.fn}
for r in range(60):
    for k in list(fns)[r % 4:] + list(fns)[:r % 4]:
        t = time.perf_counter(); fns[k](); res[k].append(time.perf_counter() - t)
for k, v in res.items():
    print(f"{k:18s} {statistics.median(v)*1e3:7.3f} ms")

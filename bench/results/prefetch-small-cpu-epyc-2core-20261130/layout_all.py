import time, statistics, torch, onepass, sys
N, E = 2000, 4096
def make(mode):
    g0 = torch.Generator().manual_seed(0)
    if mode == "allflat":
        bp = torch.randn(N * E, generator=g0) * 0.02
        bg = torch.randn(N * E, generator=g0) * 1e-3
        ps = []
        for i in range(N):
            p = torch.nn.Parameter(bp[i * E:(i + 1) * E])
            p.grad = bg[i * E:(i + 1) * E]
            ps.append(p)
    else:
        from onepass.benchmark import make_params
        ps = make_params([(E,)] * N)
    opt = onepass.AdamW(ps, lr=1e-4, backend="cpu")
    opt.step()
    bm = torch.zeros(N * E); bv = torch.zeros(N * E)
    for i, p in enumerate(ps):
        st = opt.state[p]
        m = bm[i * E:(i + 1) * E]; v = bv[i * E:(i + 1) * E]
        m.copy_(st["exp_avg"]); v.copy_(st["exp_avg_sq"])
        st["exp_avg"] = m; st["exp_avg_sq"] = v
    return opt
opts = {m: make(m) for m in sys.argv[1:]}
for o in opts.values():
    for _ in range(3): o.step()
res = {k: [] for k in opts}
keys = list(opts)
for r in range(40):
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
        t = time.perf_counter(); opts[k].step(); res[k].append(time.perf_counter() - t)
for k, v in res.items():
    print(f"{k:12s} {statistics.median(v)*1e3:7.3f} ms")

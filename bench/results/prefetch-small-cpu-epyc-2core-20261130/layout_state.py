import time, statistics, torch, onepass, sys
from onepass.benchmark import make_params, make_ceiling
N, E = 2000, 4096
def make(mode):
    ps = make_params([(E,)] * N)
    opt = onepass.AdamW(ps, lr=1e-4, backend="cpu")
    opt.step()
    if mode == "default":
        return opt
    if mode == "twopass":
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        for p, m, v in zip(ps, ms, vs):
            st = opt.state[p]
            m.copy_(st["exp_avg"]); v.copy_(st["exp_avg_sq"])
            st["exp_avg"] = m; st["exp_avg_sq"] = v
        return opt
    # flat buffers: all m in one, all v in another, with a gap between tensors of `pad` floats
    pad = {"flat": 0, "flat+16": 16, "flat+1024": 1024}[mode]
    off = {"flat": 0, "flat+16": 16 * 7, "flat+1024": 333}[mode]
    bm = torch.zeros(N * (E + pad) + 4096)
    bv = torch.zeros(N * (E + pad) + 4096)
    for i, p in enumerate(ps):
        st = opt.state[p]
        m = bm[i * (E + pad): i * (E + pad) + E]
        v = bv[off + i * (E + pad): off + i * (E + pad) + E]
        m.copy_(st["exp_avg"]); v.copy_(st["exp_avg_sq"])
        st["exp_avg"] = m; st["exp_avg_sq"] = v
    return opt
opts = {m: make(m) for m in sys.argv[1:]}
ceil = make_ceiling("cpu", N * E)
for o in opts.values():
    for _ in range(3): o.step()
res = {k: [] for k in opts}
keys = list(opts)
for r in range(40):
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
        t = time.perf_counter(); opts[k].step(); res[k].append(time.perf_counter() - t)
for k, v in res.items():
    print(f"{k:12s} {statistics.median(v)*1e3:7.3f} ms")

# small case (2000 x 4096 fp32): the benchmark's layout, every param/grad a view of one flat buffer
# in index order, the same views at shuffled offsets, and the benchmark's layout with the moments
# moved into one flat buffer each; onepass cpu step and the mul_ ceiling, interleaved rounds.
import statistics, time, torch, onepass
from onepass.benchmark.cases import make_params
N, E = 2000, 4096
def flat(order):
    pb = torch.randn(N * E).mul_(0.02); gb = torch.randn(N * E).mul_(1e-3)
    ps = []
    for i in range(N):
        k = order[i]
        p = torch.nn.Parameter(pb[k * E:(k + 1) * E]); p.grad = gb[k * E:(k + 1) * E]; ps.append(p)
    return ps
g = torch.Generator().manual_seed(0)
layouts = {"make_params": make_params([(E,)] * N), "flat": flat(list(range(N))),
           "flat_shuffled": flat(torch.randperm(N, generator=g).tolist())}
layouts["make_params+flat_moments"] = make_params([(E,)] * N, seed=1)
opts = {k: onepass.AdamW(v, lr=1e-3, backend="cpu") for k, v in layouts.items()}
buf = torch.ones(4 * N * E)
for o in opts.values(): o.step(); o.step()
# the moments of one layout moved into one flat buffer each, in index order (views taken as state)
o = opts["make_params+flat_moments"]
mb, vb = torch.empty(N * E), torch.empty(N * E)
for i, p in enumerate(layouts["make_params+flat_moments"]):
    st = o.state[p]
    st["exp_avg"] = mb[i * E:(i + 1) * E].copy_(st["exp_avg"])
    st["exp_avg_sq"] = vb[i * E:(i + 1) * E].copy_(st["exp_avg_sq"])
o.step()
t = {k: [] for k in list(opts) + ["mul_"]}
for r in range(40):
    for k in (list(opts) + ["mul_"]) if r % 2 else (["mul_"] + list(opts))[::-1]:
        t0 = time.perf_counter()
        if k == "mul_": buf.mul_(1.0)
        else: opts[k].step()
        t[k].append((time.perf_counter() - t0) * 1e3)
for k, v in t.items(): print(f"{k:14s} {statistics.median(v):7.2f} ms")

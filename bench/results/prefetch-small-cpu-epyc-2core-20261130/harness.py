# PFM is read once per process (static): run one process per mode, alternating, several times
import os, sys, time, statistics, torch, onepass
from onepass.benchmark import make_params, make_ceiling
N, E = 2000, 4096
if os.environ.get("LAYOUT") == "model":
    # a model's layout: params made together, then the grads (as a backward makes them)
    ps = [torch.nn.Parameter(torch.randn(E) * 0.02) for _ in range(N)]
    for p in reversed(ps): p.grad = torch.randn(E) * 1e-3
else:
    ps = make_params([(E,)] * N)
opt = onepass.AdamW(ps, lr=1e-4, backend="cpu")
ref = torch.optim.AdamW(ps, lr=1e-4, fused=True)
ceil = make_ceiling("cpu", N * E)
for _ in range(3): opt.step(); ceil.fn(); ref.step()
modes = sys.argv[1:]
a, c = {m: [] for m in modes}, []
for r in range(int(os.environ.get("ROUNDS", 40))):
    t = time.perf_counter(); ceil.fn(); c.append(time.perf_counter() - t)
    for m in modes[r % len(modes):] + modes[:r % len(modes)]:
        os.environ["PFM"] = m
        t = time.perf_counter(); opt.step(); a[m].append(time.perf_counter() - t)
    ref.step()
cm = statistics.median(c)
for m in modes:
    am = statistics.median(a[m])
    print(m, "step %.3f ms ceiling %.3f ms frac %.3f" % (am*1e3, cm*1e3, (28*N*E/am)/(ceil.bytes/cm)))

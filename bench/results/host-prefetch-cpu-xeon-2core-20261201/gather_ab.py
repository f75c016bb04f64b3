# Experiment harness of README.md (this folder): it sets ONEPASS_HOSTPF / ONEPASS_PFGAP, read only by
# that experiment build; on a committed build every mode runs the same code.
import os, sys, time, statistics, torch, onepass
torch.set_num_threads(2)
n = int(sys.argv[1]); rounds = int(sys.argv[2]); modes = sys.argv[3].split(",")
ps = [torch.nn.Parameter(torch.randn(16)) for _ in range(n)]
for p in ps: p.grad = torch.randn(16)
opt = onepass.AdamW(ps, lr=1e-3)
for _ in range(3): opt.step()
g = opt.param_groups[0]; plan = opt._batch_cache[id(g)].plan; params = g["params"]
junk = torch.zeros(64 << 18)
res = {(m, c): [] for m in modes for c in ("hot", "cold")}
for r in range(rounds):
    for m in modes:
        os.environ["ONEPASS_HOSTPF"], os.environ["ONEPASS_PFGAP"] = m.split(":")
        hot = []
        for _ in range(20):
            t = time.perf_counter(); assert plan.gather(params); hot.append(time.perf_counter() - t); plan.release()
        cold = []
        for _ in range(10):
            junk.add_(1.0)
            t = time.perf_counter(); plan.gather(params); cold.append(time.perf_counter() - t); plan.release()
        res[(m, "hot")].append(statistics.median(hot) * 1e6); res[(m, "cold")].append(statistics.median(cold) * 1e6)
for c in ("hot", "cold"):
    print("gather", c, "  ".join(f"mode {m}: {statistics.median(res[(m, c)]):.1f}" for m in modes))

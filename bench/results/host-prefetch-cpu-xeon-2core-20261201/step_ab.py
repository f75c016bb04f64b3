# Experiment harness of README.md (this folder): it sets ONEPASS_HOSTPF / ONEPASS_PFGAP, read only by
# that experiment build; on a committed build every mode runs the same code.
import os, sys, time, statistics, torch, onepass
torch.set_num_threads(int(os.environ.get("NT", "2")))
n = int(sys.argv[1]); rounds = int(sys.argv[2]); modes = sys.argv[3].split(",")
ps = [torch.nn.Parameter(torch.randn(16)) for _ in range(n)]
for p in ps: p.grad = torch.randn(16)
opt = onepass.AdamW(ps, lr=1e-3)
for _ in range(5): opt.step()
junk = torch.zeros(64 << 18)  # 64 MB
res = {(m, c): [] for m in modes for c in ("hot", "cold")}
for r in range(rounds):
    for m in modes:
        os.environ["ONEPASS_HOSTPF"], os.environ["ONEPASS_PFGAP"] = m.split(":")
        # hot: 20 back-to-back steps
        t = time.perf_counter()
        for _ in range(20): opt.step()
        res[(m, "hot")].append((time.perf_counter() - t) / 20 * 1e6)
        cold = []
        for _ in range(10):
            junk.add_(1.0)
            t = time.perf_counter(); opt.step(); cold.append(time.perf_counter() - t)
        res[(m, "cold")].append(statistics.median(cold) * 1e6)
for c in ("hot", "cold"):
    print(c, "  ".join(f"mode {m}: {statistics.median(res[(m, c)]):.0f}" for m in modes))

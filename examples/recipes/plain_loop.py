"""Recipe: a plain training loop with torch.amp.GradScaler and an lr scheduler.

onepass.AdamW takes torch.optim.AdamW's place unchanged. GradScaler hands onepass the scale and
the overflow flag, so the grads are unscaled inside the optimizer's one pass, and a step with an
inf/NaN gradient changes nothing (not even the step count).

Run: python examples/recipes/plain_loop.py  (CPU, a few seconds). It checks itself: the same loop
on onepass's reference backend gives the same bits (torch.equal) as the default backend.
"""
import copy

import torch

import onepass


def train(model, backend, steps=6):
    opt = onepass.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randn(8, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step == 2:  # an overflow, as fp16 training meets now and then: the step is skipped
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)   # unscales inside onepass's pass; skips the step on inf/NaN
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return opt, scaler


def main():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    ref_model = copy.deepcopy(model)
    opt, scaler = train(model, "auto")
    train(ref_model, "reference")
    steps = {float(st["step"]) for st in opt.state.values()}
    print(f"backend: {opt.last_backends}, step counts: {sorted(steps)} (6 steps, 1 skipped), "
          f"scale: {scaler.get_scale()}")
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    print(f"same bits as the reference: {same}")
    return 0 if same and steps == {5.0} else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's recipes run: onepass.AdamW handed to the Hugging Face Trainer and to PyTorch
Lightning steps the model (CPU, tiny models built from configs, no downloads, 3 steps).

Needs the optional packages (transformers + accelerate, lightning); each test skips when its
package is missing. The plain loop with GradScaler and a scheduler is examples/recipes/
plain_loop.py, run by test_plain_loop_example.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import onepass

STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def test_plain_loop_example():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "recipes", "plain_loop.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same bits as the reference: True" in proc.stdout


def test_hf_trainer_steps_onepass(tmp_path):
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    opt = onepass.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = _schedule(opt)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Data(),
                         optimizers=(opt, sched)).train()
    params = list(model.parameters())
    # onepass itself stepped (the Trainer wraps it in accelerate's AcceleratedOptimizer)
    assert opt.last_backends == ["cpu"]
    assert len(opt.state) == len(params)
    assert all(float(st["step"]) == STEPS for st in opt.state.values())
    assert all(not torch.equal(a, b) for a, b in zip(params, before))
    assert opt.param_groups[0]["lr"] == 1e-2 / (1 + STEPS)
    # Not compared with a plain loop bit for bit: the Trainer normalizes the loss by the
    # number of label tokens in its own way (num_items_in_batch), so its gradients differ
    # from model(...).loss in the last bits (measured: 8e-5 apart after 3 steps).


def test_lightning_steps_onepass_like_a_plain_loop():
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(4, 8, generator=gen))
            self.b = torch.nn.Parameter(torch.randn(8, generator=gen))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            # elementwise: the gradient is the data, the same bits whatever runs the loop
            return (x * self.w).sum() + (x.sum(dim=(0, 1)) * self.b).sum()

        def configure_optimizers(self):
            opt = onepass.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
            # interval "step": Lightning steps schedulers once an epoch unless told otherwise
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": _schedule(opt), "interval": "step"}}

    module = Module()
    plain = copy.deepcopy(module)
    x = torch.randn(2 * STEPS, 4, 8, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, onepass.AdamW)
    assert all(float(st["step"]) == STEPS for st in opt.state.values()) and len(opt.state) == 2

    # the same steps driven by hand
    popt = onepass.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    psched = _schedule(popt)
    for i in range(STEPS):
        plain.training_step((x[i:i + 1],), i).backward()
        popt.step()
        popt.zero_grad(set_to_none=True)
        psched.step()
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a.detach(), b.detach())
    for p, q in zip(module.parameters(), plain.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], popt.state[q][k])

"""The issue's PyTorch prototype recipe for the bundled model, as a cross-check of tinylazy's trainer.

    python benchmarks/torch_prototype.py --steps 2600 --out runs/proto

Same model (the test stand-in ``tests/torch_dit.py``, official init from ``tinylazy.dit``),
same digits; eps MSE only, AdamW (lr 1e-3, no weight decay), constant lr, batch 64, 10% label
drop, EMA 0.999 started as a copy of the initial weights (official ``update_ema``) or, with
``--ema-warmup``, ramped as ``tinylazy.train`` does.  Writes the EMA weights as tinylazy
safetensors every ``--save-every`` steps, to be scored with ``python -m tinylazy.metrics --weights``.
PyTorch is a test/benchmark extra; the package never imports it.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from torch_dit import TorchDiT  # noqa: E402

from tinylazy.config import get_config  # noqa: E402
from tinylazy.data import load_digits_dataset  # noqa: E402
from tinylazy.diffusion import linear_betas  # noqa: E402
from tinylazy.dit import DiT, init_params  # noqa: E402
from tinylazy.io import save_dit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--ema-warmup", action="store_true", help="decay min(ema_decay, (1+n)/(10+n))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=1300)
    ap.add_argument("--out", default="runs/proto", help="prefix of the EMA files (<out>-<step>.safetensors)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_config("tiny-dit-digits")
    model = TorchDiT.from_params(cfg, init_params(cfg, seed=0), dtype=torch.float32)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images, labels = (torch.from_numpy(a) for a in load_digits_dataset())
    acp = torch.from_numpy(np.cumprod(1 - linear_betas())).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    B, t0 = args.batch_size, time.time()
    perm, pos = torch.randperm(len(images), generator=g), 0
    for step in range(args.steps):
        if pos + B > len(images):
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx, pos = perm[pos:pos + B], pos + B
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(B, generator=g) < 0.1] = cfg.num_classes                     # label drop
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y)[:, :1] - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k != "pos_embed":
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f} s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            params = {k: v.numpy().astype(np.float32) for k, v in ema.items()}
            save_dit(DiT(cfg, params, dtype="float32"), f"{args.out}-{step + 1}.safetensors")
    print(f"{args.steps} steps in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

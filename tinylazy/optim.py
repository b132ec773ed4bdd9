"""AdamW and the EMA of the weights, on dicts of arrays updated in place.

``AdamW`` follows ``torch.optim.AdamW`` (single-tensor path, no amsgrad) op for op:
decoupled weight decay, then the moments, then the bias-corrected step.  Defaults are
the official DiT settings (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0).
``update_ema`` is the official ``update_ema``: ``ema.mul_(decay).add_(param, alpha=1 - decay)``.
"""
import math

import numpy as np

from . import parallel
from .backend import array_module_of, to_numpy


class AdamW:
    """AdamW over ``params`` (name -> array), which ``step`` updates in place.

    State: ``step`` (shared count, as every tensor steps together) and per-name
    ``exp_avg`` / ``exp_avg_sq`` in the parameter dtype, as PyTorch keeps them.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), \
            float(weight_decay)
        self.step_count = 0
        self.exp_avg = {k: array_module_of(p).zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: array_module_of(p).zeros_like(p) for k, p in params.items()}

    def step(self, grads):
        """One update from ``grads`` (name -> array, every parameter name present).  Every
        gradient is checked before any parameter changes."""
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise KeyError(f"AdamW.step: no gradient for {missing[:5]}")
        for k, p in self.params.items():
            if grads[k].shape != p.shape:
                raise ValueError(f"AdamW.step: gradient of {k} has shape {tuple(grads[k].shape)}, "
                                 f"expected {tuple(p.shape)}")
        self.step_count += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1 ** self.step_count)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** self.step_count)

        def update(k):
            p, g, m, v = self.params[k], grads[k], self.exp_avg[k], self.exp_avg_sq[k]
            xp = array_module_of(p)
            if self.weight_decay:
                p *= 1.0 - self.lr * self.weight_decay              # decoupled weight decay
            m += (1.0 - beta1) * (g - m)                            # exp_avg.lerp_(grad, 1 - beta1)
            v *= beta2
            v += ((1.0 - beta2) * g) * g                            # addcmul_(grad, grad, value=1 - beta2)
            denom = xp.sqrt(v)
            denom /= bias_correction2_sqrt
            denom += self.eps
            p -= step_size * (m / denom)                            # addcdiv_(exp_avg, denom, value=-step_size)
        parallel.for_each_name(update, self.params)

    def state_dict(self):
        """Host arrays and plain settings: {"step", "lr", "betas", "eps", "weight_decay", "exp_avg", "exp_avg_sq"}."""
        return {"step": self.step_count, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "exp_avg": {k: to_numpy(a) for k, a in self.exp_avg.items()},
                "exp_avg_sq": {k: to_numpy(a) for k, a in self.exp_avg_sq.items()}}

    def load_state_dict(self, state):
        """Restore a ``state_dict``; names and shapes must match the parameters."""
        for part in ("exp_avg", "exp_avg_sq"):
            got = state[part]
            if set(got) != set(self.params):
                diff = sorted(set(got) ^ set(self.params))
                raise ValueError(f"optimizer state {part} does not match the parameters: {diff[:5]}")
            for k, p in self.params.items():
                if tuple(got[k].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {part}/{k} has shape {tuple(got[k].shape)}, "
                                     f"expected {tuple(p.shape)}")
        xp = array_module_of(next(iter(self.params.values())))
        self.step_count = int(state["step"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.exp_avg = {k: xp.asarray(np.asarray(state["exp_avg"][k]), dtype=p.dtype).copy()
                        for k, p in self.params.items()}
        self.exp_avg_sq = {k: xp.asarray(np.asarray(state["exp_avg_sq"][k]), dtype=p.dtype).copy()
                           for k, p in self.params.items()}


def update_ema(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * param, in place, for every name in ``ema``.

    Official order of ops: ``ema.mul_(decay).add_(param, alpha=1 - decay)``;
    ``decay=0`` copies (how the official script initialises its EMA).
    """
    def update(k):
        e = ema[k]
        e *= decay
        e += (1.0 - decay) * params[k]
    parallel.for_each_name(update, ema)

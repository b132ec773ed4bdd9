"""Peak memory of one training forward + backward (forward_train, then backward).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/backward_memory.py --config DiT-S/2 --batch 8

Each measurement runs in a fresh subprocess with the model already built (so its
weights are excluded): tracemalloc's peak of NumPy allocations during the step, and
the kernel's peak RSS above the RSS before the step (VmHWM, reset through
/proc/self/clear_refs).  Also printed: the bytes the cache keeps, the gradients'
bytes (one weight-sized copy), and PyTorch CPU eager's peak RSS for the same step
as a peer.  Float32.
"""
import argparse
import json
import subprocess
import sys

MiB = 1 << 20

CHILD = r"""
import json, os, sys, tracemalloc
import numpy as np
import tinylazy as tl
cfg_name, B, which = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

cfg = tl.get_config(cfg_name)
rng = np.random.default_rng(0)
x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
t, y = rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes, B)
dout = rng.standard_normal((B, cfg.out_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
params = tl.init_params(cfg, scheme="random")
res = {}
if which == "tinylazy":
    model = tl.DiT(cfg, params, dtype="float32")
    del params
    model.backward(dout[:1], model.forward_train(x[:1], t[:1], y[:1])[1])     # warm up BLAS buffers
    rss0 = status_kib("VmRSS")
    reset_peak()
    tracemalloc.start()
    out, cache = model.forward_train(x, t, y)
    owned = {}
    def walk(c):
        for v in (c.values() if isinstance(c, dict) else c):
            if isinstance(v, (dict, list, tuple)):
                walk(v)
            elif isinstance(v, np.ndarray):
                o = v if v.base is None else v.base
                owned[id(o)] = o
    walk(cache)
    res["cache"] = sum(a.nbytes for a in owned.values())
    del owned                                          # backward frees the cache block by block
    grads, dx = model.backward(dout, cache)
    res["grads"] = sum(g.nbytes for g in grads.values())
    res["traced_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
else:
    import torch
    sys.path.insert(0, "tests")
    from torch_dit import TorchDiT
    torch.set_num_threads(2)
    model = TorchDiT.from_params(cfg, params, torch.float32)
    del params
    tx, tt, ty, td = map(torch.from_numpy, (x, t, y, dout))
    (model(tx[:1], tt[:1], ty[:1]) * td[:1]).sum().backward()
    model.zero_grad(set_to_none=True)
    rss0 = status_kib("VmRSS")
    reset_peak()
    (model(tx, tt, ty) * td).sum().backward()
res["rss_peak"] = (status_kib("VmHWM") - rss0) * 1024
print(json.dumps(res))
"""


def measure(config, batch, which):
    r = subprocess.run([sys.executable, "-c", CHILD, config, str(batch), which],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="DiT-S/2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    args = ap.parse_args()
    import tinylazy as tl
    cfg = tl.get_config(args.config)
    T, D = cfg.num_tokens, cfg.hidden_size
    unit = args.batch * T * D * 4
    ours = measure(args.config, args.batch, "tinylazy")
    print(f"{args.config}, batch {args.batch}, float32; one (B, T, D) array = {unit / MiB:.2f} MiB")
    print(f"tinylazy  cache kept by forward_train   {ours['cache'] / MiB:8.1f} MiB"
          f"  ({ours['cache'] / unit / cfg.depth:.2f} (B, T, D) arrays per block)")
    print(f"tinylazy  gradients (weight-sized)      {ours['grads'] / MiB:8.1f} MiB")
    print(f"tinylazy  peak NumPy memory, step       {ours['traced_peak'] / MiB:8.1f} MiB  (tracemalloc)")
    print(f"tinylazy  peak RSS above weights, step  {ours['rss_peak'] / MiB:8.1f} MiB  (VmHWM)")
    if not args.no_torch:
        peer = measure(args.config, args.batch, "torch")
        print(f"PyTorch   peak RSS above weights, step  {peer['rss_peak'] / MiB:8.1f} MiB  (VmHWM, CPU eager)")


if __name__ == "__main__":
    main()

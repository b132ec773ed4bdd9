"""The trainer: one step vs PyTorch, bit-identical resume, the export, the data and the CLI."""
import json

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import train as T
from tinylazy.diffusion import create_diffusion
from tinylazy.io import load_dit, read_safetensors, write_safetensors
from tinylazy.optim import AdamW

from conftest import rel_err

TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2}


def _fake_digits(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 17, size=(n, 1, 8, 8)) / 8.0 - 1.0).repeat(2, 2).repeat(2, 3).astype(np.float32)
    return images, np.arange(n, dtype=np.int64) % 10


def test_one_step_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    from test_losses import _torch_terms
    from torch_dit import TorchDiT

    cfg = tl.DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                       num_classes=5)
    params = tl.init_params(cfg, seed=4, scheme="random")
    diffusion = create_diffusion("")
    rng = np.random.default_rng(5)
    B = 6
    x0 = rng.integers(0, 17, size=(B, 2, 8, 8)) / 8.0 - 1.0
    y = np.array([0, 1, 5, 3, 5, 4])                      # 5 = the null class (a dropped label)
    t = np.array([0, 0, 3, 250, 998, 999])
    noise = rng.standard_normal(x0.shape)
    settings = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

    model = tl.DiT(cfg, {k: v.copy() for k, v in params.items()}, dtype="float64")   # AdamW updates in place
    trainable = {k: v for k, v in model.params.items() if k != "pos_embed"}
    terms = T.train_step(model, diffusion, AdamW(trainable, **settings), x0, y, t, noise)

    tm = TorchDiT.from_params(cfg, params, torch.float64, pinned_features=True)   # compared at 1e-12: pinned
    opt = torch.optim.AdamW([p for n, p in tm.named_parameters() if n != "pos_embed"], **settings)
    x_t = diffusion.q_sample(x0, t, noise)
    out = tm(torch.from_numpy(x_t), torch.from_numpy(t), torch.from_numpy(y))
    ref = _torch_terms(torch, out, x0, x_t, t, noise)
    ref["loss"].mean().backward()
    grads = {n: p.grad.numpy().copy() for n, p in tm.named_parameters() if p.grad is not None}
    opt.step()

    assert rel_err(terms["loss"], ref["loss"].detach().numpy()) <= 1e-12   # measured 3.9e-13
    assert np.array_equal(model.params["pos_embed"], tm.pos_embed.detach().numpy())
    # AdamW's first step moves each weight by lr g / (|g| + eps) (the bias corrections cancel), whose
    # slope lr eps / (|g| + eps)^2 turns a rounding-level gradient difference into up to 1.2e-9 of the
    # step where |g| is near eps, so one tolerance per tensor fails on rounding alone.  Each weight is
    # held instead to what a gradient difference of 1e-10 max|g| (test_dit_grad's bound) can cause,
    # plus 4 ulps of float64 rounding of the update; measured: half of that allowance (2 ulps).
    lr, eps = settings["lr"], settings["eps"]
    for k, g in grads.items():
        new, ours = tm.state_dict()[k].numpy(), model.params[k]
        allowed = lr * eps / (np.abs(g) + eps) ** 2 * 1e-10 * np.abs(g).max() \
            + 4 * np.spacing(np.maximum(np.maximum(np.abs(params[k]), np.abs(new)), lr))
        assert (np.abs(ours - new) <= allowed).all(), f"{k}: {np.abs(ours - new).max():.2e} > allowed"
        assert np.abs(ours - params[k]).max() > 0.5 * lr, k                    # the step was taken


@pytest.mark.parametrize("ema_warmup,snr_gamma", [(False, 0.0), (True, 0.0), (True, 5.0)])
def test_trainer_run_matches_torch_adamw_and_ema(monkeypatch, ema_warmup, snr_gamma):
    """Twelve steps of the Trainer itself (its batches, label drop, lr decay, EMA, official init)
    replayed in PyTorch: one step matching is not enough to catch state that goes stale after it."""
    torch = pytest.importorskip("torch")
    from test_losses import _torch_terms, torch_min_snr_weight
    from torch_dit import TorchDiT

    images, labels = _fake_digits(n=40)
    recipe = T.Recipe(overrides={"depth": 2, "hidden_size": 32, "num_heads": 2}, batch_size=8, lr=1e-3,
                      lr_decay_steps=6, steps=12, ema_decay=0.8, class_dropout_prob=0.3, dtype="float64",
                      ema_warmup=ema_warmup, snr_gamma=snr_gamma)
    tr = T.Trainer(recipe, images, labels)
    params0 = {k: v.copy() for k, v in tr.model.params.items()}
    batches = []
    run_step = T.train_step

    def recording_step(model, diffusion, opt, x_start, y, t, noise, snr_gamma=None):
        batches.append((x_start.copy(), y.copy(), t.copy(), noise.copy(), opt.lr))
        return run_step(model, diffusion, opt, x_start, y, t, noise, snr_gamma)
    monkeypatch.setattr(T, "train_step", recording_step)
    for _ in range(recipe.steps):
        tr.step()
    assert any((y == 10).any() for _, y, _, _, _ in batches)           # some labels were dropped

    tm = TorchDiT.from_params(tr.config, params0, torch.float64, pinned_features=True)   # compared at 1e-10: pinned
    named = {n: p for n, p in tm.named_parameters() if n != "pos_embed"}
    opt = torch.optim.AdamW(list(named.values()), lr=1e-3, weight_decay=0.0)
    ema = {n: p.detach().clone() for n, p in named.items()}
    weighted = []
    for n_done, (x0, y, t, noise, lr) in enumerate(batches):
        decay = min(0.8, (1 + n_done) / (10 + n_done)) if ema_warmup else 0.8
        x_t = tr.diffusion.q_sample(x0, t, noise)
        out = tm(torch.from_numpy(x_t), torch.from_numpy(t), torch.from_numpy(y))
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        terms = _torch_terms(torch, out, x0, x_t, t, noise)
        if snr_gamma:                                                 # Min-SNR: min(SNR, gamma) / SNR on mse
            w = torch_min_snr_weight(torch, t, snr_gamma)
            terms["loss"] = w * terms["mse"] + terms["vb"]
            weighted.append(bool((w < 1).any()))
        terms["loss"].mean().backward()
        opt.step()
        with torch.no_grad():
            for n, p in named.items():
                ema[n].mul_(decay).add_(p, alpha=1 - decay)           # official update_ema
    assert [b[4] for b in batches][-3:] == pytest.approx([5e-4, 3.333333e-4, 1.666667e-4])
    assert any(weighted) or not snr_gamma                             # some t < 130 were down-weighted
    for n, p in named.items():
        new = p.detach().numpy()
        # measured <= 5.4e-14 for both (12 steps: no weight's sqrt(v) near eps here); 1e-10: ~2000x margin
        assert rel_err(tr.model.params[n] - params0[n], new - params0[n]) <= 1e-10, n
        assert rel_err(tr.ema[n] - params0[n], ema[n].numpy() - params0[n]) <= 1e-10, n


def _recipe(**kw):
    return T.Recipe(overrides=TINY, batch_size=8, lr=1e-3, ema_decay=0.9, **kw)


class _Stop(Exception):
    pass


def test_resume_gives_bit_identical_weights(tmp_path):
    images, labels = _fake_digits()
    kw = dict(ckpt_every=3, sample_every=0, log_every=2, progress=False, images=images, labels=labels)
    straight = T.train(_recipe(steps=8, lr_decay_steps=4), tmp_path / "a", **kw)

    def crash_at_5(tr):
        if tr.step_count == 5:
            raise _Stop
    with pytest.raises(_Stop):                       # dies after step 5; the last checkpoint is step 3
        T.train(_recipe(steps=8, lr_decay_steps=4), tmp_path / "b", callback=crash_at_5, **kw)
    assert not list((tmp_path / "b").glob("*.tmp"))
    assert read_safetensors(tmp_path / "b" / T.CHECKPOINT)[1]["step"] == "3"
    with pytest.raises(FileExistsError):
        T.train(_recipe(steps=8, lr_decay_steps=4), tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="steps: checkpoint 8, now 9"):            # the schedule ends at steps
        T.train(_recipe(steps=9, lr_decay_steps=4), tmp_path / "b", resume=True, **kw)
    resumed = T.train(_recipe(steps=8, lr_decay_steps=4), tmp_path / "b", resume=True, **kw)

    assert resumed.step_count == straight.step_count == 8
    a, _ = read_safetensors(tmp_path / "a" / T.CHECKPOINT)
    b, _ = read_safetensors(tmp_path / "b" / T.CHECKPOINT)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    ea, _ = read_safetensors(tmp_path / "a" / "ema.safetensors")
    eb, _ = read_safetensors(tmp_path / "b" / "ema.safetensors")
    for k in ea:
        assert np.array_equal(ea[k], eb[k]), k
    assert straight.rng.bit_generator.state == resumed.rng.bit_generator.state
    assert not np.array_equal(a["model/final_layer.linear.weight"], a["ema/final_layer.linear.weight"])


def test_resume_writes_the_grid_of_a_run_killed_while_writing_it(tmp_path, monkeypatch):
    # The checkpoint of the last step comes before its grid: a run killed in between resumed with
    # nothing left to train and never wrote the grid (found by a kill -9 test).
    images, labels = _fake_digits()
    kw = dict(ckpt_every=2, sample_every=2, log_every=2, progress=False, images=images, labels=labels)
    T.train(_recipe(steps=4), tmp_path / "a", **kw)
    real = T.sample_grid

    def killed_at_4(tr, path):
        if tr.step_count == 4:
            raise _Stop
        real(tr, path)
    monkeypatch.setattr(T, "sample_grid", killed_at_4)
    with pytest.raises(_Stop):
        T.train(_recipe(steps=4), tmp_path / "b", **kw)
    monkeypatch.setattr(T, "sample_grid", real)
    assert read_safetensors(tmp_path / "b" / T.CHECKPOINT)[1]["step"] == "4"
    assert not (tmp_path / "b" / "samples" / "step_000004.png").exists()
    T.train(_recipe(steps=4), tmp_path / "b", resume=True, **kw)
    for s in (2, 4):
        name = f"samples/step_{s:06d}.png"
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


def test_lr_schedule():
    images, labels = _fake_digits()
    const = T.Trainer(_recipe(steps=10), images, labels)
    decay = T.Trainer(_recipe(steps=10, lr_decay_steps=4), images, labels)
    assert [const.lr_at(s) for s in (0, 9)] == [1e-3, 1e-3]
    assert [decay.lr_at(s) for s in (0, 6, 7, 8, 9)] == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    decay.step()
    assert decay.opt.lr == 1e-3


def test_ema_warmup_schedule():
    """TensorFlow's num_updates warm-up: (1 + n) / (10 + n), capped at ema_decay; off = constant (official)."""
    images, labels = _fake_digits()
    off = T.Trainer(_recipe(steps=10), images, labels)
    on = T.Trainer(_recipe(steps=10, ema_warmup=True), images, labels)
    assert [off.ema_decay_at(n) for n in (0, 5, 1000)] == [0.9, 0.9, 0.9]
    assert [on.ema_decay_at(n) for n in (0, 1, 5, 80, 1000)] == pytest.approx([0.1, 2 / 11, 6 / 15, 81 / 90, 0.9])
    # the initial weights' share of the EMA: decay ** n without warm-up, a product that vanishes with it
    assert np.prod([on.ema_decay_at(n) for n in range(100)]) < 1e-9 < 0.9 ** 100


def test_resume_refuses_changed_settings(tmp_path):
    images, labels = _fake_digits()
    kw = dict(sample_every=0, progress=False, images=images, labels=labels)
    T.train(_recipe(steps=2), tmp_path, **kw)
    with pytest.raises(ValueError, match="lr: checkpoint 0.001, now 0.002"):
        T.train(T.Recipe(overrides=TINY, batch_size=8, lr=2e-3, ema_decay=0.9, steps=4), tmp_path, resume=True, **kw)
    with pytest.raises(ValueError, match="ema_warmup: checkpoint False, now True"):
        T.train(_recipe(steps=4, ema_warmup=True), tmp_path, resume=True, **kw)
    with pytest.raises(ValueError, match="snr_gamma: checkpoint 0.0, now 5.0"):
        T.train(_recipe(steps=4, snr_gamma=5.0), tmp_path, resume=True, **kw)
    # a checkpoint written before a setting existed resumes when the run keeps that setting's default
    ckpt = tmp_path / T.CHECKPOINT
    tensors, meta = read_safetensors(ckpt)
    recipe = json.loads(meta["recipe"])
    del recipe["ema_warmup"], recipe["snr_gamma"]
    write_safetensors(ckpt, tensors, dict(meta, recipe=json.dumps(recipe)))
    assert T.train(_recipe(steps=4), tmp_path, resume=True, **kw).step_count == 4


def test_export_official_keys_config_and_facts(tmp_path):
    images, labels = _fake_digits()
    tr = T.train(_recipe(steps=3), tmp_path, sample_every=3, progress=False, images=images, labels=labels,
                 export=tmp_path / "m.safetensors")
    assert (tmp_path / "samples" / "step_000003.png").exists()
    model = load_dit(tmp_path / "m.safetensors")
    assert model.config == tl.get_config("tiny-dit-digits", **TINY)
    assert set(model.params) == set(tl.param_shapes(model.config))
    for k, v in tr.ema.items():
        assert np.array_equal(model.params[k], v)
    _, meta = read_safetensors(tmp_path / "m.safetensors")
    assert meta["num_heads"] == "2" and meta["steps"] == "3" and meta["weights"] == "ema"
    assert json.loads(meta["recipe"])["lr"] == 1e-3 and json.loads(meta["config"])["depth"] == 1
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and np.isfinite(lines[-1]["loss"])


def test_digits_dataset():
    pytest.importorskip("sklearn")
    from tinylazy.data import load_digits_dataset
    images, labels = load_digits_dataset()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert np.array_equal(images[:, :, ::2, ::2], images[:, :, 1::2, 1::2])        # 2x2 nearest blocks
    assert set(np.unique((images + 1) * 8)) <= set(range(17))
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_cli_help_and_errors(capsys):
    assert T.main(["--help"]) == 0 and "--resume" in capsys.readouterr().out
    assert T.main(["--config", "DiT-Q/2", "--no-progress"]) == 2
    assert "unknown DiT configuration" in capsys.readouterr().err
    assert T.main(["--snr-gamma", "-1", "--no-progress"]) == 2
    assert "--snr-gamma must be a finite number >= 0, got -1" in capsys.readouterr().err


def test_progress_line_past_its_total():
    """Gate training may run past its planned iterations (the rho search): no negative ETA, a full bar."""
    import io
    from tinylazy.progress import Progress

    bar = Progress(range(5), total=3, desc="x", file=io.StringIO())
    for _ in bar:
        pass
    line = bar.line()
    assert line.startswith("x 5/3 [" + "#" * 24 + "]") and line.endswith("<?") and "-" not in line


def _forge(path, out, tensors=None, **meta_edit):
    from tinylazy.io import SafetensorsFile
    with SafetensorsFile(path) as f:
        t, meta = {k: f.read(k) for k in f.entries}, dict(f.metadata)
    t.update(tensors or {})
    write_safetensors(out, {k: v for k, v in t.items() if v is not None}, dict(meta, **meta_edit))
    return out


def test_resume_validates_every_field(tmp_path):
    """--resume trusted the metadata: step -5 or 10^6, a data/perm that is not a permutation, nan seconds."""
    images, labels = _fake_digits()
    tr = T.Trainer(_recipe(steps=6), images, labels)
    tr.step()
    tr.save_checkpoint(tmp_path / "ok.safetensors")
    rng = json.loads(read_safetensors(tmp_path / "ok.safetensors")[1]["rng"])
    perm = read_safetensors(tmp_path / "ok.safetensors")[0]["data/perm"]
    cases = [
        (dict(step="-5", adam_step="-5"), "'step' is '-5', not an integer in 0..6"),
        (dict(step="1000000", adam_step="1000000"), "not an integer in 0..6"),
        (dict(step="1.0"), "'step' is '1.0'"),
        (dict(adam_step="2"), "adam_step 2 differs from step 1"),
        (dict(train_seconds="nan"), "'train_seconds' is 'nan', not a finite number"),
        (dict(data_pos="3"), "data_pos 3 with 40 permuted images does not follow from step 1"),
        (dict(data_pos="16"), "position 8"),
        (dict(data_pos="48"), "'data_pos' is '48', not an integer in 0..40"),
        (dict(rng=json.dumps(dict(rng, has_uint32=7))), "has_uint32 is 7, not an integer in 0..1"),
        (dict(rng=json.dumps(dict(rng, state={"state": 1.5, "inc": 1}))), "state.state is 1.5"),
        (dict(rng=json.dumps(dict(rng, bit_generator="MT19937"))), "bit_generator is 'MT19937', this run uses"),
        (dict(rng="[" * 10000), "'rng': JSON nested too deeply"),
        (dict(recipe="[]"), "'recipe' is a list of 0 items, not a JSON dict"),
        (dict(format="x"), "not a tinylazy-train-checkpoint-1 checkpoint"),
        ({"data/perm": np.zeros(40, np.int64)}, "data/perm is not a permutation of the 40 training images"),
        ({"data/perm": perm[:10]}, "data/perm is not a permutation"),
        ({"data/perm": perm.astype(np.float64)}, "tensor data/perm is F64 \\(40,\\), this run needs int64"),
        ({"exp_avg_sq/pos_embed": np.zeros(3, np.float32)}, "unexpected 1: 'exp_avg_sq/pos_embed'"),
        ({"ema/final_layer.linear.bias": None}, "missing 1: 'ema/final_layer.linear.bias'"),
        ({"exp_avg_sq/final_layer.linear.bias": -np.ones(8, np.float32)}, "negative entries"),
    ]
    fresh = T.Trainer(_recipe(steps=6), images, labels)
    before = {k: v.copy() for k, v in fresh.trainable.items()}
    for edit, match in cases:
        tensors = {k: v for k, v in edit.items() if "/" in k}
        meta = {k: v for k, v in edit.items() if "/" not in k}
        bad = _forge(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors", tensors, **meta)
        with pytest.raises(ValueError, match=match) as e:
            fresh.load_checkpoint(bad)
        assert str(bad) in str(e.value) and isinstance(e.value, tl.io.CheckpointError)
    assert fresh.step_count == 0 and all(np.array_equal(before[k], v) for k, v in fresh.trainable.items())
    fresh.load_checkpoint(tmp_path / "ok.safetensors")
    assert fresh.step_count == 1 and fresh.rng.bit_generator.state == tr.rng.bit_generator.state

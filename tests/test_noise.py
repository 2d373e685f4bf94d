"""Issue 30: SGD noise recorded. The gradient noise scale B_simple (McCandlish et al. 2018) from the
micro-batch gradients a step with gradient accumulation already computes: the mechanics checked
against closed-form per-sample gradients of a linear model, the estimator's unbiasedness against
the exact per-sample gradient covariance of a finite population (with a naive estimator as the
negative control), and a run's records: the fields at flush steps only, training unchanged."""
import numpy as np
import pytest
import torch

from engine.store.rundir import RunDir
from engine.train.loop import train
from engine.train.noise import MicroGrads, estimate
from tests.conftest import TINY_LM, tiny


def test_micro_batch_gradients_from_the_accumulating_grad_equal_closed_form_per_sample_gradients():
    torch.manual_seed(0)
    d, batch, b = 5, 12, 3
    x, y = torch.randn(batch, d, dtype=torch.float64), torch.randn(batch, dtype=torch.float64)
    lin = torch.nn.Linear(d, 1, bias=False).double()
    mg = MicroGrads(list(lin.parameters()))
    for i in range(0, batch, b):                       # the loop's accumulation: mean loss × b/B
        loss = 0.5 * ((lin(x[i:i + b]).squeeze(1) - y[i:i + b]) ** 2).mean() * (b / batch)
        loss.backward()
        mg.after_backward(b / batch)
    w = lin.weight.detach().numpy()[0]
    xn, yn = x.numpy(), y.numpy()
    per_sample = (xn @ w - yn)[:, None] * xn           # d/dw of 0.5 (w.x - y)^2
    micro = per_sample.reshape(batch // b, b, d).mean(axis=1)
    small, big = float(np.mean(np.sum(micro ** 2, axis=1))), float(np.sum(per_sample.mean(axis=0) ** 2))
    assert float(torch.stack(mg.sq).mean()) == pytest.approx(small, rel=1e-12)
    got = mg.fields(b, batch, lr=0.1)
    assert got["grad_norm"] == pytest.approx(np.sqrt(big), rel=1e-12)
    assert got == pytest.approx(estimate(small, big, b, batch, 0.1), rel=1e-10)
    assert got["lr_over_batch"] == pytest.approx(0.1 / 12)


def test_the_estimates_are_unbiased_for_the_exact_gradient_covariance():
    """A finite population of N samples with closed-form per-sample gradients at a fixed w: the exact
    tr(Σ) and |G|², and the mean of the estimates over 4000 random batches (drawn with replacement,
    B = 64 in micro-batches of 8), which must agree within 3 %. The naive estimate tr(Σ) ≈ b·mean|g_i|²
    is biased by |G|² and must fail the same test."""
    rng = np.random.default_rng(0)
    n, d, b, batch = 2000, 8, 8, 64
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    w = rng.normal(size=d) * 0.3
    grads = (x @ w - y)[:, None] * x
    g_true = grads.mean(axis=0)
    tr_sigma = float(np.sum(grads.var(axis=0)))        # population covariance's trace
    g2_true = float(g_true @ g_true)
    ests, naive = [], []
    for _ in range(4000):
        idx = rng.integers(0, n, batch)
        micro = grads[idx].reshape(batch // b, b, d).mean(axis=1)
        small = float(np.mean(np.sum(micro ** 2, axis=1)))
        big = float(np.sum(grads[idx].mean(axis=0) ** 2))
        e = estimate(small, big, b, batch, 0.1)
        ests.append((e["noise_tr_sigma"], e["noise_g2"]))
        naive.append(b * small)
    s_mean, g2_mean = np.mean(ests, axis=0)
    assert s_mean == pytest.approx(tr_sigma, rel=0.03) and g2_mean == pytest.approx(g2_true, rel=0.03)
    assert s_mean / g2_mean == pytest.approx(tr_sigma / g2_true, rel=0.05)     # B_simple from the averages
    assert abs(np.mean(naive) - tr_sigma) / tr_sigma > 0.03                     # the control is biased


def test_a_run_with_accumulation_records_the_noise_at_flush_steps_and_trains_the_same(home):
    args = ("steps=8", "batch_size=8", "micro_batch_size=2", "log_every=4", "eval_every=0", "checkpoint_every=0")
    on = RunDir.create(home, tiny(TINY_LM, *args), run_id="tiny-noise-on")
    off = RunDir.create(home, tiny(TINY_LM, *args, "noise_scale=false"), run_id="tiny-noise-off")
    whole = RunDir.create(home, tiny(TINY_LM, "steps=8", "batch_size=8", "log_every=4", "eval_every=0",
                                     "checkpoint_every=0"), run_id="tiny-noise-whole")
    for rd in (on, off, whole):
        assert train(rd) == "done"
    keys = {"grad_norm", "noise_g2", "noise_tr_sigma", "lr_over_batch"}
    recs_on, recs_off = on.train_records(), off.train_records()
    assert [r["step"] for r in recs_on if keys <= set(r)] == [4, 8]
    assert all(not (keys & set(r)) for r in recs_off + whole.train_records())    # off, and free only with accumulation
    strip = lambda r: {k: v for k, v in r.items() if k not in keys | {"noise_scale", "wall"}}  # noqa: E731
    assert [strip(r) for r in recs_on] == [strip(r) for r in recs_off]      # measuring changes nothing
    r = recs_on[3]
    assert r["lr_over_batch"] == pytest.approx(r["lr"] / 8) and r["grad_norm"] > 0
    if r["noise_g2"] > 0:
        assert r["noise_scale"] == pytest.approx(r["noise_tr_sigma"] / r["noise_g2"])


def test_when_conditions_on_the_noise_scale_from_the_emas_of_its_two_parts(home):
    """`--when noise_scale>X` / `grad_norm>X`: the values at a step boundary are B_simple as the ratio of
    the EMAs (0.8) of noise_tr_sigma and noise_g2 over the flushed records, and the EMA of grad_norm,
    computed here by hand from the records; a run without accumulation has no noise value, so the
    same request never applies there (negative control)."""
    from engine.control.client import append_request
    args = ("steps=12", "batch_size=8", "micro_batch_size=2", "log_every=4", "eval_every=0", "checkpoint_every=0")
    rd = RunDir.create(home, tiny(TINY_LM, *args), run_id="tiny-when-noise")
    plain = RunDir.create(home, tiny(TINY_LM, "steps=12", "batch_size=8", "log_every=4", "eval_every=0",
                                     "checkpoint_every=0"), run_id="tiny-when-plain")
    for r in (rd, plain):
        append_request(r, {"set": {"lr": 5e-4}, "when": "noise_scale>-1e30"})
        append_request(r, {"action": "checkpoint", "when": "grad_norm>0"})
        assert train(r) == "done"
    recs = rd.train_records()
    applied = [e for e in rd.events()[0] if e.get("event") == "control" and e.get("status") == "applied"]
    assert len(applied) == 2, rd.events()[0]
    first = next(r for r in recs if "noise_g2" in r)
    assert first["step"] == 4
    for e in applied:                                    # both at the first boundary after the first flush
        assert e["step"] == 4
    by = {e["met"]["when"]: e["met"] for e in applied}
    assert by["grad_norm>0"]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-12)
    assert by["noise_scale>-1e30"]["noise_scale"] == pytest.approx(first["noise_tr_sigma"] / first["noise_g2"], rel=1e-9)
    # the EMAs over the three flushes, by hand, are what the run's last checkpoint holds to resume with
    from engine.train.checkpoint import load_state
    flushed = [r for r in recs if "noise_g2" in r]
    assert [r["step"] for r in flushed] == [4, 8, 12]
    hand = {}
    for r in flushed:
        for k in ("noise_tr_sigma", "noise_g2", "grad_norm"):
            hand[k] = r[k] if k not in hand else 0.8 * hand[k] + 0.2 * r[k]
    last = rd.list_checkpoints()[-1]
    assert last[0] == 12
    assert load_state(last[1])[1]["loop"]["noise_ema"] == pytest.approx(hand, rel=1e-12)
    # negative control: no accumulation, no noise value: the noise request waits, the grad-norm one too
    ev = [e for e in plain.events()[0] if e.get("event") == "control" and e.get("status") == "applied"]
    assert ev == []


def test_noise_micro_measures_a_run_that_does_not_accumulate_on_its_flush_steps_only(home):
    """Opt-in where the estimate is not free (`noise_micro`): a run that trains whole batches cuts each
    flush step's batch into micro-batches to measure B_simple. Its losses are the plain run's up to
    rounding (GPT-2 has no batch statistics), its fields are at the flush steps only, and at the first
    flush they are what a run accumulating in micro-batches of the same size records there (the
    independent path); a noise_micro as large as the batch, like the plain run, records none."""
    base = ("steps=8", "batch_size=8", "log_every=4", "eval_every=0", "checkpoint_every=0")
    opt = RunDir.create(home, tiny(TINY_LM, *base, "noise_micro=2"), run_id="tiny-nm-on")
    plain = RunDir.create(home, tiny(TINY_LM, *base), run_id="tiny-nm-plain")
    acc = RunDir.create(home, tiny(TINY_LM, *base, "micro_batch_size=2"), run_id="tiny-nm-acc")
    odd = RunDir.create(home, tiny(TINY_LM, *base, "noise_micro=8"), run_id="tiny-nm-odd")   # not < the batch
    for rd in (opt, plain, acc, odd):
        assert train(rd) == "done"
    keys = {"grad_norm", "noise_g2", "noise_tr_sigma", "lr_over_batch"}
    got = opt.train_records()
    assert [r["step"] for r in got if keys <= set(r)] == [4, 8]
    assert all(not (keys & set(r)) for r in plain.train_records() + odd.train_records())
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in plain.train_records()], rel=1e-5)
    mine, theirs = got[3], acc.train_records()[3]
    assert mine["step"] == theirs["step"] == 4
    for k in ("grad_norm", "noise_tr_sigma", "lr_over_batch"):
        assert mine[k] == pytest.approx(theirs[k], rel=1e-4), k
    assert mine["noise_g2"] == pytest.approx(theirs["noise_g2"], abs=1e-4 * mine["grad_norm"] ** 2)
    # and it is the estimator's arithmetic on this step's norms, not a copy of another step's
    assert got[7]["grad_norm"] != pytest.approx(mine["grad_norm"], rel=1e-3)


def test_noise_micro_is_refused_negative_and_kept_out_of_cuda_graphs():
    from engine.config import ConfigError
    from engine.train.loop import compile_choice, compile_policy
    with pytest.raises(ConfigError, match="'noise_micro' must be >= 0, got -2"):
        tiny(TINY_LM, "noise_micro=-2")
    with pytest.raises(ConfigError, match=r"'changes\[0\].batch_size' = 12 is not a multiple of noise_micro = 8"):
        tiny(TINY_LM, "batch_size=4", "noise_micro=8", "changes=[{at_step=2, batch_size=12}]")
    tiny(TINY_LM, "batch_size=4", "noise_micro=8", "changes=[{at_step=2, batch_size=16}]")   # 4 is never cut
    from tests.conftest import TINY_IMAGES
    assert compile_choice(tiny(TINY_IMAGES, "noise_micro=4"), "cuda") == (
        True, "default", "compile = auto: on CUDA, default mode")      # its flush steps accumulate: no graphs
    assert compile_choice(tiny(TINY_IMAGES, "noise_micro=4", "noise_scale=false"), "cuda")[1] == "reduce-overhead"
    assert compile_policy(tiny(TINY_LM, "noise_micro=2"))["recompile_limit"] == \
        compile_policy(tiny(TINY_LM))["recompile_limit"] + 1


def test_noise_micro_on_a_batchnorm_model_changes_its_flush_steps_only_as_documented(home):
    """A ResNet's BatchNorm normalizes over each micro-batch on the measured steps: the steps before
    the first flush are the plain run's bit for bit, the flush step's loss is not (why it is opt-in
    and why `presets check` counts it on such a model)."""
    from tests.conftest import TINY_IMAGES
    base = ("eval_every=0", "checkpoint_every=0")
    opt = RunDir.create(home, tiny(TINY_IMAGES, *base, "noise_micro=4"), run_id="tiny-nm-resnet")
    plain = RunDir.create(home, tiny(TINY_IMAGES, *base), run_id="tiny-nm-resnet-plain")
    for rd in (opt, plain):
        assert train(rd) == "done"
    got, ref = opt.train_records(), plain.train_records()
    assert [r["step"] for r in got if "noise_tr_sigma" in r] == [4, 8, 12]
    assert [r["loss"] for r in got[:3]] == [r["loss"] for r in ref[:3]]
    assert got[3]["loss"] != ref[3]["loss"]

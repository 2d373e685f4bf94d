import pytest

from engine.config import ConfigError, apply_overrides, build, dump_toml, load_toml, to_dict
from engine.presets import list_presets, load_preset
from tests.conftest import TINY_IMAGES, tiny


def test_required_keys_exist_under_their_names():
    cfg = tiny()
    for key in ("steps", "lr", "batch_size", "seed", "eval_every", "checkpoint_every", "device"):
        assert hasattr(cfg, key)


def test_set_overrides_nested_and_typed():
    cfg = tiny(TINY_IMAGES, "lr=0.1", "model.width=4", "data.augment=[\"crop\", \"flip\"]", "device=cpu")
    assert (cfg.lr, cfg.model.width, cfg.data.augment, cfg.device) == (0.1, 4, ["crop", "flip"], "cpu")


@pytest.mark.parametrize("item, message", [
    ("lr=fast", "<test>: 'lr' must be a number, got \"fast\""),
    ("stepz=3", "--set stepz: unknown key 'stepz' (did you mean 'steps'?)"),
    ("model.widht=3", "--set model.widht: unknown key 'model.widht' (did you mean 'width'?)"),
    ("model=3", "--set model: 'model' is a table; set one of its keys"),
    ("lr", "--set 'lr': expected key=value"),
    ("batch_size=0", "<test>: 'batch_size' must be > 0, got 0"),
    ("data.mode=sometimes", "<test>: 'data.mode' = 'sometimes' is not one of online, offline"),
    ("steps=1.5", "<test>: 'steps' must be an integer, got 1.5"),
    ("compile_mode=fastest", "<test>: 'compile_mode' = 'fastest' is not one of default, reduce-overhead, "
                             "max-autotune, max-autotune-no-cudagraphs"),
    ("compile_backend=tvm", "<test>: 'compile_backend' = 'tvm' is not one of inductor, aot_eager, eager"),
])
def test_bad_set_is_one_clear_line(item, message):
    with pytest.raises(ConfigError) as e:
        tiny(TINY_IMAGES, item)
    assert str(e.value) == message


def test_compile_mode_needs_inductor():
    with pytest.raises(ConfigError) as e:
        tiny(TINY_IMAGES, "compile_backend=eager", "compile_mode=reduce-overhead")
    assert str(e.value) == ("<test>: 'compile_mode' = 'reduce-overhead' needs compile_backend = \"inductor\" "
                            "(got 'eager')")
    assert tiny(TINY_IMAGES, "compile_backend=aot_eager").compile_backend == "aot_eager"


def test_batch_must_fit_micro_batch():
    with pytest.raises(ConfigError, match="'batch_size' = 24 is not a multiple of micro_batch_size = 16"):
        tiny(TINY_IMAGES, "micro_batch_size=16", "batch_size=24")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = tiny(TINY_IMAGES, "data.augment=[\"flip\"]")
    cfg.changes = []
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(to_dict(cfg)))
    assert build(load_toml(p), str(p)) == cfg


def test_changes_round_trip_as_array_of_tables(tmp_path):
    data = apply_overrides(TINY_IMAGES, [])
    data["changes"] = [{"at_step": 5, "batch_size": 32}, {"at_lr_time": 2.5, "lr": 0.01, "ramp": 1.0}]
    cfg = build(data, "x")
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(to_dict(cfg)))
    assert build(load_toml(p), str(p)).changes == cfg.changes


def _preset(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


def test_bad_preset_unknown_key_names_file_and_key(tmp_path):
    p = _preset(tmp_path, "[base]\nsteps = 3\nlearning_rate = 0.1\n[runs.a]\n")
    with pytest.raises(ConfigError) as e:
        load_preset(str(p))
    assert str(e.value) == f"{p} [runs.a]: unknown key 'learning_rate'"


def test_bad_preset_wrong_type_in_arm(tmp_path):
    p = _preset(tmp_path, "[base]\nsteps = 3\n[runs.a]\n[runs.b]\nbatch_size = \"big\"\n")
    with pytest.raises(ConfigError) as e:
        load_preset(str(p))
    assert str(e.value) == f"{p} [runs.b]: 'batch_size' must be an integer, got \"big\""


def test_bad_preset_toml_and_missing_file(tmp_path):
    p = _preset(tmp_path, "[base\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_preset(str(p))
    with pytest.raises(ConfigError, match=r"unknown preset 'cifar_bs32_5121'.*did you mean 'cifar_bs32_512'"):
        load_preset("cifar_bs32_5121")


def test_every_shipped_preset_loads_and_cites_a_figure():
    presets = {p.name: p for p in list_presets()}
    for name in ("demo", "cifar_bs32_512", "cifar_lr05_005", "cifar_bs_up", "cifar_lr_down",
                 "cifar_online_offline_bs", "cifar_online_offline_lr", "imagenet_online_offline",
                 "c4_online_offline_bs", "c4_online_offline_lr", "c4_bs_64_512", "c4_lr_down",
                 "c4_bs_512_64", "c4_lr_up", "c4_tv_lr"):
        assert name in presets, name
        assert presets[name].figure.startswith("Fig."), name
        twin = presets[name].twin
        assert twin in presets, (name, twin)
        for cfg in presets[twin].configs():
            assert cfg.data.source.startswith("synthetic"), (name, twin)


def test_cifar_bs32_512_matches_appendix_a():
    arms = {c.name: c for c in load_preset("cifar_bs32_512").configs()}
    assert set(arms) == {"bs32to512", "bs32", "bs512", "bs512_seed2"}   # bs32: Fig. 7a's dashed curve
    a = arms["bs32to512"]
    assert (a.lr, a.batch_size, a.steps, a.optim.momentum, a.model.width) == (0.05, 32, 11700, 0.9, 64)  # one pass
    assert (a.changes[0].at_step, a.changes[0].batch_size) == (1500, 512)
    assert arms["bs512_seed2"].seed != arms["bs512"].seed
    assert (arms["bs32"].batch_size, arms["bs32"].changes) == (32, [])


def test_the_cuda_backend_policy():
    """Issue 13: no cudnn.benchmark and no TF32 policy on CUDA; nothing changes on the CPU."""
    from engine.train.loop import cuda_flags
    assert cuda_flags("auto", "cpu") == {}
    assert cuda_flags("auto", "cuda") == {"cudnn_benchmark": True, "tf32": True}
    assert cuda_flags("bf16", "cuda") == {"cudnn_benchmark": True, "tf32": True}
    assert cuda_flags("fp32", "cuda") == {"cudnn_benchmark": True, "tf32": False}   # exact fp32 asked for

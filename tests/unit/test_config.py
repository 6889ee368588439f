import shlex
from dataclasses import dataclass
from typing import Literal

import pytest

from jobs._config import component, from_flat, opt, parse_config, replace_flat, to_dict

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Example:
    """An example job."""

    name: str = opt("x", "a name")
    size: int = opt(3, "a size")
    rate: float = opt(0.5)
    flag: bool = opt(False)
    kind: Literal["a", "b"] = opt("a")
    splits: tuple[str, ...] = opt(("train", "val"))
    rates: tuple[float, ...] = opt((0.1,))
    address: str | None = opt(None)


def test_defaults_and_flags():
    assert parse_config(Example, []) == Example()
    cfg = parse_config(
        Example, ["--size", "7", "--flag", "--kind", "b", "--splits", "train", "--address", "h:1"]
    )
    assert cfg == Example(size=7, flag=True, kind="b", splits=("train",), address="h:1")


def test_preset_is_overridden_by_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("size: 11\nrate: 0.1\nsplits: [val]\nflag: true\n")
    cfg = parse_config(Example, ["--config", str(preset), "--rate", "0.2", "--no-flag"])
    assert cfg == Example(size=11, rate=0.2, splits=("val",), flag=False)
    assert to_dict(cfg)["splits"] == ["val"]


def test_bad_values_exit_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Example, ["--kind", "c"])
    assert info.value.code == 2
    preset = tmp_path / "p.yaml"
    preset.write_text("sise: 3\n")
    with pytest.raises(SystemExit):
        parse_config(Example, ["--config", str(preset)])
    assert "unknown field 'sise'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_a_float_flag_refuses_what_is_not_a_finite_number(value, capsys):
    # NaN passes every range check (it compares false with any bound), so it is refused at parsing.
    with pytest.raises(SystemExit) as exited:
        parse_config(Example, [f"--rate={value}"])
    assert (
        exited.value.code == 2
        and f"argument --rate: '{value}' is not a finite number" in capsys.readouterr().err
    )


def test_preset_values_are_read_as_their_flags_would_be(tmp_path, capsys, monkeypatch):
    preset = tmp_path / "p.yaml"
    # YAML 1.1 reads 1e-4 as a string and 7 as one number; the fields take a float and a list.
    preset.write_text("rate: 1e-4\nsplits: test\nsize: '5'\nname: 12\n")
    assert parse_config(Example, ["--config", str(preset)]) == Example(
        rate=1e-4, splits=("test",), size=5, name="12"
    )
    for text, says in (
        ("size: 2.5", "size: 2.5 is not a whole number"),
        ("rate: fast", "rate: 'fast' is not a number"),
        ("rate: .nan", "rate: nan is not a finite number"),
        ("rate: -.inf", "rate: -inf is not a finite number"),
        ("flag: 1", "flag: 1 is not true or false"),
        ("kind: c", "kind: 'c' is not one of a, b"),
        ("rates: [1e-3, fast]", "rates: 'fast' is not a number"),
        ("rates: [.nan]", "rates: 'nan' is not a finite number"),
        ("rates: '1e-4,inf'", "rates: 'inf' is not a finite number"),
    ):
        preset.write_text(text + "\n")
        with pytest.raises(SystemExit) as exited:  # a usage error, naming the preset and the field
            parse_config(Example, ["--config", str(preset)])
        assert exited.value.code == 2 and f"preset '{preset}': {says}" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()  # a folder named like the preset is not the preset
    with pytest.raises(SystemExit) as exited:
        parse_config(Example, ["--config", "p"], job="train")
    assert exited.value.code == 2 and "config preset 'p' not found" in capsys.readouterr().err
    for extends, says in (("p", "must name a preset as <job>/<name>"), ("train/p.yaml", "extends itself")):
        preset.write_text(f"extends: {extends}\nsize: 4\n")
        with pytest.raises(SystemExit) as exited:
            parse_config(Example, ["--config", str(preset)])
        assert exited.value.code == 2 and says in capsys.readouterr().err


@dataclass(frozen=True)
class Inner:
    speed: float = opt(0.1, "a speed")
    uri: str = opt("", "where", flag="data")

    def __post_init__(self):
        if self.speed < 0:
            raise ValueError(f"--speed must not be negative, got {self.speed}")


@dataclass(frozen=True)
class Composed:
    """A job composed of components."""

    inner: Inner = component(Inner)
    other: Example = component(Example)


def test_components_become_flat_flags_and_presets(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: /somewhere\nsize: 9\n")
    cfg = parse_config(Composed, ["--config", str(preset), "--speed", "0.5", "--kind", "b"])
    assert cfg == Composed(Inner(speed=0.5, uri="/somewhere"), Example(size=9, kind="b"))
    assert to_dict(cfg) == {**to_dict(Example(size=9, kind="b")), "speed": 0.5, "data": "/somewhere"}
    flat = to_dict(cfg) | {"splits": ("train",), "rates": (0.1,)}  # to_dict gives lists, as YAML would
    assert from_flat(Composed, flat) == replace_flat(cfg, splits=("train",))
    with pytest.raises(TypeError, match="no flag"):
        replace_flat(cfg, uri="/x")  # the flag is --data


def test_a_components_error_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Composed, ["--speed", "-1"])
    assert info.value.code == 2 and "--speed must not be negative" in capsys.readouterr().err


def test_two_fields_with_one_flag_name_are_refused():
    @dataclass(frozen=True)
    class Clash:
        a: Inner = component(Inner)
        b: Inner = component(Inner)

    with pytest.raises(TypeError, match="speed"):
        parse_config(Clash, [])


@pytest.mark.parametrize("dataset", ["coco", "voc", "nuswide"])
def test_train_presets_parse_into_the_training_config(dataset):
    from jobs.train import TrainConfig

    config = parse_config(TrainConfig, ["--config", dataset, "--data", "/d", "--epochs", "3"], job="train")
    assert config.data.uri == "/d" and config.optim.epochs == 3 and config.scaling.use_gpu
    assert config.run.experiment == f"mltr-{dataset}"
    assert config.model.variant in ("mltr_s", "mltr_m") and config.optim.loss == "asl"


def test_training_flags_keep_their_names():
    """The flags users and presets know: each one sets the component field it always set."""
    from jobs.train import TrainConfig

    flags = shlex.split(
        "--data /d --model mltr_s --image-size 224 --window-size 7 --head query --loss focal --epochs 4 "
        "--batch-size 8 --lr 0.001 --weight-decay 0.01 --grad-clip 2 --accumulate 2 --ema-decay 0.99 "
        "--drop-path-rate 0.2 --no-randaugment --crop-min-scale 0.7 --cutout-p 0.25 --shuffle-buffer 64 "
        "--num-workers 3 --use-gpu --cpus-per-worker 2 --decode-actors 5 --workdir w --storage s3://b/r "
        "--name n --max-failures 1 --init-from swin.pth --mlflow-uri http://m --experiment e --seed 7 "
        "--address auto"
    )
    c = parse_config(TrainConfig, flags, job="train")
    assert (c.data.uri, c.data.shuffle_buffer, c.data.decode_actors) == ("/d", 64, 5)
    assert (c.model.variant, c.model.image_size, c.model.window_size, c.model.head) == (
        "mltr_s",
        224,
        7,
        "query",
    )
    assert (c.model.drop_path_rate, c.model.init_from) == (0.2, "swin.pth")
    assert (c.optim.loss, c.optim.epochs, c.optim.batch_size, c.optim.lr) == ("focal", 4, 8, 0.001)
    assert (c.optim.weight_decay, c.optim.grad_clip, c.optim.accumulate, c.optim.ema_decay) == (
        0.01,
        2,
        2,
        0.99,
    )
    assert c.optim.seed == 7
    assert (c.augment.randaugment, c.augment.crop_min_scale, c.augment.cutout_p) == (False, 0.7, 0.25)
    assert (c.scaling.num_workers, c.scaling.use_gpu, c.scaling.cpus_per_worker) == (3, True, 2)
    assert (c.run.workdir, c.run.storage, c.run.name, c.run.max_failures) == ("w", "s3://b/r", "n", 1)
    assert (c.run.mlflow_uri, c.run.experiment, c.run.address) == ("http://m", "e", "auto")


def test_a_preset_that_is_not_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("rate: [1, 2\nsize: 3\n")
    with pytest.raises(SystemExit) as exited:
        parse_config(Example, ["--config", str(preset)])
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exited.value.code == 2
    assert error.endswith(f"{preset}: not a readable YAML preset: expected ',' or ']', but got ':' at line 2")

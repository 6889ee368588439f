from dataclasses import dataclass
from typing import Literal

import pytest

from jobs._config import opt, parse_config, to_dict

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


@pytest.mark.parametrize("dataset", ["coco", "voc", "nuswide"])
def test_train_presets_parse_into_the_training_config(dataset):
    from mltr.train import TrainConfig

    config = parse_config(TrainConfig, ["--config", dataset, "--data", "/d", "--epochs", "3"], job="train")
    assert config.data == "/d" and config.epochs == 3 and config.use_gpu
    assert config.experiment == f"mltr-{dataset}"

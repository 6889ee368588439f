"""Checkpoints: Microsoft and timm Swin layouts into MlTr, window resampling, MlTr's own format."""

from __future__ import annotations

import dataclasses
import random
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mltr import create_model, load_checkpoint, load_model, load_pretrained, save_checkpoint
from mltr.checkpoint import Selection, TrainState
from mltr.model import resize_relative_position_table

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def timm_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def timm_features(timm_swin, images):
    with torch.no_grad():
        return timm_swin.forward_features(images)  # B, 7, 7, 768 (timm's Swin is NHWC)


# Microsoft's swin_tiny_patch4_window7_224.pth ({"model": ...}), as released with the Swin paper: key
# names and shapes, pinned here (not derived from the loader's mapping). Its patch merging sits at
# the END of stage i (layers.i.downsample, i = 0..2; timm and MlTr put it at the start of stage
# i+1), its classifier is head.*, and it saves the buffers relative_position_index (every block)
# and attn_mask (the shifted blocks of stages 0-2, one mask per window: 64, 16, 4 windows of 7x7).
SWIN_T_STAGES = (
    (96, 3, 2, 64),
    (192, 6, 2, 16),
    (384, 12, 6, 4),
    (768, 24, 2, None),
)  # dim, heads, depth, nW


def microsoft_swin_t_keys() -> dict[str, tuple[int, ...]]:
    keys = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.proj.bias": (96,),
        "patch_embed.norm.weight": (96,),
        "patch_embed.norm.bias": (96,),
    }
    for i, (dim, heads, depth, windows) in enumerate(SWIN_T_STAGES):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            keys.update({
                f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,),
                f"{b}.attn.relative_position_bias_table": (169, heads), f"{b}.attn.relative_position_index": (49, 49),
                f"{b}.attn.qkv.weight": (3 * dim, dim), f"{b}.attn.qkv.bias": (3 * dim,),
                f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,),
                f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,),
                f"{b}.mlp.fc1.weight": (4 * dim, dim), f"{b}.mlp.fc1.bias": (4 * dim,),
                f"{b}.mlp.fc2.weight": (dim, 4 * dim), f"{b}.mlp.fc2.bias": (dim,),
            })  # fmt: skip
            if j % 2 == 1 and windows is not None:
                keys[f"{b}.attn_mask"] = (windows, 49, 49)
        if i < 3:
            keys.update({
                f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                f"layers.{i}.downsample.norm.weight": (4 * dim,), f"layers.{i}.downsample.norm.bias": (4 * dim,),
            })  # fmt: skip
    keys.update(
        {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,)}
    )
    return keys


MICROSOFT_SWIN_T = microsoft_swin_t_keys()


def microsoft_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Swin-T weights under Microsoft's keys (buffers as zeros), exactly the pinned layout."""
    out = {}
    for key, shape in MICROSOFT_SWIN_T.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            out[key] = torch.zeros(shape)
            continue
        source = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key)
        out[key] = timm_state[source.replace("head.", "head.fc.")]
    return out


def test_the_real_microsoft_layout_maps_onto_mltr_s():
    assert len(MICROSOFT_SWIN_T) == 4 + 12 * 14 + 5 + 3 * 3 + 4  # 190 keys in the released file
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in MICROSOFT_SWIN_T.items()}
    model = create_model("mltr_s", num_classes=1000)
    missing, unexpected = load_pretrained(model, {"model": state})
    assert unexpected == [] and missing and all(".attn.cross." in k for k in missing)
    loaded = model.state_dict()
    for i in range(3):  # the end of Microsoft's stage i is the start of MlTr's stage i + 1
        for part in ("reduction.weight", "norm.weight", "norm.bias"):
            assert torch.equal(
                loaded[f"layers.{i + 1}.downsample.{part}"], state[f"layers.{i}.downsample.{part}"]
            )
    assert torch.equal(loaded["head.fc.weight"], state["head.weight"])
    assert torch.equal(
        loaded["layers.2.blocks.5.attn.qkv.weight"], state["layers.2.blocks.5.attn.qkv.weight"]
    )


def cross_or_head(key: str) -> bool:
    return ".attn.cross." in key or key.startswith("head.")


def test_timm_layout_loads_and_computes_swin(timm_swin, images, timm_features):
    model = create_model("mltr_s", num_classes=80, head="pool").eval()
    missing, unexpected = load_pretrained(model, timm_swin.state_dict())
    assert unexpected == []
    assert missing and all(cross_or_head(k) for k in missing)
    assert {"head.fc.weight", "head.fc.bias"} <= set(missing)  # ImageNet's 1000-class head does not fit 80
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), timm_features, atol=1e-4, rtol=1e-4)


def test_microsoft_layout_loads_and_computes_swin(timm_swin, images, timm_features, tmp_path):
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": microsoft_layout(timm_swin.state_dict())}, path)
    model = create_model("mltr_s", num_classes=1000).eval()
    missing, unexpected = load_pretrained(model, path)
    assert unexpected == []
    assert missing and all(".attn.cross." in k for k in missing)  # 1000 classes: the head loads too
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), timm_features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(images), timm_swin(images), atol=1e-4, rtol=1e-4)


def test_patch_merging_channel_order_is_microsofts():
    torch.manual_seed(0)
    merge = create_model("mltr_tiny").layers[1].downsample
    x = torch.randn(2, 8, 6, 32)
    # The official implementation: concatenate the four strided sub-grids in this order.
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    expected = merge.reduction(merge.norm(torch.cat([x0, x1, x2, x3], -1)))
    torch.testing.assert_close(merge(x), expected)


def test_window_change_resamples_relative_position_tables(timm_swin):
    model = create_model("mltr_s", image_size=384, window_size=12)  # stage grids 96, 48, 24, 12
    missing, unexpected = load_pretrained(model, timm_swin.state_dict())
    assert unexpected == [] and all(cross_or_head(k) for k in missing)
    source = timm_swin.state_dict()["layers.2.blocks.3.attn.relative_position_bias_table"]  # 13*13, 12
    loaded = model.state_dict()["layers.2.blocks.3.attn.relative_position_bias_table"]
    assert source.shape == (13 * 13, 12) and loaded.shape == (23 * 23, 12)
    reference = F.interpolate(
        source.T.reshape(1, 12, 13, 13), size=(23, 23), mode="bicubic", align_corners=False
    ).reshape(12, 23 * 23)
    torch.testing.assert_close(loaded, reference.T)


def test_relative_table_resampling_keeps_heads_and_orientation():
    heads = torch.arange(3.0)
    constant = heads.expand(13 * 13, 3)  # every offset of head h has bias h
    torch.testing.assert_close(resize_relative_position_table(constant, 12), heads.expand(23 * 23, 3))
    # A bias that varies with the row offset only must still vary with the row offset only.
    rows = torch.arange(13.0).repeat_interleave(13).unsqueeze(1).repeat(1, 2)  # 169, 2
    grid = resize_relative_position_table(rows, 5).T.reshape(2, 9, 9)
    torch.testing.assert_close(grid, grid[:, :, :1].expand(-1, -1, 9))
    assert (grid[:, 1:, 0] > grid[:, :-1, 0]).all()


def test_shape_mismatch_outside_the_head_is_an_error(timm_swin):
    model = create_model("mltr_tiny")
    with pytest.raises(ValueError, match="disagree on shapes"):
        load_pretrained(model, timm_swin.state_dict())


def test_own_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = create_model("mltr_tiny", num_classes=7, head="query", window_size=2).eval()
    for module in model.modules():
        if hasattr(module, "gate"):
            torch.nn.init.normal_(module.gate)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(model, path, extra={"epoch": 3, "thresholds": torch.full((7,), 0.4)})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    restored = load_model(f"file://{path}")
    assert restored.config == model.config
    original, copy = model.state_dict(), restored.state_dict()
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(images), model(images))
    extra = load_checkpoint(path)["extra"]
    assert extra["epoch"] == 3 and torch.equal(extra["thresholds"], torch.full((7,), 0.4))
    # The same file also starts a fresh model through load_pretrained, head included.
    fresh = create_model("mltr_tiny", num_classes=7, head="query", window_size=2)
    assert load_pretrained(fresh, path) == ([], [])


def test_safetensors_source(timm_swin, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_swin.state_dict().items()}, path)
    missing, unexpected = load_pretrained(create_model("mltr_s"), path)
    assert unexpected == [] and all(cross_or_head(k) for k in missing)


def test_not_an_mltr_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an MlTr checkpoint"):
        load_model(path)
    with pytest.raises(ValueError, match="only local paths"):
        load_model("s3://bucket/model.pt")


def test_the_input_contract_is_saved_with_the_model(tmp_path):
    model = create_model("mltr_tiny", num_classes=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    save_checkpoint(model, tmp_path / "model.pt")
    restored = load_model(tmp_path / "model.pt").config
    assert restored.input_contract() == model.config.input_contract()
    assert restored.input_contract()["mean"] == [0.5, 0.4, 0.3] and restored.resize == "squash"
    assert restored.stem == model.config.stem


def test_a_checkpoint_saved_before_the_input_contract_and_stem_still_loads(tmp_path):
    """Version-1 files hold a config dict without ``stem``, ``resize``, ``mean`` and ``std``."""
    model = create_model("mltr_s", num_classes=4, image_size=64, window_size=2)
    config = dataclasses.asdict(model.config)
    for name in ("stem", "resize", "mean", "std"):
        del config[name]
    torch.save(
        {"format": "mltr", "version": 1, "config": config, "state_dict": model.state_dict(), "extra": {}},
        tmp_path / "old.pt",
    )
    restored = load_model(tmp_path / "old.pt")
    assert restored.config == model.config  # the defaults: patch stem, ImageNet statistics, squash
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(images), model.eval()(images))


def test_training_state_round_trips_and_loads_with_weights_only(tmp_path):
    from mltr.train import make_ema, make_scheduler, optimizer_step, param_groups, rng_state, set_rng_state

    torch.manual_seed(0)
    model = create_model("mltr_tiny", num_classes=3)
    ema = make_ema(model, 0.9)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    scheduler = make_scheduler(optimizer, 1e-3, 10)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer_step(model, optimizer, scheduler, ema, 1.0)
    selection = Selection(
        weights="ema",
        calib_mAP=0.7,
        thresholds=[0.3, 0.5, 0.6],
        val={"mAP": 0.65, "CF1": 0.5},
        calib_per_class_ap=[0.6, 0.7, 0.8],
        val_per_class_ap=[0.5, float("nan"), 0.8],
        val_pr_curve=([0.0, 1.0], [1.0, 0.5]),
    )
    state = TrainState(
        epoch=4,
        selection=selection,
        best_epoch=3,
        best_calib_mAP=0.72,
        history=[{"epoch": e, "metrics": {"train_loss": 1.0 / (e + 1)}} for e in range(5)],
        rng=[rng_state()],
        ema=ema.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    )
    state.save(tmp_path / "train_state.pt")
    # weights_only: plain containers and tensors only, so a state from a shared bucket cannot run code.
    torch.load(tmp_path / "train_state.pt", weights_only=True)
    loaded = TrainState.load(tmp_path / "train_state.pt")
    assert (loaded.epoch, loaded.best_epoch, loaded.best_calib_mAP, loaded.history) == (
        4,
        3,
        0.72,
        state.history,
    )
    assert loaded.selection.weights == "ema" and loaded.selection.val_mAP == 0.65
    assert loaded.selection.thresholds == [0.3, 0.5, 0.6] and loaded.selection.val_pr_curve == (
        [0.0, 1.0],
        [1.0, 0.5],
    )
    # The optimiser, schedule and EMA continue from the state.
    fresh_optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    make_scheduler(fresh_optimizer, 1e-3, 10).load_state_dict(loaded.scheduler)
    make_ema(model, 0.9).load_state_dict(loaded.ema)
    # The random generators are restored: the same draws follow.
    set_rng_state(loaded.rng[0])
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(loaded.rng[0])
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_a_file_that_is_not_a_training_state_is_refused(tmp_path):
    save_checkpoint(create_model("mltr_tiny"), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an MlTr training state"):
        TrainState.load(tmp_path / "model.pt")

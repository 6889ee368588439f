"""MlTr model: window ops, shifted-window mask, variants, cross-window attention, configuration rules."""

from __future__ import annotations

import itertools

import pytest
import torch

from mltr import MlTrConfig, create_model, list_models
from mltr.model import (
    MASK_VALUE,
    DropPath,
    MlTrBlock,
    fitting_image_sizes,
    fitting_window_sizes,
    shifted_window_mask,
    stage_window,
    window_means,
    window_partition,
    window_reverse,
)

pytestmark = pytest.mark.unit

# Paper parameter counts (millions) for an 80-class pool head.
PAPER_PARAMS_M = {"mltr_s": 33.0, "mltr_m": 62.0, "mltr_l": 108.0}

# Small enough to run forward+backward of every variant on a 2-core CPU in a few seconds.
GRAD_OVERRIDES = {
    "mltr_tiny": {},
    "mltr_s": {"image_size": 128, "window_size": 4},  # 224 px / window 7 runs forward in test_checkpoint
    "mltr_m": {"image_size": 64, "window_size": 2},
    "mltr_l": {"image_size": 64, "window_size": 2},
    "mltr_xl": {"image_size": 64, "window_size": 2},
}


def test_window_partition_reverse_round_trip():
    x = torch.randn(2, 12, 8, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 2, 4, 4, 5)
    # Window (b=1, row 2, col 1) is the block x[1, 8:12, 4:8].
    torch.testing.assert_close(windows[1 * 6 + 2 * 2 + 1], x[1, 8:12, 4:8])
    assert torch.equal(window_reverse(windows, 4, 12, 8), x)


def test_window_means_are_the_mean_of_each_window():
    x = torch.randn(2, 8, 8, 3)
    means = window_means(x, 4)
    assert means.shape == (2, 4, 3)
    torch.testing.assert_close(means[1, 2], x[1, 4:8, 0:4].mean(dim=(0, 1)))


@pytest.mark.parametrize("size,window,shift", [(8, 4, 2), (12, 4, 2), (9, 3, 1)])
def test_shifted_window_mask_matches_brute_force(size, window, shift):
    mask = shifted_window_mask(size, size, window, shift)
    # Brute force: after rolling by -shift, the token at (i, j) came from ((i+s) % H, (j+s) % W). Two
    # tokens of a window may attend to each other iff no wrap-around separates them: their offset in the
    # original map equals their offset in the rolled map.
    windows_per_side = size // window
    expected = torch.zeros(windows_per_side**2, window * window, window * window, dtype=torch.bool)
    for w, (wi, wj) in enumerate(itertools.product(range(windows_per_side), repeat=2)):
        cells = [(wi * window + a, wj * window + b) for a in range(window) for b in range(window)]
        for p, (pi, pj) in enumerate(cells):
            for q, (qi, qj) in enumerate(cells):
                orig_di = (pi + shift) % size - (qi + shift) % size
                orig_dj = (pj + shift) % size - (qj + shift) % size
                expected[w, p, q] = orig_di == pi - qi and orig_dj == pj - qj
    assert torch.equal(mask == 0, expected)
    assert set(mask.unique().tolist()) <= {0.0, MASK_VALUE}


def test_list_models_has_the_variants():
    assert list_models() == ["mltr_tiny", "mltr_s", "mltr_m", "mltr_l", "mltr_xl"]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_near_the_paper(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=80, head="pool")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.08, count


@pytest.mark.parametrize("name,head", [(name, "pool") for name in GRAD_OVERRIDES] + [("mltr_tiny", "query")])
def test_variant_forward_backward(name, head):
    torch.manual_seed(0)
    # No stochastic depth: with one image it drops whole blocks, whose parameters then get no gradient.
    model = create_model(name, num_classes=5, head=head, drop_path_rate=0.0, **GRAD_OVERRIDES[name])
    for module in model.modules():
        if hasattr(module, "gate"):
            torch.nn.init.constant_(module.gate, 0.1)  # at zero the cross-window weights get no gradient yet
    size = model.config.image_size
    images = torch.randn(1, 3, size, size)
    logits = model(images)
    assert logits.shape == (1, 5)
    assert torch.isfinite(logits).all()
    tokens = model.forward_features(images)
    assert tokens.shape == (1, size // 32, size // 32, model.num_features)
    logits.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


@pytest.mark.parametrize("head", ["pool", "query"])
def test_the_head_runs_in_float32_under_bf16_autocast(head):
    torch.manual_seed(0)
    model = create_model("mltr_tiny", num_classes=80, head=head).eval()
    size = model.config.image_size
    images = torch.randn(8, 3, size, size)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_features(images)
            logits = model(images)
        reference = model.forward_head(features.float())  # no autocast at all
    assert features.dtype == torch.bfloat16  # the backbone did run in bf16
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert logits.unique().numel() == logits.numel()  # no scores tied by rounding


def test_gate_at_zero_computes_the_ablation_exactly():
    torch.manual_seed(0)
    ablation = create_model("mltr_tiny", cross_window=False).eval()
    model = create_model("mltr_tiny").eval()
    result = model.load_state_dict(ablation.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".attn.cross." in k for k in result.missing_keys)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), ablation.forward_features(images))
        for module in model.modules():
            if hasattr(module, "gate"):
                torch.nn.init.constant_(module.gate, 0.5)
        assert not torch.allclose(
            model.forward_features(images), ablation.forward_features(images), atol=1e-3
        )


def test_training_moves_the_gate():
    torch.manual_seed(0)
    model = create_model("mltr_tiny")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    gates = [m.gate for m in model.modules() if hasattr(m, "gate")]
    assert gates and all(g.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize(
    "cross_window,gate,expect_far", [(True, 0.5, True), (True, 0.0, False), (False, None, False)]
)
def test_cross_window_attention_reaches_other_windows(cross_window, gate, expect_far):
    # One plain (non-shifted) block on an 8x8 map with 4x4 windows: in-window attention and the MLP never mix
    # windows, so the first token's output depends on a pixel of the opposite window only through the
    # cross-window attention.
    torch.manual_seed(0)
    block = MlTrBlock(
        dim=16, resolution=8, num_heads=2, window_size=4, shifted=False, cross_window=cross_window
    )
    if gate is not None:
        torch.nn.init.constant_(block.attn.cross.gate, gate)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    block(x)[0, 0, 0].sum().backward()
    assert x.grad[0, 1, 1].abs().sum() > 0  # same window
    far = x.grad[0, 7, 7].abs().sum()
    assert (far > 0) if expect_far else (far == 0)


def test_no_weight_decay_names():
    model = create_model("mltr_tiny", head="query")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert all(n in names for n in params if n.endswith("relative_position_bias_table"))
    assert all(n in names for n in params if n.endswith(("norm.weight", "norm1.weight", "norm2.weight")))
    assert all(n in names for n in params if n.endswith((".bias", ".gate")))
    assert "head.queries" in names
    assert all(params[n].ndim == 1 or n.endswith(("table", "queries")) for n in names)
    assert "layers.0.blocks.0.attn.qkv.weight" not in names


def test_window_that_does_not_fit_lists_what_fits():
    with pytest.raises(ValueError) as error:
        create_model("mltr_s", window_size=8)
    message = str(error.value)
    assert "1, 7, 14, 28, 56" in message  # windows that fit 224 px (stage grids 56, 28, 14, 7)
    assert "256" in message and "128" in message  # image sizes that fit window 8
    with pytest.raises(ValueError, match="multiple of .* 32"):
        create_model("mltr_s", image_size=230)


def test_window_rule_helpers():
    assert fitting_window_sizes(224, 4, 4) == [1, 7, 14, 28, 56]
    assert fitting_window_sizes(384, 4, 4) == [1, 2, 3, 4, 6, 12, 24, 48, 96]
    assert 384 in fitting_image_sizes(12, 4, 4, near=400)
    assert stage_window(7, 12) == (7, 0)  # clamped: one window, no shift
    assert stage_window(14, 7) == (7, 3)


def test_window_larger_than_a_stage_is_clamped_and_not_shifted():
    model = create_model("mltr_tiny", image_size=128, window_size=8)  # grids 32, 16, 8, 4
    blocks = [stage.blocks[1] for stage in model.layers]
    assert [(b.window_size, b.shift_size) for b in blocks] == [(8, 4), (8, 4), (8, 0), (4, 0)]
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 80)


def test_create_model_overrides_and_errors():
    model = create_model("mltr_tiny", num_classes=3, window_size=2, head="query")
    assert model.config == MlTrConfig(**{**model.config.__dict__})
    assert (model.config.num_classes, model.config.window_size, model.config.head) == (3, 2, "query")
    with pytest.raises(TypeError, match="unknown MlTrConfig field"):
        create_model("mltr_tiny", windowsize=4)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("swin_t")
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(1, 3, 32, 32))


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # kept samples are scaled by 1/keep
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_the_conv_stem_gives_the_patch_grid_and_its_batchnorm_takes_no_decay():
    model = create_model("mltr_tiny", num_classes=3)
    assert model.config.stem == "conv" and model.config.stem_widths == (32, 64)
    tokens = model.patch_embed(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 16, 16, 32)  # B, H/4, W/4, C: the grid a 4x4 patchify conv gives
    batchnorm = {
        n
        for n, _ in model.named_parameters()
        if n.startswith("patch_embed.convs.") and n.endswith(("1.weight", "1.bias"))
    }
    assert batchnorm and batchnorm <= model.no_weight_decay()
    default = create_model("mltr_tiny", stem_widths=())  # doubling up to the embedding width
    assert [m.out_channels for m in default.patch_embed.convs if isinstance(m, torch.nn.Conv2d)] == [16, 32]


def test_swin_layout_variants_keep_the_patch_stem():
    for name in ("mltr_s", "mltr_m", "mltr_l", "mltr_xl"):
        config = create_model(name, image_size=64, window_size=2).config
        assert config.stem == "patch" and config.stem_widths == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stem": "conv", "patch_size": 3, "image_size": 48, "window_size": 2}, "power-of-two patch_size"),
        ({"stem": "conv", "stem_widths": (8, 16, 32)}, "one positive width per stride-2 conv: 2"),
        ({"stem": "patch", "stem_widths": (8, 16)}, "needs the conv stem"),
        ({"mean": (0.5, 0.5)}, "one value per input channel"),
        ({"resize": "crop"}, "unknown resize rule"),
        ({"num_heads": (3, 0, 12, 24)}, r"num_heads must be a positive integer .*\(3, 0, 12, 24\)"),
        ({"head": "query", "query_heads": 0}, "query_heads must be a positive integer"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"window_size": 7.0}, "window_size must be a positive integer"),
        ({"num_classes": -1}, "num_classes must be a positive integer"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\), got 1.0"),
        ({"drop_rate": -0.1}, r"drop_rate must be in \[0, 1\)"),
    ],
)
def test_stem_and_input_contract_errors_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        MlTrConfig(**overrides)


def test_images_that_are_not_the_contracts_are_refused_saying_so():
    model = create_model("mltr_tiny", num_classes=3).eval()
    size = model.config.image_size
    with pytest.raises(ValueError, match="apply mltr.model.normalize first"):
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match=rf"expected images of shape \(B, 3, {size}, {size}\), got \(1, 1, "):
        model(torch.zeros(1, 1, size, size))

"""`lora_fx.add_weighted_adapter` against PEFT's `LoraModel.add_weighted_adapter` on the same saved adapters."""

from __future__ import annotations

import copy
import doctest
import warnings

import pytest
import torch
from conftest import conv_net, tiny_gpt2, token_input
from torch import nn

import lora_fx
from lora_fx import weighted
from lora_fx.errors import AdapterFileError, ConfigError, UnsupportedFeatureError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Mixed(nn.Module):
    """An embedding, a 3x3 conv, a 1x1 conv and a linear (names sort in module order, so that layers are
    visited in the same order as PEFT visits them: DARE's random draws then line up)."""

    def __init__(self):
        super().__init__()
        self.a_emb = nn.Embedding(20, 10)
        self.b_conv = nn.Conv2d(3, 6, 3, padding=1)
        self.c_conv = nn.Conv2d(6, 5, 1)
        self.d_fc = nn.Linear(15, 4)

    def forward(self, ids, img):
        h = self.c_conv(torch.relu(self.b_conv(img))).mean((2, 3))
        return self.d_fc(torch.cat([self.a_emb(ids), h], dim=-1))


def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def mixed():
    torch.manual_seed(0)
    return Mixed().eval()


def mlp_input():
    return (torch.randn(3, 16, generator=torch.Generator().manual_seed(1)),)


def mixed_input():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (3,), generator=g), torch.randn(3, 3, 5, 5, generator=g)


def gpt2_input():
    return (token_input(),)


def save_random_adapter(base, path, seed, **cfg):
    """A PEFT adapter over `base` with random nonzero factors, saved to `path`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**{"init_lora_weights": False, **cfg}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return path


def peft_combined(base, dirs, weights, dare_seed=None, **kwargs):
    """(PEFT model with the combined adapter "new" active, its state dict, its config). With `dare_seed`, torch's
    global generator is seeded right before PEFT's combining loop (after it initialised the new adapter)."""
    import peft.tuners.lora.model as peft_lora_model
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    freeze = peft_lora_model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(dare_seed)

    peft_lora_model._freeze_adapter = freeze_then_seed if dare_seed is not None else freeze
    try:
        model.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, adapter_name="new", **kwargs)
    finally:
        peft_lora_model._freeze_adapter = freeze
    model.set_adapter("new")
    model.eval()
    return model, get_peft_model_state_dict(model, adapter_name="new"), model.peft_config["new"]


def ours(dirs, weights, dare_seed=None, **kwargs):
    gen = torch.Generator().manual_seed(dare_seed) if dare_seed is not None else None
    return lora_fx.add_weighted_adapter([str(d) for d in dirs], weights, generator=gen, **kwargs)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_same_as_peft(base, dirs, weights, exact=True, dare_seed=None, **kwargs):
    """lora_fx's combined adapter equals PEFT's: keys, tensors, r / lora_alpha / target_modules. Returns the
    largest abs difference of a factor and (for svd types) of a layer's B @ A."""
    _, ref, ref_cfg = peft_combined(base, dirs, weights, dare_seed=dare_seed, **kwargs)
    cfg, tensors = ours(dirs, weights, dare_seed=dare_seed, **kwargs)
    assert set(tensors) == set(ref), sorted(set(tensors) ^ set(ref))
    assert (cfg.r, cfg.lora_alpha) == (ref_cfg.r, ref_cfg.lora_alpha)
    tm = ref_cfg.target_modules
    assert (cfg.target_modules == tm) if isinstance(tm, str) else (set(cfg.target_modules) == set(tm))
    assert not cfg.rank_pattern and not cfg.alpha_pattern
    worst = 0.0
    for key, value in ref.items():
        assert tensors[key].shape == value.shape, key
        assert tensors[key].dtype == value.dtype, key
        if exact:
            assert torch.equal(tensors[key], value), f"{key}: max abs diff {max_diff(tensors[key], value):.3e}"
        else:
            torch.testing.assert_close(tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)  # same LAPACK: equal
        worst = max(worst, max_diff(tensors[key], value))
    return cfg, tensors, worst


# -- equal to PEFT --------------------------------------------------------------------------------
SAME_RANK = [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=4, use_rslora=False), dict(r=4, lora_alpha=16)]
DARE = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


@pytest.fixture(scope="module")
def mlp_same_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_rank")
    base = mlp()
    return base, [save_random_adapter(base, root / f"a{i}", 10 + i, target_modules=["fc1", "fc2"], **c)
                  for i, c in enumerate(SAME_RANK)]


@pytest.mark.parametrize("combination_type", weighted.COMBINATION_TYPES)
def test_equal_ranks_every_type_matches_peft(mlp_same_rank, combination_type):
    base, dirs = mlp_same_rank
    kwargs = dict(combination_type=combination_type)
    if combination_type not in ("linear", "cat", "svd"):
        kwargs["density"] = 0.6
    seed = 5 if combination_type in DARE else None
    exact = not combination_type.endswith("svd")
    check_same_as_peft(base, dirs, [0.7, -0.3, 0.5], exact=exact, dare_seed=seed, **kwargs)


@pytest.mark.parametrize("combination_type", ["ties", "dare_ties", "ties_svd"])
def test_frequency_sign_election_matches_peft(mlp_same_rank, combination_type):
    base, dirs = mlp_same_rank
    check_same_as_peft(base, dirs, [0.4, 0.9, -0.2], exact=combination_type == "ties",
                       dare_seed=3 if "dare" in combination_type else None, combination_type=combination_type,
                       density=0.5, majority_sign_method="frequency")


@pytest.fixture(scope="module")
def mlp_mixed_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_ranks")
    base = mlp()
    specs = [dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]),
             dict(r=5, lora_alpha=5, target_modules=["fc2"]),  # fc1 is in the others only
             dict(r=3, lora_alpha=12, target_modules=["fc1", "fc2"], rank_pattern={"fc1": 1}, alpha_pattern={"fc2": 2})]
    return base, [save_random_adapter(base, root / f"m{i}", 20 + i, **s) for i, s in enumerate(specs)]


@pytest.mark.parametrize("kwargs", [dict(combination_type="cat"),
                                    dict(combination_type="svd"),
                                    dict(combination_type="svd", svd_rank=3, svd_clamp=0.9),
                                    dict(combination_type="svd", svd_full_matrices=False),
                                    dict(combination_type="ties_svd", density=0.7),
                                    dict(combination_type="magnitude_prune_svd", density=0.4)],
                         ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_different_ranks_and_partial_layers_match_peft(mlp_mixed_ranks, kwargs):
    base, dirs = mlp_mixed_ranks
    check_same_as_peft(base, dirs, [1.0, 0.5, -0.8], exact=kwargs["combination_type"] == "cat", **kwargs)


def test_cat_is_the_exact_weighted_sum(mlp_mixed_ranks):
    base, dirs = mlp_mixed_ranks
    w = [1.0, 0.5, -0.8]
    cfg, tensors = ours(dirs, w, combination_type="cat")
    adapters = [lora_fx.io.read_adapter_dir(d) for d in dirs]
    a_fc2 = "base_model.model.fc2.lora_A.weight"
    want = sum(wi * c.scaling_for(c.rank_pattern.get("fc2", c.r), c.alpha_pattern.get("fc2", c.lora_alpha))
               * t[a_fc2.replace("lora_A", "lora_B")] @ t[a_fc2] for wi, (c, t) in zip(w, adapters, strict=True))
    got = cfg.scaling_for(cfg.r, cfg.lora_alpha) * tensors[a_fc2.replace("lora_A", "lora_B")] @ tensors[a_fc2]
    torch.testing.assert_close(got, want)
    assert cfg.r == 2 + 5 + 3 and cfg.lora_alpha == cfg.r


@pytest.fixture(scope="module")
def mixed_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_layers")
    base = mixed()
    targets = ["a_emb", "b_conv", "c_conv", "d_fc"]
    return base, [save_random_adapter(base, root / "x0", 30, r=3, lora_alpha=6, target_modules=targets),
                  save_random_adapter(base, root / "x1", 31, r=3, lora_alpha=3, target_modules=targets)]


@pytest.mark.parametrize("kwargs", [dict(combination_type="linear"), dict(combination_type="cat"),
                                    dict(combination_type="svd"), dict(combination_type="svd", svd_rank=2),
                                    dict(combination_type="ties", density=0.5),
                                    dict(combination_type="dare_linear", density=0.7),
                                    dict(combination_type="dare_ties_svd", density=0.7),
                                    dict(combination_type="magnitude_prune", density=0.3)],
                         ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_embedding_and_conv_layers_match_peft(mixed_dirs, kwargs):
    base, dirs = mixed_dirs
    ct = kwargs["combination_type"]
    _, tensors, _ = check_same_as_peft(base, dirs, [0.6, 0.8], exact=not ct.endswith("svd"),
                                       dare_seed=7 if "dare" in ct else None, **kwargs)
    assert "base_model.model.a_emb.lora_embedding_A" in tensors
    assert tensors["base_model.model.b_conv.lora_A.weight"].dim() == 4


def test_gpt2_conv1d_matches_peft(tmp_path):
    base = tiny_gpt2()
    dirs = [save_random_adapter(base, tmp_path / f"g{i}", 40 + i, r=r, lora_alpha=2 * r,
                                target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
            for i, r in enumerate((2, 4))]
    for ct in ("cat", "svd"):
        check_same_as_peft(base, dirs, [0.5, 0.5], exact=ct == "cat", combination_type=ct)


def _product(tensors, layer):
    """`B @ A` of a conv layer's combined factors, as (out, in * kernel)."""
    A = tensors[f"base_model.model.{layer}.lora_A.weight"]
    B = tensors[f"base_model.model.{layer}.lora_B.weight"]
    return B.flatten(1) @ A.flatten(1)


def test_conv1d_conv3d_and_grouped_conv(tmp_path):
    base = conv_net()
    dirs = [save_random_adapter(base, tmp_path / f"c{i}", 80 + i, r=4, lora_alpha=a, target_modules=["c1", "c2", "c3"])
            for i, a in enumerate((8, 4))]
    check_same_as_peft(base, dirs, [0.5, 1.5], combination_type="linear")  # factorwise: grouped conv too
    for ct in ("cat", "svd"):  # PEFT's cat mixes the groups of c2's grouped lora_B: a wrong adapter
        with pytest.raises(UnsupportedFeatureError, match=rf"layer 'c2' is a grouped conv \(groups=2\); "
                                                          rf"combination_type='{ct}'"):
            ours(dirs, [0.5, 1.5], combination_type=ct)
    # PEFT's svd fails on Conv1d / Conv3d (it only flattens Conv2d deltas); lora_fx factors the flattened delta.
    dirs = [save_random_adapter(base, tmp_path / f"d{i}", 82 + i, r=4, lora_alpha=a, target_modules=["c1", "c3"])
            for i, a in enumerate((8, 4))]
    _, exact = ours(dirs, [0.5, 1.5], combination_type="cat")
    cfg, svd = ours(dirs, [0.5, 1.5], combination_type="svd", svd_rank=8)
    for layer in ("c1", "c3"):
        key = f"base_model.model.{layer}.lora_A.weight"
        assert svd[key].shape == exact[key].shape
        torch.testing.assert_close(_product(svd, layer), _product(exact, layer), rtol=1e-4, atol=1e-5)


def test_regex_targets_are_joined_and_rslora_kept(tmp_path):
    base = mlp()
    dirs = [save_random_adapter(base, tmp_path / "r0", 50, r=2, lora_alpha=3, target_modules=r"fc1", use_rslora=True),
            save_random_adapter(base, tmp_path / "r1", 51, r=4, lora_alpha=2, target_modules=r"fc\d")]
    cfg, _, _ = check_same_as_peft(base, dirs, [1.0, 1.0], exact=False, combination_type="svd")
    assert cfg.target_modules == r"(fc1)|(fc\d)" and cfg.use_rslora


def test_single_adapter_is_combined_linearly(mlp_same_rank):
    base, dirs = mlp_same_rank
    cfg, tensors, _ = check_same_as_peft(base, dirs[:1], [0.5], combination_type="cat")
    assert cfg.r == 4


# -- the output directory ------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_output_dir_loads_in_peft_and_lora_fx(mixed_dirs, tmp_path, combination_type):
    from peft import PeftModel

    base, dirs = mixed_dirs
    x = mixed_input()
    ref_model, _, _ = peft_combined(base, dirs, [0.6, 0.8], combination_type=combination_type)
    out = tmp_path / "combined"
    (out / "README.md").parent.mkdir()
    (out / "README.md").write_text("kept")
    ours(dirs, [0.6, 0.8], combination_type=combination_type, output_dir=out)
    assert (out / "README.md").read_text() == "kept"
    with torch.no_grad():
        want = ref_model(*x)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        torch.testing.assert_close(loaded(*x), want, rtol=1e-5, atol=1e-6)
        program = lora_fx.transform(torch.export.export(copy.deepcopy(base), x), out)
        torch.testing.assert_close(program.module()(*x), want, rtol=1e-5, atol=1e-6)


def test_pairs_are_accepted_and_not_modified(mlp_same_rank):
    _, dirs = mlp_same_rank
    pairs = [lora_fx.io.read_adapter_dir(d) for d in dirs[:2]]
    before = [(copy.deepcopy(c), {k: t.clone() for k, t in s.items()}) for c, s in pairs]
    cfg, tensors = lora_fx.add_weighted_adapter(pairs, [0.3, 0.7], combination_type="linear")
    from_dirs = ours(dirs[:2], [0.3, 0.7], combination_type="linear")[1]
    assert all(torch.equal(tensors[k], from_dirs[k]) for k in from_dirs)
    for (c, s), (c0, s0) in zip(pairs, before, strict=True):
        assert c == c0 and all(torch.equal(s[k], s0[k]) for k in s0)
    assert cfg.extra is not pairs[0][0].extra


def test_dare_generator_makes_it_reproducible(mlp_same_rank):
    _, dirs = mlp_same_rank
    a = ours(dirs, [0.5, 0.5, 0.5], dare_seed=1, combination_type="dare_ties", density=0.5)[1]
    b = ours(dirs, [0.5, 0.5, 0.5], dare_seed=1, combination_type="dare_ties", density=0.5)[1]
    c = ours(dirs, [0.5, 0.5, 0.5], dare_seed=2, combination_type="dare_ties", density=0.5)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_layers_the_combined_config_does_not_target_are_left_out_with_a_warning(tmp_path):
    base = mlp()
    dirs = [save_random_adapter(base, tmp_path / "e0", 60, r=2, target_modules=["fc1", "fc2"], exclude_modules=["fc2"]),
            save_random_adapter(base, tmp_path / "e1", 61, r=2, target_modules=["fc2"])]
    with pytest.warns(UserWarning, match="fc2"):
        check_same_as_peft(base, dirs, [1.0, 1.0], combination_type="linear")


# -- refused ---------------------------------------------------------------------------------------
def test_bad_arguments_are_refused(mlp_same_rank, mlp_mixed_ranks):
    _, dirs = mlp_same_rank
    _, mixed_ranks = mlp_mixed_ranks
    with pytest.raises(ConfigError, match=r"unknown combination_type 'sum'; valid: svd, linear, cat, ties"):
        ours(dirs, [1, 1, 1], combination_type="sum")
    with pytest.raises(ConfigError, match="2 weights for 3 adapters"):
        ours(dirs, [1, 1], combination_type="linear")
    with pytest.raises(ConfigError, match="adapters is empty"):
        lora_fx.add_weighted_adapter([], [], combination_type="linear")
    with pytest.raises(ConfigError, match=r"same rank, got .*m0: r=2, .*m1: r=5, .*m2: r=3"):
        ours(mixed_ranks, [1, 1, 1], combination_type="linear")
    pairs = [lora_fx.io.read_adapter_dir(d) for d in dirs[:2]]
    pairs[0] = (copy.deepcopy(pairs[0][0]), dict(pairs[0][1]))
    pairs[0][0].rank_pattern = {"fc1": 2}
    pairs[0][1]["base_model.model.fc1.lora_A.weight"] = pairs[0][1]["base_model.model.fc1.lora_A.weight"][:2]
    pairs[0][1]["base_model.model.fc1.lora_B.weight"] = pairs[0][1]["base_model.model.fc1.lora_B.weight"][:, :2]
    with pytest.raises(ConfigError, match=r"layer 'fc1' has ranks \[2, 4\]"):
        lora_fx.add_weighted_adapter(pairs, [1, 1], combination_type="ties", density=0.5)
    with pytest.raises(ConfigError, match="needs density"):
        ours(dirs, [1, 1, 1], combination_type="ties")
    with pytest.raises(ConfigError, match="majority_sign_method"):
        ours(dirs, [1, 1, 1], combination_type="ties", density=0.5, majority_sign_method="mean")
    with pytest.raises(ConfigError, match="svd_rank"):
        ours(dirs, [1, 1, 1], combination_type="svd", svd_rank=0)
    with pytest.raises(ConfigError, match=r"weights\[1\] must be a finite number"):
        ours(dirs, [1, float("nan"), 1], combination_type="svd")


def test_unsupported_adapters_are_refused(tmp_path):
    base = mlp()
    plain = save_random_adapter(base, tmp_path / "plain", 70, r=2, target_modules=["fc1"])
    dora = save_random_adapter(base, tmp_path / "dora", 71, r=2, target_modules=["fc1"], use_dora=True)
    with pytest.raises(UnsupportedFeatureError, match=r"dora: use_dora=True; only plain LoRA"):
        ours([plain, dora], [1, 1], combination_type="linear")
    regex = save_random_adapter(base, tmp_path / "regex", 72, r=2, target_modules="fc1")
    with pytest.raises(ConfigError, match=r"regex string in \[.*regex'\] and a list in \[.*plain'\]"):
        ours([plain, regex], [1, 1], combination_type="linear")

    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(24, 12)

    other = save_random_adapter(Wider(), tmp_path / "other", 73, r=2, target_modules=["fc1"])
    with pytest.raises(AdapterFileError, match=r"layer 'fc1' has different shapes in .*plain \(lora_A \(2, 16\).*"
                                               r"other \(lora_A \(2, 24\).*different base models"):
        ours([plain, other], [1, 1], combination_type="svd")


def test_docstring_example_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert doctest.testmod(weighted, raise_on_error=True).attempted > 0

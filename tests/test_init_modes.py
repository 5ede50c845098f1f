"""Init modes derived from the base weight (PiSSA, pissa_niter_K, OLoRA, LoftQ): build a model ->
adapt it (backend attached / unattached, transform) -> the model's function at step 0 is the base's
and the factors and rewritten base weights are PEFT's, bit for bit, for the same seed; saving plainly
and as PEFT's converted plain LoRA; merging; what is refused.

PEFT's LoftQ cannot run here (its LoraConfig needs scipy, and `loftq_init` computes on "cuda"
unconditionally), so LoftQ is checked by its properties: the base is the quantized residual (on the
bitsandbytes grid, and exactly nf4(W) after one iteration), the rank-r part is the best one of what
quantization lost, and the quantized base plus the adapter approximates W better than the quantized
base alone, also once the rewritten base is loaded as a real bitsandbytes 4-bit model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close, tiny_gpt2, tiny_llama, token_input
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx import init_modes

X = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
LAYERS = ("0", "2")


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)).to(dtype).eval()


def _kw(mode, **extra):
    # rank / alpha patterns give the two layers different ranks and scalings
    return dict(r=4, lora_alpha=8, target_modules=list(LAYERS), init_lora_weights=mode,
                rank_pattern={"2": 2}, alpha_pattern={"2": 3}, **extra)


class Adapted:
    """A base model adapted by lora_fx on one route: its output, factors and current base weights."""

    def __init__(self, route: str, base: nn.Module, cfg, x: torch.Tensor, seed: int = 7):
        self.route = route
        torch.manual_seed(seed)
        if route == "transform":
            self.ep = torch.export.export(copy.deepcopy(base), (x,))
            before = {k: v.clone() for k, v in self.ep.state_dict.items()}
            self.obj = lora_fx.transform(self.ep, cfg)
            assert all(torch.equal(v, before[k]) for k, v in self.ep.state_dict.items()), "the caller's program changed"
            self.run = self.obj.module()
        else:
            self.model = copy.deepcopy(base)
            self.obj = lora_fx.backend(cfg, inner="aot_eager")
            if route == "backend":
                self.obj.parameters(self.model)  # attached: adapters made from the model, now
            self.run = torch.compile(self.model, backend=self.obj)
        self.out = self.run(x)

    def tensor(self, layer: str, key: str) -> torch.Tensor:
        if self.route == "transform":
            return self.obj.state_dict[f"{layer}.{key}"]
        return self.obj.adapters.entries[layer].tensors[key]

    def weight(self, layer: str) -> torch.Tensor:
        if self.route == "transform":
            return self.obj.state_dict[f"{layer}.weight"]
        return self.model.get_submodule(layer).weight


def _peft(base, seed=7, **kw):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), PeftLoraConfig(**kw))


def _peft_tensor(peft_model, layer: str, key: str) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(layer)
    if key == "weight":
        return module.base_layer.weight
    if key == "lora_magnitude_vector":
        return module.lora_magnitude_vector["default"].weight
    return getattr(module, key.split(".")[0])["default"].weight


def _assert_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and torch.equal(actual.detach(), expected.detach()), \
        f"{what}: max diff {(actual.detach().float() - expected.detach().float()).abs().max().item():.3e}"


ROUTES = ["backend", "backend_unattached", "transform"]


@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("route", ROUTES)
def test_factors_and_rewritten_weights_are_peft_and_the_function_is_kept(route, mode):
    base = _mlp()
    ours = Adapted(route, base, lora_fx.LoraConfig(**_kw(mode)), X)
    assert_close(ours.out, base(X), f"{route} {mode}: output at step 0")
    # pissa_niter_K draws random projections: the same seed gives PEFT's because lora_fx draws what
    # PEFT's layer creation draws, in its order
    ref = _peft(base, **_kw(mode))
    for layer in LAYERS:
        for key in ("lora_A.weight", "lora_B.weight"):
            _assert_equal(ours.tensor(layer, key), _peft_tensor(ref, layer, key), f"{route} {mode} {layer} {key}")
        _assert_equal(ours.weight(layer), _peft_tensor(ref, layer, "weight"), f"{route} {mode} {layer} base weight")
        assert not torch.equal(ours.weight(layer), base.get_submodule(layer).weight), "the base was not rewritten"
    b = ours.tensor("0", "lora_B.weight")
    assert torch.linalg.matrix_rank(b.detach()) == 4 and b.abs().sum() > 0


def test_pissa_niter_reconstruction_and_seed():
    """Randomized SVD: factors follow torch's seed; B·A is close to the top-r part of W (a weight
    whose spectrum has a gap after r: with a flat one, r components are not well defined)."""
    base = _mlp()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(24, 4, generator=g) @ torch.randn(4, 32, generator=g) / 8
                             + 0.01 * torch.randn(24, 32, generator=g))
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights="pissa_niter_8")
    one, same, other = (Adapted("backend", base, cfg, X, seed=s) for s in (1, 1, 2))
    a, b = one.tensor("0", "lora_A.weight"), one.tensor("0", "lora_B.weight")
    _assert_equal(a, same.tensor("0", "lora_A.weight"), "same seed")
    assert not torch.equal(a, other.tensor("0", "lora_A.weight")), "another seed gave the same projections"
    w = base[0].weight.detach()
    u, s, vh = torch.linalg.svd(w)
    assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], "B·A = top-4 part of W", rel=1e-3)


def test_gpt2_conv1d_pissa_matches_peft_and_tied_lm_head_is_refused():
    base = tiny_gpt2()
    ids = token_input()
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], init_lora_weights="pissa")
    ours = Adapted("backend", base, lora_fx.LoraConfig(**kw), ids)
    assert_close(ours.out.logits, base(ids).logits, "gpt2 pissa: output at step 0")
    ref = _peft(base, fan_in_fan_out=True, **kw)
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):  # Conv1D: (in, out) weights
        for key in ("lora_A.weight", "lora_B.weight", "weight"):
            got = ours.weight(layer) if key == "weight" else ours.tensor(layer, key)
            _assert_equal(got, _peft_tensor(ref, layer, key), f"gpt2 {layer} {key}")
    # GPT-2's lm_head shares wte's weight: rewriting it would change the embedding (PEFT does silently)
    for route in ("backend", "transform"):
        tied = copy.deepcopy(base)
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"layer 'lm_head'.*shared with 'transformer\.wte'"):
            Adapted(route, tied, lora_fx.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights="olora"), ids)
        assert torch.equal(tied.lm_head.weight, base.lm_head.weight)


def test_dora_magnitude_comes_from_the_rewritten_weight_as_peft():
    """PEFT runs PiSSA first, then DoRA's init on the rewritten weight: m = ‖W_res + s·B·A‖ = ‖W‖."""
    base = tiny_llama()
    ids = token_input()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa",
              use_dora=True)
    ref = _peft(base, **kw)
    for route in ("backend", "transform"):
        ours = Adapted(route, base, lora_fx.LoraConfig(**kw), ids)
        assert_close(ours.out.logits, base(ids).logits, f"{route} dora+pissa: output at step 0")
        for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            for key in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "weight"):
                got = ours.weight(layer) if key == "weight" else ours.tensor(layer, key)
                _assert_equal(got, _peft_tensor(ref, layer, key), f"{route} dora {layer} {key}")
            assert_close(ours.tensor(layer, "lora_magnitude_vector"),
                         base.get_submodule(layer).weight.norm(dim=1), "magnitude = ‖W‖", rel=1e-5)


def test_half_precision_base_rounds_factors_as_peft():
    base = _mlp(torch.bfloat16)
    x = X.to(torch.bfloat16)
    ours = Adapted("backend", base, lora_fx.LoraConfig(**_kw("olora")), x)
    ref = _peft(base, **_kw("olora"))
    for layer in LAYERS:
        a = ours.tensor(layer, "lora_A.weight")
        assert a.dtype == torch.float32 and torch.equal(a, a.to(torch.bfloat16).float()), "factors on the bf16 grid"
        for key in ("lora_A.weight", "lora_B.weight", "weight"):
            got = ours.weight(layer) if key == "weight" else ours.tensor(layer, key)
            _assert_equal(got, _peft_tensor(ref, layer, key), f"bf16 {layer} {key}")
    assert_close(ours.out, ref(x), "bf16 olora vs PEFT", rel=1e-2)


# -- merging ------------------------------------------------------------------------------------------
def test_merge_after_pissa():
    base = _mlp()
    ours = Adapted("transform", base, lora_fx.LoraConfig(**_kw("pissa")), X)
    with torch.no_grad():
        ours.obj.state_dict["0.lora_B.weight"].add_(0.05)  # a trained adapter: not the initial one
    adapted = ours.obj.module()(X)
    merged = lora_fx.merge(ours.obj)
    assert_close(merged.module()(X), adapted, "merged program")
    assert_close(lora_fx.unmerge(merged).module()(X), adapted, "unmerged program")

    attached = Adapted("backend", base, lora_fx.LoraConfig(**_kw("pissa")), X)
    residual = attached.model[0].weight.detach().clone()
    attached.obj.merge()
    assert_close(attached.model[0].weight, base[0].weight, "merged weight = W_res + s·B·A = W", rel=1e-5)
    assert_close(attached.run(X), base(X), "merged backend")
    attached.obj.unmerge()
    _assert_equal(attached.model[0].weight, residual, "unmerge gives the residual back")


# -- saving ---------------------------------------------------------------------------------------------
def _train(ours: Adapted, seed=3):
    """Stand-in for training: move every factor (the same way on every route)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in LAYERS:
            for key in ("lora_A.weight", "lora_B.weight"):
                t = ours.tensor(layer, key)
                t.add_(0.1 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("route", ["backend", "transform"])
def test_plain_save_is_peft_loadable_on_the_original_base(route, tmp_path):
    """A plain save writes the factors as they are and init_lora_weights='pissa': loading it onto the
    original base (PEFT, or lora_fx) rewrites the base again and reproduces the trained model."""
    from peft import PeftModel

    base = _mlp()
    ours = Adapted(route, base, lora_fx.LoraConfig(**_kw("pissa")), X)
    _train(ours)
    trained = ours.run(X)
    lora_fx.save_adapter(ours.obj, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa" and config["r"] == 4
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    _assert_equal(saved["base_model.model.0.lora_A.weight"], ours.tensor("0", "lora_A.weight"), "saved as is")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert_close(peft_model(X), trained, f"{route}: PEFT on the original base")
    again = lora_fx.transform(torch.export.export(copy.deepcopy(base), (X,)), tmp_path / "a")
    assert_close(again.module()(X), trained, f"{route}: lora_fx on the original base")


@pytest.mark.parametrize("route", ["backend", "transform"])
def test_converted_save_equals_peft_conversion(route, tmp_path):
    from peft import PeftModel

    base = _mlp()
    kw = _kw("pissa")
    ref = _peft(base, **kw)  # PEFT's documented flow: save the initial adapter (as True), train, convert
    ref.peft_config["default"].init_lora_weights = True
    ref.save_pretrained(tmp_path / "peft_init")
    ref.peft_config["default"].init_lora_weights = "pissa"
    ours = Adapted(route, base, lora_fx.LoraConfig(**kw), X)
    lora_fx.save_adapter(ours.obj, tmp_path / "init")
    _train(ours)
    with torch.no_grad():
        for layer in LAYERS:
            for key in ("lora_A.weight", "lora_B.weight"):
                _peft_tensor(ref, layer, key).copy_(ours.tensor(layer, key))
    trained = ours.run(X)
    ref.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    lora_fx.save_adapter(ours.obj, tmp_path / "conv", initial_adapter=tmp_path / "init")

    theirs = load_file(tmp_path / "peft_conv" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "conv" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        _assert_equal(mine[key], theirs[key], f"converted {key}")
    assert mine["base_model.model.0.lora_A.weight"].shape == (8, 32)
    peft_cfg = json.loads((tmp_path / "peft_conv" / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    for field in ("init_lora_weights", "r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert cfg[field] == peft_cfg[field], field
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (8, 16, {"2": 4}, {"2": 6})
    # the converted adapter needs no rewritten base: on the original one it is the trained model
    assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "conv")(X), trained, "PEFT, converted")
    plain = lora_fx.transform(torch.export.export(copy.deepcopy(base), (X,)), tmp_path / "conv")
    assert_close(plain.module()(X), trained, "lora_fx, converted")
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"


def test_converted_save_with_rslora_scales_alpha_by_sqrt2(tmp_path):
    base = _mlp()
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=list(LAYERS), init_lora_weights="olora",
                             use_rslora=True)
    ours = Adapted("transform", base, cfg, X)
    lora_fx.save_adapter(ours.obj, tmp_path / "init")
    _train(ours)
    lora_fx.save_adapter(ours.obj, tmp_path / "conv", initial_adapter=tmp_path / "init")
    saved = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    plain = lora_fx.transform(torch.export.export(copy.deepcopy(base), (X,)), tmp_path / "conv")
    assert_close(plain.module()(X), ours.run(X), "rsLoRA converted")


@pytest.mark.parametrize("kw,match", [
    (dict(init_lora_weights="pissa", use_dora=True), "'dora' adapter, which has no plain-LoRA form"),
    (dict(init_lora_weights=False), "init_lora_weights=False starts from random factors"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), "LoftQ's base is the quantized residual"),
    (dict(init_lora_weights="pissa", use_rslora=True, rank_pattern={"2": 2}), "rsLoRA with rank_pattern"),
])
def test_conversion_refusals(kw, match, tmp_path):
    base = _mlp()
    ours = Adapted("transform", base, lora_fx.LoraConfig(r=4, lora_alpha=4, target_modules=list(LAYERS), **kw), X)
    lora_fx.save_adapter(ours.obj, tmp_path / "init")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
        lora_fx.save_adapter(ours.obj, tmp_path / "conv", initial_adapter=tmp_path / "init")
    assert not (tmp_path / "conv").exists()


def test_conversion_needs_this_adapters_initial_factors(tmp_path):
    base = _mlp()
    ours = Adapted("backend", base, lora_fx.LoraConfig(**_kw("pissa")), X)
    other = Adapted("transform", base, lora_fx.LoraConfig(**{**_kw("pissa"), "r": 2, "rank_pattern": {}}), X)
    lora_fx.save_adapter(other.obj, tmp_path / "other_rank")
    with pytest.raises(lora_fx.AdapterFileError, match=r"other_rank: key 'base_model\.model\.0\.lora_A\.weight' has "
                                                        r"shape \(2, 32\), the adapter has \(4, 32\)"):
        lora_fx.save_adapter(ours.obj, tmp_path / "conv", initial_adapter=tmp_path / "other_rank")
    only_first = Adapted("transform", base, lora_fx.LoraConfig(**{**_kw("pissa"), "target_modules": ["0"]}), X)
    lora_fx.save_adapter(only_first.obj, tmp_path / "first")
    with pytest.raises(lora_fx.AdapterFileError, match=r"missing key 'base_model\.model\.2\.lora_A\.weight'"):
        lora_fx.save_adapter(ours.obj, tmp_path / "conv", initial_adapter=tmp_path / "first")
    assert not (tmp_path / "conv").exists()


@pytest.mark.parametrize("made,loaded", [(True, "pissa"), ("pissa", True), ("pissa", "olora")])
def test_loading_an_adapter_made_for_another_base_is_refused(made, loaded, tmp_path):
    base = _mlp()
    source = Adapted("transform", base, lora_fx.LoraConfig(**_kw(loaded)), X)
    lora_fx.save_adapter(source.obj, tmp_path / "a")
    for route in ("backend", "transform"):
        target = Adapted(route, base, lora_fx.LoraConfig(**_kw(made)), X)
        with pytest.raises(lora_fx.AdapterFileError, match=rf"init_lora_weights={loaded!r}, but these adapters were "
                                                           rf"initialised with {made!r}"):
            lora_fx.load_adapter(target.obj, tmp_path / "a")


# -- LoftQ -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("route", ["backend", "transform"])
def test_loftq_properties(route, bits):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 48)).eval()
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(2))
    w = base[0].weight.detach()
    quantized = init_modes.quantize_dequantize(w, bits)
    q2 = init_modes.quantize_dequantize(base[2].weight.detach(), bits)
    with torch.no_grad():  # the base with both layers quantized, no adapter
        hidden = torch.relu(nn.functional.linear(x, quantized, base[0].bias))
        quant_only = nn.functional.linear(hidden, q2, base[2].bias)
    errors = {}
    for iters in (1, 4):
        cfg = lora_fx.LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="loftq",
                                 loftq_config={"loftq_bits": bits, "loftq_iter": iters})
        ours = Adapted(route, base, cfg, x)
        q = ours.weight("0").detach()
        a, b = ours.tensor("0", "lora_A.weight").detach(), ours.tensor("0", "lora_B.weight").detach()
        _assert_equal(init_modes.quantize_dequantize(q, bits), q, "the base is on the quantization grid")
        if iters == 1:
            _assert_equal(q, quantized, "one iteration: the base is W quantized")
        sv = torch.linalg.svdvals(w - q)
        residual = (w - q - b @ a).norm()
        assert residual.item() == pytest.approx(sv[8:].norm().item(), rel=1e-4), "B·A: the best rank-8 part"
        errors[iters] = (w - q - b @ a).norm().item()
        assert errors[iters] < 0.9 * (w - quantized).norm().item(), "Q + B·A approximates W better than Q(W)"
        assert (ours.run(x) - base(x)).abs().mean() < 0.9 * (quant_only - base(x)).abs().mean(), \
            "the adapted model is closer to the base than the quantized one"
    assert errors[4] <= errors[1] * 1.0001


def test_loftq_base_loads_as_bitsandbytes_4bit(tmp_path):
    """PEFT's LoftQ flow: adapt the fp model, save the rewritten weights and the adapter (config
    init_lora_weights=True), load the weights quantized: the 4-bit model with the adapter computes what
    the rewritten fp model with the adapter computes, closer to the original than plain 4-bit."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                            use_cache=False)).eval()
    original.save_pretrained(tmp_path / "original")
    ids = token_input()
    model = copy.deepcopy(original)
    cfg = lora_fx.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                             loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    loftq_fp = torch.compile(model, backend=lora)(ids).logits
    lora_fx.save_adapter(lora, tmp_path / "adapter")
    lora.detach()
    model.save_pretrained(tmp_path / "residual")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"]["loftq_iter"] == 2
    config["init_lora_weights"], config["loftq_config"] = True, {}  # as PEFT's LoftQ example saves it
    config_file.write_text(json.dumps(config))

    def load_4bit(path):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        m = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        for module in m.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return m

    quantized = load_4bit(tmp_path / "residual")
    q_lora = lora_fx.backend(tmp_path / "adapter", inner="aot_eager")
    q_lora.parameters(quantized)
    with torch.no_grad():
        loftq_4bit = torch.compile(quantized, backend=q_lora)(ids).logits
        plain_4bit = load_4bit(tmp_path / "original")(ids).logits
        reference = original(ids).logits
    assert_close(loftq_4bit, loftq_fp, "4-bit base + adapter = rewritten fp base + adapter", rel=1e-4)
    assert (loftq_4bit - reference).abs().mean() < 0.9 * (plain_4bit - reference).abs().mean()
    refused = lora_fx.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights="loftq",
                                 loftq_config={"loftq_bits": 4})
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"q_proj.*Linear4bit\) is already quantized"):
        lora_fx.backend(refused).parameters(load_4bit(tmp_path / "original"))


# -- refusals -----------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 6)

    def forward(self, ids):
        h = self.emb(ids)
        return self.fc(self.conv(h.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("target,match", [
    ("emb", r"layer 'emb'.*it is a torch\.nn\.modules\.sparse\.Embedding layer; PEFT defines pissa for linear"),
    ("conv", r"layer 'conv'.*Conv1d layer; PEFT defines pissa for linear layers"),
])
@pytest.mark.parametrize("route", ["backend", "transform"])
def test_layers_pissa_does_not_take_are_refused_and_nothing_is_rewritten(route, target, match):
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(0, 16, (2, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lora_fx.LoraConfig(r=2, target_modules=["fc", target], init_lora_weights="pissa")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
        Adapted(route, model, cfg, ids)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rank_above_the_weight_rank_and_meta_models_are_refused():
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"layer '2'.*r=20 exceeds.*min\(in, out\) = 16"):
        Adapted("backend", _mlp(), lora_fx.LoraConfig(r=20, target_modules=["2"], init_lora_weights="olora"), X)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(32, 24))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"layer '0'.*meta device"):
        lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa")).parameters(meta)


@pytest.mark.parametrize("kw,error,match", [
    (dict(init_lora_weights="loftq"), lora_fx.ConfigError, "needs loftq_config"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2}), lora_fx.ConfigError, "4 \\(nf4\\) or 8"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), lora_fx.ConfigError, "positive integer"),
    (dict(init_lora_weights="loftq", loftq_config={"bits": 4}), lora_fx.ConfigError, r"unknown keys \['bits'\]"),
    (dict(init_lora_weights="pissa", loftq_config={"loftq_bits": 4}), lora_fx.ConfigError, "only used with"),
    (dict(init_lora_weights="pissa_niter_x"), lora_fx.ConfigError, "'pissa' or 'pissa_niter_K'"),
    (dict(init_lora_weights="corda"), lora_fx.UnsupportedFeatureError, "CorDA initialisation is not supported"),
    (dict(init_lora_weights="svd"), lora_fx.ConfigError, "must be one of True, False"),
    (dict(init_lora_weights="olora", alora_invocation_tokens=[3]), lora_fx.ConfigError,
     "aLoRA adapter .* is not applied before its invocation tokens"),
])
def test_config_refusals(kw, error, match):
    with pytest.raises(error, match=match):
        lora_fx.LoraConfig(target_modules=["q_proj"], **kw)


def test_config_round_trip_and_peft_loftq_config_object():
    from peft import LoftQConfig

    cfg = lora_fx.LoraConfig(target_modules=["q"], init_lora_weights="loftq",
                             loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=3))
    assert cfg.loftq_config == {"loftq_bits": 8, "loftq_iter": 3}
    again = lora_fx.LoraConfig.from_peft_dict(json.loads(json.dumps(cfg.to_peft_dict())))
    assert (again.init_lora_weights, again.loftq_config) == ("loftq", {"loftq_bits": 8, "loftq_iter": 3})
    assert init_modes.mode_for("pissa_niter_16").name == "pissa_niter_16"
    assert [init_modes.mode_for(v).rewrites_base for v in (True, False, "gaussian", "pissa", "olora", "loftq")] == \
        [False, False, False, True, True, True]

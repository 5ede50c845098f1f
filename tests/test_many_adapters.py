"""Many named adapters in one compiled graph: PEFT's set_adapter / adapter_names= semantics, zero
recompiles when switching, mixed batches (LoRA and DoRA) on every site kind, and the bad inputs."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import (
    MODELS,
    ConvNet,
    assert_close,
    forward_backward,
    peft_adapter,
    raised_while_compiling,
    tamper_adapter_file,
)
from torch import nn

import lora_fx
from lora_fx.errors import AdapterFileError, ConfigError, LoraFxError

aten = torch.ops.aten

# A second adapter per model: another rank and another target set (some layers of one only).
OTHER_TARGETS = {
    "llama": dict(r=16, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(r=2, lora_alpha=3, target_modules=["c_attn", "wte"], use_rslora=False),
    "bert": dict(r=8, lora_alpha=5, target_modules=["query", "word_embeddings"]),
    "convnet": dict(r=2, lora_alpha=5, target_modules=["c1", "head"]),
}
ROWS = ["a", None, "b", "a"]


def _batch(model_name: str, rows: int = 4):
    if model_name == "convnet":
        return torch.randn(rows, 4, 16, generator=torch.Generator().manual_seed(2))
    return torch.randint(0, 128, (rows, 8), generator=torch.Generator().manual_seed(2))


class RowConvNet(ConvNet):
    """conftest's ConvNet (Conv1d, grouped strided Conv2d, Conv3d) with rows that do not mix (its
    Conv3d term is summed per row, not over the batch), so a row can be run alone."""

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h2 = self.c2(h.view(h.shape[0], 6, 4, 4))
        h3 = self.c3(h2.reshape(h2.shape[0], 2, 4, 2, 2))
        return self.head(h2.mean((2, 3))) + h3.flatten(1).sum(1, keepdim=True)


def _two_adapters(model_name: str, tmp_path, **extra):
    factory, _, kwargs, extract = MODELS[model_name]
    if model_name == "convnet":
        torch.manual_seed(0)
        factory = lambda: RowConvNet().eval()  # noqa: E731
    base = factory()
    _, dir_a = peft_adapter(base, tmp_path, "a", **{**kwargs, **extra})
    _, dir_b = peft_adapter(base, tmp_path, "b", **{**kwargs, **OTHER_TARGETS[model_name], **extra})
    return base, dir_a, dir_b, extract


def _peft_pair(base, dir_a, dir_b):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(base), dir_a, adapter_name="a").eval()
    peft.load_adapter(dir_b, adapter_name="b")
    return peft


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert", "convnet"])
def test_each_adapter_and_mixed_rows_match_peft_with_no_recompiles(model_name, tmp_path):
    base, dir_a, dir_b, extract = _two_adapters(model_name, tmp_path)
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    peft = _peft_pair(base, dir_a, dir_b)
    x = _batch(model_name)
    counts = []
    for _ in range(2):  # two full switching rounds: the second compiles nothing
        for name in ("a", "b"):
            lora.set_adapter(name)
            peft.set_adapter(name)
            with torch.no_grad():
                assert_close(extract(fast(x)), extract(peft(x)), f"{model_name}: adapter {name}")
        lora.set_adapter(ROWS)
        with torch.no_grad():
            ref = extract(peft(x, adapter_names=[n or "__base__" for n in ROWS]))
            assert_close(extract(fast(x)), ref, f"{model_name}: mixed rows")
        counts.append(lora.graphs_compiled)
    assert counts[0] == counts[1] == 2, counts  # one graph per kind (one adapter for all rows, mixed rows)
    assert lora.active_adapters == ["a", "b"]


@pytest.mark.parametrize("model_name", ["gpt2", "bert", "convnet"])  # llama: the DoRA training test below
def test_dora_mixed_rows_equal_each_row_run_alone(model_name, tmp_path):
    """PEFT cannot run DoRA in a mixed batch; each row must equal that row run with its own adapter
    (itself PEFT's output: compared here too) or the base model."""
    base, dir_a, dir_b, extract = _two_adapters(model_name, tmp_path, use_dora=True, lora_bias=False)
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    peft = _peft_pair(base, dir_a, dir_b)
    x = _batch(model_name)
    lora.set_adapter(ROWS)
    with torch.no_grad():
        mixed = extract(fast(x))
        for i, name in enumerate(ROWS):
            if name is None:
                expected = extract(base(x[i:i + 1]))
            else:
                peft.set_adapter(name)
                expected = extract(peft(x[i:i + 1]))
            assert_close(mixed[i:i + 1], expected, f"{model_name}: DoRA row {i} ({name})", rel=2e-5)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_mixed_rows_train_each_adapter_on_its_rows(tmp_path, variant):
    """Training a mixed batch: each adapter's gradient is the sum of its rows' gradients, as if each
    row ran alone with its adapter; the adapters of no row get none. LoRA runs the shrink / expand
    ops here, DoRA every adapter's own output selected per row."""
    base, dir_a, dir_b, extract = _two_adapters("llama", tmp_path, **variant)
    model = copy.deepcopy(base).train()
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    x = _batch("llama")
    lora.set_adapter(ROWS)
    forward_backward(fast, x, extract)
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    w = torch.randn(extract(fast(x)).shape, generator=torch.Generator().manual_seed(7))
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(ROWS):
        if name is None:
            continue
        lora.set_adapter(name)
        (extract(fast(x[i:i + 1])) * w[i:i + 1]).sum().backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, g in mixed.items() if g.abs().sum() > 0} == set(alone)
    for n, g in alone.items():
        assert_close(mixed[n], g, f"grad of {n}", rel=1e-4)
    assert any(".a." in n for n in alone) and any(".b." in n for n in alone)


def test_dynamic_batch_and_new_rows_recompile_nothing(tmp_path):
    """GPT-2 under `dynamic=True`, called positionally (Dynamo names its input `L['args'][0]`, and
    the batch size `L['args'][0].size()[0]`): new batch sizes and row assignments reuse the graphs;
    the base model and one adapter at batch 1 (a specialised Dynamo graph, its other graphs built
    later from its symbolic example inputs) agree with PEFT too."""
    base, dir_a, dir_b, extract = _two_adapters("gpt2", tmp_path)
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora, dynamic=True)
    peft = _peft_pair(base, dir_a, dir_b)
    seen = None
    for rows in (["a", "b", None], ["b", "b", "a", None, "a"], ["a", "b", None]):
        x = _batch("gpt2", len(rows))
        lora.set_adapter(rows)
        out = extract(fast(x))  # with gradients, as in training
        out.sum().backward()
        with torch.no_grad():
            assert_close(out, extract(peft(x, adapter_names=[n or "__base__" for n in rows])))
        seen = seen or lora.graphs_compiled
    assert lora.graphs_compiled == seen  # each Dynamo graph built once, at the first batch
    x = _batch("gpt2", 1)
    lora.set_adapter("a")
    peft.set_adapter("a")
    assert_close(extract(fast(x)), extract(peft(x)), "adapter a, batch 1")
    with lora.disable_adapter():  # with gradients, as in training
        assert_close(extract(fast(x)), extract(base(x)), "base model, batch 1")


def _capture():
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, inner


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)) + self.v(x))


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def test_selected_form_without_grad_never_accumulates_into_the_shared_base_output():
    """Adapters that cannot be stacked (one has lora_bias) each read the same base output (the
    selected form). Without grad a single adapter accumulates into its base output in place
    (`lora_fx::addmm_`); here that would hand the second adapter the first one's sum. The inference
    graphs must compute what the training-form graphs compute, for each selection."""
    torch.manual_seed(0)
    model = TwoLinears()
    graphs, inner = _capture()
    lora = lora_fx.backend({"a": lora_fx.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False),
                            "b": lora_fx.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False,
                                                    lora_bias=True)},
                           inner=inner).attach(model)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(3, 5, 16)
    for selection in ("a", "b", ["b", None, "a"]):
        lora.set_adapter(selection)
        with torch.no_grad():
            inference = fast(x)
        assert_close(inference, fast(x).detach())
    assert graphs and all(_count(gm, torch.ops.lora_fx.addmm_.default) == 0 for gm in graphs)
    assert any(_count(gm, aten.where.self) for gm in graphs)  # the selected form ran


def test_graph_shape_of_uniform_and_mixed_graphs():
    """One index input; uniform: one input per site and key, the running adapter's tensor (padded to
    the larger rank outside the graph), then one adapter's matmuls, nothing stacked; mixed: the
    adapters stacked (padded to the larger rank), the shrink / expand ops where gradients flow,
    per-row gathered factors and two batched matmuls per site in inference; an index range check."""
    torch.manual_seed(0)
    model = TwoLinears()
    graphs, inner = _capture()
    lora = lora_fx.backend({"a": lora_fx.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False),
                            "b": lora_fx.LoraConfig(r=4, target_modules=["v", "o"], init_lora_weights=False)},
                           inner=inner).attach(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(3, 5, 16)
    fast(x)
    lora.set_adapter(["b", None, "a"])
    fast(x)  # with gradients: the shrink / expand ops
    with torch.no_grad():
        fast(x)  # inference: gathered factors, batched matmuls
    uniform, mixed, mixed_inference = graphs
    placeholders = [n.name for n in uniform.graph.nodes if n.op == "placeholder"]
    assert sum(p.startswith("lora_selected_") for p in placeholders) == 3 * 3  # q, v, o: A, B, scaling
    assert not any(p.startswith(("lora_a_", "lora_b_")) for p in placeholders)
    assert _count(uniform, aten.stack.default) == _count(uniform, aten.constant_pad_nd.default) == 0
    assert _count(uniform, aten.where.self) == _count(uniform, aten.index.Tensor) == 0
    for gm in (mixed, mixed_inference):
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        assert placeholders.count("lora_adapter_index") == 1
        assert sum(p.startswith("lora_a_") for p in placeholders) == 2 * 2 + 2  # q, v: A, B; two scalings
        assert sum(p.startswith("lora_b_") for p in placeholders) == 2 * 2 + 2
        assert _count(gm, aten.stack.default) == 3 * 3  # per site: A, B, scaling banks
        assert _count(gm, aten.constant_pad_nd.default) == 2  # v: a's rank-2 A and B padded to b's 4
        assert _count(gm, aten.where.self) == 0
    for gm in (uniform, mixed):
        assert _count(gm, aten.bmm.default) == 0
    ops = torch.ops.lora_fx
    assert _count(mixed, ops.lora_shrink.default) == _count(mixed, ops.lora_expand.default) == 3
    assert _count(mixed_inference, aten.bmm.default) == 2 * 3
    assert _count(mixed_inference, ops.lora_shrink.default) == 0
    assert _count(mixed, aten._assert_async.msg) == _count(mixed_inference, aten._assert_async.msg) == 1
    expected = {}
    for name in ("a", "b"):
        lora.set_adapter(name)
        expected[name] = fast(x)
    lora.set_adapter(["b", None, "a"])
    out = fast(x)
    assert_close(out[0], expected["b"][0])
    assert_close(out[2], expected["a"][2])
    with lora.disable_adapter():
        assert_close(out[1], fast(x)[1])


def test_adapters_added_loaded_deleted_and_saved_in_peft_layout(tmp_path):
    from peft import PeftModel

    base, dir_a, dir_b, extract = _two_adapters("llama", tmp_path)
    model = copy.deepcopy(base)
    lora = lora_fx.backend(dir_a, inner="aot_eager").attach(model)  # one adapter, named "default"
    fast = torch.compile(model, backend=lora)
    x = _batch("llama")
    lora.load_adapter(dir_b, adapter_name="b")
    lora.add_adapter("fresh", lora_fx.LoraConfig(r=4, target_modules=["o_proj"]))
    assert lora.adapter_names == ["default", "b", "fresh"]
    assert lora.active_adapters == ["default"]
    assert any(".lora_A.fresh." in k for k in model.state_dict())
    lora.set_adapter("b")
    with torch.no_grad():
        out_b = extract(fast(x))
    lora.save_adapter(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").is_file()  # "default" at the root, as PEFT
    assert (tmp_path / "all" / "b" / "adapter_config.json").is_file()
    assert (tmp_path / "all" / "fresh" / "adapter_config.json").is_file()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "all" / "b").eval()
    with torch.no_grad():
        assert_close(out_b, extract(peft(x)))
    lora.save_adapter(tmp_path / "only", adapter_name="b")
    assert (tmp_path / "only" / "b" / "adapter_model.safetensors").is_file()
    with pytest.raises(LoraFxError, match="active"):
        lora.delete_adapter("b")
    lora.delete_adapter("fresh")
    assert not any(".fresh." in k for k in model.state_dict())
    assert any(".lora_A.default." in k for k in model.state_dict())
    with torch.no_grad():
        assert_close(extract(fast(x)), out_b, "after deleting another adapter")
    lora.set_adapter("default")
    lora.delete_adapter("b")
    assert not any(".b." in k for k in model.state_dict())
    peft_a = PeftModel.from_pretrained(copy.deepcopy(base), dir_a).eval()
    with torch.no_grad():
        assert_close(extract(fast(x)), extract(peft_a(x)), "back to one adapter")


def test_bad_names_rows_and_a_failed_load_change_nothing(tmp_path):
    base, dir_a, dir_b, extract = _two_adapters("llama", tmp_path)
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    x = _batch("llama")
    with pytest.raises(LoraFxError, match=r"no adapter named 'c'.*\['a', 'b'\]"):
        lora.set_adapter("c")
    with pytest.raises(LoraFxError, match=r"no adapter named 'c'.*\['a', 'b'\]"):
        lora.set_adapter(["a", "c"])
    with pytest.raises(ConfigError, match="one per row"):
        lora.set_adapter([])
    lora.set_adapter(["a", "b"])  # 2 names, 4 rows
    with raised_while_compiling(LoraFxError, "2 adapter names .* 4 rows"):
        fast(x)
    lora.set_adapter(ROWS)
    with torch.no_grad():
        before = extract(fast(x))
    lora.set_adapter(["a", "b", "b"])
    with pytest.raises(LoraFxError, match="3 adapter names .* 4 rows"), torch.no_grad():
        fast(x)  # compiled already: the check runs at the call
    lora.set_adapter(ROWS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = tmp_path / "bad"
    shutil.copytree(dir_b, bad)
    tamper_adapter_file(bad, lambda t: t.update({k: t[k][:, :-1].contiguous() for k in t if "v_proj.lora_A" in k}))
    with pytest.raises(AdapterFileError, match=r"v_proj\.lora_A\.weight.*shape"):
        lora.load_adapter(bad, adapter_name="c")
    with pytest.raises(AdapterFileError, match=r"v_proj\.lora_A\.weight.*shape"):
        lora.load_adapter(bad, adapter_name="b")  # in place: refused too
    other = nn.Sequential(nn.Linear(4, 4))
    other_lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"])).attach(other)
    other_lora.save_adapter(tmp_path / "other")
    with pytest.raises(lora_fx.TargetNotFoundError, match="'0'"):
        lora.load_adapter(tmp_path / "other", adapter_name="other")  # an adapter of another model
    assert lora.adapter_names == ["a", "b"]
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(extract(fast(x)), before)
    with pytest.raises(LoraFxError, match="no adapter named 'zz'.*\\['a', 'b'\\]"):
        lora.delete_adapter("zz")
    with pytest.raises(ConfigError, match="already loaded"):
        lora.add_adapter("a", lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))


def test_merge_takes_one_adapter_and_refuses_mixed_rows(tmp_path):
    base, dir_a, dir_b, extract = _two_adapters("llama", tmp_path)
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    x = _batch("llama")
    lora.set_adapter(ROWS)
    with pytest.raises(LoraFxError, match="each row runs its own adapter"):
        lora.merge()
    lora.set_adapter("b")
    with torch.no_grad():
        unmerged = extract(fast(x))
        lora.merge()
        assert_close(extract(fast(x)), unmerged, "merged b", rel=1e-4)
    with pytest.raises(LoraFxError, match="merged"):
        lora.set_adapter("a")
    lora.unmerge()
    lora.set_adapter("a")
    with torch.no_grad():
        assert not torch.allclose(extract(fast(x)), unmerged)


# -- exported programs ------------------------------------------------------------------------------

def _export(base, x):
    return torch.export.export(base, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


# Conv1D and Embedding (gpt2), Conv1d/2d/3d and Linear (convnet); Llama's Linear layers: the next tests.
@pytest.mark.parametrize("model_name", ["gpt2", "convnet"])
def test_program_of_named_adapters_matches_peft_at_any_batch_size(model_name, tmp_path):
    base, dir_a, dir_b, extract = _two_adapters(model_name, tmp_path)
    program = lora_fx.transform(_export(base, _batch(model_name)), {"a": dir_a, "b": dir_b})
    assert program.graph_signature.user_inputs[-1] == "adapter_index"
    assert any(k.endswith(".lora_A.a.weight") for k in program.state_dict)
    assert any(k.endswith(".lora_A.b.weight") for k in program.state_dict)
    peft = _peft_pair(base, dir_a, dir_b)
    run = program.module()
    for rows in (ROWS, ["b", "b", None, "a", "a", "b"]):
        x = _batch(model_name, len(rows))
        index = torch.tensor([-1 if n is None else "ab".index(n) for n in rows])
        with torch.no_grad():
            expected = extract(peft(x, adapter_names=[n or "__base__" for n in rows]))
            out = run(x, adapter_index=index)
        assert_close(out if model_name == "convnet" else out[0] if isinstance(out, tuple) else extract(out), expected,
                     f"{model_name} program, rows {rows}")


def test_dora_program_rows_equal_each_row_alone(tmp_path):
    base, dir_a, dir_b, extract = _two_adapters("gpt2", tmp_path, use_dora=True, lora_bias=False)
    program = lora_fx.transform(_export(base, _batch("gpt2")), {"a": dir_a, "b": dir_b})
    peft = _peft_pair(base, dir_a, dir_b)
    x = _batch("gpt2")
    with torch.no_grad():
        out = extract(program.module()(x, adapter_index=torch.tensor([0, -1, 1, 0])))
        for i, name in enumerate(ROWS):
            if name is not None:
                peft.set_adapter(name)
            expected = extract((peft if name is not None else base)(x[i:i + 1]))
            assert_close(out[i:i + 1], expected, f"DoRA program row {i}", rel=2e-5)


def test_named_program_loads_saves_merges_and_unmerges(tmp_path):
    from peft import PeftModel

    base, dir_a, dir_b, extract = _two_adapters("llama", tmp_path)
    _, dir_c = peft_adapter(base, tmp_path, "c", **{**MODELS["llama"][2], **OTHER_TARGETS["llama"], "lora_alpha": 3})
    x = _batch("llama")
    index = torch.tensor([0, -1, 1, 0])
    program = lora_fx.transform(_export(base, x), {"a": dir_a, "b": dir_b})
    with torch.no_grad():
        before = program.module()(x, adapter_index=index).logits
        for bad in ([0, 2, 0, 0], [0, -2, 0, 0]):
            with pytest.raises(RuntimeError, match="adapter_index out of range"):
                program.module()(x, adapter_index=torch.tensor(bad))
    with pytest.raises(LoraFxError, match=r"\['a', 'b'\].*adapter_name"):
        lora_fx.load_adapter(program, dir_c)
    with pytest.raises(LoraFxError, match="no adapter named 'c'.*fixed"):
        lora_fx.load_adapter(program, dir_c, adapter_name="c")
    with pytest.raises(AdapterFileError, match="rank"):
        lora_fx.load_adapter(program, dir_c, adapter_name="a")  # a has other ranks: refused, nothing written
    with torch.no_grad():
        assert torch.equal(program.module()(x, adapter_index=index).logits, before)
    lora_fx.load_adapter(program, dir_c, adapter_name="b")  # same shapes, another alpha
    peft = _peft_pair(base, dir_a, dir_c)
    with torch.no_grad():
        assert_close(program.module()(x, adapter_index=index).logits,
                     extract(peft(x, adapter_names=["a", "__base__", "b", "a"])), "after loading c into b")
    lora_fx.save_adapter(program, tmp_path / "saved")
    for name, source in (("a", dir_a), ("b", dir_c)):
        reference = PeftModel.from_pretrained(copy.deepcopy(base), source).eval()
        saved = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved" / name).eval()
        with torch.no_grad():
            assert torch.equal(extract(saved(x)), extract(reference(x)))
    with pytest.raises(LoraFxError, match=r"adapter_name"):
        lora_fx.merge(program)
    merged = lora_fx.merge(program, adapter_name="b")
    assert "adapter_index" not in merged.graph_signature.user_inputs
    assert not any("lora" in k for k in merged.state_dict)
    base_ops = [n.target for n in _export(base, x).graph.nodes if n.op == "call_function"]
    assert [n.target for n in merged.graph.nodes if n.op == "call_function"] == base_ops
    peft.set_adapter("b")
    with torch.no_grad():
        assert_close(merged.module()(x).logits, extract(peft(x)), "merged b", rel=1e-4)
    again = lora_fx.unmerge(merged)
    with torch.no_grad():
        assert torch.equal(again.module()(x, adapter_index=index).logits,
                           program.module()(x, adapter_index=index).logits)
    assert all(torch.equal(again.state_dict[k], v) for k, v in program.state_dict.items())


def test_aoti_package_serves_named_adapters_and_takes_new_weights(tmp_path):
    """One AOTInductor package, adapters chosen per row by `adapter_index`; new adapter values of the
    same shapes (and another alpha) replace the old ones as constants, without compiling again."""
    torch.manual_seed(0)
    base = TwoLinears().eval()
    x = torch.randn(3, 5, 16)
    cfgs = {"a": lora_fx.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False),
            "b": lora_fx.LoraConfig(r=4, lora_alpha=3, target_modules=["v", "o"], init_lora_weights=False)}
    program = lora_fx.transform(_export(base, x), cfgs)
    runner = torch._inductor.aoti_load_package(lora_fx.aoti_package(program, str(tmp_path / "m.pt2")))
    index = torch.tensor([1, -1, 0])
    with torch.no_grad():
        assert_close(runner(x, adapter_index=index), program.module()(x, adapter_index=index))
        with pytest.raises(RuntimeError, match="adapter_index out of range"):
            runner(x, adapter_index=torch.tensor([1, 2, 0]))
    other = lora_fx.transform(_export(base, x), {**cfgs, "b": lora_fx.LoraConfig(
        r=4, lora_alpha=11, target_modules=["v", "o"], init_lora_weights=False)})
    lora_fx.save_adapter(other, tmp_path / "other", adapter_name="b")
    lora_fx.load_adapter(program, tmp_path / "other" / "b", adapter_name="b")
    runner.load_constants(lora_fx.adapter_state(program), check_full_update=False)
    with torch.no_grad():
        expected = program.module()(x, adapter_index=index)  # a as before, b now other's
        assert_close(expected[0], other.module()(x, adapter_index=index)[0], "row of b")
        assert_close(runner(x, adapter_index=index), expected)
        row_b, row_a = runner(x, adapter_index=index)[0], runner(x, adapter_index=torch.tensor([0, 0, 0]))[0]
        assert not torch.allclose(row_b, row_a)


def test_adapter_names_that_cannot_live_in_the_model_are_refused():
    model = TwoLinears()
    cfg = lora_fx.LoraConfig(r=2, target_modules=["q"])
    for bad in ("half", "to", "training", "_parameters", "a.b", "", "__base__"):
        with pytest.raises(ConfigError, match=repr(bad)):
            lora_fx.backend({bad: cfg})
    lora = lora_fx.backend(cfg).attach(model)
    with pytest.raises(ConfigError, match="'cuda'"):
        lora.add_adapter("cuda", cfg)
    assert lora.adapter_names == ["default"]


# -- found in review: each of these gave a wrong number, a raw error or a half-changed state ----------

def _lora_dirs(base, tmp_path, **targets):
    out = {}
    for i, (name, modules) in enumerate(targets.items()):
        torch.manual_seed(10 + i)
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=2 + 2 * i, lora_alpha=4, target_modules=modules,
                                                                  init_lora_weights=False))
        peft.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def test_disable_adapter_runs_the_original_modules_to_save(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = TwoLinears().eval()
    _, path = peft_adapter(base, tmp_path, "mts", r=2, target_modules=["q"], modules_to_save=["o"])
    model = copy.deepcopy(base)
    lora = lora_fx.backend(path, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    x = torch.randn(3, 16)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert_close(fast(x), peft(x))
        with lora.disable_adapter(), peft.disable_adapter():
            assert torch.equal(fast(x), base(x))
        assert_close(fast(x), peft(x), "after the block")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match="modules_to_save"):
        lora.set_adapter(["default", None, "default"])


def test_inactive_adapters_are_frozen_and_an_optimizer_leaves_them_alone(tmp_path):
    base = TwoLinears()
    dirs = _lora_dirs(base, tmp_path, a=["q", "v"], b=["q"])
    model = copy.deepcopy(base).train()
    lora = lora_fx.backend(dirs, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    x = torch.randn(3, 5, 16)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == {"q.lora_A.a.weight", "q.lora_B.a.weight", "v.lora_A.a.weight", "v.lora_B.a.weight"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".b." in n}
    for _ in range(2):
        opt.zero_grad()
        fast(x).square().mean().backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if ".b." in n)
    assert all(torch.equal(p, b_before[n]) for n, p in model.named_parameters() if ".b." in n)
    lora.set_adapter("b")  # now b trains, a is frozen
    assert trainable() == {"q.lora_A.b.weight", "q.lora_B.b.weight"}
    model.zero_grad(set_to_none=True)
    fast(x).square().mean().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters() if "lora_" in n}
    assert all(has == (".b." in n) for n, has in grads.items()), grads
    lora.set_adapter(["a", "b", "a"])
    assert len(trainable()) == 6


def test_deleting_the_selected_adapter_inside_disable_adapter_is_refused(tmp_path):
    base = TwoLinears()
    lora = lora_fx.backend(_lora_dirs(base, tmp_path, a=["q"], b=["q"]), inner="aot_eager").attach(base)
    lora.set_adapter("b")
    with lora.disable_adapter(), pytest.raises(LoraFxError, match="'b' is active"):
        lora.delete_adapter("b")
    assert lora.adapter_names == ["a", "b"] and lora.active_adapters == ["b"]


class Guided(TwoLinears):
    """Classifier-free guidance: the batch concatenated with itself before `q`."""

    def forward(self, x):
        return self.o(torch.relu(self.q(torch.cat([x, torch.zeros_like(x)]))))[: x.shape[0]] + self.v(x)[..., :8]


def test_rows_that_are_not_the_batch_are_refused_in_a_mixed_batch(tmp_path):
    base = Guided()
    lora = lora_fx.backend(_lora_dirs(base, tmp_path, a=["q", "v"], b=["q"]), inner="aot_eager").attach(base)
    fast = torch.compile(base, backend=lora)
    lora.set_adapter(["a", "b", None, "a"])
    with raised_while_compiling(lora_fx.UnsupportedFeatureError, "q: its input has 8 leading rows where the batch"):
        fast(torch.randn(4, 16))


class GainFirst(TwoLinears):
    def forward(self, gain, x):
        return self.o(torch.relu(self.q(x)) * gain + self.v(x))


def test_the_batch_is_found_among_inputs_that_are_not_first(tmp_path):
    base = GainFirst().eval()
    dirs = _lora_dirs(base, tmp_path, a=["q", "v"], b=["o"])
    gain, x = torch.rand(16), torch.randn(4, 16)
    model = copy.deepcopy(base)
    lora = lora_fx.backend(dirs, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora)
    expected = {}
    with torch.no_grad():
        for name in ("a", "b"):
            lora.set_adapter(name)
            expected[name] = fast(gain, x)
        lora.set_adapter(["b", None, "a", "a"])
        mixed = fast(gain, x)
        with lora.disable_adapter():
            expected[None] = fast(gain, x)
    for i, name in enumerate(["b", None, "a", "a"]):
        assert_close(mixed[i], expected[name][i], f"row {i}")
    program = lora_fx.transform(torch.export.export(base, (gain, x), dynamic_shapes=(None, {0: torch.export.Dim.AUTO})),
                                dirs)
    x6 = torch.randn(6, 16)
    with torch.no_grad():
        out = program.module()(gain, x6, adapter_index=torch.tensor([0, 1, -1, 0, 1, -1]))
    assert out.shape == (6, 8)


def test_merged_named_program_and_module_copies_save_in_peft_layout(tmp_path):
    base = TwoLinears().eval()
    dirs = _lora_dirs(base, tmp_path, a=["q", "v"], b=["q"])
    x = torch.randn(4, 16)
    program = lora_fx.transform(_export(base, x), dirs)
    merged = lora_fx.merge(program, adapter_name="b")
    lora_fx.save_adapter(merged, tmp_path / "from_merged")
    lora_fx.save_adapter(program, tmp_path / "from_program")
    copy_ = program.module()
    lora_fx.save_adapter(copy_, tmp_path / "from_module", adapter_name="b")
    from safetensors.torch import load_file

    for name in ("a", "b"):
        saved = load_file(tmp_path / "from_merged" / name / "adapter_model.safetensors")
        again = load_file(tmp_path / "from_program" / name / "adapter_model.safetensors")
        assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert (tmp_path / "from_module" / "b" / "adapter_model.safetensors").is_file()
    lora_fx.load_adapter(copy_, dirs["b"], adapter_name="b")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match="merge the ExportedProgram"):
        lora_fx.merge(copy_, adapter_name="a")


def test_saving_while_one_adapter_is_merged_keeps_the_others_base_layers(tmp_path):
    class WithHead(TwoLinears):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 8)

        def forward(self, x):
            return self.lm_head(super().forward(x))

    base = WithHead()
    dirs = _lora_dirs(base, tmp_path, a=["q"], b=["lm_head"])
    model = copy.deepcopy(base)
    lora = lora_fx.backend(dirs, inner="aot_eager").attach(model)
    lora.set_adapter("a")
    lora.merge()
    lora.save_adapter(tmp_path / "saved")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "saved" / "b" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.base_layer.weight"], base.lm_head.weight)


def test_cli_takes_a_single_adapter_path_with_an_equals_sign(tmp_path):
    from lora_fx.cli import _named_adapters

    path = tmp_path / "sweep" / "lr=1e-4"
    path.mkdir(parents=True)
    assert _named_adapters([str(path)]) == {"default": str(path)}
    assert _named_adapters([f"a={path}", f"b={path}"]) == {"a": str(path), "b": str(path)}

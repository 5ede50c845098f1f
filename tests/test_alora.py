"""aLoRA (`alora_invocation_tokens`): PEFT's activated LoRA, with the invocation found in the graph.

Reference: PEFT's `PeftModelForCausalLM` (forward, and greedy `generate` with a KV cache). The
mask is computed from `input_ids` inside the graph, so moving the invocation recompiles nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, peft_adapter, peft_adapter_grads, tiny_llama
from torch._dynamo.utils import counters

import lora_fx
from lora_fx.errors import ConfigError, UnsupportedFeatureError
from lora_fx.marks import ADAPTER, get_mark

aten = torch.ops.aten
INV = [5, 6, 7]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _ids(seed: int, places: dict[int, list[int]], batch: int = 4, length: int = 12) -> torch.Tensor:
    """Token ids in [10, 100) (never an invocation token) with the invocation at `places[row]`."""
    ids = torch.randint(10, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    for row, starts in places.items():
        for s in starts:
            ids[row, s:s + len(INV)] = torch.tensor(INV)
    return ids


# mid-sequence; twice (the last one counts); never; at the very end
IDS = _ids(0, {0: [3], 1: [1, 7], 3: [9]})
MOVED = _ids(1, {0: [0], 1: [5], 2: [2, 8]})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path_factory.mktemp("alora"), r=4, lora_alpha=8,
                                    target_modules=TARGETS, alora_invocation_tokens=INV, task_type="CAUSAL_LM")
    with torch.no_grad():  # a strong adapter: generated tokens differ from the base model's
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(30)
    peft_model.save_pretrained(path)
    return base, peft_model, path


def _attached(base, path):
    lora = lora_fx.backend(path, inner="aot_eager")
    model = copy.deepcopy(base)
    lora.attach(model)
    return lora, model


def test_backend_forward_and_grads_equal_peft_and_moving_the_invocation_recompiles_nothing(reference):
    base, peft_model, path = reference
    lora, model = _attached(base, path)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    counters.clear()
    for ids in (IDS, MOVED):
        with torch.no_grad():
            want = peft_model(input_ids=ids).logits
            got = fast(input_ids=ids).logits
        assert_close(got, want, "logits")
        plain = base(input_ids=ids).logits
        # rows never invoked are the base model's exactly; the others differ from it
        invoked = [any((ids[r, s:s + 3] == torch.tensor(INV)).all() for s in range(10)) for r in range(len(ids))]
        for r, inv in enumerate(invoked):
            assert torch.equal(got[r], plain[r]) != inv, f"row {r}"
    assert lora.graphs_compiled == 1
    assert counters["stats"]["unique_graphs"] == 1

    # gradients, training mode (PEFT's adapters receive the same ones)
    peft_model.zero_grad()
    model.train()
    peft_model.train()
    w = torch.randn(4, 12, 128, generator=torch.Generator().manual_seed(3))
    (peft_model(input_ids=IDS).logits * w).sum().backward()
    (fast(input_ids=IDS).logits * w).sum().backward()
    model.eval()
    peft_model.eval()
    ref_grads = peft_adapter_grads(peft_model)
    got_grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert set(got_grads) == set(ref_grads)
    for name, g in got_grads.items():
        assert_close(g, ref_grads[name], f"grad of {name}", 1e-4)


def test_generate_with_a_kv_cache_equals_peft_and_keeps_the_base_prefix_cache(reference):
    base, peft_model, path = reference
    prompt = _ids(2, {0: [3], 2: [7]}, batch=3, length=10)
    kw = dict(use_cache=True, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt),
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want = peft_model.generate(input_ids=prompt, **kw)
        plain = base.generate(input_ids=prompt, **kw)
    lora, model = _attached(base, path)
    model.forward = torch.compile(model.forward, backend=lora, fullgraph=True)
    with torch.no_grad():
        got = model.generate(input_ids=prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert not torch.equal(got.sequences[0], plain.sequences[0])   # the adapter acted
    assert torch.equal(got.sequences[1], plain.sequences[1])       # never invoked: the base model
    for layer in range(len(base.model.layers)):
        mine, theirs = got.past_key_values.layers[layer], plain.past_key_values.layers[layer]
        # before the invocation (row 0: positions 0-2, row 2: 0-6), the base model's cache exactly
        for row, start in ((0, 3), (2, 7)):
            assert torch.equal(mine.keys[row, :, :start], theirs.keys[row, :, :start])
            assert torch.equal(mine.values[row, :, :start], theirs.values[row, :, :start])
            assert not torch.equal(mine.keys[row, :, start:], theirs.keys[row, :, start:])
        assert torch.equal(mine.keys[1], theirs.keys[1])


def test_exported_program_equals_peft_with_one_mask_for_all_layers(reference):
    base, peft_model, path = reference
    out = lora_fx.transform(torch.export.export(base, (), {"input_ids": IDS}), path)
    run = out.module()
    for ids in (IDS, MOVED):
        with torch.no_grad():
            assert_close(run(input_ids=ids).logits, peft_model(input_ids=ids).logits, "logits")
    # Graph shape: the invocation is matched once per graph, each adapted layer masks its delta.
    nodes = list(out.graph.nodes)
    eq = [n for n in nodes if n.target is aten.eq.Scalar]
    assert len(eq) == len(INV) and all(get_mark(n, ADAPTER) is not None for n in eq)
    shifted = [n for n in nodes if n.target is aten.cat.default and get_mark(n, ADAPTER) is not None]
    assert len(shifted) == len(INV) - 1  # the matches of tokens 2.. shifted back to the start
    assert len([n for n in nodes if n.target is aten.amax.default]) == 1
    sites = 4 * len(TARGETS)
    masked = [n for n in nodes if n.target is aten.mul.Tensor and get_mark(n, ADAPTER) is not None]
    assert len(masked) == 2 * sites  # the scaling and the mask, per site
    assert not [n for n in nodes if n.target in (aten.index_put.default, aten.nonzero.default, aten.item.default)]


def test_a_prefix_cache_made_by_the_base_model_is_reused_and_no_state_leaks(reference):
    """aLoRA's point: a prefix cached by the base model is reused, the invocation comes after it.
    PEFT with that cache gives what it gives without it; so must lora_fx, also right after a
    generate whose rows were invoked (that state belongs to another sequence)."""
    from transformers import DynamicCache

    base, peft_model, path = reference
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(10, 100, (2, 6), generator=g)
    suffix = torch.randint(10, 100, (2, 6), generator=g)
    suffix[0, 1:4] = torch.tensor(INV)                      # row 0 invoked after the prefix, row 1 never
    full = torch.cat([prefix, suffix], 1)
    invoked_before = full.clone()
    invoked_before[:, 8:11] = torch.tensor(INV)             # a first generate: both rows invoked
    kw = dict(use_cache=True, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(full),
              pad_token_id=0)

    def prefix_cache():
        cache = DynamicCache()
        with torch.no_grad():
            base(input_ids=prefix, past_key_values=cache, use_cache=True)
        return cache

    with torch.no_grad():
        want = peft_model.generate(input_ids=full, past_key_values=prefix_cache(), **kw)
        assert torch.equal(want, peft_model.generate(input_ids=full, **kw))
        plain = base.generate(input_ids=full, **kw)
    assert not torch.equal(want[0], plain[0]) and torch.equal(want[1], plain[1])
    lora, model = _attached(base, path)
    model.forward = torch.compile(model.forward, backend=lora, fullgraph=True)
    with torch.no_grad():
        model.generate(input_ids=invoked_before, **kw)
        got = model.generate(input_ids=full, past_key_values=prefix_cache(), **kw)
    assert torch.equal(got, want)


def test_dynamic_shapes_stay_dynamic_and_graph_modules_without_values_work():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 8)
            self.q_proj = torch.nn.Linear(8, 8)

        def forward(self, input_ids):
            return self.q_proj(self.emb(input_ids))

    torch.manual_seed(0)
    model = Tiny()
    cfg = lora_fx.LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=INV, init_lora_weights=False)
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=64)}}
    ep = torch.export.export(model, (), {"input_ids": IDS}, dynamic_shapes=dims)
    out = lora_fx.transform(ep, cfg)
    traced = lora_fx.transform(torch.fx.symbolic_trace(model), cfg)   # a graph without fake values
    def reference(program, ids):
        entry = lora_fx.program_adapters.adapters_of(program).entries["q_proj"]
        a, b = entry.tensors["lora_A.weight"], entry.tensors["lora_B.weight"]
        hidden = model.emb(ids)
        invoked = torch.zeros(ids.shape, dtype=torch.bool)
        for r in range(ids.shape[0]):
            starts = [s for s in range(ids.shape[1] - 2) if ids[r, s:s + 3].tolist() == INV]
            if starts:
                invoked[r, starts[-1]:] = True
        return model.q_proj(hidden) + invoked[..., None] * (hidden @ a.T @ b.T) * entry.scaling

    for ids in (IDS, MOVED[:3, :7], MOVED[:1, 2:]):
        with torch.no_grad():
            assert_close(out.module()(input_ids=ids), reference(out, ids), f"program, ids {tuple(ids.shape)}")
            assert_close(traced(ids), reference(traced, ids), f"GraphModule, ids {tuple(ids.shape)}")
    # the caller's program keeps its dynamic sizes: a later transform of it runs other shapes too
    plain = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        plain.module()(input_ids=MOVED[:3, :5])


def test_merge_is_refused_because_alora_is_token_dependent(reference):
    base, _, path = reference
    out = lora_fx.transform(torch.export.export(base, (), {"input_ids": IDS}), path)
    with pytest.raises(UnsupportedFeatureError, match="aLoRA is token-dependent"):
        lora_fx.merge(out)
    lora, model = _attached(base, path)
    with pytest.raises(UnsupportedFeatureError, match="aLoRA is token-dependent"):
        lora.merge()


def test_programs_with_decode_inputs_and_graphs_without_input_ids_are_refused(reference):
    base, _, path = reference
    ep = torch.export.export(base, (), {"input_ids": IDS, "position_ids": torch.arange(12)[None]})
    with pytest.raises(UnsupportedFeatureError, match="state carried from one call to the next"):
        lora_fx.transform(ep, path)
    embeds = base.model.embed_tokens(IDS).detach()
    ep = torch.export.export(base, (), {"inputs_embeds": embeds})
    with pytest.raises(lora_fx.LoraFxError, match=r"needs the model input 'input_ids'.*inputs_embeds"):
        lora_fx.transform(ep, path)


def test_other_layer_kinds_are_refused_and_loads_keep_the_invocation(reference, tmp_path):
    base, _, path = reference
    cfg = lora_fx.LoraConfig(r=2, target_modules=["embed_tokens"], alora_invocation_tokens=INV)
    with pytest.raises(ConfigError, match="embed_tokens: aLoRA adapts linear layers only"):
        lora_fx.transform(torch.export.export(base, (), {"input_ids": IDS}), cfg)
    other = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, alora_invocation_tokens=[9, 9])
    program = lora_fx.transform(torch.export.export(base, (), {"input_ids": IDS}), path)
    other_dir = tmp_path / "other"
    lora_fx.save_adapter(lora_fx.transform(torch.export.export(base, (), {"input_ids": IDS}), other), other_dir)
    with pytest.raises(lora_fx.AdapterFileError, match=r"alora_invocation_tokens=\[9, 9\].*\[5, 6, 7\]"):
        lora_fx.load_adapter(program, other_dir)


def test_alora_beside_a_plain_adapter_in_a_mixed_batch_equals_each_row_run_alone(reference, tmp_path):
    """Named adapters: an aLoRA adapter (its mask from each row's own invocation) and a plain LoRA on
    the same layers, rows mixed with base rows. Each row equals that row of the whole batch run with
    its adapter alone, which for aLoRA equals PEFT."""
    base, peft_model, path = reference
    _, plain = peft_adapter(base, tmp_path, "plain", r=4, lora_alpha=8, target_modules=TARGETS,
                            init_lora_weights=False, task_type="CAUSAL_LM")
    model = copy.deepcopy(base)
    lora = lora_fx.backend({"alora": path, "plain": plain}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    rows = ["alora", "plain", None, "alora"]
    with torch.no_grad():
        alone = {}
        for name in ("alora", "plain"):
            lora.set_adapter(name)
            alone[name] = fast(IDS).logits
        with lora.disable_adapter():
            alone[None] = fast(IDS).logits
        lora.set_adapter(rows)
        mixed = fast(IDS).logits
        assert_close(alone["alora"], peft_model(input_ids=IDS).logits)
    for i, name in enumerate(rows):
        assert_close(mixed[i], alone[name][i], f"row {i} ({name})")
    # Row 0's invocation is mid-sequence: its tokens before it are the base model's, after it adapted.
    assert (alone["alora"][0] - alone[None][0]).abs().amax(-1)[4:].min() > 1e-3
    assert_close(alone["alora"][0, :3], alone[None][0, :3])

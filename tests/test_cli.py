"""`python -m lora_fx bake`: merged transformers checkpoints and AOTInductor packages, and every
bad input refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, token_input

from lora_fx.cli import main


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    """A saved tiny Llama and a PEFT-saved adapter for it (random A and B), plus PEFT's output."""
    import peft

    root = tmp_path_factory.mktemp("bake")
    base = tiny_llama()
    base.save_pretrained(root / "model")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={"down_proj": 2}))
    peft_model.save_pretrained(root / "adapter")
    ids = token_input()
    with torch.no_grad():
        expected = peft_model(ids).logits
        base_out = base(ids).logits
    assert (expected - base_out).abs().max() > 1e-2  # the adapter changes the output
    return root, ids, expected


def _run(*args):
    return main(["bake", "--quiet", *map(str, args)])


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def test_bake_a_merged_transformers_checkpoint(model_and_adapter, tmp_path):
    from transformers import LlamaForCausalLM

    root, ids, expected = model_and_adapter
    out = tmp_path / "merged"
    assert _run("--model", root / "model", "--adapter", root / "adapter", "--out", out) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not any("lora" in k for k in merged.state_dict())
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(out / "model.safetensors")), "adapters written into the merged file"
    assert _leftovers(tmp_path) == []


def test_bake_from_a_config_builds_a_random_model(model_and_adapter, tmp_path):
    root, _, _ = model_and_adapter
    config = json.loads((root / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    assert _run("--model-config", tmp_path / "config.json", "--adapter", root / "adapter", "--out", out,
                "--dtype", "bfloat16") == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_bake_aoti_packages_run_in_a_fresh_process(model_and_adapter, tmp_path):
    root, ids, expected = model_and_adapter
    for name, extra in [("merged.pt2", []), ("unmerged.pt2", ["--unmerged"])]:
        assert _run("--model", root / "model", "--adapter", root / "adapter", "--format", "aoti",
                    "--out", tmp_path / name, *extra) == 0
    torch.save(ids, tmp_path / "ids.pt")
    longer = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    torch.save(longer, tmp_path / "longer.pt")
    code = (
        "import sys, torch\n"
        "d = sys.argv[1]\n"
        "for name in ('merged', 'unmerged'):\n"
        "    run = torch._inductor.aoti_load_package(f'{d}/{name}.pt2')\n"
        "    for inp in ('ids', 'longer'):\n"
        "        torch.save(run(torch.load(f'{d}/{inp}.pt')), f'{d}/{name}_{inp}_out.pt')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import peft
    from transformers import LlamaForCausalLM

    reference = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "model"), root / "adapter")
    with torch.no_grad():
        longer_expected = reference.eval()(longer).logits
    tol = 1e-5 * expected.abs().max().item()
    for name in ("merged", "unmerged"):
        torch.testing.assert_close(torch.load(tmp_path / f"{name}_ids_out.pt"), expected, rtol=1e-5, atol=tol)
        # exported with dynamic batch and sequence length: another shape runs too
        torch.testing.assert_close(torch.load(tmp_path / f"{name}_longer_out.pt"), longer_expected,
                                   rtol=1e-5, atol=tol)


def test_bake_aoti_package_of_named_adapters(model_and_adapter, tmp_path):
    """`--adapter a=DIR --adapter b=DIR`: one unmerged package, `adapter_index` choosing per row."""
    root, ids, expected = model_and_adapter
    out = tmp_path / "named.pt2"
    assert _run("--model", root / "model", "--adapter", f"a={root / 'adapter'}", "--adapter",
                f"b={root / 'adapter'}", "--format", "aoti", "--unmerged", "--out", out, "--static", "--seq-len",
                ids.shape[1], "--batch", ids.shape[0]) == 0
    run = torch._inductor.aoti_load_package(str(out))
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        base_out = LlamaForCausalLM.from_pretrained(root / "model").eval()(ids).logits
        got = run(ids, adapter_index=torch.tensor([1, -1]))
    tol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=tol)
    torch.testing.assert_close(got[1], base_out[1], rtol=1e-5, atol=tol)


def test_named_adapter_arguments_are_checked(model_and_adapter, tmp_path, capsys):
    root, _, _ = model_and_adapter
    adapter = root / "adapter"
    common = ("--model", root / "model", "--out", tmp_path / "m.pt2", "--format", "aoti")
    assert "use --format aoti --unmerged" in _bad(capsys, *common, "--adapter", f"a={adapter}", "--adapter",
                                                  f"b={adapter}")
    assert "give each as name=dir" in _bad(capsys, *common, "--unmerged", "--adapter", adapter, "--adapter",
                                           f"b={adapter}")
    assert "'a' is given twice" in _bad(capsys, *common, "--unmerged", "--adapter", f"a={adapter}", "--adapter",
                                        f"a={adapter}")
    assert "'/nope' is not a directory" in _bad(capsys, *common, "--unmerged", "--adapter", f"a={adapter}",
                                                "--adapter", "b=/nope")
    assert _leftovers(tmp_path) == []


def test_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "lora_fx", "bake", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--adapter" in proc.stdout


# -- bad input ---------------------------------------------------------------------------------

def _bad(capsys, *args):
    assert _run(*args) == 2
    return capsys.readouterr().err


def test_missing_or_wrong_paths_are_named(model_and_adapter, tmp_path, capsys):
    root, _, _ = model_and_adapter
    out = tmp_path / "out"
    adapter = root / "adapter"
    assert "'/nope' is not a directory" in _bad(capsys, "--model", "/nope", "--adapter", adapter, "--out", out)
    assert "has no config.json" in _bad(capsys, "--model", tmp_path, "--adapter", adapter, "--out", out)
    assert "--model-config '/nope.json' does not exist" in _bad(
        capsys, "--model-config", "/nope.json", "--adapter", adapter, "--out", out)
    assert "--adapter '/nope' is not a directory" in _bad(
        capsys, "--model", root / "model", "--adapter", "/nope", "--out", out)
    assert "adapter_config.json" in _bad(capsys, "--model", root / "model", "--adapter", tmp_path, "--out", out)
    assert "does not exist" in _bad(capsys, "--model", root / "model", "--adapter", adapter,
                                    "--out", tmp_path / "no" / "such" / "dir")
    assert ".pt2" in _bad(capsys, "--model", root / "model", "--adapter", adapter, "--format", "aoti", "--out", out)
    assert "--unmerged only applies" in _bad(capsys, "--model", root / "model", "--adapter", adapter,
                                             "--unmerged", "--out", out)
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"hidden_size": 8}))
    assert "not a transformers config" in _bad(capsys, "--model-config", bad_config, "--adapter", adapter,
                                               "--out", out)
    assert not out.exists()


def test_existing_output_needs_overwrite(model_and_adapter, tmp_path, capsys):
    root, _, _ = model_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists; pass --overwrite" in _bad(capsys, "--model", root / "model", "--adapter", root / "adapter",
                                              "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    assert _run("--model", root / "model", "--adapter", root / "adapter", "--out", out, "--overwrite") == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert _leftovers(tmp_path) == []


def test_mismatched_adapters_are_refused_naming_the_culprit(model_and_adapter, tmp_path, capsys):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    root, _, _ = model_and_adapter
    # An adapter for modules this model does not have.
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "renamed")
    cfg = json.loads((tmp_path / "renamed" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value"]
    (tmp_path / "renamed" / "adapter_config.json").write_text(json.dumps(cfg))
    err = _bad(capsys, "--model", root / "model", "--adapter", tmp_path / "renamed", "--out", tmp_path / "o1")
    assert "query_key_value" in err
    # An adapter made for a wider model: same names, other shapes.
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    err = _bad(capsys, "--model", root / "model", "--adapter", tmp_path / "wide", "--out", tmp_path / "o2")
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in err and "shape" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert _leftovers(tmp_path) == []


def test_safe_merge_failure_leaves_nothing(model_and_adapter, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _, _ = model_and_adapter
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    out = tmp_path / "merged"
    err = _bad(capsys, "--model", root / "model", "--adapter", tmp_path / "adapter", "--out", out, "--safe-merge")
    assert "model.layers.1.self_attn.v_proj" in err and "NaN/inf" in err
    assert not out.exists() and _leftovers(tmp_path) == []

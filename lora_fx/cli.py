"""`python -m lora_fx bake`: a base model + a PEFT adapter -> a deployable artifact.

    python -m lora_fx bake --model ./llama --adapter ./adapter --out ./llama-merged
    python -m lora_fx bake --model ./llama --adapter ./adapter --format aoti --out model.pt2 --batch 1 --seq-len 128
    python -m lora_fx bake --model-config config.json --adapter ./adapter --out ./merged   # random base (tests)
    python -m lora_fx bake --model ./llama --adapter a=./ad_a --adapter b=./ad_b --format aoti --unmerged --out m.pt2

`--format hf` (default) writes a transformers checkpoint (safetensors) with the adapter merged
into the weights; `from_pretrained` loads it like any model. `--format aoti` exports the model
(input_ids -> logits), injects the adapter, merges it (or not, with `--unmerged`) and packages
it with AOTInductor; `torch._inductor.aoti_load_package(path)(input_ids)` runs it in any
process. Several `--adapter name=dir` (`--format aoti --unmerged`) package one program serving all
of them: it takes `adapter_index` (int64 per row: the adapter's position in the order given, -1
for the base model) after `input_ids`, and the adapter tensors stay constants that
`runner.load_constants(lora_fx.adapter_state(program))` replaces (docs/many_adapters.md).
Output is written next to its final place and renamed into it at the end: a failure
leaves nothing behind, and an existing output is only replaced with `--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

import torch

from .errors import AdapterFileError, ConfigError, LoraFxError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BakeError(LoraFxError):
    """A bad path or option given to `bake`."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_fx", description="lora_fx command-line tools")
    sub = p.add_subparsers(dest="command", required=True)
    bake = sub.add_parser("bake", help="merge a PEFT adapter into a model: a transformers checkpoint or an "
                          "AOTInductor package", description=__doc__.split("\n\n")[2],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    src = bake.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local transformers model directory (config.json + weights)")
    src.add_argument("--model-config", help="a transformers config.json: a randomly initialised model (--seed)")
    bake.add_argument("--adapter", required=True, action="append",
                      help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors); repeat as "
                      "name=dir for a program of named adapters (--format aoti --unmerged)")
    bake.add_argument("--out", required=True, help="output directory (hf) or .pt2 file (aoti)")
    bake.add_argument("--format", choices=["hf", "aoti"], default="hf")
    bake.add_argument("--unmerged", action="store_true", help="aoti only: package the adapter program unmerged")
    bake.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the model (default: as stored)")
    bake.add_argument("--batch", type=int, default=2, help="aoti: example batch size (dynamic unless --static; "
                      "an example size of 1 makes that dimension static)")
    bake.add_argument("--seq-len", type=int, default=16, help="aoti: example sequence length (as --batch)")
    bake.add_argument("--static", action="store_true", help="aoti: only the example's batch and sequence length")
    bake.add_argument("--safe-merge", action="store_true", help="refuse merged weights with NaN/inf")
    bake.add_argument("--seed", type=int, default=0, help="--model-config: seed of the random weights")
    bake.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    bake.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "bake":
            out = bake(args)
            print(f"wrote {out}")
        return 0
    except (LoraFxError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# -- bake --------------------------------------------------------------------------------------

def _check_args(args) -> None:
    if args.model is not None:
        if not os.path.isdir(args.model):
            raise BakeError(f"--model {args.model!r} is not a directory")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise BakeError(f"--model {args.model!r} has no config.json (is it a transformers model directory?)")
    elif not os.path.isfile(args.model_config):
        raise BakeError(f"--model-config {args.model_config!r} does not exist")
    args.named = _named_adapters(args.adapter)
    for path in args.named.values():
        if not os.path.isdir(path):
            raise AdapterFileError(f"--adapter {path!r} is not a directory")
    if len(args.adapter) > 1 and not (args.format == "aoti" and args.unmerged):
        raise BakeError(f"{len(args.adapter)} adapters make one program of named adapters, which runs them unmerged: "
                        "use --format aoti --unmerged (or bake one adapter)")
    if args.unmerged and args.format != "aoti":
        raise BakeError("--unmerged only applies to --format aoti (a transformers checkpoint holds merged weights)")
    if os.path.exists(args.out) and not args.overwrite:
        raise BakeError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise BakeError(f"the directory of --out ({parent!r}) does not exist")
    if args.format == "aoti" and not args.out.endswith(".pt2"):
        raise BakeError(f"--format aoti writes a .pt2 package; --out {args.out!r} should end in .pt2")


def _named_adapters(values: list[str]) -> dict[str, str]:
    """`--adapter` values: one directory, or `name=dir` each (names unique)."""
    if len(values) == 1 and ("=" not in values[0] or os.path.isdir(values[0])):
        return {"default": values[0]}
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or os.sep in name:
            raise BakeError(f"--adapter {value!r}: with several adapters give each as name=dir")
        if name in named:
            raise BakeError(f"--adapter: the name {name!r} is given twice")
        named[name] = path
    return named


def _load_model(args):
    import transformers

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.model is not None:
        config = transformers.AutoConfig.from_pretrained(args.model)
    else:
        try:
            with open(args.model_config) as f:
                data = json.load(f)
            config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"--model-config {args.model_config!r} is not a transformers config: {err}") from err
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    cls = cls or transformers.AutoModelForCausalLM
    if args.model is not None:
        model = cls.from_pretrained(args.model, **({"dtype": dtype} if dtype is not None else {}))
    else:
        torch.manual_seed(args.seed)
        model = cls(config) if cls is not transformers.AutoModelForCausalLM else cls.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
    return model.eval()


@contextlib.contextmanager
def _logits_only(model):
    """Make `model(input_ids)` return logits without a KV cache: the graph AOTInductor packages.
    Patched on the instance rather than wrapped, so parameter names keep the model's own
    prefixes (the adapter file's keys are those names)."""
    full = model.forward

    def forward(input_ids):
        return full(input_ids=input_ids, use_cache=False).logits

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


@contextlib.contextmanager
def _staging(out: str, is_dir: bool):
    """A temporary sibling of `out`; renamed into place on success, removed on failure."""
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    target = tmp if is_dir else os.path.join(tmp, os.path.basename(out))
    try:
        yield target
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=parent)
            os.replace(out, os.path.join(old, "x"))
        os.replace(target, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bake(args) -> str:
    """Run `bake` for parsed arguments; return the output path."""
    from tqdm.auto import tqdm

    from . import backend as make_backend
    from .merging import merge
    from .named_programs import aoti_package
    from .program import transform

    _check_args(args)
    steps = ["read adapter", "load model", "merge"] if args.format == "hf" else \
        ["read adapter", "load model", "export", "inject" if args.unmerged else "inject + merge", "AOTInductor"]
    steps.append("write")
    bar = tqdm(total=len(steps), disable=args.quiet, unit="step", file=sys.stderr)

    def step(i):
        bar.set_description(steps[i])
        if i:
            bar.update(1)

    try:
        step(0)
        lora = make_backend(args.named, inner="aot_eager")  # validates the adapter directories
        step(1)
        model = _load_model(args)
        if args.format == "hf":
            step(2)
            lora.parameters(model)   # resolves the targets against the model, loads the weights
            lora.merge(safe_merge=args.safe_merge)
            step(3)
            with _staging(args.out, is_dir=True) as tmp:
                adapters = set(lora.model_state_keys())  # registered in the model, merged into its weights
                model.save_pretrained(tmp, safe_serialization=True,
                                      state_dict={k: v for k, v in model.state_dict().items() if k not in adapters})
        else:
            step(2)
            ids = torch.zeros(args.batch, args.seq_len, dtype=torch.long)
            dynamic = None
            if not args.static:
                dim = torch.export.Dim.AUTO
                dynamic = {"input_ids": {0: dim, 1: dim}}
            with _logits_only(model):
                ep = torch.export.export(model, (ids,), dynamic_shapes=dynamic)
            step(3)
            single = len(args.adapter) == 1 and list(args.named) == ["default"] and args.named["default"] == \
                args.adapter[0]
            program = transform(ep, args.named["default"] if single else args.named)
            if not args.unmerged:
                program = merge(program, safe_merge=args.safe_merge)
            step(4)
            with _staging(args.out, is_dir=False) as tmp:
                aoti_package(program, tmp)
        bar.update(1)
    finally:
        bar.close()
    return args.out

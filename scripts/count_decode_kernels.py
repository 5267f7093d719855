#!/usr/bin/env python
"""Count the kernels one decode step launches, with the engine's Triton kernels off and on.

On a GPU a decode step of a small batch is bound by how many kernels it runs as much as by the bytes
it reads: even replayed from a CUDA graph, each kernel costs a few microseconds. This counts, for one
decode step of the engine (batch ``--batch``, each row a ``--prompt-tokens`` prompt), the aten
operators that compute something (views, allocations and other metadata excluded: each of the others
is at least one kernel on a GPU) and the Triton kernel launches, per step and per decoder layer:

    configuration | aten ops | Triton launches | total | per layer

in two configurations: decode attention over gathered blocks with transformers' RMSNorm modules, and
the decode-attention kernel with fused RMSNorm layers and rotary embeddings. Runs anywhere (on a CPU
the Triton kernels run under the interpreter: set nothing, the script turns it on before triton is
imported).

    python scripts/count_decode_kernels.py                     # medium Qwen2.5-VL-shaped model, CPU
    python scripts/count_decode_kernels.py --family qwen3_vl    # a family's tiny test model
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

# Operators that launch nothing: metadata, allocation, views (OpOverload.is_view covers most views).
NOT_KERNELS = {
    "detach",
    "empty",
    "empty_strided",
    "empty_like",
    "lift_fresh",
    "_local_scalar_dense",
    "scalar_tensor",
}


class KernelCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the computing aten operators run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func.overloadpacket.__name__ not in NOT_KERNELS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counted(kernel: Any, launches_per_call: int, launches: list[int]) -> Any:
    """``kernel`` (a wrapper of Triton launches) counted by the launch, its own torch operations not
    (on a CPU, Triton's interpreter moves data with torch operations a GPU does not run)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        launches.append(launches_per_call)
        with torch.utils._python_dispatch._disable_current_modes():
            return kernel(*args, **kwargs)

    return call


def count_step(engine: Any, triton_launches: list[int]) -> tuple[collections.Counter, int]:
    """Aten operators and Triton launches of one decode forward of the engine's running batch."""
    seqs = engine.scheduler.running
    runner = engine.runner
    args = [torch.tensor(v) for v in ([s.last_token for s in seqs], [s.num_tokens - 1 for s in seqs])]
    rope = torch.tensor([s.next_position for s in seqs])
    kv_len = max(s.num_tokens for s in seqs)
    triton_launches.clear()
    counter = KernelCount()
    with torch.inference_mode(), counter:
        runner._decode_forward(*args, rope, kv_len)
    return counter.ops, sum(triton_launches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", default=None, help="a family's tiny test model instead of the medium model"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=12, help="operators listed per configuration")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

    from bench_engine import load_decoder, synthetic_prompt

    from tritonvlm.engine import (
        EngineConfig,
        LLMEngine,
        SamplingParams,
        fused_norm,
        fused_rotary,
        paged_attention,
    )
    from tritonvlm.families import get_family

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.family:
            family_cls = get_family(args.family)
            family_cls.build_test_model(str(Path(tmp) / "model"))
            model = family_cls.load_model(str(Path(tmp) / "model"), device=str(device), dtype=dtype)
            family, tokenizer = (
                family_cls(model.config),
                family_cls.load_processor(str(Path(tmp) / "model")).tokenizer,
            )
            name = f"{args.family} tiny test model"
        else:
            model, family, tokenizer = load_decoder("medium", Path(tmp), device, dtype)
            name = "medium Qwen2.5-VL-shaped model"
        layers = model.config.get_text_config().num_hidden_layers

        launches: list[int] = []
        paged_attention.paged_decode_attention = counted(paged_attention.paged_decode_attention, 2, launches)
        fused_norm.rms_norm = counted(fused_norm.rms_norm, 1, launches)
        fused_rotary.rotary = counted(fused_rotary.rotary, 1, launches)
        rows = []
        for label, kernels in (("gathered blocks, transformers' RMSNorm", False), ("Triton kernels", True)):
            config = EngineConfig(
                max_model_len=args.prompt_tokens + 16,
                max_num_seqs=args.batch,
                prefix_cache_slots=0,
                decode_attention="triton" if kernels else "gather",
                fused_ops="true" if kernels else "false",
            )
            engine = LLMEngine(model, tokenizer, config, family)
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            for i in range(args.batch):
                prompt = synthetic_prompt(model, args.prompt_tokens - i)  # mixed lengths
                engine.add_request(str(i), prompt, params, lambda out: None)
            engine.step()  # prefill and a first decode step
            ops, triton = count_step(engine, launches)
            rows.append((label, ops, triton))
            engine.shutdown()
        fused_norm.restore(family.language_model(model))
        fused_rotary.restore()
        paged_attention.uninstall(family.language_model(model))

    print(f"\none decode step of {args.batch} rows, {name} ({layers} layers), {dtype}, on {device}")
    print("| configuration | aten ops | Triton launches | total | per layer |")
    print("|---|---:|---:|---:|---:|")
    for label, ops, triton in rows:
        total = sum(ops.values()) + triton
        print(f"| {label} | {sum(ops.values())} | {triton} | {total} | {total / layers:.1f} |")
    for label, ops, _ in rows:
        listed = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
        print(f"\n{label}: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

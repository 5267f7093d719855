#!/usr/bin/env python
"""Benchmark the decoder engine alone (no server) against transformers' ``generate()``.

The model is a synthetic model of a named real shape with random weights built directly on the device
(no download; on a GPU a 7B shape builds in about a second), or the ``medium`` test model on CPU. For
each batch size, every request is started at once (text prompts of ``--prompt-tokens`` tokens, exactly
``--output-tokens`` tokens each, greedy) and the script prints one table:

    batch | engine out tok/s | engine ms/step (decode) | TTFT mean ms | generate() tok/s | ratio | floor tok/s

The floor is the memory-bandwidth bound of a decode step: the bytes of weights one step reads (every
parameter but the input embedding table) over the device's copy bandwidth, measured here with a large
``copy_``; one step cannot be faster than that, so ``floor tok/s = batch / floor step time``. A second
table gives the KV memory of each pass: the most tokens the sequences held at once, the bytes of their
KV blocks then, and what the cache reserves (``--kv-cache-memory`` sets it; by default room for the
batch at its full length).

    python scripts/bench_engine.py                                   # CPU: medium test model, batch 1,4,8,16
    python scripts/bench_engine.py --shape qwen2.5-vl-7b --batches 1,16,64,128,256   # on a GPU
    python scripts/bench_engine.py --skip-generate --json out.json
    python scripts/bench_engine.py --batches 16 --max-model-len 4096 --kv-cache-memory 130MiB --skip-generate
                                    # KV by use: 16 short requests in 4 full-length sequences' memory
    python scripts/bench_engine.py --shape qwen2.5-vl-7b --decode-attention compare --long-prompt-tokens 8000
                                    # GPU: the Triton decode-attention kernel beside the gathered blocks,
                                    # one request of each batch with a long prompt (the others short)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Real shapes (the language model; the vision tower is kept minimal since the engine never runs it).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {
        "family": "qwen2_5_vl",
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
    },
    "qwen2.5-vl-3b": {
        "family": "qwen2_5_vl",
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
    },
}


def log(msg: str) -> None:
    print(f"[bench-engine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every engine-level benchmark shares: device, dtype, threads, workdir, JSON output."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument(
        "--workdir", type=Path, help="where the medium test model is built (default: temporary)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def setup_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, bool]:
    """``(device, dtype, on a GPU)`` from the shared options; sets torch's CPU threads."""
    from tritonvlm.modeling.device import resolve_device

    device, dtype = resolve_device(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    return device, dtype, device.type == "cuda"


def tokenizer_dir(workdir: Path) -> Path:
    """The medium Qwen2.5-VL test model (vocabulary 32,768): its tokenizer serves every shape."""
    from tritonvlm.testmodels.qwen2_5_vl import build_test_model

    target = workdir / "medium"
    if not (target / "config.json").exists():
        build_test_model(target, size="medium")
    return target


def build_model(shape: str, medium_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The model to benchmark: the medium test model from disk, or a named shape built on the device."""
    from transformers import AutoConfig

    from tritonvlm.families import family_for_config

    if shape == "medium":
        family = family_for_config(AutoConfig.from_pretrained(medium_dir))
        return family.load_model(str(medium_dir), device=device, dtype=dtype)
    spec = SHAPES[shape]
    config = AutoConfig.from_pretrained(medium_dir)  # vocabulary and special token ids of the tokenizer
    text = config.text_config
    for key, value in spec["text"].items():
        setattr(text, key, value)
    text.head_dim = text.hidden_size // text.num_attention_heads
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.max_window_layers = text.num_hidden_layers
    config.vision_config.depth = 1
    config.vision_config.out_hidden_size = text.hidden_size
    family = family_for_config(config)
    with torch.device(device):
        model = family.model_class._from_config(config, dtype=dtype)
    return model.eval()


def load_decoder(shape: str, workdir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """``(model stripped for decoding, its family, the medium model's tokenizer)`` of ``shape``."""
    from transformers import AutoTokenizer

    from tritonvlm.families import family_for_config

    medium = tokenizer_dir(workdir)
    tokenizer = AutoTokenizer.from_pretrained(medium)
    log(f"building {shape} on {device} ({dtype})")
    model = build_model(shape, medium, device, dtype)
    family = family_for_config(model.config)
    family.strip_for_decoder(model)
    return model, family, tokenizer


def synthetic_prompt(model: Any, tokens: int) -> list[int]:
    """A fixed prompt of ``tokens`` ordinary token ids of ``model``'s vocabulary."""
    vocab = int(model.config.get_text_config().vocab_size)
    return [(7 + 31 * i) % (vocab - 512) + 256 for i in range(tokens)]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second a large device-to-device copy moves (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_weight_bytes(model: Any, family: Any) -> int:
    """Bytes of weights one decode step reads: the language model and LM head (the input embedding
    table is only gathered from, one row per sequence)."""
    lm = family.language_model(model)
    embed = family.embed_tokens(model)
    head = family.lm_head(model)
    params = {id(p): p for p in list(lm.parameters()) + list(head.parameters())}
    for p in embed.parameters():
        if p is not head.weight:
            params.pop(id(p), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def bench_engine(
    model: Any,
    family: Any,
    tokenizer: Any,
    prompt: list[int],
    batch: int,
    args: Any,
    cuda_graphs: bool = True,
    decode_attention: str = "auto",
    overlap: tuple[str, str] | None = None,
) -> dict:
    """One measured pass of ``batch`` requests started at once, after an identical warm-up pass (which
    also captures the CUDA graphs the measured pass replays). ``overlap``: (async output, async
    scheduling) settings instead of the arguments'."""
    from tritonvlm.engine import EngineConfig, LLMEngine

    prompts = pass_prompts(prompt, batch, args)
    max_len = args.max_model_len or max(map(len, prompts)) + args.output_tokens + 8
    config = EngineConfig(
        max_num_seqs=batch,
        max_model_len=max_len,
        max_prefill_tokens=args.max_prefill_tokens,
        prefix_cache_slots=0,  # identical prompts: the cache would skip the prefill being measured
        cuda_graphs=cuda_graphs,
        kv_cache_memory=args.kv_cache_memory or "",
        decode_attention=decode_attention,
        fused_ops=args.fused_ops,
        async_output=overlap[0] if overlap else args.async_output,
        async_scheduling=overlap[1] if overlap else args.async_scheduling.replace("compare", "auto"),
    )
    engine = LLMEngine(model, tokenizer, config, family)
    engine_pass(engine, prompts, args, "warm")
    result = engine_pass(engine, prompts, args, "run")
    stats = engine.stats
    return {
        **result,
        "max_running": stats.max_decode_batch,
        "kv_peak_tokens": stats.kv_tokens_peak,
        "kv_peak_mib": stats.kv_bytes_peak / 2**20,
        "kv_capacity_mib": stats.kv_bytes_capacity / 2**20,
        "decode_attention": engine.runner.decode_attention,
        "fused_ops": engine.runner.fused_norms + engine.runner.fused_rotary,
        "async_output": engine.async_output,
        "async_scheduling": engine.async_scheduling,
    }


def pass_prompts(prompt: list[int], batch: int, args: Any) -> list[list[int]]:
    """The prompts of one pass: ``batch`` times ``prompt``, the first one ``--long-prompt-tokens`` long
    when given (the same tokens repeated)."""
    prompts = [prompt] * batch
    if args.long_prompt_tokens:
        prompts[0] = (prompt * -(-args.long_prompt_tokens // len(prompt)))[: args.long_prompt_tokens]
    return prompts


def engine_pass(engine: Any, prompts: list[list[int]], args: Any, tag: str) -> dict:
    from tritonvlm.engine import SamplingParams

    batch = len(prompts)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    done: set[str] = set()

    def sink(out: Any) -> None:
        first.setdefault(out.request_id, time.perf_counter())
        if out.finished:
            done.add(out.request_id)

    sync(engine.runner.device)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params, sink)
    decode_start = None
    steps_before = engine.stats.decode_steps
    while len(done) < batch:
        engine.step()
        if decode_start is None and len(first) == batch:
            sync(engine.runner.device)
            decode_start, steps_before = time.perf_counter(), engine.stats.decode_steps
    sync(engine.runner.device)
    end = time.perf_counter()
    steps = engine.stats.decode_steps - steps_before
    return {
        "tok_s": batch * args.output_tokens / (end - start),
        "ms_per_step": 1000 * (end - decode_start) / max(steps, 1) if decode_start else None,
        "ttft_ms": 1000 * sum(t - start for t in first.values()) / len(first),
    }


@torch.inference_mode()
def bench_generate(model: Any, prompt: list[int], batch: int, args: Any) -> float:
    """Output tokens/s of ``model.generate`` on the same batch (identical prompts: no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * batch, device=device)
    kwargs = {"max_new_tokens": args.output_tokens, "min_new_tokens": args.output_tokens, "do_sample": False}
    model.generate(
        input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, do_sample=False
    )
    sync(device)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    return batch * args.output_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default=None, help=f"medium (CPU default) or one of {sorted(SHAPES)}")
    parser.add_argument(
        "--batches", default=None, help="batch sizes (CPU default 1,4,8,16; GPU 1,16,64,128,256)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (CPU 64, GPU 256)")
    parser.add_argument(
        "--output-tokens", type=int, default=None, help="tokens per request (CPU 32, GPU 256)"
    )
    parser.add_argument(
        "--max-prefill-tokens", type=int, default=65536, help="prompt tokens per prefill step"
    )
    add_device_arguments(parser)
    parser.add_argument("--skip-generate", action="store_true", help="do not run transformers generate()")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="engine max_model_len (default: prompt + output + 8)"
    )
    parser.add_argument(
        "--kv-cache-memory",
        default=None,
        help='KV budget of the engine ("8MiB", "0.5"); default: room for the batch at full length',
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=("true", "false", "compare"),
        default="true",
        help="on CUDA: decode from CUDA graphs (true), eagerly (false), or both side by side (compare)",
    )
    parser.add_argument(
        "--decode-attention",
        choices=("auto", "triton", "gather", "compare"),
        default="auto",
        help="the engine's decode attention; compare: the Triton kernel and the gathered blocks side by side",
    )
    parser.add_argument(
        "--fused-ops",
        choices=("auto", "true", "false"),
        default="auto",
        help="the engine's RMSNorm layers and rotary embeddings in one Triton kernel each (auto: CUDA)",
    )
    parser.add_argument(
        "--async-output",
        choices=("auto", "true", "false"),
        default="auto",
        help="make and send a step's text while the next step runs (auto: CUDA)",
    )
    parser.add_argument(
        "--async-scheduling",
        choices=("auto", "true", "false", "compare"),
        default="auto",
        help="launch the next step before the last one's tokens are read back (auto: CUDA); compare: "
        "also without it, and without async output either, side by side",
    )
    parser.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=0,
        help="give the first request of each batch a prompt this long (the others --prompt-tokens)",
    )
    args = parser.parse_args(argv)

    device, dtype, gpu = setup_device(args)
    args.shape = args.shape or ("qwen2.5-vl-7b" if gpu else "medium")
    batches = [int(b) for b in (args.batches or ("1,16,64,128,256" if gpu else "1,4,8,16")).split(",")]
    args.prompt_tokens = args.prompt_tokens or (256 if gpu else 64)
    args.output_tokens = args.output_tokens or (256 if gpu else 32)

    with tempfile.TemporaryDirectory() as tmp:
        model, family, tokenizer = load_decoder(args.shape, args.workdir or Path(tmp), device, dtype)
        prompt = synthetic_prompt(model, args.prompt_tokens)
        weight_bytes = step_weight_bytes(model, family)
        bandwidth = copy_bandwidth(device)
        floor_s = weight_bytes / bandwidth
        log(
            f"weights read per step {weight_bytes / 1e9:.2f} GB; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
            f"floor {1000 * floor_s:.2f} ms/step"
        )
        rows = []
        graphs = gpu and args.cuda_graphs != "false"
        attention = "triton" if args.decode_attention == "compare" else args.decode_attention
        for batch in batches:
            log(f"batch {batch}: engine" + (" (CUDA graphs)" if graphs else ""))
            row: dict[str, Any] = {
                "batch": batch,
                **bench_engine(model, family, tokenizer, prompt, batch, args, graphs, attention),
            }
            if args.decode_attention == "compare":
                log(f"batch {batch}: engine, decode attention over gathered blocks")
                gathered = bench_engine(model, family, tokenizer, prompt, batch, args, graphs, "gather")
                row["gather_tok_s"], row["gather_ms_per_step"] = gathered["tok_s"], gathered["ms_per_step"]
            if args.async_scheduling == "compare":
                for key, overlap in (("output_only", ("true", "false")), ("sync", ("false", "false"))):
                    log(f"batch {batch}: engine, async output {overlap[0]}, async scheduling off")
                    other = bench_engine(
                        model, family, tokenizer, prompt, batch, args, graphs, attention, overlap
                    )
                    row[f"{key}_tok_s"], row[f"{key}_ms_per_step"] = other["tok_s"], other["ms_per_step"]
            if graphs and args.cuda_graphs == "compare":
                log(f"batch {batch}: engine, eager")
                eager = bench_engine(model, family, tokenizer, prompt, batch, args, cuda_graphs=False)
                row["eager_tok_s"], row["eager_ms_per_step"] = eager["tok_s"], eager["ms_per_step"]
            if not args.skip_generate and not args.long_prompt_tokens:  # generate(): same-length rows
                log(f"batch {batch}: generate()")
                row["generate_tok_s"] = bench_generate(model, prompt, batch, args)
            row["floor_tok_s"] = batch / floor_s
            rows.append(row)
            shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
            log(f"batch {batch}: {json.dumps(shown)}")

    long = f" (the first {args.long_prompt_tokens})" if args.long_prompt_tokens else ""
    print(
        f"\nengine alone: {args.shape} on {device} ({dtype}), prompt {args.prompt_tokens} tokens{long}, "
        f"{args.output_tokens} output tokens, all requests started at once; decode attention: "
        f"{rows[0]['decode_attention'] if rows else '-'}; fused ops: "
        f"{'on' if rows and rows[0]['fused_ops'] else 'off'}; async output: "
        f"{'on' if rows and rows[0]['async_output'] else 'off'}; async scheduling: "
        f"{'on' if rows and rows[0]['async_scheduling'] else 'off'}"
    )
    columns = ["batch", "engine tok/s", "ms/step", "TTFT ms", "generate() tok/s", "engine/generate"]
    compare = any("eager_tok_s" in row for row in rows)
    gather = any("gather_tok_s" in row for row in rows)
    overlaps = any("sync_tok_s" in row for row in rows)
    if compare:
        columns += ["eager tok/s", "eager ms/step"]
    if gather:
        columns += ["gather tok/s", "gather ms/step"]
    if overlaps:
        columns += ["async output only ms/step", "neither ms/step"]
    columns += ["floor tok/s", "step/floor"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        gen = row.get("generate_tok_s")
        ratio = f"{row['tok_s'] / gen:.2f}x" if gen else "-"
        step = row["ms_per_step"]
        cells = [
            f"{row['batch']}",
            f"{row['tok_s']:,.1f}",
            f"{step:.2f}",
            f"{row['ttft_ms']:.1f}",
            f"{gen:,.1f}" if gen else "-",
            ratio,
        ]
        if compare:
            cells += [f"{row.get('eager_tok_s', 0):,.1f}", f"{row.get('eager_ms_per_step', 0):.2f}"]
        if gather:
            cells += [f"{row.get('gather_tok_s', 0):,.1f}", f"{row.get('gather_ms_per_step', 0):.2f}"]
        if overlaps:
            cells += [f"{row.get('output_only_ms_per_step', 0):.2f}", f"{row.get('sync_ms_per_step', 0):.2f}"]
        cells += [f"{row['floor_tok_s']:,.0f}", f"{step / (1000 * floor_s):.1f}x"]
        print("| " + " | ".join(cells) + " |")
    print("\n| batch | sequences at once | KV peak tokens | KV peak MiB (blocks held) | KV capacity MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['batch']} | {row['max_running']} | {row['kv_peak_tokens']:,} | "
            f"{row['kv_peak_mib']:,.1f} | {row['kv_capacity_mib']:,.1f} |"
        )
    if args.json:
        info = {"shape": args.shape, "device": str(device), "dtype": str(dtype), "floor_ms": 1000 * floor_s}
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The engine's host work per decode step at large batches, and how much of it the device waits for.

On a GPU a decode step's forward is one CUDA-graph replay and sampling a few kernels; what the host
does around them (recording each row's token, growing its KV blocks, preparing the next step's inputs,
detokenizing, streaming, the gauges) is Python per row. Whatever of it happens between the end of one
step on the device and the launch of the next, the device waits for. This script measures that on any
machine: the tiny Qwen2.5-VL test model's engine runs ``--batches`` requests at once with the device
simulated: a launched step "runs" for ``--device-ms`` after the step before it (a forward that returns
zero logits at once), and reading its tokens back (the sampler, which picks fixed tokens) waits until
it is done. So a step takes ``--device-ms`` plus the host work the device waits for:

- off: all of it (the text of a step's tokens is made, and the next step prepared, after it ends);
- async output: recording the tokens, growing the KV blocks, preparing the next step (the text and
  the gauges are made while the device computes the next step);
- async scheduling (the engine's default on CUDA): none while the host's work per step is less than a
  device step (the next step is launched before the tokens of the one running are read back).

Per batch and setting, the host's work per step (with no device time) and the step time with
``--device-ms``, in one table. ``--constrained N`` makes N rows of each batch constrained (a regular
expression): their grammar masks are the real ones (computed on the host before their step's sampling,
with the tiny model's small vocabulary), and the stub's tokens for them the grammar's choice:

    .venv/bin/python scripts/bench_host_overhead.py
    .venv/bin/python scripts/bench_host_overhead.py --batches 256 --steps 200 --device-ms 2
    .venv/bin/python scripts/bench_host_overhead.py --batches 256 --constrained 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SETTINGS = {  # (async output, async scheduling)
    "off": ("false", "false"),
    "async output": ("true", "false"),
    "async scheduling": ("true", "true"),
}


class SimulatedDevice:
    """A device that runs each launched step for ``step_s`` seconds after the one before; waiting for a
    step spins until its end (sleep is too coarse for fractions of a millisecond)."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.free_at = 0.0  # when the last launched step ends

    def launch(self) -> float:
        self.free_at = max(time.perf_counter(), self.free_at) + self.step_s
        return self.free_at

    @staticmethod
    def wait(until: float) -> None:
        while time.perf_counter() < until:
            pass


CONSTRAINT = {"type": "regex", "pattern": "[a-z ]+"}


def measure(
    model_dir: Path, batch: int, steps: int, setting: str, device_ms: float, constrained: int = 0
) -> float:
    """Milliseconds per decode step of ``batch`` rows (``constrained`` of them with a grammar) with the
    simulated device and ``setting``."""
    import tritonvlm.engine.llm_engine as llm_engine
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.engine.device_sampling import DeviceSample
    from tritonvlm.engine.guided import mask_logits

    async_output, async_scheduling = SETTINGS[setting]
    config = EngineConfig(
        max_num_seqs=batch,
        max_model_len=steps + 64,
        prefix_cache_slots=0,
        cuda_graphs=False,
        async_output=async_output,
        async_scheduling=async_scheduling,
    )
    engine = LLMEngine.from_pretrained(str(model_dir), config, device="cpu", dtype="float32")
    done: set[str] = set()
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, guided=CONSTRAINT)
    prompt = [(7 + 31 * i) % 1500 + 300 for i in range(16)]
    for i in range(batch):
        engine.add_request(
            str(i),
            prompt,
            guided if i < constrained else params,
            lambda out: out.finished and done.add(out.request_id),
        )
    engine.step()  # the prefill (and a first decode step) with the real model
    device = SimulatedDevice(device_ms / 1000)
    zeros = torch.zeros(batch, engine.vocab_size)
    fixed = torch.tensor([(7 * i) % 1500 + 300 for i in range(batch)])
    # A constrained row takes its fixed token where its grammar allows it, else the first token it
    # allows that is not a stop token.
    preferred = torch.zeros(batch, engine.vocab_size)
    preferred[torch.arange(batch), fixed] = 1.0
    preferred[:, sorted(engine.stop_ids)] = -1.0

    def pick(seqs: list) -> torch.Tensor:
        tokens = fixed[: len(seqs)].clone()
        guides = [None if seq.closed else seq.guide for seq in seqs]
        rows = [i for i, guide in enumerate(guides) if guide is not None]
        if rows:
            masked = mask_logits(preferred[rows], [guides[i] for i in rows])
            tokens[rows] = masked.argmax(dim=-1)
        return tokens

    ends: list[float] = []  # the end of the last launched step

    def forward(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ends.append(device.launch())
        return zeros[: tokens.shape[0]]

    def sample(logits: torch.Tensor, seqs: list, failures: Any = None) -> list[int]:
        device.wait(ends[-1])
        return pick(seqs).tolist()

    class Sample(DeviceSample):
        def result(self) -> tuple[list[int], dict[int, str]]:
            device.wait(self.end)
            return super().result()

    def sample_on_device(logits: torch.Tensor, seqs: list, previous: Any = None) -> DeviceSample:
        tokens = pick(seqs)
        out = Sample(tokens, torch.stack([tokens, torch.zeros_like(tokens)]), None)
        out.end = ends[-1]
        return out

    engine.runner._decode_forward = forward
    real = llm_engine.sample, llm_engine.sample_on_device
    llm_engine.sample, llm_engine.sample_on_device = sample, sample_on_device
    try:
        start, first = time.perf_counter(), engine.stats.decode_steps
        while len(done) < batch:
            engine.step()
        elapsed = time.perf_counter() - start
    finally:
        llm_engine.sample, llm_engine.sample_on_device = real
    return 1000 * elapsed / (engine.stats.decode_steps - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="64,128,256", help="rows per step (default 64,128,256)")
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per batch (default 100)")
    parser.add_argument(
        "--device-ms", type=float, default=3.0, help="the simulated device's time per step (default 3)"
    )
    parser.add_argument(
        "--constrained", type=int, default=0, help="rows of each batch with a grammar (default 0)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from tritonvlm.testmodels.qwen2_5_vl import build_test_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        build_test_model(model_dir, size="tiny")
        for batch in (int(b) for b in args.batches.split(",")):
            for setting in SETTINGS:
                host = measure(model_dir, batch, args.steps, setting, 0.0, args.constrained)
                step = measure(model_dir, batch, args.steps, setting, args.device_ms, args.constrained)
                rows.append((batch, setting, host, step))
                print(
                    f"[host-overhead] batch {batch}, {setting}: host {host:.3f} ms/step, "
                    f"{step:.3f} ms/step with {args.device_ms} ms of device time",
                    file=sys.stderr,
                )
    print(
        f"\nhost work per decode step, and the step with a simulated device taking {args.device_ms} ms "
        f"(forward and sampling replaced by stubs; constrained rows a batch: {args.constrained}; "
        "CPU threads: 1)"
    )
    print("| batch | overlap | host ms/step | ms/step with the device | device waits ms/step | µs/row |")
    print("|---|---|---|---|---|---|")
    for batch, setting, host, step in rows:
        waits = max(0.0, step - args.device_ms)
        print(f"| {batch} | {setting} | {host:.2f} | {step:.2f} | {waits:.2f} | {1000 * waits / batch:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``tritonvlm run-batch`` subcommand: its flags (serve's model, Triton and media flags, shared) and
its main function."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger("tritonvlm.batch")

# serve's flags that make no sense offline (no HTTP server) or belong to the server's Batch API.
_SERVE_ONLY = frozenset(
    {
        "help",
        "host",
        "port",
        "api_key",
        "shutdown_timeout",
        "batch_state_dir",
        "batch_concurrency",
        "batch_busy_concurrency",
    }
)
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def add_serve_batch_flags(serve: argparse.ArgumentParser) -> None:
    """``serve``'s Batch API flags."""
    group = serve.add_argument_group("Batch API (/v1/files, /v1/batches)")
    group.add_argument(
        "--batch-state-dir",
        type=Path,
        metavar="DIR",
        help="where the Batch API keeps its SQLite database and files; batches accepted there survive a "
        "restart and resume (default: <--state-dir>/batches; one server per folder)",
    )
    group.add_argument(
        "--batch-concurrency",
        type=int,
        metavar="N",
        help="batch requests in flight while no interactive request is (default: --max-num-seqs, 16)",
    )
    group.add_argument(
        "--batch-busy-concurrency",
        type=int,
        default=1,
        metavar="N",
        help="batch requests in flight while interactive (completion) requests are, and for 1 s after the "
        "last one; the batch requests above it are cancelled and requeued (default 1; 0 pauses batches)",
    )


def add_run_batch_parser(sub: argparse._SubParsersAction, serve: argparse.ArgumentParser) -> None:
    """Add ``run-batch`` to the subcommands; it takes ``serve``'s Triton, model and media flags."""
    parser = sub.add_parser(
        "run-batch",
        help="run an OpenAI Batch file (JSONL) offline through the same Triton pipeline",
        description="Run every request of an OpenAI Batch input file (one {custom_id, method, url, body} "
        "per line; url /v1/chat/completions or /v1/completions) through the frontend's request path and "
        "Triton, and append one OpenAI Batch output record per request to the output file. Starts its "
        "own tritonserver (same model flags as serve) unless --triton-url is given. Run again with the "
        "same files after an interruption, it resumes: requests already in the output are not redone.",
    )
    batch = parser.add_argument_group("batch")
    batch.add_argument(
        "-i", "--input-file", type=Path, required=True, metavar="FILE", help="requests (JSONL)"
    )
    batch.add_argument(
        "-o",
        "--output-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="results (JSONL), appended to; an existing file's results are kept and not redone",
    )
    batch.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="requests in flight (default: 2 x --max-num-seqs; with the engine's default 512 on CUDA, "
        "32 on CPU)",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is printed)")
    batch.add_argument(
        "--unavailable-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for an unreachable or restarting Triton before stopping (the run can be "
        "resumed; default 120)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group in serve._action_groups:
        for action in group._group_actions:
            if action.dest in _SERVE_ONLY:
                continue
            title = group.title or ""
            if title not in groups:
                groups[title] = parser.add_argument_group(group.title, group.description)
            groups[title]._add_action(action)  # shared with serve, as argparse's parents= does


def _silence_per_request_logs(level: str) -> None:
    """One line per request (and a warning per failed one) would drown the progress bar: the output
    file has them all. Kept at DEBUG."""
    if level.upper() != "DEBUG":
        logging.getLogger("tritonvlm.frontend").setLevel(logging.ERROR)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_batch_command(args: argparse.Namespace) -> int:
    """``tritonvlm run-batch``: returns the exit status (0 done, 2 unusable files, 3 Triton unavailable,
    130 interrupted)."""
    from tritonvlm.batch.inprocess import BackendUnavailable
    from tritonvlm.batch.launch import TritonOptions, default_max_num_seqs, resolve_model, start_triton
    from tritonvlm.batch.run_batch import BatchFileError, prepare
    from tritonvlm.cli import DEFAULT_MODEL_NAME, TRITON_LAUNCH_FLAGS, _frontend_settings

    _silence_per_request_logs(args.log_level)
    # SIGTERM takes the Ctrl-C path (Triton stopped, output closed); during the run, _run cancels instead.
    signal.signal(signal.SIGTERM, _interrupt)
    input_path, output_path = args.input_file, args.output_file
    try:
        stats, done_keys = prepare(input_path, output_path)
    except BatchFileError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    concurrency = args.concurrency or 2 * (args.max_num_seqs or default_max_num_seqs(args.device))
    if concurrency < 1:
        log.error("--concurrency must be at least 1")
        return EXIT_BAD_INPUT
    if stats.done == stats.total:
        print(f"run-batch: all {stats.total} requests are already in {output_path}", file=sys.stderr)
        return 0

    triton = None
    if args.triton_url:
        ignored = [
            f"--{n.replace('_', '-')}" for n in TRITON_LAUNCH_FLAGS if getattr(args, n, None) is not None
        ]
        if ignored:
            log.warning("ignored with --triton-url: %s", " ".join(ignored))
        grpc_url = args.triton_url
        served_name = args.served_model_name or (args.model or DEFAULT_MODEL_NAME)
    else:
        model, served_name = resolve_model(args.model, args.served_model_name)
        options = TritonOptions(model=model, log_level=args.log_level)
        for key in vars(options):
            if key not in ("model", "log_level") and getattr(args, key, None) is not None:
                setattr(options, key, getattr(args, key))
        try:
            triton = start_triton(options)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - reported, not a traceback
            log.error("tritonserver failed to start: %s", exc)
            return 1
        grpc_url = triton.grpc_url
    args.api_key = None
    settings = _frontend_settings(args, grpc_url, served_name)
    try:
        return asyncio.run(_run(args, settings, stats, done_keys, concurrency))
    except KeyboardInterrupt:
        print(
            f"\nrun-batch: interrupted; run the same command again to resume ({output_path})", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except BackendUnavailable as exc:
        log.error("%s: stopped; run the same command again to resume", exc)
        return EXIT_UNAVAILABLE
    finally:
        if triton is not None:
            triton.stop()


async def _run(args, settings, stats, done_keys, concurrency: int) -> int:  # type: ignore[no-untyped-def]
    from tritonvlm.batch.launch import open_api
    from tritonvlm.batch.run_batch import run_batch_file, wait_ready

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    async with open_api(settings) as api:
        await wait_ready(api, args.unavailable_timeout)
        try:
            await run_batch_file(
                api,
                args.input_file,
                args.output_file,
                concurrency=concurrency,
                progress=not args.no_progress,
                unavailable_timeout_s=args.unavailable_timeout,
                stats=stats,
                done_keys=done_keys,
            )
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
    print("run-batch: " + stats.summary().replace("\n", "\nrun-batch: "), file=sys.stderr)
    print(f"run-batch: results in {args.output_file}", file=sys.stderr)
    return 0

"""Training plumbing shared by the method files: argument parsing with toy overrides, distributed setup
(on iff RANK is set: nccl on CUDA, gloo on CPU), seeding, the metrics JSONL, HF-dir checkpoints.
No losses or algorithms live here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the script's docstring kept as written."""


def parse_args(args_cls, toy_overrides: dict | None = None, argv=None):
    """Parse `args_cls` (a dataclass whose fields carry metadata["help"]) with HfArgumentParser.
    When the user leaves `model` empty the toy world is used, and `toy_overrides` replace the paper
    defaults of every field the user did not set on the command line."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = ("with --model empty (the toy world) these replace the defaults above: " +
              ", ".join(f"{k}={v!r}" for k, v in (toy_overrides or {}).items())) if toy_overrides else None
    parser = HfArgumentParser(args_cls, description=sys.modules["__main__"].__doc__, epilog=epilog,
                              formatter_class=_HelpFormatter)
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + (
        "--debug (or STEPWISE_DEBUG=1): show the Python traceback of an error instead of its one-line message")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if toy_overrides and not getattr(args, "model", None):
        given = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for k, v in toy_overrides.items():
            if k not in given:
                setattr(args, k, v)
    return args


def run_main(main, args_cls, toy_overrides: dict | None = None, argv=None) -> None:
    """`main(parse_args(...))` for a script's `__main__`. An error the user causes (a bad path, a malformed
    row, a missing verifier dir, a bad setting: OSError or ValueError) prints one line and exits 2, nothing
    written so far is removed; --debug or STEPWISE_DEBUG=1 shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("STEPWISE_DEBUG", "") not in ("", "0")
    args = parse_args(args_cls, toy_overrides, [a for a in argv if a != "--debug"])
    try:
        main(args)
    except (OSError, ValueError) as e:
        if debug:
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"{Path(sys.argv[0]).name}: error: {msg} (--debug for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup_dist() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def gather_lists(dist: Dist, items: list) -> list:
    """Concatenate every rank's list (in rank order) on all ranks."""
    if not dist.on:
        return items
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


class MetricsLog:
    """One flushed JSON object per call in out_dir/metrics.jsonl (rank 0 only); appends on resume."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.t0, self.f = time.time(), None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.f = open(Path(out_dir) / "metrics.jsonl", "a")

    def log(self, step: int, **metrics) -> None:
        if self.f:
            row = {"step": step, "time": round(time.time() - self.t0, 3)}
            row.update({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()})
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, state: dict | None = None) -> Path:
    """An HF dir out_dir/step_000100/ (model + tokenizer + trainer_state.json) that transformers,
    vLLM, search.py and eval.py load directly."""
    path = Path(out_dir) / f"step_{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    steps = sorted(Path(out_dir).glob("step_*/trainer_state.json"))
    return steps[-1].parent if steps else None


def write_json(path: str | Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))

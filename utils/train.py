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
    `--config FILE.yaml` sets any of the fields (as TRL's and search-and-learn's recipes do); flags on the
    command line override it. When the user leaves `model` empty the toy world is used, and
    `toy_overrides` replace the paper defaults of every field neither the command line nor the YAML set.
    Flags are never abbreviated; an unknown or malformed flag raises ValueError naming it."""
    import difflib

    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = ("with --model empty (the toy world) these replace the defaults above: " +
              ", ".join(f"{k}={v!r}" for k, v in (toy_overrides or {}).items())) if toy_overrides else None
    parser = HfArgumentParser(args_cls, description=sys.modules["__main__"].__doc__, epilog=epilog,
                              formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + (
        "--debug (or STEPWISE_DEBUG=1): show the Python traceback of an error instead of its one-line message")
    parser.add_argument("--config", default=None, help="a YAML file of these arguments (e.g. recipes/*.yaml); "
                                                       "flags on the command line override it")
    for a in parser._actions:  # a literal % in a help string ("5%") would break --help
        if a.help and "%(" not in a.help:
            a.help = a.help.replace("%", "%%")

    def error(message):
        raise ValueError(message)
    parser.error = error
    names = [f.name for f in dataclasses.fields(args_cls)]

    def nearest(name: str) -> str:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5) or sorted(
            (n for n in names if n in name or name in n), key=len, reverse=True)[:1]
        return f" (did you mean {close[0]}?)" if close else ""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise ValueError(f"unknown argument {flag}" + nearest(flag.lstrip("-").split("=")[0]).replace("mean ", "mean --"))
    yaml_keys = set()
    if ns.config:
        import yaml
        cfg = yaml.safe_load(Path(ns.config).read_text()) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"--config {ns.config}: not a mapping of argument names to values")
        bad = sorted(set(cfg) - set(names))
        if bad:
            raise ValueError(f"--config {ns.config}: unknown argument {bad[0]!r}" + nearest(bad[0]))
        parser.set_defaults(**cfg)
        yaml_keys = set(cfg)
        ns = parser.parse_args(argv)
    args = args_cls(**{k: getattr(ns, k) for k in names})
    if toy_overrides and not getattr(args, "model", None):
        given = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")} | yaml_keys
        for k, v in toy_overrides.items():
            if k not in given:
                setattr(args, k, v)
    return args


def run_main(main, args_cls, toy_overrides: dict | None = None, argv=None) -> None:
    """`main(parse_args(...))` for a script's `__main__`. An error the user causes (an unknown flag, a bad
    path, a malformed row, a missing verifier dir, a bad setting: OSError or ValueError) prints one line and
    exits 2, nothing written so far is removed; --debug or STEPWISE_DEBUG=1 shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("STEPWISE_DEBUG", "") not in ("", "0")
    try:
        main(parse_args(args_cls, toy_overrides, [a for a in argv if a != "--debug"]))
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
    launched: bool = False  # under torchrun, even with one process

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        """Distributed code paths (DDP / FSDP2, collectives): under torchrun, with one process too."""
        return self.launched or self.world > 1


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
    return Dist(rank, world, local, device, launched=True)


def gather_lists(dist: Dist, items: list) -> list:
    """Concatenate every rank's list (in rank order) on all ranks."""
    if not dist.on:
        return items
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def barrier(dist: Dist | None) -> None:
    """Wait for every rank under torchrun; nothing in one process."""
    if dist is not None and dist.on:
        torch.distributed.barrier()


def close_dist(dist: Dist) -> None:
    """End a torchrun process group: every rank waits for the others first, so that no rank tears down
    its gloo/NCCL connections while another still writes or reads them (a rank that leaves early can
    abort with 'terminate called without an active exception'). Nothing in one process."""
    if dist.on and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank_share(items: list, dist: Dist) -> list:
    """This rank's share of a list (every world-th item from its rank); all of it in one process."""
    return items[dist.rank::dist.world] if dist.on else items


def gather_in_order(values: list, n: int, dist: Dist) -> list:
    """The inverse of rank_share for one value per item of an n-item list: every rank's, gathered on every
    rank, back in the list's order."""
    if not dist.on:
        return values
    order = gather_lists(dist, list(range(n))[dist.rank::dist.world])
    out = [None] * n
    for i, v in zip(order, gather_lists(dist, values)):
        out[i] = v
    return out


def child_group_env(dist: Dist, offset: int) -> dict:
    """The environment for a script that this rank starts as a subprocess so that the children of all ranks
    form a process group of their own (same ranks, MASTER_PORT + offset): torchrun's, one level down."""
    env = dict(os.environ)
    if dist.launched:
        env["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29500")) + offset)
        for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)  # the children rendezvous by MASTER_ADDR / MASTER_PORT, not torchrun's agent
    return env


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


def git_commit() -> str:
    """The repository's HEAD commit ("" outside a git checkout): what a record's figures were made with."""
    import subprocess
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:  # no git on this machine
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def write_json(path: str | Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- RL trainers' plumbing
def token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad: int, device, width: int = 0):
    """log pi(y_t | x, y_<t) of each response token, (B, T) right-padded (T: the longest response, or `width`
    when given), and its mask (B, T)."""
    T = max(1, width or max(len(r) for r in responses))
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)  # (B, L)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
        att[i, : len(p) + len(r)] = 1
    ids, att = ids.to(device), att.to(device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1): log p of token j+1
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    pos = (start[:, None] + torch.arange(T, device=device)[None]).clamp(max=L - 2)  # (B, T)
    mask = (torch.arange(T, device=device)[None] < torch.tensor([len(r) for r in responses], device=device)[:, None])
    return logp.gather(1, pos) * mask, mask.float()


def amp(bf16: bool, device):
    """bfloat16 autocast when asked (fp32 master weights, as the papers' trainers run), on CUDA or on a CPU (where
    bf16 matmuls run natively, e.g. AVX512-BF16: the toy's 3.6M verifier trains 1.2x faster); else a no-op."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16 and kind in ("cuda", "cpu"))


def all_reduce(x: torch.Tensor, op, dist: Dist) -> torch.Tensor:
    """In place across ranks under torchrun; x itself in one process."""
    if dist.on:
        torch.distributed.all_reduce(x, op=op)
    return x


def shard(model, kind: str, dist: Dist, bf16: bool = False, train: bool = True):
    """Under torchrun: DDP (kind "ddp"; a frozen model, train=False, stays as it is), or FSDP2 (kind "fsdp")
    with one shard unit per HF decoder layer (the first `layers` ModuleList inside, so a causal LM or a
    wrapper around one) plus the root, bf16 params and fp32 reductions when bf16. FSDP moves a CPU model's
    shards to the rank's device itself. One process: the model unchanged."""
    if not dist.on:
        return model
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model) if train else model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    layers = next((m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)), [])
    for layer in layers:  # HF decoder layers
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def full_state(model, opt=None, fsdp: bool = False) -> tuple[dict, dict | None]:
    """Whole (unsharded) state dicts of a model and its optimizer; under FSDP a collective every rank calls."""
    if not fsdp:
        return unwrap(model).state_dict(), opt.state_dict() if opt is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets the tensors, the others {}
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o) if opt else None


def load_optimizer(model, opt, state: dict, fsdp: bool = False) -> None:
    """The inverse of full_state for an optimizer (every rank holds the whole state)."""
    if not fsdp:
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))

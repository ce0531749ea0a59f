"""The one-GPU check of every method file: each script runs a few steps on a random-init model and a line per
script says where the time went (generation, scoring forwards, training), the peak memory, tokens/s and, for
training, MFU.

    python tests/gpu_check.py                       # CUDA: a Qwen2.5-0.5B-shaped model in bf16; else tiny on CPU
    python tests/gpu_check.py --shape tiny --only prm_train,search --out_dir runs/gpu_check

The model is Qwen2.5-0.5B's layer stack (24 layers of 896, GQA 14/2 heads, MLP 4864, tied embeddings, its
151,936-token vocabulary) with random weights and the toy's char tokenizer: ids past the tokenizer decode to
nothing, so a random model's samples run to the token limit, which is what a throughput check wants. Prompts are
toy problems. Every script uses the HF backend (vLLM is not on the lent GPU machines) and `--bf16`; prm_train.py
and prime.py run under torchrun with one process, so prm_train.py trains through DDP and prime.py through FSDP2
(utils.train.shard) as on many GPUs. ppm.py trains on synthetic trees (a random policy's MCTS finds no correct
answer, so rstar_mcts.py's own ppm.py run has no pairs).

How the figures are measured, per script process (a probe installed before the script runs):
- generate: wall time of the backends' `sample` calls (a `step` is one) and the tokens they return;
- score: no-grad forwards of any transformers model outside generation and outside a training interval;
- train: from the first grad-enabled forward after an optimizer step to the end of the next optimizer step;
- other: the rest (loading, grading, the sandbox, ppm.py's subprocess inside rstar_mcts.py, evaluation glue).
FLOPs are 2 N per token for a forward and 6 N for a grad-enabled one (forward + backward), N the weights of the
model's Linear layers (attention's sequence-length term left out); MFU is the training interval's FLOPs over
its time and the GPU's dense bf16 peak (--peak_tflops where the name is not in the table). Peak memory is
torch.cuda.max_memory_allocated on CUDA, the process's max RSS on CPU. CUDA is synchronised at each measured
boundary, so the check runs a little slower than the scripts alone.

Writes out_dir/gpu_check.json ({script: figures}) and out_dir/gpu_check.md (the table); exits 1 if a script fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("prm_train", "search", "eval", "prime", "pav", "rstar_mcts", "ppm")
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L4": 121.0, "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0}  # dense bf16 (fp16 on V100)

SHAPES = {  # Qwen2.5-0.5B's config, and a tiny one for CPU (head_dim 32, as vLLM needs)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=0, max_position_embeddings=1024),  # 0: the tokenizer's size
}
SIZES = {  # per shape: generated tokens, problems, steps
    "0.5b": dict(tokens=256, problems=32, steps=4, batch_tokens=32768, max_len=1024),
    "tiny": dict(tokens=16, problems=3, steps=2, batch_tokens=2048, max_len=256),
}


# ----------------------------------------------------------------------------- the probe (inside a script's process)
class Probe:
    """Timers and token counts over one script's process; see the module docstring for what each phase holds."""

    def __init__(self):
        import torch
        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.t0 = time.perf_counter()
        self.s = {"generate": 0.0, "score": 0.0, "train": 0.0}
        self.tokens = {"generate": 0, "score": 0, "train": 0}
        self.flops = {"score": 0.0, "train": 0.0}
        self.steps, self.params = 0, {}
        self.generating = self.depth = 0
        self.train_open = None  # perf_counter when the current training interval began

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def linear_weights(self, model) -> int:
        if id(model) not in self.params:
            self.params[id(model)] = sum(m.weight.numel() for m in model.modules()
                                         if isinstance(m, self.torch.nn.Linear))
        return self.params[id(model)]

    def install(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers import PreTrainedModel

        from utils.generation import Backend
        probe, call, sample = self, torch.nn.Module.__call__, Backend.sample

        def model_call(model, *a, **kw):
            if probe.generating or probe.depth:  # inside generation, or a model inside a counted model
                return call(model, *a, **kw)
            ids = kw.get("input_ids", a[0] if a and isinstance(a[0], torch.Tensor) else None)
            emb = kw.get("inputs_embeds")
            n = ids.numel() if ids is not None else (emb.shape[0] * emb.shape[1] if emb is not None else 0)
            grad = torch.is_grad_enabled()
            if grad and probe.train_open is None:
                probe.train_open = probe.now()
            timed = probe.train_open is None
            t = probe.now() if timed else 0.0
            probe.depth += 1
            try:
                out = call(model, *a, **kw)
            finally:
                probe.depth -= 1
            w = probe.linear_weights(model)
            if timed:
                probe.s["score"] += probe.now() - t
                probe.tokens["score"] += n
                probe.flops["score"] += 2 * w * n
            else:
                probe.tokens["train"] += n if grad else 0
                probe.flops["train"] += (6 if grad else 2) * w * n
            return out

        def backend_sample(backend, *a, **kw):
            t = probe.now()
            probe.generating += 1
            try:
                out = sample(backend, *a, **kw)
            finally:
                probe.generating -= 1
            probe.s["generate"] += probe.now() - t
            probe.tokens["generate"] += sum(len(s.token_ids) for row in out for s in row)
            return out

        def step_done(opt, args, kwargs):
            if probe.train_open is not None:
                probe.s["train"] += probe.now() - probe.train_open
                probe.train_open = None
                probe.steps += 1

        PreTrainedModel.__call__ = model_call
        Backend.sample = backend_sample
        register_optimizer_step_post_hook(step_done)

    def report(self, peak_tflops: float | None) -> dict:
        torch = self.torch
        if self.train_open is not None:  # grad forwards with no step after them (e.g. a loss on held-out data)
            self.s["train"] += self.now() - self.train_open
        wall = time.perf_counter() - self.t0
        rate = lambda k: round(self.tokens[k] / self.s[k], 1) if self.s[k] > 0 else None  # noqa: E731
        mfu = lambda k: (round(self.flops[k] / self.s[k] / (peak_tflops * 1e12), 4)  # noqa: E731
                         if peak_tflops and self.s[k] > 0 else None)
        if self.cuda:
            mem, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
        else:
            mem, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
        return {"wall_s": round(wall, 2), **{f"{k}_s": round(v, 2) for k, v in self.s.items()},
                "other_s": round(wall - sum(self.s.values()), 2),
                **{f"{k}_tokens": v for k, v in self.tokens.items()},
                **{f"{k}_tokens_per_s": rate(k) for k in self.tokens},
                "optimizer_steps": self.steps, "score_mfu": mfu("score"), "train_mfu": mfu("train"),
                "train_flops": self.flops["train"], "score_flops": self.flops["score"], "peak_mem_gib": round(mem, 3), "mem_kind": kind,
                "model_linear_weights": max(self.params.values(), default=0)}


def child(script: str, report_path: str, peak_tflops: float | None, argv: list[str]) -> None:
    """Run ROOT/script.py as __main__ with argv, the probe installed; rank 0 writes the report."""
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    probe = Probe()
    probe.install()
    sys.argv = [str(ROOT / f"{script}.py")] + argv
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if os.environ.get("RANK", "0") == "0":
        Path(report_path).write_text(json.dumps({"rc": code, **probe.report(peak_tflops)}))
    sys.exit(code)


# ----------------------------------------------------------------------------- inputs: a model, problems, labels, trees
def build_model(out: Path, shape: str) -> Path:
    """A random-init Qwen2 dir of `shape` with the toy's char tokenizer (fp32 weights; the scripts cast)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from utils.toy import build_char_tokenizer
    if (out / "config.json").exists():
        return out
    tok = build_char_tokenizer(out)
    cfg = dict(SHAPES[shape])
    cfg["vocab_size"] = cfg["vocab_size"] or len(tok)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=True, initializer_range=0.02, bos_token_id=0,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         rope_theta=1e6, torch_dtype="float32"))
    model.save_pretrained(out)
    return out


def write_inputs(d: Path, n: int) -> dict:
    """Toy problems (train, test), step labels from the toy's checker, and trees with both outcomes for ppm.py."""
    from utils import toy
    from utils.data import write_jsonl
    rng = random.Random(0)
    probs = [toy.make_problem(rng, rng.randint(1, 3)) for _ in range(4 * n + 16)]
    rows = lambda ps: [{"problem": p["problem"], "answer": p["answer"]} for p in ps]  # noqa: E731
    write_jsonl(d / "train.jsonl", rows(probs[: 2 * n + 16]))
    write_jsonl(d / "test.jsonl", rows(probs[2 * n + 16:]))
    labels, trees = [], []
    for p in probs[: 2 * n + 16]:
        steps = toy.solve(p, rng, {"misread": 0.5, "slip": 0.3})
        labels.append({"prompt": p["problem"], "completions": steps,
                       "labels": toy.check_steps(p["problem"], steps, p["answer"]).step_correct})
        good, bad = toy.solve(p, rng), toy.solve(p, rng, {"misread": 1.0})
        nodes = [{"parent": -1, "kind": "root", "correct": None, "Q": 0.0, "N": 2, "text": ""}]
        for steps_, ok in ((good, True), (bad, False)):
            parent = 0
            for j, s in enumerate(steps_):
                last = j == len(steps_) - 1
                nodes.append({"parent": parent, "kind": "answer" if last else "step", "correct": ok if last else None,
                              "Q": 1.0 if ok else -1.0, "N": 1, "text": s + ("" if last else "\n\n")})
                parent = len(nodes) - 1
        trees.append({"problem": p["problem"], "answer": p["answer"], "nodes": nodes})
    write_jsonl(d / "labels.jsonl", labels)
    write_jsonl(d / "trees.jsonl", trees)
    return {k: str(d / f"{k}.jsonl") for k in ("train", "test", "labels", "trees")}


def jobs(model: Path, io: dict, out: Path, size: dict) -> list[tuple[str, bool, list[str]]]:
    """(script, under torchrun with one process, argv) for each method file, a few steps each."""
    T, P, S = str(size["tokens"]), str(size["problems"]), str(size["steps"])
    common = ["--model", str(model), "--bf16", "true"]
    gen = ["--backend", "hf", "--max_new_tokens", T]
    return [
        ("prm_train", True, common + ["--labels", io["labels"], "--out_dir", str(out / "prm_train"), "--max_steps", S,
                                      "--batch_tokens", str(size["batch_tokens"]), "--max_len", str(size["max_len"])]),
        ("search", False, ["--model", str(model), "--data", io["test"], "--n_problems", P, "--verifiers",
                           f"prm={out / 'prm_train' / 'labels'}", "--methods", "maj,bon,weighted,beam", "--ns", "1,4",
                           "--search_ns", "4", "--max_depth", "2", "--out_dir", str(out / "search")] + gen),
        ("eval", False, ["--model", str(model), "--data", io["test"], "--n_problems", P, "--n_samples", "4", "--k", "1,4",
                         "--temperature", "1.0", "--out_dir", str(out / "eval")] + gen),
        ("prime", True, common + ["--data", io["train"], "--eval_data", io["test"], "--n_eval_problems", P, "--steps", S,
                                  "--prompts_per_step", P, "--eval_every", S, "--filter_low", "0", "--filter_high", "1",
                                  "--out_dir", str(out / "prime")] + gen),
        ("pav", False, common + ["--data", io["train"], "--eval_data", io["test"], "--n_problems", P, "--n_cov", "1",
                                 "--mc_rollouts", "4", "--ks", "1,4", "--prover_k", "4", "--epochs", "1",
                                 "--batch_tokens", str(size["batch_tokens"]), "--max_len", str(size["max_len"]),
                                 "--ns", "1,4", "--search_ns", "4", "--max_depth", "2", "--n_eval_problems", P,
                                 "--rl_steps", S, "--rl_prompts", P, "--rl_eval_every", S, "--rl_eval_samples", "1",
                                 "--seeds", "0", "--out_dir", str(out / "pav")] + gen),
        ("rstar_mcts", False, common + ["--base", str(model), "--data", io["train"], "--eval_data", io["test"],
                                        "--n_problems", P, "--n_eval_problems", P, "--rounds", "1", "--rollouts", "2",
                                        "--candidates", "2", "--eval_runs", "2", "--eval_rollouts", "2",
                                        "--eval_candidates", "2", "--maj_samples", "2",
                                        "--sft_epochs", "1", "--max_step_tokens", T, "--exec_timeout", "5",
                                        "--backend", "hf", "--hard_rollouts", "", "--out_dir", str(out / "rstar_mcts"),
                                        "--ppm_args", f"--min_edit 1 --epochs 1 --batch 8 --max_len {size['max_len']}"]),
        ("ppm", False, common + ["--trees", io["trees"], "--out_dir", str(out / "ppm"), "--min_edit", "1", "--epochs", "1",
                                 "--batch", "8", "--batch_tokens", str(size["batch_tokens"]),
                                 "--max_len", str(size["max_len"])]),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_of(name: str, given: float | None) -> float | None:
    return given or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table(res: dict) -> str:
    cols = ("rc", "wall_s", "generate_s", "score_s", "train_s", "other_s", "generate_tokens_per_s",
            "score_tokens_per_s", "train_tokens_per_s", "train_mfu", "peak_mem_gib")
    lines = ["| script | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="auto", choices=("auto", "0.5b", "tiny"), help="auto: 0.5b on CUDA, else tiny")
    ap.add_argument("--only", default="", help="comma list of scripts (default: all; search needs prm_train's PRM)")
    ap.add_argument("--out_dir", default="runs/gpu_check")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by its name)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per script")
    ap.add_argument("--child", nargs=2, metavar=("SCRIPT", "REPORT"), help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args()
    if a.child:
        child(a.child[0], a.child[1], a.peak_tflops, rest[1:] if rest[:1] == ["--"] else rest)
    import torch
    cuda = torch.cuda.is_available()
    shape = a.shape if a.shape != "auto" else ("0.5b" if cuda else "tiny")
    only = [s for s in a.only.split(",") if s] or list(SCRIPTS)
    if set(only) - set(SCRIPTS):
        ap.error(f"--only: unknown script {sorted(set(only) - set(SCRIPTS))[0]!r} (one of {', '.join(SCRIPTS)})")
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_of(device, a.peak_tflops) if cuda else a.peak_tflops  # (on CPU only when given: tests)
    t = time.perf_counter()
    model = build_model(out / f"model_{shape}", shape)
    io = write_inputs(out / "inputs", SIZES[shape]["problems"])
    print(f"gpu_check: {device}, shape {shape}, model {model} ({time.perf_counter() - t:.1f} s), "
          f"peak {peak or 'unknown'} TFLOPS", flush=True)
    res = {}
    for name, torchrun, argv in jobs(model, io, out, SIZES[shape]):
        if name not in only:
            continue
        report = out / f"{name}.report.json"
        report.unlink(missing_ok=True)
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                   str(free_port())] if torchrun else [sys.executable])
        cmd = launch + [str(Path(__file__).resolve()), "--child", name, str(report)] + (
            ["--peak_tflops", str(peak)] if peak else []) + ["--"] + argv
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        t = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=a.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        r = json.loads(report.read_text()) if report.exists() else {}
        res[name] = {**r, "rc": rc if rc else r.get("rc", rc), "process_s": round(time.perf_counter() - t, 1),
                     "torchrun": torchrun, "log": str(out / f"{name}.log")}
        print(f"{name}: rc {res[name]['rc']}, {res[name]['process_s']} s; " + ", ".join(
            f"{k} {res[name].get(k)}" for k in ("generate_tokens_per_s", "train_tokens_per_s", "train_mfu",
                                                 "peak_mem_gib")), flush=True)
    summary = {"device": device, "shape": shape, "peak_tflops": peak, "torch": torch.__version__,
               "model_config": SHAPES[shape], "sizes": SIZES[shape], "scripts": res}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(f"{device}, shape {shape}\n\n" + table(res) + "\n")
    print(table(res))
    return 0 if all(r["rc"] == 0 for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
